"""Side-by-side benchmark: `capfactory ingest` vs `img2dataset` on the same loopback-served URL list.

What it measures, per tool and URL count N, over R runs each (ABAB: tools alternate run by run):
- wall seconds of the whole tool process (a subprocess, interpreter start-up included);
- start-up seconds: from just before the command starts to the first request on the wire (the loopback server
  records when its first request since a reset came, `/_first-hit`);
- images/s = successful images / wall;
- CPU seconds of the process tree: user+sys from getrusage(RUSAGE_CHILDREN) deltas (reaped descendants), and a
  psutil 0.1 s sample of the live tree as a cross-check;
- peak RSS of the process tree: max over 0.1 s psutil samples of the summed RSS;
- successes: training-copy `.jpg` members counted in the output tars (capfactory's `KEY.analysis.jpg` copies for
  the experts are not counted), and the tool's own stats files, for comparison.

How: one `python -m infra.loopback_server` process serves the .jpg files of `--images` (default: the 640x480 COCO
photos in shared/data/photos/images; e.g. shared/data/text_images/icdar2015_test has 1280x720 scenes) under N
distinct paths `/img/{i}/{name}`; the URL list (columns url, caption: the first COCO caption of each photo where
the folder's parent has a captions.jsonl, else empty) is a Parquet file in a temp dir. The server shares the cores
with the tool under test: its CPU seconds per run are recorded too (`server_cpu_s`). Both tools get the same
settings: image_size 256, resize_mode keep_ratio, webdataset output, jpg encoding, 2 processes, 1000 samples per
shard; everything else at the tool's defaults, except img2dataset's thread_count (see `--i2d-threads`). Every tool
run is killed after `--timeout` seconds; the server is always stopped. Results: a table on stdout and every run's
raw numbers in JSON (default bench/results/ingest.json).

Run:  .venv/bin/python bench/ingest.py [--sizes 2000,10000] [--runs 3] [--tools capfactory,capfactory-api,img2dataset]
      [--images DIR]
      (any python works: the script re-executes itself under .venv/bin/python, which has pyarrow and psutil)

img2dataset lives in its own venv, created by this script when missing with exactly:
    python3 -m venv /work/main/.venv-bench && /work/main/.venv-bench/bin/pip install img2dataset==1.47.0
(that installed and imported cleanly on Python 3.11 from the registry, with no further pins).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
CAPFACTORY = ROOT / ".venv" / "bin" / "capfactory"
BENCH_VENV = ROOT / ".venv-bench"
IMG2DATASET = BENCH_VENV / "bin" / "img2dataset"
IMG2DATASET_PIN = "img2dataset==1.47.0"
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
if not PHOTOS.is_dir():
    PHOTOS = Path("/work/shared/data/photos")

IMAGE_SIZE, RESIZE_MODE, ENCODE, PROCESSES, SHARD_SIZE = 256, "keep_ratio", "jpg", 2, 1000
# capfactory-api: capfactory with a Prefect API already running (PREFECT_API_URL set, as after `prefect server
# start`), so the run starts no temporary server; plain capfactory runs on embedded defaults.
TOOLS = ("capfactory", "capfactory-api", "img2dataset")

# Keep every tool off the internet: no proxies, no telemetry or update checks; loopback only.
OFFLINE_ENV = {
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "WANDB_SILENT": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def reexec_in_venv() -> None:
    """Re-run this script under .venv/bin/python when the current interpreter lacks pyarrow."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        if VENV_PY.exists() and Path(sys.prefix).resolve() != VENV_PY.parent.parent.resolve():
            os.execv(str(VENV_PY), [str(VENV_PY), str(Path(__file__).resolve()), *sys.argv[1:]])
        raise SystemExit("pyarrow is missing: run with /work/main/.venv/bin/python") from None


reexec_in_venv()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import LoopbackServer, RunResult, TreeSampler, machine_info, run_measured  # noqa: E402

# ---- setup --------------------------------------------------------------------------------------------------------


def ensure_bench_venv() -> None:
    """Create .venv-bench with img2dataset if it is missing (the command in the module docstring)."""
    if IMG2DATASET.exists():
        return
    print(f"creating {BENCH_VENV} with {IMG2DATASET_PIN} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(BENCH_VENV)], check=True, timeout=300)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", IMG2DATASET_PIN], check=True, timeout=1200)


def image_names(images_dir: Path) -> list[str]:
    """The photos in the order infra.loopback_server serves them (sorted; URL index i -> image i % len)."""
    return sorted(p.name for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() == ".jpg")


def image_sizes(images_dir: Path, names: list[str]) -> dict[str, int]:
    """{"WxH": count} of the served images, most common first."""
    from collections import Counter

    from PIL import Image

    sizes = Counter()
    for name in names:
        with Image.open(images_dir / name) as im:
            sizes[f"{im.width}x{im.height}"] += 1
    return dict(sizes.most_common())


def first_captions(captions_jsonl: Path) -> dict[str, str]:
    """File name -> first COCO caption; none when the file is missing."""
    out = {}
    if not captions_jsonl.is_file():
        return out
    for line in captions_jsonl.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[Path(rec["file"]).name] = rec["captions"][0]
    return out


def write_url_list(path: Path, base_url: str, n: int, names: list[str], captions: dict[str, str]) -> None:
    urls, caps = [], []
    for i in range(n):
        name = names[i % len(names)]
        urls.append(f"{base_url}/img/{i}/{name}")
        caps.append(captions.get(name, ""))
    pq.write_table(pa.table({"url": urls, "caption": caps}), path)


# ---- the two tools ------------------------------------------------------------------------------------------------


def as_argv(flags: dict[str, object]) -> list[str]:
    return [str(x) for kv in flags.items() for x in kv]


def capfactory_cmd(urls: Path, out: Path, args: argparse.Namespace) -> list[str]:
    flags = {
        "--dataset": "bench",
        "--store": out,
        "--url-col": "url",
        "--caption-col": "caption",
        "--shard-size": SHARD_SIZE,
        "--image-size": IMAGE_SIZE,
        "--resize-mode": RESIZE_MODE,
        "--encode-format": ENCODE,
        "--workers": PROCESSES,
        "--allow-cidr": "127.0.0.0/8",
    }
    return [str(CAPFACTORY), "ingest", str(urls), *as_argv(flags)]


def img2dataset_cmd(urls: Path, out: Path, args: argparse.Namespace) -> list[str]:
    flags = {
        "--url_list": urls,
        "--input_format": "parquet",
        "--url_col": "url",
        "--caption_col": "caption",
        "--output_format": "webdataset",
        "--output_folder": out,
        "--processes_count": PROCESSES,
        "--thread_count": args.i2d_threads,
        "--image_size": IMAGE_SIZE,
        "--resize_mode": RESIZE_MODE,
        "--encode_format": ENCODE,
        "--number_sample_per_shard": SHARD_SIZE,
        "--distributor": "multiprocessing",
        "--enable_wandb": False,
        "--disable_all_reencoding": False,
    }
    return [str(IMG2DATASET), *as_argv(flags)]


COMMANDS = {"capfactory": (CAPFACTORY, capfactory_cmd), "capfactory-api": (CAPFACTORY, capfactory_cmd),
            "img2dataset": (IMG2DATASET, img2dataset_cmd)}


def tool_env(tool: str, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != "PREFECT_API_URL"}
    env.update(OFFLINE_ENV)
    if tool == "capfactory-api":
        env["PREFECT_API_URL"] = api_url
    return env


def count_successes(out: Path) -> tuple[int, int | None]:
    """(.jpg members in all output tars, the tool's own success count from its stats files or None)."""
    jpgs = 0
    for tar_path in sorted(out.rglob("*.tar")):
        try:
            with tarfile.open(tar_path) as tf:
                jpgs += sum(1 for m in tf if m.isfile() and m.name.endswith(".jpg")
                            and not m.name.endswith(".analysis.jpg"))
        except (tarfile.TarError, OSError):
            pass  # a truncated shard (killed run) counts what could not be read as failures
    stats, seen = 0, False
    for path in out.rglob("*stats.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        ok = rec.get("successes", rec.get("counts", {}).get("ok"))  # img2dataset / capfactory
        if isinstance(ok, int):
            stats, seen = stats + ok, True
    return jpgs, (stats if seen else None)


FULL_SERIES_FROM = 50_000  # runs of this many URLs keep their per-process RSS curve in the JSON


def rss_by_quarter(series: list) -> dict[str, list[float]]:
    """{"pid role": [peak RSS MB in each quarter of the run]}: memory that stays flat shows four similar numbers;
    memory that grows with the list shows a rising row."""
    if not series:
        return {}
    end = series[-1][0] or 1.0
    out: dict[str, list[float]] = {}
    for t, by_process in series:
        quarter = min(3, int(4 * t / end))
        for name, mb in by_process.items():
            row = out.setdefault(name, [0.0] * 4)
            row[quarter] = max(row[quarter], mb)
    return out


def print_memory(records: list[dict]) -> None:
    """The per-process RSS quarters of the largest run of each tool."""
    largest = max(r["n"] for r in records)
    print(f"\nN={largest}: peak RSS MB per process in each quarter of the run (first run of each tool)")
    for tool in dict.fromkeys(r["tool"] for r in records):
        run = next((r for r in records if r["tool"] == tool and r["n"] == largest), None)
        for name, row in (run or {}).get("rss_by_quarter_mb", {}).items():
            if max(row) >= 50:  # leave out the small helpers (resource tracker)
                print(f"  {tool:<15} {name:<28} " + " ".join(f"{mb:7.0f}" for mb in row))


def server_call(base_url: str, path: str, method: str = "GET") -> dict:
    request = urllib.request.Request(base_url + path, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def process_cpu_s(pid: int) -> float:
    """User+sys CPU seconds of a live process and its children so far."""
    sampler = TreeSampler(pid)
    sampler.sample()
    return sampler.cpu_s() or 0.0


def run_tool(tool: str, n: int, urls: Path, work: Path, run_idx: int, args: argparse.Namespace,
             base_url: str, api_url: str | None, server_pid: int) -> dict:
    """One measured run of `tool`; a missing or failing tool is recorded, never raised."""
    record = {"tool": tool, "n": n, "run": run_idx, "started_at": time.time()}
    exe, build = COMMANDS[tool]
    if not exe.exists():
        return {**record, "error": f"{exe} not found", "successes": 0}
    out = work / f"{tool}-{n}-{run_idx}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    server_call(base_url, "/_reset", "POST")
    server_cpu = process_cpu_s(server_pid)
    started = time.time()
    res: RunResult = run_measured(
        build(urls, out, args), env=tool_env(tool, api_url), cwd=ROOT, timeout_s=args.timeout,
        log_path=work / f"{out.name}.log",
    )
    server_cpu = process_cpu_s(server_pid) - server_cpu
    first_hit = server_call(base_url, "/_first-hit")["first_hit"]
    jpgs, tool_stats = count_successes(out)
    shutil.rmtree(out, ignore_errors=True)  # 10k thumbnails per run add up
    record.update(res.to_dict())
    series = record.pop("rss_series") or []
    record["rss_by_quarter_mb"] = rss_by_quarter(series)
    if n >= FULL_SERIES_FROM:  # the long runs keep the whole curve
        record["rss_series"] = series
    record.update(server_cpu_s=server_cpu, successes=jpgs, tool_stats_successes=tool_stats,
                  images_per_s=jpgs / res.wall_s, startup_s=first_hit - started if first_hit else None)
    if res.timed_out or res.returncode != 0:
        record["error"] = "timed out" if res.timed_out else f"exit code {res.returncode}"
    if record.get("error") or jpgs < n:  # keep the log only where it says something
        record["log_tail"] = res.log_tail[-2000:]
    else:
        record.pop("log_tail")
    return record


# ---- reporting ----------------------------------------------------------------------------------------------------


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(records: list[dict], sizes: list[int], tools: list[str]) -> list[dict]:
    rows = []
    for n in sizes:
        for tool in tools:
            runs = [r for r in records if r["n"] == n and r["tool"] == tool]
            measured = [r for r in runs if "wall_s" in r]
            rows.append(
                {
                    "n": n,
                    "tool": tool,
                    "runs": len(runs),
                    "failed_runs": sum(1 for r in runs if r.get("error")),
                    **{
                        f"median_{k}": median_of(measured, k)
                        for k in ("wall_s", "startup_s", "images_per_s", "cpu_s", "cpu_tree_sampled_s",
                                  "peak_rss_mb", "server_cpu_s")
                    },
                    "successes": [r["successes"] for r in runs],
                }
            )
    return rows


def ratios(rows: list[dict], sizes: list[int]) -> dict[str, float | None]:
    """capfactory / img2dataset median images/s, per capfactory variant and N."""
    out = {}
    for n in sizes:
        ips = {r["tool"]: r["median_images_per_s"] for r in rows if r["n"] == n}
        for tool in ("capfactory", "capfactory-api"):
            cf, i2d = ips.get(tool), ips.get("img2dataset")
            out[f"{tool}@{n}"] = cf / i2d if cf and i2d else None
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], ratio: dict[str, float | None]) -> None:
    header = (f"{'N':>6}  {'tool':<15} {'wall s':>8} {'start s':>8} {'img/s':>8} {'CPU s':>8} {'CPU s*':>8} "
              f"{'RSS MB':>8} {'srv CPU':>8}  successes")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        fails = f" ({r['failed_runs']} failed)" if r["failed_runs"] else ""
        print(
            f"{r['n']:>6}  {r['tool']:<15} {fmt(r['median_wall_s'], '8.1f')} {fmt(r['median_startup_s'], '8.1f')}"
            f" {fmt(r['median_images_per_s'], '8.0f')}"
            f" {fmt(r['median_cpu_s'], '8.1f')} {fmt(r['median_cpu_tree_sampled_s'], '8.1f')}"
            f" {fmt(r['median_peak_rss_mb'], '8.0f')} {fmt(r['median_server_cpu_s'], '8.1f')}"
            f"  {','.join(map(str, r['successes']))}{fails}"
        )
    print(
        "medians over runs; start s = command to first request; CPU s = rusage of reaped children, CPU s* = psutil "
        "tree samples; RSS = peak summed tree RSS; srv CPU = the loopback server's CPU s in the run"
    )
    for key, x in ratio.items():
        tool, n = key.split("@")
        print(f"N={n}: {tool}/img2dataset images/s = {fmt(x, '.2f')}")


def tool_versions() -> dict:
    def version(python: Path, dist: str) -> str | None:
        if not python.exists():
            return None
        cmd = [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        return proc.stdout.strip() or None

    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {
        "capfactory": version(VENV_PY, "capfactory"),
        "capfactory_git": commit,
        "img2dataset": version(BENCH_VENV / "bin" / "python", "img2dataset"),
    }


@contextlib.contextmanager
def running_prefect_api(wanted: bool) -> Iterator[str | None]:
    """A Prefect API server for the capfactory-api runs, up before they start (as a user's `prefect server start`
    would be); stopped at the end."""
    if not wanted:
        yield None
        return
    sys.path.insert(0, str(ROOT))
    from infra.prefect_server import start_temporary_server, stop_server, wait_until_healthy

    proc, api_url = start_temporary_server()
    try:
        wait_until_healthy(proc, api_url)
        yield api_url
    finally:
        stop_server(proc)


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,10000", help="comma-separated URL counts (default 2000,10000)")
    p.add_argument("--runs", type=int, default=3, help="runs per tool and size (default 3)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a tool run is killed (default 600)")
    p.add_argument("--images", type=Path, default=PHOTOS / "images",
                   help="folder of .jpg files to serve (default: the COCO photos)")
    p.add_argument(
        "--i2d-threads",
        type=int,
        default=32,
        help="img2dataset --thread_count per process (default 32; img2dataset's own default is 256)",
    )
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(args.tools) - set(TOOLS):
        p.error(f"unknown tools: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "img2dataset" in args.tools:
        ensure_bench_venv()
    images = args.images.resolve()
    names, captions = image_names(images), first_captions(images.parent / "captions.jsonl")
    if not names:
        raise SystemExit(f"no .jpg files in {images}")
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="capfactory-bench-") as tmp:
        work = Path(tmp)
        server = LoopbackServer(VENV_PY, images, cwd=ROOT, log_path=work / "server.log")
        with server as base_url, running_prefect_api("capfactory-api" in args.tools) as api_url:
            print(f"loopback server at {base_url}; {len(names)} images from {images}; most common sizes: "
                f"{', '.join(list(image_sizes(images, names))[:4])}",
                  flush=True)
            for n in args.sizes:
                urls = work / f"urls-{n}.parquet"
                write_url_list(urls, base_url, n, names, captions)
                for run_idx in range(args.runs):
                    for tool in args.tools:  # ABAB: same order every round
                        rec = run_tool(tool, n, urls, work, run_idx, args, base_url, api_url, server.proc.pid)
                        records.append(rec)
                        print(
                            f"N={n} run {run_idx} {tool}: wall {fmt(rec.get('wall_s'), '.1f')} s, start-up "
                            f"{fmt(rec.get('startup_s'), '.1f')} s, "
                            f"{rec['successes']} ok{', ' + rec['error'] if rec.get('error') else ''}",
                            flush=True,
                        )
    rows = summarize(records, args.sizes, args.tools)
    ratio = ratios(rows, args.sizes)
    print_table(rows, ratio)
    print_memory(records)
    result = {
        "benchmark": "ingest",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "sizes": args.sizes,
            "runs": args.runs,
            "tools": args.tools,
            "timeout_s": args.timeout,
            "image_size": IMAGE_SIZE,
            "resize_mode": RESIZE_MODE,
            "encode_format": ENCODE,
            "processes": PROCESSES,
            "shard_size": SHARD_SIZE,
            "img2dataset_thread_count": args.i2d_threads,
            "order": "ABAB",
            "images_dir": str(images),
            "images": len(names),
            "image_sizes": image_sizes(images, names),
        },
        "machine": machine_info(),
        "versions": tool_versions(),
        "summary": rows,
        "ratio_over_img2dataset_images_per_s": ratio,
        "runs": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
