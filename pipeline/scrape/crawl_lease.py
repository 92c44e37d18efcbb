"""One crawl of a timeline at a time: a lease on its crawl state.

A (platform, instance, hashtag) timeline's crawl state is read at the start of a scrape and
saved at each flush; two scrapes of the same timeline at once (two overlapping DAG runs of
different days, a retry beside a slow attempt) would read the same state and save over each
other. The lease is a small object beside the state, ``<state>.lease``, created only if
absent (``Storage.create``: an exclusive create locally, a conditional PUT on S3), renewed at
each flush and deleted at the end. A lease past its expiry is a killed worker's and is taken
over, so a crash never blocks a timeline for longer than :data:`LEASE_TTL_S`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from pipeline.core.storage import Storage, StorageError

#: How long a lease lasts without renewal, seconds: longer than any flush interval, short
#: enough that a killed worker's timeline is free again soon.
LEASE_TTL_S = 900.0


class CrawlBusy(RuntimeError):
    """Another scrape holds this timeline's lease; the message names it and until when."""


@dataclass
class CrawlLease:
    storage: Storage
    key: str
    owner: str

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": time.time() + LEASE_TTL_S}).encode()

    def renew(self) -> None:
        self.storage.put_bytes(self.key, self._body())

    def release(self) -> None:
        try:
            if json.loads(self.storage.get_bytes(self.key)).get("owner") == self.owner:
                self.storage.delete(self.key)
        except (StorageError, ValueError):
            pass  # gone already, or taken over after it expired: nothing of ours to delete


def acquire(storage: Storage, state_key: str) -> CrawlLease:
    """The lease of the timeline whose crawl state is ``state_key``; raises :class:`CrawlBusy`."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{os.environ.get('AIRFLOW_CTX_DAG_RUN_ID', '')}:{uuid.uuid4().hex[:8]}"
    lease = CrawlLease(storage, f"{state_key}.lease", owner)
    for _ in range(3):  # a lease that expired is deleted, then created again: another may win that race
        if storage.create(lease.key, lease._body()):
            return lease
        try:
            held = json.loads(storage.get_bytes(lease.key))
        except StorageError:
            continue  # released between the two calls: try again
        except ValueError:
            held = {"owner": "?", "expires_at": 0}  # unreadable: treat as expired
        if held.get("expires_at", 0) > time.time():
            until = time.strftime("%H:%M:%S UTC", time.gmtime(held["expires_at"]))
            raise CrawlBusy(f"another scrape of this timeline is running ({held.get('owner')}, lease "
                            f"{storage.uri(lease.key)} until {until} unless renewed); its rows cover this run's")
        storage.delete(lease.key)  # a killed worker's lease
    raise CrawlBusy(f"could not take the lease {storage.uri(lease.key)}: other scrapes keep taking it")
