"""The `build` parent flow: every stage a dataset spec names, in order, as subflows on one Dask cluster.

Each stage skips the shards whose done marker matches its config hash and its inputs' markers, so `build` is also
the refresh: on a grown input only the new samples go through every stage, and a changed stage config recomputes
that stage and the ones after it (their input fingerprints change), nothing before.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from infra.runtime import flow_runtime
from infra.settings import STAGES, DatasetSpec, Settings, SpecError, build_spec, load_spec

# Modules a local worker imports while the Prefect server boots (the first shard task of each stage needs them).
WARM = ("tasks.ingest", "tasks.extract", "tasks.fuse")


def resolve_build_spec(spec: DatasetSpec | dict | str) -> DatasetSpec:
    if isinstance(spec, DatasetSpec):
        return spec
    if isinstance(spec, str):
        return load_spec(spec)
    return build_spec(spec)


def needs_gpu(spec: DatasetSpec, stages: tuple[str, ...]) -> bool:
    """Whether any requested stage runs a model of the gpu profile (local workers then advertise GPU=1)."""
    section = {"extract": "experts", "fuse": "fuse", "translate": "translate", "score": "quality"}
    return any(getattr(spec, section[s]).profile == "gpu" for s in stages if s in section)


def selected_stages(spec: DatasetSpec, stages: list[str] | None) -> tuple[str, ...]:
    chosen = tuple(stages) if stages else spec.stages
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise SpecError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in chosen)  # always in pipeline order


def run_stage(stage: str, spec: DatasetSpec, store: str, models_dir: str, runner, progress: bool) -> dict:
    """One stage flow as a subflow of the current flow run, on the shared task runner."""
    name = spec.name
    if stage == "ingest":
        from flows.ingest import ingest_flow

        return ingest_flow.with_options(task_runner=runner)(
            dataset=name, inputs=list(spec.inputs), store=store, config=spec.ingest, progress=progress)
    if stage == "extract":
        from flows.extract import extract_flow

        return extract_flow.with_options(task_runner=runner)(
            dataset=name, store=store, config=spec.experts, models_dir=models_dir, progress=progress)
    if stage == "fuse":
        from flows.fuse import fuse_flow

        return fuse_flow.with_options(task_runner=runner)(dataset=name, store=store, config=spec.fuse,
                                                          progress=progress)
    if stage == "translate":
        from flows.translate import translate_flow

        return translate_flow.with_options(task_runner=runner)(
            dataset=name, store=store, config=spec.translate, models_dir=models_dir, progress=progress)
    if stage == "score":
        from flows.score import score_flow

        return score_flow.with_options(task_runner=runner)(
            dataset=name, store=store, config=spec.quality, models_dir=models_dir, progress=progress)
    if stage == "validate":
        from flows.validate import validate_flow

        return validate_flow.with_options(task_runner=runner)(dataset=name, store=store, spec=spec,
                                                              progress=progress)
    if stage == "publish":
        from flows.publish import publish_flow

        return publish_flow.with_options(task_runner=runner)(dataset=name, store=store, spec=spec,
                                                             progress=progress)
    from flows.report import report_flow

    return report_flow.with_options(task_runner=runner)(dataset=name, store=store, spec=spec)


@flow(name="build", log_prints=True)
def build_flow(spec: dict | str, stages: list[str] | None = None, dask_address: str | None = None,
               workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the stages of a dataset spec (a YAML path or the spec as a mapping) in pipeline order. Run by a
    Prefect worker, it starts a LocalCluster (or attaches to `dask_address` / CAPFACTORY_DASK_ADDRESS)."""
    logger = get_run_logger()
    ds = resolve_build_spec(spec)
    chosen = selected_stages(ds, stages)
    settings = Settings()
    store = ds.store or settings.store
    models_dir = str(Path(settings.models_dir).resolve())
    results: dict[str, Any] = {"dataset": ds.name, "store": store, "stages": {}, "seconds": {}}
    with flow_runtime(dask_address or settings.dask_address, workers or settings.dask_workers,
                      gpu=needs_gpu(ds, chosen), warm=WARM) as runner:
        for stage in chosen:
            logger.info("stage %s of %s", stage, ds.name)
            started = time.monotonic()
            try:
                results["stages"][stage] = run_stage(stage, ds, store, models_dir, runner, progress)
            except Exception as e:
                raise RuntimeError(f"stage {stage!r} of {ds.name!r} failed: {e}; fix it and run build again: "
                                   "finished shards of every stage are kept") from e
            finally:
                results["seconds"][stage] = round(time.monotonic() - started, 2)
    rows = "\n".join(f"| {s} | {results['seconds'][s]} |" for s in chosen)
    create_markdown_artifact(f"# Build of `{ds.name}`\n\n| stage | seconds |\n|---|---|\n{rows}\n",
                             key="build-summary", description=f"build of {ds.name}")
    return results


def run_build(spec: DatasetSpec | dict | str, stages: list[str] | None = None, dask_address: str | None = None,
              workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """`capfactory build`: the Prefect API (a temporary server unless PREFECT_API_URL is set) and the Dask
    cluster start side by side, then the build flow runs on them."""
    ds = resolve_build_spec(spec)
    chosen = selected_stages(ds, stages)
    settings = Settings()
    with flow_runtime(dask_address or settings.dask_address, workers or settings.dask_workers,
                      gpu=needs_gpu(ds, chosen), warm=WARM) as runner:
        return build_flow(spec=ds.model_dump(mode="json", exclude_unset=True), stages=list(chosen),
                          dask_address=runner.address, workers=workers, progress=progress)
