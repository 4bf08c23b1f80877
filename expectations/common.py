"""Building blocks shared by the suites: what a suite gets to know about its shard, and expectations every stage
output carries (schema, row count, key format and uniqueness, status values)."""

from __future__ import annotations

from dataclasses import dataclass

import great_expectations.expectations as gxe
import pandas as pd

from infra.settings import DatasetSpec, ValidateConfig

KEY_REGEX = r"^[0-9a-f]{24}$"  # tasks.urls.KEY_HEX hex digits of a sha256
SHA256_REGEX = r"^[0-9a-f]{64}$"
PHASH_REGEX = r"^[0-9a-f]{16}$"
LANG_REGEX = r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]+)*$"  # ISO 639-1/3 code, optional script/region: pt, zh-Hans, pt_BR
NON_BLANK_REGEX = r"\S"


@dataclass(frozen=True)
class SuiteInputs:
    """What a suite is built from: the table (some checks depend on what it holds), the spec, the rows the stage
    must have (from raw), and the score reference for the drift checks."""

    frame: pd.DataFrame
    spec: DatasetSpec
    expected_rows: int | None = None
    reference: dict | None = None

    @property
    def cfg(self) -> ValidateConfig:
        return self.spec.validation


def where(condition: str) -> dict:
    """A pandas row condition (`status == "ok"`) for an expectation's keyword arguments."""
    return {"row_condition": condition, "condition_parser": "pandas"}


def table_shape(columns: list[str], expected_rows: int | None) -> list:
    """Every contract column is present (extra columns allowed: raw keeps the input's own columns); one row per
    raw sample where the stage promises that."""
    out = [gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=False)]
    if expected_rows is not None:
        out.append(gxe.ExpectTableRowCountToEqual(value=expected_rows))
    return out


def sample_keys(unique: bool = True) -> list:
    out = [gxe.ExpectColumnValuesToNotBeNull(column="key"),
           gxe.ExpectColumnValuesToMatchRegex(column="key", regex=KEY_REGEX)]
    if unique:
        out.append(gxe.ExpectColumnValuesToBeUnique(column="key"))
    return out


def status_values(values: list[str]) -> list:
    """Status is one of `values`; an error row says why."""
    return [gxe.ExpectColumnValuesToNotBeNull(column="status"),
            gxe.ExpectColumnValuesToBeInSet(column="status", value_set=values),
            gxe.ExpectColumnValuesToNotBeNull(column="error", **where('status == "error"'))]


def provenance(condition: str | None = 'status == "ok"') -> list:
    """Provenance on the rows of `condition` (None: on every row)."""
    return [gxe.ExpectColumnValuesToNotBeNull(column="provenance", **(where(condition) if condition else {}))]


def text_column(column: str, min_chars: int, max_chars: int) -> list:
    """A text that, where present, is not blank and has a bounded length (nulls are left to other checks)."""
    return [gxe.ExpectColumnValuesToMatchRegex(column=column, regex=NON_BLANK_REGEX),
            gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=min_chars, max_value=max_chars)]
