"""`capfactory demo`: a real crawl on embedded defaults, offline.

scikit-image's sample photos (shipped inside its PyPI wheel) are served from a loopback HTTP server together
with a few hostile URLs (404, HTML served as JPEG, a truncated JPEG, a decompression bomb, an opt-out, a path
robots.txt disallows, a redirect loop, a redirect to a link-local address); the ingest flow crawls them into
the local store with only 127.0.0.0/8 opened in the SSRF guard.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from infra.loopback_server import ImageServer
from infra.settings import DownloadConfig, IngestConfig, InputSpec
from tasks.inputs import InputError

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png",
          "brick.png", "grass.png", "gravel.png", "ihc.png", "moon.png", "page.png", "text.png", "horse.png")
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
    from flows.ingest import run_ingest

    with ImageServer(sample_photos(), robots_txt=ROBOTS) as server, tempfile.TemporaryDirectory() as tmp:
        urls = server.image_urls(samples) + [server.url(p) for p in FAULTS]
        captions = [f"sample photo {u.rsplit('/', 1)[-1]}" for u in urls]
        url_list = Path(tmp) / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
        config = IngestConfig(
            shard_size=max(50, (len(urls) + 3) // 4),
            download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), total_timeout=10, retries=1, backoff=0.1),
        )
        return run_ingest(dataset, [InputSpec(path=str(url_list))], store=store, config=config, progress=True)
