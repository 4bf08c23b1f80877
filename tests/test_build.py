"""The `build` parent flow and incremental refresh: real Prefect flow runs on a 2-worker LocalCluster, a real
loopback crawl, the real cpu-profile models. Work done is counted from each stage's summary and the server's hits."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.build import selected_stages
from flows.preflight import make_stage, needs_gpu
from infra.loopback_server import ImageServer
from infra.settings import SpecError, build_spec
from infra.store import LocalStore
from tasks.shards import read_marker

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "photos"
MODELS = SHARED / "models"


def test_stages_run_in_pipeline_order_and_unknown_ones_are_refused():
    spec = build_spec({"name": "x"})
    assert selected_stages(spec, ["publish", "ingest"]) == ("ingest", "publish")
    assert selected_stages(spec, None)[0] == "ingest"
    with pytest.raises(SpecError, match=r"unknown stage.*embed"):
        selected_stages(spec, ["ingest", "embed"])
    with pytest.raises(SpecError, match="stages"):
        build_spec({"name": "x", "stages": ["ingest", "embed"]})


def test_gpu_workers_are_asked_for_only_by_gpu_profile_stages():
    spec = build_spec({"name": "x", "extract": {"profile": "gpu"}})
    assert needs_gpu([make_stage(s, spec) for s in ("ingest", "extract")])
    assert not needs_gpu([make_stage(s, spec) for s in ("ingest", "fuse")])


@pytest.fixture(scope="module")
def photo_server():
    captions = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    chosen = [c for c in captions if c["has_objects"]][:8]
    images = {Path(c["file"]).name: (PHOTOS / c["file"]).read_bytes() for c in chosen}
    with ImageServer(images) as server:
        server.pairs = [(server.url(f"/img/{i}/{name}"), c["captions"][0].strip())
                        for i, (name, c) in enumerate(zip(images, chosen, strict=True))]
        yield server


def _write_urls(path: Path, pairs: list[tuple[str, str]]) -> None:
    pq.write_table(pa.table({"url": [u for u, _ in pairs], "caption": [c for _, c in pairs]}), path)


def _spec(tmp_path: Path, **fuse) -> dict:
    return {
        "name": "refresh", "store": str(tmp_path / "store"),
        "inputs": [{"path": str(tmp_path / "urls.parquet")}],
        "ingest": {"shard_size": 4, "download": {"allow_cidrs": ["127.0.0.0/8"], "retries": 0}},
        "extract": {"experts": ["objects"]},
        "fuse": {"outputs": ["short"], **fuse},
        "translate": {"languages": ["pt"]},
    }


@pytest.mark.slow
def test_refresh_processes_only_new_samples_and_a_changed_stage_recomputes_itself_and_later(
        tmp_path, photo_server, monkeypatch):
    from flows.build import run_build

    monkeypatch.setenv("CAPFACTORY_MODELS_DIR", str(MODELS))
    store = LocalStore(tmp_path / "store")
    _write_urls(tmp_path / "urls.parquet", photo_server.pairs[:4])

    first = run_build(_spec(tmp_path), workers=2)
    assert first["stages"]["ingest"]["counts"] == {"ok": 4}
    assert first["stages"]["extract"]["shards_run"] == [0]
    assert first["stages"]["fuse"]["shards_run"] == [0] and first["stages"]["fuse"]["llm_calls"] == 4
    assert first["stages"]["translate"]["shards_run"] == [0]
    assert first["stages"]["score"]["shards_run"] == [0]
    assert first["stages"]["report"]["samples"] == 4
    fetched = photo_server.hits.copy()

    # The input grew by four URLs: one new shard, and only it goes through every stage.
    _write_urls(tmp_path / "urls.parquet", photo_server.pairs)
    second = run_build(_spec(tmp_path), workers=2)
    assert second["stages"]["ingest"]["new_samples"] == 4 and second["stages"]["ingest"]["known_samples"] == 4
    new_fetches = {path for path, n in (photo_server.hits - fetched).items() if path.startswith("/img/")}
    assert new_fetches == {urlsplit(u).path for u, _ in photo_server.pairs[4:]}  # old URLs not fetched again
    assert second["stages"]["extract"]["shards_run"] == [1]
    assert second["stages"]["extract"]["shards_already_done"] == [0]
    assert second["stages"]["fuse"]["shards_run"] == [1] and second["stages"]["fuse"]["llm_calls"] == 4
    assert second["stages"]["translate"]["shards_run"] == [1]
    assert second["stages"]["score"]["shards_run"] == [1]
    assert second["stages"]["validate"]["validated"]["ingest"] == [1]
    assert second["stages"]["report"]["samples"] == 8

    # A changed fusion setting recomputes fusion (every shard) and nothing before it.
    third = run_build(_spec(tmp_path, max_tokens_short=40), workers=2)
    assert third["stages"]["ingest"]["new_samples"] == 0
    assert third["stages"]["extract"]["shards_run"] == []
    assert third["stages"]["fuse"]["shards_run"] == [0, 1] and third["stages"]["fuse"]["llm_calls"] == 8
    # ... and every stage after it (their input fingerprints changed).
    assert third["stages"]["translate"]["shards_run"] == [0, 1]
    assert third["stages"]["score"]["shards_run"] == [0, 1]
    assert third["stages"]["validate"]["validated"]["ingest"] == []

    # Provenance: each shard's marker names the flow run that made it.
    runs = {stage: [read_marker(store, "refresh", stage, s)["flow_run_id"] for s in (0, 1)]
            for stage in ("ingest", "extract", "fuse")}
    assert all(r for ids in runs.values() for r in ids)
    assert runs["ingest"][0] != runs["ingest"][1] and runs["extract"][0] != runs["extract"][1]
    assert runs["fuse"][0] == runs["fuse"][1] != runs["extract"][1]
    published = store.get_parquet("refresh/publish/samples.parquet").to_pylist()
    assert len(published) == 8
    for row in published:
        prov = {p["key"]: p["value"] for p in row["provenance"]}  # a list of pairs: HF datasets has no maps
        shard = row["raw_shard"]
        assert prov["ingest.flow_run_id"] == runs["ingest"][shard] and prov["fuse.flow_run_id"] == runs["fuse"][shard]


@pytest.mark.slow
def test_refresh_of_a_grown_folder_ingests_and_extracts_only_the_new_files(tmp_path, photos, monkeypatch):
    import shutil

    from flows.build import run_build

    monkeypatch.setenv("CAPFACTORY_MODELS_DIR", str(MODELS))
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:3]:
        shutil.copy(p, folder / p.name)
    spec = {"name": "folder", "store": str(tmp_path / "store"), "inputs": [{"path": str(folder)}],
            "ingest": {"shard_size": 3}, "extract": {"experts": ["objects"]}, "stages": ["ingest", "extract"]}
    first = run_build(spec, workers=2)
    assert first["stages"]["ingest"]["counts"] == {"ok": 3}
    for p in photos[3:5]:
        shutil.copy(p, folder / p.name)
    second = run_build(spec, workers=2)
    assert second["stages"]["ingest"]["new_samples"] == 2 and second["stages"]["ingest"]["known_samples"] == 3
    assert second["stages"]["extract"]["shards_run"] == [1]
    assert second["stages"]["extract"]["shards_already_done"] == [0]
