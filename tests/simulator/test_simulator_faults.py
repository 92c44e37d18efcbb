"""Every fault mode of the simulator triggers, targets what it is told to, and can be switched off."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import warnings
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from simulator.faults import FaultError, bomb_png, make_rule


def first_page(sim, limit: int = 40) -> list[dict]:
    return requests.get(f"{sim.url}/api/v1/timelines/tag/selfie", params={"limit": limit}, timeout=10).json()


def image_media(sim, n: int = 1) -> list[tuple[str, dict]]:
    """(status id, attachment) of the first n image attachments on the first page."""
    out = [(s["id"], m) for s in first_page(sim) for m in s["media_attachments"] if m["type"] == "image"]
    assert len(out) >= n
    return out[:n]


def test_error_5xx_burst_then_recovers(sim_server):
    sim_server.set_fault("error_5xx", count=2)
    url = f"{sim_server.url}/api/v1/timelines/tag/selfie"
    codes = [requests.get(url, timeout=10).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert sim_server.fault_hits("error_5xx") == 2


def test_error_5xx_on_media_only(sim_server):
    (_, m), = image_media(sim_server)
    sim_server.set_fault("error_5xx", scope="media", status=502)
    assert requests.get(m["url"], timeout=10).status_code == 502
    assert requests.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", timeout=10).status_code == 200


def test_slow(sim_server):
    sim_server.set_fault("slow", delay_s=0.4, scope="api")
    t = time.monotonic()
    assert requests.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", timeout=10).status_code == 200
    assert time.monotonic() - t >= 0.4
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", timeout=(2, 0.1))


def test_truncated_body(sim_server):
    (_, m), = image_media(sim_server)
    full = requests.get(m["url"], timeout=10).content
    sim_server.set_fault("truncated", keep_fraction=0.3)
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        requests.get(m["url"], timeout=10)
    # On the wire: the full Content-Length is promised, 30% of the body comes, then the close.
    parts = urlsplit(m["url"])
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(full)}".encode() in head
    assert len(body) == int(len(full) * 0.3) and full.startswith(body)


def test_wrong_content_type(sim_server):
    (_, m), = image_media(sim_server)
    sim_server.set_fault("wrong_content_type")
    r = requests.get(m["url"], timeout=10)
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    Image.open(io.BytesIO(r.content)).verify()  # the body is still the image
    sim_server.set_fault("wrong_content_type", scope="api", content_type="text/plain")
    r = requests.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", timeout=10)
    assert r.headers["Content-Type"] == "text/plain" and isinstance(r.json(), list)


def test_html_instead_of_json(sim_server):
    sim_server.set_fault("html", status=502)
    r = requests.get(f"{sim_server.url}/api/v1/timelines/tag/selfie", timeout=10)
    assert r.status_code == 502 and r.headers["Content-Type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError):
        r.json()


def test_malformed_json(sim_server):
    sim_server.set_fault("malformed_json", count=1)
    url = f"{sim_server.url}/api/v1/timelines/tag/selfie"
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)
    assert isinstance(requests.get(url, timeout=10).json(), list)  # count=1: the next one is fine


def test_missing_fields_targets_posts(sim_server):
    page = first_page(sim_server, 10)
    target = page[3]["id"]
    sim_server.set_fault("missing_fields", post_ids=[target], fields=["account", "created_at"])
    page = first_page(sim_server, 10)
    broken = [s for s in page if "account" not in s]
    assert [s["id"] for s in broken] == [target] and "created_at" not in broken[0]
    one = requests.get(f"{sim_server.url}/api/v1/statuses/{target}", timeout=10).json()
    assert "account" not in one
    other = requests.get(f"{sim_server.url}/api/v1/statuses/{page[0]['id']}", timeout=10).json()
    assert "account" in other


def test_decompression_bomb(sim_server):
    (post_id, m), = image_media(sim_server)
    sim_server.set_fault("bomb", post_ids=[post_id])
    r = requests.get(m["url"], timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    assert len(r.content) < 200_000  # tiny file ...
    width, height = struct.unpack(">II", r.content[16:24])
    assert width * height >= 900_000_000  # ... enormous pixel count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(r.content))


def test_bomb_png_is_a_valid_png():
    data = bomb_png(2000, 1000)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (2000, 1000) and im.mode == "1"
        im.load()
        assert im.getextrema() == (0, 0)


def test_oversized_body(sim_server):
    (_, m), = image_media(sim_server)
    sim_server.set_fault("oversized", size_bytes=8 * 1024 * 1024)
    with requests.get(m["url"], stream=True, timeout=10) as r:
        assert int(r.headers["Content-Length"]) == 8 * 1024 * 1024
        got = 0
        for chunk in r.iter_content(256 * 1024):
            got += len(chunk)
            if got > 1024 * 1024:  # a client enforcing its limit stops here
                break
    sim_server.set_fault("oversized", size_bytes=3 * 1024 * 1024, declare_length=False)
    r = requests.get(m["url"], timeout=30)
    assert "Content-Length" not in r.headers and len(r.content) == 3 * 1024 * 1024


def test_redirect_loop(sim_server):
    (_, m), = image_media(sim_server)
    sim_server.set_fault("redirect_loop")
    with pytest.raises(requests.exceptions.TooManyRedirects):
        requests.get(m["url"], timeout=10)
    r = requests.get(m["url"], allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == m["url"] + "?loop=1"
    r2 = requests.get(r.headers["Location"], allow_redirects=False, timeout=10)
    assert r2.headers["Location"] == m["url"]


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.jpg"])
def test_redirect_to_private_address(sim_server, target):
    (_, m), = image_media(sim_server)
    sim_server.set_fault("redirect_private", target=target)
    r = requests.get(m["url"], allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == target


def test_fraction_is_stable_and_partial(sim_server):
    media = image_media(sim_server, 30)
    sim_server.set_fault("error_5xx", scope="media", fraction=0.5)
    picked = [sim_server.fault_selects("error_5xx", m["id"]) for _, m in media]
    assert 5 < sum(picked) < 25
    for _ in range(2):  # same answer every time: the same URLs fail
        codes = [requests.get(m["url"], timeout=10).status_code for _, m in media]
        assert [c == 503 for c in codes] == picked


def test_admin_endpoint_sets_lists_and_clears(sim_server):
    url = f"{sim_server.url}/_sim/faults"
    r = requests.post(url, json={"mode": "error_5xx", "count": 1, "status": 500}, timeout=10)
    assert r.status_code == 200 and r.json()["params"] == {"status": 500}
    assert requests.get(f"{sim_server.url}/api/v1/instance", timeout=10).status_code == 500
    listed = requests.get(url, timeout=10).json()
    assert listed["faults"][0]["fired"] == 1 and listed["hits"] == {"error_5xx": 1}
    requests.post(url, json={"mode": "html"}, timeout=10)
    assert requests.delete(url, timeout=10).json() == {"faults": []}
    assert requests.get(f"{sim_server.url}/api/v1/instance", timeout=10).status_code == 200
    bad = requests.post(url, json={"mode": "nope"}, timeout=10)
    assert bad.status_code == 400 and "unknown mode" in bad.json()["error"]


def test_rule_validation():
    with pytest.raises(FaultError):
        make_rule("slow", delay=3)
    with pytest.raises(FaultError):
        make_rule("bomb", fraction=2)
    with pytest.raises(FaultError):
        make_rule("html", scope="everywhere")
