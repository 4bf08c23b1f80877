"""The artifact store: one interface, a local folder (the embedded default) and MinIO/S3.

Keys are '/'-separated paths relative to the store root (`<dataset>/<stage>/shard-00042.parquet`).
Every write is atomic: a reader sees the old object or the new one, never a partial one. That is what
makes the done markers (written last) trustworthy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from infra.settings import Settings


class StoreError(RuntimeError):
    pass


class ArtifactStore(ABC):
    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store a local file under `key`; the local file may be moved away."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    def move(self, src: str, dst: str) -> None:
        """Move an object to another key (copy, then delete the source)."""
        self.put_bytes(dst, self.get_bytes(src))
        self.delete(src)

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, json.dumps(value, indent=1, sort_keys=True, default=str).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_parquet(self, key: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.put_bytes(key, sink.getvalue())

    def get_parquet(self, key: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.get_bytes(key)), columns=columns)


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StoreError(f"key {key!r} escapes the store root")
        return path

    def _replace_into(self, key: str, write) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._replace_into(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no object {key!r} in {self.uri}") from None

    def put_file(self, key: str, path: Path) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        self._replace_into(key, copy)

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise StoreError(f"no object {key!r} in {self.uri}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), target)


class S3Store(ArtifactStore):
    """MinIO or any S3-compatible service, through the `minio` SDK. Credentials come from Settings/env."""

    def __init__(self, bucket: str, prefix: str, settings: Settings):
        from minio import Minio

        if not settings.s3_endpoint:
            raise StoreError(
                f"store s3://{bucket}/{prefix} needs CAPFACTORY_S3_ENDPOINT (host:port of MinIO/S3) "
                "and CAPFACTORY_S3_ACCESS_KEY / CAPFACTORY_S3_SECRET_KEY"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as e:
            if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"cannot use bucket {self.bucket!r}: {e.code}: {e.message}") from e

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

    def get_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, self._name(key))
        except S3Error as e:
            if e.code == "NoSuchKey":
                raise StoreError(f"no object {key!r} in {self.uri}") from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def put_file(self, key: str, path: Path) -> None:
        self.client.fput_object(self.bucket, self._name(key), str(path))

    def get_file(self, key: str, path: Path) -> None:
        from minio.error import S3Error

        try:
            self.client.fget_object(self.bucket, self._name(key), str(path))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise StoreError(f"no object {key!r} in {self.uri}") from None
            raise

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._name(key))
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        folder = prefix.strip("/")
        # The whole store is `<prefix>/` (or the whole bucket), never `<prefix>//`.
        full = self._name(folder + "/") if folder else (f"{self.prefix}/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(
            o.object_name[cut:]
            for o in self.client.list_objects(self.bucket, prefix=full, recursive=True)
            if not o.is_dir
        )

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self._name(key))


def open_store(uri: str | None = None, settings: Settings | None = None) -> ArtifactStore:
    """`s3://bucket/prefix` opens MinIO/S3; a path or `file://` URI opens a local folder."""
    settings = settings or Settings()
    uri = uri or settings.store
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, settings)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StoreError(f"store URI {uri!r}: unsupported scheme {parsed.scheme!r} (use a path or s3://)")
    return LocalStore(uri)
