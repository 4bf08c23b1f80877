"""Shared fixtures: the shared data (read in place from ../shared, never copied) and a loopback image server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test runs keep their Prefect database away from the user's ~/.prefect (set before Prefect is imported).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="capfactory-test-prefect-"))
# Nothing may download at run time in tests: model hubs fail at once instead of retrying for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

from infra.loopback_server import ImageServer

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS_DIR = SHARED / "data" / "photos" / "images"
ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The shared real photos (*.jpg), sorted."""
    paths = sorted(PHOTOS_DIR.glob("*.jpg"))
    assert len(paths) >= 3, f"the shared photos are missing from {PHOTOS_DIR} (the tests read ../shared/data)"
    return paths


@pytest.fixture
def image_server(photos: list[Path]) -> Iterator[ImageServer]:
    """A fresh loopback server (so `hits` start at zero) over three photos, robots.txt disallowing /private/."""
    with ImageServer(photos[:3], robots_txt=ROBOTS_TXT) as srv:
        yield srv


# A tiny open_clip architecture (no CLIP weights exist on these machines): tests build it with random weights.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """The tiny open_clip model with random weights saved as a `local-dir:` folder (loadable in any process, Dask
    workers included, unlike a model config registered in the test process)."""
    open_clip = pytest.importorskip("open_clip")
    import json

    import torch

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"
