"""
### Detect faces

Runs whenever the scrape publishes new **images** (Asset `likerank_images`): finds every stored
image with no `faces` row for the configured SCRFD model, detects faces in shards (one mapped
task per shard of `faces.shard_size` images, never per image, fewer than `max_map_length`), and
publishes **faces** (Asset `likerank_faces`) for the labeling DAG.

* `plan` writes each shard's image list to `faces/_manifests/` and hands on only its key.
* `detect` (mapped) loads the model once and writes one partition
  `faces/dt=<date>-s<shard>-<digest>/`; a retry replaces that partition, nothing else.
  It runs on `faces.queue` (default `gpu`: the GPU workers) and `faces.pool`, and with
  `faces.kubernetes_gpus` its pod requests GPUs under the Kubernetes executor.
* `summarize` merges the shard summaries (images, 0/1/many faces, errors, provider).

Bad images are rows with a `status`, not failures. Re-running with a new model (a new
`detector_id`, the model file's sha256) re-detects everything. Owner: likerank-data.
"""

from __future__ import annotations

from contextlib import contextmanager

from airflow.sdk import dag, task
from likerank_assets import DEFAULT_ARGS, FACES, IMAGES, START_DATE
from likerank_routing import detect_routing


@contextmanager
def _no_retry_on_setup_errors():
    """A missing or wrong model does not heal on retry: fail the task at once, saying why."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.faces.detector import DetectorError

    try:
        yield
    except DetectorError as exc:
        raise AirflowFailException(str(exc)) from exc


def _run_day(context) -> str:
    # Asset-triggered runs have no logical date in Airflow 3; they have run_after.
    when = context.get("logical_date") or context["dag_run"].run_after
    return when.date().isoformat()


@dag(
    dag_id="detect_faces",
    schedule=[IMAGES],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["likerank", "faces"],
    doc_md=__doc__,
)
def detect_faces():
    @task
    def plan(**context) -> list[dict]:
        from airflow.sdk.configuration import conf

        from pipeline.core.config import load_config
        from pipeline.faces.detect_faces import write_shard_manifests

        with _no_retry_on_setup_errors():
            return write_shard_manifests(load_config(), _run_day(context),
                                         max_shards=conf.getint("core", "max_map_length"))

    @task(**detect_routing())
    def detect(shard: dict, **context) -> dict:
        from pipeline.core.config import load_config
        from pipeline.faces.detect_faces import detect_manifest

        with _no_retry_on_setup_errors():
            return detect_manifest(load_config(), shard, _run_day(context))

    @task(outlets=[FACES])
    def summarize(summaries: list[dict]) -> dict:
        from pipeline.faces.detect_faces import merge_summaries

        # Indexing (not iterating) the lazy XCom sequence: iteration probes one past the end.
        return merge_summaries([summaries[i] for i in range(len(summaries))])

    summarize(detect.expand(shard=plan()))


detect_faces()
