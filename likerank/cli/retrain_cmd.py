"""``likerank retrain`` (``make retrain``): fine-tune on the latest published labels, through
Airflow when it runs.

Which path runs:

1. No labels run published -> refuse, exit 2, before touching Airflow or torch.
2. An Airflow API server answers at ``$LIKERANK_AIRFLOW_URL`` (default http://localhost:8080,
   i.e. ``make airflow`` is running) -> trigger the ``retrain`` DAG over the REST API
   (:func:`likerank.orchestrate.trigger_dag`). Prints the dag run id and returns (``--wait``
   polls until the run finishes). The scheduler runs it; its logs are in the UI.
3. Otherwise -> ``airflow dags test retrain``: the same DAG, executed in this terminal without
   a scheduler (needs the migrated metadata DB that ``make setup`` creates).
4. ``--direct`` -> no Airflow at all: launch, wait and print the metrics summary here.

Exit status 0 on success (or a successful trigger), 1 on a failed run, 2 when refused.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import Config

DAG_ID = "retrain"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="fine-tune on the latest published labels, through Airflow when it runs")
    p.add_argument("--wait", action="store_true", help="when triggering through the API, wait for the run to finish")
    p.add_argument("--direct", action="store_true", help="train here without Airflow")
    p.set_defaults(handler=retrain)


def retrain(args: argparse.Namespace, cfg: Config) -> int:
    from likerank import orchestrate
    from pipeline.core.published import LabelsNotPublished, require_published
    from pipeline.core.storage import open_storage

    try:
        labels = require_published(open_storage(cfg.storage))
    except LabelsNotPublished as exc:
        print(f"retrain: refused: {exc}", file=sys.stderr)
        return 2
    print(f"retrain: published labels run {labels['run_id']!r} ({labels.get('rows')} rows, "
          f"published {labels.get('published_at')})")
    if args.direct:
        return run_direct(cfg)
    url = orchestrate.airflow_url()
    if orchestrate.airflow_is_up(url):
        return orchestrate.trigger_dag(url, DAG_ID, wait=args.wait)
    print(f"retrain: no Airflow API server at {url}; running the DAG here: airflow dags test {DAG_ID}")
    return orchestrate.dags_test(DAG_ID)


def run_direct(cfg: Config) -> int:
    from training.launch import TrainingFailed, train_on_published

    try:
        summary = train_on_published(cfg)
    except TrainingFailed as exc:
        print(f"retrain: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
