"""
### Build labels

Runs when new **faces** land (Asset `likerank_faces`, from `detect_faces`) or mature
**engagement** does (Asset `likerank_engagement`, from `refresh_engagement`), or by hand.
Labels every eligible face post by the rule in the README (follower-normalized like rank in
exposure groups of `labeling.group_size`), then gates and publishes the run:

* `label` writes `labels/run=<run>/` (data, `_config.toml`, `_summary.json` with the drop
  counts by reason) and hands on the summary. With too few new eligible posts (less than a
  group, or than `validation.min_rows`, or less than a group's worth not in the published
  run) it writes nothing and the run ends **skipped**, the reason and drop counts in the log;
* `validate` runs the Great Expectations checkpoints (labels, posts, faces) and writes the
  result and Data Docs to `validation/run=<run>/`; a failed expectation fails the task, with
  the failed expectations, offending rows and drop counts in its log (failed at once, not
  retried: data does not heal; storage errors are retried);
* `publish` points `labels/_published.json` at the run and emits **labels**
  (Asset `likerank_labels`), which triggers retraining. It only runs after a pass.

The run id is this DAG run's id, cleaned, so a retry or rerun replaces the same partition.
Owner: likerank-data.
"""

from __future__ import annotations

from airflow.sdk import dag, task
from likerank_assets import DEFAULT_ARGS, ENGAGEMENT, FACES, LABELS, START_DATE


@dag(
    dag_id="build_labels",
    schedule=(FACES | ENGAGEMENT),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["likerank", "labels"],
    doc_md=__doc__,
)
def build_labels():
    @task
    def label(**context) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from labeling.build_labels import NothingToLabel, clean_run_id
        from labeling.build_labels import build_labels as build
        from pipeline.core.config import load_config

        try:
            return build(load_config(), clean_run_id(context["run_id"]))
        except NothingToLabel as exc:  # not a failure: the run ends skipped, saying why
            raise AirflowSkipException(str(exc)) from exc

    @task
    def validate(summary: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from labeling.validate import ValidationFailed, validate_run
        from pipeline.core.config import load_config

        try:
            report = validate_run(load_config(), summary["run_id"])
        except ValidationFailed as exc:  # data does not heal on retry: fail now, with the summary
            raise AirflowFailException(str(exc)) from exc
        return {k: report[k] for k in ("run_id", "success", "validation_key", "docs_key")}

    @task(outlets=[LABELS])
    def publish(report: dict) -> dict:
        from pipeline.core.config import load_config
        from pipeline.core.published import publish as publish_run

        return publish_run(load_config(), report["run_id"])

    publish(validate(label()))


build_labels()
