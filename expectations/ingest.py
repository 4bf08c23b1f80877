"""Suite `raw`: the ingest table (tasks/shards.py INGEST_SCHEMA), one row per planned sample."""

from __future__ import annotations

import great_expectations.expectations as gxe

from expectations.common import (
    KEY_REGEX,
    PHASH_REGEX,
    SHA256_REGEX,
    SuiteInputs,
    sample_keys,
    status_values,
    table_shape,
    text_column,
    where,
)
from tasks.shards import INGEST_SCHEMA

SUITE = "ingest"
ROW_ID = ("key",)
URL_REGEX = r"^(?:https?|file)://\S"
OK = 'status == "ok"'


def expectations(inputs: SuiteInputs) -> list:
    """Row count = the shard's input manifest; unique keys; URLs, hashes and sizes well formed on good images."""
    ingest = inputs.spec.ingest
    return [
        *table_shape(INGEST_SCHEMA.names, inputs.expected_rows),
        *sample_keys(),
        *status_values(["ok", "error", "opted_out", "filtered"]),
        gxe.ExpectColumnValuesToNotBeNull(column="url"),
        gxe.ExpectColumnValuesToMatchRegex(column="url", regex=URL_REGEX),
        *text_column("alt_text", 1, inputs.cfg.alt_text_max_chars),
        gxe.ExpectColumnValuesToNotBeNull(column="sha256", **where(OK)),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_REGEX),
        gxe.ExpectColumnValuesToNotBeNull(column="phash", **where(OK)),
        gxe.ExpectColumnValuesToMatchRegex(column="phash", regex=PHASH_REGEX),
        gxe.ExpectColumnValuesToNotBeNull(column="mime", **where(OK)),
        gxe.ExpectColumnValuesToBeBetween(column="bytes", min_value=1, max_value=ingest.download.max_bytes),
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=1, **where(OK)) for c in ("width", "height")],
        *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=max(1, ingest.images.min_image_size), **where(OK))
          for c in ("original_width", "original_height")],
        gxe.ExpectColumnValuesToBeBetween(column="http_status", min_value=100, max_value=599),
        gxe.ExpectColumnValuesToMatchRegex(column="duplicate_of", regex=KEY_REGEX),
        gxe.ExpectColumnValuesToBeBetween(column="attempts", min_value=0),
    ]
