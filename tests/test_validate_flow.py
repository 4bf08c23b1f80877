"""The `validate` flow end to end on a Dask LocalCluster: a dataset with only ingest validates, a stage output
added later is validated while unchanged shards are not, quarantine sets the bad row aside, fail mode fails the
run naming suite, shard and expectation, and GX data docs land in the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from infra.settings import DatasetSpec, DownloadConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.ingest import ingest_shard, plan_ingest
from tasks.shards import stage_key, write_marker
from tasks.validate import ValidationFailed, docs_prefix, quarantined_keys, summary_key

REPO = Path(__file__).resolve().parents[1]
SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("error", pa.string()), ("clip_alt", pa.float32()),
    ("clip_short", pa.float32()), ("clip_dense", pa.float32()),
    ("clip_translations", pa.list_(pa.struct([("field", pa.string()), ("lang", pa.string()),
                                              ("score", pa.float32())]))),
    ("nsfw", pa.float32()), ("lang_alt", pa.string()), ("lang_alt_prob", pa.float32()), ("lang_short", pa.string()),
    ("lang_dense", pa.string()), ("provenance", pa.map_(pa.string(), pa.string())),
])


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, photos) -> LocalStore:
    """Three COCO photos and a URL that fails, ingested into one shard (no other stage has run)."""
    import pyarrow.parquet as pq

    from infra.loopback_server import ImageServer

    tmp = tmp_path_factory.mktemp("validate")
    with ImageServer(photos[:3]) as server:
        urls = [server.url(f"/img/{i}/{p.name}") for i, p in enumerate(photos[:3])]
        urls.append(server.url("/fault/not-found.jpg"))
        pq.write_table(pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(4)]}),
                       tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        plan_ingest(store, "val", [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        ingest_shard(store.uri, "val", 0, cfg)
    return store


def _add_scores(store: LocalStore, nsfw_of_first: float) -> str:
    raw = store.get_parquet(stage_key("val", "ingest", 0, "parquet")).to_pylist()
    rows = [{"key": r["key"], "status": "ok" if r["status"] == "ok" else "skipped", "error": None,
             "clip_alt": 0.31 if r["status"] == "ok" else None, "clip_short": None, "clip_dense": None,
             "clip_translations": None, "nsfw": 0.01 if r["status"] == "ok" else None, "lang_alt": "en",
             "lang_alt_prob": 0.9, "lang_short": None, "lang_dense": None, "provenance": [("nsfw", "opennsfw")]}
            for r in raw]
    rows[0]["nsfw"] = nsfw_of_first
    store.put_parquet(stage_key("val", "score", 0, "parquet"), pa.Table.from_pylist(rows, SCORES_SCHEMA))
    write_marker(store, "val", "score", 0, {"shard": 0, "samples": len(rows), "config_hash": "test"})
    return rows[0]["key"]


@pytest.mark.slow
def test_validate_flow_modes_skips_and_data_docs(ingested):
    from flows.stage import run_stage

    store = ingested
    spec = DatasetSpec(name="val", store=store.uri)
    result = run_stage("validate", spec, workers=1)
    assert list(result["suites"]) == ["ingest"] and result["validated"] == {"ingest": [0]}
    assert result["skipped_suites"] == ["extract", "fuse", "translate", "score"]
    assert result["suites"]["ingest"] == {"shards": 1, "passed": 1, "failed_shards": [], "rows": 4,
                                       "quarantined_rows": 0, "caption_fallbacks": 0, "failing_expectations": {}}
    assert result["data_docs"] == f"{docs_prefix('val')}/index.html" and store.exists(result["data_docs"])
    assert store.get_json(summary_key("val"))["suites"]["ingest"]["passed"] == 1

    # A score shard arrives with one NSFW score out of range: only it is validated; its row is set aside.
    bad = _add_scores(store, nsfw_of_first=1.5)
    result = run_stage("validate", spec, workers=1)
    assert result["validated"] == {"ingest": [], "score": [0]} and result["already_validated"]["ingest"] == [0]
    assert result["suites"]["score"]["quarantined_rows"] == 1
    assert result["suites"]["score"]["failing_expectations"] == {"expect_column_values_to_be_between(nsfw)": 1}
    assert quarantined_keys(store, "val") == {bad}
    index = store.get_bytes(result["data_docs"]).decode()
    assert "score" in index and "ingest" in index
    pages = [k for k in store.list(docs_prefix("val")) if "/validations/score/" in k]
    assert pages and "nsfw" in store.get_bytes(pages[0]).decode()

    # Fail mode: the run fails and says where and why.
    with pytest.raises(ValidationFailed, match=r"suite 'score' failed on shard 00000 of val: "
                                                r"expect_column_values_to_be_between\(nsfw\): 1 rows, e\.g\. \[1\.5\]"):
        run_stage("validate", DatasetSpec(name="val", store=store.uri, validation={"on_failure": "fail"}),
                  workers=1)


def test_cli_validate_of_an_unknown_dataset_exits_with_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "--dataset", "nothing", "--store",
                           str(tmp_path), "--on-failure", "explode"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "validate.on_failure" in proc.stderr
