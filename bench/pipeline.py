"""Whole-pipeline benchmark: the stages called directly (plain Python) vs `capfactory build` (Prefect + Dask).

Both paths build the same dataset spec from the same URL list on N samples: COCO photos from
shared/data/photos served by a real loopback HTTP server (infra.loopback_server.ImageServer, in this process),
a Parquet URL list whose alt-texts are each photo's first COCO caption, small shards (N/4 samples each, so every
stage maps >= 2 shard tasks), CPU models as the embedded defaults use them (fuse: smollm2-135m unless `--llm`).

- direct: a child process (`bench/pipeline.py --direct SPEC`) that runs every stage's plain work functions in
  order, shard by shard, in-process: for shard stages the Stage class of infra/stages.py (plan, check_backends,
  prepare, preflight, run_shard per shard, finish); for validate, publish and report the functions their flows
  wrap (tasks/validate.py, tasks/publish.py, tasks/report.py). No Prefect flow or task, no Dask.
- orchestrated: `capfactory build SPEC --json F` exactly as a user runs it (embedded defaults: local store,
  temporary local Prefect server, LocalCluster with one worker per core).
Runs alternate A B A B (`--runs` pairs), each into a fresh store, so nothing is skipped as already done.

Measured per run: wall seconds of the whole process (interpreter start included) and CPU seconds of its process
tree (getrusage of reaped children, and a psutil sample of the live tree, also summed per process role: the CLI
process with the Dask scheduler and nannies, the Prefect server, the Dask workers); per stage: seconds (direct: around
the stage's calls, plus CPU seconds of the process; orchestrated: the `seconds` the build records per stage, i.e.
around each stage's subflow) and the shard compute seconds the done markers record (`seconds`: run_shard's own
time on its worker); start-up: launch to the first shard of ingest starting (from the markers' `finished_at -
seconds`), split for the build into CLI ready (its "starting a Prefect API" line), runtime up (its "Dask dashboard"
line: the Prefect server healthy and the cluster started and warmed) and the build flow's body (the dataset spec it
saves first, by file time in the local store). Both paths must publish the same number of samples (checked).

Overhead % = (orchestrated - direct) / direct, per stage and for the whole process; with 2 Dask workers the
orchestrated path also runs 2 shards at once, so its stage seconds can be lower than the direct ones where the
cores are free (see CPU seconds, which parallelism does not hide).

Run:  .venv/bin/python bench/pipeline.py [--n 32] [--runs 2] [--llm smollm2-135m|qwen2.5-1.5b] [--workers W]
          [--timeout 1800] [--out bench/results/pipeline.json]
A table on stdout; every run's raw numbers in JSON (default bench/results/pipeline.json). OMP_WAIT_POLICY=PASSIVE
is set for llama.cpp in both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
CAPFACTORY = ROOT / ".venv" / "bin" / "capfactory"
PHOTOS = Path("/work/shared/data/photos")
DATASET = "bench-pipeline"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402
from common import TreeSampler, kill_group, machine_info  # noqa: E402

ENV = {"OMP_WAIT_POLICY": "PASSIVE", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
       "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# Lines of `capfactory build` that mark its start-up phases (infra/runtime.py logs them on the console).
BUILD_MARKS = {"cli_ready": re.compile(r"^starting a Prefect API"), "runtime_up": re.compile(r"^Dask dashboard:")}


# ---- the data and the spec ----------------------------------------------------------------------------------------


def write_inputs(tmp: Path, base_url: str, n: int) -> Path:
    """The URL list: N distinct URLs over the photos, alt-text = the photo's first COCO caption."""
    names = sorted(p.name for p in (PHOTOS / "images").glob("*.jpg"))
    captions = {}
    for line in (PHOTOS / "captions.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            captions[Path(rec["file"]).name] = rec["captions"][0].strip()
    picked = [names[i % len(names)] for i in range(n)]
    path = tmp / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{base_url}/img/{i}/{name}" for i, name in enumerate(picked)],
                             "caption": [captions.get(name, "") for name in picked]}), path)
    return path


def write_spec(path: Path, store: Path, urls: Path, n: int, llm: str | None) -> Path:
    shard = max(1, n // 4)
    spec = {"name": DATASET, "store": str(store),
            "inputs": [{"path": str(urls), "url_col": "url", "caption_col": "caption"}],
            "ingest": {"shard_size": shard, "download": {"allow_cidrs": ["127.0.0.0/8"]}},
            "publish": {"shard_size": shard}}
    if llm:
        spec["fuse"] = {"model": llm}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- the direct path (child process) ------------------------------------------------------------------------------


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_direct(spec_path: Path, out: Path) -> None:
    """Every stage of the spec, in order, by its plain functions, in this process; timings to `out`."""
    launched = float(os.environ["BENCH_LAUNCHED"])
    from infra.settings import Settings, load_spec
    from infra.stages import stage_class
    from infra.store import open_store
    from tasks.stage import ShardStage

    spec = load_spec(spec_path)
    models_dir = str(Path(Settings().models_dir).resolve())
    store = open_store(spec.store)
    uri = store.uri
    t0, c0 = _clock()
    stages = {}
    for name in spec.stages:  # plan and ask the backends once, before any stage (as build does)
        cls = stage_class(name)
        stages[name] = cls.from_spec(spec, models_dir) if issubclass(cls, ShardStage) else cls()
        if isinstance(stages[name], ShardStage):
            stages[name].plan()
            stages[name].check_backends()
    t1, c1 = _clock()
    timings = {"setup": {"seconds": t1 - t0, "cpu_s": c1 - c0}, "first_stage_at": time.time() - launched}
    per_stage = {}
    for name, stage in stages.items():
        t0, c0 = _clock()
        if isinstance(stage, ShardStage):
            prepared = stage.prepare(uri, DATASET) if stage.has_prepare else {}
            todo, done, _ = stage.preflight(store, DATASET)
            stats = [stage.run_shard(uri, DATASET, shard) for shard in todo]
            stage.finish(uri, DATASET, stats, done, [])
            del prepared
        else:
            _DATASET_WIDE[name](store, spec)
        t1, c1 = _clock()
        per_stage[name] = {"seconds": t1 - t0, "cpu_s": c1 - c0}
    timings["stages"] = per_stage
    out.write_text(json.dumps(timings))


def _validate(store, spec) -> None:
    from tasks.validate import validate_dataset

    validate_dataset(store.uri, DATASET, spec)


def _publish(store, spec) -> None:
    from tasks.publish import finish_publish, plan_publish, publish_shard

    plan = plan_publish(store.uri, DATASET, spec)
    stats = [publish_shard(store.uri, DATASET, s, plan["plan"], spec.publish) for s in range(plan["shards"])]
    finish_publish(store.uri, DATASET, spec, plan, stats)


def _report(store, spec) -> None:
    from tasks.report import write_report

    write_report(store, DATASET, spec)


_DATASET_WIDE = {"validate": _validate, "publish": _publish, "report": _report}


# ---- measuring one process ------------------------------------------------------------------------------------------


def process_role(cmdline: list[str]) -> str:
    """What a process of the tree is, by its command line (for the CPU breakdown)."""
    text = " ".join(cmdline)
    if "uvicorn" in text or "prefect.server" in text:
        return "prefect_server"
    if "resource_tracker" in text:
        return "other"
    if "multiprocessing" in text or "spawn_main" in text or "forkserver" in text:
        return "dask_workers"
    if "capfactory" in text and " build " in f"{text} ":
        return "cli_scheduler"  # the CLI process: flows, Prefect client, Dask scheduler and nannies
    if "--direct" in text:
        return "direct"
    return "other"


class RoleSampler(TreeSampler):
    """TreeSampler that also sums the CPU seconds per process role (`process_role`)."""

    def __init__(self, pid: int):
        super().__init__(pid)
        self.roles: dict[tuple[int, float], str] = {}

    def sample(self) -> None:
        super().sample()
        import psutil

        # A worker is forked from the CLI, then execs: until then its command line is the CLI's, so look again.
        stale = {k for k, role in self.roles.items() if role == "cli_scheduler" and k[0] != self.root.pid}
        for key in (self.cpu_by_pid.keys() - self.roles.keys()) | stale:
            try:
                self.roles[key] = process_role(psutil.Process(key[0]).cmdline())
            except psutil.Error:
                self.roles[key] = "other"

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, cpu in self.cpu_by_pid.items():
            out[self.roles.get(key, "other")] = out.get(self.roles.get(key, "other"), 0.0) + cpu
        return out


def run_process(cmd: list[str], env: dict, log_path: Path, timeout_s: float) -> dict:
    """Run `cmd` in its own session; wall, CPU of the tree, and the seconds (from launch) at which each of
    BUILD_MARKS first showed up on its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.time()
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    proc = subprocess.Popen(cmd, env={**env, "BENCH_LAUNCHED": repr(launched)}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def read() -> None:
        with open(log_path, "wb") as log:
            for raw in proc.stdout:
                at = time.perf_counter() - t0
                log.write(raw)
                line = raw.decode("utf-8", "replace").strip()
                for name, pattern in BUILD_MARKS.items():
                    if name not in marks and pattern.search(line):
                        marks[name] = at

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sampler = RoleSampler(proc.pid)
    timed_out = False
    try:
        while True:
            sampler.sample()
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 > timeout_s:
                    timed_out = True
                    break
    finally:
        wall = time.perf_counter() - t0
        kill_group(proc.pid, grace_s=2.0)
        proc.wait()
        reader.join(timeout=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if timed_out or proc.returncode:
        tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
        raise RuntimeError(f"{' '.join(cmd)} {'timed out' if timed_out else f'exited {proc.returncode}'}:\n{tail}")
    return {"launched": launched, "wall_s": wall, "cpu_s": cpu, "cpu_tree_sampled_s": sampler.cpu_s(),
            "peak_rss_mb": sampler.peak_rss_mb(), "max_procs": sampler.max_procs, "marks": marks,
            "cpu_by_role": sampler.cpu_by_role()}


# ---- what the store says -------------------------------------------------------------------------------------------


def store_facts(store_root: Path, launched: float) -> dict:
    """From the finished store: shard compute seconds and the span of each shard stage (done markers), the first
    shard's start relative to launch, when the spec was saved (build only), and the published samples."""
    from infra.stages import ORDER
    from infra.store import LocalStore
    from tasks.publish import read_release

    root = store_root / DATASET
    shards = {}
    for stage in ORDER:
        markers = [json.loads(p.read_text()) for p in sorted((root / stage).glob("shard-*.stats.json"))]
        if markers:
            starts = [m["finished_at"] - m["seconds"] for m in markers]
            shards[stage] = {"shards": len(markers), "compute_s": sum(m["seconds"] for m in markers),
                             "span_s": max(m["finished_at"] for m in markers) - min(starts),
                             "first_start_at": min(starts) - launched}
    release = read_release(LocalStore(store_root), DATASET)
    jpgs = 0
    for tar in (root / "publish").glob("*.tar"):
        with tarfile.open(tar) as t:
            jpgs += sum(m.name.endswith(".jpg") for m in t.getmembers())
    spec_files = [p for p in root.glob("*") if p.is_file() and "spec" in p.name]
    return {"shard_stages": shards, "published_selected": release["selected"] if release else None,
            "published_jpgs": jpgs,
            "spec_saved_at": min(p.stat().st_mtime for p in spec_files) - launched if spec_files else None}


# ---- one run of each path ------------------------------------------------------------------------------------------


def run_path(path: str, spec: Path, store: Path, tmp: Path, env: dict, args: argparse.Namespace) -> dict:
    if path == "direct":
        timings_path = tmp / f"{store.name}.timings.json"
        cmd = [str(VENV_PY), str(Path(__file__).resolve()), "--direct", str(spec), "--timings", str(timings_path)]
    else:
        timings_path = tmp / f"{store.name}.build.json"
        cmd = [str(CAPFACTORY), "build", str(spec), "--json", str(timings_path)]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
    proc = run_process(cmd, env, tmp / f"{store.name}.log", args.timeout)
    recorded = json.loads(timings_path.read_text())
    facts = store_facts(store, proc["launched"])
    if path == "direct":
        stages = {s: {"seconds": v["seconds"], "cpu_s": v["cpu_s"]} for s, v in recorded["stages"].items()}
        startup = recorded["first_stage_at"]
    else:
        stages = {s: {"seconds": v} for s, v in recorded["seconds"].items()}
        startup = facts["shard_stages"].get("ingest", {}).get("first_start_at")
    for s, v in stages.items():
        v.update({k: facts["shard_stages"][s][k] for k in ("shards", "compute_s", "span_s")}
                 if s in facts["shard_stages"] else {})
    return {"path": path, **{k: v for k, v in proc.items() if k != "launched"}, "stages": stages,
            "startup_s": startup, "first_shard_at": facts["shard_stages"].get("ingest", {}).get("first_start_at"),
            "spec_saved_at": facts["spec_saved_at"], "published_selected": facts["published_selected"],
            "published_jpgs": facts["published_jpgs"]}


def med(runs: list[dict], get) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def pct(orch: float | None, direct: float | None) -> str:
    return f"{100 * (orch - direct) / direct:+.0f}%" if orch is not None and direct else "-"


def _roles(runs: list[dict]) -> str:
    roles = sorted({k for r in runs for k in r["cpu_by_role"]})
    return ", ".join(f"{k} {med(runs, lambda r, k=k: r['cpu_by_role'].get(k, 0.0)):.1f}" for k in roles)


def summarize(runs: list[dict], n: int) -> tuple[str, dict]:
    d = [r for r in runs if r["path"] == "direct"]
    o = [r for r in runs if r["path"] == "orchestrated"]
    stages = list(d[0]["stages"])
    lines = [f"{'stage':<10} {'direct s':>9} {'orch s':>8} {'overhead':>9} {'direct cpu':>10} {'shards':>6} "
             f"{'compute d':>9} {'compute o':>9} {'span o':>7} {'samples/s d':>11} {'samples/s o':>11}"]
    table = {}
    for s in stages:
        def get(r: dict, key: str, s: str = s) -> float | None:
            return r["stages"][s].get(key)

        ds, os_ = med(d, lambda r: get(r, "seconds")), med(o, lambda r: get(r, "seconds"))
        row = {"direct_s": ds, "orchestrated_s": os_, "direct_cpu_s": med(d, lambda r: get(r, "cpu_s")),
               "shards": d[0]["stages"][s].get("shards"),
               "direct_compute_s": med(d, lambda r: get(r, "compute_s")),
               "orchestrated_compute_s": med(o, lambda r: get(r, "compute_s")),
               "orchestrated_span_s": med(o, lambda r: get(r, "span_s")),
               "samples_per_s_direct": n / ds if ds else None, "samples_per_s_orchestrated": n / os_ if os_ else None}
        table[s] = row
        fmt = lambda v, w, p=1: f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{s:<10} {fmt(ds, 9)} {fmt(os_, 8)} {pct(os_, ds):>9} {fmt(row['direct_cpu_s'], 10)} "
                     f"{row['shards'] or '-':>6} {fmt(row['direct_compute_s'], 9)} "
                     f"{fmt(row['orchestrated_compute_s'], 9)} {fmt(row['orchestrated_span_s'], 7)} "
                     f"{fmt(row['samples_per_s_direct'], 11, 2)} "
                     f"{fmt(row['samples_per_s_orchestrated'], 11, 2)}")
    sum_d = sum(v["direct_s"] for v in table.values())
    sum_o = sum(v["orchestrated_s"] for v in table.values() if v["orchestrated_s"] is not None)
    totals = {"stages_direct_s": sum_d, "stages_orchestrated_s": sum_o,
              "wall_direct_s": med(d, lambda r: r["wall_s"]), "wall_orchestrated_s": med(o, lambda r: r["wall_s"]),
              "cpu_direct_s": med(d, lambda r: r["cpu_s"]), "cpu_orchestrated_s": med(o, lambda r: r["cpu_s"]),
              "cpu_tree_direct_s": med(d, lambda r: r["cpu_tree_sampled_s"]),
              "cpu_tree_orchestrated_s": med(o, lambda r: r["cpu_tree_sampled_s"]),
              "startup_direct_s": med(d, lambda r: r["startup_s"]),
              "startup_orchestrated_s": med(o, lambda r: r["startup_s"]),
              "build_cli_ready_s": med(o, lambda r: r["marks"].get("cli_ready")),
              "build_runtime_up_s": med(o, lambda r: r["marks"].get("runtime_up")),
              "build_spec_saved_s": med(o, lambda r: r["spec_saved_at"]),
              "peak_rss_direct_mb": med(d, lambda r: r["peak_rss_mb"]),
              "peak_rss_orchestrated_mb": med(o, lambda r: r["peak_rss_mb"]),
              "cpu_by_role_direct": {k: med(d, lambda r, k=k: r["cpu_by_role"].get(k, 0.0))
                                     for k in {k for r in d for k in r["cpu_by_role"]}},
              "cpu_by_role_orchestrated": {k: med(o, lambda r, k=k: r["cpu_by_role"].get(k, 0.0))
                                           for k in {k for r in o for k in r["cpu_by_role"]}}}
    totals["after_stages_orchestrated_s"] = (totals["wall_orchestrated_s"] - totals["startup_orchestrated_s"]
                                             - sum_o) if totals["startup_orchestrated_s"] is not None else None
    totals["after_stages_direct_s"] = totals["wall_direct_s"] - totals["startup_direct_s"] - sum_d
    t = totals
    lines += [f"{'stages':<10} {sum_d:9.1f} {sum_o:8.1f} {pct(sum_o, sum_d):>9}",
              f"{'wall':<10} {t['wall_direct_s']:9.1f} {t['wall_orchestrated_s']:8.1f} "
              f"{pct(t['wall_orchestrated_s'], t['wall_direct_s']):>9}   (whole process, launch to exit)",
              f"{'cpu':<10} {t['cpu_direct_s']:9.1f} {t['cpu_orchestrated_s']:8.1f} "
              f"{pct(t['cpu_orchestrated_s'], t['cpu_direct_s']):>9}   (CPU s of the process tree, rusage)",
              f"start-up (launch -> first stage): direct {t['startup_direct_s']:.1f} s, build "
              f"{t['startup_orchestrated_s']:.1f} s = CLI ready {t['build_cli_ready_s']:.1f} s, Prefect server + "
              f"Dask cluster up {t['build_runtime_up_s']:.1f} s, build flow body "
              f"{t['build_spec_saved_s'] or float('nan'):.1f} s, first ingest shard "
              f"{t['startup_orchestrated_s']:.1f} s",
              f"after the last stage (teardown, exit): direct {t['after_stages_direct_s']:.1f} s, build "
              f"{t['after_stages_orchestrated_s']:.1f} s",
              f"CPU s by process (sampled): direct {_roles(d)}; build {_roles(o)}",
              f"published samples: direct {[r['published_selected'] for r in d]}, "
              f"build {[r['published_selected'] for r in o]}"]
    return "\n".join(lines), {"stages": table, "totals": totals}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="samples (URLs) [32]")
    ap.add_argument("--runs", type=int, default=2, help="A B pairs, alternating [2]")
    ap.add_argument("--llm", default=None, help="fuse model (e.g. qwen2.5-1.5b) [the default: smollm2-135m]")
    ap.add_argument("--workers", type=int, default=None, help="Dask workers of the build [its default: cores]")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process [1800]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    ap.add_argument("--direct", type=Path, default=None, help=argparse.SUPPRESS)  # the child of the direct path
    ap.add_argument("--timings", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.direct:
        run_direct(args.direct, args.timings)
        return 0
    if args.n < 2:
        ap.error("--n must be at least 2 (two shards)")
    from infra.loopback_server import ImageServer

    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != "PREFECT_API_URL"} | ENV
    runs = []
    images = sorted((PHOTOS / "images").glob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="capfactory-bench-pipeline-") as tmp_name, ImageServer(images) as srv:
        tmp = Path(tmp_name)
        urls = write_inputs(tmp, srv.base_url.rstrip("/"), args.n)
        for i in range(args.runs):
            for path in ("direct", "orchestrated"):
                store = tmp / f"{path}-{i}"
                spec = write_spec(tmp / f"{path}-{i}.yaml", store, urls, args.n, args.llm)
                print(f"run {i + 1}/{args.runs} {path} ...", flush=True)
                r = run_path(path, spec, store, tmp, env, args)
                print(f"  wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s, published {r['published_selected']}",
                      flush=True)
                runs.append(r)
    published = {r["published_selected"] for r in runs}
    text, summary = summarize(runs, args.n)
    print(f"\n{args.n} samples, {args.runs} runs per path (ABAB), medians; LLM {args.llm or 'smollm2-135m'}\n{text}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": args.n, "runs_per_path": args.runs, "llm": args.llm or "smollm2-135m",
                                    "workers": args.workers, "machine": machine_info(), **summary, "runs": runs},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    if len(published) != 1:
        raise SystemExit(f"the paths published different numbers of samples: {sorted(map(str, published))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
