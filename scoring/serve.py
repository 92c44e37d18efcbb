"""``likerank serve``: the model over HTTP, on 127.0.0.1 by default.

Routes:

* ``POST /score`` — the body is the image's bytes (any ``image/*`` or
  ``application/octet-stream``), or JSON ``{"url": "https://..."}`` fetched through the
  scraper's SSRF-guarded client. Answers the ``likerank score`` row as JSON, with the best crop
  (``?best_crop=0`` skips the search): 200 when scored; 422 for an undecodable image or one
  without a face; 413 past ``scrape.max_bytes``; 411 without ``Content-Length``; 400 for bad
  JSON; 502 when the URL cannot be fetched.
* ``GET /healthz`` — ``{"status": "ok", "model_run_id", "detector_id"}``.
* ``GET /`` — a page where a person drops a photo (or gives ``?url=``) and sees its score, its
  face and its best crop.

Uploads go through the face stage's decode guards (format, truncation, pixel count). One
model call at a time (a lock): the service is for people and small tools, not a fleet.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.core.config import Config
from scoring.model import Model
from scoring.score import ScoreRow, find_face, read_input, score_rows

log = logging.getLogger(__name__)

STATUS_CODES = {"ok": 200, "decode_error": 422, "no_face": 422, "download_error": 502, "unreadable": 400}


class ScoringService:
    """The model, the face detector and an HTTP client, shared by the request threads."""

    def __init__(self, cfg: Config, model: Model, detector: Any = None):
        from pipeline.faces.detector import FaceDetector
        from pipeline.scrape.http import HttpClient

        self.cfg, self.model = cfg, model
        self.detector = detector or FaceDetector(cfg.faces)
        self.client = HttpClient(cfg.scrape)
        self.lock = threading.Lock()

    def score(self, name: str, data: bytes | None, *, best_crop: bool, status: str = "ok",
              error: str | None = None) -> ScoreRow:
        row = ScoreRow(input=name, status=status, error=error, model_run_id=self.model.spec.run_id,
                       detector_id=self.detector.detector_id)
        if data is not None:
            with self.lock:
                find_face(name, data, self.detector, self.cfg, row)
                score_rows([row], self.model, best_crop=best_crop)
        return row

    def score_url(self, url: str, *, best_crop: bool) -> ScoreRow:
        data, status, error = read_input(url, self.client, self.cfg)
        return self.score(url, data, best_crop=best_crop, status=status, error=error or None)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_run_id": self.model.spec.run_id, "detector_id": self.detector.detector_id}


def page() -> bytes:
    return resources.files("scoring").joinpath("page.html").read_bytes()


def make_handler(service: ScoringService) -> type[BaseHTTPRequestHandler]:
    max_bytes = service.cfg.scrape.max_bytes

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "likerank"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def _error(self, code: int, message: str) -> None:
            self._json(code, {"status": "error", "error": message})

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = urlsplit(self.path).path
            if path == "/healthz":
                self._json(200, service.health())
            elif path == "/":
                self._send(200, page(), "text/html; charset=utf-8")
            else:
                self._error(404, f"no route {path} (POST /score, GET /healthz, GET /)")

        def do_POST(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            if parts.path != "/score":
                self._error(404, f"no route {parts.path} (POST /score)")
                return
            best_crop = parse_qs(parts.query).get("best_crop", ["1"])[0] not in ("0", "false", "no")
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                self.close_connection = True  # the body's end is unknown: never read it
                self._error(411, "a Content-Length is required")
                return
            n = int(length)
            if n > max_bytes:
                self.close_connection = True
                self._error(413, f"upload of {n} bytes > scrape.max_bytes {max_bytes}")
                return
            body = self.rfile.read(n)
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype == "application/json":
                try:
                    url = json.loads(body)["url"]
                    if not isinstance(url, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    self._error(400, 'expected JSON {"url": "https://..."}')
                    return
                row = service.score_url(url, best_crop=best_crop)
            else:
                row = service.score("upload", body, best_crop=best_crop)
            self._json(STATUS_CODES.get(row.status, 400), row.record())

    return Handler


def serve(service: ScoringService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A started server (daemon threads); ``shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="likerank-serve", daemon=True).start()
    return server
