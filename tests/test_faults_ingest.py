"""Hostile inputs through the real ingest path (issue 15): thin images, a CSV quote never closed, Parquet columns
of unexpected types, unreachable hosts with robots.txt on. The servers are real ones on loopback; the DNS and
connection checks run inside a loopback-only network namespace."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tasks.ingest
from infra.loopback_server import ImageServer
from infra.settings import DownloadConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.images import MAX_OUTPUT_ASPECT
from tasks.ingest import STAGE, IngestStage, ingest_shard, plan_ingest
from tasks.inputs import InputError, read_url_list
from tasks.shards import stage_key

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.0/8",)
# The thin images of the issue: name -> (width, height, Pillow format).
THIN = {
    "thin-300x1.png": (300, 1, "PNG"),
    "thin-1x500.gif": (1, 500, "GIF"),
    "thin-2560x10.png": (2560, 10, "PNG"),
    "thin-4000x1.png": (4000, 1, "PNG"),
    "thin-50000x2.jpg": (50000, 2, "JPEG"),
    "thin-20000x1.png": (20000, 1, "PNG"),
    "thin-70000x1.png": (70000, 1, "PNG"),  # with resize_mode no: wider than JPEG can encode
}
# Ingests one planned shard in a fresh process under an address-space cap (the unbounded resize took 9.5 GB) and
# prints its rows and the process's peak RSS.
INGEST_SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from infra.settings import DownloadConfig, ImageConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.ingest import STAGE, ingest_shard, plan_ingest
from tasks.shards import stage_key
root, inputs, mode, fmt = sys.argv[1:5]
cfg = IngestConfig(images=ImageConfig(resize_mode=mode, encode_format=fmt),
                   download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0, read_timeout=60, total_timeout=60))
store = LocalStore(root)
[shard] = plan_ingest(store, "ds", [InputSpec(path=inputs)], cfg).todo
ingest_shard(root, "ds", shard, cfg)
rows = store.get_parquet(stage_key("ds", STAGE, shard, "parquet")).to_pylist()
keep = ("url", "status", "error_class", "error", "width", "height")
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a large pytest process starts at the parent's size.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rows": [{k: r[k] for k in keep} for r in rows], "peak_rss_mb": hwm / 1024}))
"""


def encode(w: int, h: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 40)).save(buf, fmt)
    return buf.getvalue()


def url_list(path: Path, urls: list[str]) -> str:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)
    return str(path)


# ---- 1. thin images -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "fmt"), [("keep_ratio", "jpg"), ("center_crop", "webp"), ("no", "jpg")])
def test_thin_images_never_fail_the_shard_and_memory_stays_bounded(
        tmp_path: Path, photos: list[Path], mode: str, fmt: str) -> None:
    images = {p.name: p.read_bytes() for p in photos[:3]} | {n: encode(*spec) for n, spec in THIN.items()}
    with ImageServer(images) as srv:
        urls = srv.image_urls(len(images))
        proc = subprocess.run([sys.executable, "-c", INGEST_SCRIPT, str(tmp_path / "store"),
                               url_list(tmp_path / "in.parquet", urls), mode, fmt],
                              cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["url"].rsplit("/", 1)[1]: r for r in out["rows"]}
    for photo in photos[:3]:
        assert rows[photo.name]["status"] == "ok", rows[photo.name]
    for name, (w, h, _) in THIN.items():
        row = rows[name]
        if row["status"] == "ok":  # resized sensibly: never past the long-side cap
            bound = max(w, h) if mode == "no" else 256 * MAX_OUTPUT_ASPECT
            assert max(row["width"], row["height"]) <= bound, row
        else:
            assert row["status"] == "error" and row["error_class"] and row["error"], row
    assert out["peak_rss_mb"] < 400, out["peak_rss_mb"]


def test_an_unexpected_exception_is_that_samples_error(
        tmp_path: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug anywhere in the per-sample path (here: the image step raising something no one expected) is recorded
    # on that sample, class internal, with the exception's type and text; the shard and its other samples land.
    poisoned = photos[1].read_bytes()
    real = tasks.ingest.process_image

    def process_image(data: bytes, cfg):
        if data == poisoned:
            raise RuntimeError("unexpected state in the resizer")
        return real(data, cfg)

    monkeypatch.setattr(tasks.ingest, "process_image", process_image)
    cfg = IngestConfig(download=DownloadConfig(allow_cidrs=LOOPBACK, retries=0))
    store = LocalStore(tmp_path / "store")
    with ImageServer(photos[:3]) as srv:
        [shard] = plan_ingest(store, "ds", [InputSpec(path=url_list(tmp_path / "in.parquet", srv.image_urls(3)))],
                              cfg).todo
        stats = ingest_shard(store.uri, "ds", shard, cfg)
    rows = store.get_parquet(stage_key("ds", STAGE, shard, "parquet")).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert (rows[1]["error_class"], rows[1]["error"]) == ("internal", "RuntimeError: unexpected state in the resizer")
    assert stats["counts"] == {"ok": 2, "error": 1}


# ---- 2. a CSV quote never closed ----------------------------------------------------------------------------------


def test_csv_with_an_unclosed_quote_reports_the_row_and_reads_the_rest(tmp_path: Path) -> None:
    lines = ["url,caption"] + [f"http://img.test/{i}.jpg,caption {i}" for i in range(1, 11)]
    lines[6] = 'http://img.test/6.jpg,"caption 6'  # line 7 of 11: the quote is never closed
    lines[8] = 'http://img.test/8.jpg,"two\nlines"'  # a real multi-line caption stays one value
    lines[3] = 'http://img.test/3.jpg,a 5" screen'  # a quote inside an unquoted value is a character
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    stage = IngestStage(IngestConfig(), None, inputs=[InputSpec(path=str(path)).model_dump()])
    result = stage.prepare(str(tmp_path / "store"), "ds")
    assert (result["new_samples"], result["rejected_input_rows"]) == (9, 1), result
    [warning] = result["warnings"]
    assert "line 7" in warning and "never closed" not in warning and "caption 6" in warning, warning

    table, report = read_url_list(InputSpec(path=str(path)))
    got = dict(zip(table.column("url").to_pylist(), table.column("alt_text").to_pylist(), strict=True))
    want = {f"http://img.test/{i}.jpg": f"caption {i}" for i in range(1, 11) if i != 6}
    want |= {"http://img.test/3.jpg": 'a 5" screen', "http://img.test/8.jpg": "two\nlines"}
    assert got == want
    assert report.rejected == 1


def test_csv_quote_closed_only_by_a_later_stray_quote(tmp_path: Path) -> None:
    # Unfixed, lines 3-5 became one row whose caption ran from line 3's quote to line 5's.
    path = tmp_path / "in.csv"
    path.write_text('url,caption\nhttp://img.test/1.jpg,one\nhttp://img.test/2.jpg,"two\nhttp://img.test/3.jpg,three\n'
                    'http://img.test/4.jpg,fo"ur\n')
    table, report = read_url_list(InputSpec(path=str(path)))
    assert table.column("alt_text").to_pylist() == ["one", "three", 'fo"ur']
    assert report.rejected == 1 and report.examples[0].startswith("line 3: "), report


# ---- 3. Parquet columns of unexpected types -----------------------------------------------------------------------


def test_parquet_list_and_binary_columns_are_coerced_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "url": pa.array([["http://img.test/1.jpg"], ["http://img.test/2.jpg", "http://img.test/3.jpg"],
                         ["http://img.test/4.jpg"]], pa.list_(pa.string())),
        "caption": pa.array([b"plain", b"caf\xe9 latin-1", b"\xff\xfe"], pa.binary()),
    }), path)
    table, report = read_url_list(InputSpec(path=str(path)))
    assert table.column("url").to_pylist() == ["http://img.test/1.jpg", "http://img.test/4.jpg"]
    assert table.column("alt_text").to_pylist() == ["plain", "\ufffd\ufffd"]
    assert table.column("input_warning").to_pylist()[0] is None
    assert "'caption' was not valid UTF-8" in table.column("input_warning").to_pylist()[1]
    assert report.rejected == 1 and "list of 2 values" in report.examples[0], report


def test_parquet_binary_url_with_bad_utf8_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": pa.array([b"http://img.test/a.jpg", b"http://img.test/\xff.jpg"]),
                             "caption": ["a", "b"]}), path)
    table, report = read_url_list(InputSpec(path=str(path)))
    assert table.column("url").to_pylist() == ["http://img.test/a.jpg", "http://img.test/\ufffd.jpg"]
    assert table.column("input_warning").to_pylist() == [
        None, "column 'url' was not valid UTF-8; undecodable bytes replaced"]
    assert report.rejected == 0


@pytest.mark.parametrize(("column", "values", "type_text"), [
    ("url", pa.array([{"href": "http://img.test/a.jpg"}]), "struct<href: string>"),
    ("caption", pa.array([[1, 2]], pa.list_(pa.int64())), ": int64>"),  # list<element: int64> once in Parquet
])
def test_parquet_column_of_an_unusable_type_is_an_input_error(
        tmp_path: Path, column: str, values: pa.Array, type_text: str) -> None:
    cols = {"url": pa.array(["http://img.test/a.jpg"]), "caption": pa.array(["a"]), column: values}
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table(cols), path)
    with pytest.raises(InputError) as info:
        read_url_list(InputSpec(path=str(path)))
    assert str(path) in str(info.value) and repr(column) in str(info.value) and type_text in str(info.value)


# ---- 4. unreachable hosts with robots.txt on ----------------------------------------------------------------------


UNREACHABLE_SCRIPT = """
import asyncio, json, socket
from infra.settings import DownloadConfig
from tasks.download import Downloader
closed = socket.socket(); closed.bind(("127.0.0.1", 0)); port = closed.getsockname()[1]; closed.close()
urls = {"bad_port": "http://127.0.0.1:99999/a.jpg", "dns": "http://img.capfactory.invalid/a.jpg",
        "refused": f"http://127.0.0.1:{port}/a.jpg"}
async def main():
    cfg = DownloadConfig(allow_cidrs=("127.0.0.0/8",), connect_timeout=2, total_timeout=5, retries=0)
    async with Downloader(cfg) as d:
        return {k: await d.fetch(u) for k, u in urls.items()}
print(json.dumps({k: [r.status, r.error_class, r.error] for k, r in asyncio.run(main()).items()}))
"""


def test_unreachable_hosts_record_their_real_class_with_robots_on() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip to build a loopback-only network namespace")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot create a network namespace")
    # Inside a namespace with only loopback, no DNS query for the .invalid name can leave the machine.
    proc = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable,
                           UNREACHABLE_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: v[:2] for k, v in got.items()} == {
        "bad_port": ["error", "bad_url"], "dns": ["error", "dns"], "refused": ["error", "connect"]}
    for _, _, error in got.values():  # the robots.txt outcome stays the reason in the text
        assert "robots.txt unreachable" in error and "treated as disallow-all" in error, error
