"""The suites' fixed cost is paid once per process: validating many shards builds one GX context and one suite per
distinct list of expectations (real GX), and every shard's result, quarantine and fallback files are exactly what
validating it alone, with a fresh context, writes."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from expectations.runner import engine, gx_suite
from infra.loopback_server import ImageServer
from infra.settings import DatasetSpec, DownloadConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.ingest import ingest_shard, plan_ingest
from tasks.score import SCORES_SCHEMA
from tasks.shards import stage_key, write_marker
from tasks.validate import ensure_reference, fallback_key, quarantine_key, result_key, suites_to_run, validate_shard

DATASET = "eng"
SHARDS = 3
VOLATILE = ("seconds", "run_time", "validation_time", "ge_load_time")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, photos) -> LocalStore:
    """Six photos ingested in 3 shards of 2; a scores table per shard, shard 1 with an NSFW score out of range."""
    tmp = tmp_path_factory.mktemp("engine")
    with ImageServer(photos[:6]) as server:
        urls = [server.url(f"/img/{i}/{p.name}") for i, p in enumerate(photos[:6])]
        pq.write_table(pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(6)]}),
                       tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=2, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        plan_ingest(store, DATASET, [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        for shard in range(SHARDS):
            ingest_shard(store.uri, DATASET, shard, cfg)
    for shard in range(SHARDS):
        raw = store.get_parquet(stage_key(DATASET, "ingest", shard, "parquet")).to_pylist()
        rows = [{**dict.fromkeys(SCORES_SCHEMA.names), "key": r["key"], "status": "ok", "clip_alt": 0.3,
                 "nsfw": 1.5 if shard == 1 and i == 0 else 0.02, "lang_alt": "en", "lang_alt_prob": 0.9,
                 "provenance": [("nsfw", "opennsfw")]} for i, r in enumerate(raw)]
        store.put_parquet(stage_key(DATASET, "score", shard, "parquet"), pa.Table.from_pylist(rows, SCORES_SCHEMA))
        write_marker(store, DATASET, "score", shard, {"shard": shard, "samples": len(rows), "config_hash": "test"})
    return store


def _stable(value):
    """A stored result without what differs from run to run (timings, run times, load times)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _written(store: LocalStore, suite: str, shard: int) -> tuple:
    files = [store.get_parquet(k).to_pylist() if store.exists(k) else None
             for k in (quarantine_key(DATASET, suite, shard), fallback_key(DATASET, suite, shard))]
    return _stable(store.get_json(result_key(DATASET, suite, shard))), *files


def test_many_shards_share_one_context_and_one_suite_each(sharded, tmp_path):
    spec = DatasetSpec(name=DATASET)
    suites, _ = suites_to_run(sharded, DATASET, spec.validation)
    assert suites == ["ingest", "score"]
    alone, together = (LocalStore(shutil.copytree(sharded.root, tmp_path / name)) for name in ("alone", "together"))

    # One by one: every shard in a fresh engine, as if each ran in a process of its own.
    for suite in suites:
        for shard in range(SHARDS):
            engine.cache_clear()
            gx_suite.cache_clear()
            reference = ensure_reference(alone, DATASET, spec.validation) if suite == "score" else None
            validate_shard(alone.uri, DATASET, suite, shard, spec, reference)
            assert engine.cache_info().misses == 1 and gx_suite.cache_info().misses == 1

    # Together in one process: one context, one suite per stage output (its shards have equal row counts).
    engine.cache_clear()
    gx_suite.cache_clear()
    reference = ensure_reference(together, DATASET, spec.validation)
    results = {(suite, shard): validate_shard(together.uri, DATASET, suite, shard, spec,
                                              reference if suite == "score" else None)
               for suite in suites for shard in range(SHARDS)}
    assert engine.cache_info().misses == 1 and engine.cache_info().hits == len(results) - 1
    assert gx_suite.cache_info().misses == len(suites) and gx_suite.cache_info().hits == len(results) - len(suites)
    assert [k for k, r in results.items() if not r["success"]] == [("score", 1)]
    assert results[("score", 1)]["counts"]["quarantined"] == 1

    for suite in suites:
        for shard in range(SHARDS):
            assert _written(together, suite, shard) == _written(alone, suite, shard), (suite, shard)
    assert together.get_parquet(quarantine_key(DATASET, "score", 1)).num_rows == 1


def test_a_cached_suite_still_checks_each_shard_and_a_new_spec_builds_its_own(sharded, tmp_path):
    store = LocalStore(shutil.copytree(sharded.root, tmp_path / "store"))
    key = stage_key(DATASET, "ingest", 2, "parquet")
    store.put_parquet(key, store.get_parquet(key).slice(1))  # one row short of its input manifest
    gx_suite.cache_clear()
    results = [validate_shard(store.uri, DATASET, "ingest", shard, DatasetSpec(name=DATASET))
               for shard in range(SHARDS)]
    assert gx_suite.cache_info().misses == 1
    assert [r["success"] for r in results] == [True, True, False]
    assert {f["expectation"] for f in results[2]["failed"]} == {"expect_table_row_count_to_equal"}
    # A limit of the spec changes the suite: shards validated under it get a suite of their own.
    strict = DatasetSpec(name=DATASET, validation={"alt_text_max_chars": 5})
    result = validate_shard(store.uri, DATASET, "ingest", 0, strict)
    assert gx_suite.cache_info().misses == 2
    assert {f["expectation"] for f in result["failed"]} == {"expect_column_value_lengths_to_be_between"}
