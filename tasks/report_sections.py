"""The report's sections about what happened to the samples: the funnel, rejected and quarantined examples, the
validation results, caption guard pass rates, translation QE per language, object classes and stage timings.
Each reads the store (stage tables, done markers, validation results) and returns HTML; tasks/report.py lays out
the page."""

from __future__ import annotations

import statistics
import time
from collections import Counter

import pyarrow as pa
from matplotlib.figure import Figure

from infra.stages import OUTPUT_STAGES
from infra.store import ArtifactStore, StoreError
from tasks.publish import NOT_FILTERS, read_release
from tasks.report_html import NOT_RUN, Raw, anchor, bar, e, img, note, png, table
from tasks.shards import planned_shards, read_marker, stage_key
from tasks.validate import (
    docs_prefix,
    quarantined_translations,
    shard_results,
    summary_key,
)

EXAMPLES = 3  # rejected examples shown per reason
MAX_LISTED = 20  # rows listed per validation table
STEP_LABELS = {"status": "downloaded (status ok)", "duplicate": "not a duplicate (exact or near)",
               "semdedup": "not a semantic duplicate", "quarantined": "not quarantined by validation"}


def stage_table(store: ArtifactStore, dataset: str, stage: str, columns: list[str],
                shards: list[int] | None = None) -> pa.Table | None:
    """A stage's output over its finished shards (only `columns` it has), or None when no shard finished."""
    parts = []
    for shard in planned_shards(store, dataset) if shards is None else shards:
        if read_marker(store, dataset, stage, shard) is None:
            continue
        try:
            part = store.get_parquet(stage_key(dataset, stage, shard, "parquet"))
        except StoreError:
            continue
        parts.append(part.select([c for c in columns if c in part.column_names]))
    return pa.concat_tables(parts, promote_options="default") if parts else None


def _cut(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


# ---- funnel and rejected examples ------------------------------------------------------------------------------

def funnel_steps(counts: dict) -> list[str]:
    """The selection gates in order: the filters as applied (status, duplicates, scores), then validation."""
    return [k for k in counts if k not in ("selected", "skipped", "quarantined", *NOT_FILTERS)] + ["quarantined"]


def funnel(samples: pa.Table, counts: dict) -> list[tuple[str, int, int]]:
    """[(step, samples left after it, samples it removed)], from "in" to "selected"; a sample leaves at the first
    gate it fails."""
    failed = [set(f or []) for f in samples.column("failed_filters").to_pylist()]
    alive = [True] * samples.num_rows
    rows = [("in", samples.num_rows, 0)]
    for step in funnel_steps(counts):
        before = sum(alive)
        alive = [a and step not in f for a, f in zip(alive, failed, strict=True)]
        rows.append((step, sum(alive), before - sum(alive)))
    return rows


def funnel_section(samples: pa.Table, counts: dict, waiting: int) -> str:
    steps = funnel(samples, counts)
    total = max(steps[0][1], 1)
    rows = []
    for step, left, lost in steps:
        label = "samples in (ingested shards)" if step == "in" else STEP_LABELS.get(step, f"passed {step}")
        lost_cell = Raw(f'<a href="#reject-{anchor(step)}">{lost}</a>') if lost else ("" if step == "in" else 0)
        rows.append([label, left, lost_cell, f"{left / total:.0%}"])
    rows.append([Raw("<b>selected</b>"), Raw(f"<b>{counts.get('selected', 0)}</b>"), "", ""])
    fig = Figure(figsize=(7, 0.35 * len(steps) + 1.2))
    ax = fig.subplots()
    labels = [s for s, _, _ in steps]
    ax.barh(labels, [left for _, left, _ in steps], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_title("samples left after each gate")
    ax.set_xlabel("samples")
    waiting_note = note(f"{waiting} more samples are planned in shards not ingested yet.") if waiting else ""
    return (table(["step", "samples left", "removed here", "of the input"], rows, "funnel")
            + waiting_note + f'<div class="plots">{img(png(fig), "funnel")}</div>'
            + note("A sample leaves at the first gate it fails; every gate it fails is in failed_filters "
                   "(samples.parquet). Stages that failed on a sample (extract, fuse, score errors) do not "
                   "remove it: see Stage timings for their outcomes."))


def _detail(step: str, row: dict, reasons: dict[str, list[str]]) -> str:
    """Why a sample failed `step`, from its own values."""
    if step == "status":
        return ": ".join(str(v) for v in (row.get("status"), row.get("error_class"), row.get("error")) if v)
    if step == "duplicate":
        return f"duplicate of {row.get('duplicate_of')}"
    if step == "semdedup":
        return f"semantic duplicate of {row.get('semdedup_duplicate_of')}"
    if step == "quarantined":
        return "; ".join(reasons.get(row["key"], [])) or "quarantined"
    column = {"nsfw": "nsfw", "language": "lang_alt"}.get(step) or (
        step.rsplit("_", 1)[0] if step.startswith("clip_") else None)
    if column and column in row:
        value = row[column]
        return f"{column} = {value:.3f}" if isinstance(value, float) else f"{column} = {value}"
    return f"original size {row.get('original_width')}x{row.get('original_height')}, lang {row.get('lang_alt')}"


def _first_gate(failed: list[str] | None, steps: list[str]) -> str | None:
    return next((s for s in steps if s in (failed or [])), None)


def rejected_rows(samples: pa.Table, counts: dict) -> dict[str, list[dict]]:
    """Per gate that samples failed: up to EXAMPLES of them, those it removed (their first failed gate) first."""
    out: dict[str, list[dict]] = {}
    steps = funnel_steps(counts)
    failed = samples.column("failed_filters").to_pylist()
    kinds = samples.column("error_class").to_pylist() if "error_class" in samples.column_names else None
    for step in steps:
        hits = sorted((i for i, f in enumerate(failed) if step in (f or [])),
                      key=lambda i: (_first_gate(failed[i], steps) != step, i))
        if step == "status" and kinds:  # one example of each error class first
            firsts: dict = {}
            for i in hits:
                firsts.setdefault(kinds[i], i)
            hits = list(firsts.values()) + [i for i in hits if i not in firsts.values()]
        hits = hits[:EXAMPLES]
        if hits:
            out[step] = samples.take(pa.array(hits, pa.int64())).to_pylist()
    return out


def rejected_section(examples: dict[str, list[dict]], counts: dict, reasons: dict[str, list[str]],
                     thumbs: dict[str, str]) -> str:
    if not examples:
        return note("No sample was rejected or quarantined.")
    parts = []
    for step, rows in examples.items():
        cards = []
        for r in rows:
            picture = img(thumbs[r["key"]], r.get("alt_text") or r["key"], "jpeg") if r["key"] in thumbs else \
                '<p class="not-run">(no image)</p>'
            cards.append(f'<div class="card">{picture}<p><b>alt-text:</b> {e(r.get("alt_text") or "")}</p>'
                         f'<p class="unsel">{e(_detail(step, r, reasons))}</p><p><code>{e(r["key"])}</code></p>'
                         "</div>")
        n = counts.get(step, len(rows))
        parts.append(f'<h3 id="reject-{anchor(step)}">{e(step)}: {_n(n, "sample")} fail{"s" * (n == 1)} it</h3>'
                     f'<div class="gallery">{"".join(cards)}</div>')
    return "".join(parts)


# ---- validation ------------------------------------------------------------------------------------------------

def _row_id(row_id: dict) -> str:
    return "/".join(str(v) for v in row_id.values())


def validation_section(store: ArtifactStore, dataset: str) -> tuple[str, dict | None]:
    """The validation results readable offline: per suite, each failed expectation with examples, rows and the
    action taken, and the captions sent back to the alt-text. Returns (html, the summary or None)."""
    try:
        summary = store.get_json(summary_key(dataset))
    except StoreError:
        return NOT_RUN.format("Validate"), None
    docs = f"{docs_prefix(dataset)}/index.html"
    docs_line = (f'<p>Great Expectations data docs: <a href="../validate/data_docs/index.html">'
                 f'{e(docs)}</a> (the full GX results; their styling and scripts load from CDNs, so they need a '
                 f'network connection to look right: this section is the offline view).</p>'
                 if store.exists(docs) else "")
    head = (f"<p>mode <b>{e(summary['on_failure'])}</b>, validated "
            f"{e(time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(summary['validated_at'])))}; no output "
            f"yet: {e(', '.join(summary['skipped_suites']) or '-')}.</p>{docs_line}")
    order = sorted(summary["suites"], key=lambda name: OUTPUT_STAGES.index(name) if name in OUTPUT_STAGES else 99)
    suites = [[suite, f"{s['passed']}/{s['shards']}", s["rows"], s["quarantined_rows"], s.get("caption_fallbacks", 0),
               ", ".join(f"{k} x{v}" for k, v in sorted(s["failing_expectations"].items())) or "-"]
              for suite in order for s in [summary["suites"][suite]]]
    results = [r for r in shard_results(store, dataset, order) if not r["success"]]
    failed = [[r["suite"], f"{r['shard']:05d}", f["expectation"], f["column"] or "(table)",
               f["unexpected_count"] if f["kind"] == "rows" else "whole shard",
               "; ".join(map(str, f["examples"])) or (str(f["observed"]) if f["observed"] is not None else ""),
               ", ".join(_row_id(i) for i in f.get("row_ids", [])),
               f.get("action") or ("fail" if r["on_failure"] == "fail" else "quarantine")]
              for r in results for f in r["failed"]]
    fallbacks = [f for r in results for f in r.get("fallbacks", [])]
    parts = [head, table(["suite", "shards passed", "rows", "quarantined rows", "captions back to the alt-text",
                          "failing expectations"], suites)]
    if failed:
        parts += ["<h3>Failed expectations</h3>",
                  table(["suite", "shard", "expectation", "column", "rows failing", "examples", "rows (first)",
                         "action"], failed[:MAX_LISTED] + ([[f"... and {len(failed) - MAX_LISTED} more"] + [""] * 7]
                                                          if len(failed) > MAX_LISTED else []), "wide")]
    else:
        parts.append("<p>Every expectation passed.</p>")
    if fallbacks:
        parts += [f'<h3 id="caption-fallbacks">Captions back to the alt-text ({len(fallbacks)})</h3>',
                  table(["key", "caption", "rejected text", "checks"],
                        [[f["key"], f["caption"], _cut(f["text"] or ""), "; ".join(f["reasons"])]
                         for f in fallbacks[:MAX_LISTED]], "wide")]
    return "".join(parts), summary


# ---- captions and translations ---------------------------------------------------------------------------------

def guards_section(store: ArtifactStore, dataset: str, fallbacks: dict[tuple[str, str], list[str]]) -> str:
    fused = stage_table(store, dataset, "fuse", ["key", "status", "fused_short", "fused_dense", "short_passed",
                                                  "dense_passed", "short_reasons", "dense_reasons"])
    if fused is None:
        return NOT_RUN.format("Fuse")
    rows = [r for r in fused.to_pylist() if r["status"] in ("ok", "error")]
    summary, parts = [], []
    for kind in ("short", "dense"):
        made = [r for r in rows if r.get(f"{kind}_passed") is not None]
        if not made:
            continue
        passed = sum(1 for r in made if r[f"{kind}_passed"])
        back = sum(1 for (_, c) in fallbacks if c == f"caption_{kind}")
        summary.append([kind, len(made), passed, f"{passed / len(made):.0%}", back, passed - back])
        by_reason: dict[str, list[tuple[str, str]]] = {}
        for r in made:
            for reason in r.get(f"{kind}_reasons") or []:
                by_reason.setdefault(reason.split(":", 1)[0], []).append((reason, r.get(f"fused_{kind}") or ""))
        if by_reason:
            top = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:10]
            parts.append(f"<h3>{e(kind)} captions rejected by the guards, by reason</h3>" + table(
                ["reason", "captions", "example", "rejected caption"],
                [[name, len(hits), _cut(hits[0][0]), _cut(hits[0][1])] for name, hits in top], "wide"))
    if not summary:
        return note("No caption was fused (every sample skipped).")
    return table(["caption", "fused", "passed the guards", "pass rate", "back to the alt-text at validation",
                  "published as fused"], summary) + "".join(parts) + note(
        "A caption that fails keeps its slot filled with the alt-text; the sample stays.")


def _median(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.2f}" if values else "-"


def translation_section(store: ArtifactStore, dataset: str) -> str:
    translated = stage_table(store, dataset, "translate", ["key", "field", "lang", "status", "qe_passed",
                                                           "qe_reasons", "qe_lang", "qe_length_ratio",
                                                           "qe_chrf_roundtrip"])
    if translated is None:
        return NOT_RUN.format("Translate")
    quarantined = quarantined_translations(store, dataset)
    by_lang: dict[str, list[dict]] = {}
    for r in translated.to_pylist():
        by_lang.setdefault(r["lang"] or "?", []).append(r)
    rows = []
    for lang, items in sorted(by_lang.items()):
        status = Counter(r["status"] for r in items)
        detected = [r for r in items if r["qe_lang"]]
        reasons = Counter(x.split(":", 1)[0] for r in items for x in r["qe_reasons"] or [])
        rows.append([lang, ", ".join(sorted({r["field"] for r in items})), len(items), status.get("ok", 0),
                     status.get("flagged", 0), status.get("error", 0),
                     f"{sum(1 for r in items if r['qe_passed']) / len(items):.0%}",
                     f"{sum(1 for r in detected if r['qe_lang'] == lang) / len(detected):.0%}" if detected else "-",
                     _median([r["qe_length_ratio"] for r in items]), _median([r["qe_chrf_roundtrip"] for r in items]),
                     sum(1 for r in items if (r["key"], r["field"], r["lang"]) in quarantined),
                     ", ".join(f"{k} x{v}" for k, v in reasons.most_common(4)) or "-"])
    return table(["language", "fields", "translations", "ok", "flagged", "error", "QE pass rate",
                  "output in the target language", "median length ratio", "median chrF (round trip)",
                  "quarantined", "QE reasons"], rows, "wide")


# ---- objects and timings ---------------------------------------------------------------------------------------

def objects_section(samples: pa.Table) -> str:
    if "object_counts" not in samples.column_names:
        return NOT_RUN.format("Extract (objects)")
    ok = [c for c, s in zip(samples.column("object_counts").to_pylist(), samples.column("status").to_pylist(),
                            strict=True) if s == "ok"]
    if all(c is None for c in ok):
        return note("No detections (the objects expert did not run).")
    instances, images = Counter(), Counter()
    for counts in ok:
        for label, n in counts or []:
            instances[label] += n
            images[label] += 1
    with_objects = sum(1 for c in ok if c)
    text = f"<p>{with_objects} of {len(ok)} downloaded images have a detection; {_n(len(instances), 'class')}.</p>"
    if not instances:
        return text
    rows = [[label, n, images[label]] for label, n in instances.most_common(30)]
    return (text + f'<div class="plots">{bar(dict(images), "images per detected class", "images")}</div>'
            + table(["class", "instances", "images"], rows))


def timings_section(store: ArtifactStore, dataset: str, report_seconds: float) -> str:
    shards = planned_shards(store, dataset)
    rows, seconds = [], {}
    for stage in OUTPUT_STAGES:
        markers = [m for s in shards if (m := read_marker(store, dataset, stage, s))]
        if not markers:
            continue
        spent = [m.get("seconds") or 0.0 for m in markers]
        starts = [m["finished_at"] - (m.get("seconds") or 0.0) for m in markers if m.get("finished_at")]
        ends = [m["finished_at"] for m in markers if m.get("finished_at")]
        counts = Counter()
        for m in markers:
            counts.update(m.get("counts") or {})
        seconds[stage] = round(sum(spent), 1)
        rows.append([stage, f"{len(markers)}/{len(shards)}", sum(m.get("samples") or 0 for m in markers),
                     ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), f"{sum(spent):.1f}",
                     f"{max(spent):.1f}", f"{max(ends) - min(starts):.1f}" if ends else "-",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(max(ends))) if ends else "-"])
    results = shard_results(store, dataset, list(OUTPUT_STAGES))
    if results:
        spent = [r.get("seconds") or 0.0 for r in results]
        seconds["validate"] = round(sum(spent), 1)
        rows.append(["validate", f"{len(results)} suite-shards", sum(r["samples"] for r in results), "-",
                     f"{sum(spent):.1f}", f"{max(spent):.1f}", "-", "-"])
    release = read_release(store, dataset)
    if release:
        rows.append(["publish", _n(len(release["shards"]), "tar"), release["selected"], "-", "-", "-", "-",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(release["published_at"]))])
    rows.append(["report (this page)", "-", "-", "-", f"{report_seconds:.1f}", "-", "-", "-"])
    plot = f'<div class="plots">{bar(seconds, "task seconds per stage (all shards)", "seconds")}</div>' \
        if seconds else ""
    return table(["stage", "shards done", "rows", "outcomes", "task seconds", "slowest shard (s)", "wall (s)",
                  "last finished"], rows) + plot + note(
        "Task seconds add up every shard's own time (shards run in parallel); wall is from the first shard's "
        "start to the last one's end. From the done markers and the validation results.")
