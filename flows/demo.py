"""`capfactory demo`: a real crawl on embedded defaults, offline.

scikit-image's sample photos (shipped inside its PyPI wheel) are served from a loopback HTTP server together
with a few hostile URLs (404, HTML served as JPEG, a truncated JPEG, a decompression bomb, an opt-out, a path
robots.txt disallows, a redirect loop, a redirect to a link-local address); the ingest flow crawls them into
the local store with only 127.0.0.0/8 opened in the SSRF guard; then the vision experts run over the shards, and
the LLM fusion stage writes short and dense captions (SmolLM2-135M in-process), the captions are translated
to Portuguese (Bergamot), scored (NSFW, language), validated (Great Expectations), published and reported.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from infra.loopback_server import ImageServer
from infra.settings import ExtractConfig, Settings
from tasks.inputs import InputError

# The photos and an alt-text for each, as a web page might carry it.
PHOTOS = {
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


def sample_photos() -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo crawls scikit-image's sample photos: pip install --no-deps scikit-image==0.26.0")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    photos = [data / name for name in PHOTOS if (data / name).is_file()]
    if not photos:
        raise InputError(f"no sample photos found in {data}")
    return photos


def run_demo(store: str | None, samples: int, dataset: str) -> dict:
    """Every stage through the `build` flow on one Dask cluster. Returns the build summary."""
    from flows.build import run_build

    photos = sample_photos()
    models_dir = Settings().models_dir
    detector = Path(models_dir) / ExtractConfig().detector.model
    experts = ["ocr", "objects", "attributes"] if detector.is_file() else ["ocr"]
    if not detector.is_file():
        print(f"(no detector model at {detector}: the demo runs OCR only; set CAPFACTORY_MODELS_DIR to a folder "
              "with detector/yolox_nano.onnx for objects and attributes)")
    with ImageServer(photos, robots_txt=ROBOTS) as server, tempfile.TemporaryDirectory() as tmp:
        urls = server.image_urls(samples) + [server.url(p) for p in FAULTS]
        # Repeated photos carry the same alt-text, so fusion sends each distinct prompt once per shard.
        captions = [PHOTOS[photos[i % len(photos)].name] for i in range(samples)] + ["a photo"] * len(FAULTS)
        url_list = Path(tmp) / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
        spec = {
            "name": dataset,
            "store": store or Settings().store,
            "inputs": [{"path": str(url_list)}],
            "ingest": {"shard_size": max(50, (len(urls) + 1) // 2),
                       "download": {"allow_cidrs": ["127.0.0.0/8"], "total_timeout": 10, "retries": 1,
                                    "backoff": 0.1}},
            "extract": {"experts": experts},
            "translate": {"languages": ["pt"]},
        }
        return run_build(spec, progress=True)
