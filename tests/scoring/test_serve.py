"""``likerank serve``: real HTTP requests against the service (uvicorn on loopback, the exported
ONNX model), its limits under stalled, idle and surplus clients, its token, and its page in
headless Chromium scoring a photo end to end."""

from __future__ import annotations

import html.parser
import io
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.storage import LocalStorage
from scoring.model import OnnxModel
from scoring.serve import ScoringService, ServeRefused, is_loopback, serve
from scoring.torch_model import export_onnx, load_registry_model
from tests.fixtures.scoring import FACE_PHOTOS as FACES
from tests.fixtures.scoring import MODEL_RUN as RUN
from tests.fixtures.scoring import NO_FACE_PHOTO as NO_FACE

MAX_BYTES = 2_000_000
TOKEN = "test-token-7c1e0f3a9b2d4e6f"


@pytest.fixture(scope="module")
def onnx_model(model_root, tmp_path_factory) -> OnnxModel:
    """The registered test model, exported and loaded on onnxruntime."""
    path = export_onnx(load_registry_model(LocalStorage(model_root)), tmp_path_factory.mktemp("onnx") / "model.onnx")
    return OnnxModel(path)


def start(model_root, model, *overrides: str, token: str | None = None, batching: bool = True):
    cfg = load_config(env={}, overrides=[f"storage.root={model_root}", "scrape.allow_hosts=127.0.0.1",
                                         f"scrape.max_bytes={MAX_BYTES}", *overrides])
    service = ScoringService(cfg, model, token=token, batching=batching)
    return service, serve(service, port=0)


@pytest.fixture(scope="module")
def service_url(model_root, onnx_model):
    _, server = start(model_root, onnx_model, "serve.body_timeout_s=2", "serve.head_timeout_s=2")
    yield server.url
    server.shutdown()


class GatedModel:
    """The ONNX model, whose first call waits until the test opens the gate: it makes "busy"
    and "arriving together" states a test can wait for, not a race."""

    def __init__(self, model: OnnxModel):
        self.model, self.spec = model, model.spec
        self.entered, self.gate = threading.Event(), threading.Event()
        self.first_rows = 0

    def run(self, batch):
        if not self.entered.is_set():
            self.first_rows = len(batch)
            self.entered.set()
            self.gate.wait(120)
        return self.model.run(batch)


def wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    sock.settimeout(60)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def stalled_upload(url: str, length: int = MAX_BYTES, sent: bytes = b"\xff\xd8\xff") -> socket.socket:
    """A client that announces ``length`` bytes, sends ``sent`` and then nothing."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return sock


def post_image(url: str, path: str, headers: dict | None = None, **kw) -> requests.Response:
    kw.setdefault("timeout", 60)
    return requests.post(f"{url}/score", data=Path(path).read_bytes(),
                         headers={"Content-Type": "image/png", **(headers or {})}, **kw)


def test_binds_loopback_and_answers_healthz(service_url):
    assert service_url.startswith("http://127.0.0.1:")
    health = requests.get(f"{service_url}/healthz", timeout=10).json()
    assert health == {"status": "ok", "model_run_id": RUN, "detector_id": health["detector_id"]}
    assert len(health["detector_id"]) == 64


def test_score_an_upload_with_its_best_crop(service_url):
    r = post_image(service_url, FACES[2])
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    row = r.json()
    assert row["status"] == "ok" and 0 < row["prob"] < 1 and row["model_run_id"] == RUN
    assert row["best_crop"]["best"]["aspect"] in ("1:1", "4:5") and row["best_crop"]["candidates"] > 1
    assert requests.post(f"{service_url}/score?best_crop=0", data=Path(FACES[2]).read_bytes(),
                         timeout=60).json()["best_crop"] is None


@pytest.mark.parametrize("body, status, code", [
    (Path(NO_FACE).read_bytes(), "no_face", 422),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "decode_error", 422),
])
def test_bad_uploads_are_rows_with_a_status(service_url, body, status, code):
    r = requests.post(f"{service_url}/score", data=body, timeout=60)
    assert r.status_code == code and r.json()["status"] == status and r.json()["error"]


def test_uploads_past_the_limit_and_without_a_length_are_refused_unread(service_url):
    r = requests.post(f"{service_url}/score", data=b"\0" * (MAX_BYTES + 1), timeout=60)
    assert r.status_code == 413 and "max_bytes" in r.json()["error"]
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(service_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("POST", "/score")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    assert conn.getresponse().status == 411


def test_score_by_url_goes_through_the_ssrf_guard(service_url, image_server):
    ok = requests.post(f"{service_url}/score", json={"url": f"{image_server}/astronaut.png"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["prob"] > 0
    blocked = requests.post(f"{service_url}/score", json={"url": "http://169.254.169.254/latest/meta-data/"},
                            timeout=60)
    assert blocked.status_code == 502 and "blocked" in blocked.json()["error"]
    assert requests.post(f"{service_url}/score", data=b"{not json", headers={"Content-Type": "application/json"},
                         timeout=10).status_code == 400


class _Dom(html.parser.HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.by_id: dict[str, str] = {}
        self._open: list[str] = []
        self.body: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        self._open.append(attrs.get("id", ""))

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.by_id[i] = self.by_id.get(i, "") + data


CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (CI installs Debian's `chromium`)")
def test_the_page_scores_a_photo_in_headless_chromium(service_url, image_server, tmp_path):
    page = f"{service_url}/?url={image_server}/astronaut.png"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
                          "--dump-dom", page], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Dom(dom.stdout)
    expected = requests.post(f"{service_url}/score", json={"url": f"{image_server}/astronaut.png"}, timeout=60).json()
    assert parsed.by_id.get("prob", "").strip() == f"{expected['prob']:.3f}", dom.stdout[-3000:]
    assert "best crop" in parsed.by_id.get("best-caption", "")
    assert parsed.body.get("data-rendered") == "yes"  # the photo and the crop were drawn
    assert RUN in parsed.by_id.get("model", "")
    json.dumps(parsed.by_id)  # nothing odd in the text


# --------------------------------------------------------------------------- the open network


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_formats_the_service_does_not_take_are_415(service_url, fmt):
    buf = io.BytesIO()
    Image.open(FACES[2]).convert("RGB").save(buf, format=fmt)  # a real photo with a face, re-encoded
    r = requests.post(f"{service_url}/score", data=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 415, r.text
    assert f"a {fmt} image" in r.json()["error"] and "JPEG, PNG, WEBP" in r.json()["error"]
    text = requests.post(f"{service_url}/score", data=b"hello, not a photo", timeout=60)
    assert text.status_code == 415 and "not an image" in text.json()["error"]


def test_a_stalled_upload_is_cut_off(service_url):
    with stalled_upload(service_url) as sock:
        answer = read_to_eof(sock)  # serve.body_timeout_s = 2: a 408, then the connection closes
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout_s" in answer


@pytest.mark.parametrize("sent", [b"", b"POST /score HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "half-a-head"])
def test_a_connection_without_a_whole_request_head_is_closed(service_url, sent):
    host, port = service_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(sent)
        assert read_to_eof(sock) == b""  # serve.head_timeout_s = 2: closed without an answer


def test_normal_requests_are_served_while_50_stalled_uploads_are_held(model_root, onnx_model):
    service, server = start(model_root, onnx_model, "serve.body_timeout_s=600")
    stalled = [stalled_upload(server.url) for _ in range(50)]
    try:
        wait_until(lambda: service.budget.held == 50 * 3, "the 50 stalled uploads' first bytes arrived")
        r = post_image(server.url, FACES[0])
        assert r.status_code == 200 and r.json()["status"] == "ok"
        for sock in stalled:  # still held open, unanswered
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in stalled:
            sock.close()
        server.shutdown()
    assert service.budget.held == 0  # the stalled uploads' bytes were given back


def test_over_the_work_cap_is_503_with_retry_after(model_root, onnx_model):
    gated = GatedModel(onnx_model)
    service, server = start(model_root, gated, "serve.max_concurrent=1", "serve.max_connections=4",
                            "serve.retry_after_s=3")
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post_image, server.url, FACES[0], params={"best_crop": "0"})
            assert gated.entered.wait(120), "the first request never reached the model"
            busy = post_image(server.url, FACES[1])
            gated.gate.set()
            assert first.result().status_code == 200
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "3"
        assert "serve.max_concurrent 1" in busy.json()["error"]
        assert post_image(server.url, FACES[1]).status_code == 200  # free again
    finally:
        gated.gate.set()
        server.shutdown()


def test_uploads_past_the_byte_budget_are_503(model_root, onnx_model):
    _, server = start(model_root, onnx_model, "serve.max_buffered_bytes=200000")
    try:
        big = post_image(server.url, FACES[2])  # 790 kB > 200 kB held at once
        assert big.status_code == 503 and big.headers["Retry-After"] == "1"
        assert "serve.max_buffered_bytes 200000" in big.json()["error"]
        assert post_image(server.url, FACES[0]).status_code == 200  # 129 kB fits
    finally:
        server.shutdown()


@pytest.mark.parametrize("batching", [True, False])
def test_requests_arriving_together_share_a_model_call(model_root, onnx_model, batching):
    gated = GatedModel(onnx_model)
    service, server = start(model_root, gated, batching=batching)
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(post_image, server.url, FACES[i % 3], params={"best_crop": "0"}) for i in range(4)]
            assert gated.entered.wait(120), "no request reached the model"
            # one crop per request: those not in the held call are waiting for the next one
            wait_until(lambda: gated.first_rows + service.batcher.waiting() == 4, "all four requests at the model")
            gated.gate.set()
            rows = [a.result().json() for a in answers]
    finally:
        gated.gate.set()
        server.shutdown()
    assert [r["status"] for r in rows] == ["ok"] * 4
    stats = service.batcher.stats
    assert stats.calls_served == 4
    if batching:
        assert stats.largest_join > 1 and stats.model_calls < 4
    else:
        assert stats.largest_join == 1 and stats.model_calls == 4


def test_batched_and_unbatched_scores_agree(service_url):
    """A crop scored in a shared batch gets the score it gets alone."""
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: post_image(service_url, p).json(), FACES * 2))
    alone = [post_image(service_url, p).json() for p in FACES]
    for a, b in zip(together, alone * 2, strict=True):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-5)
        assert a["best_crop"]["best"]["box"] == b["best_crop"]["best"]["box"]


def test_a_token_is_required_when_set_and_never_logged(model_root, onnx_model, caplog):
    caplog.set_level(logging.DEBUG)
    _, server = start(model_root, onnx_model, token=TOKEN)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = post_image(server.url, FACES[0], headers=headers)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in r.json()["error"]
            assert requests.get(f"{server.url}/healthz", headers=headers, timeout=10).status_code == 401
        ok = post_image(server.url, FACES[0], headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        assert requests.get(f"{server.url}/healthz", headers={"Authorization": f"bearer {TOKEN}"},
                            timeout=10).json()["model_run_id"] == RUN
        assert requests.get(f"{server.url}/", timeout=10).status_code == 200  # the page holds no secret
    finally:
        server.shutdown()
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("192.168.1.20", False), ("example.org", False),
])
def test_what_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_refuses_to_listen_beyond_loopback_without_a_token(model_root, onnx_model, monkeypatch, capsys):
    cfg = load_config(env={}, overrides=[f"storage.root={model_root}"])
    with pytest.raises(ServeRefused, match=r"LIKERANK_SERVE_TOKEN=\$\(openssl rand -hex 32\)"):
        serve(ScoringService(cfg, onnx_model), host="0.0.0.0", port=0)

    from likerank.cli.main import main

    monkeypatch.delenv("LIKERANK_SERVE_TOKEN", raising=False)
    assert main(["--set", f"storage.root={model_root}", "serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 is reachable from other machines" in err and "export LIKERANK_SERVE_TOKEN=" in err
