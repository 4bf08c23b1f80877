"""Fusion quality on annotated COCO photos: is the published caption richer than the alt-text, and never less true?

The annotated photos of a data folder (default ../shared/data/photos: images/, captions.jsonl, objects.jsonl) are
ingested from a loopback server with their first human caption as the alt-text; the experts run at default settings
(OCR, YOLOX objects + attributes when the models folder has the detector); then the fuse stage runs once per
model asked for. Measured per caption set (the alt-text, the LLM's raw short / dense output, the captions the stage
keeps: verified fused caption, else the alt-text), CHAIR-style against the COCO boxes:
- COCO classes mentioned per caption (concepts in the text among the image's annotated classes), and that mean
  relative to the alt-text's;
- unsupported-object rate: object concepts mentioned that are not annotated, over all concepts mentioned;
- person-attribute claims (race, age, gender, religion, health) that no source states, per 100 captions;
- template echo: captions that repeat prompt text, layout tokens or the data block's format;
- the verifier's pass rate per caption kind and the rejection reasons.
It also calibrates the verifier on human captions: a COCO caption checked against its own image's sources (another
human caption as the alt-text, the experts' detections and OCR) and against another image's sources.

Run:  .venv/bin/python bench/fusion_eval.py [DATA_DIR] [--images 40] [--models smollm2-135m,qwen2.5-1.5b]
      [--models-dir ../shared/models] [--work DIR [--reuse]] [--out bench/results/fusion_eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from infra.loopback_server import ImageServer  # noqa: E402
from infra.settings import DownloadConfig, ExtractConfig, FuseConfig, IngestConfig, InputSpec  # noqa: E402
from infra.store import LocalStore  # noqa: E402
from tasks.extract import ExtractStage  # noqa: E402
from tasks.fuse import FuseStage  # noqa: E402
from tasks.grounding import mentioned_concepts  # noqa: E402
from tasks.ingest import ingest_shard, plan_ingest  # noqa: E402
from tasks.shards import stage_key  # noqa: E402
from tasks.verify import Sources, build_support, verify_claims  # noqa: E402

SETS = {"alt-text": "alt_text", "LLM short, raw": "fused_short", "LLM dense, raw": "fused_dense",
        "kept short": "caption_short", "kept dense": "caption_dense"}


def load_data(data: Path, n: int) -> tuple[list[dict], dict[str, set[str]]]:
    objects = {r["file"]: r for r in map(json.loads, (data / "objects.jsonl").read_text().splitlines())}
    captions = [json.loads(x) for x in (data / "captions.jsonl").read_text().splitlines()]
    chosen = [c for c in captions if c["file"] in objects][:n]
    truth = {Path(c["file"]).name: {o["label"] for o in objects[c["file"]]["objects"] if not o["iscrowd"]}
             for c in chosen}
    return chosen, truth


def sources_of(row: dict, extract: dict) -> Sources:
    e = extract.get(row["key"], {})
    return Sources(row["alt_text"], e.get("ocr_text"), e.get("caption_synthetic"), tuple(e.get("objects") or ()))


def measure(texts: dict[str, str | None], truth: dict[str, set[str]], sources: dict[str, Sources]) -> dict:
    hits, halluc, mentions, attrs, echo = [], [], [], 0, 0
    for key, text in texts.items():
        concepts = mentioned_concepts(text or "")
        hits.append(len(concepts & truth[key]))
        halluc.append(len(concepts - truth[key]))
        mentions.append(len(concepts))
        reasons = verify_claims(text or "", sources[key], complete_sentences=False) if text else []
        attrs += any(r.startswith("person_attribute") for r in reasons)
        echo += any(r.startswith("echo") for r in reasons)
    total = sum(mentions)
    return {"coco_classes_mentioned_mean": statistics.mean(hits), "objects_asserted_mean": statistics.mean(mentions),
            "unsupported_object_rate": (sum(halluc) / total) if total else 0.0,
            "person_attribute_claims_per_100": 100 * attrs / len(texts), "template_echo": echo, "n": len(texts)}


def calibrate(chosen: list[dict], file_of: dict[str, str], extract: dict, alt_of: dict[str, str]) -> dict:
    """Human caption 1 vs its own image's sources (caption 0, the alt-text, and the experts' output) and vs the
    sources of the image 7 places further on."""
    keys = sorted(file_of, key=lambda k: file_of[k])
    caps = {Path(c["file"]).name: c["captions"] for c in chosen}
    own, other, reasons_own, reasons_other = 0, 0, Counter(), Counter()
    for i, key in enumerate(keys):
        caption = caps[file_of[key]][1].strip()
        for target, tally, reasons in ((key, "own", reasons_own), (keys[(i + 7) % len(keys)], "other", reasons_other)):
            src = sources_of({"key": target, "alt_text": alt_of[target]}, extract)
            found = verify_claims(caption, src, support=build_support(src), complete_sentences=False)
            reasons.update(r.split(":", 1)[0] for r in found)
            if not found:
                own, other = (own + 1, other) if tally == "own" else (own, other + 1)
    n = len(keys)
    return {"own_pass": own / n, "other_pass": other / n, "n": n, "own_reasons": dict(reasons_own),
            "other_reasons": dict(reasons_other)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path, default=SHARED / "data" / "photos")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--models", default="qwen2.5-1.5b", help="comma-separated fuse.model values")
    parser.add_argument("--models-dir", default=os.environ.get("CAPFACTORY_MODELS_DIR", str(SHARED / "models")))
    parser.add_argument("--prompt-version", default=FuseConfig().prompt_version)
    parser.add_argument("--min-object-score", type=float, default=FuseConfig().min_object_score)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fusion_eval.json")
    parser.add_argument("--work", type=Path, help="keep the store here: ingest + experts are reused by the next run "
                        "and each model's fuse table is kept as fuse-<model>-<min score>.parquet")
    parser.add_argument("--reuse", action="store_true", help="with --work: start each model from its kept fuse "
                        "table, so stored completions are re-verified without LLM calls (same prompts)")
    args = parser.parse_args(argv)
    chosen, truth_by_file = load_data(args.data, args.images)
    results: dict = {"data": str(args.data), "images": len(chosen), "models": {}}
    with tempfile.TemporaryDirectory() as scratch, ImageServer([args.data / c["file"] for c in chosen]) as server:
        tmp = args.work or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        names = [Path(c["file"]).name for c in chosen]
        pq.write_table(pa.table({"url": [server.url(f"/img/{i}/{n}") for i, n in enumerate(names)],
                                 "caption": [c["captions"][0].strip() for c in chosen], "file": names}),
                       Path(tmp) / "u.parquet")
        store = LocalStore(Path(tmp) / "store")
        icfg = IngestConfig(shard_size=10_000, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",)))
        if not store.exists(stage_key("eval", "extract", 0, "stats.json")):
            plan_ingest(store, "eval", [InputSpec(path=str(Path(tmp) / "u.parquet"))], icfg)
            ingest_shard(store.uri, "eval", 0, icfg)
            ExtractStage(ExtractConfig(), args.models_dir).run_shard(store.uri, "eval", 0)
        files = store.get_parquet(stage_key("eval", "ingest", 0, "parquet"), columns=["key", "file", "alt_text"])
        extract = {r["key"]: r for r in store.get_parquet(stage_key("eval", "extract", 0, "parquet")).to_pylist()}
        file_of = {r["key"]: r["file"] for r in files.to_pylist()}
        alt_of = {r["key"]: r["alt_text"] for r in files.to_pylist()}
        truth = {k: truth_by_file[f] for k, f in file_of.items()}
        results["calibration"] = calibrate(chosen, file_of, extract, alt_of)
        for model in [m for m in args.models.split(",") if m]:
            cfg = FuseConfig(model=model, prompt_version=args.prompt_version, min_object_score=args.min_object_score)
            kept = Path(tmp) / f"fuse-{Path(model).name}-{args.min_object_score}.parquet"
            if args.reuse and kept.is_file():
                store.put_parquet(stage_key("eval", "fuse", 0, "parquet"), pq.read_table(kept))
            started = time.time()
            stats = FuseStage(cfg).run_shard(store.uri, "eval", 0)
            seconds = time.time() - started
            table = store.get_parquet(stage_key("eval", "fuse", 0, "parquet"))
            pq.write_table(table, kept)
            fused = table.to_pylist()
            ok = [r for r in fused if r["status"] == "ok"]
            sources = {r["key"]: sources_of(r, extract) for r in ok}
            rows = {name: measure({r["key"]: r[col] for r in ok}, truth, sources) for name, col in SETS.items()}
            base = rows["alt-text"]["coco_classes_mentioned_mean"] or 1e-9
            for m in rows.values():
                m["classes_vs_alt"] = m["coco_classes_mentioned_mean"] / base
            reasons = {o: Counter(r_.split(":", 1)[0] for r in ok for r_ in (r[f"{o}_reasons"] or []))
                       for o in cfg.outputs}
            results["models"][model] = {
                "llm": stats["provenance"]["llm"], "seconds": seconds, "llm_calls": stats["llm_calls"],
                "rows": rows, "passed": {o: sum(1 for r in ok if r[f"{o}_passed"]) / len(ok) for o in cfg.outputs},
                "reasons": {o: dict(c) for o, c in reasons.items()},
                "examples": [{k: r[k] for k in ("alt_text", "fused_short", "short_reasons", "fused_dense",
                                                "dense_reasons")} for r in ok[:8]]}
            _clear_fuse(store)
    print_report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


def _clear_fuse(store: LocalStore) -> None:
    """Remove the fuse output so the next model starts from nothing (no completions reused across models)."""
    import shutil

    shutil.rmtree(Path(store.root) / "eval" / "fuse", ignore_errors=True)


def print_report(results: dict) -> None:
    cal = results["calibration"]
    print(f"\nverifier on human captions ({cal['n']} images): own image's sources pass {cal['own_pass']:.0%}, "
          f"another image's sources pass {cal['other_pass']:.0%}")
    print(f"  reasons (own): {cal['own_reasons']}\n  reasons (other): {cal['other_reasons']}")
    for r in results["models"].values():
        print(f"\n{r['llm']}: {results['images']} photos, {r['llm_calls']} completions in {r['seconds']:.0f} s")
        print(f"{'captions':18} {'classes':>8} {'vs alt':>7} {'asserted':>9} {'unsupported':>12} "
              f"{'attr/100':>9} {'echo':>5}")
        for name, m in r["rows"].items():
            print(f"{name:18} {m['coco_classes_mentioned_mean']:8.2f} {m['classes_vs_alt']:7.2f} "
                  f"{m['objects_asserted_mean']:9.2f} {m['unsupported_object_rate']:12.1%} "
                  f"{m['person_attribute_claims_per_100']:9.1f} {m['template_echo']:5d}")
        print(f"verified: {', '.join(f'{o} {p:.0%}' for o, p in r['passed'].items())}; reasons: {r['reasons']}")
        for ex in r["examples"]:
            print(f"  alt:   {ex['alt_text']}\n  short: {ex['fused_short']}  {ex['short_reasons'] or 'KEPT'}\n"
                  f"  dense: {ex['fused_dense']}  {ex['dense_reasons'] or 'KEPT'}\n")


if __name__ == "__main__":
    sys.exit(main())
