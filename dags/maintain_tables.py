"""
### Maintain tables

Daily: compacts each table's small files (every scrape flush and merge is a commit of its
own), vacuums the files no version within `storage.retention_hours` still references, writes
a checkpoint and drops the log entries it covers, so reads stay fast as commits pile up. Safe
beside running writers: it never removes files a writer has not committed yet. The same as
`likerank compact`. Owner: likerank-data.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task
from likerank_assets import DEFAULT_ARGS, START_DATE


@dag(
    dag_id="maintain_tables",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["likerank", "maintenance"],
    doc_md=__doc__,
)
def maintain_tables_dag():
    @task(execution_timeout=timedelta(hours=2))
    def compact() -> dict:
        from pipeline.core.config import load_config
        from pipeline.core.maintain import compact_all

        done = compact_all(load_config())
        return {name: {k: v for k, v in what.items() if k in ("version", "vacuumed", "seconds")}
                for name, what in done.items()}

    compact()


maintain_tables_dag()
