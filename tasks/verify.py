"""Claim verification of fused captions: every concrete claim must come from a source, per caption.

A fused caption is kept only if `verify_claims` finds nothing; otherwise its slot falls back to the alt-text and
the reasons are kept. The checks are deterministic and cheap (word lists, an English lemma lexicon, no model):

- **echo**: a run of words from the prompt templates or their few-shot examples (`template_runs`), layout tokens
  ("middle-right", "at bottom-left"), the data block's own format ("2 x person", "objects:", "(none)").
- **unsupported noun**: the head noun of each noun phrase (found with lemminflect's lexicon: a word that can only
  be a noun, or a noun-or-verb word after a determiner) must be named by a source: the same lemma, the same COCO
  concept (or a related one, see tasks/grounding.py), a near-synonym (`NEAR_SYNONYMS`) or, for a category word
  ("animal", "food", "vehicle"), one of its members. Words that name no thing ("side", "background", "group")
  are exempt (`GENERIC_NOUNS`). Capitalised words inside a sentence (names) must appear in a source.
- **count**: a number before a noun ("three dogs") must equal that concept's detection count or be stated in a
  source; any other number must appear in a source.
- **colour**: every colour word must appear in a source or in the detections' colour attributes.
- **text**: quoted text must match the OCR text or the alt-text.
- **person attribute**: race / ethnicity, age, gender, religion and health claims must be stated by a source
  (the same value: "a woman" in the caption needs a female word in a source; "a person" claims nothing).
- **tautology / self-reference**: "the man is a man", "supported by the fact that", "this caption".
- **fluency**: complete sentences (final punctuation, no dangling function word, no fragment), balanced quotes
  and brackets, no sentence said twice.

`omissions` adds one more reason for fused captions, **omission**: every object the alt-text names (a COCO concept,
or a related one) must still be in the caption, so a fused caption is never poorer than the alt-text it replaces.

Sources are the alt-text, the OCR text, the synthetic caption, and the detected objects (labels, counts, colours).
Each reason is "kind: detail"; kinds: echo, unsupported_noun, count, colour, text, person_attribute, tautology,
self_reference, fluency.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

from tasks.grounding import CONCEPTS, RELATED, canonical_labels, mentioned_concepts, named_concepts
from tasks.lib.text import normalize_text

ECHO_RUN = 4  # words in a row shared with a template (at least two of them content words) make an echo

# ---- word lists ----------------------------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words("""a an the this these those some several many few his her their its our my your
another each every no any both either one two three four five six seven eight nine ten""")
FUNCTION_WORDS = _words("""a an the and or but nor of on in at to with without by for from into onto over under
above below near next beside behind between among through across along around against about as than that which who
whom whose while is are was were be been being has have had do does did it its this these those there here he she
they we you i his her their our my your them him us me not so very also too just himself herself itself
can could may might will would shall should must
themselves oneself""")
# Nouns that name no thing a source must state: parts of the frame, quantities, generic containers of a scene.
GENERIC_NOUNS = _words("""image picture photo photograph photography scene view shot close closeup background
foreground side sides front back top bottom middle center centre left right corner corners edge edges area areas
part parts group groups couple pair pairs number numbers lot lots bunch variety kind kinds type types set sets row
rows line lines time times day way ways thing things something someone one ones other others rest display place
places spot setting surface distance piece pieces half halves bit bits end ends sort amount plenty array assortment
collection selection series item items object objects stuff content contents arrangement goods color colors colour
colours outside inside shape shapes process activity moment""")
# Category words: supported when a member concept is.
CATEGORIES: dict[str, frozenset[str]] = {
    "animal": frozenset({"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}),
    "pet": frozenset({"cat", "dog"}),
    "livestock": frozenset({"sheep", "cow", "horse"}),
    "vehicle": frozenset({"bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"}),
    "traffic": frozenset({"car", "bus", "truck", "motorcycle", "bicycle", "traffic light"}),
    "food": frozenset({"banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
                       "cake"}),
    "meal": frozenset({"sandwich", "hot dog", "pizza", "broccoli", "carrot", "cake"}),
    "dish": frozenset({"bowl", "cup", "sandwich", "pizza", "broccoli", "cake"}),
    "fruit": frozenset({"banana", "apple", "orange"}),
    "vegetable": frozenset({"broccoli", "carrot"}),
    "dessert": frozenset({"cake", "donut"}),
    "furniture": frozenset({"chair", "couch", "bed", "dining table", "bench"}),
    "utensil": frozenset({"fork", "knife", "spoon"}),
    "silverware": frozenset({"fork", "knife", "spoon"}),
    "cutlery": frozenset({"fork", "knife", "spoon"}),
    "drink": frozenset({"cup", "bottle", "wine glass"}),
    "beverage": frozenset({"cup", "bottle", "wine glass"}),
    "device": frozenset({"tv", "laptop", "cell phone", "remote", "keyboard", "mouse", "microwave", "toaster"}),
    "electronics": frozenset({"tv", "laptop", "cell phone", "remote", "keyboard", "mouse"}),
    "appliance": frozenset({"microwave", "oven", "toaster", "refrigerator", "sink"}),
    "screen": frozenset({"tv", "laptop", "cell phone"}),
    "equipment": frozenset({"skis", "snowboard", "sports ball", "baseball bat", "baseball glove", "skateboard",
                            "surfboard", "tennis racket", "kite", "frisbee"}),
    "luggage": frozenset({"suitcase", "backpack", "handbag"}),
    "bag": frozenset({"suitcase", "backpack", "handbag"}),
    "toy": frozenset({"teddy bear", "kite", "frisbee", "sports ball"}),
    "kitchen": frozenset({"oven", "microwave", "refrigerator", "sink", "toaster"}),
    "bathroom": frozenset({"toilet", "sink"}),
    "bedroom": frozenset({"bed"}),
}
# Near-synonyms: one supports the other (what two people call the same thing in a photo).
NEAR_SYNONYMS: tuple[frozenset[str], ...] = tuple(_words(g) for g in (
    "water ocean sea wave surf lake", "beach shore sand coast", "grass field lawn meadow pasture grassland",
    "street road roadway", "sidewalk pavement walkway", "plate dish platter", "snow slope", "hill mountain",
    "sky air", "shirt top", "photo picture image", "room interior", "home house", "city town", "store shop",
    "restaurant cafe", "kid child", "track rail railway", "tree forest wood", "rock stone", "road highway",
    "counter countertop", "bread bun", "court field", "stadium field", "pole post", "sign signboard",
    "building structure",
))
# Scene nouns a detected object implies (a surfboard is in or by water, skis on snow): stated context, not invented.
CONTEXT: dict[str, frozenset[str]] = {k: _words(v) for k, v in {
    "surfboard": "water ocean sea wave waves surf beach shore", "boat": "water river lake harbor harbour sea dock",
    "skis": "snow slope mountain hill", "snowboard": "snow slope mountain hill",
    "kite": "sky air field beach park", "frisbee": "park field grass yard lawn",
    "airplane": "sky runway airport tarmac", "train": "track tracks rail railway station platform",
    "car": "street road", "bus": "street road", "truck": "street road", "traffic light": "street road intersection",
    "stop sign": "street road intersection", "fire hydrant": "street sidewalk", "parking meter": "street sidewalk",
    "motorcycle": "street road", "bicycle": "street road path",
    "cow": "field grass pasture farm", "sheep": "field grass pasture farm hill", "horse": "field grass farm",
    "elephant": "field grass tree trees zoo", "giraffe": "field grass tree trees zoo",
    "zebra": "field grass tree trees zoo", "bear": "grass rock rocks zoo",
    "tennis racket": "court tennis game", "baseball bat": "field game baseball",
    "baseball glove": "field game baseball",
    "sports ball": "field game", "dining table": "plate plates food meal restaurant",
    "pizza": "plate food slice slices crust", "sandwich": "plate food bread", "hot dog": "bun food",
    "donut": "food pastry pastries", "cake": "plate food dessert", "broccoli": "plate food vegetable",
    "oven": "kitchen", "microwave": "kitchen", "refrigerator": "kitchen", "sink": "kitchen bathroom",
    "toaster": "kitchen", "toilet": "bathroom", "bed": "bedroom room", "couch": "room", "tv": "room screen",
    "laptop": "desk screen computer", "keyboard": "desk computer", "mouse": "desk computer",
    "bench": "park", "umbrella": "rain beach", "clock": "tower", "potted plant": "plant plants pot",
}.items()}
# What a caption may call text the OCR read.
OCR_CONTEXT = _words("text word words writing lettering letter letters sign label caption")
_COLOUR_WORDS = {"red": "red", "orange": "orange", "yellow": "yellow", "green": "green", "blue": "blue",
                 "purple": "purple", "violet": "purple", "pink": "pink", "brown": "brown", "black": "black",
                 "white": "white", "gray": "gray", "grey": "gray", "silver": "silver", "gold": "gold",
                 "golden": "gold", "tan": "tan", "beige": "tan", "maroon": "red", "navy": "blue",
                 "turquoise": "blue", "teal": "green"}
_NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
                 "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "twenty": 20,
                 "dozen": 12}
_PERSON_NOUNS = _words("""man men woman women person people boy boys girl girls guy guys lady ladies child
children kid kids baby babies gentleman gentlemen individual individuals player players couple family""")

# Person attributes: category -> value -> surface words (a value is claimed by any of its words).
PERSON_ATTRIBUTES: dict[str, dict[str, frozenset[str]]] = {
    "gender": {
        "male": _words("""man men boy boys he him his himself gentleman gentlemen guy guys father fathers dad dads
            son sons brother brothers husband husbands male males businessman businessmen policeman policemen fireman
            firemen king prince groom grandfather grandpa uncle boyfriend sir mr"""),
        "female": _words("""woman women girl girls she her hers herself lady ladies mother mothers mom moms
            daughter daughters sister sisters wife wives female females businesswoman businesswomen policewoman
            queen princess bride grandmother grandma aunt girlfriend mrs ms miss"""),
    },
    "age": {
        # one value: "a young child" and "a little boy" state the same
        "young": _words("""child children kid kids boy boys girl girls baby babies toddler toddlers infant infants
            little youngster youngsters young younger youthful teen teens teenager teenagers teenage adolescent
            youth"""),
        "old": _words("old older elderly senior seniors aged grandmother grandfather grandma grandpa"),
    },
    "race": {
        "asian": frozenset({"asian"}), "african": frozenset({"african", "african-american"}),
        "caucasian": frozenset({"caucasian"}), "hispanic": frozenset({"hispanic", "latino", "latina"}),
        "arab": frozenset({"arab", "arabic"}), "indian": frozenset({"indian"}),
        "black": frozenset({"black"}), "white": frozenset({"white"}),
        "other": frozenset({"ethnic", "ethnicity", "race", "racial", "skinned", "skin"}),
    },
    "religion": {r: frozenset({r}) for r in ("muslim", "christian", "jewish", "jew", "hindu", "buddhist", "sikh",
                                             "catholic", "religious", "islamic", "nun", "priest", "monk", "rabbi",
                                             "imam")},
    "health": {h: frozenset({h}) for h in ("disabled", "disability", "handicapped", "blind", "deaf", "sick", "ill",
                                           "injured", "pregnant", "wheelchair", "obese", "overweight", "fat",
                                           "skinny", "patient", "amputee", "autistic")},
}
# Age words that are claims only next to a person ("little dog" and "old building" claim nothing about people).
_AGE_NEEDS_PERSON = frozenset({"little", "young", "younger", "old", "older", "aged"})

LAYOUT = re.compile(r"\b(?:top|middle|bottom|center|centre|upper|lower)[\s-](?:left|right|center|centre|middle)\b"
                    r"|\b(?:at|in)\s+(?:the\s+)?(?:top|bottom|middle|center)-", re.IGNORECASE)
DATA_FORMAT = re.compile(r"\b\d+\s*[x×]\s*[a-z]|\(\s*(?:none|small|medium|large)\b|\b(?:objects|colou?rs|text|"
                         r"alt[- ]?text|caption|sentence \d)\s*:|^\s*[-*]\s", re.IGNORECASE)
_SELF_REFERENCE = re.compile(r"\b(?:this|the|above|following|given|provided)\s+(?:caption|description|prompt|data|"
                             r"facts?|information|sentence|details?)\b|\bthe\s+fact\s+that\b|\bis\s+supported\s+by\b"
                             r"|\bas\s+(?:mentioned|described|stated|given|listed)\b|\baccording\s+to\b",
                             re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*|\d+(?:[.,]\d+)*")
_QUOTED = re.compile(r"[\"“«]([^\"“”«»]{1,120})[\"”»]")


@dataclass(frozen=True)
class Sources:
    """What a fused caption may draw on."""

    alt_text: str | None = None
    ocr_text: str | None = None
    synthetic: str | None = None
    objects: tuple[dict, ...] = ()  # detections: {"label", "color", ...}

    @property
    def texts(self) -> list[str]:
        return [normalize_text(t) for t in (self.alt_text, self.ocr_text, self.synthetic) if t]


@dataclass
class Support:
    """The evidence of one sample, indexed for the checks."""

    lemmas: set[str] = field(default_factory=set)
    concepts: set[str] = field(default_factory=set)  # COCO concepts stated or detected (+ related)
    counts: dict[str, int] = field(default_factory=dict)  # concept -> detected count
    numbers: set[str] = field(default_factory=set)
    colours: set[str] = field(default_factory=set)
    attributes: dict[str, set[str]] = field(default_factory=dict)  # person attribute category -> values
    text: str = ""  # the source texts joined, casefolded, for names and quotes


# ---- lexicon -------------------------------------------------------------------------------------------------------


@cache
def _readings(word: str) -> dict[str, tuple[str, ...]]:
    """lemminflect's readings of a lower-case word: {'NOUN': ('wave',), 'VERB': ('wave',)}."""
    from lemminflect import getAllLemmas

    return dict(getAllLemmas(word))


def _noun_lemma(word: str) -> str:
    readings = _readings(word)
    return readings["NOUN"][0] if "NOUN" in readings else word


@cache
def _concept_of_word() -> dict[str, str]:
    """Single surface words of the COCO vocabulary -> concept (multi-word forms are left to grounding)."""
    out = {}
    for concept, forms in CONCEPTS.items():
        for form in (concept, *forms):
            if " " not in form:
                out[form] = concept
    return out


def _tokens(text: str) -> list[str]:
    return _WORD.findall(normalize_text(text))


def _number(tok: str) -> str | None:
    """A number token as a canonical string: '5,000' -> '5000', '3.5', 'three' -> '3'; None for other words."""
    low = tok.lower()
    if low[:1].isdigit():
        digits = low.replace(",", "")
        return str(int(digits)) if digits.isdigit() else digits
    value = _NUMBER_WORDS.get(low)
    return None if value is None else str(value)


# ---- support -------------------------------------------------------------------------------------------------------


def build_support(sources: Sources) -> Support:
    s = Support()
    words = [t.lower() for text in sources.texts for t in _tokens(text)]
    s.lemmas = {w for w in words} | {_noun_lemma(w) for w in words}
    s.concepts = set(mentioned_concepts(" . ".join(sources.texts)))
    labels = [o.get("label") for o in sources.objects if o.get("label")]
    detected = canonical_labels(labels)
    for concept in detected:
        s.counts[concept] = sum(1 for lab in labels if concept in canonical_labels([lab]))
    s.concepts |= detected
    # lenient: any mention in a source text supports its concept
    s.concepts |= {c for w in s.lemmas if (c := _concept_of_word().get(w))}
    s.concepts |= {r for c in set(s.concepts) for r in RELATED.get(c, ())}
    s.lemmas |= {w for c in s.concepts for w in c.split()}
    s.lemmas |= {w for c in detected for w in CONTEXT.get(c, ())}
    if sources.ocr_text and sources.ocr_text.strip():
        s.lemmas |= OCR_CONTEXT
    s.numbers = {n for w in words if (n := _number(w)) is not None}  # detection counts are checked per object
    s.colours = {_COLOUR_WORDS[w] for w in words if w in _COLOUR_WORDS}
    s.colours |= {_COLOUR_WORDS.get(str(o.get("color", "")).lower(), str(o.get("color", "")).lower())
                  for o in sources.objects if o.get("color")}
    s.attributes = _person_attributes(words)
    s.text = " ".join(" ".join(_tokens(t)).casefold() for t in sources.texts)
    return s


def _person_attributes(words: list[str]) -> dict[str, set[str]]:
    """category -> values claimed by a token list (race colours and age adjectives only next to a person noun)."""
    found: dict[str, set[str]] = {}
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        nxt2 = words[i + 2] if i + 2 < len(words) else ""
        near_person = nxt in _PERSON_NOUNS or nxt2 in _PERSON_NOUNS
        for category, values in PERSON_ATTRIBUTES.items():
            for value, forms in values.items():
                if w not in forms:
                    continue
                if category == "race" and value in ("black", "white") and not near_person:
                    continue
                if category == "age" and w in _AGE_NEEDS_PERSON and not near_person:
                    continue
                found.setdefault(category, set()).add(value)
    joined = " ".join(words)
    if re.search(r"\b(?:person|people|man|men|woman|women)\s+of\s+colou?r\b", joined):
        found.setdefault("race", set()).add("of colour")
    if re.search(r"\b\d+[- ]years?[- ]old\b", joined):
        found.setdefault("age", set()).add("stated age")
    return found


def _noun_supported(lemma: str, support: Support) -> bool:
    if lemma in support.lemmas or lemma in GENERIC_NOUNS:
        return True
    concept = _concept_of_word().get(lemma)
    if concept and concept in support.concepts:
        return True
    members = CATEGORIES.get(lemma)
    if members and members & support.concepts:
        return True
    return any(lemma in group and group & support.lemmas for group in NEAR_SYNONYMS)


# ---- claims --------------------------------------------------------------------------------------------------------


def head_nouns(text: str) -> list[tuple[int, str, str]]:
    """(token index, surface word, noun lemma) of each noun-phrase head: a word that can only be a noun, or a
    noun-or-verb/adjective word right after a determiner / number / adjective; the last of a run of nouns."""
    toks = _tokens(text)
    low = [t.lower() for t in toks]
    found = []
    for i, w in enumerate(low):
        if not w.isalpha() or w in FUNCTION_WORDS or w in DETERMINERS or len(w) < 3:
            continue
        readings = _readings(w)
        if "NOUN" not in readings:
            continue
        only_noun = set(readings) <= {"NOUN", "PROPN"}
        nxt = low[i + 1] if i + 1 < len(low) else ""
        if w in _COLOUR_WORDS or ("ADJ" in readings and nxt and nxt.isalpha() and nxt not in FUNCTION_WORDS):
            continue  # an adjective before its noun: "a young man", "the main road", "a black and white photo"
        prev = low[i - 1] if i > 0 else ""
        prev_noun = bool(prev) and set(_readings(prev)) == {"NOUN"}
        if prev_noun and "VERB" in readings and w.endswith(("s", "ing", "ed")):
            continue  # "a surfer rides", "a woman standing", "a dog covered"
        after_det = prev in DETERMINERS or _number(prev) is not None or prev_noun or (
            prev and set(_readings(prev)) == {"ADJ"})  # "a big table", "a coffee table"
        if not (only_noun or after_det or w in _PERSON_NOUNS or w in _concept_of_word()):
            continue
        if only_noun and nxt.isalpha() and nxt not in FUNCTION_WORDS and "NOUN" in _readings(nxt) \
                and not ("VERB" in _readings(nxt) and nxt.endswith("s")):
            continue  # a modifier: "tennis racket", "coffee table"; the head comes next
        found.append((i, toks[i], _noun_lemma(w)))
    return found


def template_runs(templates: Iterable[str]) -> frozenset[tuple[str, ...]]:
    """Every run of ECHO_RUN words of the templates (instructions and few-shot examples) with at least two content
    words: what a caption must not repeat."""
    runs = set()
    for text in templates:
        toks = [t.lower() for t in _tokens(re.sub(r"\{[a-z_]+\}", " | ", text))]
        for k in range(len(toks) - ECHO_RUN + 1):
            run = tuple(toks[k:k + ECHO_RUN])
            if sum(1 for t in run if t not in FUNCTION_WORDS and t not in DETERMINERS) >= 2:
                runs.add(run)
    return frozenset(runs)


def _echo(text: str, runs: frozenset[tuple[str, ...]], support: Support) -> list[str]:
    reasons = []
    toks = [t.lower() for t in _tokens(text)]
    source = f" {support.text} "
    for k in range(len(toks) - ECHO_RUN + 1):
        run = tuple(toks[k:k + ECHO_RUN])
        if run in runs and f" {' '.join(run)} " not in source:
            reasons.append(f"echo: {' '.join(run)!r} (prompt text)")
            break
    return [*reasons, *_pattern_reason(LAYOUT, text, "echo: {!r} (layout token)"),
            *_pattern_reason(DATA_FORMAT, text, "echo: {!r} (data block format)")]


def _pattern_reason(rx: re.Pattern, text: str, reason: str) -> list[str]:
    """[`reason` with the first match of `rx` in `text`], or [] when it does not match."""
    m = rx.search(text)
    return [reason.format(m.group(0).strip())] if m else []


def _unsupported_nouns(text: str, support: Support) -> list[str]:
    missing = []
    for _, surface, lemma in head_nouns(text):
        if not _noun_supported(lemma, support) and not _noun_supported(surface.lower(), support):
            missing.append(surface.lower())
    # capitalised words inside a sentence: names, brands, places (not in a caption written in capitals)
    known = set(support.text.split())
    for m in _WORD.finditer(text if not text.isupper() else ""):
        tok, before = m.group(0), text[:m.start()].rstrip()
        if not tok[:1].isupper() or not before or before[-1] in ".!?\"“:":
            continue
        low = tok.lower()
        if low not in known and low not in support.lemmas and low not in GENERIC_NOUNS and low != "i":
            missing.append(tok)
    unique = list({m.casefold(): m for m in missing}.values())
    return [f"unsupported_noun: {', '.join(unique)}"] if unique else []


def _counts(text: str, support: Support) -> list[str]:
    toks = [t.lower() for t in _tokens(text)]
    bad = []
    for i, tok in enumerate(toks):
        n = _number(tok)
        if n is None:
            continue
        if n in support.numbers:
            continue
        concept = next((c for t in toks[i + 1:i + 4] if (c := _concept_of_word().get(_noun_lemma(t)))), None)
        if concept and str(support.counts.get(concept)) == n:
            continue
        bad.append(tok)
    return [f"count: {', '.join(dict.fromkeys(bad))} not in any source"] if bad else []


def _colours(text: str, support: Support, race_words: set[int]) -> list[str]:
    toks = [t.lower() for t in _tokens(text)]
    bad = [t for i, t in enumerate(toks)
           if t in _COLOUR_WORDS and i not in race_words and _COLOUR_WORDS[t] not in support.colours
           and not (t == "orange" and "orange" in support.concepts)]
    return [f"colour: {', '.join(dict.fromkeys(bad))} not in any source"] if bad else []


def _quoted_text(text: str, support: Support) -> list[str]:
    source = f" {support.text} "
    bad = [q for q in _QUOTED.findall(normalize_text(text))
           if f" {' '.join(_tokens(q)).casefold()} " not in source or not _tokens(q)]
    return [f"text: {', '.join(repr(q) for q in bad)} not in the OCR text or alt-text"] if bad else []


def _attributes(text: str, support: Support) -> tuple[list[str], set[int]]:
    """Person-attribute claims no source states; and the token positions used as race words (not colours)."""
    toks = [t.lower() for t in _tokens(text)]
    claimed = _person_attributes(toks)
    race_positions = {i for i, t in enumerate(toks) if t in ("black", "white") and (
        (toks[i + 1] if i + 1 < len(toks) else "") in _PERSON_NOUNS)}
    bad = []
    for category, values in claimed.items():
        extra = values - support.attributes.get(category, set())
        if extra:
            bad.append(f"{category} {'/'.join(sorted(extra))}")
    return ([f"person_attribute: {'; '.join(bad)} (no source states it)"] if bad else []), race_positions


def _tautology(text: str) -> list[str]:
    reasons = []
    toks = [t.lower() for t in _tokens(text)]
    for i in range(len(toks) - 2):
        rest = [t for t in toks[i + 2:i + 5] if t not in DETERMINERS]
        if toks[i + 1] not in ("is", "are", "was", "were") or not rest:
            continue
        a, b = _noun_lemma(toks[i]), _noun_lemma(rest[0])
        same = a == b and a.isalpha() and a not in FUNCTION_WORDS  # "the woman is a woman"
        people = _concept_of_word().get(a) == "person" == _concept_of_word().get(b)  # "the person is a man"
        if same or people:
            reasons.append(f"tautology: {toks[i]!r} {toks[i + 1]} {rest[0]!r}")
            break
    return [*reasons, *_pattern_reason(_SELF_REFERENCE, text, "self_reference: {!r}")]


def _fluency(text: str, complete: bool) -> list[str]:
    reasons = []
    stripped = text.strip()
    if complete and stripped[-1:] not in ".!?\"”')":
        reasons.append("fluency: no final punctuation (cut off?)")
    pieces = [p.strip() for p in re.split(r"(?<=[.!?])\s+", stripped) if p.strip()]
    seen = set()
    for piece in pieces:
        toks = _tokens(piece)
        if not toks:
            continue
        if len(toks) < 3:
            reasons.append(f"fluency: fragment {piece!r}")
        if toks[-1].lower() in FUNCTION_WORDS - {"it", "them", "him", "her", "us", "me", "here", "there", "too"}:
            reasons.append(f"fluency: ends with {toks[-1]!r}")
        key = " ".join(t.lower() for t in toks)
        if key in seen:
            reasons.append(f"fluency: sentence repeated {piece[:40]!r}")
        seen.add(key)
    words = [t.lower() for t in _tokens(stripped)]
    runs = [tuple(words[k:k + ECHO_RUN]) for k in range(len(words) - ECHO_RUN + 1)]
    twice = next((r for k, r in enumerate(runs) if r in runs[k + ECHO_RUN:]
                  and sum(1 for t in r if t not in FUNCTION_WORDS and t not in DETERMINERS) >= 2), None)
    if twice and not any(r.startswith("fluency: sentence repeated") for r in reasons):
        reasons.append(f"fluency: {' '.join(twice)!r} said twice")
    for a, b in ("()", "[]"):
        if stripped.count(a) != stripped.count(b):
            reasons.append(f"fluency: unbalanced {a}{b}")
    if stripped.count('"') % 2:
        reasons.append("fluency: unbalanced quotes")
    return list(dict.fromkeys(reasons))


def omissions(caption: str, sources: Sources) -> list[str]:
    """The objects the alt-text names that `caption` drops (a fused caption must not be poorer than the alt-text it
    replaces); [] when it keeps them all. Not part of `verify_claims`: a human caption is no poorer for naming other
    things."""
    kept = named_concepts(normalize_text(caption))
    kept |= {r for c in kept for r in RELATED.get(c, ())}
    lost = sorted(mentioned_concepts(sources.alt_text) - kept)
    return [f"omission: {', '.join(lost)} (named by the alt-text)"] if lost else []


def verify_claims(caption: str, sources: Sources, runs: frozenset[tuple[str, ...]] = frozenset(),
                  support: Support | None = None, complete_sentences: bool = True) -> list[str]:
    """Every reason `caption` cannot be kept as a caption of the image `sources` describe; [] when verified.
    `complete_sentences`: the last sentence must end with punctuation (an LLM caption cut at max_tokens does not;
    off for human captions, which are often typed without a final stop)."""
    text = normalize_text(caption).strip()
    if not text:
        return []
    support = support or build_support(sources)
    attribute_reasons, race_positions = _attributes(text, support)
    return [*_echo(text, runs, support), *_unsupported_nouns(text, support), *_counts(text, support),
            *_colours(text, support, race_positions), *_quoted_text(text, support), *attribute_reasons,
            *_tautology(text), *_fluency(text, complete_sentences)]
