"""Where ingest's CPU goes: the per-image split of `process_image` and the split of one whole ingest shard.

1. Per image: `process_image` over the real photos (COCO, and the ICDAR scene-text images), CPU seconds of the
   calling thread per step (tasks.images.Laps): decode (open, header checks, JPEG draft decode), transpose/convert,
   resize (+ crop/pad), hash (sha256 + phash), encode (training copy), analysis copy. `--rounds` passes over the
   set; the median pass is reported.
2. Decode + resize alternatives, alternating per round (`--candidates`): the shipped Pillow path (JPEG draft
   1/2, 1/4, 1/8), Pillow with a full decode, and libjpeg-turbo's M/8 scales through simplejpeg (not a
   dependency: measured only when importable, e.g. `pip install --target /tmp/sj simplejpeg==1.9.0` and
   PYTHONPATH=/tmp/sj): CPU per image and PSNR against a Lanczos resize of the full decode.
3. One shard: `--shard-size` loopback URLs (infra.loopback_server in its own process, serving the COCO photos
   under distinct paths) through tasks.ingest.plan_ingest + ingest_shard in this process, twice. The plain run
   gives the process CPU and the image processing CPU (thread CPU inside process_image, which runs on ingest's
   executor thread). The profiled run (cProfile on thread CPU time, main thread) splits the rest by the cumulative
   time of ingest_shard's steps: HTTP client (the asyncio.run of the fetches: aiohttp and the event loop; the
   images are processed on the other thread), tar writing (TarWriter and the store's put_file of the tar), Parquet
   writing (Table.from_pylist and put_parquet); their shares of the profiled main thread are applied to the plain
   run's main-thread CPU, and what is left is "other". A 20-URL shard runs first, so imports count nowhere.

Prints two tables and writes JSON (default bench/results/image_path.json). Run:
    .venv/bin/python bench/image_path.py [--rounds 5] [--shard-size 2000] [--candidates]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import LoopbackServer, machine_info  # noqa: E402
from bench.ingest import write_url_list  # noqa: E402
from infra.settings import DownloadConfig, IngestConfig, InputSpec  # noqa: E402
from infra.store import LocalStore  # noqa: E402
from tasks import ingest  # noqa: E402
from tasks.images import Laps, process_image, target_size  # noqa: E402

DATA = Path("/work/shared/data") if Path("/work/shared/data").is_dir() else ROOT.parent / "shared" / "data"
SETS = {"coco": DATA / "photos" / "images", "icdar": DATA / "text_images" / "icdar2015_test"}
STEPS = ("decode", "transpose", "resize", "hash", "encode", "analysis")
# ingest_shard's steps on the main thread, as (file suffix, function name part) of the profile's entries. Where an
# entry matches several functions the outermost counts (asyncio.run calls Runner.run); the entries of different
# steps do not call each other, so their cumulative times add up.
STEPS_OF_SHARD = {
    "http": (("asyncio/runners.py", "run"),),
    "tar": (("tasks/shards.py", "add_sample"), ("tasks/shards.py", "add_raw"), ("tasks/shards.py", "finish"),
            ("infra/store.py", "put_file")),
    "parquet": (("", "from_pylist"), ("infra/store.py", "put_parquet")),
}


def per_image_split(files: list[Path], rounds: int) -> dict:
    datas = [p.read_bytes() for p in files]
    cfg = IngestConfig().images
    passes = []
    for _ in range(rounds):
        totals = dict.fromkeys(STEPS, 0.0)
        wall = time.perf_counter()
        for data in datas:
            laps = Laps()
            process_image(data, cfg, laps=laps)
            for step, s in laps.seconds.items():
                totals[step] += s
        passes.append({**{k: v / len(datas) for k, v in totals.items()},
                       "wall": (time.perf_counter() - wall) / len(datas)})
    median = sorted(passes, key=lambda p: sum(p[s] for s in STEPS))[len(passes) // 2]
    return {"images": len(datas), "rounds": rounds, "cpu_s_per_image": {s: median[s] for s in STEPS},
            "cpu_s_per_image_total": sum(median[s] for s in STEPS), "wall_s_per_image": median["wall"]}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def _pil(data: bytes, size: tuple[int, int], draft: bool) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if draft:
        img.draft("RGB", (max(size[0], 32), max(size[1], 32)))
    return img.convert("RGB").resize(size, Image.Resampling.BOX)


def _simplejpeg(data: bytes, size: tuple[int, int]) -> Image.Image:
    import simplejpeg  # optional, see the module docstring

    img = Image.open(io.BytesIO(data))
    m = next((m for m in range(1, 8) if -(-img.width * m // 8) >= size[0] and -(-img.height * m // 8) >= size[1]), 8)
    buf = simplejpeg.decode_jpeg(data, "RGBX", min_width=-(-img.width * m // 8), min_height=-(-img.height * m // 8))
    return Image.frombuffer("RGBX", buf.shape[1::-1], buf, "raw", "RGBX", 0, 1).resize(size, Image.Resampling.BOX)


def candidates(files: list[Path], rounds: int) -> dict:
    """Decode + resize to the default 256 px keep_ratio target: CPU s per image (median round) and PSNR (dB)
    against a Lanczos resize of the full decode."""
    cfg = IngestConfig().images
    datas = [p.read_bytes() for p in files]
    sizes = [target_size(*Image.open(io.BytesIO(d)).size, cfg) for d in datas]
    refs = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB").resize(s, Image.Resampling.LANCZOS))
            for d, s in zip(datas, sizes, strict=True)]
    variants = {"pil draft (shipped)": lambda d, s: _pil(d, s, True), "pil full decode": lambda d, s: _pil(d, s, False)}
    if importlib.util.find_spec("simplejpeg"):
        variants["simplejpeg M/8"] = _simplejpeg
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    psnr: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.process_time()
            outs = [fn(d, s) for d, s in zip(datas, sizes, strict=True)]
            cpu[name].append((time.process_time() - t) / len(datas))
            psnr[name] = [_psnr(np.asarray(o.convert("RGB")), r) for o, r in zip(outs, refs, strict=True)]
    return {name: {"cpu_s_per_image": statistics.median(cpu[name]), "psnr_vs_lanczos_mean": statistics.mean(p),
                   "psnr_vs_lanczos_min": min(p)} for name, p in psnr.items()}


def _ingest(n: int, work: Path, dataset: str, profile: cProfile.Profile | None) -> dict:
    image_cpu = [0.0]

    def timed(data, cfg):  # ingest calls process_image on its executor thread: count that thread's CPU
        t = time.thread_time()
        try:
            return process_image(data, cfg)
        finally:
            image_cpu[0] += time.thread_time() - t

    cfg = IngestConfig(shard_size=n, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
    store = LocalStore(work / "store")
    shards = ingest.plan_ingest(store, dataset, [InputSpec(path=str(work / "urls.parquet"))], cfg).todo
    original, ingest.process_image = ingest.process_image, timed
    cpu, main, wall = time.process_time(), time.thread_time(), time.perf_counter()
    try:
        if profile:
            profile.enable()
        stats = [ingest.ingest_shard(store.uri, dataset, s, cfg) for s in shards]
        if profile:
            profile.disable()
    finally:
        ingest.process_image = original
    ok = sum(s["counts"].get("ok", 0) for s in stats)
    return {"cpu_s": time.process_time() - cpu, "main_thread_cpu_s": time.thread_time() - main,
            "wall_s": time.perf_counter() - wall, "image_cpu_s": image_cpu[0], "ok": ok}


def shard_split(n: int, work: Path) -> dict:
    with LoopbackServer(Path(sys.executable), SETS["coco"], ROOT, work / "server.log") as base_url:
        names = sorted(p.name for p in SETS["coco"].iterdir() if p.suffix.lower() == ".jpg")
        write_url_list(work / "urls.parquet", base_url, 20, names, {})
        _ingest(20, work, "warmup", None)
        write_url_list(work / "urls.parquet", base_url, n, names, {})
        plain = _ingest(n, work, "plain", None)
        profile = cProfile.Profile(time.thread_time)
        profiled = _ingest(n, work, "profiled", profile)
    entries = pstats.Stats(profile).stats.items()
    cum = {step: sum(max((ct for (path, _, name), (_, _, _, ct, _) in entries
                          if path.endswith(suffix) and part in name), default=0.0) for suffix, part in parts)
           for step, parts in STEPS_OF_SHARD.items()}
    main = plain["cpu_s"] - plain["image_cpu_s"]
    parts = {k: main * v / profiled["main_thread_cpu_s"] for k, v in cum.items()}
    parts["image processing"] = plain["image_cpu_s"]
    parts["other"] = plain["cpu_s"] - sum(parts.values())
    return {"urls": n, "ok": plain["ok"], "cpu_s": plain["cpu_s"], "wall_s": plain["wall_s"],
            "profiled_run": profiled, "profiled_cumulative_s": cum,
            "cpu_s_per_1000": {k: v / n * 1000 for k, v in parts.items()},
            "percent": {k: 100 * v / plain["cpu_s"] for k, v in parts.items()}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="passes over each image set (default 5; median reported)")
    p.add_argument("--shard-size", type=int, default=2000, help="loopback URLs in the profiled shard (default 2000; "
                   "0 skips the shard)")
    p.add_argument("--candidates", action="store_true", help="also time decode + resize alternatives")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "image_path.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict = {"machine": machine_info(), "per_image": {}}
    head = " ".join(f"{s:>10s}" for s in STEPS)
    print(f"{'set':8s} {'n':>4s} {head} {'total':>8s} {'wall':>8s}  (CPU ms/image)")
    for name, folder in SETS.items():
        r = per_image_split(sorted(folder.glob("*.jpg")), args.rounds)
        result["per_image"][name] = r
        print(f"{name:8s} {r['images']:4d} " + " ".join(f"{r['cpu_s_per_image'][s] * 1e3:10.3f}" for s in STEPS)
              + f" {r['cpu_s_per_image_total'] * 1e3:8.3f} {r['wall_s_per_image'] * 1e3:8.3f}")
    if args.candidates:
        result["candidates"] = {}
        print(f"\n{'set':8s} {'decode + resize':22s} {'CPU ms/img':>10s} {'PSNR mean':>10s} {'PSNR min':>9s}")
        for name, folder in SETS.items():
            result["candidates"][name] = rows = candidates(sorted(folder.glob("*.jpg")), args.rounds)
            for variant, r in rows.items():
                print(f"{name:8s} {variant:22s} {r['cpu_s_per_image'] * 1e3:10.3f} {r['psnr_vs_lanczos_mean']:10.2f} "
                      f"{r['psnr_vs_lanczos_min']:9.2f}")
    if args.shard_size:
        with tempfile.TemporaryDirectory(prefix="image_path_") as tmp:
            r = shard_split(args.shard_size, Path(tmp))
        result["shard"] = r
        print(f"\nshard of {r['urls']} URLs ({r['ok']} ok): {r['cpu_s']:.2f} CPU s, {r['wall_s']:.2f} wall s")
        for k, v in r["cpu_s_per_1000"].items():
            print(f"  {k:18s} {r['percent'][k]:5.1f} %  {v:6.3f} CPU s / 1000 images")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
