"""Object storage: one small interface over a local folder and S3 (boto3).

Keys are '/'-separated paths under the storage root (``posts/dt=2026-11-23/data.parquet``).
Every put is atomic: a local write goes to a hidden temp file in the same folder and is
renamed into place; an S3 PUT is atomic by itself (readers see the old or the new object).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pipeline.core import keys

if TYPE_CHECKING:
    import pyarrow.fs

    from pipeline.core.config import StorageConfig


class StorageError(RuntimeError):
    """Storage could not be read or written; the message names the location and the cause."""


class Storage(ABC):
    """Bytes under keys. Subclasses: :class:`LocalStorage`, :class:`S3Storage`."""

    root: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Atomic put. ``durable=False`` may skip flushing to disk; call :meth:`sync` before
        recording that the data exists (a local fsync per small file dominates bulk writes)."""

    def sync(self) -> None:
        """Make every earlier ``durable=False`` put durable (a no-op where puts always are)."""
        return None

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Put ``data`` only if ``key`` does not exist yet; return whether it was created. Atomic:
        of several processes creating one key at once, exactly one succeeds."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys below ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def arrow_fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem and the base path of the root within it."""

    @abstractmethod
    def table_location(self, path: str) -> tuple[str, dict[str, str]]:
        """The URI of the Delta table at ``path`` under the root, and the ``storage_options``
        delta-rs needs to reach it."""

    @abstractmethod
    def check_root(self) -> None:
        """Raise :class:`StorageError`, naming the root and the problem, when there is nothing
        to read there: a folder that does not exist, a missing bucket, refused credentials.
        For commands that only read, where an empty answer would hide a mistyped root."""

    def uri(self, key: str = "") -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def put_file(self, key: str, path: str | Path) -> None:
        """Atomic put of a local file's content, then remove the file. The default reads it
        whole; subclasses stream it (an export shard is hundreds of MB)."""
        self.put_bytes(key, Path(path).read_bytes())
        Path(path).unlink()

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode())

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode()


#: Age after which a leftover ``.tmp-*`` file is a killed writer's, not a running one's, seconds.
STALE_TEMP_S = 600.0


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.path = Path(root).expanduser().resolve()
        self.root = str(self.path)
        self._swept: set[Path] = set()  # folders already cleared of stale temp files

    def file_of(self, key: str) -> Path:
        """The file of ``key``. Checked as a string (``..`` and absolute keys are refused), not
        resolved on disk: resolving costs a syscall per path component on every put and get,
        and links inside the root are the operator's own."""
        p = Path(os.path.normpath(self.path / key))
        if p != self.path and self.path not in p.parents:
            raise StorageError(f"key {key!r} escapes the storage root {self.root}")
        return p

    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        dest = self.file_of(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.parent not in self._swept:  # once per folder: listing it on every put costs O(files)
            self._remove_stale_temps(dest.parent)
            self._swept.add(dest.parent)
        tmp = dest.parent / f".tmp-{uuid.uuid4().hex}-{dest.name}"
        replaced = False
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, dest)  # atomic on POSIX: readers see old or new, never half
            replaced = True
            if durable:  # the rename itself survives a power cut only once its folder is synced
                fd = os.open(dest.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        finally:
            if not replaced:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    @staticmethod
    def _remove_stale_temps(folder: Path) -> None:
        """Temp files killed writers left in ``folder``. Only old ones: a temp file younger than
        :data:`STALE_TEMP_S` may belong to a writer still running."""
        cutoff = time.time() - STALE_TEMP_S
        for old in folder.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()

    def put_file(self, key: str, path: str | Path) -> None:
        # A rename within one filesystem is atomic; across filesystems it is a copy to a temp
        # name beside the destination, then a rename, so a reader never sees half a file.
        dest = self.file_of(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dest)
        except OSError:
            tmp = dest.parent / f".tmp-{uuid.uuid4().hex}-{dest.name}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
            Path(path).unlink()

    def sync(self) -> None:
        os.sync()  # one call for a whole batch of durable=False puts

    def create(self, key: str, data: bytes) -> bool:
        dest = self.file_of(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.name}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # a hard link fails when the name exists: one creator wins, and the file is whole
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.file_of(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.uri(key)}: not found") from None

    def exists(self, key: str) -> bool:
        return self.file_of(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # S3 semantics: a plain string prefix, so "posts/dt=" matches "posts/dt=2026-11-01/...".
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.file_of(folder) if folder else self.path
        if not base.is_dir():
            return []
        keys = (
            p.relative_to(self.path).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )
        return sorted(k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.file_of(key).unlink()

    def arrow_fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem(), self.root

    def table_location(self, path: str) -> tuple[str, dict[str, str]]:
        return str(self.file_of(path)), {}

    def check_root(self) -> None:
        if not self.path.is_dir():
            raise StorageError(f"storage root {self.root}: no such folder (check storage.root; a scrape creates it)")


#: Attempts per S3 request (boto3 and pyarrow alike): transient errors are retried with backoff.
S3_ATTEMPTS = 8
#: Whole GETs tried when a response body breaks off (connection reset, short body).
BODY_ATTEMPTS = 4

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


class S3Storage(Storage):
    """``s3://bucket/prefix`` on AWS or any S3-compatible endpoint (``endpoint_url``)."""

    def __init__(
        self,
        root: str,
        *,
        endpoint_url: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        conditional_put: str = "etag",
    ):
        import boto3
        from botocore.config import Config as BotoConfig

        parsed = urlparse(root)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"{root!r}: expected s3://bucket[/prefix]")
        self.root = root.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self._keys = (access_key_id or None, secret_access_key or None)
        #: How concurrent Delta commits stay safe: "etag" = the store's conditional PUT
        #: (If-None-Match), as AWS S3 and SeaweedFS do; "" = none, then set a locking provider
        #: (AWS_S3_LOCKING_PROVIDER=dynamodb) in the environment, which delta-rs reads.
        self.conditional_put = conditional_put
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self._keys[0],
            aws_secret_access_key=self._keys[1],
            config=BotoConfig(retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"}, s3={"addressing_style": "path"}),
        )

    def check_root(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in ("404", "NoSuchBucket"):
                raise StorageError(f"storage root {self.root}: bucket {self.bucket!r} does not exist at "
                                   f"{self.endpoint_url or 'AWS'} (check storage.root)") from None
            raise self._error(exc, "") from None
        except Exception as exc:  # noqa: BLE001 - translated into a StorageError naming the root
            raise self._error(exc, "") from None

    def object_key(self, key: str) -> str:
        """The S3 object key of a storage key: under the root's prefix."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, key: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.uri(key)
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"{where}: no S3 credentials found (set storage.access_key_id/secret_access_key or the AWS chain)")
        if isinstance(exc, EndpointConnectionError):
            return StorageError(f"{where}: cannot reach S3 endpoint {self.endpoint_url or 'AWS'}: {exc}")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _AUTH_CODES or code == "403":
                return StorageError(f"{where}: S3 refused the credentials ({code}); check storage.access_key_id/secret_access_key")
            if code in ("NoSuchBucket",):
                return StorageError(f"{where}: bucket {self.bucket!r} does not exist")
            if code in ("NoSuchKey", "404"):
                return StorageError(f"{where}: not found")
            return StorageError(f"{where}: S3 error {code}: {exc}")
        return StorageError(f"{where}: {exc}")

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:  # a conditional PUT (If-None-Match: *): the store refuses it when the key exists
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise self._error(exc, key) from exc
        except Exception as exc:  # noqa: BLE001 - translated into a StorageError naming the key
            raise self._error(exc, key) from exc

    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        try:  # an S3 PUT is durable once it returns
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data)
        except Exception as exc:  # noqa: BLE001 - translated into a StorageError naming the key
            raise self._error(exc, key) from exc

    def put_file(self, key: str, path: str | Path) -> None:
        try:  # multipart for large files; the object appears only when the upload completes
            self.client.upload_file(str(path), self.bucket, self.object_key(key))
        except Exception as exc:  # noqa: BLE001 - translated into a StorageError naming the key
            raise self._error(exc, key) from exc
        Path(path).unlink()

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import (
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        # botocore retries a failed request, but not a body cut short after the headers came:
        # that read is retried here, as a whole new GET.
        for attempt in range(BODY_ATTEMPTS):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"].read()
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError) as exc:
                if attempt + 1 == BODY_ATTEMPTS:
                    raise self._error(exc, key) from exc
                time.sleep(0.2 * 2 ** attempt)
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, key) from exc
        raise AssertionError("unreachable")

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(exc, key) from exc
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, key) from exc

    def list(self, prefix: str = "") -> list[str]:
        full = self.object_key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys += [o["Key"][strip:] for o in page.get("Contents", [])]
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, prefix) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, key) from exc

    def arrow_fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs

        kwargs: dict = {}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if self.region:
            kwargs["region"] = self.region
        if self._keys[0]:
            kwargs["access_key"], kwargs["secret_key"] = self._keys
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        # pyarrow's default is 3 attempts; S3 answers 503 SlowDown in bursts under load, and
        # dataset reads run several requests at once, so one read can meet several faults.
        kwargs["retry_strategy"] = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
        return pyarrow.fs.S3FileSystem(**kwargs), base

    def table_location(self, path: str) -> tuple[str, dict[str, str]]:
        options = {"conditional_put": self.conditional_put} if self.conditional_put else {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                options["allow_http"] = "true"
        if self.region:
            options["region"] = self.region
        if self._keys[0]:
            options["access_key_id"], options["secret_access_key"] = self._keys
        return f"s3://{self.bucket}/{self.object_key(path)}", options


def open_storage(cfg: StorageConfig) -> Storage:
    """The storage the config points at."""
    if cfg.root.startswith("s3://"):
        return S3Storage(
            cfg.root,
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            access_key_id=cfg.access_key_id,
            secret_access_key=cfg.secret_access_key,
            conditional_put=cfg.s3_conditional_put,
        )
    return LocalStorage(cfg.root)


class ImageStore:
    """Content-addressed image bytes: ``images/<sha256[:2]>/<sha256>``. A second put is free."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def key(sha256: str) -> str:
        return keys.image_bytes(sha256)

    def put(self, data: bytes, *, durable: bool = True) -> tuple[str, str]:
        """Store ``data`` once; return (sha256, key). See ``Storage.put_bytes`` for ``durable``."""
        sha = hashlib.sha256(data).hexdigest()
        key = self.key(sha)
        if not self.storage.exists(key):
            self.storage.put_bytes(key, data, durable=durable)
        return sha, key

    def get(self, sha256: str) -> bytes:
        return self.storage.get_bytes(self.key(sha256))
