"""Old object versions in a versioned S3 bucket: what a forget deletes must not live on in them.

With versioning on (``Enabled``, or ``Suspended`` after it was on), deleting an object only
hides it behind a delete marker and overwriting one keeps the old bytes as a *noncurrent
version*: a forget that vacuums a table or deletes a photo would leave every byte of them in
the bucket. So a forget looks at the bucket first (:meth:`BucketVersions.detect`, before it
changes anything) and, once it has removed what it removes, deletes the noncurrent versions
and delete markers under the keys and folders it touched (:meth:`BucketVersions.purge`).

A lifecycle rule with ``NoncurrentVersionExpiration`` would delete those versions too, but only
days later; the forget deletes them at once either way and logs the rule it found. It refuses
to start, naming the permissions it needs, when the bucket is versioned but its versions
cannot be listed (``s3:ListBucketVersions``; deleting them needs ``s3:DeleteObjectVersion``).
A bucket that never had versioning on, or a store without the API, needs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.core.storage import S3Storage, Storage, StorageError

log = logging.getLogger(__name__)

#: delete_objects takes at most this many keys per request (S3's limit).
DELETE_BATCH = 1000


@dataclass
class BucketVersions:
    """A versioned bucket behind an :class:`S3Storage`, whose old versions a forget deletes."""

    storage: S3Storage
    status: str  # "Enabled" or "Suspended"
    noncurrent_expiration_days: int | None  # the bucket's lifecycle rule for old versions, if any

    @classmethod
    def detect(cls, storage: Storage) -> BucketVersions | None:
        """The bucket's versioning, checked before a forget changes anything; None when there
        are no old versions to delete (local storage, or versioning never turned on)."""
        if not isinstance(storage, S3Storage):
            return None
        from botocore.exceptions import ClientError

        client, bucket = storage.client, storage.bucket
        try:
            status = client.get_bucket_versioning(Bucket=bucket).get("Status", "")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NotImplemented", "MethodNotAllowed", "XNotImplemented"):
                log.info("bucket %s: the store has no versioning API: no old versions to delete", bucket)
                return None
            raise StorageError(f"forget refused: cannot read the versioning of bucket {bucket!r} ({code}): "
                               "a versioned bucket keeps what a forget deletes as old versions. Grant "
                               "s3:GetBucketVersioning, or run forget with credentials that have it") from exc
        if status not in ("Enabled", "Suspended"):
            return None
        try:
            client.list_object_versions(Bucket=bucket, Prefix=storage.object_key(""), MaxKeys=1)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise StorageError(
                f"forget refused: bucket {bucket!r} has versioning {status}, so what forget deletes would stay "
                f"as old versions, and their list cannot be read ({code}). Grant s3:ListBucketVersions and "
                "s3:DeleteObjectVersion to these credentials, then run forget again (nothing was changed)") from exc
        days = _noncurrent_expiration_days(storage)
        log.info("bucket %s has versioning %s (noncurrent versions expire after %s): forget deletes the old "
                 "versions of what it removes", bucket, status, f"{days} days" if days is not None else "never")
        return cls(storage, status, days)

    def purge(self, keys_or_folders: Iterable[str]) -> int:
        """Delete every noncurrent version and delete marker under each storage key or folder
        (a folder ends with ``/``); return the versions deleted. Versions go before markers, so
        no old version ever becomes current again in between."""
        client, bucket = self.storage.client, self.storage.bucket
        versions: list[dict[str, str]] = []
        markers: list[dict[str, str]] = []
        for prefix in sorted(set(keys_or_folders)):
            full = self.storage.object_key(prefix)
            for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=full):
                for v in page.get("Versions", []):
                    if not v.get("IsLatest") and (prefix.endswith("/") or v["Key"] == full):
                        versions.append({"Key": v["Key"], "VersionId": v["VersionId"]})
                for m in page.get("DeleteMarkers", []):
                    if prefix.endswith("/") or m["Key"] == full:
                        markers.append({"Key": m["Key"], "VersionId": m["VersionId"]})
        for batch in (versions, markers):
            for i in range(0, len(batch), DELETE_BATCH):
                out = client.delete_objects(Bucket=bucket, Delete={"Objects": batch[i:i + DELETE_BATCH], "Quiet": True})
                if out.get("Errors"):
                    first = out["Errors"][0]
                    raise StorageError(f"bucket {bucket!r}: could not delete {len(out['Errors'])} old version(s), "
                                       f"e.g. {first.get('Key')} ({first.get('Code')}: {first.get('Message')})")
        log.info("bucket %s: deleted %d old version(s) and %d delete marker(s)", bucket, len(versions), len(markers))
        return len(versions)


def _noncurrent_expiration_days(storage: S3Storage) -> int | None:
    """The fewest days after which an enabled lifecycle rule expires old versions; None if none."""
    from botocore.exceptions import ClientError

    try:
        rules = storage.client.get_bucket_lifecycle_configuration(Bucket=storage.bucket).get("Rules", [])
    except ClientError:  # NoSuchLifecycleConfiguration, or a store without the API
        return None
    days = [r["NoncurrentVersionExpiration"].get("NoncurrentDays") for r in rules
            if r.get("Status") == "Enabled" and "NoncurrentVersionExpiration" in r]
    days = [d for d in days if isinstance(d, int)]
    return min(days) if days else None
