"""Segmentation and quality estimation of machine translations (used by the translate stage, tasks/translate.py).

Quality estimation (`check_translation`), every reason a 'kind: detail' string; any reason -> status "flagged"
(the text is kept in translate/; publish drops it when `translate.drop_failed`):
- language: py3langid on the output must give the target (close pairs such as cs/sk, ms/id, no/nb/nn, hr/sr/bs
  count as equal); skipped under 4 words, where character n-gram language ID is unreliable.
- copy / untranslated: the output is the source again, or >= 80% of its words are source words.
- length_ratio: output/source characters outside [min_length_ratio, max_length_ratio] (from 3 source words up).
- truncated: the source ends a sentence and the output does not.
- numbers / urls / placeholders: each digit group, URL and {placeholder} / %s / <tag> of the source is in the output.
- roundtrip_chrf (optional): the output translated back, chrF (sacrebleu) against the source below `min_chrf`.
- source_injection: the source carries instruction-like text (tasks.guards.find_injection); it was translated as
  text, but such a caption is not training data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from infra.languages import same_language
from tasks.guards import find_injection
from tasks.lib import langid
from tasks.lib.text import normalize_text

MAX_SOURCE_CHARS = 2000  # longer sources are cut (and flagged): captions, not documents
MAX_SEGMENT_CHARS = 400  # a sentence longer than this is split at spaces (translators degrade on long inputs)

# ---- segmentation ---------------------------------------------------------------------------------------------

_ABBREVIATIONS = ("mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "e.g.", "i.e.", "etc.", "no.", "jr.", "sr.", "approx.")
_BOUNDARY = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences in order (after . ! ? … followed by space, not after common abbreviations); pieces longer than
    MAX_SEGMENT_CHARS are cut at spaces. `" ".join(split_sentences(t)) == " ".join(t.split())`."""
    text = " ".join(text.split())
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        piece = text[start:m.start()].strip() + text[m.start():m.end()].strip()
        if piece.lower().split()[-1] in _ABBREVIATIONS:
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return [chunk for sentence in out for chunk in cut(sentence)]


def cut(sentence: str) -> list[str]:
    chunks, current = [], ""
    for word in sentence.split(" "):
        if current and len(current) + 1 + len(word) > MAX_SEGMENT_CHARS:
            chunks.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*chunks, current] if current else chunks


def prepare_source(text: str | None) -> tuple[str, bool]:
    """What is sent to the translator: NFKC, no invisible or replacement characters, one line, at most
    MAX_SOURCE_CHARS (cut at a space). Returns (text, was cut); empty text means nothing to translate."""
    clean = " ".join(normalize_text(text).replace("\ufffd", " ").split())
    if len(clean) <= MAX_SOURCE_CHARS:
        return clean, False
    return clean[:MAX_SOURCE_CHARS].rsplit(" ", 1)[0], True


# ---- quality estimation -----------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{\{?[A-Za-z0-9_.]*\}?\}|%[sd]|<[A-Za-z/][^<>]{0,40}>")
_SENTENCE_END = tuple(".!?…。！？")


@dataclass
class QEResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    lang: str | None = None
    length_ratio: float | None = None
    chrf: float | None = None


def chrf(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(hypothesis, [reference]).score)


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def _ends_sentence(text: str) -> bool:
    return text.rstrip("\"'”’»)] ").endswith(_SENTENCE_END)


def check_translation(source: str, text: str | None, target: str, *, source_language: str = "en",
                      min_ratio: float = 0.45, max_ratio: float = 2.2, chrf_roundtrip: float | None = None,
                      min_chrf: float = 0.0) -> QEResult:
    """QE of one translation of `source` into `target` (see the module docstring for the checks);
    `chrf_roundtrip` is chrF of the back translation against the source, when the round trip ran."""
    text = normalize_text(text).strip()
    if not text:
        return QEResult(False, ["empty"])
    reasons: list[str] = []
    src_words, out_words = _words(source), _words(text)
    detected = langid.detect(text) if len(out_words) >= langid.LANGID_MIN_WORDS else None
    if detected is not None and not same_language(detected, target):
        reasons.append(f"language: {detected} != {target}")
    if target != source_language and len(src_words) >= 3 and out_words == src_words:
        reasons.append("copy: the output is the source")
    elif target != source_language and len(out_words) >= 4:
        shared = sum(1 for w in out_words if w in set(src_words) and not w.isdigit()) / len(out_words)
        if shared >= 0.8:
            reasons.append(f"untranslated: {shared:.0%} of the words are source words")
    ratio = len(text) / max(1, len(source.strip()))
    if len(src_words) >= 3 and not min_ratio <= ratio <= max_ratio:
        reasons.append(f"length_ratio: {ratio:.2f} outside [{min_ratio}, {max_ratio}]")
    if _ends_sentence(source) and not _ends_sentence(text):
        reasons.append("truncated: the source ends a sentence, the output does not")
    for kind, pattern, norm in (("numbers", _NUMBER, lambda s: re.sub(r"[.,]", "", s)),
                                ("urls", _URL, lambda s: s.rstrip(".,;:!?)").lower()),
                                ("placeholders", _PLACEHOLDER, str)):
        wanted = {norm(m) for m in pattern.findall(source)}
        if wanted:
            got = {norm(m) for m in pattern.findall(text)}
            missing = sorted(wanted - got)
            if missing:
                reasons.append(f"{kind}: missing " + ", ".join(repr(m) for m in missing[:5]))
    if chrf_roundtrip is not None and chrf_roundtrip < min_chrf:
        reasons.append(f"roundtrip_chrf: {chrf_roundtrip:.1f} < {min_chrf}")
    injected = find_injection(source)
    if injected:
        reasons.append(f"source_injection: {injected!r}")
    return QEResult(not reasons, reasons, detected, ratio, chrf_roundtrip)
