"""The dataset report: one self-contained HTML page (plots and thumbnails inline as base64 PNG/JPEG) written to
`<dataset>/report/index.html`.

What a dataset engineer looks for first comes first: the funnel (samples in, downloaded, each gate, selected),
the validation results (each failed expectation with examples, rows and the action taken; readable offline, the
GX data docs are linked), rejected and quarantined examples with their reasons, caption guard pass rates and
rejection reasons, translation QE per language; then scores, filters, languages, OCR coverage, object classes,
caption lengths, a gallery (OCR text, detected objects and OCR boxes drawn on the thumbnails) and stage timings.
A stage that did not run leaves its section saying so. Every text from the data (alt-text above all) is
HTML-escaped, and a Content-Security-Policy without scripts keeps a missed escape inert.
"""

from __future__ import annotations

import html
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from infra.settings import DatasetSpec, ScoreConfig
from infra.store import ArtifactStore
from tasks.publish import raw_images, read_release, select_samples, stages_run
from tasks.report_html import NOT_RUN, anchor, img, png, thumbnail
from tasks.report_html import bar as _bar
from tasks.report_sections import (
    funnel_section,
    guards_section,
    objects_section,
    rejected_rows,
    rejected_section,
    stage_table,
    timings_section,
    translation_section,
    validation_section,
)
from tasks.shards import RAW, input_key, planned_shards, read_marker
from tasks.stage import Stage
from tasks.validate import caption_fallbacks, quarantine_reasons

STAGE = "report"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:1rem} .plots img{max-width:100%;height:auto}
.not-run{color:#777;font-style:italic}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:1rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.5rem;font-size:.8rem;overflow-wrap:anywhere}
.card img{display:block;margin:0 auto .4rem;max-width:100%} .card p{margin:.2rem 0}
.sel{color:#0a7d28;font-weight:bold} .unsel{color:#b3261e;font-weight:bold}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.4rem 0;font-size:.85rem;z-index:1;
display:flex;flex-wrap:wrap;gap:.2rem .8rem} nav a{white-space:nowrap}
table.wide{font-size:.8rem} table.wide td{max-width:28rem} .legend span{font-weight:bold} .ocr{color:#00798c}
"""


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else []


def thresholds(cfg: ScoreConfig, table: pa.Table) -> dict[str, list[tuple[str, float]]]:
    """{score column: [(label, value)]} for the filters configured: CLIP minimums (LAION's 0.28/0.26 on the
    alt-text), the cut-off value of a CLIP top-k % filter on this data, and the NSFW maximum."""
    f = cfg.filters
    lines: dict[str, list[tuple[str, float]]] = {}
    if f.clip_min == "laion":
        lines["clip_alt"] = [("LAION min (English)", 0.28), ("LAION min (other)", 0.26)]
    elif f.clip_min:
        for field, value in f.clip_min.items():
            lines.setdefault(f"clip_{field}", []).append((f"min {value:g}", value))
    for field, pct in f.clip_top_percent.items():
        values = sorted((v for v in _column(table, f"clip_{field}") if v is not None), reverse=True)
        if values:
            cut = values[max(0, int(len(values) * pct / 100) - 1)]
            lines.setdefault(f"clip_{field}", []).append((f"top {pct:g}% cut-off", cut))
    if f.nsfw_max is not None:
        lines["nsfw"] = [(f"max {f.nsfw_max:g}", f.nsfw_max)]
    return lines


def _scores_section(table: pa.Table, cfg: ScoreConfig) -> str:
    columns = [c for c in ("clip_alt", "clip_short", "clip_dense", "nsfw") if c in table.column_names]
    if not columns:
        return NOT_RUN.format("Score")
    lines = thresholds(cfg, table)
    plots, empty = [], []
    for col in columns:
        values = [v for v in _column(table, col) if v is not None]
        if not values:
            empty.append(col)
            continue
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        ax.hist(values, bins=30, color="#4c72b0", alpha=0.85)
        for (label, value), style in zip(lines.get(col, []), ("--", ":", "-."), strict=False):
            ax.axvline(value, color="#c44e52", linestyle=style, linewidth=2, label=label)
        if lines.get(col):
            ax.legend(fontsize=8)
        ax.set_title(f"{col} ({len(values)} samples)")
        ax.set_xlabel("score")
        ax.set_ylabel("samples")
        plots.append(img(png(fig), f"{col} histogram"))
    note = f'<p class="not-run">No values (model off): {html.escape(", ".join(empty))}.</p>' if empty else ""
    return f'<div class="plots">{"".join(plots)}</div>{note}'


def _languages_section(table: pa.Table) -> str:
    parts = []
    if "lang_alt" in table.column_names:
        langs = Counter(v for v in _column(table, "lang_alt") if v)
        parts.append(_bar(dict(langs), "alt-text language (detected)") if langs else
                     '<p class="not-run">No alt-text language detected (language id off).</p>')
    else:
        parts.append(NOT_RUN.format("Score (language id)"))
    if "translations" in table.column_names:
        langs = Counter(f"{t['lang']} ({t['field']})" for ts in _column(table, "translations") for t in ts or [])
        parts.append(_bar(dict(langs), "translations kept, by language (field)", "translations") if langs else
                     '<p class="not-run">No translation kept.</p>')
    else:
        parts.append(NOT_RUN.format("Translate"))
    return f'<div class="plots">{"".join(parts)}</div>'


def _ocr_section(table: pa.Table) -> str:
    if "ocr_text" not in table.column_names:
        return NOT_RUN.format("Extract (OCR)")
    ok = [t for t, s in zip(_column(table, "ocr_text"), _column(table, "status"), strict=True) if s == "ok"]
    with_text = sum(1 for t in ok if t and t.strip())
    share = with_text / len(ok) if ok else 0.0
    fig = Figure(figsize=(5, 1.8))
    ax = fig.subplots()
    ax.barh(["images"], [with_text], color="#55a868", label="with OCR text")
    ax.barh(["images"], [len(ok) - with_text], left=[with_text], color="#cccccc", label="no text")
    ax.set_title(f"OCR coverage: {share:.1%} of {len(ok)} images have text")
    ax.set_xlabel("images")
    ax.legend(fontsize=8, loc="lower right")
    return f'<div class="plots">{img(png(fig), "OCR coverage")}</div>'


def _length_section(table: pa.Table) -> str:
    series = {name: [len(t.split()) for t in _column(table, name) if t]
              for name in ("alt_text", "caption_short", "caption_dense") if name in table.column_names}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return '<p class="not-run">No captions.</p>'
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    top = max(max(v) for v in series.values())
    bins = range(0, top + 2, max(1, (top + 1) // 30))
    for (name, values), colour in zip(series.items(), ("#8c8c8c", "#4c72b0", "#dd8452"), strict=False):
        ax.hist(values, bins=bins, alpha=0.6, color=colour,
                label=f"{name} (median {sorted(values)[len(values) // 2]} words)")
    ax.set_title("caption length before (alt_text) and after fusion")
    ax.set_xlabel("words")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    note = "" if "caption_short" in table.column_names else NOT_RUN.format("Fuse")
    return f'<div class="plots">{img(png(fig), "caption length")}</div>{note}'


def _filters_section(counts: dict) -> str:
    drops = {k: v for k, v in counts.items() if k not in ("selected", "skipped")}
    skipped = counts.get("skipped") or []
    note = (f'<p class="not-run">Filters skipped (their inputs were not computed): '
            f'{html.escape(", ".join(skipped))}.</p>') if skipped else ""
    plot = _bar(drops, f"samples failing each filter ({counts.get('selected', 0)} selected)") if drops else \
        '<p class="not-run">No filter configured.</p>'
    return f'<div class="plots">{plot}</div>{note}'


def _gallery_rows(table: pa.Table, n: int) -> list[dict]:
    """Up to n samples that have an image: selected ones first, then filtered ones, in table order."""
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    rows = ok.slice(0, 4 * n).to_pylist() if n else []
    return (sorted(rows, key=lambda r: not r["selected"]))[:n]


def _experts(store: ArtifactStore, dataset: str, rows: list[dict]) -> dict[str, dict]:
    """key -> the extract row (objects with boxes, OCR lines with boxes) of `rows`."""
    shards = sorted({r["raw_shard"] for r in rows})
    found = stage_table(store, dataset, "extract", ["key", "objects", "ocr"], shards)
    keys = {r["key"] for r in rows}
    return {r["key"]: r for r in found.to_pylist() if r["key"] in keys} if found is not None else {}


def thumbnails(store: ArtifactStore, dataset: str, rows: list[dict]) -> dict[str, str]:
    """key -> a base64 JPEG thumbnail with the experts' boxes (in the original image's pixels) drawn, for the rows
    whose image is stored."""
    images: dict[str, tuple] = {}
    for shard in sorted({r["raw_shard"] for r in rows if r.get("status") == "ok"}):
        images |= raw_images(store, dataset, shard, {r["key"] for r in rows if r["raw_shard"] == shard})
    experts = _experts(store, dataset, [r for r in rows if r["key"] in images])
    originals = {r["key"]: (r.get("original_width"), r.get("original_height")) for r in rows}
    return {key: thumbnail(data, experts.get(key, {}).get("objects"), experts.get(key, {}).get("ocr"),
                           originals.get(key)) for key, (_, data) in images.items()}


def _gallery_section(table: pa.Table, rows: list[dict], thumbs: dict[str, str]) -> str:
    if not rows:
        return '<p class="not-run">No sample with an image.</p>'
    cards = []
    e = html.escape
    for r in rows:
        if r["key"] not in thumbs:
            continue
        lines = [f'<p><b>alt-text:</b> {e(r["alt_text"] or "")}</p>']
        for field in ("caption_short", "caption_dense"):
            if r.get(field) and r[field] != r["alt_text"]:
                lines.append(f"<p><b>{field.split('_')[1]}:</b> {e(r[field])}</p>")
        if r.get("ocr_text"):
            lines.append(f'<p class="ocr"><b>OCR:</b> {e(r["ocr_text"])}</p>')
        if r.get("object_counts"):
            lines.append(f"<p><b>objects:</b> {e(', '.join(f'{k} x{v}' for k, v in r['object_counts']))}</p>")
        for t in (r.get("translations") or [])[:2]:
            lines.append(f"<p><b>{e(t['lang'])}:</b> {e(t['text'] or '')}</p>")
        scores = [f"{c} {r[c]:.2f}" for c in ("clip_alt", "clip_short", "nsfw") if r.get(c) is not None]
        if scores:
            lines.append(f"<p>{e(', '.join(scores))}</p>")
        verdict = ('<span class="sel">selected</span>' if r["selected"] else
                   f'<span class="unsel">filtered: {e(", ".join(r["failed_filters"] or []))}</span>')
        cards.append(f'<div class="card">{img(thumbs[r["key"]], r["alt_text"] or r["key"], "jpeg")}'
                     f'{"".join(lines)}<p>{verdict} <code>{e(r["key"])}</code></p></div>')
    legend = ('<p class="legend">Drawn on the thumbnails: <span style="color:#ff7f0e">detected objects</span> '
              'and <span style="color:#00b7eb">OCR lines</span>.</p>'
              if "ocr_text" in table.column_names or "object_counts" in table.column_names else "")
    return f'{legend}<div class="gallery">{"".join(cards)}</div>'


def _overview(table: pa.Table, counts: dict, release: dict | None, validation: dict | None) -> str:
    status = Counter(_column(table, "status"))
    if validation:
        suites = validation["suites"].values()
        checked = (f"{sum(s['passed'] for s in suites)} of {sum(s['shards'] for s in suites)} suite-shards passed; "
                   f"{sum(s['quarantined_rows'] for s in suites)} rows quarantined, "
                   f"{sum(s.get('caption_fallbacks', 0) for s in suites)} captions back to the alt-text")
    else:
        checked = "not validated yet"
    rows = [("samples", table.num_rows), ("selected", counts.get("selected", 0)),
            *((f"status {k}", v) for k, v in sorted(status.items())),
            ("stages run", ", ".join(stages_run(table))),
            ("published release", f"{release['selected']} samples in {len(release['shards'])} shards"
             if release else "not published yet")]
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    body += (f'<tr><th>validation</th><td><a href="#validation">{html.escape(checked)}</a></td></tr>')
    return f"<table>{body}</table>"


def _waiting(store: ArtifactStore, dataset: str) -> int:
    """Samples planned in shards that are not ingested yet."""
    return sum(store.get_parquet(input_key(dataset, s), columns=["key"]).num_rows
               for s in planned_shards(store, dataset) if read_marker(store, dataset, RAW, s) is None)


def build_report(store: ArtifactStore, dataset: str, spec: DatasetSpec) -> tuple[str, dict]:
    """The report page and a summary {samples, selected, status, filters, sections: {name: ran}}."""
    started = time.time()
    table, counts = select_samples(store, dataset, spec)
    status = Counter(_column(table, "status"))
    errors = Counter(v for v in _column(table, "error_class") if v)
    status_plots = _bar(dict(status), "sample status")
    status_plots += _bar(dict(errors), "error classes", "samples") if errors else "<p>No errors.</p>"
    validation, summary = validation_section(store, dataset)
    rejected = rejected_rows(table, counts)
    gallery = _gallery_rows(table, spec.publish.gallery_size)
    shown = gallery + [r for rows in rejected.values() for r in rows]
    thumbs = thumbnails(store, dataset, list({r["key"]: r for r in shown}.values()))
    sections = {
        "Overview": _overview(table, counts, read_release(store, dataset), summary),
        "Funnel": funnel_section(table, counts, _waiting(store, dataset)),
        "Validation": validation,
        "Rejected and quarantined": rejected_section(rejected, counts, quarantine_reasons(store, dataset), thumbs),
        "Caption guards": guards_section(store, dataset, caption_fallbacks(store, dataset)),
        "Translation QE": translation_section(store, dataset),
        "Status and errors": f'<div class="plots">{status_plots}</div>',
        "Scores": _scores_section(table, spec.score),
        "Filters": _filters_section(counts),
        "Languages": _languages_section(table),
        "OCR coverage": _ocr_section(table),
        "Objects": objects_section(table),
        "Caption length": _length_section(table),
        "Gallery": _gallery_section(table, gallery, thumbs),
    }
    sections["Stage timings"] = timings_section(store, dataset, time.time() - started)
    nav = "".join(f'<a href="#{anchor(name)}">{html.escape(name)}</a>' for name in sections)
    body = "".join(f'<section id="{anchor(name)}"><h2>{name}</h2>{content}</section>'
                   for name, content in sections.items())
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>capfactory report: {html.escape(dataset)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Dataset report: {html.escape(dataset)}</h1><p>generated {generated} by capfactory</p>"
            f"<nav>{nav}</nav>{body}</body></html>")
    summary = {"samples": table.num_rows, "selected": counts.get("selected", 0), "status": dict(status),
               "filters": counts, "stages_run": stages_run(table),
               "sections": {name: "stage not run" not in content for name, content in sections.items()}}
    return page, summary


def write_report(store: ArtifactStore, dataset: str, spec: DatasetSpec) -> dict:
    page, summary = build_report(store, dataset, spec)
    key = f"{dataset}/{STAGE}/index.html"
    store.put_bytes(key, page.encode("utf-8"))
    return {**summary, "key": key, "path": f"{store.uri}/{key}", "bytes": len(page)}


class ReportStage(Stage):
    name = "report"
    description = "The HTML report of the dataset: funnel, validation, rejections, QE, plots and a gallery."
    warm = ("tasks.report",)

    def summary(self, result: dict) -> list[str]:
        return [f"report of {result['dataset']}: {result['path']}",
                f"  {result['selected']} of {result['samples']} samples selected; stages run: "
                f"{', '.join(result['stages_run'])}"]
