"""The suite runner: builds a stage's suite for one shard, validates the shard's pandas table with it in an
ephemeral context (nothing on disk), and turns the result into failures with the row positions they name.
`build_data_docs` renders stored results into a GX data docs site in a local folder.

What does not depend on the shard is built once per process and reused by every shard it validates (`engine`: the
context, its pandas data source and a dataframe asset per suite; `gx_suite`: a suite per distinct list of
expectations). A shard runs the suite through GX's validator directly: a Checkpoint and a ValidationDefinition
would save the suite and each result to the context's stores, which cost more than validating a small shard.
The result carries the same meta as a ValidationDefinition run (run id, validation time, batch parameters).

A failed expectation either names rows (map expectations: GX's `unexpected_index_list` with result format
COMPLETE, here row positions) or is about the whole table (schema, row count, drift, an expectation that raised).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import threading
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import great_expectations as gx
import pandas as pd
import pyarrow as pa
from great_expectations.constants import DATAFRAME_REPLACEMENT_STR
from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.data_context.types.resource_identifiers import (
    ExpectationSuiteIdentifier,
    ValidationResultIdentifier,
)
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
from great_expectations.validator.v1_validator import Validator

from expectations.common import SuiteInputs
from infra.stages import OUTPUT_STAGES

# Suite name (= the stage whose output it checks) -> its module (expectations/<stage>.py), in pipeline order.
SUITES = {name: importlib.import_module(f"expectations.{name}") for name in OUTPUT_STAGES}
SITE = "capfactory"
MAX_EXAMPLES = 3
MAX_EXAMPLE_CHARS = 120
# Full per-row lists are large and already kept as the quarantined rows; the partial ones (20) stay for the docs.
_BULKY = ("unexpected_list", "unexpected_index_list", "unexpected_index_query")


@dataclass
class Failure:
    expectation: str
    column: str | None
    rows: list[int] | None  # row positions in the table; None: the expectation is about the whole table
    unexpected_count: int | None = None
    examples: list = field(default_factory=list)
    observed: object = None

    @property
    def name(self) -> str:
        return f"{self.expectation}({self.column})" if self.column else self.expectation

    def describe(self) -> str:
        if self.rows is not None:
            return f"{self.name}: {self.unexpected_count} rows, e.g. {self.examples}"
        return f"{self.name}: observed {_plain(self.observed)!r}"

    def to_json(self) -> dict:
        return {"expectation": self.expectation, "column": self.column,
                "kind": "table" if self.rows is None else "rows", "unexpected_count": self.unexpected_count,
                "examples": self.examples, "observed": _plain(self.observed)}


@dataclass
class SuiteRun:
    suite: str
    success: bool
    evaluated: int
    failures: list[Failure]
    gx_result: dict  # the GX validation result as JSON, without the full per-row lists


def _plain(value):
    """JSON-able form of GX's observed values (numpy scalars, tuples)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _example(value):
    value = _plain(value)
    if isinstance(value, str) and len(value) > MAX_EXAMPLE_CHARS:
        return value[:MAX_EXAMPLE_CHARS] + "..."
    return value


def _context():
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


@dataclass(frozen=True)
class Engine:
    """What every shard's validation in this process shares: an ephemeral context with one pandas data source
    and a whole-dataframe batch definition per suite. `lock`: one validation at a time uses the context. GX keeps
    the last frame and metrics of each suite's batch until the next shard of that suite replaces them (the batch id
    is the suite's), so what stays in memory is bounded; each run computes its metrics afresh."""

    context: object
    batches: dict
    lock: threading.Lock


@cache
def engine() -> Engine:
    """The process's GX engine, built on first use (once per Dask worker, like a model)."""
    context = _context()
    source = context.data_sources.add_pandas("capfactory")
    batches = {suite: source.add_dataframe_asset(suite).add_batch_definition_whole_dataframe(suite)
               for suite in SUITES}
    return Engine(context, batches, threading.Lock())


@lru_cache(maxsize=64)
def gx_suite(suite: str, configurations: str) -> gx.ExpectationSuite:
    """The GX suite of `suite` with these expectations (JSON configurations, the cache key): shards whose suite
    comes out the same (same spec, row count and reference) share one, built once per process."""
    return gx.ExpectationSuite(name=suite, expectations=[ExpectationConfiguration(**c).to_domain_obj()
                                                          for c in json.loads(configurations)])


def _columns(expectation) -> list[str]:
    names = [getattr(expectation, a, None) for a in ("column", "column_A", "column_B")]
    return [n for n in names if n] + list(getattr(expectation, "column_list", None) or ())


def to_frame(table: pa.Table) -> pd.DataFrame:
    """The table as pandas with a RangeIndex, so GX's unexpected indexes are row positions."""
    return table.to_pandas().reset_index(drop=True)


def run_suite(suite: str, frame: pd.DataFrame, inputs: SuiteInputs, batch: str) -> SuiteRun:
    """Validate `frame` (one shard of stage output `suite`) with the suite built for it."""
    module = SUITES[suite]
    prepare = getattr(module, "prepare", None)
    frame = prepare(frame) if prepare else frame
    # Expectations on a missing column are left out: the schema expectation names the missing columns.
    wanted = [e for e in module.expectations(inputs) if all(c in frame.columns for c in _columns(e))]
    built = gx_suite(suite, json.dumps([e.configuration.to_json_dict() for e in wanted], sort_keys=True))
    gx_engine = engine()
    run_id = RunIdentifier(run_name=f"{suite}-{batch}", run_time=dt.datetime.now(dt.UTC))
    with gx_engine.lock:
        result = Validator(gx_engine.batches[suite], {"result_format": "COMPLETE"},
                           {"dataframe": frame}).validate_expectation_suite(built)
    result.meta.update(run_id=run_id, validation_time=run_id.run_time,
                       batch_parameters={"dataframe": DATAFRAME_REPLACEMENT_STR})
    failures = []
    for r in result.results:
        if r.success:
            continue
        config = r.expectation_config
        column = config.kwargs.get("column") or ",".join(
            config.kwargs.get("column_list") or [c for c in (config.kwargs.get("column_A"),
                                                             config.kwargs.get("column_B")) if c])
        info = r.exception_info or {}
        if info.get("raised_exception"):
            failures.append(Failure(config.type, column or None, None, observed=info.get("exception_message")))
            continue
        res = r.result or {}
        rows = res.get("unexpected_index_list")
        failures.append(Failure(
            config.type, column or None, [int(i) for i in rows] if rows is not None else None,
            res.get("unexpected_count"), [_example(v) for v in (res.get("partial_unexpected_list") or [])[
                :MAX_EXAMPLES]], res.get("observed_value") if rows is None else None))
    gx_result = result.to_json_dict()
    for r in gx_result["results"]:
        for name in _BULKY:
            (r.get("result") or {}).pop(name, None)
    return SuiteRun(suite, bool(result.success), len(wanted), failures, gx_result)


def build_data_docs(results: list[dict], out_dir: Path) -> Path:
    """Render GX validation results (as `SuiteRun.gx_result`) into a data docs site in `out_dir`; returns the
    index page."""
    context = _context()
    context.add_data_docs_site(SITE, {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(out_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    schema = ExpectationSuiteValidationResultSchema()
    for data in results:
        result = schema.load(data)
        run = result.meta["run_id"]
        run_id = RunIdentifier(run_name=run["run_name"], run_time=run["run_time"])
        key = ValidationResultIdentifier(ExpectationSuiteIdentifier(name=result.suite_name), run_id,
                                         batch_identifier=run["run_name"])
        context.validation_results_store.set(key, result)
    context.build_data_docs(site_names=[SITE])
    return out_dir / "index.html"
