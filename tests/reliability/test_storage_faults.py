"""Storage faults: S3 through a proxy on loopback that drops connections, answers 500 and 503,
stalls, and cuts bodies short, in front of a real SeaweedFS. The effect must be retries: no
partial Parquet is ever visible, and nothing written is lost."""

from __future__ import annotations

import http.client
import itertools
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pyarrow as pa
import pytest

from pipeline.core.schemas import ENGAGEMENT
from pipeline.core.storage import ImageStore, S3Storage
from pipeline.core.tables import read_table, write_partition

pytestmark = pytest.mark.s3

FAULTS = ("drop", "500", "503", "stall", "cut")


class FaultProxy:
    """Forwards every request to ``upstream`` unchanged (Host included, so signatures hold);
    ``plan(n)`` says which fault, if any, request ``n`` gets instead."""

    def __init__(self, upstream: str, plan):
        self.upstream = urlsplit(upstream)
        self.plan = plan
        self.counter = itertools.count()
        self.hits: dict[str, int] = dict.fromkeys(FAULTS, 0)
        proxy = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_one(self):
                body = self._body()
                fault = proxy.plan(next(proxy.counter), self.command)
                if fault:
                    proxy.hits[fault] += 1
                if fault == "drop":  # the request was sent; no answer ever comes
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault in ("500", "503"):
                    code, name = (500, "InternalError") if fault == "500" else (503, "SlowDown")
                    xml = f"<Error><Code>{name}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                if fault == "stall":
                    time.sleep(1.0)
                status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # A HEAD's length is the object's, not its (empty) body's.
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if fault == "cut" and len(data) > 16:  # headers promise it all; half arrives
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                if k.lower() in ("transfer-encoding", "content-length"):
                    continue
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def every_few(seed: int, rate: float):
    """A fault on about ``rate`` of the requests, never two in a row (so retries get through)."""
    rng, last = random.Random(seed), [-2]

    def plan(n: int, method: str) -> str | None:
        if n - last[0] < 2 or rng.random() >= rate:
            return None
        last[0] = n
        choices = FAULTS if method == "GET" else FAULTS[:4]  # a PUT cut short is a dropped PUT
        return rng.choice(choices)

    return plan


@pytest.fixture
def faulty_s3(seaweed):
    proxy = FaultProxy(seaweed["endpoint"], every_few(7, 0.3))
    storage = S3Storage(f"s3://{seaweed['bucket']}/faults-{time.time_ns()}", endpoint_url=proxy.url,
                        region="us-east-1", access_key_id=seaweed["key"], secret_access_key=seaweed["secret"])
    yield storage, proxy
    proxy.close()


def engagement_rows(n: int, version: int) -> pa.Table:
    from datetime import UTC, datetime

    at = datetime(2026, 11, 1, tzinfo=UTC)
    return pa.Table.from_pylist([{
        "source": "mastodon", "instance": "https://x", "post_id": str(i), "observed_at": at, "likes": i * version,
        "reposts": 0, "replies": 0, "views": None, "author_followers": 10, "age_days": 40.0} for i in range(n)],
        schema=ENGAGEMENT)


def test_writes_and_reads_ride_out_faults_and_lose_nothing(faulty_s3):
    storage, proxy = faulty_s3
    images = ImageStore(storage)
    stored = {}
    for i in range(30):
        data = bytes([i]) * (1000 + 97 * i)
        sha, _ = images.put(data)
        stored[sha] = data
    for day in range(6):
        write_partition(storage, "engagement", f"2026-11-0{day + 1}", engagement_rows(50, day + 1))
    for sha, data in stored.items():
        assert images.get(sha) == data
    table = read_table(storage, "engagement")
    assert table.num_rows == 300
    assert sorted(table["likes"].to_pylist()) == sorted(i * (d + 1) for d in range(6) for i in range(50))
    assert all(proxy.hits[f] for f in FAULTS), proxy.hits  # every kind of fault was met, and survived


def test_a_reader_sees_the_old_partition_or_the_new_one_never_a_torn_one(faulty_s3):
    storage, proxy = faulty_s3
    write_partition(storage, "engagement", "2026-11-01", engagement_rows(200, 1))
    stop, seen, errors = threading.Event(), set(), []

    def likes_now() -> list[int]:
        return read_table(storage, "engagement", ["2026-11-01"]).sort_by("post_id")["likes"].to_pylist()

    def read_forever():
        while not stop.is_set():
            try:
                likes = likes_now()
                assert len(likes) == 200, len(likes)  # one version whole: never a mix, never a part
                seen.add(likes[1])  # 1 * version
            except Exception as exc:  # noqa: BLE001 - collected: the assertion below names it
                errors.append(repr(exc))

    reader = threading.Thread(target=read_forever)
    reader.start()
    for version in range(2, 8):
        write_partition(storage, "engagement", "2026-11-01", engagement_rows(200, version))
    stop.set()
    reader.join()
    assert not errors, errors[:3]
    assert seen <= set(range(1, 8)) and 7 in (seen | {likes_now()[1]})
