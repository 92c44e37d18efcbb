"""The Assets the likerank DAGs hand each other (data-aware scheduling).

scrape -> posts, images -> detect_faces -> faces -> build_labels -> labels -> retrain -> model
refresh_engagement -> engagement -> build_labels

Each URI names a table under the configured storage root; the Asset is the logical hand-off,
the storage root says where the bytes are.
"""

from datetime import timedelta

import pendulum
from airflow.sdk import Asset

POSTS = Asset(name="likerank_posts", uri="likerank://tables/posts")
ENGAGEMENT = Asset(name="likerank_engagement", uri="likerank://tables/engagement")
IMAGES = Asset(name="likerank_images", uri="likerank://tables/images")
FACES = Asset(name="likerank_faces", uri="likerank://tables/faces")
LABELS = Asset(name="likerank_labels", uri="likerank://tables/labels")
MODEL = Asset(name="likerank_model", uri="likerank://models/latest")

#: Every DAG's start date. Early on purpose: runs are never caught up (catchup=False), and a
#: logical date before a DAG's start date would silently skip all its tasks — `make run` uses
#: the simulated world's clock (2025) as the logical date, and backfills may reach back too.
START_DATE = pendulum.datetime(2020, 1, 1, tz="UTC")

#: Defaults every DAG shares: an owner to page, retries for transient failures (network,
#: storage) after 1 then 2 minutes. Errors that cannot heal (bad config, failed validation)
#: raise AirflowFailException in the task and skip the retries.
#: Longest a task that talks to the network may run: a server that stalls every request just
#: under the client's timeouts still cannot hold a worker slot forever.
HTTP_TASK_TIMEOUT = timedelta(hours=6)

DEFAULT_ARGS = {
    "owner": "likerank-data",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
}


def source_credentials(cfg) -> dict:
    """The credentials the `[source]` config names Airflow connections for, as keyword
    arguments of the scrape and refresh stages: ``token`` (Mastodon: the connection's
    password) and ``login`` (Bluesky: its login and password). Without a connection the stages
    read the environment. Never logged."""
    out: dict = {"token": None, "login": None}
    if cfg.source.airflow_conn_id or cfg.source.bluesky_airflow_conn_id:
        from airflow.sdk import Connection

        if cfg.source.airflow_conn_id:
            out["token"] = Connection.get(cfg.source.airflow_conn_id).password or None
        if cfg.source.bluesky_airflow_conn_id:
            conn = Connection.get(cfg.source.bluesky_airflow_conn_id)
            out["login"] = (conn.login, conn.password) if conn.login and conn.password else None
    return out
