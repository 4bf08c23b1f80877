"""The `extract` flow: vision experts over every finished raw shard, one Dask task per shard."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import gather_shards
from infra.runtime import flow_runtime
from infra.settings import ExpertsConfig, Settings
from infra.store import open_store
from tasks.extract import extract_shard, plan_experts, shards_to_extract
from tasks.ingest import STAGE as RAW
from tasks.shards import read_marker


@task(name="extract-shard", task_run_name="extract-shard-{shard:05d}", persist_result=False, retries=1,
      retry_delay_seconds=2)
def extract_shard_task(store_uri: str, dataset: str, shard: int, config: ExpertsConfig, models_dir: str) -> dict:
    return extract_shard(store_uri, dataset, shard, config, models_dir)


@flow(name="extract", log_prints=True)
def extract_flow(dataset: str, store: str | None = None, config: ExpertsConfig | None = None,
                 models_dir: str | None = None, progress: bool = False) -> dict:
    """Run the configured vision experts over the dataset's raw shards into `<dataset>/experts/`."""
    logger = get_run_logger()
    config = config or ExpertsConfig()
    models_dir = str(Path(models_dir or Settings().models_dir).resolve())
    store_uri = open_store(store or Settings().store).uri
    plan = plan_experts(config, models_dir)  # a model that cannot be provided fails here, before any task runs
    store = open_store(store_uri)
    todo, done, waiting = shards_to_extract(store, dataset, config)
    if not (todo or done or waiting):
        raise ValueError(f"dataset {dataset!r} has no ingested shards in {store_uri}; run `capfactory ingest` first")
    if waiting:
        logger.warning("%d raw shards are not finished and are left for a later run: %s", len(waiting), waiting)
    logger.info("experts %s on %d shards (%d already done); backends: %s", list(config.experts), len(todo),
                len(done), plan)
    samples = {s: read_marker(store, dataset, RAW, s)["samples"] for s in todo}
    # Model tasks of the gpu profile only land on workers that advertise a GPU.
    placement = dask.annotate(resources={"GPU": 1}) if config.profile == "gpu" else nullcontext()
    with placement:
        futures = {extract_shard_task.submit(store_uri, dataset, s, config, models_dir): s for s in todo}
    finished, failed = gather_shards(futures, samples, f"extract {dataset}", progress, logger)
    counts: dict[str, int] = {}
    for stats in finished:
        for k, v in stats["counts"].items():
            counts[k] = counts.get(k, 0) + v
    result = {
        "dataset": dataset, "store": store_uri, "config_hash": config.config_hash(),
        "shards_extracted": sorted(s["shard"] for s in finished), "shards_failed": sorted(failed),
        "shards_already_done": done, "shards_waiting_for_ingest": waiting, "counts": counts,
        "with_text": sum(s["with_text"] for s in finished), "objects": sum(s["objects"] for s in finished),
        "provenance": finished[0]["provenance"] if finished else {},
    }
    create_markdown_artifact(
        f"# Experts on `{dataset}`\n\n{len(finished)} shards; status counts {counts}; "
        f"{result['with_text']} images with text; {result['objects']} objects.\n\nModels: {result['provenance']}",
        key="extract-summary", description=f"vision experts on {dataset}")
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed: {failed}; re-run the same command to resume them")
    return result


def run_extract(dataset: str, store: str | None = None, config: ExpertsConfig | None = None,
                models_dir: str | None = None, dask_address: str | None = None, workers: int | None = None,
                progress: bool = False) -> dict:
    config = config or ExpertsConfig()
    plan_experts(config, str(Path(models_dir or Settings().models_dir).resolve()))  # fail before starting anything
    with flow_runtime(dask_address, workers, gpu=config.profile == "gpu", warm=("tasks.extract",)) as runner:
        return extract_flow.with_options(task_runner=runner)(
            dataset=dataset, store=store, config=config, models_dir=models_dir, progress=progress)
