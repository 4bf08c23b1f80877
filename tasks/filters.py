"""Filters as views: every sample keeps its scores and gets the list of filters it failed; nothing is deleted.

`apply_filters(table, cfg)` adds `failed_filters` (list<string>) and `selected` (bool: failed nothing) to a joined
sample table (raw columns + scores + semdedup) and returns per-filter counts. The filters (names as they appear in
`failed_filters`):

- status: the raw status is not ok. duplicate: ingest's exact / near duplicate (`duplicate_of`). semdedup: a
  semantic duplicate (`semdedup_duplicate_of`).
- clip_<field>_min: CLIP score below a threshold; the "laion" preset is LAION-5B's: alt-text >= 0.28 when the
  alt-text is English, >= 0.26 otherwise (the multilingual score of the alt-text when one was computed).
- clip_<field>_topk: not in the top k % by CLIP score (DataComp); exactly round(k % of the scored rows) pass, ties
  broken by key.
- datacomp_basic: DataComp's basic filter: English alt-text (langid), more than 2 words, shortest original side
  >= 200 px, aspect ratio <= 3.
- min_size / max_aspect: the original image's shortest side / longer-to-shorter ratio. language: alt-text language
  not in the allow-list. nsfw: NSFW probability above the maximum.

A filter whose input columns are absent (or entirely null: the score was off) is skipped and named in
counts["skipped"]. Otherwise a null score fails its filter: a sample that could not be scored is not vouched for.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from infra.settings import ScoreConfig

LAION_EN, LAION_OTHER = 0.28, 0.26
DATACOMP_MIN_SIDE, DATACOMP_MAX_ASPECT, DATACOMP_MIN_WORDS = 200, 3.0, 3


def _values(table: pa.Table, name: str) -> np.ndarray:
    """A column as a numpy array (floats: null -> nan; others: object with None)."""
    col = table.column(name)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return np.array(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)  # writable
    return np.asarray(col.to_pylist(), dtype=object)


def _present(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _usable(table: pa.Table, *names: str) -> bool:
    return all(n in table.column_names and table.column(n).null_count < table.num_rows for n in names)


def _sides(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    w, h = _values(table, "original_width"), _values(table, "original_height")
    return np.fmin(w, h), np.fmax(w, h)


def _aspect(table: pa.Table) -> np.ndarray:
    short, long = _sides(table)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(short > 0, long / short, np.inf)


def _laion_alt(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(score, threshold) per row for the LAION preset."""
    score = _values(table, "clip_alt")
    if not _usable(table, "lang_alt"):
        return score, np.full(len(score), LAION_EN)
    english = _values(table, "lang_alt") == "en"
    if "clip_translations" in table.column_names:
        # A non-English alt-text scored by the multilingual model (field "alt_text") is judged by that score.
        for i, entries in enumerate(table.column("clip_translations").to_pylist()):
            multi = [e["score"] for e in entries or [] if e["field"] == "alt_text" and e["score"] is not None]
            if multi and not english[i]:
                score[i] = multi[0]
    return score, np.where(english, LAION_EN, LAION_OTHER)


def _top_k(table: pa.Table, score: np.ndarray, percent: float) -> np.ndarray:
    """True where the row is NOT among the top `percent` % of the scored rows (exact count, ties by key)."""
    scored = np.flatnonzero(~np.isnan(score))
    k = int(np.floor(len(scored) * percent / 100.0 + 0.5))
    keys = _values(table, "key")[scored] if "key" in table.column_names else scored
    order = sorted(range(len(scored)), key=lambda j: (-score[scored[j]], str(keys[j])))
    fails = np.ones(len(score), dtype=bool)
    fails[scored[order[:k]]] = False
    return fails


def apply_filters(table: pa.Table, cfg: ScoreConfig) -> tuple[pa.Table, dict]:
    """(table with `failed_filters` and `selected`, {filter: rows failed, ..., "selected": n, "skipped": [...]})."""
    f = cfg.filters
    n = table.num_rows
    failures: dict[str, np.ndarray] = {}
    skipped: list[str] = []

    def check(name: str, columns: tuple[str, ...], fails, raw: bool = False) -> None:
        present = all(c in table.column_names for c in columns) if raw else _usable(table, *columns)
        if not present:
            skipped.append(name)
            return
        failures[name] = np.asarray(fails(), dtype=bool)

    check("status", ("status",), lambda: _values(table, "status") != "ok", raw=True)
    if f.drop_duplicates:
        check("duplicate", ("duplicate_of",), lambda: _present(table, "duplicate_of"), raw=True)
    if f.drop_semdedup:
        check("semdedup", ("semdedup_duplicate_of",), lambda: _present(table, "semdedup_duplicate_of"), raw=True)
    if f.clip_min == "laion":
        def laion() -> np.ndarray:
            score, threshold = _laion_alt(table)
            return np.isnan(score) | (score < threshold)

        check("clip_alt_min", ("clip_alt",), laion)
    elif f.clip_min:
        for field, threshold in f.clip_min.items():
            col = f"clip_{field}"
            check(f"{col}_min", (col,), lambda c=col, t=threshold: ~(_values(table, c) >= t))
    for field, percent in f.clip_top_percent.items():
        col = f"clip_{field}"
        check(f"{col}_topk", (col,), lambda c=col, p=percent: _top_k(table, _values(table, c), p))
    if f.datacomp_basic:
        def datacomp() -> np.ndarray:
            words = np.array([len((t or "").split()) for t in table.column("alt_text").to_pylist()])
            short, _ = _sides(table)
            good = ((_values(table, "lang_alt") == "en") & (words >= DATACOMP_MIN_WORDS)
                    & (short >= DATACOMP_MIN_SIDE) & (_aspect(table) <= DATACOMP_MAX_ASPECT))
            return ~good

        check("datacomp_basic", ("lang_alt", "alt_text", "original_width", "original_height"), datacomp)
    if f.min_size is not None:
        check("min_size", ("original_width", "original_height"), lambda: ~(_sides(table)[0] >= f.min_size))
    if f.max_aspect is not None:
        check("max_aspect", ("original_width", "original_height"), lambda: ~(_aspect(table) <= f.max_aspect))
    if f.languages:
        allowed = set(f.languages)
        check("language", ("lang_alt",), lambda: np.array([v not in allowed for v in _values(table, "lang_alt")],
                                                           dtype=bool))
    if f.nsfw_max is not None:
        check("nsfw", ("nsfw",), lambda: ~(_values(table, "nsfw") <= f.nsfw_max))

    names = list(failures)
    matrix = np.stack([failures[name] for name in names], axis=1) if names else np.zeros((n, 0), dtype=bool)
    failed = [[names[j] for j in np.flatnonzero(row)] for row in matrix]
    selected = ~matrix.any(axis=1)
    for column in ("failed_filters", "selected"):
        if column in table.column_names:
            table = table.drop_columns(column)
    table = table.append_column("failed_filters", pa.array(failed, pa.list_(pa.string())))
    table = table.append_column("selected", pa.array(selected, pa.bool_()))
    counts: dict = {name: int(failures[name].sum()) for name in names}
    counts["selected"] = int(selected.sum())
    counts["skipped"] = skipped
    return table, counts
