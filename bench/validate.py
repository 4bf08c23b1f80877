"""Benchmark: seconds the `validate` stage takes per 1,000 rows, and its fixed part, before and after a change.

What it measures, per dataset size N (rows of every stage output), variant (a source tree: `after` = this
checkout, `before` = another checkout given with `--before`, e.g. `git worktree add /tmp/validate-before HEAD`;
its tasks/validate.py must have `validate_dataset`, added in the same change as this benchmark)
and mode, over R runs (variants alternate run by run, ABAB):
- `function`: the plain functions in one process, what the flow does without Prefect or Dask (plan the shards,
  `validate_shard` on each, the summary, the data docs);
- `flow`: `run_stage("validate", spec)`, what `capfactory validate` runs: the temporary Prefect API, a Dask
  LocalCluster of `--workers` processes, the flow;
- wall seconds and CPU seconds (user+sys of the process and of every child it reaped: the Dask workers and the
  Prefect server) of the measured part only, in a fresh subprocess; its imports (GX alone takes seconds) are
  timed apart;
- s/1000 rows and the fixed part: a least-squares line `seconds = fixed + per_1000 * N / 1000` over the sizes.
The dataset is synthetic but has the real schemas (tasks/shards.py, tasks/experts, tasks/fuse.py, tasks/translate.py,
tasks/score.py), `--shard-size` rows per shard, one translation per sample, and passes every suite; every run starts
from a fresh copy of it. Results: a table on stdout and the raw numbers in JSON (default bench/results/validate.json).

Run:  .venv/bin/python bench/validate.py --before /tmp/validate-before [--sizes 30,1000,10000] [--runs 1]
      [--modes function,flow] [--shard-size 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
DATASET = "bench"
WORDS = ("a", "the", "brown", "dog", "cat", "red", "bus", "man", "woman", "on", "near", "with", "beach", "street",
         "grass", "table", "plate", "of", "two", "small")


def _hex(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def shard_tables(rng: random.Random, shard: int, rows: int) -> dict:
    """One shard of every stage output (real schemas), rows that pass their suites."""
    import pyarrow as pa

    from tasks.experts import experts_schema
    from tasks.fuse import FUSED_SCHEMA
    from tasks.score import SCORES_SCHEMA
    from tasks.shards import INGEST_SCHEMA
    from tasks.translate import TRANSLATED_SCHEMA

    keys = [_hex(f"{DATASET}/{shard}/{i}", 24) for i in range(rows)]
    captions = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in keys]
    pairs = list(zip(keys, captions, strict=True))
    prov = [("model", "synthetic")]
    ingest = [{**dict.fromkeys(INGEST_SCHEMA.names), "key": k, "url": f"http://127.0.0.1/img/{k}.jpg",
               "alt_text": c, "source": "synthetic", "status": "ok", "http_status": 200, "bytes": 50_000,
               "mime": "image/jpeg", "width": 256, "height": 192, "original_width": 640, "original_height": 480,
               "sha256": _hex(k, 64), "phash": _hex(k + "p", 16), "attempts": 1} for k, c in pairs]
    extract = [{**dict.fromkeys(experts_schema().names), "key": k, "status": "ok", "provenance": prov} for k in keys]
    fuse = [{**dict.fromkeys(FUSED_SCHEMA.names), "key": k, "status": "ok", "alt_text": c, "caption_short": c,
             "fused_short": c, "short_passed": True, "short_reasons": [], "provenance": prov}
            for k, c in pairs]
    translate = [{"key": k, "field": "caption_short", "lang": "pt", "source_text": c, "text": f"uma foto: {c}",
                  "status": "ok", "qe_passed": True, "qe_reasons": [], "qe_lang": "pt", "qe_length_ratio": 1.1,
                  "qe_chrf_roundtrip": 60.0, "provenance": prov} for k, c in pairs]
    score = [{**dict.fromkeys(SCORES_SCHEMA.names), "key": k, "status": "ok", "clip_alt": rng.gauss(0.3, 0.03),
              "clip_short": rng.gauss(0.3, 0.03), "nsfw": rng.uniform(0, 0.1), "lang_alt": "en",
              "lang_alt_prob": 0.99, "lang_short": "en", "provenance": prov,
              "clip_translations": [{"field": "caption_short", "lang": "pt", "score": 0.3}]} for k in keys]
    return {"ingest": pa.Table.from_pylist(ingest, INGEST_SCHEMA),
            "extract": pa.Table.from_pylist(extract, experts_schema()),
            "fuse": pa.Table.from_pylist(fuse, FUSED_SCHEMA),
            "translate": pa.Table.from_pylist(translate, TRANSLATED_SCHEMA),
            "score": pa.Table.from_pylist(score, SCORES_SCHEMA)}


def make_dataset(root: Path, rows: int, shard_size: int, seed: int = 0) -> int:
    """Write every stage's output and done marker (and raw's input manifests) for `rows` samples; returns the
    number of shards."""
    from infra.store import LocalStore
    from tasks.shards import input_key, stage_key, write_marker

    store, rng = LocalStore(root), random.Random(seed)
    starts = range(0, rows, shard_size)
    for shard, start in enumerate(starts):
        tables = shard_tables(rng, shard, min(shard_size, rows - start))
        store.put_parquet(input_key(DATASET, shard), tables["ingest"].select(["key", "url", "alt_text"]))
        for stage, table in tables.items():
            store.put_parquet(stage_key(DATASET, stage, shard, "parquet"), table)
            write_marker(store, DATASET, stage, shard, {"shard": shard, "samples": table.num_rows,
                                                        "config_hash": "synthetic"})
    return len(starts)


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(mode: str, store_dir: str, workers: int) -> None:
    """One measured run in this process; prints its numbers as JSON on the last line."""
    t0, c0 = time.perf_counter(), _cpu()
    import tasks.validate
    from flows.stage import run_stage
    from infra.settings import DatasetSpec

    imported = (time.perf_counter() - t0, _cpu() - c0)
    spec = DatasetSpec(name=DATASET, store=store_dir)
    t0, c0 = time.perf_counter(), _cpu()
    plain = mode == "function"
    summary = tasks.validate.validate_dataset(store_dir, DATASET, spec) if plain else \
        run_stage("validate", spec, workers=workers)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    rows = sum(s["rows"] for s in summary["suites"].values())
    passed = all(s["passed"] == s["shards"] for s in summary["suites"].values())
    print(json.dumps({"import_wall_s": imported[0], "import_cpu_s": imported[1], "wall_s": wall, "cpu_s": cpu,
                      "rows_validated": rows, "all_passed": passed, "module": tasks.validate.__file__}))


def run_child(variant_root: Path, mode: str, data: Path, workers: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-validate-run-") as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(data, store)
        env = {**os.environ, "PYTHONPATH": str(variant_root), "PREFECT_LOGGING_LEVEL": "WARNING"}
        proc = subprocess.run([str(VENV_PY), str(Path(__file__).resolve()), "--child", mode, "--store", str(store),
                               "--workers", str(workers)], cwd=variant_root, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run in {variant_root} failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    if not str(out["module"]).startswith(str(variant_root)):
        raise RuntimeError(f"the run in {variant_root} imported {out['module']}")
    return out


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed seconds, seconds per 1,000 rows): least squares over (rows, seconds)."""
    xs, ys = [r / 1000 for r, _ in points], [s for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, help="checkout of the code before the change (omit: after only)")
    ap.add_argument("--sizes", default="30,1000,10000")
    ap.add_argument("--modes", default="function,flow")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "validate.json")
    ap.add_argument("--child", choices=("function", "flow"), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.store, args.workers)
        return
    variants = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    sizes, modes = [int(s) for s in args.sizes.split(",")], args.modes.split(",")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        for rows in sizes:
            data = Path(tmp) / f"data-{rows}"
            shards = make_dataset(data, rows, args.shard_size)
            for mode in modes:
                for rep in range(args.runs):
                    order = list(variants) if rep % 2 == 0 else list(reversed(variants))
                    for variant in order:
                        r = run_child(variants[variant], mode, data, args.workers, args.timeout)
                        runs.append({"variant": variant, "mode": mode, "rows": rows, "shards": shards,
                                     "shard_tasks": 5 * shards, "run": rep, **r})
                        print(f"{variant:6s} {mode:8s} {rows:6d} rows: wall {r['wall_s']:7.2f} s, "
                              f"cpu {r['cpu_s']:7.2f} s", file=sys.stderr, flush=True)
    table = []
    for variant in variants:
        for mode in modes:
            mine = [r for r in runs if r["variant"] == variant and r["mode"] == mode]
            row = {"variant": variant, "mode": mode}
            for what in ("wall_s", "cpu_s"):
                per_size = [(n, min(r[what] for r in mine if r["rows"] == n)) for n in sizes]
                fixed, per_1000 = fit(per_size)
                row[what] = dict(per_size)
                row[f"{what}_fixed"], row[f"{what}_per_1000_rows"] = fixed, per_1000
            row["import_cpu_s"] = min(r["import_cpu_s"] for r in mine)
            table.append(row)
    head = " | ".join(f"{n} rows wall/cpu s" for n in sizes)
    print(f"| variant | mode | {head} | fixed wall/cpu s | per 1000 rows wall/cpu s | import cpu s |")
    print("|---|---|" + "---|" * len(sizes) + "---|---|---|")
    for row in table:
        cells = " | ".join(f"{row['wall_s'][n]:.1f} / {row['cpu_s'][n]:.1f}" for n in sizes)
        print(f"| {row['variant']} | {row['mode']} | {cells} | {row['wall_s_fixed']:.1f} / {row['cpu_s_fixed']:.1f} "
              f"| {row['wall_s_per_1000_rows']:.2f} / {row['cpu_s_per_1000_rows']:.2f} | {row['import_cpu_s']:.1f} |")
    from common import machine_info

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "shard_size": args.shard_size,
                                    "workers": args.workers, "variants": {k: str(v) for k, v in variants.items()},
                                    "summary": table, "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
