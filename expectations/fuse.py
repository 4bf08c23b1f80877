"""Suite `fused`: the LLM fusion table (tasks/fuse.py FUSED_SCHEMA), one row per raw sample.

A caption slot that fails a row-level check while its fused caption is in place (its guard verdict true) falls
back to the alt-text on its own and the sample keeps its other captions (`CAPTION_SLOTS`, applied by
tasks/validate.py and tasks/publish.py); a failing row whose caption already is the alt-text is quarantined.

Leakage is checked twice. Captions the guards accepted (`short_passed` / `dense_passed`) must match none of
`tasks.guards.LEAKAGE_PATTERNS` (the stage's own list: validation re-checks that the stage honoured it). Every
caption, the alt-text fallbacks included, must match none of `always_leaking()`: the prompt templates' sentences
(tasks/prompts/*.yaml), chat-template tokens, role markers and "as an AI", which no human alt-text contains.
"""

from __future__ import annotations

import re
from functools import cache

import great_expectations.expectations as gxe

from expectations.common import SuiteInputs, provenance, sample_keys, status_values, table_shape, text_column, where
from tasks.fuse import FUSED_SCHEMA, PROMPTS
from tasks.guards import LEAKAGE_PATTERNS

SUITE = "fuse"
ROW_ID = ("key",)
# Caption column -> (its guard verdict, its guard reasons): the slots that fall back to the alt-text on their own.
CAPTION_SLOTS = {"caption_short": ("short_passed", "short_reasons"),
                 "caption_dense": ("dense_passed", "dense_reasons")}
MIN_PHRASE_WORDS = 4  # template sentences shorter than this are too generic to call leakage
WINDOW_WORDS = 6  # longer sentences leak in parts: any 6 consecutive words of one count
_MARKERS = (
    r"\bas an ai\b",
    r"<\|[^|>]{1,40}\|>",  # <|im_start|>, <|eot_id|>
    r"\[\s*/?\s*inst\s*\]",
    r"<<\s*/?\s*sys\s*>>",
    r"<\s*/?\s*data\s*>",
    r"(?:^|\n)\s*(?:assistant|user|system)\s*:",
    r"\{\s*(?:alt_text|ocr_text|objects|synthetic|candidates)\s*\}",
)


@cache
def template_text() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sentences, field labels) of every prompt template: the system message and instructions, and the data
    block's labels ("text visible in the image", ...)."""
    from tasks.fuse import FACT_LABELS, prompt_texts

    sentences: set[str] = set()
    labels = set(FACT_LABELS.values()) | {"caption 1", "caption 2", "sentence 1", "sentence 2", "new sentence"}
    for path in sorted(PROMPTS.glob("*.yaml")):
        for text in prompt_texts(path.stem):
            text = re.sub(r"\{[a-z_]+\}", " ", text)
            sentences |= {s for s in re.split(r"(?<=[.!?:])\s+", " ".join(text.split()))
                          if len(s.split()) >= MIN_PHRASE_WORDS}
    return tuple(sorted(sentences)), tuple(sorted(labels))


def template_regexes() -> list[str]:
    """A label followed by its colon, or any WINDOW_WORDS consecutive words of a template sentence."""
    sentences, labels = template_text()
    windows = set()
    for sentence in sentences:
        words = re.findall(r"[\w'-]+", sentence)
        n = min(WINDOW_WORDS, len(words))
        windows |= {r"\W+".join(re.escape(w) for w in words[i:i + n]) for i in range(len(words) - n + 1)}
    label_rx = "|".join(r"\s+".join(re.escape(w) for w in label.split()) for label in labels)
    return [r"\b(?:" + "|".join(sorted(windows)) + r")\b", rf"\b(?:{label_rx})\s*:"]


def always_leaking() -> list[str]:
    """Case-insensitive regexes no caption (fused or fallback) may match."""
    return [f"(?i){p}" for p in (*_MARKERS, *template_regexes())]


def expectations(inputs: SuiteInputs) -> list:
    cfg = inputs.cfg
    guard_list = [f"(?i){p}" for _, p in LEAKAGE_PATTERNS]
    out = [
        *table_shape(FUSED_SCHEMA.names, inputs.expected_rows),
        *sample_keys(),
        *status_values(["ok", "skipped", "error"]),
        *provenance(),
    ]
    for caption, (passed, _) in CAPTION_SLOTS.items():
        accepted = f'status == "ok" and {passed} == True'
        out += [
            *text_column(caption, cfg.caption_min_chars, cfg.caption_max_chars),
            gxe.ExpectColumnValuesToNotBeNull(column=caption, **where(accepted)),
            gxe.ExpectColumnValuesToNotMatchRegexList(column=caption, regex_list=guard_list, **where(accepted)),
            gxe.ExpectColumnValuesToNotMatchRegexList(column=caption, regex_list=always_leaking()),
        ]
    return out
