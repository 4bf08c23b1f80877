"""The translate flow end to end on a LocalCluster: COCO photos crawled from a loopback server and ingested with a
human caption as alt-text, then the alt-text translated en->pt by the real Bergamot model, with QE per row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.loopback_server import ImageServer
from infra.settings import DatasetSpec, DownloadConfig, IngestConfig, InputSpec, TranslateConfig
from infra.store import LocalStore
from tasks.ingest import ingest_shard, plan_ingest
from tasks.shards import stage_key

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"


@pytest.fixture(scope="module")
def coco_dataset(photos, tmp_path_factory):
    """5 COCO photos ingested with their first human caption as alt-text, plus a URL that fails to ingest."""
    tmp = tmp_path_factory.mktemp("translate")
    captions = {Path(c["file"]).name: c for c in map(json.loads, (PHOTOS / "captions.jsonl").open())}
    chosen = [p for p in photos if p.name in captions][:5]
    with ImageServer({p.name: p.read_bytes() for p in chosen}) as server:
        urls = [server.url(f"/img/{i}/{p.name}") for i, p in enumerate(chosen)]
        alts = [captions[p.name]["captions"][0].strip() for p in chosen]
        urls.append(server.url("/fault/not-found-image.jpg"))
        alts.append("a photo that never arrives")
        pq.write_table(pa.table({"url": urls, "caption": alts}), tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=100, download=DownloadConfig(allow_cidrs=("127.0.0.1/32",), retries=0))
        plan_ingest(store, "coco", [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        ingest_shard(store.uri, "coco", 0, cfg)
    return store, alts[:5]


@pytest.mark.slow
def test_translate_flow_alt_text_en_pt_on_a_local_cluster(coco_dataset):
    from flows.stage import run_stage

    store, alts = coco_dataset
    cfg = TranslateConfig(fields=("alt_text",), languages=("por_Latn",))
    spec = DatasetSpec(name="coco", store=store.uri, translate=cfg)
    result = run_stage("translate", spec, workers=1)
    assert result["shards_run"] == [0] and result["shards_failed"] == []
    assert sum(result["counts"].values()) == 5 and result["languages"] == {"pt": 5}  # not the failed download
    assert result["provenance"]["translator pt"].startswith("bergamot (bergamot:") and result["cache_hits"] == 0
    rows = store.get_parquet(stage_key("coco", "translate", 0, "parquet")).to_pylist()
    assert sorted(r["source_text"] for r in rows) == sorted(alts)
    for r in rows:
        assert r["field"] == "alt_text" and r["lang"] == "pt" and r["text"] and r["text"] != r["source_text"]
        assert r["status"] == ("ok" if r["qe_passed"] else "flagged")
        assert (r["status"] == "ok") == (not r["qe_reasons"])
    # Human COCO captions translate cleanly: at least 4 of 5 pass QE (all 5 did here).
    assert result["counts"].get("ok", 0) >= 4

    again = run_stage("translate", spec, workers=1)
    assert again["shards_run"] == [] and again["shards_already_done"] == [0]


def test_cli_translate_of_a_never_fused_dataset_names_the_fuse_command(coco_dataset):
    store, _ = coco_dataset
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "translate", "--dataset", "coco", "--store", store.uri,
                           "--languages", "pt"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "capfactory fuse --dataset coco" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "translate", "--dataset", "coco", "--store", store.uri,
                           "--languages", "pt,de", "--fields", "alt_text", "--backend", "bergamot"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot translate en->de" in proc.stderr
