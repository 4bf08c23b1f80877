"""Suite `extract`: the vision experts' table (tasks/experts experts_schema), one row per raw sample; each expert
plug-in adds the expectations on its own columns."""

from __future__ import annotations

import tasks.experts as registry
from expectations.common import SuiteInputs, provenance, sample_keys, status_values, table_shape

SUITE = "extract"
ROW_ID = ("key",)


def expectations(inputs: SuiteInputs) -> list:
    return [
        *table_shape(registry.experts_schema().names, inputs.expected_rows),
        *sample_keys(),
        *status_values(["ok", "error", "skipped"]),
        *provenance(),
        *(e for expert in registry.EXPERTS for e in expert.expectations(inputs)),
    ]
