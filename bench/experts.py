"""Vision experts throughput: images/s per expert and for the whole stage, in one process vs through the flow.

- direct: each expert's backend called in this process on decoded images, in batches (model load time reported
  separately), and the whole stage's per-shard function (`ExtractStage.run_shard`) on the same shards;
- flow: `run_stage("extract", ...)` on a 2-worker Dask LocalCluster with a temporary Prefect server (whole call,
  start-up included, and the sum of the shards' own seconds), so the orchestration overhead is visible.
Data: the COCO photos of ../shared/data/photos, ingested first (at 640 px, keep_ratio_largest) from a loopback
server. Prints a table and writes JSON (default bench/results/experts.json).

With `--ocr-gates 0,640` it instead compares the whole stage (`ExtractStage.run_shard`, default experts, one process)
under each `ocr.gate_side` (0 = no text gate), the settings' passes alternating (A B A B, `--rounds`), reporting
images/s (wall), CPU s/image (this process) and the images with text; default out bench/results/ocr_gate_extract.json.

Run:  .venv/bin/python bench/experts.py [--images 120] [--shard-size 30] [--out bench/results/experts.json]
      .venv/bin/python bench/experts.py --ocr-gates 0,640 [--images 76] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from infra.loopback_server import ImageServer  # noqa: E402
from infra.models import load_backend  # noqa: E402
from infra.settings import (  # noqa: E402
    DatasetSpec,
    DownloadConfig,
    ExtractConfig,
    ImageConfig,
    IngestConfig,
    InputSpec,
    OCRConfig,
)
from infra.store import LocalStore  # noqa: E402
from tasks.extract import ExtractStage, plan_experts  # noqa: E402
from tasks.ingest import ingest_shard, plan_ingest  # noqa: E402
from tasks.shards import read_shard_images  # noqa: E402


def ingest_photos(store: LocalStore, n: int, shard_size: int) -> list[int]:
    photos = sorted((SHARED / "data" / "photos" / "images").glob("*.jpg"))
    with ImageServer(photos) as server, tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table({"url": server.image_urls(n)}), Path(tmp) / "u.parquet")
        cfg = IngestConfig(shard_size=shard_size, images=ImageConfig(image_size=640, resize_mode="keep_ratio_largest"),
                           download=DownloadConfig(allow_cidrs=("127.0.0.0/8",)))
        plan = plan_ingest(store, "bench", [InputSpec(path=str(Path(tmp) / "u.parquet"))], cfg)
        for shard in plan.todo:
            ingest_shard(store.uri, "bench", shard, cfg)
    return plan.todo


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def direct_per_expert(images: list[Image.Image], cfg: ExtractConfig, models: str) -> list[dict]:
    from tasks.attributes import object_attributes

    plan = plan_experts(cfg, models)
    rows = []
    load_ocr, ocr = timed(lambda: load_backend("ocr", plan["ocr"][0], **plan["ocr"][1]))
    load_det, det = timed(lambda: load_backend("detector", plan["detector"][0], **plan["detector"][1]))
    batches = [images[i:i + cfg.batch_size] for i in range(0, len(images), cfg.batch_size)]
    seconds, _ = timed(lambda: [ocr.read(b) for b in batches])
    rows.append({"what": "ocr (rapidocr)", "mode": "direct", "images": len(images), "seconds": seconds,
                 "load_s": load_ocr})
    seconds, dets = timed(lambda: [d for b in batches for d in det.detect(b)])
    rows.append({"what": "objects (yolox-nano)", "mode": "direct", "images": len(images), "seconds": seconds,
                 "load_s": load_det})
    seconds, _ = timed(lambda: [object_attributes(im, d) for im, d in zip(images, dets, strict=True)])
    rows.append({"what": "attributes (colour/size/position)", "mode": "direct", "images": len(images),
                 "seconds": seconds, "load_s": 0.0})
    return rows


def compare_ocr_gates(store: LocalStore, shards: list[int], gates: list[int], rounds: int, models: str) -> list[dict]:
    """The whole stage per gate setting, passes alternating; each pass recomputes (its done markers removed)."""
    stages = {g: ExtractStage(ExtractConfig(ocr=OCRConfig(gate_side=g)), models) for g in gates}
    passes: dict[int, list[tuple[float, float, int, int]]] = {g: [] for g in gates}
    for _ in range(rounds):
        for g, stage in stages.items():
            for s in shards:
                store.delete(f"bench/extract/shard-{s:05d}.stats.json")
            t0, c0 = time.perf_counter(), time.process_time()
            stats = [stage.run_shard(store.uri, "bench", s) for s in shards]
            passes[g].append((time.perf_counter() - t0, time.process_time() - c0,
                              sum(st["images_run"] for st in stats), sum(st["with_text"] for st in stats)))
    rows = []
    for g, runs in passes.items():
        walls, cpus = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
        images, with_text = runs[-1][2], runs[-1][3]
        rows.append({"gate_side": g, "images": images, "with_text": with_text, "pass_wall_s": walls,
                     "pass_cpu_s": cpus, "images_per_s": images / statistics.median(walls),
                     "cpu_s_per_image": statistics.median(cpus) / images})
        print(f"gate_side={g:<5} images {images:4d}  with text {with_text:3d}  images/s {rows[-1]['images_per_s']:6.2f}"
              f"  cpu s/image {rows[-1]['cpu_s_per_image']:.3f}  (passes wall {walls}, cpu {cpus})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--shard-size", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ocr-gates", default="", help="comma-separated ocr.gate_side values to compare (see above)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating passes per setting with --ocr-gates")
    args = parser.parse_args(argv)
    models = str(SHARED / "models")
    if args.ocr_gates:
        out = args.out or ROOT / "bench" / "results" / "ocr_gate_extract.json"
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalStore(Path(tmp) / "store")
            shards = ingest_photos(store, args.images, args.shard_size)
            rows = compare_ocr_gates(store, shards, [int(g) for g in args.ocr_gates.split(",")], args.rounds, models)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "experts --ocr-gates", "rounds": args.rounds, "rows": rows}, indent=1))
        print(f"wrote {out}")
        return 0
    args.out = args.out or ROOT / "bench" / "results" / "experts.json"
    cfg = ExtractConfig()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        shards = ingest_photos(store, args.images, args.shard_size)
        images = [Image.open(io.BytesIO(b)).convert("RGB") for s in shards
                  for b in read_shard_images(store, "bench", s).values()]
        rows += direct_per_expert(images, cfg, models)
        stage = ExtractStage(cfg, models)
        seconds, _ = timed(lambda: [stage.run_shard(store.uri, "bench", s) for s in shards])
        rows.append({"what": "whole stage (ExtractStage.run_shard)", "mode": "direct, 1 process", "images": len(images),
                     "seconds": seconds, "load_s": 0.0})
        for s in shards:  # force the flow to recompute
            store.delete(f"bench/extract/shard-{s:05d}.stats.json")
        from flows.stage import run_stage

        spec = DatasetSpec(name="bench", store=store.uri, extract=cfg)
        seconds, result = timed(lambda: run_stage("extract", spec, models_dir=models, workers=2))
        shard_seconds = sum(store.get_json(f"bench/extract/shard-{s:05d}.stats.json")["seconds"] for s in shards)
        rows.append({"what": "whole stage (extract flow)", "mode": "flow, 2 workers, whole call",
                     "images": len(images), "seconds": seconds, "load_s": 0.0})
        rows.append({"what": "whole stage (extract flow)", "mode": "flow, sum of shard task seconds",
                     "images": len(images), "seconds": shard_seconds, "load_s": 0.0})
    print(f"\n{'expert':36} {'mode':34} {'images':>6} {'seconds':>8} {'images/s':>9} {'load s':>7}")
    for r in rows:
        r["images_per_s"] = r["images"] / r["seconds"] if r["seconds"] else None
        print(f"{r['what']:36} {r['mode']:34} {r['images']:6d} {r['seconds']:8.2f} {r['images_per_s']:9.1f} "
              f"{r['load_s']:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "config": cfg.model_dump(mode="json"),
                                    "provenance": result.get("provenance")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
