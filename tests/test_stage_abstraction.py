"""The stage abstraction: one registry that every consumer reads, the GPU rule decided once from the plan, expert
plug-ins (a toy expert added the documented way reaches the schema, the release and the suite), and datasets built
with the old folder names resuming and refreshing without recomputing anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import great_expectations.expectations as gxe
import numpy as np
import pyarrow as pa
import pytest

import tasks.experts as experts_registry
from expectations.runner import SUITES
from flows.preflight import make_stage, needs_gpu
from infra.deploy import load_project
from infra.settings import DatasetSpec, ExtractConfig, IngestConfig, InputSpec, build_spec
from infra.stages import LEGACY_FOLDERS, ORDER, OUTPUT_STAGES, migrate_layout, stage_class
from infra.store import LocalStore
from tasks.experts import Expert, experts_schema, published_columns
from tasks.extract import ExtractStage
from tasks.ingest import ingest_shard, plan_ingest
from tasks.publish import joined_table
from tasks.shards import read_marker, stage_key
from tasks.stage import ShardStage
from tasks.validate import validate_shard

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = SHARED / "models"


# ---- one registry --------------------------------------------------------------------------------------------------


def test_every_consumer_reads_the_one_registry():
    assert ORDER == ("ingest", "extract", "fuse", "translate", "score", "validate", "publish", "report")
    for name in ORDER:
        cls = stage_class(name)
        assert cls.name == name and cls.description
        if issubclass(cls, ShardStage):
            assert isinstance(DatasetSpec(name="x").section(name), cls.config_type())  # its spec section
    assert tuple(SUITES) == OUTPUT_STAGES  # one suite per stage output, named as the stage
    deployments, _ = load_project()
    stage_deployments = {d["name"]: d for d in deployments if d["name"] in ORDER}
    assert list(stage_deployments) == list(ORDER)
    for name, d in stage_deployments.items():
        assert d["parameters"]["stages"] == [name] and d["description"] == stage_class(name).description
    assert build_spec({"name": "x"}).stages == ORDER


def test_old_section_names_are_read_as_the_stage_names():
    spec = build_spec({"name": "x", "experts": {"experts": ["ocr"]}, "quality": {"nsfw": False},
                       "validation": {"on_failure": "fail", "stages": ["raw", "scores"]}})
    assert spec.extract.experts == ("ocr",) and spec.score.nsfw is False
    assert spec.validation.on_failure == "fail" and spec.validation.stages == ("ingest", "score")
    assert set(spec.to_json()) == {"name", "extract", "score", "validate"}
    with pytest.raises(ValueError, match="old name of the `extract` section"):
        build_spec({"name": "x", "experts": {}, "extract": {}})


# ---- the GPU rule ----------------------------------------------------------------------------------------------------


def test_gpu_placement_is_decided_by_the_plan():
    vllm = make_stage("fuse", DatasetSpec(name="x", fuse={"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct"}))
    assert vllm.plan().gpu  # the default (cpu) profile: vLLM needs a GPU anyway
    assert not make_stage("fuse", DatasetSpec(name="x")).plan().gpu
    remote = DatasetSpec(name="x", fuse={"profile": "gpu", "backend": "openai", "endpoint": "http://127.0.0.1:9/v1",
                                         "model": "m"})
    assert not make_stage("fuse", remote).plan().gpu  # a client of a server has no device of its own
    assert make_stage("extract", DatasetSpec(name="x", extract={"profile": "gpu", "experts": ["ocr"]}),
                      str(MODELS)).plan().gpu
    assert needs_gpu([make_stage("ingest", DatasetSpec(name="x")), vllm])
    assert not needs_gpu([make_stage("ingest", DatasetSpec(name="x")), make_stage("publish", DatasetSpec(name="x"))])


def _folder_spec(tmp_path: Path, photos: list[Path], n: int, name: str, **sections) -> dict:
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for p in photos[:n]:
        shutil.copy(p, folder / p.name)
    return {"name": name, "store": str(tmp_path / "store"), "inputs": [{"path": str(folder)}],
            "ingest": {"shard_size": 3}, **sections}


@pytest.mark.slow
def test_build_places_a_vllm_fuse_on_a_gpu_worker_and_refuses_a_cluster_without_one(tmp_path, photos):
    from distributed import LocalCluster

    from flows.build import run_build

    spec = _folder_spec(tmp_path, photos, 2, "gpu", fuse={"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct"},
                        stages=["ingest", "fuse"])
    # The local workers advertise GPU=1 because the fuse plan needs one, so the fuse task is scheduled and runs:
    # it fails here only because this machine has no vLLM (before, it waited for a GPU worker forever).
    with pytest.raises(RuntimeError, match="vLLM needs a CUDA GPU"):
        run_build(spec, workers=1)
    # A cluster none of whose workers advertises a GPU is refused at once, with what to do.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            pytest.raises(RuntimeError, match=r"fuse stage runs on a GPU.*advertises one.*--resources GPU=1"):
        run_build(spec, dask_address=cluster.scheduler_address)


# ---- experts as plug-ins -------------------------------------------------------------------------------------------


class BrightnessExpert(Expert):
    """A toy expert, added the way CONTRIBUTING.md describes: the mean grey level of the image in [0, 1]."""

    name = "brightness"
    columns = (pa.field("brightness", pa.float32()),)

    @classmethod
    def expectations(cls, inputs):
        return [gxe.ExpectColumnValuesToBeBetween(column="brightness", min_value=0.0, max_value=1.0)]

    def run(self, images, rows):
        for image, row in zip(images, rows, strict=True):
            row["brightness"] = float(np.asarray(image.convert("L"), dtype=np.float32).mean() / 255.0)


def test_a_toy_expert_reaches_the_schema_the_release_and_the_suite(tmp_path, photos, monkeypatch):
    monkeypatch.setattr(experts_registry, "EXPERTS", (*experts_registry.EXPERTS, BrightnessExpert))
    assert "brightness" in experts_schema().names and "brightness" in published_columns()
    store = LocalStore(tmp_path / "store")
    spec = build_spec(_folder_spec(tmp_path, photos, 3, "toy"))
    cfg = IngestConfig(shard_size=3)
    plan_ingest(store, "toy", [InputSpec(path=spec.inputs[0].path)], cfg)
    ingest_shard(store.uri, "toy", 0, cfg)

    stats = ExtractStage(ExtractConfig(experts=("brightness",)), str(MODELS)).run_shard(store.uri, "toy", 0)
    assert stats["counts"] == {"ok": 3}
    table = store.get_parquet(stage_key("toy", "extract", 0, "parquet"))
    values = table.column("brightness").to_pylist()
    assert len(values) == 3 and all(0.0 < v < 1.0 for v in values)
    assert table.column("ocr_text").null_count == 3  # the experts not asked for leave their columns empty
    released = joined_table(store, "toy")
    assert released.column("brightness").to_pylist() == values

    ok = validate_shard(store.uri, "toy", "extract", 0, spec)
    assert ok["success"]
    bad = table.set_column(table.column_names.index("brightness"), "brightness",
                           pa.array([0.5, 7.0, 0.5], pa.float32()))
    store.put_parquet(stage_key("toy", "extract", 0, "parquet"), bad)
    failed = validate_shard(store.uri, "toy", "extract", 0, spec)
    assert not failed["success"]
    assert [f["expectation"] for f in failed["failed"]] == ["expect_column_values_to_be_between"]
    assert len(failed["quarantined"]) == 1


def test_unknown_and_required_experts_are_resolved_when_planned():
    from tasks.extract import plan_experts

    with pytest.raises(ValueError, match=r"extract.experts: unknown expert\(s\) smell"):
        plan_experts(ExtractConfig(experts=("ocr", "smell")), str(MODELS))
    plan = plan_experts(ExtractConfig(experts=("attributes",)), str(MODELS))
    assert [e.name for e in plan.experts] == ["objects", "attributes"]  # attributes reads the objects' boxes
    assert "detector" in plan and "clip" not in plan  # CLIP tags are off without a CLIP model


# ---- datasets built before the stages had one name ----------------------------------------------------------------


def _to_old_layout(root: Path, dataset: str) -> None:
    """What the code before the stage abstraction wrote: folders raw/, experts/, fused/, validation/ (suites named
    like the folders), and extract markers whose input fingerprint is the raw marker unwrapped."""
    base = root / dataset
    for old, new in LEGACY_FOLDERS.items():
        if (base / new).is_dir():
            (base / new).rename(base / old)
    for parent in (base / "validation", base / "validation" / "quarantine"):
        for old, new in LEGACY_FOLDERS.items():
            if (parent / new).is_dir():
                (parent / new).rename(parent / old)
    for marker in (base / "experts").glob("*.stats.json"):
        data = json.loads(marker.read_text())
        raw = json.loads((base / "raw" / marker.name).read_text())
        data["input_marker"] = json.dumps([raw["config_hash"], raw["finished_at"]])
        marker.write_text(json.dumps(data))


@pytest.mark.slow
def test_a_dataset_with_the_old_folder_names_resumes_and_refreshes(tmp_path, photos, monkeypatch):
    from flows.build import run_build

    monkeypatch.setenv("CAPFACTORY_MODELS_DIR", str(MODELS))
    spec = _folder_spec(tmp_path, photos, 3, "legacy", extract={"experts": ["objects"]}, fuse={"outputs": ["short"]},
                        stages=["ingest", "extract", "fuse", "validate"])
    first = run_build(spec, workers=2)
    assert first["stages"]["fuse"]["llm_calls"] == 3
    root = tmp_path / "store"
    made = json.loads((root / "legacy" / "fuse" / "shard-00000.stats.json").read_text())["finished_at"]
    _to_old_layout(root, "legacy")
    assert (root / "legacy" / "raw").is_dir() and not (root / "legacy" / "ingest").exists()

    second = run_build(spec, workers=2)  # nothing to do: every shard of every stage is still current
    assert not any((root / "legacy" / old).exists() for old in LEGACY_FOLDERS)
    assert second["stages"]["ingest"]["shards_run"] == [] and second["stages"]["ingest"]["new_samples"] == 0
    assert second["stages"]["extract"]["shards_run"] == [] and second["stages"]["extract"]["shards_already_done"] == [0]
    assert second["stages"]["fuse"]["shards_run"] == [] and second["stages"]["fuse"].get("llm_calls", 0) == 0
    assert all(shards == [] for shards in second["stages"]["validate"]["validated"].values())

    for p in photos[3:5]:  # the folder grows: only the new shard goes through the stages
        shutil.copy(p, Path(spec["inputs"][0]["path"]) / p.name)
    third = run_build(spec, workers=2)
    assert third["stages"]["ingest"]["new_samples"] == 2
    assert third["stages"]["extract"]["shards_run"] == [1] and third["stages"]["fuse"]["shards_run"] == [1]
    assert third["stages"]["fuse"]["llm_calls"] == 2
    assert read_marker(LocalStore(root), "legacy", "fuse", 0)["finished_at"] == made  # shard 0 was never redone


def test_layout_migration_moves_every_old_folder_and_is_idempotent(tmp_path):
    store = LocalStore(tmp_path)
    keys = ["d/raw/_inputs/shard-00000.parquet", "d/raw/shard-00000.tar", "d/experts/shard-00000.stats.json",
            "d/scores/_semdedup.parquet", "d/validation/raw/shard-00000.json",
            "d/validation/quarantine/scores/shard-00000.parquet", "d/validation/scores/_reference.json",
            "d/validation/data_docs/validations/raw/x.html", "d/published/samples.parquet", "d/embeddings/s.parquet"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert migrate_layout(store, "d") == 9
    assert store.list("d") == sorted([
        "d/ingest/_inputs/shard-00000.parquet", "d/ingest/shard-00000.tar", "d/extract/shard-00000.stats.json",
        "d/score/_semdedup.parquet", "d/validate/ingest/shard-00000.json",
        "d/validate/quarantine/score/shard-00000.parquet", "d/validate/score/_reference.json",
        "d/validate/data_docs/validations/raw/x.html", "d/publish/samples.parquet", "d/embeddings/s.parquet"])
    assert store.get_bytes("d/ingest/shard-00000.tar") == b"d/raw/shard-00000.tar"
    assert migrate_layout(store, "d") == 0


def test_errors_that_cross_the_task_boundary_pickle_with_their_message():
    import pickle

    from infra.models import ModelUnavailable
    from tasks.caption import CaptionError

    for error in (ModelUnavailable("llm", "vllm", "needs a GPU"), CaptionError({1: "timeout"}, 4)):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)


def test_shard_stages_share_the_base_and_name_their_inputs():
    for name in OUTPUT_STAGES:
        cls = stage_class(name)
        assert issubclass(cls, ShardStage)
        assert all(r in ORDER for r in (*cls.reads, *cls.requires))
