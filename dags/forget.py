"""
### Forget an author or a post

Triggered by hand (the trigger form asks for **one** of: an account URL/URI, an author key,
or an instance + post id). Removes every row of that author or post from every table and
partition, the image bytes no remaining post references, their rows in model predictions and
the reports and validation results that quote them; unpublishes a labels run that had them;
and records a tombstone so no later scrape or labels run collects them again. Models already
trained cannot unlearn: retrain after forgetting. The task log lists what was removed.
Owner: likerank-data.
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
        "account": Param("", type="string", title="Account URL or URI",
                         description="e.g. https://mastodon.social/users/alice (hashed with the configured key)"),
        "author_key": Param("", type="string", title="Author key", description="the pseudonym as stored"),
        "instance": Param("", type="string", title="Instance (with post id)", description="e.g. https://mastodon.social"),
        "post_id": Param("", type="string", title="Post id (with instance)"),
    },
)
def forget_dag():
    @task(execution_timeout=timedelta(hours=2))
    def forget(params: dict) -> dict:
        from pipeline.core.config import load_config
        from pipeline.core.forget import forget_request

        return forget_request(load_config(), account=params["account"], author_key=params["author_key"],
                              instance=params["instance"], post_id=params["post_id"], reason="forget DAG")

    forget()


forget_dag()
