"""Suite `experts`: the vision experts' table (tasks/extract.py EXPERTS_SCHEMA), one row per raw sample."""

from __future__ import annotations

from expectations.common import SuiteInputs, provenance, sample_keys, status_values, table_shape, text_column
from tasks.extract import EXPERTS_SCHEMA

SUITE = "experts"
ROW_ID = ("key",)


def expectations(inputs: SuiteInputs) -> list:
    cfg = inputs.cfg
    return [
        *table_shape(EXPERTS_SCHEMA.names, inputs.expected_rows),
        *sample_keys(),
        *status_values(["ok", "error", "skipped"]),
        *provenance(),
        *text_column("caption_synthetic", cfg.caption_min_chars, cfg.caption_max_chars),
    ]
