"""Text utilities of the stages: Unicode normalisation of untrusted text, words, sentences, looping n-grams and
English plurals."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter


def normalize_text(text: str | None) -> str:
    """NFKC, invisible format characters (Cf: zero-width, bidi controls, BOM) and lone surrogates removed,
    typographic apostrophes folded to "'"."""
    if not text:
        return ""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "replace")
    elif not isinstance(text, str):
        text = str(text)
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (surrogateescape input) -> "?"
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")


def words(text: str) -> list[str]:
    """Whitespace tokens with a letter or digit."""
    return [w for w in text.split() if any(ch.isalnum() for ch in w)]


def sentences(text: str) -> list[str]:
    """Non-blank pieces of `text` split after . ! ? followed by whitespace, and at line breaks."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def find_repetition(text: str, n: int = 3, times: int = 3) -> str | None:
    """A word n-gram occurring `times` times or more (a looping decoder), else None."""
    words = [w for w in re.findall(r"[^\W_]+", normalize_text(text).lower())]
    grams = Counter(tuple(words[k:k + n]) for k in range(len(words) - n + 1))
    top = grams.most_common(1)
    if top and top[0][1] >= times:
        return f"{' '.join(top[0][0])!r} x{top[0][1]}"
    return None


_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice", "goose": "geese",
    "ox": "oxen", "foot": "feet", "tooth": "teeth", "sheep": "sheep", "deer": "deer", "fish": "fish",
    "cattle": "cattle", "people": "people", "scissors": "scissors", "skis": "skis", "shears": "shears",
    "luggage": "luggage", "baggage": "baggage", "broccoli": "broccoli", "bison": "bison", "buffalo": "buffaloes",
    "audience": "audiences", "human": "humans", "german": "germans", "leaf": "leaves", "loaf": "loaves",
    "knife": "knives", "wife": "wives", "life": "lives", "bus": "buses", "tomato": "tomatoes", "potato": "potatoes",
    "hero": "heroes", "someone": "someone", "somebody": "somebody", "crowd": "crowds",
}  # fmt: skip


def pluralize(word: str) -> str:
    """English plural of a noun (of the last word of a phrase) by simple rules plus irregular forms."""
    head, _, last = word.rpartition(" ")
    prefix = f"{head} " if head else ""
    low = last.lower()
    if low in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[low]
    elif low.endswith("man") and low not in ("human", "german", "roman", "shaman"):
        plural = low[:-3] + "men"  # fireman, policewoman, businessman
    elif low.endswith("child"):
        plural = low + "ren"
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        plural = low + "es"
    elif low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        plural = low[:-1] + "ies"
    elif low.endswith("lf"):
        plural = low[:-1] + "ves"  # shelf, calf, wolf, half
    elif low.endswith("ife"):
        plural = low[:-2] + "ves"
    else:
        plural = low + "s"
    return prefix + plural
