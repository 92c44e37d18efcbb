"""``make retrain``: refuses without published labels; triggers through Airflow's REST API when it is up.

The Airflow API is a small local HTTP server speaking the four endpoints retrain uses
(health, token, unpause, trigger), so no Airflow process is needed.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from likerank import orchestrate
from likerank.cli.main import main
from pipeline.core.storage import LocalStorage
from tests.training.test_train_data import make_labels_run


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LIKERANK_STORAGE__ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    (tmp_path / "airflow").mkdir()
    (tmp_path / "airflow" / "simple_auth_manager_passwords.json.generated").write_text('{"admin": "pw-123"}')
    return tmp_path


#: The state the fake API reports for the triggered run (a test sets it).
RUN_STATE = {"state": "success"}


@pytest.fixture
def fake_airflow(monkeypatch):
    calls: list[tuple[str, str, dict, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else {}
            calls.append((self.command, self.path, body, self.headers.get("Authorization", "")))
            return body

        def do_GET(self):  # noqa: N802
            self._record()
            if self.path == "/api/v2/monitor/health":
                return self._reply(200, {"metadatabase": {"status": "healthy"}})
            if self.path == "/api/v2/dags/retrain/dagRuns/manual__x":
                return self._reply(200, {"dag_run_id": "manual__x", "state": RUN_STATE["state"]})
            if self.path == "/api/v2/dags/retrain/dagRuns/manual__x/taskInstances":
                tasks = {"launch": RUN_STATE["state"], "register": "upstream_failed" if RUN_STATE["state"] == "failed"
                         else "success"}
                return self._reply(200, {"task_instances": [{"task_id": t, "state": s} for t, s in tasks.items()]})
            return self._reply(404, {})

        def do_POST(self):  # noqa: N802
            body = self._record()
            if self.path == "/auth/token":
                ok = body == {"username": "admin", "password": "pw-123"}
                return self._reply(201 if ok else 401, {"access_token": "tok"} if ok else {})
            if self.path == "/api/v2/dags/retrain/dagRuns":
                return self._reply(200, {"dag_run_id": "manual__x", "state": "queued"})
            return self._reply(404, {})

        def do_PATCH(self):  # noqa: N802
            self._record()
            return self._reply(200, {"dag_id": "retrain", "is_paused": False})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LIKERANK_AIRFLOW_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield calls
    server.shutdown()


def test_refuses_without_published_labels(env, capsys, monkeypatch):
    monkeypatch.setattr(orchestrate, "dags_test", lambda *a, **k: pytest.fail("must not reach Airflow"))
    assert main(["retrain"]) == 2
    assert "refused: no labels run is published" in capsys.readouterr().err


def test_triggers_the_dag_through_the_api_when_airflow_is_up(env, fake_airflow, capsys, monkeypatch):
    make_labels_run(LocalStorage(env / "data"), n={"train": 4, "val": 2, "test": 2})
    monkeypatch.setattr(orchestrate, "dags_test", lambda *a, **k: pytest.fail("Airflow is up: must use the API"))
    assert main(["retrain"]) == 0
    assert "triggered DAG 'retrain' run 'manual__x'" in capsys.readouterr().out
    authed = [(m, p, b) for m, p, b, auth in fake_airflow if auth == "Bearer tok"]
    assert ("PATCH", "/api/v2/dags/retrain", {"is_paused": False}) in authed
    assert ("POST", "/api/v2/dags/retrain/dagRuns", {"logical_date": None, "conf": {}}) in authed


@pytest.mark.parametrize("state, rc", [("success", 0), ("failed", 1)])
def test_wait_exits_with_the_runs_state_and_names_each_tasks(env, fake_airflow, capsys, monkeypatch, state, rc):
    """`make retrain WAIT=1`: waits for the triggered run, then exits 0 on success, 1 on failure."""
    make_labels_run(LocalStorage(env / "data"), n={"train": 4, "val": 2, "test": 2})
    monkeypatch.setitem(RUN_STATE, "state", state)
    assert main(["retrain", "--wait"]) == rc
    out = capsys.readouterr().out
    assert f"DAG 'retrain' run 'manual__x': {state} (launch {state}, register " in out


def test_falls_back_to_dags_test_without_airflow(env, monkeypatch):
    make_labels_run(LocalStorage(env / "data"), n={"train": 4, "val": 2, "test": 2})
    monkeypatch.setenv("LIKERANK_AIRFLOW_URL", "http://127.0.0.1:9")  # nothing listens on discard
    monkeypatch.setattr(orchestrate, "dags_test", lambda *a, **k: 0)
    assert main(["retrain"]) == 0
