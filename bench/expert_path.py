"""The pipeline path the expert benchmarks score beside the bare engines: files served by a loopback HTTP server,
crawled by ingest (default settings unless told), then the extract stage over the raw shards; the rows of the
extract table come back by file, with the ingest tar's size.

Run alone it reports the storage cost:
`.venv/bin/python bench/expert_path.py [--images DIR] [--settings none,default,0]`
prints the ingest tar's bytes per 1,000 samples for each setting (default: the 150 COCO photos of the dev split).

`image_settings(name)`: the ingest image settings a benchmark can compare: `default` (ImageConfig() as shipped),
`none` (no analysis copy and no skip-reencode: exactly what ingest stored before analysis copies, so the experts
read the 256 px training copy), or a number (`analysis_size`, 0 = the original bytes).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.loopback_server import ImageServer  # noqa: E402
from infra.settings import DownloadConfig, ExtractConfig, ImageConfig, IngestConfig, InputSpec  # noqa: E402
from infra.store import LocalStore  # noqa: E402
from tasks.extract import ExtractStage  # noqa: E402
from tasks.ingest import ingest_shard, plan_ingest  # noqa: E402
from tasks.shards import stage_key  # noqa: E402


def image_settings(name: str) -> ImageConfig:
    if name == "default":
        return ImageConfig()
    if name == "none":
        return ImageConfig(analysis_size=None, skip_reencode=False)
    return ImageConfig(analysis_size=int(name))


def describe(name: str) -> str:
    cfg = image_settings(name)
    what = {None: "training copy only (before)", 0: "analysis = original bytes"}.get(
        cfg.analysis_size, f"analysis copy <= {cfg.analysis_size}px")
    return f"pipeline [{name}]: {what}"


def ingest_and_extract(files: list[Path], extract: ExtractConfig | None, models_dir: str, images: ImageConfig
                       ) -> dict:
    """{"rows": {file: extract row}, "tar_bytes", "samples", "ingest_s", "extract_s", "training_copy_images"};
    with `extract` None, ingest only (no rows)."""
    served = {f"{i}-{path.name}": path.read_bytes() for i, path in enumerate(files)}
    with tempfile.TemporaryDirectory(prefix="capfactory-bench-") as tmp, ImageServer(served) as server:
        urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(served)]
        pq.write_table(pa.table({"url": urls}), Path(tmp) / "urls.parquet")
        store = LocalStore(Path(tmp) / "store")
        cfg = IngestConfig(images=images, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",)))
        started = time.perf_counter()
        shards = plan_ingest(store, "bench", [InputSpec(path=str(Path(tmp) / "urls.parquet"))], cfg).todo
        for shard in shards:
            ingest_shard(store.uri, "bench", shard, cfg)
        ingest_s = time.perf_counter() - started
        tar_bytes = sum((store.root / stage_key("bench", "ingest", s, "tar")).stat().st_size for s in shards)
        out = {"rows": {}, "tar_bytes": tar_bytes, "samples": len(files), "ingest_s": ingest_s}
        if extract is None:
            return out
        started = time.perf_counter()
        stage = ExtractStage(extract, models_dir)
        stats = [stage.run_shard(store.uri, "bench", shard) for shard in shards]
        out["extract_s"] = time.perf_counter() - started
        by_url = {}
        for shard in shards:
            raw = store.get_parquet(stage_key("bench", "ingest", shard, "parquet"), columns=["key", "url", "status"])
            rows = {r["key"]: r for r in store.get_parquet(stage_key("bench", "extract", shard, "parquet")).to_pylist()}
            for r in raw.to_pylist():
                if r["status"] != "ok":
                    raise RuntimeError(f"ingest failed on {r['url']}: {r['status']}")
                by_url[r["url"]] = rows[r["key"]]
    return {**out, "rows": {path: by_url[url] for path, url in zip(files, urls, strict=True)},
            "training_copy_images": sum(s.get("training_copy_images", 0) for s in stats)}


def main(argv: list[str] | None = None) -> int:
    """Storage cost: bytes of ingest tar per 1,000 samples for each image setting."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "photos" / "images")
    ap.add_argument("--settings", default="none,default,0")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "analysis_storage.json")
    args = ap.parse_args(argv)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    originals = sum(p.stat().st_size for p in files)
    results = []
    print(f"{len(files)} images from {args.images}, originals {originals / len(files) / 1024:.1f} KiB each")
    print(f"{'setting':58} {'tar MB / 1,000 samples':>24} {'ingest s':>9}")
    for name in args.settings.split(","):
        r = ingest_and_extract(files, None, "", image_settings(name))
        per_1000 = r["tar_bytes"] / len(files) * 1000
        results.append({"setting": name, "describe": describe(name), "tar_bytes": r["tar_bytes"],
                        "samples": len(files), "bytes_per_1000": per_1000, "ingest_s": r["ingest_s"]})
        print(f"{describe(name):58} {per_1000 / 1e6:24.1f} {r['ingest_s']:9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"originals_bytes": originals, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
