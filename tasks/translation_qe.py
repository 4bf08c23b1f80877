"""Segmentation and quality estimation of machine translations (used by the translate stage, tasks/translate.py).

Quality estimation (`check_translation`), every reason a 'kind: detail' string; any reason -> status "flagged"
(the text is kept in translate/; publish drops it when `translate.drop_failed`):
- language: py3langid on the output must give the target (close pairs such as cs/sk, ms/id, no/nb/nn, hr/sr/bs
  count as equal); skipped under 4 words, where character n-gram language ID is unreliable.
- copy / untranslated: the output is the source again, or >= 80% of its words are source words.
- length_ratio: output/source characters outside [min_length_ratio, max_length_ratio] (from 3 source words up).
- truncated: the output leaves a bracket or quote open that the source closes; or it does not end a sentence and
  either ends with a word that cannot end one (an article, a preposition, a conjunction of the target language) or
  is shorter than `TRUNCATED_LENGTH` of a translation's typical length. A missing final stop alone is not
  truncation: human translators often leave it out.
- numbers / urls / placeholders: each digit group, URL and {placeholder} / %s / <tag> of the source is in the output;
  a number may be spelled out in the target language (tasks.lib.numerals: "3" -> "drei", "trois", "tři").
- roundtrip_chrf (optional): the output translated back, chrF (sacrebleu) against the source below `min_chrf`.
- source_injection: the source carries instruction-like text (tasks.guards.find_injection); it was translated as
  text, but such a caption is not training data.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from infra.languages import same_language
from tasks.guards import find_injection
from tasks.lib import langid
from tasks.lib.numerals import spelled
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
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")  # 1,000 and 1.000 are one number
_SPACE_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?!\d)")  # 1 000 (fr, cs; NFKC made the space plain)
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{\{?[A-Za-z0-9_.]*\}?\}|%[sd]|<[A-Za-z/][^<>]{0,40}>")
_SENTENCE_END = tuple(".!?…。！？")
# Characters of a translation per character of its English source, median on Multi30K test 2016 (de, fr, cs: the
# human references; pt: Bergamot's output); 1.0 for languages not measured.
TYPICAL_LENGTH = {"de": 1.12, "fr": 1.15, "cs": 0.88, "pt": 1.13}
# An output that does not end a sentence and is shorter than this share of its typical length is cut off (from 3
# source words up). On Multi30K en->de/fr/cs, complete references measure >= 0.75 of theirs 95% of the time (1st
# percentile 0.66-0.71), references cut after half of their words 0.45 (median), < 0.62 95% of the time.
TRUNCATED_LENGTH = 0.7
# Words a sentence does not end with: articles, prepositions, conjunctions, possessives. Words that also end
# sentences are left out (English particles such as "in", "on", "by"; German separable prefixes such as "an",
# "auf", "mit", "zu", "ein" and the pronouns "sein", "ihr"; Czech "se", "si").
_DANGLING = {lang: frozenset(words.split()) for lang, words in {
    "en": "a an the and or but of with at to for from into onto while its their whose",
    "de": "der die das den dem des eine einer einem einen eines und oder aber sowie in im am zum zur beim vom für "
          "von neben während seine seinem seinen seiner ihre ihrem ihren ihrer dessen deren dass weil",
    "fr": "le la les l un une des du de d et ou avec dans sur à au aux pour par qui que qu son sa ses leurs ce cette "
          "ces se s ne n",
    "cs": "a i nebo ani ale s v ve na do z ze k ke o u za pro od po při před mezi který která které",
    "pt": "o a os as um uma uns umas e ou de do da dos das em no na nos nas com para por pelo pela ao à que",
    "es": "el la los las un una unos unas y o de del en con para por al su sus que",
}.items()}
_DOUBLE_QUOTES = '"“”„«»'


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


def _unclosed(text: str) -> bool:
    """A bracket opened and not closed, or an odd number of double quotes (of any style)."""
    return (any(text.count(o) > text.count(c) for o, c in ("()", "[]", "{}"))
            or sum(text.count(q) for q in _DOUBLE_QUOTES) % 2 == 1)


def truncation(source: str, text: str, target: str, ratio: float) -> str | None:
    """Why `text` looks cut off (see the module docstring), or None."""
    if _unclosed(text) and not _unclosed(source):
        return "truncated: a bracket or quote is left open"
    if _ends_sentence(text):
        return None
    words = _words(text)
    if words and words[-1] in _DANGLING.get(target, ()):
        return f"truncated: ends with {words[-1]!r}"
    relative = ratio / TYPICAL_LENGTH.get(target, 1.0)
    if relative < TRUNCATED_LENGTH and len(_words(source)) >= 3:
        return f"truncated: no final stop, {relative:.2f} of the typical length"
    return None


def _digits(number: str) -> str:
    return "".join(str(unicodedata.digit(c)) for c in number if c.isdigit())


def missing_numbers(source: str, text: str, target: str) -> list[str]:
    """The source's numbers that the output has neither as digits nor spelled out in `target`."""
    wanted = {_digits(m) for m in _NUMBER.findall(source)}
    if not wanted:
        return []
    got = {_digits(m) for m in _NUMBER.findall(text) + _SPACE_GROUPED.findall(text)}
    words = f" {' '.join(_words(text))} "
    return sorted(n for n in wanted - got if not any(f" {form} " in words for form in spelled(int(n), target)))


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
    cut_off = truncation(source, text, target, ratio)
    if cut_off:
        reasons.append(cut_off)
    numbers = missing_numbers(source, text, target)
    if numbers:
        reasons.append("numbers: missing " + ", ".join(repr(m) for m in numbers[:5]))
    for kind, pattern, norm in (("urls", _URL, lambda s: s.rstrip(".,;:!?)").lower()),
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
