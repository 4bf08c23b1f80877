"""The `report` flow: the dataset report page, stored beside the data and linked from a Prefect artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.stage import open_dataset
from infra.settings import DatasetSpec
from infra.store import open_store
from tasks.publish import NOT_FILTERS
from tasks.report import write_report


@task(name="report", persist_result=False, retries=1, retry_delay_seconds=5)
def report_task(store_uri: str, dataset: str, spec: DatasetSpec) -> dict:
    return write_report(open_store(store_uri), dataset, spec)


@flow(name="report", log_prints=True)
def report_flow(dataset: str, store: str | None = None, spec: DatasetSpec | None = None) -> dict:
    """Write `<dataset>/report/index.html` (funnel, validation, rejected examples, QE, plots, a gallery) and a
    summary artifact."""
    spec = spec or DatasetSpec(name=dataset)
    store_uri = open_dataset(store or spec.store, dataset).uri
    result = report_task.submit(store_uri, dataset, spec).result()
    get_run_logger().info("report of %s: %s", dataset, result["path"])
    rows = [("samples", result["samples"]), ("selected", result["selected"]),
            *((f"status {k}", v) for k, v in sorted(result["status"].items())),
            *((f"filter {k}", v) for k, v in result["filters"].items()
              if k not in ("selected", "skipped", *NOT_FILTERS)),
            *((f"set aside by validation: {label}", result["filters"][k]) for k, label in NOT_FILTERS.items()
              if result["filters"].get(k)),
            ("stages run", ", ".join(result["stages_run"])),
            ("sections without data", ", ".join(k for k, ran in result["sections"].items() if not ran) or "none")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    create_markdown_artifact(
        f"# Report of `{dataset}`\n\n| | |\n|---|---|\n{table}\n\nThe full report (funnel, validation results, "
        f"rejected examples, QE, plots and a sample gallery, one self-contained page): "
        f"[`{result['path']}`]({result['path']}); validation results: [{result['path']}#validation]"
        f"({result['path']}#validation)\n",
        key="dataset-report", description=f"report of {dataset}: {result['path']}")
    return {"dataset": dataset, "store": store_uri, **result}
