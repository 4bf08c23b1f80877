"""Shared fixtures: the shared photo set (read in place, never copied) and a loopback image server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.loopback_server import ImageServer

PHOTOS_DIR = Path("/work/shared/data/photos/images")
ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The shared real photos (*.jpg), sorted; skips the test when they are not present."""
    paths = sorted(PHOTOS_DIR.glob("*.jpg"))
    if len(paths) < 3:
        pytest.skip(f"shared photos not present in {PHOTOS_DIR}")
    return paths


@pytest.fixture
def image_server(photos: list[Path]) -> Iterator[ImageServer]:
    """A fresh loopback server (so `hits` start at zero) over three photos, robots.txt disallowing /private/."""
    with ImageServer(photos[:3], robots_txt=ROBOTS_TXT) as srv:
        yield srv
