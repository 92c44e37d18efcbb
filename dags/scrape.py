"""
### Scrape

Daily: reads each configured hashtag from each platform (Mastodon instances, Bluesky), keeps the eligible
photo posts, downloads their images and writes the day's `posts`, `engagement`, `images` and
`downloads` partitions, then emits **posts** and **images** (Assets `likerank_posts`,
`likerank_images`), which trigger face detection. Its first-look `engagement` rows are stored
but emit no Asset event: labeling waits for the faces (and for `refresh_engagement`'s mature
snapshots), so it never starts on posts whose faces are not detected yet.

* `pairs` resolves the params (`platforms`, `instances`, `bluesky_services`, `hashtags`;
  defaults from the `[source]` config) into (platform, instance, hashtag) triples. With
  `source.kind = "simulator"` the URLs come from the orchestration, which starts the
  simulator (it serves both platforms).
* `scrape` is mapped over them (`.expand`): one task per platform and hashtag, so a 429 on
  one platform does not stall the other (a long server wait ends that task early, its state
  saved, not failed). Each is incremental (it reads only posts not read before; state in
  `state/scrape/<host>/[bluesky/]<tag>.json`) and merges into `dt=<date>` on each table's
  identity key, so a retry or rerun duplicates nothing. Mapped tasks and runs of different
  days run in parallel: the tables are Delta tables that take concurrent commits, and each
  timeline's crawl state is leased to one task at a time (a task that finds it taken returns
  at once, `stopped: busy`, since the holder reads those posts).
  Credentials come from Airflow connections when set (`source.airflow_conn_id`: the Mastodon
  token as its password; `source.bluesky_airflow_conn_id`: the Bluesky login and app
  password), else from the environment variables the `[source]` config names; they are
  never logged.
* `summarize` adds the per-task summaries up (posts seen, kept, skipped by reason,
  downloads by status, per platform) for the log and XCom.

Bad images are `downloads` rows with a `status`, not failures; a task fails only when a
whole timeline page cannot be read after retries (what was read before is kept).
Owner: likerank-data.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from likerank_assets import (
    DEFAULT_ARGS,
    HTTP_TASK_TIMEOUT,
    IMAGES,
    POSTS,
    START_DATE,
    source_credentials,
)


@dag(
    dag_id="scrape",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    # Runs of different days overlap (a backfill runs in parallel); each timeline's crawl state
    # is leased to one task at a time, and a task that finds it taken ends saying so.
    max_active_runs=4,
    default_args=DEFAULT_ARGS,
    tags=["likerank", "scrape"],
    doc_md=__doc__,
    params={
        "platforms": Param([], type="array", description="'mastodon', 'bluesky'; empty = source.platforms."),
        "instances": Param([], type="array", description="Mastodon instance base URLs; empty = source.instance_url."),
        "bluesky_services": Param([], type="array", description="Bluesky XRPC services; empty = source.bluesky_url."),
        "hashtags": Param([], type="array", description="Hashtags without '#'; empty = source.hashtags."),
        "max_posts": Param(None, type=["null", "integer"], description="Posts per task; null = scrape.max_posts."),
    },
)
def scrape_dag():
    @task
    def pairs(params: dict | None = None) -> list[dict]:
        from pipeline.core.config import load_config
        from pipeline.scrape.scrape import scrape_pairs

        return scrape_pairs(load_config(), params.get("instances") or [], params.get("hashtags") or [],
                            params.get("max_posts"), bluesky_services=params.get("bluesky_services") or [],
                            platforms=params.get("platforms") or [])

    @task(outlets=[POSTS, IMAGES], execution_timeout=HTTP_TASK_TIMEOUT)
    def scrape(pair: dict, **context) -> dict:
        from pipeline.core.config import load_config
        from pipeline.scrape.scrape import scrape as run

        cfg = load_config()
        return run(cfg, pair["instance"], pair["hashtag"], context.get("logical_date") or context["dag_run"].run_after,
                   max_posts=pair.get("max_posts"), platform=pair.get("source", "mastodon"),
                   **source_credentials(cfg))

    @task
    def summarize(summaries: list[dict]) -> dict:
        from pipeline.scrape.scrape import merge_summaries

        # Indexing (not iterating) the lazy XCom sequence: iteration probes one past the end
        # and logs a false "XCom not found" error.
        return merge_summaries([summaries[i] for i in range(len(summaries))])

    summarize(scrape.expand(pair=pairs()))


scrape_dag()
