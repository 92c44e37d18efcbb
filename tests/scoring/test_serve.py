"""``likerank serve``: real HTTP requests against the service on loopback, and its page in
headless Chromium scoring a photo end to end."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from pipeline.core.config import load_config
from pipeline.core.storage import LocalStorage
from scoring.serve import ScoringService, serve
from scoring.torch_model import load_registry_model
from tests.fixtures.scoring import FACE_PHOTOS as FACES
from tests.fixtures.scoring import MODEL_RUN as RUN
from tests.fixtures.scoring import NO_FACE_PHOTO as NO_FACE

MAX_BYTES = 2_000_000


@pytest.fixture(scope="module")
def service_url(model_root):
    cfg = load_config(env={}, overrides=[f"storage.root={model_root}", "scrape.allow_hosts=127.0.0.1",
                                         f"scrape.max_bytes={MAX_BYTES}"])
    server = serve(ScoringService(cfg, load_registry_model(LocalStorage(model_root))), port=0)
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()


def post_image(url: str, path: str, **kw) -> requests.Response:
    return requests.post(f"{url}/score", data=Path(path).read_bytes(), headers={"Content-Type": "image/png"},
                         timeout=60, **kw)


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
