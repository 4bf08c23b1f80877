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
from prefect.runtime import flow_run

from flows.preflight import needs_gpu, preflight, selected_stages
from flows.stage import run_in_flow
from infra.lease import dataset_lease
from infra.runtime import flow_runtime
from infra.settings import DatasetSpec, Settings, build_spec, load_spec
from infra.store import open_store
from infra.stored_spec import save_spec
from tasks.stage import ShardStage


def resolve_build_spec(spec: DatasetSpec | dict | str) -> DatasetSpec:
    if isinstance(spec, DatasetSpec):
        return spec
    if isinstance(spec, str):
        return load_spec(spec)
    return build_spec(spec)


def build_stages(spec: DatasetSpec, chosen: tuple[str, ...]) -> list:
    """The chosen stages configured by the spec; every shard stage is planned (and its model servers asked for
    one answer) here, so a model that cannot be provided fails before anything starts."""
    stages = preflight(spec, chosen, str(Path(Settings().models_dir).resolve()))
    for stage in stages:
        if isinstance(stage, ShardStage):
            stage.check_backends()
    return stages


def _warm(stages) -> tuple[str, ...]:
    # The first stage's modules only: the workers import them while the Prefect server boots, and the first shard
    # starts sooner. A later stage's (GX, matplotlib, the model stacks) are imported by its first task, not here.
    return tuple(stages[0].warm) if stages else ()


@flow(name="build", log_prints=True)
def build_flow(spec: dict | str, stages: list[str] | None = None, dask_address: str | None = None,
               workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the stages of a dataset spec (a YAML path or the spec as a mapping) in pipeline order. Run by a
    Prefect worker, it starts a LocalCluster (or attaches to `dask_address` / CAPFACTORY_DASK_ADDRESS)."""
    logger = get_run_logger()
    ds = resolve_build_spec(spec)
    stages = build_stages(ds, selected_stages(ds, stages))
    settings = Settings()
    store = ds.store or settings.store
    results: dict[str, Any] = {"dataset": ds.name, "store": store, "stages": {}, "seconds": {}}
    # One writer per dataset at a time (a CLI build, a scheduled refresh, a stage deployment): the second is refused.
    opened = open_store(store)
    with dataset_lease(opened, ds.name, run_id=str(flow_run.id)), \
            flow_runtime(dask_address or settings.dask_address, workers or settings.dask_workers,
                         gpu=needs_gpu(stages), warm=_warm(stages)) as runner:
        save_spec(opened, ds)  # later commands on the dataset (publish, report, a stage alone) use it
        for stage in stages:
            logger.info("stage %s of %s", stage.name, ds.name)
            started = time.monotonic()
            try:
                results["stages"][stage.name] = run_in_flow(stage, ds, store, runner, progress)
            except Exception as e:
                raise RuntimeError(f"stage {stage.name!r} of {ds.name!r} failed: {e}; fix it and run build again: "
                                   "finished shards of every stage are kept") from e
            finally:
                results["seconds"][stage.name] = round(time.monotonic() - started, 2)
    chosen = list(results["seconds"])
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
    built = build_stages(ds, chosen)  # the store, inputs, models and model servers: all before anything starts
    settings = Settings()
    with flow_runtime(dask_address or settings.dask_address, workers or settings.dask_workers,
                      gpu=needs_gpu(built), warm=_warm(built)) as runner:
        return build_flow(spec=ds.to_json(), stages=list(chosen), dask_address=runner.address, workers=workers,
                          progress=progress)
