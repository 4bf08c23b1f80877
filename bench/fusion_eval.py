"""Fusion quality on COCO: does the fused caption mention more of the annotated objects than the alt-text, and
how many objects does it assert that are not in the image?

The annotated COCO photos of ../shared/data/photos are ingested from a loopback server with one human caption as
the alt-text, the experts run (OCR, YOLOX objects + attributes), then the fuse stage (default: SmolLM2-135M
in-process). Per caption: COCO classes mentioned (object concepts in the text that are among the image's COCO
annotations), hallucinated objects (concepts mentioned that are not annotated), and the guard verdicts. The raw
LLM outputs are measured as well as the captions the stage keeps (guard-passed, else alt-text).

Run:  .venv/bin/python bench/fusion_eval.py [--images 40] [--out bench/results/fusion_eval.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
PHOTOS = SHARED / "data" / "photos"

from infra.loopback_server import ImageServer  # noqa: E402
from infra.settings import DownloadConfig, ExtractConfig, FuseConfig, IngestConfig, InputSpec  # noqa: E402
from infra.store import LocalStore  # noqa: E402
from tasks.extract import ExtractStage  # noqa: E402
from tasks.fuse import FuseStage  # noqa: E402
from tasks.grounding import mentioned_concepts  # noqa: E402
from tasks.ingest import ingest_shard, plan_ingest  # noqa: E402
from tasks.shards import stage_key  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fusion_eval.json")
    args = parser.parse_args(argv)
    objects = {json.loads(x)["file"]: json.loads(x) for x in (PHOTOS / "objects.jsonl").read_text().splitlines()}
    captions = [json.loads(x) for x in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    chosen = [c for c in captions if c["file"] in objects][: args.images]
    gt = {Path(c["file"]).name: {o["label"] for o in objects[c["file"]]["objects"] if not o["iscrowd"]}
          for c in chosen}
    with tempfile.TemporaryDirectory() as tmp, ImageServer([PHOTOS / c["file"] for c in chosen]) as server:
        names = [Path(c["file"]).name for c in chosen]
        urls = [server.url(f"/img/{i}/{n}") for i, n in enumerate(names)]
        pq.write_table(pa.table({"url": urls, "caption": [c["captions"][0].strip() for c in chosen],
                                 "file": names}), Path(tmp) / "u.parquet")
        store = LocalStore(Path(tmp) / "store")
        icfg = IngestConfig(shard_size=10_000, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",)))
        plan_ingest(store, "eval", [InputSpec(path=str(Path(tmp) / "u.parquet"))], icfg)
        ingest_shard(store.uri, "eval", 0, icfg)
        ExtractStage(ExtractConfig(), str(SHARED / "models")).run_shard(store.uri, "eval", 0)
        cfg = FuseConfig()
        started = time.time()
        stats = FuseStage(cfg).run_shard(store.uri, "eval", 0)
        seconds = time.time() - started
        fused = store.get_parquet(stage_key("eval", "fuse", 0, "parquet")).to_pylist()
        files = store.get_parquet(stage_key("eval", "ingest", 0, "parquet"), columns=["key", "file"]).to_pylist()
    file_of = {r["key"]: r["file"] for r in files}

    def measure(texts: dict[str, str | None]) -> dict:
        hits, halluc, mentions = [], [], []
        for key, text in texts.items():
            truth = gt[file_of[key]]
            concepts = mentioned_concepts(text or "")
            hits.append(len(concepts & truth))
            halluc.append(len(concepts - truth))
            mentions.append(len(concepts))
        total = sum(mentions)
        return {"coco_classes_mentioned_mean": statistics.mean(hits),
                "objects_asserted_mean": statistics.mean(mentions),
                "not_annotated_rate": (sum(halluc) / total) if total else 0.0, "n": len(texts)}

    ok = [r for r in fused if r["status"] == "ok"]
    rows = {
        "alt-text (human caption)": measure({r["key"]: r["alt_text"] for r in ok}),
        "LLM short, raw": measure({r["key"]: r["fused_short"] for r in ok}),
        "LLM dense, raw": measure({r["key"]: r["fused_dense"] for r in ok}),
        "kept short (guards)": measure({r["key"]: r["caption_short"] for r in ok}),
        "kept dense (guards)": measure({r["key"]: r["caption_dense"] for r in ok}),
    }
    passed = {o: sum(1 for r in ok if r[f"{o}_passed"]) / len(ok) for o in cfg.outputs}
    reasons: dict[str, int] = {}
    for r in ok:
        for o in cfg.outputs:
            for reason in r[f"{o}_reasons"] or []:
                kind = reason.split(":", 1)[0]
                reasons[kind] = reasons.get(kind, 0) + 1
    print(f"\n{len(ok)} COCO photos, alt-text = first human caption; LLM {stats['provenance']['llm']}; "
          f"{seconds:.0f} s for {stats['llm_calls']} completions ({stats['llm_calls'] / seconds:.2f}/s)")
    print(f"{'captions':28} {'COCO classes mentioned':>23} {'objects asserted':>17} {'not annotated':>14}")
    for name, m in rows.items():
        print(f"{name:28} {m['coco_classes_mentioned_mean']:23.2f} {m['objects_asserted_mean']:17.2f} "
              f"{m['not_annotated_rate']:14.1%}")
    print(f"guard pass rate: {', '.join(f'{o} {p:.0%}' for o, p in passed.items())}; rejection reasons: {reasons}")
    examples = [{k: r[k] for k in ("alt_text", "fused_short", "short_reasons", "fused_dense", "dense_reasons")}
                for r in ok[:8]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "passed": passed, "reasons": reasons, "stats": stats,
                                    "seconds": seconds, "examples": examples}, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
