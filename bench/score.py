"""Scoring cost and filter drops on the shared COCO photos (../shared/data/photos), in one process.

- NSFW (open_nsfw ONNX, 1 onnxruntime thread, batch 16) and CLIP image embeddings (a tiny open_clip model with
  random weights, built here: no CLIP weights exist on these machines, so only the plumbing's cost is measured;
  ViT-B/32 costs far more) in ms per image, best of `--repeats` after one warm-up pass.
- The photos ingested from a loopback server with their first human caption as alt-text (plus a repeated photo),
  scored (NSFW + language; CLIP off, the cpu default), and the rows each filter drops (DataComp basic, min size
  200, max aspect 3, English only, NSFW <= 0.5, ingest duplicates). CLIP thresholds need real CLIP weights.

Run:  .venv/bin/python bench/score.py [--repeats 3] [--out bench/results/score.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = REPO.parent / "shared" / "data" / "photos"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def best_ms(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best / n * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "score.json")
    args = parser.parse_args()

    from infra.loopback_server import ImageServer
    from infra.models import load_backend
    from infra.settings import DownloadConfig, IngestConfig, InputSpec, ScoreConfig
    from infra.store import LocalStore
    from tasks.filters import apply_filters
    from tasks.ingest import dedup_dataset, ingest_shard, plan_ingest
    from tasks.score import ScoreStage
    from tasks.shards import stage_key

    captions = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    images = [Image.open(PHOTOS / c["file"]).convert("RGB") for c in captions]
    nsfw = load_backend("nsfw", "open_nsfw", batch_size=16)
    results = {"photos": len(images), "nsfw_ms_per_image": best_ms(lambda: nsfw.score(images), len(images),
                                                                    args.repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        import open_clip
        import torch

        folder = Path(tmp) / "tiny"
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
        torch.save(open_clip.create_model(f"local-dir:{folder}", pretrained=None).state_dict(),
                   folder / "open_clip_pytorch_model.bin")
        clip = load_backend("clip", "open_clip", model=f"local-dir:{folder}", pretrained=None, batch_size=16)
        results["clip_tiny_ms_per_image"] = best_ms(lambda: clip.image_embeddings(images), len(images), args.repeats)

        files = {Path(c["file"]).name: (PHOTOS / c["file"]).read_bytes() for c in captions}
        files["repeat.jpg"] = files[Path(captions[0]["file"]).name]
        alts = [c["captions"][0].strip() for c in captions] + [captions[0]["captions"][1].strip()]
        store = LocalStore(Path(tmp) / "store")
        with ImageServer(files) as server:
            urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(files)]
            pq.write_table(pa.table({"url": urls, "caption": alts}), Path(tmp) / "urls.parquet")
            cfg = IngestConfig(shard_size=1000, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
            plan_ingest(store, "coco", [InputSpec(path=str(Path(tmp) / "urls.parquet"))], cfg)
            ingest_shard(store.uri, "coco", 0, cfg)
            dedup_dataset(store, "coco", cfg.phash_threshold)
        start = time.perf_counter()
        stats = ScoreStage(ScoreConfig()).run_shard(store.uri, "coco", 0)
        results["score_shard_seconds"] = round(time.perf_counter() - start, 2)
        raw = store.get_parquet(stage_key("coco", "ingest", 0, "parquet"))
        scores = store.get_parquet(stage_key("coco", "score", 0, "parquet"),
                                   columns=["key", "nsfw", "lang_alt", "lang_alt_prob"])
        joined = raw.join(scores, "key")
        filters = {"datacomp_basic": True, "min_size": 200, "max_aspect": 3.0, "languages": ["en"], "nsfw_max": 0.5}
        _, counts = apply_filters(joined, ScoreConfig(filters=filters))
        results.update(samples=stats["samples"], counts=stats["counts"], filters=filters, dropped=counts)
    print(json.dumps(results, indent=1))
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
