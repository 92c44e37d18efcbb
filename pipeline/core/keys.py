"""Every storage key and pointer likerank reads or writes, defined once.

Tables (``posts/``, ``faces/``, ``labels/`` ...) are Delta tables laid out by
:mod:`pipeline.core.schemas` (their paths, partition columns and identity keys) and written by
:mod:`pipeline.core.tables`. Everything else a stage writes beside them is named here: run folders, their
side files, the pointers that say which run is live, and the scraper's crawl state. A stage
imports the key it needs instead of spelling it.

======================================  ==============================================
``labels/_published.json``              pointer: the validated labels run training reads
``labels/run=<id>/``                    one labeling run: data, resolved config, summary
``validation/run=<id>/``                its Great Expectations result and Data Docs
``validation/index.html``               the Data Docs index: every validated run, passed or failed
``models/latest.json``                  pointer: the newest registered model run
``models/<run>/``                       checkpoint, metrics, predictions, config
``images/<aa>/<sha256>``                content-addressed image bytes
``faces/_manifests/<partition>.json``   one detection shard's list of images
``state/scrape/<host>/<tag>.json``      crawl coverage per (instance, hashtag)
``state/tombstones/``                   who and what ``likerank forget`` removed (a table, hashed)
``state/refs/``                         how to re-read a post (a table: Bluesky at:// URIs)
``state/migrate/strip_images.json``     images being re-keyed by ``likerank migrate`` (a journal)
``runs/scrape/<day>/``                  one summary per scrape run
``reports/<run>/``                      the HTML report of a labels run (local storage)
``state/reports/<run>/<copy>.json``     one folder a report of that run was written to (host, path)
``state/forget/<id>.json``              a queued forget request (author keys, posts), until run
``exports/<run>/<format>/``             the default folder of ``likerank export`` (layout: export_layout)
======================================  ==============================================
"""

from __future__ import annotations

from pipeline.core.schemas import TABLES

# ---------------------------------------------------------------- pointers

PUBLISHED_LABELS = "labels/_published.json"
LATEST_MODEL = "models/latest.json"

# ---------------------------------------------------------------- labels and their validation


def labels_run(run_id: str) -> str:
    """The folder of one labeling run (the ``labels`` table's partition for it)."""
    t = TABLES["labels"]
    return f"{t.path}/{t.partition}={run_id}"


def labels_config(run_id: str) -> str:
    """The resolved config the run was labeled with (secrets shown as ``***``)."""
    return f"{labels_run(run_id)}/_config.toml"


def labels_summary(run_id: str) -> str:
    """Rows in and out, drops by reason, groups, parameters and their hash."""
    return f"{labels_run(run_id)}/_summary.json"


def labels_eval(run_id: str) -> str:
    """Every labeler's AUC and Spearman against a ground-truth file."""
    return f"{labels_run(run_id)}/_eval.json"


def validation_run(run_id: str) -> str:
    return f"validation/run={run_id}"


def validation_result(run_id: str) -> str:
    return f"{validation_run(run_id)}/result.json"


def validation_docs(run_id: str) -> str:
    """The run's Data Docs folder (open ``index.html``: its expectations, each passed or failed)."""
    return f"{validation_run(run_id)}/data_docs"


def validation_page(run_id: str) -> str:
    """The run's Data Docs page."""
    return f"{validation_docs(run_id)}/index.html"


def validation_index() -> str:
    """The Data Docs index of every validation run in storage (beside the ``run=<id>/`` folders)."""
    return "validation/index.html"


# ---------------------------------------------------------------- models


def model_run(run_id: str) -> str:
    return f"models/{run_id}"


def model_checkpoint(run_id: str) -> str:
    return f"{model_run(run_id)}/checkpoint.pt"


def model_metrics(run_id: str) -> str:
    return f"{model_run(run_id)}/metrics.json"


def model_predictions(run_id: str) -> str:
    """Per-post val/test predictions (the ``predictions`` schema)."""
    return f"{model_run(run_id)}/predictions.parquet"


def model_config(run_id: str) -> str:
    return f"{model_run(run_id)}/config.toml"


def model_card(run_id: str) -> str:
    """What the model was trained on, its metrics, intended use, biases and licenses (Markdown)."""
    return f"{model_run(run_id)}/MODEL_CARD.md"


# ---------------------------------------------------------------- images, faces, scrape


def image_bytes(sha256: str) -> str:
    """Content-addressed: the same bytes are stored once whatever their URL."""
    return f"images/{sha256[:2]}/{sha256}"


#: The batch of images ``likerank migrate`` is re-keying after stripping their metadata; present
#: only while a batch is under way (a rerun finishes it first).
STRIP_JOURNAL = "state/migrate/strip_images.json"


def faces_manifest(partition: str) -> str:
    return f"faces/_manifests/{partition}.json"


def _host_name(host: str) -> str:
    """``host[:port]`` as one path segment (a port must not make a second folder level)."""
    return host.lower().replace(":", "_")


def crawl_states() -> str:
    """The folder of every crawl state."""
    return "state/scrape/"


def crawl_state(host: str, hashtag: str, platform: str = "mastodon") -> str:
    """Which posts of one timeline were read. Mastodon's keep their first layout; another
    platform's get a folder of its own (the simulator serves both from one host)."""
    where = _host_name(host) if platform == "mastodon" else f"{_host_name(host)}/{platform}"
    return f"{crawl_states()}{where}/{hashtag.lower()}.json"


def scrape_runs(day: str = "") -> str:
    """The folder of the scrape run summaries (of one day, or of all)."""
    return f"runs/scrape/{day}/" if day else "runs/scrape/"


def scrape_run(day: str, host: str, hashtag: str, stamp: str, platform: str = "mastodon") -> str:
    """One scrape run's summary; ``stamp`` makes it unique, so no run overwrites another."""
    where = _host_name(host) if platform == "mastodon" else f"{platform}__{_host_name(host)}"
    return f"{scrape_runs(day)}{where}__{hashtag}-{stamp}.json"


def report_run(run_id: str) -> str:
    """The report of a labels run, on local storage (elsewhere it goes to ``./reports/``)."""
    return f"reports/{run_id}"


def report_records() -> str:
    """The folder of every report's location records."""
    return "state/reports/"


def report_locations(run_id: str) -> str:
    """The folder of the records of where the reports of a labels run were written, so a forget
    can reach every copy of their thumbnails, on this storage or on a local disk beside it."""
    return f"{report_records()}{run_id}/"


def report_location(run_id: str, copy_id: str) -> str:
    """One copy's record (``copy_id``: a digest of its host and folder, so rewrites replace it)."""
    return f"{report_locations(run_id)}{copy_id}.json"


def forget_request(request_id: str) -> str:
    """A forget request the ``forget`` DAG runs by its opaque id (the DAG's conf holds nothing else)."""
    return f"state/forget/{request_id}.json"


# ---------------------------------------------------------------- exports


def export_folder(run_id: str, fmt: str) -> str:
    """Where ``likerank export RUN --format FMT`` writes when no ``--output`` is given, and where
    ``training.input = 'shards'`` looks when ``training.shards`` is empty."""
    return f"exports/{run_id}/{fmt}"
