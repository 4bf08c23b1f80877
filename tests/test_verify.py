"""The claim verifier of fused captions (tasks/verify.py): each check on its own, the captions the issue found in
real runs, and its calibration on real human COCO captions (../shared/data/photos) against their own image's
sources and another image's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.fuse import prompt_texts
from tasks.verify import Sources, head_nouns, omissions, template_runs, verify_claims

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
SURF = Sources("A man riding a wave on top of a surfboard.", None, None,
               ({"label": "person", "color": "black"}, {"label": "surfboard", "color": "white"}))
RUNS = template_runs(prompt_texts("v2"))


def kinds(caption: str, sources: Sources = SURF, **kw) -> set[str]:
    return {r.split(":", 1)[0] for r in verify_claims(caption, sources, RUNS, **kw)}


def test_a_faithful_richer_caption_passes():
    assert verify_claims("A man rides a wave on a white surfboard in the ocean.", SURF, RUNS) == []
    assert verify_claims("A surfer on a white surfboard rides a wave.", SURF, RUNS) == []


@pytest.mark.parametrize(("caption", "kind"), [
    # what real runs kept before (issue 12)
    ("The pizza is a slice of Italy, and the person is a person of color.", "person_attribute"),
    ("The pizza is a slice of Italy, and the person is a person of color.", "tautology"),
    ("A man on a surfboard is a 3-year-old boy with a small, gray face.", "person_attribute"),
    ("The woman is a woman with a black handbag.", "tautology"),
    ("The woman is a woman with a black handbag.", "person_attribute"),
    ("The fact that he is a man is supported by the fact that he is a man.", "self_reference"),
    ("A man rides a surfboard; mention every object and any text.", "echo"),
    ("A man at middle-right rides a surfboard.", "echo"),
    ("A man rides a surfboard at bottom-right.", "echo"),
    ("A man riding a wave on a surfboard, served with brown rice.", "unsupported_noun"),
    ("A man riding a wave on a surfboard, served with brown rice.", "colour"),
    # each kind on its own
    ("Three men ride waves on surfboards.", "count"),
    ("A man rides a wave on a surfboard near a lighthouse.", "unsupported_noun"),
    ("Tom Curren rides a wave on a surfboard.", "unsupported_noun"),
    ("A man rides a wave on a red surfboard.", "colour"),
    ('A man rides a wave on a surfboard that says "RIP CURL".', "text"),
    ("An elderly man rides a wave on a surfboard.", "person_attribute"),
    ("An Asian man rides a wave on a surfboard.", "person_attribute"),
    ("A pregnant woman rides a wave on a surfboard.", "person_attribute"),
    ("A Muslim man rides a wave on a surfboard.", "person_attribute"),
    ("A man rides a wave on a surfboard. A man rides a wave on a surfboard.", "fluency"),
    ("A man rides a wave on a surfboard with", "fluency"),
    ("A man rides a wave on a surfboard in the", "fluency"),
    ("A man (on a surfboard rides a wave.", "fluency"),
    ("This caption shows a man on a surfboard.", "self_reference"),
    ("Objects: a man, a surfboard.", "echo"),
    ("A man x1 and 1 x surfboard ride a wave.", "echo"),
])
def test_each_unsupported_claim_is_rejected_with_its_reason(caption, kind):
    assert kind in kinds(caption)


def test_a_fused_caption_must_keep_the_objects_the_alt_text_names():
    sources = Sources("A living room with a dog and a table.", None, None, ({"label": "couch"},) * 2)
    assert omissions("Two couches in a living room.", sources) == [
        "omission: dining table, dog (named by the alt-text)"]
    assert omissions("Two couches, a dog and a table in a living room.", sources) == []
    assert omissions("Two sofas, a puppy and a desk in a living room.", sources) == []  # synonyms keep them
    assert omissions("A couch.", Sources(None, None, None, ())) == []


def test_person_attributes_pass_when_a_source_states_them():
    sources = Sources("An elderly Asian woman in a wheelchair", None, None, ({"label": "person"},))
    assert kinds("An elderly woman in a wheelchair.", sources) == set()
    assert "person_attribute" in kinds("An elderly man in a wheelchair.", sources)  # gender differs
    person_only = Sources("a person on a bench", None, None, ({"label": "person"}, {"label": "bench"}))
    assert "person_attribute" in kinds("A woman sits on a bench.", person_only)
    assert kinds("A person sits on a bench.", person_only) == set()
    # a colour word next to a thing is a colour, next to a person a race claim
    assert "person_attribute" in kinds("A black man sits on a bench.", person_only)
    coloured = Sources("a person on a black bench", None, None, ({"label": "person"}, {"label": "bench"}))
    assert kinds("A person sits on a black bench.", coloured) == set()


def test_counts_colours_and_text_must_match_a_source():
    sources = Sources("dogs at the park", "OPEN 24 HOURS", None,
                      ({"label": "dog", "color": "brown"},) * 3 + ({"label": "bench"},))
    assert kinds('Three brown dogs near a bench at the park, with a sign that reads "OPEN 24 HOURS".', sources) \
        == set()
    assert "count" in kinds("Two brown dogs near a bench at the park.", sources)
    assert "colour" in kinds("Three black dogs near a bench at the park.", sources)
    assert "text" in kinds('Three brown dogs at the park under a sign that reads "CLOSED".', sources)
    assert "count" in kinds("Three brown dogs at the park at 9 o'clock.", sources)


def test_a_count_must_match_its_own_object_and_numbers_are_read_in_every_form():
    sources = Sources("a yard", None, None, ({"label": "person"},) * 2 + ({"label": "dog"},)
                      + ({"label": "chair"},) * 3)
    assert kinds("Two people with three chairs and a dog in a yard.", sources) == set()
    assert "count" in kinds("Two people with three dogs in a yard.", sources)  # 3 is the chairs' count
    assert "count" in kinds("Three people with a dog in a yard.", sources)
    crowd = Sources("a crowd on a street", None, None, ({"label": "person"},))
    assert "count" in kinds("A crowd of 5,000 people on a street.", crowd)
    assert "count" in kinds("A crowd of 2.5 people on a street.", crowd)
    assert kinds("A crowd of 5000 people on a street.", Sources("5,000 people on a street", None, None, ())) \
        == set()


def test_quoted_text_and_names_in_any_script():
    sources = Sources("a shop front in a square", "REOPENING SOON Пока 大阪", None, ())
    assert "text" in kinds('A shop front in a square with the text "OPEN".', sources)  # a word, not a substring
    assert kinds('A shop front in a square with the text "REOPENING SOON".', sources) == set()
    assert "text" in kinds('A shop front in a square with the text "Привет".', sources)
    assert kinds('A shop front in a square with the text "Пока".', sources) == set()
    assert "text" in kinds('A shop front in a square with the text "東京".', sources)
    assert "unsupported_noun" in kinds("A shop front in a square in Łódź.", sources)


def test_category_words_near_synonyms_and_implied_scenes_are_supported():
    food = Sources("lunch time", None, None, ({"label": "pizza"}, {"label": "dining table"}, {"label": "fork"}))
    assert kinds("A pizza and a fork on a table, ready for lunch time.", food) == set()
    assert kinds("Food on a plate with silverware, ready for lunch time.", food) == set()
    assert "unsupported_noun" in kinds("A pizza with a salad and a fork on a table.", food)
    ski = Sources("skiing holiday", None, None, ({"label": "person"}, {"label": "skis"}))
    assert kinds("A person skis down a snowy slope on a skiing holiday.", ski) == set()


def test_nouns_are_heads_of_noun_phrases():
    heads = [lemma for _, _, lemma in head_nouns("A black and white photo of a tennis racket next to a coffee table.")]
    assert heads == ["photo", "racket", "table"]  # colours and modifiers are no heads
    assert [lemma for _, _, lemma in head_nouns("Two dogs sit while people stand.")] == ["dog", "people"]


def test_odd_input_never_crashes():
    for text in ("", "   ", "\x00\x01", "?" * 500, "a " * 2000, "Ü" * 50, "12345", '"""', "(((", "\ud800x"):
        assert isinstance(verify_claims(text, SURF, RUNS), list)
    assert isinstance(verify_claims("A cat.", Sources()), list)


def _coco() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    rows = [json.loads(x) for x in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    objects = {json.loads(x)["file"]: json.loads(x)["objects"] for x in (PHOTOS / "objects.jsonl").read_text()
               .splitlines()}
    caps = {r["file"]: r["captions"] for r in rows if r["file"] in objects}
    return caps, {f: [o["label"] for o in objs if not o["iscrowd"]] for f, objs in objects.items()}


def test_calibration_on_human_captions_separates_own_from_other_images():
    """A human caption against its own image's sources (another human caption as alt-text, the COCO labels as
    detections) must pass far more often than against another image's sources. Measured on the dev split:
    own 51%, other 8% (bench/fusion_eval.py prints the same with the real experts' detections and OCR)."""
    caps, labels = _coco()
    files = sorted(caps)
    assert len(files) >= 30

    def sources(f: str) -> Sources:
        return Sources(caps[f][1], None, None, tuple({"label": lab} for lab in labels[f]))

    own = other = n = 0
    for i, f in enumerate(files):
        for k in (0, 2, 3):
            caption = caps[f][k]
            n += 1
            own += not verify_claims(caption, sources(f), complete_sentences=False)
            other += not verify_claims(caption, sources(files[(i + 7) % len(files)]), complete_sentences=False)
    assert own / n >= 0.4, own / n
    assert other / n <= 0.15, other / n
    assert own / n >= 4 * (other / n)
