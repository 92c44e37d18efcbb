"""What a site says about being crawled and mined, and small hosts that count what they receive.

:class:`Politeness` is a simulator option (``start_server(politeness=...)``, ``likerank sim
serve --robots-share --tdm-header-share --tdm-file-share``): a share of the Mastodon media
files is disallowed by ``/robots.txt``, a share carries ``tdm-reservation: 1``, and a share is
reserved by a rule of ``/.well-known/tdmrep.json``. Files are picked by the last digit of
their media id, so each share is rounded to tenths and the three sets never overlap (at most
ten digits between them). Off by default: the world serves no robots.txt (404: allow all) and
no TDM signal.

:class:`CountingHost` is a tiny HTTP host that answers 200 to everything and records when each
request arrived, for tests and benchmarks of per-host politeness (:func:`busiest_window`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The order in which last digits of media ids are handed to the three signals.
_DIGITS = "7310952846"
MEDIA_FILES = "/system/media_attachments/files/"


@dataclass(frozen=True)
class Politeness:
    """Shares (0..1, rounded to tenths) of Mastodon media files under each signal."""

    robots_share: float = 0.0  # disallowed for every user agent by /robots.txt
    tdm_header_share: float = 0.0  # served with tdm-reservation: 1
    tdm_file_share: float = 0.0  # reserved by a /.well-known/tdmrep.json rule
    digits: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = {}
        for name in ("robots_share", "tdm_header_share", "tdm_file_share"):
            share = getattr(self, name)
            if not 0 <= share <= 1:
                raise ValueError(f"simulator politeness: {name} must be within 0..1, got {share}")
            counts[name] = round(share * 10)
        if sum(counts.values()) > 10:
            raise ValueError(f"simulator politeness: the shares add up to more than 1 ({counts})")
        digits, start = {}, 0
        for name, n in counts.items():
            digits[name] = _DIGITS[start:start + n]
            start += n
        object.__setattr__(self, "digits", digits)

    @property
    def active(self) -> bool:
        return any(self.digits.values())

    def robots_txt(self) -> str:
        """robots.txt disallowing every original and small file whose media id ends in a robots digit."""
        lines = ["User-agent: *"]
        lines += [f"Disallow: {MEDIA_FILES}*{d}.jpg$" for d in self.digits["robots_share"]]
        lines += [f"Disallow: {MEDIA_FILES}*{d}.png$" for d in self.digits["robots_share"]]
        lines.append("Allow: /")
        return "\n".join(lines) + "\n"

    def tdmrep_json(self) -> bytes:
        """Reserving rules for the tdm-file digits, then everything else not reserved."""
        rules = [{"location": f"{MEDIA_FILES}*{d}.{ext}$", "tdm-reservation": 1,
                  "tdm-policy": "https://rights.example/policies/photos"}
                 for d in self.digits["tdm_file_share"] for ext in ("jpg", "png")]
        rules.append({"location": "/", "tdm-reservation": 0})
        return json.dumps(rules).encode()

    def tdm_header(self, media_id: str) -> bool:
        return bool(self.digits["tdm_header_share"]) and media_id[-1:] in self.digits["tdm_header_share"]


class CountingHost:
    """An HTTP host on ``host`` (any loopback address) that answers ``200 ok`` and records the
    monotonic time each request arrived (``times``); ``/robots.txt`` answers ``robots`` (404
    when empty). Stop with :meth:`close`."""

    def __init__(self, host: str = "127.0.0.1", robots: str = ""):
        self.times: list[float] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                if self.path == "/robots.txt":
                    body = owner.robots.encode()
                    self.send_response(200 if body else 404)
                else:
                    with owner._lock:
                        owner.times.append(time.monotonic())
                    body = b"ok"
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.robots = robots
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"counting-host:{self.url}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def busiest_window(times: list[float], window_s: float = 1.0) -> int:
    """The most requests among ``times`` (seconds) that fall in any window of ``window_s``."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best
