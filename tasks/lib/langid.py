"""Language ID for the stages: py3langid, loaded once per process and mode.

`detect` is the guards' and translation QE's check (top language of the normalised text; callers skip text under
`LANGID_MIN_WORDS` words); `detect_with_prob` is the scores' (top language of the whitespace-collapsed text with its
normalised probability). They use two identifiers because py3langid's normalised mode can rank differently (it sums
script aliases such as srl -> sr where the raw mode takes their maximum). py3langid comes with the `llm` extra;
without it a detection raises `ModelUnavailable` (role langid).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from infra.models import ModelUnavailable
from tasks.lib.text import normalize_text

LANGID_MIN_WORDS = 4  # language ID is unreliable on shorter text (e.g. "Hotel Paris" or "A cat." can be anything)


@cache
def available() -> bool:
    """Whether py3langid is installed."""
    try:
        import py3langid  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _identifier(norm_probs: bool) -> Any:
    try:
        from py3langid.langid import _load_identifier
    except ImportError as exc:
        raise ModelUnavailable("langid", "py3langid", "install the llm extra: pip install 'capfactory[llm]' "
                               "(py3langid==0.4.0)") from exc
    return _load_identifier(norm_probs=norm_probs)


def detect(text: str | None) -> str | None:
    """py3langid's top language code for `text` (None for empty text)."""
    text = normalize_text(text).strip()
    if not text:
        return None
    return _identifier(False).classify(text)[0]


def detect_with_prob(text: str | None) -> tuple[str | None, float | None]:
    """(ISO 639-1 code, normalised probability) of the text by py3langid; (None, None) for empty text."""
    text = " ".join((text or "").split())
    if not text:
        return None, None
    lang, prob = _identifier(True).classify(text)
    return lang, float(prob)
