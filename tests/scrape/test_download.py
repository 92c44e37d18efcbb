"""The downloader against scripted faults on loopback: every failure is a row with a status."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.core.storage import ImageStore, LocalStorage
from pipeline.scrape.download import Downloader, ImageCheck, check_image
from pipeline.scrape.http import HttpClient, retry_after_s
from pipeline.scrape.ssrf import BlockedURL, SSRFGuard
from tests.fixtures.scrape import FakeMastodon, jpeg_bytes, png_header_bomb

JPEG = jpeg_bytes(seed=1)
#: Its header whole, its pixel data cut a few bytes after the start of scan.
TRUNCATED_JPEG = JPEG[: JPEG.index(b"\xff\xda") + 40]


def raw(code, body=b"", ctype="image/jpeg", headers=None):
    return lambda h: FakeMastodon.send(h, code, body, ctype, headers)


def redirect(location):
    return raw(302, b"", "text/plain", {"Location": location})


def slow(h):
    time.sleep(1.5)
    FakeMastodon.send(h, 200, JPEG)


def drip(h):
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Content-Length", str(len(JPEG)))
    h.end_headers()
    for i in range(0, len(JPEG), 16):  # 16 bytes every 0.2 s: each read is quick, the whole is not
        h.wfile.write(JPEG[i:i + 16])
        h.wfile.flush()
        time.sleep(0.2)


def chunked_big(h):
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    block = b"\xff\xd8\xff" + b"\0" * 8189
    for _ in range(40):
        h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
    h.wfile.write(b"0\r\n\r\n")


def cut_off(h):
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Content-Length", str(len(JPEG)))
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(JPEG[: len(JPEG) // 2])
    h.wfile.flush()
    h.close_connection = True
    h.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def faults(fake_mastodon):
    calls = {"flaky": 0, "limited": 0}

    def flaky(h):
        calls["flaky"] += 1
        FakeMastodon.send(h, 503 if calls["flaky"] < 3 else 200, JPEG)

    def limited(h):
        calls["limited"] += 1
        if calls["limited"] == 1:
            return FakeMastodon.send(h, 429, b"{}", "application/json", {"Retry-After": "1"})
        FakeMastodon.send(h, 200, JPEG)

    u = fake_mastodon.url
    fake_mastodon.faults.update({
        "ok": raw(200, JPEG), "ok-again": raw(200, JPEG), "missing": raw(404, b"gone", "text/plain"),
        "error": raw(500, b"oops", "text/plain"), "flaky": flaky, "limited": limited, "slow": slow, "drip": drip,
        "big": raw(200, b"\xff\xd8\xff" + b"\0" * 300_000), "chunked-big": chunked_big,
        "html": raw(200, b"<!doctype html><html>login</html>", "text/html"),
        "truncated": raw(200, TRUNCATED_JPEG), "headless": raw(200, JPEG[:40]), "bad-crc": raw(200, bad_crc_png(), "image/png"),
        "bomb": raw(200, png_header_bomb(), "image/png"),
        "metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "private": redirect("http://10.0.0.1/x.jpg"), "loop-a": redirect(f"{u}/fault/loop-b"),
        "loop-b": redirect(f"{u}/fault/loop-a"), "hop": redirect(f"{u}/fault/ok"), "cut": cut_off,
    })
    return calls


@pytest.fixture
def downloader(scrape_cfg, tmp_path):
    scrape_cfg.scrape.max_bytes = 200_000
    d = Downloader(scrape_cfg.scrape, LocalStorage(tmp_path / "store"))
    yield d
    d.close()


@pytest.mark.parametrize("name, status, http", [
    ("ok", "ok", 200), ("hop", "ok", 200), ("missing", "http_error", 404), ("error", "http_error", 500),
    ("flaky", "ok", 200), ("slow", "timeout", None), ("drip", "timeout", 200), ("big", "too_large", 200),
    ("chunked-big", "too_large", 200), ("html", "not_image", 200), ("bad-crc", "decode_error", 200),
    ("headless", "decode_error", 200),
    ("truncated", "ok", 200),  # its pixels are checked where they are decoded: the face stage
    ("bomb", "bomb", 200), ("metadata", "blocked", 302), ("private", "blocked", 302),
    ("loop-a", "redirect_loop", 302), ("cut", "connection_error", 200),
])
def test_fault_becomes_a_row(fake_mastodon, faults, downloader, name, status, http):
    t0 = time.monotonic()
    r = downloader.fetch("p1", f"{fake_mastodon.url}/fault/{name}")
    row = r.download
    assert (row["status"], row["http_status"]) == (status, http), row["error"]
    assert (row["error"] is None) == (status == "ok")
    assert time.monotonic() - t0 < downloader.cfg.total_timeout_s + downloader.cfg.read_timeout_s + 1
    if status == "ok":
        assert r.image["sha256"] == row["sha256"] and r.image["format"] == "JPEG" and r.image["width"] > 0
    else:
        assert r.image is None and row["sha256"] is None and f"/fault/{name}" in row["error"] or status == "blocked"


def test_retries_count_attempts(fake_mastodon, faults, downloader):
    assert downloader.fetch("p", f"{fake_mastodon.url}/fault/flaky").download["attempts"] == 3
    assert downloader.fetch("p", f"{fake_mastodon.url}/fault/error").download["attempts"] == 3  # 1 + 2 retries


def test_retry_after_is_honoured(fake_mastodon, faults, downloader):
    row = downloader.fetch("p", f"{fake_mastodon.url}/fault/limited").download
    assert row["status"] == "ok" and row["attempts"] == 2
    first, second = fake_mastodon.requests_to("/fault/limited")
    assert second - first >= 0.99


def test_blocked_redirect_never_contacts_the_target(fake_mastodon, faults, downloader, monkeypatch):
    contacted = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda addr, *a, **k: contacted.append(addr) or real(addr, *a, **k))
    row = downloader.fetch("p", f"{fake_mastodon.url}/fault/metadata").download
    assert row["status"] == "blocked" and "169.254.169.254" in row["error"]
    assert all(a[0] != "169.254.169.254" for a in contacted)


def test_connection_refused(downloader):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    row = downloader.fetch("p", f"http://127.0.0.1:{port}/x.jpg").download
    # Its robots.txt cannot be read either: RFC 9309 disallows everything there for now, so the
    # image is not requested and a later run tries again.
    assert row["status"] == "deferred" and row["attempts"] == 0 and row["next_attempt_at"] is not None
    assert "robots.txt of http://127.0.0.1:" in row["error"] and "unreachable" in row["error"]


def test_same_image_twice_is_stored_once(fake_mastodon, faults, downloader, tmp_path):
    out = list(downloader.run([("a", f"{fake_mastodon.url}/fault/ok"), ("b", f"{fake_mastodon.url}/fault/ok-again")]))
    shas = {r.download["post_id"]: r.download["sha256"] for r in out}
    assert shas["a"] == shas["b"]
    assert len(LocalStorage(tmp_path / "store").list("images/")) == 1
    assert ImageStore(LocalStorage(tmp_path / "store")).get(shas["a"]) == JPEG


def test_run_bounds_in_flight(fake_mastodon, faults, downloader):
    items = [(f"p{i}", f"{fake_mastodon.url}/fault/ok") for i in range(30)]
    assert sum(r.status == "ok" for r in downloader.run(items)) == 30


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/", "http://127.0.0.2/",
    "http://localhost/", "http://[::1]/", "http://[::ffff:10.0.0.1]/", "http://100.100.100.200/", "http://224.0.0.1/",
    "http://0.0.0.0/", "file:///etc/passwd", "http://metadata.google.internal/",
])
def test_guard_blocks(url):
    with pytest.raises(BlockedURL):
        SSRFGuard(["127.0.0.1"]).check_url(url)


def test_guard_allows_listed_and_public_ips():
    SSRFGuard(["127.0.0.1"]).check_url("http://127.0.0.1:8080/x")
    SSRFGuard().check_url("http://93.184.215.14/")  # a literal public address: no DNS needed


def test_peer_address_is_checked_after_connect(fake_mastodon, faults, scrape_cfg):
    # A name that passes the URL check but connects to loopback (as DNS rebinding would) is refused.
    client = HttpClient(scrape_cfg.scrape)
    client.guard.check_url = lambda url: None
    client.guard.allow = frozenset()
    res = client.fetch(f"{fake_mastodon.url}/fault/ok")
    assert res.status == "blocked" and "loopback" in res.error


def test_check_image_bomb_before_decode():
    assert check_image(png_header_bomb(8000, 8000), max_pixels=1_000_000).status == "bomb"
    assert check_image(JPEG, max_pixels=10).status == "bomb"
    assert check_image(JPEG, max_pixels=10**7).status == "ok"


def test_retry_after_parsing():
    assert retry_after_s({"Retry-After": "7"}) == 7
    assert 0 < retry_after_s({"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    assert retry_after_s({"X-RateLimit-Reset": "2000-01-01T00:00:00.000Z"}) == 0
    assert retry_after_s({}) is None


def png_bytes(size=(40, 30), seed=3) -> bytes:
    import io

    from PIL import Image

    im = Image.frombytes("RGB", size, bytes((i * seed) % 256 for i in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def bad_crc_png() -> bytes:
    png = bytearray(png_bytes())
    png[-20] ^= 0xFF  # inside the last IDAT chunk's data: its CRC no longer matches
    return bytes(png)


@pytest.mark.parametrize("data", [JPEG, jpeg_bytes(size=(900, 700), seed=5), png_bytes(), TRUNCATED_JPEG])
def test_check_image_reads_the_header_only(data):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height, fmt = im.width, im.height, im.format
    # A truncated JPEG passes too: no pixel is decoded here (the face stage does, once).
    assert check_image(data, max_pixels=10**8) == ImageCheck("ok", None, width, height, fmt)


def test_check_image_bad_png_checksum_and_lying_magic():
    assert check_image(bad_crc_png(), max_pixels=10**8).status == "decode_error"
    # PNG magic bytes in front of a JPEG: only the announced format's parser is tried.
    assert check_image(png_bytes()[:8] + JPEG, max_pixels=10**8).status == "decode_error"


def test_run_returns_every_item_once_with_few_threads(fake_mastodon, faults, scrape_cfg, tmp_path):
    scrape_cfg.scrape.threads = 2  # at most 4 in flight: submit() has to wait for results many times
    names = ["ok", "missing", "html", "bad-crc", "ok-again"] * 6
    with Downloader(scrape_cfg.scrape, LocalStorage(tmp_path / "store")) as d:
        out = list(d.run((f"p{i}", f"{fake_mastodon.url}/fault/{n}") for i, n in enumerate(names)))
        assert d.finished() == [] and d.drain() == []
    assert sorted(r.download["post_id"] for r in out) == sorted(f"p{i}" for i in range(len(names)))
    want = {"ok": "ok", "ok-again": "ok", "missing": "http_error", "html": "not_image", "bad-crc": "decode_error"}
    assert all(r.status == want[names[int(r.download["post_id"][1:])]] for r in out)
