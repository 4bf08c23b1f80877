"""Shard layout and I/O: names, the raw WebDataset tar writer, Parquet schemas and done markers.

Layout of a dataset in the store (each folder is named after the stage that writes it, see tasks/registry.py):
    <dataset>/ingest/_inputs/shard-00042.parquet   the samples planned for the shard (written at planning time)
    <dataset>/ingest/shard-00042.tar               WebDataset: KEY.jpg, KEY.txt, KEY.json per good sample, and
                                                   KEY.analysis.<ext> (the copy the experts read) unless it is
                                                   the same as KEY.jpg or analysis copies are off
    <dataset>/ingest/shard-00042.parquet           one row per planned sample, failed ones with their error
    <dataset>/ingest/shard-00042.stats.json        the done marker: written last, carries the config hash
Later stages write `<dataset>/<stage>/shard-00042.parquet` + `.stats.json` the same way.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from infra.store import ArtifactStore, StoreError

SHARD_RE = re.compile(r"shard-(\d{5,})\.parquet$")
RAW = "ingest"  # the stage whose shards every other stage reads
IMAGE_EXTS = (".jpg", ".jpeg", ".webp", ".png")
ANALYSIS = "analysis"  # the WebDataset field prefix of the analysis copy: KEY.analysis.jpg

INGEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("alt_text", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),  # ok | error | opted_out | filtered
    ("error_class", pa.string()),
    ("error", pa.string()),
    ("input_warning", pa.string()),
    ("http_status", pa.int16()),
    ("bytes", pa.int64()),  # size of the original body
    ("mime", pa.string()),  # source format from magic bytes
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),
    ("phash", pa.string()),
    ("duplicate_of", pa.string()),
    ("attempts", pa.int16()),
])


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def stage_key(dataset: str, stage: str, shard: int, ext: str) -> str:
    return f"{dataset}/{stage}/{shard_name(shard)}.{ext}"


def input_key(dataset: str, shard: int) -> str:
    return f"{dataset}/{RAW}/_inputs/{shard_name(shard)}.parquet"


def planned_shards(store: ArtifactStore, dataset: str) -> list[int]:
    """Shard ids that have an input manifest, in order."""
    return sorted(int(m.group(1)) for k in store.list(f"{dataset}/{RAW}/_inputs") if (m := SHARD_RE.search(k)))


def read_marker(store: ArtifactStore, dataset: str, stage: str, shard: int) -> dict | None:
    try:
        return store.get_json(stage_key(dataset, stage, shard, "stats.json"))
    except StoreError:
        return None


def write_marker(store: ArtifactStore, dataset: str, stage: str, shard: int, stats: dict) -> dict:
    """The done marker, written last; returned as stored. It records the Prefect flow run that made the shard
    (provenance)."""
    from prefect.runtime import flow_run

    marker = {**stats, "flow_run_id": flow_run.id, "finished_at": time.time()}
    store.put_json(stage_key(dataset, stage, shard, "stats.json"), marker)
    return marker


def upstream_fingerprint(store: ArtifactStore, dataset: str, shard: int, stages: tuple[str, ...]) -> str:
    """What a stage's shard was made from: the done markers of the stage outputs it read. A re-run of any of them
    changes the fingerprint and so invalidates the shard."""
    marks = [read_marker(store, dataset, stage, shard) or {} for stage in stages]
    return json.dumps([[m.get("config_hash"), m.get("finished_at")] for m in marks])


class TarWriter:
    """Writes a WebDataset tar to a local temporary file; `finish()` returns its path."""

    def __init__(self, workdir: Path):
        fd, name = tempfile.mkstemp(dir=workdir, suffix=".tar")
        self.path = Path(name)
        # tarfile writes each header, body and padding separately: buffer them into few large writes.
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115 - finish()
        self._mtime = time.time()
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = self._mtime
        info.mode = 0o644
        self._tar.addfile(info, _Reader(data))

    def add_sample(self, key: str, ext: str, image: bytes, caption: str | None, meta: dict,
                   analysis: tuple[str, bytes] | None = None) -> None:
        """One sample's members; `analysis` = (ext, bytes) of its analysis copy, stored as KEY.analysis.<ext>."""
        self._add(f"{key}.{ext}", image)
        if analysis is not None:
            self._add(f"{key}.{ANALYSIS}.{analysis[0]}", analysis[1])
        self._add(f"{key}.txt", (caption or "").encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"))
        self.count += 1

    def add_raw(self, name: str, data: bytes) -> None:
        self._add(name, data)

    def finish(self) -> Path:
        self._tar.close()
        self._file.close()
        return self.path


class _Reader:
    """A minimal file object over bytes for tarfile.addfile (cheaper than BytesIO per member)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes):
        self._data, self._pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos:end]
        self._pos += len(chunk)
        return bytes(chunk)


def read_shard_members(store: ArtifactStore, dataset: str, shard: int, want=None) -> dict[str, bytes]:
    """The members of a raw shard's tar, by member name; only those `want(name)` accepts are read."""
    with tempfile.TemporaryDirectory(prefix="capfactory-") as tmp:
        local = Path(tmp) / "shard.tar"
        store.get_file(stage_key(dataset, RAW, shard, "tar"), local)
        with tarfile.open(local) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and (want is None or want(m.name))}


def member_key(name: str) -> str:
    """The sample key of a tar member (WebDataset: the name up to its first dot; keys are hex)."""
    return name.split(".", 1)[0]


def is_image_member(name: str) -> bool:
    """A training copy (KEY.jpg): the image a release ships and CLIP scores."""
    return name.lower().endswith(IMAGE_EXTS) and name.count(".") == 1


def is_analysis_member(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and name.split(".")[1:2] == [ANALYSIS]


def read_shard_images(store: ArtifactStore, dataset: str, shard: int, analysis: bool = False) -> dict[str, bytes]:
    """{key: stored image bytes} of a raw shard: the training copies, or with `analysis` the analysis copy of each
    key that has one and the training copy of the others (a copy the same as the training one is stored once;
    shards ingested before analysis copies have none)."""
    if not analysis:
        members = read_shard_members(store, dataset, shard, is_image_member)
        return {member_key(name): data for name, data in members.items()}
    members = read_shard_members(store, dataset, shard, lambda n: is_image_member(n) or is_analysis_member(n))
    images = {member_key(name): data for name, data in members.items() if is_image_member(name)}
    images.update((member_key(name), data) for name, data in members.items() if is_analysis_member(name))
    return images
