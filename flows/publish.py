"""The `publish` flow: a dataset-wide plan (join + filters), one tar per output shard, then the Parquet, card
and marker."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import gather_shards
from flows.stage import open_dataset
from infra.settings import DatasetSpec, PublishConfig
from tasks.publish import STAGE, finish_publish, plan_publish, publish_shard


@task(name="publish-plan", persist_result=False)
def plan_task(store_uri: str, dataset: str, spec: DatasetSpec) -> dict:
    return plan_publish(store_uri, dataset, spec)


@task(name="publish-shard", task_run_name="publish-shard-{shard:05d}", persist_result=False, retries=2,
      retry_delay_seconds=5)
def publish_shard_task(store_uri: str, dataset: str, shard: int, plan_key: str, config: PublishConfig) -> dict:
    return publish_shard(store_uri, dataset, shard, plan_key, config)


@task(name="publish-finish", persist_result=False)
def finish_task(store_uri: str, dataset: str, spec: DatasetSpec, plan: dict, stats: list[dict]) -> dict:
    return finish_publish(store_uri, dataset, spec, plan, stats)


@flow(name="publish", log_prints=True)
def publish_flow(dataset: str, store: str | None = None, spec: DatasetSpec | None = None,
                 progress: bool = False) -> dict:
    """Publish the selected samples as WebDataset shards and every sample as one Parquet table, with a dataset
    card, into `<dataset>/published/`."""
    logger = get_run_logger()
    spec = spec or DatasetSpec(name=dataset)
    store_uri = open_dataset(store or spec.store, dataset).uri
    plan = plan_task(store_uri, dataset, spec)
    logger.info("publishing %d of %d samples of %s in %d shards", plan["selected"], plan["samples"], dataset,
                plan["shards"])
    futures = {publish_shard_task.submit(store_uri, dataset, s, plan["plan"], spec.publish): s
               for s in range(plan["shards"])}
    finished, failed = gather_shards(futures, plan["shard_samples"], f"publish {dataset}", progress, logger)
    if failed:
        raise RuntimeError(f"{len(failed)} output shard(s) failed: {sorted(failed)}; the previous release marker "
                           "was removed, re-run the same command to publish again")
    release = finish_task(store_uri, dataset, spec, plan, finished)
    result = {"dataset": dataset, "store": store_uri, "folder": f"{dataset}/{STAGE}", **release}
    table = "\n".join(f"| {k} | {v} |" for k, v in plan["filters"].items() if k != "skipped")
    create_markdown_artifact(
        f"# Release of `{dataset}`\n\n{plan['selected']} of {plan['samples']} samples selected, in "
        f"{plan['shards']} WebDataset shards under `{store_uri}/{dataset}/{STAGE}/`, every sample in "
        f"`samples.parquet`.\n\n| filter | samples failing |\n|---|---|\n{table}\n",
        key="publish-summary", description=f"release of {dataset}")
    return result
