"""Mistakes fail in a second (issue 13.7): a missing input, a wrong column, a store URI with a typo, S3 without
credentials, unreachable or spoken to in the wrong protocol, a Prefect API that is down. Each is one `error:` line
with exit code 2, no traceback, found before Prefect or Dask start (the CLI says "starting a Prefect API ..." when
they do). Through the real CLI; the S3 server is moto's, on loopback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings
from infra.store import StoreError, open_store, s3_endpoint

REPO = Path(__file__).resolve().parents[1]
STARTED = "starting a Prefect API"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPFACTORY_", "PREFECT_API_URL"))}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=120)


def assert_one_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, exactly one `error:` line (returned) containing `expected`, no traceback, nothing started."""
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, out
    assert len(errors) == 1, out
    assert "Traceback" not in out and STARTED not in out and "distributed." not in out, out
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """host:port of a moto S3 server (plain HTTP) on loopback."""
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def csv_input(tmp_path: Path) -> Path:
    path = tmp_path / "urls.csv"
    path.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a photo\n")
    return path


@pytest.fixture(params=["ingest", "build"])
def command(request, tmp_path: Path, csv_input: Path) -> list[str]:
    """A stage command and `build` (which planned its stages, then started Prefect and Dask before opening the
    store), each with a valid input; the test appends `--store`."""
    if request.param == "ingest":
        return ["ingest", str(csv_input), "--dataset", "d"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: d\ninputs:\n  - path: {csv_input}\nstages: [ingest]\n")
    return ["build", str(spec)]


def _s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    return _env(CAPFACTORY_S3_ENDPOINT=endpoint, CAPFACTORY_S3_ACCESS_KEY="test", CAPFACTORY_S3_SECRET_KEY="test",
                CAPFACTORY_S3_REGION="us-east-1", **extra)


def test_a_missing_input_file(tmp_path):
    proc = cli("ingest", str(tmp_path / "nope.csv"), "--dataset", "d", "--store", str(tmp_path / "store"))
    assert_one_error(proc, "nope.csv does not exist")


def test_a_wrong_url_column_names_the_columns_there(tmp_path, csv_input):
    proc = cli("ingest", str(csv_input), "--url-col", "link", "--dataset", "d", "--store", str(tmp_path / "s"))
    assert_one_error(proc, "no URL column 'link'", "'url', 'caption'")
    proc = cli("ingest", str(csv_input), "--caption-col", "alt", "--dataset", "d", "--store", str(tmp_path / "s"))
    assert_one_error(proc, "no caption column 'alt'")


def test_a_spec_whose_input_is_missing_fails_build_before_anything_starts(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: d\nstore: {tmp_path / 'store'}\ninputs:\n  - path: {tmp_path / 'gone.parquet'}\n")
    assert_one_error(cli("build", str(spec)), "gone.parquet does not exist")


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3:/bucket/prefix", "names no bucket"),
    ("s4://bucket/prefix", "unsupported scheme 's4'"),
    ("s3://My_Bucket/prefix", "not a valid bucket name"),
])
def test_a_store_uri_with_a_typo(command, uri, expected):
    assert_one_error(cli(*command, "--store", uri), expected)


def test_s3_without_an_endpoint_or_credentials(command):
    line = assert_one_error(cli(*command, "--store", "s3://bucket/prefix"), "CAPFACTORY_S3_ENDPOINT")
    assert "s3://bucket/prefix" in line and "//prefix" not in line.replace("s3://", "")
    no_keys = _env(CAPFACTORY_S3_ENDPOINT="http://127.0.0.1:9000")
    assert_one_error(cli(*command, "--store", "s3://bucket/", env=no_keys), "needs credentials",
                     "CAPFACTORY_S3_ACCESS_KEY")


def test_an_unreachable_s3_endpoint(command):
    port = _free_port()
    proc = cli(*command, "--store", "s3://bucket/p", env=_s3_env(f"http://127.0.0.1:{port}"))
    assert_one_error(proc, f"cannot reach the S3 endpoint 127.0.0.1:{port}", "refused")


def test_tls_left_on_against_plain_http(command, moto_endpoint):
    proc = cli(*command, "--store", "s3://bucket/p", env=_s3_env(moto_endpoint))
    assert_one_error(proc, "does not speak TLS", "CAPFACTORY_S3_SECURE=false", f"http://{moto_endpoint}")


def test_an_endpoint_written_as_a_url_is_accepted(tmp_path, moto_endpoint):
    # The store is fine (the bucket is created); what fails is the input, so the store check passed.
    bucket = f"cf-{uuid.uuid4().hex[:10]}"
    proc = cli("ingest", str(tmp_path / "nope.csv"), "--dataset", "d", "--store", f"s3://{bucket}/p",
               env=_s3_env(f"http://{moto_endpoint}"))
    assert_one_error(proc, "nope.csv does not exist")
    settings = Settings(s3_endpoint=f"http://{moto_endpoint}", s3_access_key="test", s3_secret_key="test",
                        s3_region="us-east-1")
    assert s3_endpoint("s3://b", settings) == (moto_endpoint, False)
    assert s3_endpoint("s3://b", settings.model_copy(update={"s3_endpoint": "https://minio:9000"})) == \
        ("minio:9000", True)
    with pytest.raises(StoreError, match="no path"):
        s3_endpoint("s3://b", settings.model_copy(update={"s3_endpoint": "http://minio:9000/bucket"}))
    assert open_store(f"s3://{bucket}/p", settings).exists("d/x") is False


def test_debug_keeps_the_traceback(tmp_path):
    proc = cli("--debug", "ingest", str(tmp_path / "nope.csv"), "--dataset", "d", "--store", str(tmp_path / "s"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error: input" in proc.stderr


def test_deploy_against_an_unreachable_prefect_api():
    port = _free_port()
    proc = cli("deploy", env=_env(PREFECT_API_URL=f"http://127.0.0.1:{port}/api"))
    assert_one_error(proc, f"cannot reach the Prefect API at http://127.0.0.1:{port}/api", "capfactory serve")
    assert "httpx" not in proc.stderr


def test_the_spec_is_kept_with_the_dataset_in_an_s3_store_too(moto_endpoint):
    from infra.settings import DatasetSpec, SpecError
    from infra.stored_spec import load_stored_spec, save_spec, spec_key

    settings = Settings(s3_endpoint=moto_endpoint, s3_secure=False, s3_access_key="test", s3_secret_key="test",
                        s3_region="us-east-1")
    store = open_store(f"s3://cf-{uuid.uuid4().hex[:10]}/datasets", settings)
    spec = DatasetSpec(name="d", store=store.uri, score={"filters": {"nsfw_max": 0.3}})
    assert load_stored_spec(store, "d") is None
    assert save_spec(store, spec) and not save_spec(store, spec)  # written once; the same spec again is not rewritten
    stored = load_stored_spec(store, "d")
    assert stored["score"]["filters"]["nsfw_max"] == 0.3 and "store" not in stored
    store.put_bytes(spec_key("d"), b"name: d\nscore: {filters: {nsfw_max: 7}}\n")
    with pytest.raises(SpecError, match=r"(?s)the spec stored with the dataset \(s3://.*/d/_spec.yaml\).*nsfw_max"):
        load_stored_spec(store, "d")


def test_check_inputs_reads_the_columns_of_every_format(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from infra.settings import InputSpec
    from tasks.inputs import InputError, check_inputs

    pq.write_table(pa.table({"URL": ["http://a/x.jpg"], "TEXT": ["a"]}), tmp_path / "laion.parquet")
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"image_url": "http://a/x.jpg"}\nnot json\n'))
    (tmp_path / "cc3m.tsv").write_text("a caption\thttp://a/x.jpg\n")  # headerless: columns named by content
    (tmp_path / "images").mkdir()
    check_inputs([InputSpec(path=str(tmp_path / name)) for name in
                  ("laion.parquet", "rows.jsonl.gz", "cc3m.tsv", "images")])
    cases = [
        (InputSpec(path=str(tmp_path / "laion.parquet"), url_col="url"), "no URL column 'url'; columns are"),
        (InputSpec(path=str(tmp_path / "rows.jsonl.gz"), caption_col="alt"), "no caption column 'alt'"),
        (InputSpec(path=str(tmp_path / "images"), format="csv"), "is a folder, but its format is csv"),
        (InputSpec(path=str(tmp_path / "laion.parquet"), format="folder"), "is a file, but its format is folder"),
        (InputSpec(path=str(tmp_path / "cc3m.txt")), "does not exist"),
    ]
    (tmp_path / "cc3m.txt").unlink(missing_ok=True)
    for spec, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            check_inputs([spec])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="cannot tell the format"):
        check_inputs([InputSpec(path=str(tmp_path / "notes.txt"))])
