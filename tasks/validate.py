"""Validation of every stage's output with the Great Expectations suites in `expectations/`, one (stage, shard) at a
time, on the shard's pandas table. The GX context and the suites are built once per process and shared by the
shards it validates (`expectations.runner.engine`, `gx_suite`); each shard still gets its own run and result.

Store layout (`<dataset>/validate/`; a suite is named after the stage whose output it checks):
    <suite>/shard-00042.json                 the shard's result: failed expectations with examples, quarantined rows
    quarantine/<suite>/shard-00042.parquet   the rows set aside (quarantine mode), with `quarantine_reasons`
    fallback/<suite>/shard-00042.parquet     captions that fall back to the alt-text: row id, caption, text, reasons
    score/_reference.json                    score statistics of the drift reference shard
    summary.json                             per suite: shards passed / failed, quarantined rows, failing checks
    data_docs/index.html                     GX data docs, built locally and uploaded through the store

`on_failure: quarantine` sets the rows that failed a row-level expectation aside (a failed table-level check such
as the schema, the row count or drift sets the whole shard aside) and the published set leaves them out (see
`quarantined_keys`). A caption is not a sample: where only a caption slot of a row failed (a suite's
`CAPTION_SLOTS`, e.g. a fused dense caption that leaks the prompt) and its fused caption was in place, that slot
falls back to the alt-text on its own (`fallback/<suite>/shard-NNNNN.parquet`; publish applies it, see
`caption_fallbacks`) and the sample keeps its other captions. `on_failure: fail` fails the shard with a message
naming the suite, the shard, the expectations and examples. A suite's stage whose output is absent is skipped.
Each failed expectation in a result says what was done about it (`action`: caption fallback, quarantine, fail) and
names a few of its rows (`row_ids`).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import great_expectations as gx
import pandas as pd
import pyarrow as pa

from expectations.common import SuiteInputs
from expectations.runner import SUITES, Failure, SuiteRun, build_data_docs, run_suite, to_frame
from expectations.score import reference_stats
from infra.settings import DatasetSpec, ValidateConfig
from infra.store import ArtifactStore, StoreError, open_store
from tasks.shards import RAW, input_key, read_marker, shard_name, stage_key
from tasks.stage import Stage

STAGE = "validate"
# Suites whose rows are samples: a row quarantined there takes its sample out of the published set. A quarantined
# translation only takes that translation out (see `quarantined_translations`).
SAMPLE_SUITES = ("ingest", "extract", "fuse", "score")
ROWS_PER_RAW_ROW = ("extract", "fuse", "score")  # suites with exactly one row per raw sample
_MARKER = re.compile(r"/shard-(\d{5,})\.stats\.json$")
MAX_ROW_IDS = 5  # rows named per failed expectation in a result
# Caption column -> (guard verdict, guard reasons) of every suite's caption slots (expectations/fuse.py).
CAPTION_SLOTS = {c: slot for module in SUITES.values() for c, slot in getattr(module, "CAPTION_SLOTS", {}).items()}
FALLBACK_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("text", pa.string()),
                             ("reasons", pa.list_(pa.string()))])


class ValidationFailed(RuntimeError):
    """A shard failed its suite in `fail` mode; the message names suite, shard, expectations and examples."""


def result_key(dataset: str, suite: str, shard: int) -> str:
    return f"{dataset}/{STAGE}/{suite}/{shard_name(shard)}.json"


def quarantine_key(dataset: str, suite: str, shard: int) -> str:
    return f"{dataset}/{STAGE}/quarantine/{suite}/{shard_name(shard)}.parquet"


def fallback_key(dataset: str, suite: str, shard: int) -> str:
    return f"{dataset}/{STAGE}/fallback/{suite}/{shard_name(shard)}.parquet"


def reference_key(dataset: str) -> str:
    return f"{dataset}/{STAGE}/score/_reference.json"


def summary_key(dataset: str) -> str:
    return f"{dataset}/{STAGE}/summary.json"


def docs_prefix(dataset: str) -> str:
    return f"{dataset}/{STAGE}/data_docs"


def finished_shards(store: ArtifactStore, dataset: str, suite: str) -> list[int]:
    """Shards of a stage output with a done marker."""
    return sorted(int(m.group(1)) for k in store.list(f"{dataset}/{suite}") if (m := _MARKER.search(k)))


def suites_to_run(store: ArtifactStore, dataset: str, cfg: ValidateConfig) -> tuple[list[str], list[str]]:
    """(suites whose stage output exists, suites skipped because it does not), in pipeline order."""
    wanted = [s for s in SUITES if cfg.stages is None or s in cfg.stages]
    present = [s for s in wanted if finished_shards(store, dataset, s)]
    return present, [s for s in wanted if s not in present]


def _marker_stamp(store: ArtifactStore, dataset: str, suite: str, shard: int) -> list:
    marker = read_marker(store, dataset, suite, shard) or {}
    return [marker.get("config_hash"), marker.get("finished_at")]


def fingerprint(store: ArtifactStore, dataset: str, suite: str, shard: int, cfg: ValidateConfig,
                reference: dict | None) -> str:
    """What a shard's result depends on: the validation config, the stage's and raw's markers, the reference."""
    ref = reference.get("input_marker") if reference and suite == "score" else None
    return json.dumps([cfg.config_hash(), _marker_stamp(store, dataset, suite, shard),
                       _marker_stamp(store, dataset, RAW, shard), ref])


def ensure_reference(store: ArtifactStore, dataset: str, cfg: ValidateConfig) -> dict | None:
    """The drift reference: score statistics of `cfg.drift_reference_shard`, or else of the shard that was the
    reference before (the first scores shard validated), computed once and kept in the store."""
    shards = finished_shards(store, dataset, "score")
    if not shards:
        return None
    try:
        kept = store.get_json(reference_key(dataset))
    except StoreError:
        kept = None
    shard = cfg.drift_reference_shard
    if shard is None:
        shard = kept["shard"] if kept and kept["shard"] in shards else shards[0]
    if shard not in shards:
        raise ValueError(f"drift reference shard {shard:05d} has no scores output in {dataset} "
                         f"(scored shards: {shards})")
    stamp = json.dumps(_marker_stamp(store, dataset, "score", shard))
    if kept and kept["shard"] == shard and kept["input_marker"] == stamp:
        return kept
    frame = to_frame(store.get_parquet(stage_key(dataset, "score", shard, "parquet")))
    reference = {"shard": shard, "input_marker": stamp, "columns": reference_stats(frame)}
    store.put_json(reference_key(dataset), reference)
    return reference


def shards_to_validate(store: ArtifactStore, dataset: str, cfg: ValidateConfig, suites: list[str],
                       reference: dict | None) -> dict[str, tuple[list[int], list[int]]]:
    """Per suite: (shards to validate, shards whose result still holds). A result holds when nothing it depends
    on changed and it passed or its rows were quarantined (a failure in `fail` mode is reported again)."""
    plan = {}
    for suite in suites:
        todo, done = [], []
        for shard in finished_shards(store, dataset, suite):
            try:
                old = store.get_json(result_key(dataset, suite, shard))
            except StoreError:
                old = None
            fresh = (old is not None and old["fingerprint"] == fingerprint(store, dataset, suite, shard, cfg, reference)
                     and (old["success"] or old["on_failure"] == "quarantine"))
            (done if fresh else todo).append(shard)
        plan[suite] = (todo, done)
    return plan


def plan_validation(store: ArtifactStore, dataset: str, cfg: ValidateConfig
                    ) -> tuple[list[str], list[str], dict | None, dict[str, tuple[list[int], list[int]]]]:
    """(suites to run, stages with no output yet, the score reference, per suite: shards to validate and shards
    whose result still holds)."""
    suites, skipped = suites_to_run(store, dataset, cfg)
    reference = ensure_reference(store, dataset, cfg) if "score" in suites else None
    return suites, skipped, reference, shards_to_validate(store, dataset, cfg, suites, reference)


def expected_rows(store: ArtifactStore, dataset: str, suite: str, shard: int) -> int | None:
    """Rows the stage's shard must have: raw = its input manifest; one-row-per-sample stages = the raw shard."""
    if suite == RAW:
        return store.get_parquet(input_key(dataset, shard), columns=["key"]).num_rows
    if suite in ROWS_PER_RAW_ROW:
        marker = read_marker(store, dataset, RAW, shard)
        return marker["samples"] if marker else None
    return None


def _fused_in_place(frame: pd.DataFrame, passed: str, row: int) -> bool:
    value = frame[passed].iloc[row] if passed in frame.columns else None
    return bool(value) if pd.notna(value) else False


def split_failures(run: SuiteRun, frame: pd.DataFrame, slots: dict[str, tuple[str, str]]
                   ) -> tuple[dict[int, list[str]], dict[tuple[int, str], list[str]]]:
    """(row -> the checks that put the sample in doubt, (row, caption column) -> the checks only that caption
    failed). A row-level failure of a caption slot whose fused caption is in place is the caption's: it falls back
    to the alt-text. Any other failure is the sample's (a table-level one: every row's); a sample in doubt carries
    every check it failed, its captions' too."""
    bad: dict[int, list[str]] = {}
    captions: dict[tuple[int, str], list[str]] = {}
    for f in run.failures:
        slot = slots.get(f.column or "") if f.rows is not None else None
        for row in range(len(frame)) if f.rows is None else f.rows:
            if slot and _fused_in_place(frame, slot[0], row):
                captions.setdefault((row, f.column), []).append(f.name)
            else:
                bad.setdefault(row, []).append(f.name)
    for (row, _), names in captions.items():
        if row in bad:
            bad[row] += names
    return bad, {k: v for k, v in captions.items() if k[0] not in bad}


def _failure_json(f: Failure, ids: list[dict], bad: dict, fallbacks: dict, mode: str) -> dict:
    """A failed expectation with a few of its rows and what was done about it."""
    rows = range(len(ids)) if f.rows is None else f.rows
    out = {**f.to_json(), "row_ids": [ids[r] for r in rows[:MAX_ROW_IDS]],
           "quarantined_rows": sum(1 for r in rows if r in bad) if mode == "quarantine" else 0,
           "fallback_captions": sum(1 for r in rows if (r, f.column) in fallbacks) if mode == "quarantine" else 0}
    if mode == "fail":
        out["action"] = "fail"
    elif f.rows is None:
        out["action"] = "quarantine (whole shard)"
    else:
        out["action"] = " + ".join(a for a, n in (("caption fallback", out["fallback_captions"]),
                                                  ("quarantine", out["quarantined_rows"])) if n)
    return out


def _fallback_rows(table: pa.Table, ids: list[dict], fallbacks: dict[tuple[int, str], list[str]]) -> list[dict]:
    return [{**ids[row], "caption": column, "text": table.column(column)[row].as_py(), "reasons": reasons}
            for (row, column), reasons in sorted(fallbacks.items())]


def validate_shard(store_uri: str, dataset: str, suite: str, shard: int, spec: DatasetSpec,
                   reference: dict | None = None) -> dict:
    """Run `suite` on one shard; writes the result JSON (and the quarantined rows and fallen-back captions);
    returns the result without the GX document. Raises ValidationFailed in `fail` mode when an expectation
    failed."""
    started = time.time()
    cfg = spec.validation
    store = open_store(store_uri)
    table = store.get_parquet(stage_key(dataset, suite, shard, "parquet"))
    frame = to_frame(table)
    inputs = SuiteInputs(frame, spec, expected_rows(store, dataset, suite, shard), reference)
    run = run_suite(suite, frame, inputs, shard_name(shard))
    bad, fallbacks = split_failures(run, frame, getattr(SUITES[suite], "CAPTION_SLOTS", {}))
    ids = table.select(list(SUITES[suite].ROW_ID)).to_pylist()
    acting = cfg.on_failure == "quarantine"
    qkey, fkey = quarantine_key(dataset, suite, shard), fallback_key(dataset, suite, shard)
    quarantined = [{**ids[i], "reasons": bad[i]} for i in sorted(bad)] if acting else []
    fallen = _fallback_rows(table, ids, fallbacks) if acting else []
    if quarantined:
        positions = sorted(bad)
        rows = table.take(pa.array(positions, pa.int64()))
        store.put_parquet(qkey, rows.append_column(
            "quarantine_reasons", pa.array([bad[i] for i in positions], pa.list_(pa.string()))))
    else:
        store.delete(qkey)
    if fallen:
        store.put_parquet(fkey, pa.Table.from_pylist(fallen, FALLBACK_SCHEMA))
    else:
        store.delete(fkey)
    result = {
        "dataset": dataset, "suite": suite, "shard": shard, "success": run.success, "on_failure": cfg.on_failure,
        "samples": table.num_rows, "evaluated": run.evaluated,
        "counts": {"ok": table.num_rows - len(quarantined), "quarantined": len(quarantined),
                   "caption_fallbacks": len(fallen)},
        "failed": [_failure_json(f, ids, bad, fallbacks, cfg.on_failure) for f in run.failures],
        "quarantined": quarantined, "fallbacks": fallen,
        "quarantine_file": qkey if quarantined else None, "fallback_file": fkey if fallen else None,
        "config_hash": cfg.config_hash(), "fingerprint": fingerprint(store, dataset, suite, shard, cfg, reference),
        "provenance": {"great_expectations": gx.__version__, "suite": suite},
        "seconds": round(time.time() - started, 3),
    }
    store.put_json(result_key(dataset, suite, shard), {**result, "gx_result": run.gx_result})
    if not run.success and cfg.on_failure == "fail":
        details = "; ".join(f.describe() for f in run.failures)
        raise ValidationFailed(f"suite {suite!r} failed on shard {shard:05d} of {dataset}: {details} "
                               f"(result: {result_key(dataset, suite, shard)})")
    return result


def shard_results(store: ArtifactStore, dataset: str, suites: list[str]) -> list[dict]:
    out = []
    for suite in suites:
        for shard in finished_shards(store, dataset, suite):
            try:
                out.append(store.get_json(result_key(dataset, suite, shard)))
            except StoreError:
                continue  # not validated (yet)
    return out


def write_summary(store: ArtifactStore, dataset: str, cfg: ValidateConfig, suites: list[str],
                  skipped: list[str]) -> dict:
    """Per suite: shards validated and passed, quarantined rows, how often each expectation failed."""
    per_suite = {}
    for suite in suites:
        results = shard_results(store, dataset, [suite])
        failing = Counter(f"{f['expectation']}({f['column']})" if f["column"] else f["expectation"]
                          for r in results for f in r["failed"])
        per_suite[suite] = {
            "shards": len(results), "passed": sum(1 for r in results if r["success"]),
            "failed_shards": [r["shard"] for r in results if not r["success"]],
            "rows": sum(r["samples"] for r in results),
            "quarantined_rows": sum(r["counts"]["quarantined"] for r in results),
            "caption_fallbacks": sum(r["counts"].get("caption_fallbacks", 0) for r in results),
            "failing_expectations": dict(failing),
        }
    summary = {"dataset": dataset, "on_failure": cfg.on_failure, "config_hash": cfg.config_hash(),
               "suites": per_suite, "skipped_suites": skipped, "validated_at": time.time()}
    store.put_json(summary_key(dataset), summary)
    return summary


def publish_data_docs(store_uri: str, dataset: str, suites: list[str]) -> str:
    """Build GX data docs from every stored shard result in a local folder and upload them (replacing the old
    site) under `<dataset>/validate/data_docs/`; returns the index page's key."""
    store = open_store(store_uri)
    results = [r["gx_result"] for r in shard_results(store, dataset, suites)]
    prefix = docs_prefix(dataset)
    with tempfile.TemporaryDirectory(prefix="capfactory-docs-") as tmp:
        site = Path(tmp)
        build_data_docs(results, site)
        for old in store.list(prefix):
            store.delete(old)
        for path in sorted(p for p in site.rglob("*") if p.is_file()):
            store.put_file(f"{prefix}/{path.relative_to(site).as_posix()}", path)
    return f"{prefix}/index.html"


def validate_dataset(store_uri: str, dataset: str, spec: DatasetSpec) -> dict:
    """The validate flow's work in this process, one shard after another (the direct path the benchmarks time
    against the flow); returns the summary."""
    store, cfg = open_store(store_uri), spec.validation
    suites, skipped, reference, plan = plan_validation(store, dataset, cfg)
    for suite, (todo, _) in plan.items():
        for shard in todo:
            validate_shard(store_uri, dataset, suite, shard, spec, reference)
    summary = write_summary(store, dataset, cfg, suites, skipped)
    if cfg.data_docs and suites:
        publish_data_docs(store_uri, dataset, suites)
    return summary


def _quarantined(store: ArtifactStore, dataset: str, suite: str, columns: list[str]) -> list[dict]:
    rows = []
    for key in store.list(f"{dataset}/{STAGE}/quarantine/{suite}"):
        if key.endswith(".parquet"):
            rows += store.get_parquet(key, columns=columns).to_pylist()
    return rows


def quarantined_keys(store: ArtifactStore, dataset: str, suites: tuple[str, ...] = SAMPLE_SUITES) -> set[str]:
    """Keys of the samples set aside by validation (quarantine mode): the published set leaves them out."""
    return {r["key"] for suite in suites for r in _quarantined(store, dataset, suite, ["key"])}


def caption_fallbacks(store: ArtifactStore, dataset: str) -> dict[tuple[str, str], list[str]]:
    """(key, caption column) -> the checks it failed, for the captions validation sent back to the alt-text: the
    published set applies them (the sample stays)."""
    out: dict[tuple[str, str], list[str]] = {}
    for suite, module in SUITES.items():
        if getattr(module, "CAPTION_SLOTS", None):
            for key in store.list(f"{dataset}/{STAGE}/fallback/{suite}"):
                if key.endswith(".parquet"):
                    for r in store.get_parquet(key, columns=["key", "caption", "reasons"]).to_pylist():
                        out.setdefault((r["key"], r["caption"]), []).extend(r["reasons"])
    return out


def quarantine_reasons(store: ArtifactStore, dataset: str) -> dict[str, list[str]]:
    """Key -> "<suite>: <check>" for each check that set the sample aside (quarantine mode)."""
    out: dict[str, list[str]] = {}
    for suite in SAMPLE_SUITES:
        for r in _quarantined(store, dataset, suite, ["key", "quarantine_reasons"]):
            out.setdefault(r["key"], []).extend(f"{suite}: {reason}" for reason in r["quarantine_reasons"] or [])
    return out


def quarantined_translations(store: ArtifactStore, dataset: str) -> set[tuple[str, str, str]]:
    """(key, field, lang) of the translations set aside: the published set drops these translations."""
    return {(r["key"], r["field"], r["lang"]) for r in _quarantined(store, dataset, "translate",
                                                                    ["key", "field", "lang"])}


class ValidateStage(Stage):
    name = "validate"
    description = "Great Expectations suites on every stage output: quarantine bad rows or fail."
    warm = ("tasks.validate",)

    def summary(self, result: dict) -> list[str]:
        lines = [f"dataset {result['dataset']} in {result['store']}: {result['on_failure']} mode; no output yet: "
                 f"{', '.join(result['skipped_suites']) or '-'}"]
        for suite, s in result["suites"].items():
            failing = ", ".join(f"{k} x{v}" for k, v in sorted(s["failing_expectations"].items())) or "-"
            back = s.get("caption_fallbacks")
            fallbacks = f", {back} captions back to the alt-text" if back else ""
            lines.append(f"  {suite}: {s['passed']}/{s['shards']} shards passed, {s['quarantined_rows']} rows "
                         f"quarantined{fallbacks}; failing: {failing}")
        if result["data_docs"]:
            lines.append(f"  data docs: {result['data_docs']}")
        return lines
