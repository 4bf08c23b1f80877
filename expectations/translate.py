"""Suite `translated`: the translation table, long format (one row per key, source field and target language:
key, field, lang, source_text, text, status ok|flagged|error, qe_passed, qe_reasons, qe_lang, qe_length_ratio,
qe_chrf_roundtrip, provenance).

The language match (detected `qe_lang` equal to the target `lang`) is a rate: a few misdetections on short
captions are normal, so it only fails below `translation_lang_match_mostly`, and then the mismatching rows are
the bad ones. Only translations that passed QE count (a flagged one already carries its language reason and is
left out of the release); a translation too short for language ID (`qe_lang` null) is not counted either way. A
detection of a close relative of the target (Galician for Portuguese) counts as a match, as it does in QE."""

from __future__ import annotations

import great_expectations.expectations as gxe
import pandas as pd

from expectations.common import LANG_REGEX, SuiteInputs, provenance, sample_keys, table_shape, text_column, where
from infra.languages import same_language

SUITE = "translate"
ROW_ID = ("key", "field", "lang")
COLUMNS = ["key", "field", "lang", "source_text", "text", "status", "qe_passed", "qe_reasons", "qe_lang",
           "qe_length_ratio", "qe_chrf_roundtrip", "provenance"]
FIELDS = ["caption_short", "caption_dense", "alt_text"]
TRANSLATED = 'status != "error"'


def prepare(frame: pd.DataFrame) -> pd.DataFrame:
    """`qe_lang` as QE judged it: a close relative of the target (py3langid's pt/gl, cs/sk ...) reads as the target,
    so the language-match rate does not count what QE rightly accepted."""
    if "qe_lang" not in frame or "lang" not in frame:
        return frame
    accepted = [lang if isinstance(qe, str) and same_language(qe, lang) else qe
                for qe, lang in zip(frame["qe_lang"], frame["lang"], strict=True)]
    return frame.assign(qe_lang=accepted)


def expectations(inputs: SuiteInputs) -> list:
    longest = max(inputs.cfg.caption_max_chars, inputs.cfg.alt_text_max_chars)
    return [
        *table_shape(COLUMNS, None),  # rows depend on languages and on which source fields are empty
        *sample_keys(unique=False),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=list(ROW_ID)),
        gxe.ExpectColumnValuesToBeInSet(column="field", value_set=FIELDS),
        gxe.ExpectColumnValuesToNotBeNull(column="lang"),
        gxe.ExpectColumnValuesToMatchRegex(column="lang", regex=LANG_REGEX),
        gxe.ExpectColumnValuesToNotBeNull(column="status"),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["ok", "flagged", "error"]),
        gxe.ExpectColumnValuesToNotBeNull(column="source_text"),
        *text_column("source_text", 1, longest),
        gxe.ExpectColumnValuesToNotBeNull(column="text", **where(TRANSLATED)),
        *text_column("text", 1, 2 * longest),  # translations run longer than their source (en -> de)
        gxe.ExpectColumnValuesToBeBetween(column="qe_length_ratio", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="qe_chrf_roundtrip", min_value=0, max_value=100),
        # Only where a language was detected (null: too short to tell); a null never equals itself.
        gxe.ExpectColumnPairValuesToBeEqual(column_A="qe_lang", column_B="lang",
                                            mostly=inputs.cfg.translation_lang_match_mostly,
                                            **where('status == "ok" and qe_lang == qe_lang')),
        *provenance(None),
    ]
