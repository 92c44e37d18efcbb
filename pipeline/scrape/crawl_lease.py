"""One crawl of a timeline at a time: a lease on its crawl state.

A (platform, instance, hashtag) timeline's crawl state is read at the start of a scrape and
saved at each flush; two scrapes of the same timeline at once (two overlapping DAG runs of
different days, a retry beside a slow attempt) would read the same state and save over each
other. The lease is a small object beside the state, ``<state>.lease``, created only if
absent (``Storage.create``: an exclusive create locally, a conditional PUT on S3), renewed by
a heartbeat every third of :data:`LEASE_TTL_S` and deleted at the end.

A scrape that finds the lease taken waits for it (up to :data:`LEASE_WAIT_S`): it is free
again when the holder ends, when the holder's heartbeat stops for :data:`LEASE_TTL_S` (a
killed worker), or at once when the holder was a process of this machine that no longer runs
(a retry on the same worker after a crash). Past the wait it gives up, saying who holds it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from pipeline.core.storage import Storage, StorageError

#: How long a lease lasts without a heartbeat, seconds.
LEASE_TTL_S = 90.0
#: How long a scrape waits for a taken lease before it gives up, seconds.
LEASE_WAIT_S = LEASE_TTL_S + 30.0
#: Pause between looks at a taken lease, seconds.
POLL_S = 2.0


class CrawlBusy(RuntimeError):
    """Another scrape holds this timeline's lease; the message names it and until when."""


@dataclass
class CrawlLease:
    storage: Storage
    key: str
    owner: dict[str, object]
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _beat: threading.Thread | None = field(default=None, repr=False)

    def body(self) -> bytes:
        return json.dumps({**self.owner, "expires_at": time.time() + LEASE_TTL_S}).encode()

    def renew(self) -> None:
        self.storage.put_bytes(self.key, self.body())

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(LEASE_TTL_S / 3):
                try:
                    self.renew()
                except StorageError:
                    pass  # the next beat tries again; a lease that lapses is only taken over

        self._beat = threading.Thread(target=beat, name="crawl-lease", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.storage.get_bytes(self.key)).get("id") == self.owner["id"]:
                self.storage.delete(self.key)
        except (StorageError, ValueError):
            pass  # gone already, or taken over after it lapsed: nothing of ours to delete


def _holder_gone(held: dict) -> bool:
    """True when the lease's holder is a process of this machine that no longer runs."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def acquire(storage: Storage, state_key: str, *, wait_s: float | None = None) -> CrawlLease:
    """The lease of the timeline whose crawl state is ``state_key``, its heartbeat running;
    raises :class:`CrawlBusy` when another scrape keeps it past the wait."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
             "airflow_run": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID", "")}
    lease = CrawlLease(storage, f"{state_key}.lease", owner)
    deadline = time.monotonic() + (LEASE_WAIT_S if wait_s is None else wait_s)
    while True:
        if storage.create(lease.key, lease.body()):
            lease.start_heartbeat()
            return lease
        try:
            held = json.loads(storage.get_bytes(lease.key))
        except StorageError:
            continue  # released between the two calls: try again
        except ValueError:
            held = {"expires_at": 0}  # unreadable: treat as lapsed
        if held.get("expires_at", 0) <= time.time() or _holder_gone(held):
            storage.delete(lease.key)  # a killed worker's lease
            continue
        if time.monotonic() >= deadline:
            until = time.strftime("%H:%M:%S UTC", time.gmtime(held["expires_at"]))
            raise CrawlBusy(f"another scrape of this timeline is running (pid {held.get('pid')} on {held.get('host')}, "
                            f"lease {storage.uri(lease.key)} until {until} unless renewed); its rows cover this run's")
        time.sleep(POLL_S)
