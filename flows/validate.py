"""The `validate` flow: the Great Expectations suites on every finished shard of every stage output present."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from tqdm import tqdm

from flows.stage import open_dataset
from infra.settings import DatasetSpec
from tasks.shards import planned_shards
from tasks.validate import ValidationFailed, plan_validation, publish_data_docs, validate_shard, write_summary


# No retries: a failed expectation fails the same way again.
@task(name="validate-shard", task_run_name="validate-{suite}-{shard:05d}", persist_result=False, retries=0)
def validate_shard_task(store_uri: str, dataset: str, suite: str, shard: int, spec: DatasetSpec,
                        reference: dict | None) -> dict:
    return validate_shard(store_uri, dataset, suite, shard, spec, reference)


@task(name="validation-data-docs", persist_result=False, retries=1)
def data_docs_task(store_uri: str, dataset: str, suites: list[str]) -> str:
    return publish_data_docs(store_uri, dataset, suites)


def _table(summary: dict) -> str:
    lines = ["| suite | shards | passed | quarantined rows | captions back to the alt-text | failing expectations |",
             "|---|---|---|---|---|---|"]
    for suite, s in summary["suites"].items():
        failing = ", ".join(f"`{k}` x{v}" for k, v in sorted(s["failing_expectations"].items())) or "-"
        lines.append(f"| {suite} | {s['shards']} | {s['passed']} | {s['quarantined_rows']} | "
                     f"{s['caption_fallbacks']} | {failing} |")
    return "\n".join(lines)


@flow(name="validate", log_prints=True)
def validate_flow(dataset: str, store: str | None = None, spec: DatasetSpec | None = None,
                  progress: bool = False) -> dict:
    """Validate each stage output's shards with its suite; quarantine bad rows or fail, as `spec.validation`
    says (a caption that fails alone falls back to the alt-text); write per-shard results, a summary and GX data
    docs under `<dataset>/validate/`."""
    logger = get_run_logger()
    spec = spec or DatasetSpec(name=dataset)
    cfg = spec.validation
    store = open_dataset(store or spec.store, dataset)
    store_uri = store.uri
    if not planned_shards(store, dataset):
        raise ValueError(f"dataset {dataset!r} has no ingested shards in {store_uri}; run `capfactory ingest` first")
    suites, skipped, reference, plan = plan_validation(store, dataset, cfg)
    logger.info("validating %s (%s); no output yet: %s", ", ".join(f"{s}: {len(plan[s][0])} shards" for s in suites),
                cfg.on_failure, ", ".join(skipped) or "-")
    futures = {validate_shard_task.submit(store_uri, dataset, suite, shard, spec, reference): (suite, shard)
               for suite, (todo, _) in plan.items() for shard in todo}
    failures: list[str] = []
    errors: list[str] = []
    with tqdm(total=len(futures), unit="shard", desc=f"validate {dataset}", disable=not progress) as bar:
        for future in as_completed(list(futures)):
            suite, shard = futures[future]
            try:
                future.result()
            except ValidationFailed as e:
                failures.append(str(e))
            except Exception as e:
                logger.error("validating %s shard %05d crashed: %s", suite, shard, e)
                errors.append(f"{suite} shard {shard:05d}: {e}")
            bar.update(1)
    summary = write_summary(store, dataset, cfg, suites, skipped)
    result = {**summary, "store": store_uri,
              "validated": {s: sorted(plan[s][0]) for s in suites},
              "already_validated": {s: plan[s][1] for s in suites}, "data_docs": None}
    if cfg.data_docs and suites:
        result["data_docs"] = data_docs_task.submit(store_uri, dataset, suites).result()
    create_markdown_artifact(
        f"# Validation of `{dataset}`\n\nmode {cfg.on_failure}; no output yet: {', '.join(skipped) or '-'}; "
        f"data docs: `{result['data_docs']}`\n\n{_table(summary)}", key="validate-summary",
        description=f"validation of {dataset}")
    if failures or errors:
        raise ValidationFailed("validation failed:\n" + "\n".join(failures + errors))
    return result
