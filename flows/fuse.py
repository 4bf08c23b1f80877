"""The `fuse` flow: LLM fusion over every finished raw shard (using the experts' output where it exists)."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import gather_shards
from infra.runtime import flow_runtime
from infra.settings import FuseConfig, Settings
from infra.store import open_store
from tasks.fuse import fuse_shard, plan_llm, shards_to_fuse
from tasks.ingest import STAGE as RAW
from tasks.shards import read_marker


@task(name="fuse-shard", task_run_name="fuse-shard-{shard:05d}", persist_result=False, retries=2,
      retry_delay_seconds=5)
def fuse_shard_task(store_uri: str, dataset: str, shard: int, config: FuseConfig) -> dict:
    return fuse_shard(store_uri, dataset, shard, config)


@flow(name="fuse", log_prints=True)
def fuse_flow(dataset: str, store: str | None = None, config: FuseConfig | None = None,
              progress: bool = False) -> dict:
    """Fuse alt-text and expert outputs into short and dense captions, into `<dataset>/fused/`."""
    logger = get_run_logger()
    config = config or FuseConfig()
    choice = plan_llm(config)  # an LLM that cannot be provided fails here, before any task runs
    store_uri = open_store(store or Settings().store).uri
    store = open_store(store_uri)
    todo, done, waiting = shards_to_fuse(store, dataset, config)
    if not (todo or done or waiting):
        raise ValueError(f"dataset {dataset!r} has no ingested shards in {store_uri}; run `capfactory ingest` first")
    logger.info("fusion (%s, %s) on %d shards (%d already done)", config.mode, choice.name, len(todo), len(done))
    samples = {s: read_marker(store, dataset, RAW, s)["samples"] for s in todo}
    placement = dask.annotate(resources={"GPU": 1}) if choice.name == "vllm" else nullcontext()
    with placement:
        futures = {fuse_shard_task.submit(store_uri, dataset, s, config): s for s in todo}
    finished, failed = gather_shards(futures, samples, f"fuse {dataset}", progress, logger)
    result = {
        "dataset": dataset, "store": store_uri, "config_hash": config.config_hash(),
        "shards_fused": sorted(s["shard"] for s in finished), "shards_failed": sorted(failed),
        "shards_already_done": done, "shards_waiting_for_ingest": waiting,
        "counts": dict(sum((Counter(s["counts"]) for s in finished), Counter())),
        "passed": {o: sum(s["passed"].get(o, 0) for s in finished) for o in config.outputs},
        "llm_calls": sum(s["llm_calls"] for s in finished), "cache_hits": sum(s["cache_hits"] for s in finished),
        "injections_found": sum(s["injections_found"] for s in finished),
        "provenance": finished[0]["provenance"] if finished else {},
    }
    create_markdown_artifact(
        f"# Fusion of `{dataset}`\n\nmode {config.mode}; {result['counts']}; captions that passed their guards: "
        f"{result['passed']}; LLM calls {result['llm_calls']}, cache hits {result['cache_hits']}; inputs with "
        f"injected instructions: {result['injections_found']}.", key="fuse-summary", description=f"fusion of {dataset}")
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed: {failed}; re-run the same command to resume them")
    return result


def run_fuse(dataset: str, store: str | None = None, config: FuseConfig | None = None,
             dask_address: str | None = None, workers: int | None = None, progress: bool = False) -> dict:
    config = config or FuseConfig()
    choice = plan_llm(config)
    with flow_runtime(dask_address, workers, gpu=choice.name == "vllm", warm=("tasks.fuse",)) as runner:
        return fuse_flow.with_options(task_runner=runner)(dataset=dataset, store=store, config=config,
                                                          progress=progress)
