"""Publish: the joined sample table, the filters as a view, and the final WebDataset + Parquet release.

Layout written under `<dataset>/published/`:
    shard-00000.tar     WebDataset of the selected samples: KEY.jpg (the raw image, unchanged), KEY.txt (the
                        chosen caption), KEY.json (everything known about the sample; see `sample_meta`)
    samples.parquet     one row per sample, selected or not, with why it was filtered (`failed_filters`)
    README.md           a Hugging Face dataset card
    _published.json     the marker, written last: the shards, counts and config of this release

Publishing is dataset-wide (top-k filters need every row): `plan_publish` joins and filters once and stages the
table; `publish_shard` writes one tar from the raw tars (by key, never passing bytes between tasks);
`finish_publish` writes the Parquet, the card and the marker, then removes the tars of a previous, larger release.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.settings import DatasetSpec, PublishConfig
from infra.stages import OUTPUT_STAGES, stage_class
from infra.store import ArtifactStore, StoreError, open_store
from tasks.filters import apply_filters
from tasks.fuse import fallback_caption
from tasks.semdedup import SEMDEDUP_KEY
from tasks.shards import (
    RAW,
    TarWriter,
    is_image_member,
    planned_shards,
    read_marker,
    read_shard_members,
    stage_key,
)
from tasks.stage import Stage, take_by_key
from tasks.translate import TRANSLATION
from tasks.validate import CAPTION_SLOTS, caption_fallbacks, quarantined_keys, quarantined_translations

log = logging.getLogger(__name__)

STAGE = "publish"
SEMDEDUP = "semdedup"  # the score stage's dataset-wide output, joined after the per-shard ones
PROVENANCE = pa.map_(pa.string(), pa.string())
# HF `datasets`' webdataset loader takes KEY.json's types from the first 5 samples of the first tar (a field null
# or an empty list in all of them fails the load when a later sample fills it): `plan_publish` puts samples that
# together hold a value wherever any sample does first.
INFERRED_FROM = 5
# Counts of what validation set aside inside samples that stay, beside the filter counts (not filters).
NOT_FILTERS = {"caption_fallbacks": "captions (back to the alt-text)", "quarantined_translations": "translations"}


def _marker(dataset: str) -> str:
    return f"{dataset}/{STAGE}/_published.json"


def _plan_key(dataset: str) -> str:
    return f"{dataset}/{STAGE}/_plan.parquet"


def _read_done(store: ArtifactStore, dataset: str, stage: str, shard: int) -> pa.Table | None:
    """A stage's table for a shard, only once its done marker exists."""
    if read_marker(store, dataset, stage, shard) is None:
        return None
    try:
        return store.get_parquet(stage_key(dataset, stage, shard, "parquet"))
    except StoreError:
        return None


def _provenance(keys: list[str], parts: dict[str, pa.Table | None], runs: dict[str, str]) -> pa.Array:
    """One map per sample: each stage's provenance entries prefixed with the stage name, and the Prefect flow run
    that made the sample's shard in each stage (`<stage>.flow_run_id`, from the done markers)."""
    merged: list[dict[str, str]] = [{f"{stage}.flow_run_id": run for stage, run in runs.items()} for _ in keys]
    index = {k: i for i, k in enumerate(keys)}
    for stage, table in parts.items():
        if table is None or "provenance" not in table.column_names:
            continue
        for key, prov in zip(table.column("key").to_pylist(), table.column("provenance").to_pylist(), strict=True):
            if key in index and prov:
                merged[index[key]].update({f"{stage}.{k}": v for k, v in prov if v is not None})
    return pa.array([sorted(m.items()) for m in merged], PROVENANCE)


def _shard_columns(store: ArtifactStore, dataset: str, shard: int, releasing: list, semdedup: pa.Table | None,
                   **options) -> tuple[pa.Table, dict[str, dict[str, pa.Array]]]:
    raw = store.get_parquet(stage_key(dataset, RAW, shard, "parquet"))
    keys = raw.column("key").combine_chunks()
    stages: dict[str, dict[str, pa.Array]] = {}
    parts: dict[str, pa.Table | None] = {RAW: None}
    for stage in releasing:
        parts[stage.name] = _read_done(store, dataset, stage.name, shard)
        if parts[stage.name] is not None:
            stages[stage.name] = stage.release_columns(keys, parts[stage.name], **options)
    if semdedup is not None:
        stages[SEMDEDUP] = take_by_key(keys, semdedup, ["semdedup_duplicate_of"])
    raw = raw.append_column("raw_shard", pa.array([shard] * raw.num_rows, pa.int32()))
    runs = {stage: marker["flow_run_id"] for stage in (RAW, *(s for s, t in parts.items() if t is not None))
            if (marker := read_marker(store, dataset, stage, shard)) and marker.get("flow_run_id")}
    raw = raw.append_column("provenance", _provenance(keys.to_pylist(), parts, runs))
    return raw, stages


def joined_table(store: ArtifactStore, dataset: str, shards: list[int] | None = None,
                 drop_failed_translations: bool = False) -> pa.Table:
    """Every raw row of the finished raw shards with what each later stage releases (its `release_columns`, in
    pipeline order), joined by key, then `semdedup_duplicate_of`, `raw_shard` and a merged `provenance` map. A
    stage that ran on no shard contributes no column; one that ran on some shards gives nulls on the others."""
    done = [s for s in planned_shards(store, dataset) if read_marker(store, dataset, RAW, s) is not None]
    if shards is not None:
        done = [s for s in done if s in set(shards)]
    if not done:
        raise ValueError(f"dataset {dataset!r} has no ingested shards in {store.uri}; run `capfactory ingest` first")
    try:
        semdedup = store.get_parquet(SEMDEDUP_KEY.format(dataset=dataset))
    except StoreError:
        semdedup = None
    releasing = [stage_class(name)() for name in OUTPUT_STAGES if name != RAW]
    per_shard = [_shard_columns(store, dataset, s, releasing, semdedup,
                                drop_failed_translations=drop_failed_translations) for s in done]
    # Columns in stage order, from the union over shards, with their types.
    stage_order = [*(s.name for s in releasing), SEMDEDUP]
    schemas = {s.name: s.schema for s in releasing}
    order: list[tuple[str, str]] = []
    seen: dict[str, pa.DataType] = {}
    for _, stages in per_shard:
        for stage in stage_order:
            for name, arr in stages.get(stage, {}).items():
                if name not in seen:
                    seen[name] = arr.type
                    order.append((stage, name))
    order.sort(key=lambda sn: stage_order.index(sn[0]))
    tables = []
    for raw, stages in per_shard:
        prov = raw.column("provenance")
        t = raw.drop_columns(["raw_shard", "provenance"])
        for stage, name in order:
            arr = stages.get(stage, {}).get(name)
            if arr is None:
                schema = schemas.get(stage)
                arr = pa.nulls(raw.num_rows, schema.field(name).type if schema and name in schema.names
                               else seen[name])
            t = t.append_column(name, arr)
        tables.append(t.append_column("raw_shard", raw.column("raw_shard")).append_column("provenance", prov))
    return pa.concat_tables(tables, promote_options="default")


def _drop_translations(table: pa.Table, quarantined: set[tuple[str, str, str]]) -> tuple[pa.Table, int]:
    """Leave out the translations validation quarantined (by key, field, lang); returns (table, how many)."""
    if not quarantined or "translations" not in table.column_names:
        return table, 0
    kept, dropped = [], 0
    for key, items in zip(table.column("key").to_pylist(), table.column("translations").to_pylist(), strict=True):
        keep = [t for t in items or [] if (key, t["field"], t["lang"]) not in quarantined]
        dropped += len(items or []) - len(keep)
        kept.append(keep)
    index = table.column_names.index("translations")
    return table.set_column(index, "translations", pa.array(kept, pa.list_(TRANSLATION))), dropped


def _edit(table: pa.Table, name: str, rows: list[int], value) -> pa.Table:
    """`table` with column `name` set to `value(row, old value)` on `rows` (a column it lacks is left alone)."""
    if name not in table.column_names or not rows:
        return table
    values = table.column(name).to_pylist()
    for i in rows:
        values[i] = value(i, values[i])
    index = table.column_names.index(name)
    return table.set_column(index, name, pa.array(values, table.schema.field(name).type))


def apply_caption_fallbacks(table: pa.Table, fallbacks: dict[tuple[str, str], list[str]]) -> tuple[pa.Table, int]:
    """Send the captions validation rejected back to the alt-text (see tasks.validate.caption_fallbacks): the slot
    holds what fuse falls back on (the alt-text without injected instructions), its verdict is false and its
    reasons end with `validate: <expectation>`; what was made from the rejected caption (its CLIP score and
    language, its translations) goes with it. The sample and its other captions stay. Returns (table, captions)."""
    keys = table.column("key").to_pylist()
    alt = table.column("alt_text").to_pylist()
    applied = 0
    for caption, (passed, reasons) in CAPTION_SLOTS.items():
        rows = [i for i, k in enumerate(keys) if (k, caption) in fallbacks]
        if caption not in table.column_names or not rows:
            continue
        applied += len(rows)
        slot = caption.removeprefix("caption_")
        table = _edit(table, caption, rows, lambda i, _: fallback_caption(alt[i]))
        table = _edit(table, passed, rows, lambda i, _: False)
        table = _edit(table, reasons, rows, lambda i, old, c=caption: [
            *(old or []), *(f"validate: {name}" for name in fallbacks[(keys[i], c)])])
        for derived in (f"clip_{slot}", f"lang_{slot}"):
            table = _edit(table, derived, rows, lambda i, _: None)
        for listed in ("translations", "clip_translations"):
            table = _edit(table, listed, rows, lambda i, old, c=caption: [t for t in old or [] if t["field"] != c])
    return table, applied


def select_samples(store: ArtifactStore, dataset: str, spec: DatasetSpec) -> tuple[pa.Table, dict]:
    """The joined table with the quality filters applied (`failed_filters`, `selected`) and what the validation
    stage set aside left out: samples (filter name "quarantined"), single translations, and single captions, which
    fall back to the alt-text. Returns (table, counts per filter)."""
    table = joined_table(store, dataset, drop_failed_translations=spec.translate.drop_failed)
    table, fallbacks = apply_caption_fallbacks(table, caption_fallbacks(store, dataset))
    table, counts = apply_filters(table, spec.score)
    table, dropped = _drop_translations(table, quarantined_translations(store, dataset))
    quarantined = quarantined_keys(store, dataset)
    hit = pc.is_in(table.column("key"), value_set=pa.array(sorted(quarantined), pa.string())).to_pylist()
    failed = [list(f or []) + (["quarantined"] if q else []) for f, q in
              zip(table.column("failed_filters").to_pylist(), hit, strict=True)]
    selected = [bool(s) and not q for s, q in zip(table.column("selected").to_pylist(), hit, strict=True)]
    table = table.set_column(table.column_names.index("failed_filters"), "failed_filters",
                             pa.array(failed, pa.list_(pa.string())))
    table = table.set_column(table.column_names.index("selected"), "selected", pa.array(selected, pa.bool_()))
    counts = {**counts, "quarantined": sum(hit), "selected": sum(selected)}
    if dropped:
        counts["quarantined_translations"] = dropped
    if fallbacks:
        counts["caption_fallbacks"] = fallbacks
    return table, counts


def plan_publish(store_uri: str, dataset: str, spec: DatasetSpec) -> dict:
    """Join and filter the whole dataset, number the selected samples into output shards, and stage the table
    (`published/_plan.parquet`) the shard tasks read. Removes the release marker first: until `finish_publish`
    writes it again, the published folder is in the making."""
    store = open_store(store_uri)
    store.delete(_marker(dataset))
    table, counts = select_samples(store, dataset, spec)
    # The samples that show every field's type go first, so the release loads with its types inferred.
    witnesses, untyped = type_witnesses(table)
    if untyped:
        log.warning("%s: no %d samples hold a value at every KEY.json path some sample has (%s); HF `datasets` "
                    "readers of the tars need `features=`", dataset, INFERRED_FROM, ", ".join(sorted(untyped)))
    table = table.take(np.concatenate([witnesses, np.delete(np.arange(table.num_rows), witnesses)]).astype(np.int64))
    size = spec.publish.shard_size
    position = pc.subtract(pc.cumulative_sum(pc.cast(table.column("selected"), pa.int64())), 1)
    out = pc.if_else(table.column("selected"), pc.cast(pc.divide(position, size), pa.int32()),
                     pa.scalar(None, pa.int32()))
    table = table.append_column("published_shard", out)
    store.put_parquet(_plan_key(dataset), table)
    n_selected = counts["selected"]
    shards = math.ceil(n_selected / size)
    return {"plan": _plan_key(dataset), "samples": table.num_rows, "selected": n_selected, "shards": shards,
            "shard_samples": {s: min(size, n_selected - s * size) for s in range(shards)}, "filters": counts,
            "untyped": sorted(untyped)}


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def sample_meta(row: dict, maps: set[str]) -> dict:
    """KEY.json: every column of the release table, in every sample, as its Arrow type gives it (strings, numbers
    that stay floats, lists, objects for structs); a missing value is null (NaN too), as in samples.parquet. The
    `maps` columns are lists of {"key", "value"} objects, the Parquet's form: objects whose keys vary from sample to
    sample lose the keys a schema-inferring reader did not see first (HF `datasets` fills them with null)."""
    return {k: ([{"key": mk, "value": _jsonable(mv)} for mk, mv in v] if k in maps and v is not None
                else _jsonable(v)) for k, v in row.items()}


def _present(arr: pa.Array, path: str, out: dict[str, np.ndarray]) -> None:
    """Whether each item of `arr` has a value in KEY.json (null and NaN have none), into `out[path]`, and the same
    for what it holds: struct fields at `path.name`, list items at `path[]` (per item, for the item's row)."""
    present = arr.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_floating(arr.type):
        present &= ~pc.fill_null(pc.is_nan(arr), True).to_numpy(zero_copy_only=False)
    if pa.types.is_struct(arr.type):
        for i, field in enumerate(arr.type):
            inner: dict[str, np.ndarray] = {}
            _present(arr.field(i), f"{path}.{field.name}", inner)
            out |= {p: m & present for p, m in inner.items()}
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        inner = {}
        _present(arr.flatten(), path + "[]", inner)
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        for p, m in inner.items():
            rows = np.zeros(len(arr), bool)
            rows[parents[m]] = True
            out[p] = rows
    out[path] = present


def type_witnesses(table: pa.Table, limit: int = INFERRED_FROM) -> tuple[list[int], set[str]]:
    """Up to `limit` selected rows whose KEY.json together have a value at every JSON path where some selected
    sample has one (greedy set cover over the distinct sets of paths, the earliest row first), and the paths
    left without one."""
    selected = np.flatnonzero(table.column("selected").to_numpy())
    if not len(selected):
        return [], set()
    present: dict[str, np.ndarray] = {}
    for name, column in zip(table.column_names, _unmap(table.take(selected)).columns, strict=True):
        _present(column.combine_chunks(), name, present)
    paths = sorted(present)
    matrix = np.stack([present[p] for p in paths], axis=1)
    signatures, first = np.unique(matrix, axis=0, return_index=True)
    missing = signatures.any(axis=0)
    chosen: list[int] = []
    while missing.any() and len(chosen) < limit:
        gain = (signatures & missing).sum(axis=1)
        best = max(range(len(first)), key=lambda i: (gain[i], -first[i]))
        chosen.append(int(selected[first[best]]))
        missing &= ~signatures[best]
    return chosen, {p for p, m in zip(paths, missing, strict=True) if m}


def chosen_caption(row: dict, field: str) -> str:
    return row.get(field) or row.get("alt_text") or ""


def raw_images(store: ArtifactStore, dataset: str, shard: int, keys: set[str]) -> dict[str, tuple[str, bytes]]:
    """{key: (ext, image bytes)} for `keys` from one raw tar, reading only those members."""
    members = read_shard_members(store, dataset, shard,
                                 lambda name: is_image_member(name) and name.rpartition(".")[0] in keys)
    return {name.rpartition(".")[0]: (name.rpartition(".")[2], data) for name, data in members.items()}


def publish_shard(store_uri: str, dataset: str, shard: int, plan_key: str, cfg: PublishConfig) -> dict:
    """Write `published/shard-NNNNN.tar` with the samples the plan numbered into it, images from the raw tars."""
    started = time.time()
    store = open_store(store_uri)
    table = store.get_parquet(plan_key)
    table = table.filter(pc.equal(table["published_shard"], shard))
    maps = {f.name for f in table.schema if pa.types.is_map(f.type)}
    rows = table.to_pylist()
    with tempfile.TemporaryDirectory(prefix="capfactory-") as tmp:
        images: dict[str, tuple] = {}
        for raw_shard in sorted({r["raw_shard"] for r in rows}):
            wanted = {r["key"] for r in rows if r["raw_shard"] == raw_shard}
            images |= raw_images(store, dataset, raw_shard, wanted)
        missing = [r["key"] for r in rows if r["key"] not in images]
        if missing:
            raise RuntimeError(f"{len(missing)} selected samples have no image in their raw tar (e.g. {missing[0]}); "
                               "re-run ingest for their shards")
        writer = TarWriter(Path(tmp))
        for r in rows:
            ext, data = images[r["key"]]
            writer.add_sample(r["key"], ext, data, chosen_caption(r, cfg.caption_field), sample_meta(r, maps))
        path = writer.finish()
        size = path.stat().st_size
        store.put_file(stage_key(dataset, STAGE, shard, "tar"), path)
    return {"shard": shard, "samples": len(rows), "counts": {"ok": len(rows)}, "bytes": size,
            "config_hash": cfg.config_hash(), "input_marker": plan_key, "provenance": {},
            "seconds": round(time.time() - started, 3)}


def _unmap(table: pa.Table) -> pa.Table:
    """Map columns as list<struct<key, value>> (the same data): Hugging Face `datasets` has no map feature."""
    for i, field in enumerate(table.schema):
        if pa.types.is_map(field.type):
            arr = table.column(i).combine_chunks()
            entries = pa.StructArray.from_arrays([arr.keys, arr.items], names=["key", "value"])
            mask = arr.is_null() if arr.null_count else None
            table = table.set_column(i, field.name, pa.ListArray.from_arrays(arr.offsets, entries, mask=mask))
    return table


def size_category(n: int) -> str:
    """The Hugging Face size_categories bucket for n samples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1T" if n > 10**12 else "1B<n<10B")


def languages(table: pa.Table) -> list[str]:
    """Languages present: the detected alt-text languages and the translation targets."""
    langs: Counter = Counter()
    if "lang_alt" in table.column_names:
        langs.update(v for v in table.column("lang_alt").to_pylist() if v)
    if "translations" in table.column_names:
        langs.update(t["lang"] for ts in table.column("translations").to_pylist() for t in ts or [] if t["lang"])
    return sorted(langs)


def stages_run(table: pa.Table) -> list[str]:
    """The output stages whose columns the joined table carries (ingest always), and semdedup."""
    ran = [name for name in OUTPUT_STAGES[1:] if set(stage_class(name)().published) & set(table.column_names)]
    return [RAW, *ran, *([SEMDEDUP] if "semdedup_duplicate_of" in table.column_names else [])]


def dataset_card(dataset: str, table: pa.Table, plan: dict, spec: DatasetSpec) -> str:
    """README.md: the Hugging Face card header, then sources, stages, models, filter counts and how to load."""
    cfg = spec.publish
    langs = languages(table)
    header = ["---", f"license: {cfg.license}", "task_categories:", "- image-to-text", "- text-to-image"]
    if langs:
        header += ["language:", *(f"- {lang}" for lang in langs)]
    header += ["size_categories:", f"- {size_category(plan['selected'])}", f"pretty_name: {dataset}",
               # One config: a folder's configs share one loader, and the webdataset one cannot read the Parquet.
               "configs:", "- config_name: default", "  data_files:", "  - split: train", "    path: shard-*.tar",
               "---"]
    sources = Counter(table.column("source").to_pylist()) if "source" in table.column_names else Counter()
    models = Counter(k + ": " + v for m in table.column("provenance").to_pylist() for k, v in m or []
                     if not k.endswith("config_hash"))
    filters = {k: v for k, v in plan["filters"].items() if k not in ("selected", "skipped", *NOT_FILTERS)}
    set_aside = [f"{plan['filters'][k]} {what}" for k, what in NOT_FILTERS.items() if plan["filters"].get(k)]
    lines = [
        f"# {dataset}", "",
        cfg.description or "Image-text pairs built by capfactory: web alt-text enriched with vision experts, "
        "LLM-fused captions, translations and quality scores, filtered as configured below.", "",
        f"{plan['selected']} of {plan['samples']} samples are selected and in the WebDataset shards "
        f"(`shard-*.tar`, {plan['shards']} shards); `samples.parquet` lists "
        f"{'every sample, with why it was filtered' if cfg.include_unselected_in_parquet else 'the selected ones'}.",
        f"The caption in `KEY.txt` is `{cfg.caption_field}` (the alt-text where it is empty).",
        "`KEY.json` has every column of `samples.parquet` in every sample, with the same types: a missing value is "
        "`null` (never `\"\"` or 0), a map is a list of `{\"key\", \"value\"}` objects.", "",
        *([f"No {INFERRED_FROM} samples show the type of {', '.join(plan['untyped'])}: pass `features` "
           "to `load_dataset`.", ""] if plan.get("untyped") else []),
        "## Sources", "", *(f"- {s or 'unknown'}: {n} samples" for s, n in sources.most_common(20)), "",
        "## Stages and models", "", f"Stages that ran: {', '.join(stages_run(table))}.", "",
        *(f"- {m} ({n} samples)" for m, n in sorted(models.items())), "",
        "## Filters", "", "| filter | samples failing |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in filters.items()),
        f"| **selected** | **{plan['selected']}** |", "",
        *([f"Validation also set aside {' and '.join(set_aside)}; their samples stay.", ""] if set_aside else []),
        *([f"Skipped (their inputs were not computed): {', '.join(plan['filters']['skipped'])}.", ""]
          if plan["filters"].get("skipped") else []),
        "## How to load", "", "```python", "import webdataset as wds",
        f'ds = wds.WebDataset("shard-{{00000..{max(plan["shards"] - 1, 0):05d}}}.tar").decode("pil")'
        '.to_tuple("jpg", "txt", "json")', "",
        "import datasets",
        'samples = datasets.load_dataset("parquet", data_files="samples.parquet", split="train")',
        'images = datasets.load_dataset("webdataset", data_files="shard-*.tar", split="train")',
        "# or the folder itself (this card's config): datasets.load_dataset(\"path/to/publish\", split=\"train\")",
        "```", "",
        "The images keep their owners' rights; check the licence of every source before use.", "",
    ]
    return "\n".join([*header, "", *lines])


def finish_publish(store_uri: str, dataset: str, spec: DatasetSpec, plan: dict, shard_stats: list[dict]) -> dict:
    """Write samples.parquet, the card and the marker (last), then remove tars left from a larger release."""
    store = open_store(store_uri)
    table = store.get_parquet(plan["plan"])
    card = dataset_card(dataset, table, plan, spec)
    if not spec.publish.include_unselected_in_parquet:
        table = table.filter(table.column("selected"))
    sink = io.BytesIO()
    pq.write_table(_unmap(table), sink, compression="zstd")
    store.put_bytes(f"{dataset}/{STAGE}/samples.parquet", sink.getvalue())
    store.put_bytes(f"{dataset}/{STAGE}/README.md", card.encode("utf-8"))
    tars = [stage_key(dataset, STAGE, s, "tar") for s in range(plan["shards"])]
    marker = {
        "dataset": dataset, "samples": plan["samples"], "selected": plan["selected"], "shards": tars,
        "filters": plan["filters"], "config_hash": spec.publish.config_hash(),
        "quality_config_hash": spec.score.config_hash(), "bytes": sum(s["bytes"] for s in shard_stats),
        "samples_sha256": hashlib.sha256(sink.getvalue()).hexdigest(), "published_at": time.time(),
        "untyped_fields": plan.get("untyped", []),
    }
    store.put_json(_marker(dataset), marker)
    stale = [k for k in store.list(f"{dataset}/{STAGE}") if k.endswith(".tar") and k not in set(tars)]
    for key in stale:
        store.delete(key)
    store.delete(plan["plan"])
    return {**marker, "stale_removed": stale}


def read_release(store: ArtifactStore, dataset: str) -> dict | None:
    """The marker of the last finished release, or None while none exists (or one is being written)."""
    try:
        return store.get_json(_marker(dataset))
    except StoreError:
        return None


class PublishStage(Stage):
    name = "publish"
    description = "Publish the selected samples as WebDataset + Parquet with a dataset card."
    warm = ("tasks.publish",)

    def summary(self, result: dict) -> list[str]:
        return [f"dataset {result['dataset']}: {result['selected']} of {result['samples']} samples published in "
                f"{len(result['shards'])} shards under {result['store']}/{result['folder']}/",
                "  filters: " + ", ".join(f"{k}={v}" for k, v in result["filters"].items() if k != "skipped")]
