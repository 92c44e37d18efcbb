"""The downloader: image URLs in, stored images and one ``downloads`` row per URL out.

Each URL goes through :class:`pipeline.scrape.http.HttpClient` (SSRF guard, per-host rate limit and
concurrency cap, retries, timeouts, streamed size cap), then these content checks, in order:

1. **magic bytes**: the body must start like JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF →
   else ``not_image`` (an HTML error page served with status 200 is the usual case);
2. **dimensions from the header** (``Image.open`` reads only the header, no ``load()``):
   more than ``scrape.max_pixels`` pixels → ``bomb``, refused before any decoding. Pillow's
   own guard (``Image.MAX_IMAGE_PIXELS``; it raises ``DecompressionBombError`` above twice
   that) also maps to ``bomb``; its warning between 1x and 2x is silenced here because our
   limit is the one that decides;
3. ``verify()`` for PNG (every chunk's CRC, without inflating the pixel data; Pillow's other
   formats verify nothing) → a bad checksum or chunk is ``decode_error``;
4. **metadata removed** (:mod:`pipeline.core.strip_metadata`): EXIF (GPS, camera), XMP, IPTC
   and comments are cut out segment by segment, pixels untouched; the EXIF orientation is kept
   as the ``images`` row's ``exif_orientation``. Broken segments → ``decode_error``; a TIFF or
   AVIF, whose metadata cannot be cut out, → ``not_strippable`` (not kept);
5. the stripped bytes are stored content-addressed (``ImageStore``: their sha256 is the key, so
   the same image posted twice is stored once; both posts' ``downloads`` rows carry it) with an
   ``images`` row (format, dimensions, size, what metadata was removed).

No pixel is decoded here. The face stage decodes every image anyway: an image whose pixel
data is truncated or corrupt becomes a ``faces`` row with status ``decode_error`` there, and the
perceptual hash is taken there from the decoded pixels (:mod:`pipeline.faces.phash`). Between
download and labels each image is decoded once (a decode and phash here took a quarter of the
downloader's CPU: JPEG ~0.6 ms, PNG ~4.5 ms, then the hash's resize).

**Tries across runs.** A URL whose try failed in a way that may pass (a timeout, a connection
error, a 5xx or 429 that outlasted the retries) gets ``next_attempt_at`` = now +
``scrape.retry_delay_s * 2**(attempt-1)``; a host that asked for a wait the download cannot sit
through (``X-RateLimit-Remaining: 0`` with a far reset, a long ``Retry-After``) makes the row
``deferred``, due at the server's reset. A later scrape run tries due URLs again
(:func:`pipeline.scrape.scrape.due_retries`), each try a new row with ``attempt`` + 1, until
``scrape.max_attempts`` tries; a final status (404, 410, ``bad_url``, ``too_large``,
``not_image``, ...) is never tried again (:func:`next_attempt_at`).

Only ``scrape.threads`` downloads are in flight (twice that queued), so memory holds at most
that many bodies at once, whatever the run's size. Finished work comes back through a queue fed
by each future's done-callback (see ``Downloader.submit``).
"""

from __future__ import annotations

import io
import queue
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from PIL import Image

from pipeline.core.config import ScrapeConfig
from pipeline.core.storage import ImageStore, Storage
from pipeline.core.strip_metadata import MetadataError, NotStrippable, strip_metadata
from pipeline.scrape.http import HttpClient

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

STATUSES = ("ok", "http_error", "timeout", "too_large", "not_image", "decode_error", "bomb",
            "blocked", "bad_url", "connection_error", "redirect_loop", "opted_out", "not_strippable",
            "deferred", "robots_disallowed")
#: Statuses a later run tries again (``http_error`` only with :data:`RETRYABLE_HTTP`).
RETRYABLE_STATUSES = frozenset({"timeout", "connection_error", "deferred"})


def retryable(status: str, http_status: int | None) -> bool:
    """Whether a try that ended so may succeed later: a timeout, a connection error, a
    deferral, a 429 or a 5xx. A 404, 410 or any other 4xx, and every content check, are final."""
    if status in RETRYABLE_STATUSES:
        return True
    return status == "http_error" and http_status is not None and (http_status == 429 or http_status >= 500)


def next_attempt_at(cfg: ScrapeConfig, *, status: str, http_status: int | None, attempt: int,
                    attempted_at: datetime, server_wait_s: float | None = None) -> datetime | None:
    """When try ``attempt`` + 1 of a URL may be made: ``retry_delay_s * 2**(attempt-1)`` after
    ``attempted_at``, or after the server's wait when that is later; None when the try's status
    is final or ``max_attempts`` tries are made."""
    if not retryable(status, http_status) or attempt >= cfg.max_attempts:
        return None
    delay_s = cfg.retry_delay_s * 2 ** (attempt - 1)
    if server_wait_s is not None:
        delay_s = max(delay_s, server_wait_s)
    try:
        return attempted_at + timedelta(seconds=delay_s)
    except OverflowError:  # a reset beyond year 9999: as good as never
        return None
#: ``X-Robots-Tag`` directives that mean "do not use this image for AI": the bytes are not kept.
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})


def robots_opt_out(value: str | None) -> str | None:
    """The opt-out directive in an ``X-Robots-Tag`` header value, or None.

    The header is a comma-separated list of directives, each optionally prefixed by a user
    agent (``otherbot: noindex, noai``); any agent's opt-out is honoured."""
    for part in (value or "").split(","):
        directive = part.rsplit(":", 1)[-1].strip().lower()
        if directive in OPT_OUT_DIRECTIVES:
            return directive
    return None


def sniff_format(head: bytes) -> str | None:
    """The image format the first bytes announce, or None."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    return None


@dataclass
class ImageCheck:
    status: str  # ok, not_image, bomb, decode_error
    error: str | None = None
    width: int = 0
    height: int = 0
    format: str = ""


def check_image(data: bytes, max_pixels: int) -> ImageCheck:
    """Magic bytes, header dimensions against ``max_pixels``, verify() (PNG); no decode."""
    announced = sniff_format(data[:16])
    if announced is None:
        return ImageCheck("not_image", f"not an image: body starts with {data[:16]!r}")
    try:
        # Only the announced format's parser is tried; a body that lies about its format fails here.
        with Image.open(io.BytesIO(data), formats=[announced]) as im:  # header only: no pixel is decoded
            width, height = im.size
            fmt = im.format or announced
            if width * height > max_pixels:
                return ImageCheck("bomb", f"{width}x{height} = {width * height} pixels exceeds max_pixels {max_pixels}",
                                  width, height, fmt)
            if fmt == "PNG":
                im.verify()  # every chunk's CRC, also those after the pixel data; nothing is inflated
    except Image.DecompressionBombError as exc:
        return ImageCheck("bomb", f"Pillow refused it: {exc}")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        return ImageCheck("decode_error", f"{announced} header/verify failed: {type(exc).__name__}: {exc}")
    return ImageCheck("ok", None, width, height, fmt)


def _well_formed(url: str) -> bool:
    """Whether ``url`` names an origin whose robots.txt can be asked for; one that does not is
    left to the fetch, which ends it as ``bad_url`` naming the problem."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:
        return False


@dataclass
class Downloaded:
    """One attempted URL: its ``downloads`` row and, when ok, its ``images`` row."""

    download: dict
    image: dict | None

    @property
    def status(self) -> str:
        return self.download["status"]


class Downloader:
    """``Downloader(cfg.scrape, storage).run([(post_id, url), ...])`` → :class:`Downloaded` items."""

    def __init__(self, cfg: ScrapeConfig, storage: Storage, client: HttpClient | None = None, *,
                 source: str = "mastodon", now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.cfg = cfg
        self.images = ImageStore(storage)
        self.client = client or HttpClient(cfg)
        self._own_client = client is None
        self.source = source
        self.now = now
        self._pool: ThreadPoolExecutor | None = None
        # Finished futures arrive here from their worker's done-callback: one cheap put per URL,
        # where wait(FIRST_COMPLETED) over every pending future cost the main thread O(in flight).
        self._done: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._in_flight = 0

    # ---------------------------------------------------------------- one URL

    def fetch(self, post_id: str, url: str, stored_url: str | None = None, attempt: int = 1) -> Downloaded:
        """Download, check and store one image; never raises for a bad item.

        ``stored_url`` is the form of ``url`` the row records (the post's ``image_urls`` entry,
        with any segment naming the author blanked); it replaces ``url`` in errors too.
        ``attempt``: which try of this URL this is (1 unless a later run tries it again)."""
        attempted_at = self.now()
        t0 = time.monotonic()
        shown = stored_url or url
        refusal = self.client.policy.robots_refusal(url) if _well_formed(url) else None
        if refusal:  # never requested
            row = self._refused_row(post_id, shown, attempted_at, attempt, refusal)
            if not self.client.policy.robots_reachable(url):  # robots.txt down: no verdict yet, try later
                row["status"], row["opt_out_reason"] = "deferred", None
                self._plan_next_try(row, None)
            return Downloaded(row, None)
        res = self.client.fetch(url, max_bytes=self.cfg.max_bytes, total_timeout_s=self.cfg.total_timeout_s)
        row = {
            "source": self.source, "post_id": post_id, "url": shown, "status": res.status,
            "http_status": res.http_status, "error": res.error.replace(url, shown) if res.error else None,
            "bytes": res.body_bytes,
            "elapsed_ms": 0.0, "attempts": res.attempts, "sha256": None, "attempted_at": attempted_at,
            "attempt": attempt, "next_attempt_at": None, "opt_out_reason": None,
        }
        if res.status == "http_error" and res.retry_after_s is not None:
            row["status"] = "deferred"  # the host is closed for longer than this download may wait
        image = None
        opt_out = robots_opt_out(res.headers.get("X-Robots-Tag")) if res.ok else None
        tdm = self.client.policy.tdm_refusal(url, res.headers) if res.ok and not opt_out else None
        if opt_out:
            row["status"], row["error"] = "opted_out", f"X-Robots-Tag: {opt_out} ({shown})"
            row["opt_out_reason"] = "noai"
            res.body = None
        elif tdm:  # text and data mining reserved (EU DSM Art. 4(3)): the bytes are not kept
            row["status"], row["error"], row["opt_out_reason"] = "opted_out", tdm.replace(url, shown), "tdm"
            res.body = None
        elif res.ok:
            data = res.body or b""
            try:
                check = check_image(data, self.cfg.max_pixels)
                if check.status == "ok":
                    image = self._store(check, data)
                    row["sha256"] = image["sha256"]
                else:
                    row["status"], row["error"] = check.status, f"{check.error} ({shown})"
            except MetadataError as exc:
                row["status"] = "not_strippable" if isinstance(exc, NotStrippable) else "decode_error"
                row["error"] = f"{exc} ({shown})"
            finally:
                res.body = None  # bodies never outlive their check
        row["elapsed_ms"] = (time.monotonic() - t0) * 1000.0
        self._plan_next_try(row, res.retry_after_s)
        return Downloaded(row, image)

    def _refused_row(self, post_id: str, shown: str, attempted_at: datetime, attempt: int, refusal: str) -> dict:
        """The ``downloads`` row of a URL robots.txt disallows: final, never requested."""
        return {"source": self.source, "post_id": post_id, "url": shown, "status": "robots_disallowed",
                "http_status": None, "error": f"{refusal} ({shown})", "bytes": 0, "elapsed_ms": 0.0, "attempts": 0,
                "sha256": None, "attempted_at": attempted_at, "attempt": attempt, "next_attempt_at": None,
                "opt_out_reason": "robots"}

    def _plan_next_try(self, row: dict, server_wait_s: float | None) -> None:
        """Set the row's ``next_attempt_at``, and say in its error whether another try follows."""
        if row["status"] == "ok" or not retryable(row["status"], row["http_status"]):
            return
        attempt = row["attempt"]
        row["next_attempt_at"] = next_attempt_at(self.cfg, status=row["status"], http_status=row["http_status"],
                                                 attempt=attempt, attempted_at=row["attempted_at"],
                                                 server_wait_s=server_wait_s)
        tries = f"try {attempt} of scrape.max_attempts = {self.cfg.max_attempts}"
        when = row["next_attempt_at"]
        note = f"{tries}; a later run tries again from {when:%Y-%m-%d %H:%M:%S} UTC" if when else f"{tries}: final"
        row["error"] = f"{row['error']} ({note})" if row["error"] else note

    def _store(self, check: ImageCheck, data: bytes) -> dict:
        """Strip ``data``'s metadata, store what is left, return its ``images`` row. Raises
        :class:`MetadataError` when it cannot be stripped (nothing is stored then)."""
        stripped = strip_metadata(data, check.format)
        # Not fsynced one by one: the scrape syncs storage once per flush, before any table
        # row or crawl state records the image.
        sha, key = self.images.put(stripped.data, durable=False)
        return {"sha256": sha, "width": check.width, "height": check.height, "format": check.format,
                "bytes": len(stripped.data), "storage_key": key, "metadata_stripped": True,
                "metadata_removed": list(stripped.removed), "exif_orientation": stripped.orientation}

    # ---------------------------------------------------------------- many URLs

    def submit(self, post_id: str, url: str, stored_url: str | None = None, attempt: int = 1) -> list[Downloaded]:
        """Queue one URL; blocks while ``2 * threads`` are in flight. Returns results finished meanwhile."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="download")
        out: list[Downloaded] = []
        if self._in_flight >= 2 * self.cfg.threads:
            out.append(self._take(block=True))
            out += self.finished()
        self._in_flight += 1
        self._pool.submit(self.fetch, post_id, url, stored_url, attempt).add_done_callback(self._done.put)
        return out

    def finished(self) -> list[Downloaded]:
        """Results done so far, without waiting."""
        out: list[Downloaded] = []
        while self._in_flight:
            try:
                out.append(self._take(block=False))
            except queue.Empty:
                break
        return out

    def drain(self) -> list[Downloaded]:
        """Wait for everything in flight."""
        out: list[Downloaded] = []
        while self._in_flight:
            out.append(self._take(block=True))
        return out

    def _take(self, block: bool) -> Downloaded:
        future = self._done.get(block=block)  # raises queue.Empty when not blocking and none is done
        self._in_flight -= 1
        return future.result()

    def run(self, items: Iterable[tuple[str, str]]) -> Iterator[Downloaded]:
        """Download ``(post_id, url)`` pairs; results in completion order."""
        for post_id, url in items:
            yield from self.submit(post_id, url)
        yield from self.drain()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._done, self._in_flight = queue.SimpleQueue(), 0  # results nobody took are dropped
        if self._own_client:
            self.client.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
