"""
### Refresh engagement

Daily: re-reads (`GET /api/v1/statuses/:id`, batched and rate-limited) every scraped post that
has become at least `labeling.min_age_days` old since its last engagement snapshot, and writes
the new snapshots to `engagement/dt=<date>-refresh/`; emits **engagement** (Asset
`likerank_engagement`), which triggers labeling. Deleted statuses, and posts of authors who
opted out since, are forgotten everywhere (`likerank forget`); the task fails only when an
instance had posts due and none could be read. Reruns re-read only
posts still lacking an old-enough snapshot and merge, so nothing is duplicated.
Owner: likerank-data.
"""

from __future__ import annotations

from airflow.sdk import dag, task
from likerank_assets import (
    DEFAULT_ARGS,
    ENGAGEMENT,
    HTTP_TASK_TIMEOUT,
    START_DATE,
    source_credentials,
)


@dag(
    dag_id="refresh_engagement",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["likerank", "engagement"],
    doc_md=__doc__,
)
def refresh_engagement_dag():
    @task(outlets=[ENGAGEMENT], execution_timeout=HTTP_TASK_TIMEOUT)
    def refresh(**context) -> dict:
        from pipeline.core.config import load_config
        from pipeline.scrape.refresh import refresh_engagement

        cfg = load_config()
        return refresh_engagement(cfg, context.get("logical_date") or context["dag_run"].run_after,
                                  **source_credentials(cfg))

    refresh()


refresh_engagement_dag()
