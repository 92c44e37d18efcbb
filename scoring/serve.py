"""``likerank serve``: the model over HTTP (Starlette on uvicorn), on 127.0.0.1 by default.

Routes:

* ``POST /score`` — the body is the image's bytes (JPEG, PNG or WebP, sent as any content type
  but ``application/json``), or JSON ``{"url": "https://..."}`` fetched through the scraper's
  SSRF-guarded client. Answers the ``likerank score`` row as JSON, with the best crop
  (``?best_crop=0`` skips the search): 200 when scored; 422 for an undecodable image or one
  without a face; 415 for another format; 413 past ``scrape.max_bytes``; 411 without
  ``Content-Length``; 408 when the body does not arrive within ``serve.body_timeout_s``; 400 for
  bad JSON; 502 when the URL cannot be fetched; 503 with ``Retry-After`` when busy; 401 without
  the token when one is set.
* ``GET /healthz`` — ``{"status": "ok", "model_run_id", "detector_id"}``.
* ``GET /`` — a page where a person drops a photo (or gives ``?url=``) and sees its score, its
  face and its best crop. The page itself needs no token (it holds none); it asks for one.

Built for an open network, every resource a client can hold is bounded (``[serve]`` settings):

* connections: ``max_connections`` (past it uvicorn answers 503); a request's head must arrive
  within ``head_timeout_s`` of the connection opening or of the previous response, an idle
  kept-alive connection closes after ``keep_alive_s``, and a body must arrive whole within
  ``body_timeout_s`` (uvicorn has no body timeout: :meth:`ScoringService.read_body` keeps it);
* memory: each upload is capped by ``scrape.max_bytes`` and all uploads held at once by
  ``max_buffered_bytes``;
* work: ``max_concurrent`` requests decode, detect and score at once, in a thread pool of that
  size; one more is answered 503 with ``Retry-After`` instead of waiting in an unbounded queue.
  Detection runs in as many calls at once as the detector has inference workers (a semaphore).

Requests arriving together share model calls: every model call of a request (its face crop;
its best-crop grid) goes to a :class:`Batcher`, which joins the calls waiting at that moment
(up to ``batch_max`` crops, waiting at most ``batch_wait_ms`` for company) into one batch on
one model thread and hands each request its rows back.

Uploads and fetched photos are accepted in :data:`UPLOAD_FORMATS` only, told by their magic
bytes and header (the scraper's :func:`~pipeline.scrape.download.check_image`), then decoded
under the face stage's guards (truncation, pixel count).

Beyond loopback a bearer token is required (``serve.token_env``, ``$LIKERANK_SERVE_TOKEN``):
:func:`serve` refuses to listen on another address without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.core.config import Config
from scoring.model import Model, ModelSpec
from scoring.score import ScoreRow, find_face, read_input, score_rows

log = logging.getLogger(__name__)

STATUS_CODES = {"ok": 200, "decode_error": 422, "no_face": 422, "download_error": 502, "unreadable": 400}

#: Formats served: the web's photo formats. GIF, BMP, TIFF and AVIF, which the scraper also
#: stores, are refused (415): animation frames, multi-page and uncompressed files multiply the
#: decoding work a single upload can ask for, and a person scoring a photo does not need them.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class ServeRefused(ValueError):
    """``serve`` would listen beyond loopback without a token. The message says how to set one."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine only: 127.0.0.0/8, ::1, localhost."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name, or "" (every interface)


# --------------------------------------------------------------------------- batching


@dataclass
class _Call:
    batch: np.ndarray  # NCHW float32, one request's crops
    done: asyncio.Future[tuple[np.ndarray, np.ndarray]]


@dataclass
class BatchStats:
    """What the batcher did: model calls, requests' calls served, the most joined in one."""

    model_calls: int = 0
    calls_served: int = 0
    largest_join: int = 0  # requests' calls answered by one model call
    largest_rows: int = 0  # crops in one model call

    def record(self, joined: int, rows: int) -> None:
        self.model_calls += 1
        self.calls_served += joined
        self.largest_join = max(self.largest_join, joined)
        self.largest_rows = max(self.largest_rows, rows)


class Batcher:
    """One model, called by one worker with the calls of every request waiting at that moment.

    ``batching=False`` makes every request's call a model call of its own (the baseline of
    ``bench/serve.py``); either way one model call runs at a time, on its own thread.
    """

    def __init__(self, model: Model, *, max_rows: int, wait_s: float, batching: bool = True,
                 at_work: Callable[[], int] = lambda: 1 << 30):
        self.model, self.max_rows, self.wait_s, self.batching = model, max_rows, wait_s, batching
        self.at_work = at_work  # requests that may still call: no waiting for company that cannot come
        self.stats = BatchStats()
        self.queue: asyncio.Queue[_Call] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="likerank-model")
        self.queue = asyncio.Queue()  # bounded by serve.max_concurrent: one call per request at a time
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="likerank-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    def waiting(self) -> int:
        """Requests' calls queued for the next model call."""
        return self.queue.qsize() if self.queue is not None else 0

    async def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label logits, features) of ``batch``, computed in a model call shared with others."""
        assert self.queue is not None, "Batcher.start() was not called"
        call = _Call(batch, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(call)
        return await call.done

    async def _work(self) -> None:
        assert self.queue is not None
        carried: _Call | None = None  # taken from the queue but too big for the last batch
        while True:
            calls = [carried or await self.queue.get()]
            carried = None
            if self.batching:
                carried = await self._gather(calls)
            await self._run(calls)

    async def _gather(self, calls: list[_Call]) -> _Call | None:
        """Add the calls waiting (or arriving within ``wait_s``) to ``calls`` up to ``max_rows``
        crops; the first one that does not fit is returned to lead the next batch."""
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        rows = len(calls[0].batch)
        while rows < self.max_rows:
            try:
                call = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0 or self.at_work() <= len(calls):
                    return None
                try:
                    call = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    return None
            if rows + len(call.batch) > self.max_rows:
                return call
            calls.append(call)
            rows += len(call.batch)
        return None

    async def _run(self, calls: list[_Call]) -> None:
        batch = calls[0].batch if len(calls) == 1 else np.concatenate([c.batch for c in calls])
        try:
            logits, features = await asyncio.get_running_loop().run_in_executor(self._thread, self.model.run, batch)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the model's error
            for c in calls:
                if not c.done.done():
                    c.done.set_exception(exc)
            return
        self.stats.record(len(calls), len(batch))
        start = 0
        for c in calls:
            end = start + len(c.batch)
            if not c.done.done():
                c.done.set_result((logits[start:end], features[start:end]))
            start = end


@dataclass
class BatchedModel:
    """The :class:`~scoring.model.Model` a request thread scores with: each ``run`` waits for
    its rows of a :class:`Batcher`'s shared model call on the server's event loop."""

    batcher: Batcher
    loop: asyncio.AbstractEventLoop
    spec: ModelSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = self.batcher.model.spec

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return asyncio.run_coroutine_threadsafe(self.batcher.run(batch), self.loop).result()


# --------------------------------------------------------------------------- the service


class ByteBudget:
    """Upload bytes held at once, across requests (touched only on the event loop's thread)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


def _refuse(code: int, message: str, *, close: bool = False, retry_after: int | None = None) -> HTTPException:
    headers = {}
    if close:  # the body was not read: the connection cannot carry another request
        headers["Connection"] = "close"
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return HTTPException(code, message, headers=headers or None)


class ScoringService:
    """The model, the face detector and an HTTP client, shared by the requests.

    ``token``: the bearer token every request but the page's must carry (None: none needed,
    allowed on loopback only). ``batching=False`` scores each request in a model call of its own.
    """

    def __init__(self, cfg: Config, model: Model, detector: Any = None, *, token: str | None = None,
                 batching: bool = True):
        from pipeline.faces.detector import FaceDetector
        from pipeline.scrape.http import HttpClient

        self.cfg, self.model = cfg, model
        self.detector = detector or FaceDetector(cfg.faces)
        self.client = HttpClient(cfg.scrape)
        self._token = token or None  # never logged: kept out of repr and messages
        limits = cfg.serve
        self.batcher = Batcher(model, max_rows=limits.batch_max, wait_s=limits.batch_wait_ms / 1000,
                               batching=batching, at_work=lambda: self.in_flight)
        # Decoding and detection: as many at once as the detector has inference workers.
        self.detect_slots = threading.BoundedSemaphore(getattr(self.detector, "infer_workers", 1))
        self.budget = ByteBudget(limits.max_buffered_bytes)
        self.in_flight = 0  # requests holding a work slot (touched on the event loop's thread only)
        self._work: ThreadPoolExecutor | None = None
        self._scoring_model: Model = model

    # ----------------------------------------------------------------- scoring (request threads)

    def score(self, name: str, data: bytes | None, *, best_crop: bool, status: str = "ok",
              error: str | None = None) -> ScoreRow:
        row = ScoreRow(input=name, status=status, error=error, model_run_id=self.model.spec.run_id,
                       detector_id=self.detector.detector_id)
        if data is None:
            return row
        from pipeline.scrape.download import check_image

        check = check_image(data, self.cfg.scrape.max_pixels)  # the scraper's gate: header, size, PNG checksums
        if check.status != "ok":
            row.status, row.error = "decode_error", f"{name}: {check.status}: {check.error}"
            return row
        with self.detect_slots:
            find_face(name, data, self.detector, self.cfg, row)
        score_rows([row], self._scoring_model, best_crop=best_crop)
        return row

    def score_url(self, url: str, *, best_crop: bool) -> ScoreRow | HTTPException:
        data, status, error = read_input(url, self.client, self.cfg)
        if data is not None:
            refusal = self.check_format(url, data)
            if refusal is not None:
                return refusal
        return self.score(url, data, best_crop=best_crop, status=status, error=error or None)

    def check_format(self, name: str, data: bytes) -> HTTPException | None:
        """A 415 unless ``data`` announces one of :data:`UPLOAD_FORMATS` (magic bytes); whether
        the rest holds up is :meth:`score`'s question (a ``decode_error`` row)."""
        from pipeline.scrape.download import sniff_format

        announced = sniff_format(data[:16])
        if announced in UPLOAD_FORMATS:
            return None
        what = f"a {announced} image" if announced else f"not an image (it starts with {data[:16]!r})"
        return _refuse(415, f"{name} is {what}; likerank serve accepts {', '.join(UPLOAD_FORMATS)}")

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_run_id": self.model.spec.run_id, "detector_id": self.detector.detector_id}

    # ----------------------------------------------------------------- HTTP (the event loop)

    def authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise HTTPException(401, "this server needs its token: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": 'Bearer realm="likerank"', "Connection": "close"})

    def busy(self) -> HTTPException:
        limits = self.cfg.serve
        return _refuse(503, f"busy: {self.in_flight} requests being scored (serve.max_concurrent "
                            f"{limits.max_concurrent}); retry in {limits.retry_after_s} s",
                       close=True, retry_after=limits.retry_after_s)

    async def read_body(self, request: Request, length: int) -> bytearray:
        """The body, whole within ``serve.body_timeout_s``, charged to the byte budget as it
        arrives (the caller gives back ``len(result)``; on failure nothing stays charged)."""
        limits = self.cfg.serve
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                if len(body) + len(chunk) > length:  # uvicorn stops at Content-Length; be sure
                    raise _refuse(413, f"body longer than its Content-Length {length}", close=True)
                if not self.budget.take(len(chunk)):
                    raise _refuse(503, f"busy: {self.budget.held} upload bytes held (serve.max_buffered_bytes "
                                       f"{limits.max_buffered_bytes}); retry in {limits.retry_after_s} s",
                                  close=True, retry_after=limits.retry_after_s)
                body.extend(chunk)

        try:
            await asyncio.wait_for(read(), limits.body_timeout_s)
        except TimeoutError:
            self.budget.give(len(body))
            raise _refuse(408, f"the body ({len(body)} of {length} bytes) did not arrive within "
                               f"serve.body_timeout_s {limits.body_timeout_s:g} s", close=True) from None
        except BaseException:
            self.budget.give(len(body))
            raise
        return body

    def content_length(self, request: Request) -> int:
        max_bytes = self.cfg.scrape.max_bytes
        length = request.headers.get("content-length")
        if length is None or not length.strip().isdigit():
            raise _refuse(411, "a Content-Length is required", close=True)
        n = int(length)
        if n > max_bytes:
            raise _refuse(413, f"upload of {n} bytes > scrape.max_bytes {max_bytes}", close=True)
        return n

    async def handle_score(self, request: Request) -> Response:
        self.authorize(request)
        if self.in_flight >= self.cfg.serve.max_concurrent:
            raise self.busy()  # before reading: a busy server reads no more uploads
        best_crop = request.query_params.get("best_crop", "1").lower() not in ("0", "false", "no")
        length = self.content_length(request)
        try:
            body = await self.read_body(request, length)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        try:
            if self.in_flight >= self.cfg.serve.max_concurrent:
                raise self.busy()
            self.in_flight += 1
            try:
                return await self._score_body(request, bytes(body), best_crop)
            finally:
                self.in_flight -= 1
        finally:
            self.budget.give(len(body))

    async def _score_body(self, request: Request, body: bytes, best_crop: bool) -> Response:
        loop = asyncio.get_running_loop()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                url = json.loads(body)["url"]
                if not isinstance(url, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise _refuse(400, 'expected JSON {"url": "https://..."}') from None
            row = await loop.run_in_executor(self._work, lambda: self.score_url(url, best_crop=best_crop))
            if isinstance(row, HTTPException):
                raise row
        else:
            refusal = self.check_format("the upload", body)
            if refusal is not None:
                raise refusal
            row = await loop.run_in_executor(self._work, lambda: self.score("upload", body, best_crop=best_crop))
        return JSONResponse(row.record(), status_code=STATUS_CODES.get(row.status, 400))

    async def handle_health(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse(self.health())

    async def handle_page(self, request: Request) -> Response:
        return Response(page(), media_type="text/html; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._work = ThreadPoolExecutor(self.cfg.serve.max_concurrent, thread_name_prefix="likerank-request")
        self.batcher.start()
        self._scoring_model = BatchedModel(self.batcher, asyncio.get_running_loop())
        try:
            yield
        finally:
            await self.batcher.stop()
            self._work.shutdown(wait=True)
            self._scoring_model = self.model

    def app(self) -> Starlette:
        async def error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            detail = exc.detail
            if exc.status_code == 404:
                detail = f"no route {request.url.path} (POST /score, GET /healthz, GET /)"
            elif exc.status_code == 405:
                detail = f"{request.method} {request.url.path} is not served (POST /score, GET /healthz, GET /)"
            return JSONResponse({"status": "error", "error": detail}, status_code=exc.status_code,
                                headers=exc.headers)

        routes = [Route("/score", self.handle_score, methods=["POST"]),
                  Route("/healthz", self.handle_health, methods=["GET"]),
                  Route("/", self.handle_page, methods=["GET"])]
        return Starlette(routes=routes, lifespan=self.lifespan, exception_handlers={HTTPException: error})


def page() -> bytes:
    return resources.files("scoring").joinpath("page.html").read_bytes()


# --------------------------------------------------------------------------- the server


def _protocol_with_head_deadline(head_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose next request head has not arrived
    ``head_timeout_s`` after it opened or after the previous response (uvicorn waits forever
    for a first request, and its keep-alive timer restarts on every byte)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_deadline, self.cycle)

        def _head_deadline(self, cycle_then: Any) -> None:
            no_new_request = self.cycle is cycle_then and (cycle_then is None or cycle_then.response_complete)
            if no_new_request and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol


class RunningServer:
    """A started server on its own thread; ``shutdown()`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread, address: tuple[str, int]):
        self._server, self._thread, self.server_address = server, thread, address

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def check_exposure(host: str, token: str | None, env: str = "LIKERANK_SERVE_TOKEN") -> None:
    """Refuse to listen beyond loopback without a token (``env``: where the token is read from)."""
    if not is_loopback(host) and not token:
        raise ServeRefused(f"--host {host or '(every interface)'} is reachable from other machines, and {env} is "
                           f"not set: set a bearer token first (export {env}=$(openssl rand -hex 32)) and "
                           f"send it as 'Authorization: Bearer <token>'")


def serve(service: ScoringService, host: str = "127.0.0.1", port: int = 8000) -> RunningServer:
    """Listen on ``host:port`` (0: a free port) and serve on a background thread; raises
    :class:`ServeRefused` beyond loopback without a token and ``OSError`` when it cannot bind."""
    import uvicorn

    check_exposure(host, service._token, service.cfg.serve.token_env)
    limits = service.cfg.serve
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=limits.max_connections)
    config = uvicorn.Config(service.app(), lifespan="on", log_config=None, access_log=False,
                            http=_protocol_with_head_deadline(limits.head_timeout_s),
                            timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
                            server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="likerank-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"likerank serve: the server on {host}:{port} stopped while starting (see the log)")
        thread.join(timeout=0.05)
    return RunningServer(server, thread, sock.getsockname()[:2])
