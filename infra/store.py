"""The artifact store: one interface, a local folder (the embedded default) and MinIO/S3.

Keys are '/'-separated paths relative to the store root (`<dataset>/<stage>/shard-00042.parquet`).
Every write is atomic: a reader sees the old object or the new one, never a partial one. That is what
makes the done markers (written last) trustworthy.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from infra.settings import Settings


class StoreError(RuntimeError):
    pass


class StoreUnavailable(RuntimeError):
    """The store could not answer (unreachable, refusing, lost its bucket): never taken for a missing object, and
    a plain message, so it pickles across the task boundary and says what happened without object reprs."""

    def __reduce__(self):  # the message only, whatever was attached to the instance on the way up
        return type(self), (str(self),)


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it
_REPR = re.compile(r"<[^<>]* (?:object )?at 0x[0-9a-fA-F]+>")


def _plain(e: BaseException) -> str:
    """An exception as one line without object reprs: S3 errors as `code: message`."""
    code, message = getattr(e, "code", None), getattr(e, "message", None)
    text = f"{code}: {message}" if code and message else f"{type(e).__name__}: {e}"
    return _REPR.sub("<object>", " ".join(text.split()))[:500]


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

    @abstractmethod
    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if no object is there, atomically (of two racing writers one wins); True if created."""

    @abstractmethod
    def replace_bytes_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Overwrite `key` only if it still holds `expected` (compare-and-swap); True if replaced."""

    @abstractmethod
    def delete_if(self, key: str, expected: bytes) -> bool:
        """Remove `key` only if it still holds `expected`; True if removed."""

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
        return read_parquet_bytes(self.get_bytes(key), columns)


def read_parquet_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file held in memory as a table. Not `pq.read_table`: its dataset scanner may drop the last
    reference to `data` on an Arrow pool thread after the read returns, and when that happens while the
    interpreter exits, the thread cannot take the GIL and the process aborts ("terminate called without an
    active exception"). The plain file reader finishes, and lets go of `data`, on the calling thread."""
    with pq.ParquetFile(pa.BufferReader(data)) as f:
        return f.read(columns=columns)


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

    def _replace_into(self, key: str, write, place=os.replace) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: files are shared like any other writer's
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            place(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        """An exclusive lock for the compare-and-swap of `key` (a hidden lock file beside it, which list() skips)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield path

    def put_bytes(self, key: str, data: bytes) -> None:
        self._replace_into(key, lambda f: f.write(data))

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        # link() of a complete temporary file fails if the name exists: atomic, and never a partial object.
        try:
            self._replace_into(key, lambda f: f.write(data), place=os.link)
        except FileExistsError:
            return False
        return True

    def replace_bytes_if(self, key: str, data: bytes, expected: bytes) -> bool:
        with self._locked(key) as path:
            if not path.is_file() or path.read_bytes() != expected:
                return False
            self.put_bytes(key, data)
            return True

    def delete_if(self, key: str, expected: bytes) -> bool:
        with self._locked(key) as path:
            if not path.is_file() or path.read_bytes() != expected:
                return False
            path.unlink()
            return True

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no object {key!r} in {self.uri}") from None

    def put_file(self, key: str, path: Path) -> None:
        # Moved in one rename where the file is on the store's filesystem (a shard tar: no second write of its
        # bytes, measured ~1 CPU s per 1,000 ingested images); copied where it is not.
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(path, 0o666 & ~_UMASK)
            os.replace(path, target)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise

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
        source, target = self._path(src), self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        # Like an object store, leave no empty folder behind.
        for folder in source.parents:
            if folder == self.root or any(folder.iterdir()):
                break
            folder.rmdir()


class S3Store(ArtifactStore):
    """MinIO or any S3-compatible service, through the `minio` SDK. Credentials come from Settings/env."""

    def __init__(self, bucket: str, prefix: str, settings: Settings):
        from minio import Minio

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        host, secure = s3_endpoint(self.uri, settings)
        self.client = Minio(
            host,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=secure,
            region=settings.s3_region,
        )
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        def op():
            try:
                if not self.client.bucket_exists(self.bucket):
                    self.client.make_bucket(self.bucket)
                return None
            except S3Error as e:
                if e.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return None
                refused = f"cannot use bucket {self.bucket!r}: {e.code}: {e.message}"
            raise StoreError(refused)  # outside the handler: no S3Error (unpicklable) as its context

        self._answering("bucket check", self.bucket, op)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _answering(self, op: str, key: str, call):
        """`call()`, with SDK and transport errors as StoreUnavailable naming the operation and the key. Raised
        after the handler, so it has no __context__: pickling it with its chain (Dask does, with tblib) would
        otherwise try to pickle the SDK's response object."""
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError

        try:
            return call()
        except (MinioException, HTTPError) as e:
            message = f"S3 {op} of {key!r} in {self.uri} failed: {_plain(e)}"
        raise StoreUnavailable(message)

    def put_bytes(self, key: str, data: bytes) -> None:
        def op():
            self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

        self._answering("put", key, op)

    # The conditional requests go through the SDK's request layer: its put_object/remove_object send no request
    # headers (put_object turns `metadata` into x-amz-meta-*), and S3/MinIO decide If-None-Match/If-Match atomically.
    def _conditional(self, method: str, key: str, headers: dict[str, str], data: bytes | None = None) -> bool:
        from minio.error import S3Error

        def op():
            try:
                self.client._execute(method, self.bucket, self._name(key), body=data, headers=headers)
            except S3Error as e:
                # 412: the condition failed; 409: a concurrent conditional write won; 404: If-Match on a gone object.
                if e.code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return False
                raise
            return True

        return self._answering(f"conditional {method}", key, op)

    def _etag_if(self, key: str, expected: bytes) -> str | None:
        """The ETag of `key` if it holds `expected` (the ETag the GET returned, not a hash of ours: with
        encryption or multipart uploads an ETag is not the MD5 of the content)."""
        try:
            data, etag = self._get(key)
        except StoreError:
            return None
        return etag if data == expected else None

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        return self._conditional("PUT", key, {"If-None-Match": "*"}, data)

    def replace_bytes_if(self, key: str, data: bytes, expected: bytes) -> bool:
        etag = self._etag_if(key, expected)
        return etag is not None and self._conditional("PUT", key, {"If-Match": etag}, data)

    def delete_if(self, key: str, expected: bytes) -> bool:
        etag = self._etag_if(key, expected)
        return etag is not None and self._conditional("DELETE", key, {"If-Match": etag})

    def _get(self, key: str) -> tuple[bytes, str]:
        from minio.error import S3Error

        def op():
            try:
                response = self.client.get_object(self.bucket, self._name(key))
            except S3Error as e:
                if e.code != "NoSuchKey":
                    raise
                response = None
            if response is None:
                raise StoreError(f"no object {key!r} in {self.uri}")  # outside the handler: no context
            try:
                return response.read(), response.headers.get("ETag", "")
            finally:
                response.close()
                response.release_conn()

        return self._answering("get", key, op)

    def get_bytes(self, key: str) -> bytes:
        return self._get(key)[0]

    def put_file(self, key: str, path: Path) -> None:
        def op():
            self.client.fput_object(self.bucket, self._name(key), str(path))

        self._answering("put", key, op)

    def get_file(self, key: str, path: Path) -> None:
        from minio.error import S3Error

        def op():
            try:
                self.client.fget_object(self.bucket, self._name(key), str(path))
                return
            except S3Error as e:
                if e.code not in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    raise
            raise StoreError(f"no object {key!r} in {self.uri}")  # outside the handler: no context

        self._answering("get", key, op)

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        def op():
            try:
                self.client.stat_object(self.bucket, self._name(key))
                return True
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise

        return self._answering("stat", key, op)

    def list(self, prefix: str) -> list[str]:
        folder = prefix.strip("/")
        # The whole store is `<prefix>/` (or the whole bucket), never `<prefix>//`.
        full = self._name(folder + "/") if folder else (f"{self.prefix}/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0

        def op():
            objects = self.client.list_objects(self.bucket, prefix=full, recursive=True)
            return sorted(o.object_name[cut:] for o in objects if not o.is_dir)

        return self._answering("list", prefix, op)

    def delete(self, key: str) -> None:
        def op():
            self.client.remove_object(self.bucket, self._name(key))

        self._answering("delete", key, op)


_s3_stores: dict[tuple[str, str, str], S3Store] = {}
# S3 bucket naming rules (lowercase letters, digits, dots, hyphens; 3-63 characters).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PROBE_TIMEOUT = 3.0


def s3_endpoint(uri: str, settings: Settings) -> tuple[str, bool]:
    """(host:port, secure) of the S3 endpoint. Written as a URL (the boto habit), its scheme decides TLS; written
    as host:port, CAPFACTORY_S3_SECURE does. Raises StoreError naming what is missing."""
    endpoint = (settings.s3_endpoint or "").strip()
    if not endpoint:
        raise StoreError(f"store {uri} needs CAPFACTORY_S3_ENDPOINT (host:port or URL of MinIO/S3)")
    if not (settings.s3_access_key and settings.s3_secret_key):
        raise StoreError(f"store {uri} needs credentials: set CAPFACTORY_S3_ACCESS_KEY and CAPFACTORY_S3_SECRET_KEY")
    if "://" not in endpoint:
        host, secure = endpoint.rstrip("/"), settings.s3_secure
    else:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path.strip("/") or parsed.query:
            raise StoreError(f"CAPFACTORY_S3_ENDPOINT {endpoint!r}: expected host:port, http://host:port or "
                             "https://host:port (no path)")
        host, secure = parsed.netloc, parsed.scheme == "https"
    _address(host, secure)  # a port that is not a number fails here
    return host, secure


def _address(endpoint: str, secure: bool) -> tuple[str, int]:
    """(host, port) of `host:port` (`[v6]:port`; no port: the scheme's)."""
    host, colon, port = endpoint.rpartition(":") if endpoint.rfind(":") > endpoint.rfind("]") else (endpoint, "", "")
    try:
        number = int(port) if colon else 443 if secure else 80
    except ValueError:
        number = 0
    if not host.strip("[]") or not 0 < number < 65536:
        raise StoreError(f"CAPFACTORY_S3_ENDPOINT {endpoint!r}: expected host:port")
    return host.strip("[]"), number


def _answers_http(endpoint: str, secure: bool, timeout: float = PROBE_TIMEOUT) -> None:
    """One HTTP request to the endpoint (over TLS when `secure`): StoreError saying what is wrong when nobody
    listens, TLS meets plain HTTP (or the reverse), or no answer comes within `timeout` seconds. Seconds, where the
    SDK's own retries and 5-minute timeouts would take minutes to fail."""
    address = _address(endpoint, secure)
    fix = "set CAPFACTORY_S3_SECURE=false or write the endpoint as http://" if secure else \
        "set CAPFACTORY_S3_SECURE=true or write the endpoint as https://"
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise StoreError(f"cannot reach the S3 endpoint {endpoint} ({e.strerror or type(e).__name__}): is the "
                         "server running, and is CAPFACTORY_S3_ENDPOINT right?") from None
    try:
        if secure:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only probing the protocol here
            try:
                sock = context.wrap_socket(sock, server_hostname=address[0])
            except (ssl.SSLError, OSError) as e:
                raise StoreError(f"the S3 endpoint {endpoint} does not speak TLS ({e}): if it serves plain HTTP, "
                                 f"{fix}{endpoint}") from None
        sock.sendall(f"HEAD / HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n".encode())
        try:
            first = sock.recv(16)
        except TimeoutError:
            raise StoreError(f"the S3 endpoint {endpoint} accepts connections but gave no HTTP answer within "
                             f"{timeout:.0f} s") from None
        except OSError:
            first = b""
        if not first.startswith(b"HTTP/"):
            raise StoreError(f"the S3 endpoint {endpoint} gave no HTTP answer to plain HTTP: if it serves HTTPS, "
                             f"{fix}{endpoint}")
    finally:
        sock.close()


def parse_store_uri(uri: str) -> tuple[str, str, str]:
    """("s3", bucket, prefix) or ("local", path, ""), or StoreError for a URI that is neither (a typo such as
    `s3:/bucket` or `s4://bucket`)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc or uri[len("s3:"):][:2] != "//":
            raise StoreError(f"store URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        if not _BUCKET.match(parsed.netloc):
            raise StoreError(f"store URI {uri!r}: {parsed.netloc!r} is not a valid bucket name (3-63 lowercase "
                             "letters, digits, dots and hyphens)")
        return "s3", parsed.netloc, parsed.path.strip("/")
    if parsed.scheme == "file":
        return "local", parsed.path, ""
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StoreError(f"store URI {uri!r}: unsupported scheme {parsed.scheme!r} (use a folder or s3://bucket/prefix)")
    return "local", uri, ""


def open_store(uri: str | None = None, settings: Settings | None = None) -> ArtifactStore:
    """`s3://bucket/prefix` opens MinIO/S3 (once per process and settings: opening probes the endpoint and checks the
    bucket); a path or `file://` URI opens a local folder. A store that cannot be used is a StoreError at once."""
    settings = settings or Settings()
    kind, where, prefix = parse_store_uri(uri or settings.store)
    if kind == "s3":
        key = (where, prefix, settings.model_dump_json())
        if key not in _s3_stores:
            _answers_http(*s3_endpoint(f"s3://{where}/{prefix}".rstrip("/"), settings))
            _s3_stores[key] = S3Store(where, prefix, settings)
        return _s3_stores[key]
    try:
        return LocalStore(where)
    except OSError as e:
        raise StoreError(f"cannot use the store folder {where}: {e.strerror or e}") from None
