"""
### Scrape

Daily: reads each configured hashtag from each instance (Mastodon API), keeps the eligible
photo posts, downloads their images and writes the day's `posts`, `engagement`, `images` and
`downloads` partitions, then emits **posts** and **images** (Assets `likerank_posts`,
`likerank_images`), which trigger face detection. Its first-look `engagement` rows are stored
but emit no Asset event: labeling waits for the faces (and for `refresh_engagement`'s mature
snapshots), so it never starts on posts whose faces are not detected yet.

* `pairs` resolves the params (`instances`, `hashtags`; defaults from the `[source]` config)
  into (instance, hashtag) pairs. With `source.kind = "simulator"` an instance URL must be
  given (param or `source.instance_url`): the orchestration starts the simulator and passes
  its URL.
* `scrape` is mapped over the pairs (`.expand`). Each is incremental (it reads only statuses
  not read before; state in `state/scrape/<host>/<tag>.json`) and merges into `dt=<date>`, so
  a retry or rerun duplicates nothing. Mapped instances run one at a time
  (`max_active_tis_per_dag=1`) because each date partition is a single file.
  The access token comes from the Airflow connection `source.airflow_conn_id` (its password)
  when set, else the environment variable `source.token_env`; it is never logged.
* `summarize` adds the per-pair summaries up (statuses seen, kept, skipped by reason,
  downloads by status) for the log and XCom.

Bad images are `downloads` rows with a `status`, not failures; a task fails only when a
whole timeline page cannot be read after retries (what was read before is kept).
Owner: likerank-data.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from likerank_assets import DEFAULT_ARGS, HTTP_TASK_TIMEOUT, IMAGES, POSTS, START_DATE


@dag(
    dag_id="scrape",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,  # runs share the per-(instance, hashtag) state: one at a time
    default_args=DEFAULT_ARGS,
    tags=["likerank", "scrape"],
    doc_md=__doc__,
    params={
        "instances": Param([], type="array", description="Instance base URLs; empty = source.instance_url."),
        "hashtags": Param([], type="array", description="Hashtags without '#'; empty = source.hashtags."),
        "max_posts": Param(None, type=["null", "integer"], description="Statuses per pair; null = scrape.max_posts."),
    },
)
def scrape_dag():
    @task
    def pairs(params: dict | None = None) -> list[dict]:
        from pipeline.core.config import load_config
        from pipeline.scrape.scrape import scrape_pairs

        return scrape_pairs(load_config(), params.get("instances") or [], params.get("hashtags") or [],
                            params.get("max_posts"))

    @task(max_active_tis_per_dag=1, outlets=[POSTS, IMAGES], execution_timeout=HTTP_TASK_TIMEOUT)
    def scrape(pair: dict, **context) -> dict:
        from pipeline.core.config import load_config
        from pipeline.scrape.scrape import scrape as run

        cfg = load_config()
        token = None
        if cfg.source.airflow_conn_id:
            from airflow.sdk import Connection

            token = Connection.get(cfg.source.airflow_conn_id).password or None
        return run(cfg, pair["instance"], pair["hashtag"], context.get("logical_date") or context["dag_run"].run_after,
                   max_posts=pair.get("max_posts"), token=token)

    @task
    def summarize(summaries: list[dict]) -> dict:
        from pipeline.scrape.scrape import merge_summaries

        # Indexing (not iterating) the lazy XCom sequence: iteration probes one past the end
        # and logs a false "XCom not found" error.
        return merge_summaries([summaries[i] for i in range(len(summaries))])

    summarize(scrape.expand(pair=pairs()))


scrape_dag()
