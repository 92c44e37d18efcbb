"""
### Forget an author or a post

Runs a forget request queued by `likerank forget --account … --queue` (or `--author-key`,
`--post`): the command resolves the person through the source's API, stores the request (author
keys and post references, never the account as typed) under an opaque id, and prints
`airflow dags trigger forget --conf '{"request": "<id>"}'`. This DAG's conf holds only that id,
so nothing naming the person reaches Airflow's database or logs; the request is deleted once
it has run.

Removes every row of that author or post from every table and partition, the image bytes no
remaining post references, their rows in model predictions, the validation results and every
recorded copy of the reports that show them; unpublishes a labels run that had them; deletes
old object versions in a versioned bucket; and records a tombstone so no later scrape or labels
run collects them again. Models already trained cannot unlearn: retrain after forgetting. The
task log lists the counts removed. Owner: likerank-data.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task
from likerank_assets import DEFAULT_ARGS, START_DATE


@dag(
    dag_id="forget",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["likerank", "privacy"],
    doc_md=__doc__,
    params={
        "request": Param("", type="string", title="Forget request id",
                         description="the id `likerank forget … --queue` printed (never an account: it would be "
                                     "stored in Airflow's database)"),
    },
)
def forget_dag():
    @task(execution_timeout=timedelta(hours=2))
    def forget(params: dict) -> dict:
        from pipeline.core.config import load_config
        from pipeline.core.forget import run_forget_request

        return run_forget_request(load_config(), params["request"])

    forget()


forget_dag()
