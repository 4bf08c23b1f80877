"""The one flow skeleton of the shard stages, and the one way any stage is run: in a subflow of `build`, or alone
from the CLI on its own Prefect API + Dask cluster.

A shard-stage flow: plan (every user-fixable error before any task runs) -> prepare (the stage's dataset-wide
first step, e.g. ingest's manifests) -> shard status -> GPU placement from the plan -> one task per shard ->
gather with a progress bar -> finish (dataset-wide last step, e.g. dedup) -> totals, summary artifact -> raise if a
shard failed (the finished ones are kept).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from contextlib import nullcontext
from functools import cache
from typing import Any

import dask
from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import failure_message, gather_shards
from flows.preflight import needs_gpu, preflight
from infra.lease import dataset_lease
from infra.models import ModelUnavailable
from infra.runtime import flow_runtime
from infra.settings import DatasetSpec, Settings
from infra.stages import migrate_layout, stage_class
from infra.store import open_store
from infra.stored_spec import save_spec
from tasks.stage import BackendError, ShardStage, StageError, merge_totals, progress_topic

log = logging.getLogger("capfactory")


def open_dataset(store: str | None, dataset: str):
    """The store, with the dataset moved to the current layout if it was built with the old folder names."""
    opened = open_store(store or Settings().store)
    moved = migrate_layout(opened, dataset)
    if moved:
        log.warning("moved %d objects of %s from the old folder names to the stage names", moved, dataset)
    return opened


def worth_retrying(task, task_run, state) -> bool:
    """A failed shard task is retried unless trying again cannot help: a user error, a model that cannot be
    loaded, or a backend that refused (401, a bad request) rather than went away."""
    try:
        state.result()
    except BackendError as e:
        return e.transient
    except (StageError, ModelUnavailable):
        return False
    except Exception:
        return True
    return True


@cache
def _shard_task(name: str, retries: int):
    def shard_task(stage: ShardStage, store_uri: str, dataset: str, shard: int) -> dict:
        return stage.run_shard(store_uri, dataset, shard)

    # The function's name is the tasks' key prefix in the Dask dashboard and task stream: one per stage.
    shard_task.__name__ = shard_task.__qualname__ = f"{name}_shard_task"
    return task(name=f"{name}-shard", task_run_name=f"{name}-shard-{{shard:05d}}", persist_result=False,
                retries=retries, retry_delay_seconds=2, retry_condition_fn=worth_retrying)(shard_task)


@task(persist_result=False)
def prepare_task(stage: ShardStage, store_uri: str, dataset: str) -> dict:
    return stage.prepare(store_uri, dataset)


@task(persist_result=False, retries=1, retry_delay_seconds=2)
def finish_task(stage: ShardStage, store_uri: str, dataset: str, stats: list[dict], done: list[int],
                failed: list[int]) -> dict:
    return stage.finish(store_uri, dataset, stats, done, failed)


def header_line(stage: str, result: dict) -> str:
    return (f"\n{stage} of {result['dataset']} in {result['store']}: {len(result['shards_run'])} shards run, "
            f"{len(result['shards_already_done'])} already done, {len(result['shards_waiting'])} waiting, "
            f"{len(result['shards_failed'])} failed")


def check_gpu_workers(stage: ShardStage) -> None:
    """A stage placed on a GPU needs a worker that advertises one, or its tasks wait forever: say so at once."""
    from prefect.context import FlowRunContext

    client = FlowRunContext.get().task_runner.client
    workers = client.scheduler_info()["workers"]
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise StageError(f"the {stage.name} stage runs on a GPU ({stage.plan().backends}) but none of the "
                         f"{len(workers)} Dask workers at {client.scheduler.address} advertises one: start them "
                         "with `dask worker ... --resources GPU=1`, or leave out --dask-address (local workers "
                         "then advertise it)")


def _run_shard_stage(stage: ShardStage, dataset: str, store: str | None, progress: bool) -> dict:
    logger = get_run_logger()
    plan = stage.plan()  # a backend that cannot be provided fails here, before any task runs
    opened = open_dataset(store, dataset)
    store_uri = opened.uri
    prepared = prepare_task.with_options(name=f"prepare-{stage.name}")(stage, store_uri, dataset) \
        if stage.has_prepare else {}
    for warning in prepared.pop("warnings", []):
        logger.warning("%s", warning)
    todo, done, waiting = stage.preflight(opened, dataset)
    if waiting:
        logger.warning("%d shards wait for %s and are left for a later run: %s", len(waiting),
                       ", ".join(stage.required()), waiting)
    logger.info("%s on %d shards (%d already done); backends: %s", stage.name, len(todo), len(done),
                plan.backends or "-")
    samples = {s: stage.shard_samples(opened, dataset, s) for s in todo}
    shard_task = _shard_task(stage.name, stage.retries)
    if plan.gpu and todo:
        check_gpu_workers(stage)
    with dask.annotate(resources={"GPU": 1}) if plan.gpu else nullcontext():  # the GPU rule: the plan decides
        futures = {shard_task.submit(stage, store_uri, dataset, s): s for s in todo}
    finished, failed = gather_shards(futures, samples, f"{stage.name} {dataset}", progress, logger,
                                     topic=progress_topic(stage.name, dataset))
    finished.sort(key=lambda s: s["shard"])
    result = {"stage": stage.name, "dataset": dataset, "store": store_uri, "config_hash": stage.config_hash,
              "backends": plan.backends, "shards_run": [s["shard"] for s in finished], "shards_failed": sorted(failed),
              "shards_already_done": done, "shards_waiting": waiting, **prepared, **merge_totals(finished)}
    result.update(finish_task.with_options(name=f"finish-{stage.name}")(stage, store_uri, dataset, finished, done,
                                                                        sorted(failed)))
    create_markdown_artifact("\n".join([f"# {stage.name} of `{dataset}`", header_line(stage.name, result).strip(),
                                        "", *stage.summary(result)]),
                             key=f"{stage.name}-summary", description=f"{stage.name} of {dataset}")
    if failed:
        raise RuntimeError(failure_message(failed))
    return result


def _shard_stage_flow(name: str) -> Flow:
    def run(dataset: str, config: dict, store: str | None = None, models_dir: str | None = None,
            options: dict | None = None, progress: bool = False) -> dict:
        stage = stage_class(name).from_config(config, models_dir, **(options or {}))
        return _run_shard_stage(stage, dataset, store, progress)

    run.__doc__ = stage_class(name).description
    return flow(name=name, log_prints=True)(run)


@cache
def stage_flow(name: str) -> Flow:
    """The Prefect flow of a stage: the shared skeleton for shard stages, flows/<name>.py for the others."""
    if issubclass(stage_class(name), ShardStage):
        return _shard_stage_flow(name)
    return getattr(importlib.import_module(f"flows.{name}"), f"{name}_flow")


def run_in_flow(stage, spec: DatasetSpec, store: str, runner, progress: bool) -> dict:
    """Run one stage as a flow (a subflow when called inside `build`) on the given task runner."""
    run = stage_flow(stage.name).with_options(task_runner=runner)
    if isinstance(stage, ShardStage):
        return run(dataset=spec.name, config=stage.config.model_dump(mode="json"), store=store,
                   models_dir=stage.models_dir, options=stage.options, progress=progress)
    kwargs = {"progress": progress} if "progress" in inspect.signature(run.fn).parameters else {}
    return run(dataset=spec.name, store=store, spec=spec, **kwargs)


def run_stage(name: str, spec: DatasetSpec, *, models_dir: str | None = None, dask_address: str | None = None,
              workers: int | None = None, progress: bool = False, keep_spec: bool = False, **options: Any) -> dict:
    """`capfactory <stage>`: plan first (errors before anything starts: inputs, models, the store), then the
    Prefect API and the Dask cluster, then the stage's flow on them. `keep_spec`: the run was given a spec, which
    is kept with the dataset for later commands."""
    [stage] = preflight(spec, (name,), models_dir, **options)  # the store, inputs and models: fail here, at once
    gpu = needs_gpu([stage])
    settings = Settings()
    store = spec.store or settings.store
    opened = open_store(store)
    # One writer per dataset at a time: a second run is refused, naming this one.
    with dataset_lease(opened, spec.name):
        if keep_spec:
            save_spec(opened, spec)
        if isinstance(stage, ShardStage):
            if not stage.has_prepare:
                stage.preflight(open_dataset(store, spec.name), spec.name)  # a dataset it cannot run on fails here
            stage.check_backends()  # so does a model server that is down, hangs or refuses
        with flow_runtime(dask_address or settings.dask_address, workers or settings.dask_workers, gpu=gpu,
                          warm=stage.warm) as runner:
            return run_in_flow(stage, spec, store, runner, progress)
