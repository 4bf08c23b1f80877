"""The vision experts stage end to end: ingest real photos and scene-text images from a loopback server, then run
the `extract` flow on a Dask LocalCluster with the real cpu-profile models (RapidOCR, YOLOX-Nano)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.loopback_server import ImageServer
from infra.models import ModelUnavailable
from infra.settings import DatasetSpec, DownloadConfig, ExtractConfig, ImageConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.extract import ExtractStage, plan_experts
from tasks.ingest import dedup_dataset, ingest_shard, plan_ingest
from tasks.shards import stage_key

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = str(SHARED / "models")
PHOTOS = SHARED / "data" / "photos" / "images"
TEXT = SHARED / "data" / "text_images" / "icdar2015_test"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[LocalStore, dict[str, str]]:
    """A dataset of 2 shards: people photos, scene text, odd images, and a URL that fails to ingest."""
    tmp = tmp_path_factory.mktemp("experts")
    images = {
        "people.jpg": (PHOTOS / "000000214753.jpg").read_bytes(),  # COCO: 2 horses, 2 people
        "people-again.jpg": (PHOTOS / "000000214753.jpg").read_bytes(),  # the same photo, same shard
        "bed.jpg": (PHOTOS / "000000536038.jpg").read_bytes(),  # COCO: bed, book, 2 people
        "sale.jpg": (TEXT / "img_122.jpg").read_bytes(),  # SALE FURTHER REDUCTIONS ...
        "sushi.jpg": (TEXT / "img_140.jpg").read_bytes(),
        "grey.png": _png(Image.open(PHOTOS / "000000214753.jpg").convert("L")),
        "tiny.png": _png(Image.new("RGBA", (1, 1), (255, 0, 0, 128))),
        "panorama.png": _png(Image.new("RGB", (12000, 300), (30, 90, 200))),
        "blank.png": _png(Image.new("RGB", (300, 300), (255, 255, 255))),
    }
    with ImageServer(images) as server:
        urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(images)]
        urls.append(server.url("/fault/truncated.jpg"))
        pq.write_table(pa.table({"url": urls, "caption": [f"alt {i}" for i in range(len(urls))]}),
                       tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=5, images=ImageConfig(image_size=720, resize_mode="keep_ratio_largest"),
                           download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        plan = plan_ingest(store, "exp", [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        for shard in plan.todo:
            ingest_shard(store.uri, "exp", shard, cfg)
        dedup_dataset(store, "exp", cfg.phash_threshold)
    raw = pa.concat_tables([store.get_parquet(stage_key("exp", "ingest", s, "parquet")) for s in (0, 1)])
    keys = {u.rsplit("/", 1)[-1]: k for u, k in zip(raw.column("url").to_pylist(), raw.column("key").to_pylist(),
                                                    strict=True)}
    return store, keys


@pytest.mark.slow
def test_extract_flow_runs_every_expert_and_records_every_sample(ingested):
    from flows.stage import run_stage

    store, keys = ingested
    result = run_stage("extract", DatasetSpec(name="exp", store=store.uri, extract=ExtractConfig(batch_size=3)),
                       models_dir=MODELS, workers=2)
    assert sorted(result["shards_run"]) == [0, 1]
    table = pa.concat_tables([store.get_parquet(stage_key("exp", "extract", s, "parquet")) for s in (0, 1)])
    rows = {r["key"]: r for r in table.to_pylist()}
    assert len(rows) == 10
    assert rows[keys["truncated.jpg"]]["status"] == "skipped"
    assert all(rows[keys[n]]["status"] == "ok" for n in keys if n != "truncated.jpg")

    people = rows[keys["people.jpg"]]
    # The repeated photo shares the first one's result: the models saw 8 distinct images for 9 good samples.
    assert {**rows[keys["people-again.jpg"]], "key": None} == {**people, "key": None}
    shard_stats = [store.get_json(stage_key("exp", "extract", s, "stats.json")) for s in (0, 1)]
    assert sum(s["images_run"] for s in shard_stats) == 8
    labels = [o["label"] for o in people["objects"]]
    assert "person" in labels and "horse" in labels
    assert dict(people["object_counts"])["person"] == labels.count("person")
    obj = people["objects"][0]
    assert obj["color"] and obj["size"] in {"small", "medium", "large"} and obj["position"]
    sale = rows[keys["sale.jpg"]]
    assert "SALE" in sale["ocr_text"].upper() and sale["ocr"][0]["box"] and len(sale["ocr"][0]["box"]) == 4
    for name in ("tiny.png", "panorama.png", "blank.png"):
        assert rows[keys[name]]["ocr_text"] == "" and rows[keys[name]]["objects"] == [], name
    prov = dict(people["provenance"])
    assert prov["ocr"].startswith("rapidocr") and "yolox" in prov["detector"]
    assert prov["config_hash"] == ExtractConfig(batch_size=3).config_hash()
    assert result["with_text"] >= 2

    # A re-run skips finished shards; a changed expert config recomputes them.
    assert ExtractStage(ExtractConfig(), MODELS).status(store, "exp")[0] == []
    stricter = ExtractConfig(ocr={"min_score": 0.9})
    assert ExtractStage(stricter, MODELS).status(store, "exp")[0] == [0, 1]


def test_plan_refuses_what_cannot_run_with_clear_errors(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"captioner.*cpu profile has no default captioner"):
        plan_experts(ExtractConfig(experts=("caption",)), MODELS)
    # a detector named explicitly is never replaced (left to the profile, YOLOv3-tiny stands in: test_darknet.py)
    with pytest.raises(ModelUnavailable, match=r"no model file at .*yolox_nano.onnx.*CAPFACTORY_MODELS_DIR"):
        plan_experts(ExtractConfig(experts=("objects",), detector={"backend": "yolox-onnx"}), str(tmp_path))
    with pytest.raises(ModelUnavailable, match="endpoint"):
        plan_experts(ExtractConfig(experts=("caption",), captioner={"backend": "openai"}), MODELS)
    with pytest.raises(ModelUnavailable, match="no such backend"):
        plan_experts(ExtractConfig(ocr={"backend": "nope"}), MODELS)
    plan = plan_experts(ExtractConfig(experts=("ocr",)), str(tmp_path))  # OCR needs no models folder
    assert plan["ocr"][0] == "rapidocr" and "detector" not in plan and "captioner" not in plan


def test_cli_extract_without_captioner_model_exits_with_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "extract", "--dataset", "x", "--store", str(tmp_path),
                           "--experts", "ocr,caption", "--models-dir", MODELS], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "captioner" in proc.stderr and "cpu profile" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "extract", "--dataset", "x", "--store", str(tmp_path),
                          "--experts", "ocr,smell"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "extract.experts: unknown expert(s) smell" in bad.stderr

