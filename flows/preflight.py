"""What is checked before anything starts: the stages configured and planned (inputs, columns, models), and the
store opened (URI, credentials, reachability). Imports neither Prefect nor Dask, so a mistake is one `error:` line
within a second or two instead of after their start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infra.settings import DatasetSpec, Settings, SpecError
from infra.stages import in_order, stage_class
from infra.store import open_store
from tasks.stage import ShardStage


def make_stage(name: str, spec: DatasetSpec, models_dir: str | None = None, **options: Any):
    """The stage `name` configured by its spec section (shard stages also take the models folder and options such
    as ingest's `retry_failed`)."""
    cls = stage_class(name)
    if not issubclass(cls, ShardStage):
        return cls()
    models_dir = str(Path(models_dir or Settings().models_dir).resolve())
    return cls.from_spec(spec, models_dir, **options)


def needs_gpu(stages) -> bool:
    """Whether local workers must advertise a GPU: some stage's plan places its tasks on one."""
    return any(isinstance(s, ShardStage) and s.plan().gpu for s in stages)


def selected_stages(spec: DatasetSpec, stages: list[str] | None) -> tuple[str, ...]:
    try:
        return in_order(tuple(stages) if stages else spec.stages)  # always in pipeline order
    except ValueError as e:
        raise SpecError(str(e)) from None


def preflight(spec: DatasetSpec, names: tuple[str, ...], models_dir: str | None = None, **options: Any) -> list:
    """The stages `names`, each planned (raising what a user can fix), after the store was opened; cheap: no model
    server is asked anything (`ShardStage.check_backends` does that)."""
    open_store(spec.store or Settings().store)
    stages = [make_stage(name, spec, models_dir, **options) for name in names]
    for stage in stages:
        if isinstance(stage, ShardStage):
            stage.plan()
    return stages
