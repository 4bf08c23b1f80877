"""The `ingest` flow: plan shards, ingest them on Dask (one task per shard), flag duplicates dataset-wide."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import gather_shards
from infra.runtime import flow_runtime
from infra.settings import IngestConfig, InputSpec, Settings
from infra.store import open_store
from tasks.ingest import dedup_dataset, ingest_shard, plan_ingest


@task(name="plan-ingest", persist_result=False)
def plan_task(store_uri: str, dataset: str, inputs: list[InputSpec], config: IngestConfig, retry_failed: bool):
    return plan_ingest(open_store(store_uri), dataset, inputs, config, retry_failed)


@task(name="ingest-shard", task_run_name="ingest-shard-{shard:05d}", persist_result=False, retries=1,
      retry_delay_seconds=2)
def ingest_shard_task(store_uri: str, dataset: str, shard: int, config: IngestConfig, retry_failed: bool) -> dict:
    return ingest_shard(store_uri, dataset, shard, config, retry_failed)


@task(name="dedup", persist_result=False)
def dedup_task(store_uri: str, dataset: str, threshold: int) -> dict:
    return dedup_dataset(open_store(store_uri), dataset, threshold)


def _summary_markdown(dataset: str, totals: dict, dedup: dict, plan) -> str:
    lines = [f"# Ingest of `{dataset}`", "", "| status | samples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(totals["counts"].items())]
    lines += ["", "| error class | samples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(totals["error_classes"].items(), key=lambda kv: -kv[1])]
    lines += ["", f"New samples planned: {plan.new_samples}; already in the dataset: {plan.known_samples}; "
              f"repeated URLs in the inputs: {plan.duplicate_urls}.",
              f"Exact duplicates: {dedup['exact_duplicates']}; near duplicates: {dedup['near_duplicates']}."]
    return "\n".join(lines)


@flow(name="ingest", log_prints=True)
def ingest_flow(dataset: str, inputs: list[InputSpec], store: str | None = None,
                config: IngestConfig | None = None, retry_failed: bool = False, progress: bool = False) -> dict:
    """Download, validate, resize, hash and dedup the inputs' images into `<store>/<dataset>/raw/` shards."""
    logger = get_run_logger()
    config = config or IngestConfig()
    store_uri = open_store(store or Settings().store).uri
    plan = plan_task(store_uri, dataset, inputs, config, retry_failed)
    for report in plan.reports:
        if report.rejected:
            logger.warning("%s: %d rows rejected, e.g. %s", report.path, report.rejected, report.examples[:3])
    logger.info("plan: %d shards to ingest, %d to retry, %d done; %d new samples",
                len(plan.todo), len(plan.retry), len(plan.done), plan.new_samples)
    futures = {}
    for shard in plan.todo:
        futures[ingest_shard_task.submit(store_uri, dataset, shard, config, False)] = shard
    for shard in plan.retry:
        futures[ingest_shard_task.submit(store_uri, dataset, shard, config, True)] = shard
    finished, failed = gather_shards(futures, plan.samples_per_shard, f"ingest {dataset}", progress, logger)
    totals: dict = {"counts": {}, "error_classes": {}, "shards": [s["shard"] for s in finished],
                    "failed_shards": failed}
    for stats in finished:
        for group in ("counts", "error_classes"):
            for k, v in stats[group].items():
                totals[group][k] = totals[group].get(k, 0) + v
    dedup = dedup_task(store_uri, dataset, config.phash_threshold)
    result = {
        "dataset": dataset, "store": store_uri, "config_hash": plan.config_hash,
        "shards_ingested": sorted(totals["shards"]), "shards_failed": sorted(totals["failed_shards"]),
        "shards_already_done": plan.done, "new_samples": plan.new_samples, "known_samples": plan.known_samples,
        "duplicate_urls": plan.duplicate_urls, "counts": totals["counts"], "error_classes": totals["error_classes"],
        "dedup": dedup, "rejected_input_rows": sum(r.rejected for r in plan.reports),
    }
    create_markdown_artifact(_summary_markdown(dataset, totals, dedup, plan), key="ingest-summary",
                             description=f"ingest of {dataset}")
    if totals["failed_shards"]:
        raise RuntimeError(f"{len(totals['failed_shards'])} shard(s) failed: {totals['failed_shards']}; "
                           "re-run the same command to resume them")
    return result


def run_ingest(dataset: str, inputs: list[InputSpec], store: str | None = None, config: IngestConfig | None = None,
               retry_failed: bool = False, dask_address: str | None = None, workers: int | None = None,
               progress: bool = False) -> dict:
    """Run the ingest flow on a Dask cluster (an existing scheduler or a new LocalCluster)."""
    with flow_runtime(dask_address, workers, warm=("tasks.ingest",)) as runner:
        return ingest_flow.with_options(task_runner=runner)(
            dataset=dataset, inputs=inputs, store=store, config=config, retry_failed=retry_failed,
            progress=progress)
