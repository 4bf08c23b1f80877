"""Suite `scores`: the scores table (one row per raw sample: key, status ok|skipped|error, error, clip_alt,
clip_short, clip_dense, clip_translations list<struct<field, lang, score>>, nsfw, lang_alt, lang_alt_prob,
lang_short, lang_dense, provenance), with drift checks against a reference shard.

Drift: each score's mean and median must stay within `drift_tolerance` of the reference shard's, and the KL
divergence of its histogram from the reference's must stay below `drift_max_kl` (over the rows with a valid
score). Shards with fewer than `drift_min_rows` such rows are not checked (their statistics are noise)."""

from __future__ import annotations

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd

from expectations.common import LANG_REGEX, SuiteInputs, provenance, sample_keys, status_values, table_shape, where

SUITE = "score"
ROW_ID = ("key",)
COLUMNS = ["key", "status", "error", "clip_alt", "clip_short", "clip_dense", "clip_translations", "nsfw",
           "lang_alt", "lang_alt_prob", "lang_short", "lang_dense", "provenance"]
RANGES = {"clip_alt": (-1.0, 1.0), "clip_short": (-1.0, 1.0), "clip_dense": (-1.0, 1.0), "nsfw": (0.0, 1.0)}
BINS = 10
SMOOTHING = 0.5  # added to each reference bin count, so an empty reference bin is unlikely, not impossible


def prepare(frame: pd.DataFrame) -> pd.DataFrame:
    """The per-translation CLIP scores as two plain columns GX can range-check (their min and max per row)."""
    if "clip_translations" not in frame:
        return frame
    scores = [[t["score"] for t in items if t["score"] is not None] if items is not None else []
              for items in frame["clip_translations"]]
    return frame.assign(clip_translations_min=[min(s) if s else None for s in scores],
                        clip_translations_max=[max(s) if s else None for s in scores])


def _scored(column: str) -> str:
    """Rows with a valid score (out-of-range ones are set aside by the range checks, not counted as drift)."""
    low, high = RANGES[column]
    return f'status == "ok" and {low} <= {column} <= {high}'  # NaN compares false: rows without a score drop out


def reference_stats(frame: pd.DataFrame) -> dict:
    """Mean, median and histogram of each score column of the reference shard (scored rows only)."""
    out = {}
    for column, (low, high) in RANGES.items():
        if column not in frame:
            continue
        values = pd.to_numeric(frame.query(_scored(column))[column], errors="coerce").dropna().to_numpy(float)
        if not len(values):
            continue
        edges = np.linspace(low, high, BINS + 1)
        counts, _ = np.histogram(values, bins=edges)
        weights = (counts + SMOOTHING) / (counts.sum() + SMOOTHING * BINS)
        out[column] = {"rows": len(values), "mean": float(values.mean()), "median": float(np.median(values)),
                       "bins": edges.tolist(), "weights": weights.tolist()}
    return out


def drift(inputs: SuiteInputs) -> list:
    cfg, frame, reference = inputs.cfg, inputs.frame, inputs.reference or {}
    out = []
    for column, ref in reference.get("columns", {}).items():
        if column not in frame or len(frame.query(_scored(column))) < cfg.drift_min_rows:
            continue
        tol, cond = cfg.drift_tolerance, where(_scored(column))
        out += [
            gxe.ExpectColumnMeanToBeBetween(column=column, min_value=ref["mean"] - tol, max_value=ref["mean"] + tol,
                                            **cond),
            gxe.ExpectColumnMedianToBeBetween(column=column, min_value=ref["median"] - tol,
                                              max_value=ref["median"] + tol, **cond),
            gxe.ExpectColumnKLDivergenceToBeLessThan(
                column=column, partition_object={"bins": ref["bins"], "weights": ref["weights"]},
                threshold=cfg.drift_max_kl, **cond),
        ]
    return out


def expectations(inputs: SuiteInputs) -> list:
    ranged = [*RANGES.items(), ("lang_alt_prob", (0.0, 1.0)),
              ("clip_translations_min", (-1.0, 1.0)), ("clip_translations_max", (-1.0, 1.0))]
    return [
        *table_shape(COLUMNS, inputs.expected_rows),
        *sample_keys(),
        *status_values(["ok", "skipped", "error"]),
        *provenance(),
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=low, max_value=high) for c, (low, high) in ranged],
        *[gxe.ExpectColumnValuesToMatchRegex(column=c, regex=LANG_REGEX)
          for c in ("lang_alt", "lang_short", "lang_dense")],
        *drift(inputs),
    ]

