"""The artifact store contract, run against a local folder and against a real S3-protocol server (moto) on
loopback, plus the local-only guarantees (atomic writes, no escaping the root) and `open_store`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from infra.settings import Settings
from infra.store import ArtifactStore, LocalStore, S3Store, StoreError, open_store

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "NO_PROXY",
              "no_proxy")


@pytest.fixture(scope="session")
def s3_settings() -> Iterator[Settings]:
    """A moto S3 server on 127.0.0.1 (a free port), and Settings pointing at it."""
    server_mod = pytest.importorskip("moto.server")
    # Nothing may reach past loopback: no proxy variables while the server runs.
    saved = {k: os.environ.pop(k) for k in PROXY_VARS if k in os.environ}
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    try:
        yield Settings(s3_endpoint=f"127.0.0.1:{port}", s3_access_key="test", s3_secret_key="test",
                       s3_secure=False, s3_region="us-east-1")
    finally:
        server.stop()
        for k in PROXY_VARS:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _bucket() -> str:
    return f"cf-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3-prefix", "s3-root"])
def store(request, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    settings = request.getfixturevalue("s3_settings")
    prefix = "some/prefix" if request.param == "s3-prefix" else ""
    return S3Store(_bucket(), prefix, settings)


# --- the contract -------------------------------------------------------------------------------------------


def test_bytes_roundtrip_and_overwrite(store: ArtifactStore) -> None:
    store.put_bytes("ds/raw/a.bin", b"\x00\x01hello")
    assert store.get_bytes("ds/raw/a.bin") == b"\x00\x01hello"
    store.put_bytes("ds/raw/a.bin", b"second")
    assert store.get_bytes("ds/raw/a.bin") == b"second"
    store.put_bytes("ds/raw/empty", b"")
    assert store.get_bytes("ds/raw/empty") == b""
    assert store.exists("ds/raw/empty")
    odd = "ds/raw/a key with spaces+é中%20.json"
    store.put_bytes(odd, b"odd")
    assert store.get_bytes(odd) == b"odd"
    assert odd in store.list("ds/raw")


def test_get_missing_is_store_error(store: ArtifactStore) -> None:
    with pytest.raises(StoreError, match="nope"):
        store.get_bytes("ds/nope.bin")
    with pytest.raises(StoreError):
        store.get_json("ds/nope.json")


def test_exists(store: ArtifactStore) -> None:
    assert not store.exists("ds/x.json")
    store.put_bytes("ds/x.json", b"{}")
    assert store.exists("ds/x.json")
    assert not store.exists("ds")  # a "folder" is not an object
    assert not store.exists("ds/x")


def test_list(store: ArtifactStore) -> None:
    for key in ["ds/raw/b.parquet", "ds/raw/a.parquet", "ds/raw/sub/c.json", "ds/rawish/d", "other/e"]:
        store.put_bytes(key, key.encode())
    expected = ["ds/raw/a.parquet", "ds/raw/b.parquet", "ds/raw/sub/c.json"]
    assert store.list("ds/raw") == expected
    assert store.list("ds/raw/") == expected
    assert store.list("ds/raw/sub") == ["ds/raw/sub/c.json"]
    assert store.list("ds") == [*expected, "ds/rawish/d"]
    assert store.list("missing") == []
    assert store.list("ds/raw/a.parquet") == []  # an object is not a folder
    assert store.list("") == [*expected, "ds/rawish/d", "other/e"]


def test_delete(store: ArtifactStore) -> None:
    store.put_bytes("ds/k", b"1")
    store.put_bytes("ds/k2", b"2")
    store.delete("ds/k")
    assert not store.exists("ds/k")
    assert store.list("ds") == ["ds/k2"]
    store.delete("ds/k")  # already gone: fine
    store.delete("never/there")


def test_put_file_get_file(store: ArtifactStore, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    store.put_file("ds/raw/shard-00000.tar", src)
    assert store.exists("ds/raw/shard-00000.tar")
    assert store.get_bytes("ds/raw/shard-00000.tar") == payload
    dst = tmp_path / "dst.bin"
    store.get_file("ds/raw/shard-00000.tar", dst)
    assert dst.read_bytes() == payload
    dst.write_bytes(b"stale")
    store.get_file("ds/raw/shard-00000.tar", dst)  # overwrites an existing local file
    assert dst.read_bytes() == payload


def test_get_file_missing_is_store_error(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        store.get_file("ds/nope.tar", tmp_path / "out.tar")
    assert not list(tmp_path.glob("out.tar*"))


def test_json_helpers(store: ArtifactStore) -> None:
    value = {"shard": 3, "counts": {"ok": 10, "error": 2}, "names": ["é", "中"], "none": None, "f": 0.5}
    store.put_json("ds/raw/shard-00003_SUCCESS.json", value)
    assert store.get_json("ds/raw/shard-00003_SUCCESS.json") == value
    store.put_json("ds/path.json", {"p": Path("/x/y")})  # non-JSON types are written as text
    assert store.get_json("ds/path.json") == {"p": "/x/y"}


def test_parquet_helpers(store: ArtifactStore) -> None:
    table = pa.table({"key": ["a", "b", "c"], "n": pa.array([1, 2, None], pa.int64()),
                      "tags": [["x"], [], ["y", "z"]]})
    store.put_parquet("ds/raw/shard-00000.parquet", table)
    assert store.get_parquet("ds/raw/shard-00000.parquet").equals(table)
    only = store.get_parquet("ds/raw/shard-00000.parquet", columns=["key"])
    assert only.column_names == ["key"]
    assert only.column("key").to_pylist() == ["a", "b", "c"]


# --- S3 specifics -------------------------------------------------------------------------------------------


def test_s3_prefix_placement(s3_settings: Settings) -> None:
    bucket = _bucket()
    store = open_store(f"s3://{bucket}/some/prefix/", s3_settings)
    assert isinstance(store, S3Store)
    assert store.uri == f"s3://{bucket}/some/prefix"
    store.put_bytes("ds/raw/a.json", b"{}")
    store.put_bytes("ds/b.json", b"{}")
    names = sorted(o.object_name for o in store.client.list_objects(bucket, recursive=True))
    assert names == ["some/prefix/ds/b.json", "some/prefix/ds/raw/a.json"]
    assert store.list("ds") == ["ds/b.json", "ds/raw/a.json"]

    # Another prefix in the same bucket sees none of it, and the bucket root sees both (with the prefix).
    sibling = open_store(f"s3://{bucket}/some/prefix2", s3_settings)
    assert sibling.list("ds") == []
    assert not sibling.exists("ds/b.json")
    root = open_store(f"s3://{bucket}", s3_settings)
    assert root.list("some/prefix") == ["some/prefix/ds/b.json", "some/prefix/ds/raw/a.json"]
    assert root.get_bytes("some/prefix/ds/b.json") == b"{}"


def test_s3_bucket_created_once(s3_settings: Settings) -> None:
    bucket = _bucket()
    first = S3Store(bucket, "p", s3_settings)
    assert first.client.bucket_exists(bucket)
    first.put_bytes("k", b"v")
    second = S3Store(bucket, "p", s3_settings)  # existing bucket: reused, not an error
    assert second.get_bytes("k") == b"v"


# --- local specifics ----------------------------------------------------------------------------------------


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    store.put_bytes("ds/a", b"1")
    store.put_bytes("ds/a", b"2")
    store.put_json("ds/b.json", [1])
    store.put_parquet("ds/c.parquet", pa.table({"x": [1]}))
    store.put_file("ds/sub/d.tar", src)
    assert not src.exists()  # same filesystem: moved, not copied
    assert _all_files(store.root) == ["ds/a", "ds/b.json", "ds/c.parquet", "ds/sub/d.tar"]
    assert store.get_bytes("ds/sub/d.tar") == b"x" * 1000
    assert (store.root / "ds/sub/d.tar").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_local_put_file_from_another_filesystem_is_copied(tmp_path: Path) -> None:
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the store here")
    store = LocalStore(tmp_path / "s")
    src = Path("/dev/shm") / f"capfactory-test-{uuid.uuid4().hex}.tar"
    src.write_bytes(b"y" * 5000)
    try:
        store.put_file("ds/raw/shard-00000.tar", src)
        assert store.get_bytes("ds/raw/shard-00000.tar") == b"y" * 5000
        assert _all_files(store.root) == ["ds/raw/shard-00000.tar"]
    finally:
        src.unlink(missing_ok=True)


def test_local_failed_write_keeps_old_content(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("ds/marker.json", b"old")

    def broken(f) -> None:
        f.write(b"partial new cont")
        f.flush()
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        store._replace_into("ds/marker.json", broken)
    assert store.get_bytes("ds/marker.json") == b"old"
    assert _all_files(store.root) == ["ds/marker.json"]

    # A failing put_file (source vanished) neither creates the key nor leaves debris.
    with pytest.raises(OSError):
        store.put_file("ds/new.tar", tmp_path / "does-not-exist")
    assert not store.exists("ds/new.tar")
    assert _all_files(store.root) == ["ds/marker.json"]


def test_local_interrupted_write_keeps_old_content(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("k", b"old")

    def interrupted(f) -> None:
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store._replace_into("k", interrupted)
    assert store.get_bytes("k") == b"old"
    assert _all_files(store.root) == ["k"]


@pytest.mark.parametrize("key", ["../outside", "ds/../../outside", "/etc/passwd", "ds/../../../tmp/x"])
def test_local_key_escaping_root_refused(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "s")
    with pytest.raises(StoreError, match="escapes"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="escapes"):
        store.get_bytes(key)
    with pytest.raises(StoreError, match="escapes"):
        store.exists(key)
    with pytest.raises(StoreError, match="escapes"):
        store.delete(key)
    assert not (tmp_path / "outside").exists()


def test_local_symlink_out_of_root_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStore(tmp_path / "s")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(StoreError, match="escapes"):
        store.put_bytes("link/x", b"x")
    assert not (outside / "x").exists()


def test_local_dot_segments_inside_root_allowed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("ds/sub/../a", b"1")
    assert store.get_bytes("ds/a") == b"1"


# --- open_store ---------------------------------------------------------------------------------------------


def test_open_store_s3_without_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CAPFACTORY_S3_ENDPOINT", "CAPFACTORY_STORE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StoreError, match="CAPFACTORY_S3_ENDPOINT"):
        open_store("s3://bucket/prefix", Settings())
    with pytest.raises(StoreError, match="CAPFACTORY_S3_ENDPOINT"):
        open_store("s3://bucket/prefix")


def test_open_store_s3_without_bucket() -> None:
    with pytest.raises(StoreError, match="bucket"):
        open_store("s3:///prefix", Settings(s3_endpoint="127.0.0.1:1"))


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://127.0.0.1/x", "ftp://host/x"])
def test_open_store_unknown_scheme(uri: str) -> None:
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store(uri, Settings())


def test_open_store_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_uri = open_store((tmp_path / "a").as_uri(), Settings())
    assert isinstance(by_uri, LocalStore)
    assert by_uri.root == (tmp_path / "a").resolve()
    by_uri.put_bytes("k", b"v")
    assert (tmp_path / "a" / "k").read_bytes() == b"v"

    by_path = open_store(str(tmp_path / "a"), Settings())
    assert by_path.get_bytes("k") == b"v"

    monkeypatch.chdir(tmp_path)
    relative = open_store("rel/store", Settings())
    assert isinstance(relative, LocalStore)
    assert relative.root == (tmp_path / "rel" / "store").resolve()

    monkeypatch.setenv("CAPFACTORY_STORE", str(tmp_path / "from-env"))
    from_env = open_store()
    assert isinstance(from_env, LocalStore)
    assert from_env.root == (tmp_path / "from-env").resolve()


def test_open_store_s3_from_env(s3_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFACTORY_S3_ENDPOINT", s3_settings.s3_endpoint)
    monkeypatch.setenv("CAPFACTORY_S3_ACCESS_KEY", "test")
    monkeypatch.setenv("CAPFACTORY_S3_SECRET_KEY", "test")
    monkeypatch.setenv("CAPFACTORY_S3_SECURE", "false")
    monkeypatch.setenv("CAPFACTORY_S3_REGION", "us-east-1")
    bucket = _bucket()
    monkeypatch.setenv("CAPFACTORY_STORE", f"s3://{bucket}/env")
    store = open_store()
    assert isinstance(store, S3Store)
    assert store.uri == f"s3://{bucket}/env"
    store.put_json("ds/x.json", {"a": 1})
    again = open_store(f"s3://{bucket}/env")
    assert again.get_json("ds/x.json") == {"a": 1}
    assert again.list("ds") == ["ds/x.json"]


def test_local_files_follow_the_umask_like_any_other_writer(tmp_path):
    """mkstemp creates 0600 files: a training job or another user could not read the release."""
    store = LocalStore(tmp_path)
    store.put_bytes("d/publish/shard-00000.tar", b"x")
    store.put_json("d/publish/_published.json", {})
    umask = os.umask(0)
    os.umask(umask)
    for key in ("d/publish/shard-00000.tar", "d/publish/_published.json"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o666 & ~umask
