"""``make retrain``: fine-tune on the latest published labels, through Airflow when it runs.

Which path runs:

1. No labels run published (``labels/_published.json`` missing) -> refuse, exit 2, before
   touching Airflow or torch.
2. An Airflow API server answers ``GET <url>/api/v2/monitor/health`` (url: ``$LIKERANK_AIRFLOW_URL``,
   default http://localhost:8080, i.e. ``make airflow`` is running) -> trigger the ``retrain``
   DAG over the REST API: a token from ``POST /auth/token`` with the admin password from
   ``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated``, unpause the DAG, ``POST
   /api/v2/dags/retrain/dagRuns``. Prints the dag run id and returns (``--wait`` polls until
   the run finishes). The scheduler runs it, its logs are in the UI.
3. Otherwise -> ``airflow dags test retrain`` in a subprocess: the same DAG, executed in this
   terminal without a scheduler (needs the migrated metadata DB that ``make setup`` creates).
4. ``--direct`` -> no Airflow at all: launch, wait and print the metrics summary here.

Exit status 0 on success (or a successful trigger), 1 on a failed run, 2 when refused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DAG_ID = "retrain"
REPO = Path(__file__).resolve().parents[1]


def airflow_url() -> str:
    return os.environ.get("LIKERANK_AIRFLOW_URL", "http://localhost:8080").rstrip("/")


def airflow_is_up(url: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(f"{url}/api/v2/monitor/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def admin_password(airflow_home: str | None = None) -> tuple[str, str]:
    home = Path(airflow_home or os.environ.get("AIRFLOW_HOME") or REPO / ".airflow")
    f = home / "simple_auth_manager_passwords.json.generated"
    if not f.is_file():
        raise RuntimeError(f"Airflow is up but {f} does not exist: set AIRFLOW_HOME to the running instance's home")
    users = json.loads(f.read_text())
    user = "admin" if "admin" in users else next(iter(users))
    return user, users[user]


def trigger_via_api(url: str, *, wait: bool = False, poll_s: float = 10.0, conf: dict | None = None) -> int:
    """Trigger the DAG through Airflow's REST API; returns an exit status."""
    import requests

    user, password = admin_password()
    r = requests.post(f"{url}/auth/token", json={"username": user, "password": password}, timeout=10)
    r.raise_for_status()
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    s.patch(f"{url}/api/v2/dags/{DAG_ID}", json={"is_paused": False}, timeout=10).raise_for_status()
    r = s.post(f"{url}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf or {}}, timeout=10)
    r.raise_for_status()
    run_id = r.json()["dag_run_id"]
    print(f"retrain: triggered DAG {DAG_ID!r} run {run_id!r} on {url} (watch it in the UI: {url}/dags/{DAG_ID})")
    if not wait:
        return 0
    while True:
        state = s.get(f"{url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=10).json().get("state")
        if state in ("success", "failed"):
            print(f"retrain: DAG run {run_id} {state}")
            return 0 if state == "success" else 1
        time.sleep(poll_s)


def run_dag_test() -> int:
    """``airflow dags test retrain`` with the repository's Airflow settings (the Makefile's, if unset)."""
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(REPO / ".airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    airflow = Path(sys.executable).parent / "airflow"
    cmd = [str(airflow) if airflow.exists() else "airflow", "dags", "test", DAG_ID]
    print(f"retrain: no Airflow API server at {airflow_url()}; running the DAG in-process: {' '.join(cmd)}")
    return subprocess.call(cmd, env=env)


def run_direct(cfg) -> int:
    from training.launch import TrainingFailed, train_on_published

    try:
        summary = train_on_published(cfg)
    except TrainingFailed as exc:
        print(f"retrain: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__.split("\n")[0])
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--wait", action="store_true", help="when triggering through the API, wait for the run to finish")
    p.add_argument("--direct", action="store_true", help="train here without Airflow")
    args = p.parse_args(argv)

    from pipeline.config import ConfigError, load_config
    from pipeline.storage import open_storage
    from training.data import LabelsNotPublished, published_labels

    try:
        cfg = load_config(args.config)
        labels = published_labels(open_storage(cfg.storage))
    except (ConfigError, LabelsNotPublished) as exc:
        print(f"retrain: refused: {exc}", file=sys.stderr)
        return 2
    print(f"retrain: published labels run {labels['run_id']!r} ({labels.get('rows')} rows, "
          f"published {labels.get('published_at')})")
    if args.direct:
        return run_direct(cfg)
    url = airflow_url()
    if airflow_is_up(url):
        return trigger_via_api(url, wait=args.wait)
    return run_dag_test()


if __name__ == "__main__":
    sys.exit(main())
