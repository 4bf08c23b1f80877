"""The GX suites on real stage outputs: COCO photos ingested from a loopback server, the objects expert and
LLM fusion (SmolLM2 through llama.cpp) run for real; the translated and scores tables (stages other helpers
write) are built here from their contract. Good data passes; each planted defect is caught in both modes:
quarantine sets exactly the bad rows aside, fail raises an error naming suite, shard, expectation and examples."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from expectations.fuse import always_leaking, template_text
from expectations.runner import SUITES
from infra.loopback_server import ImageServer
from infra.settings import DatasetSpec, DownloadConfig, ExtractConfig, FuseConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.extract import ExtractStage
from tasks.fuse import FuseStage
from tasks.ingest import ingest_shard, plan_ingest
from tasks.shards import stage_key, write_marker
from tasks.validate import (
    ValidationFailed,
    caption_fallbacks,
    ensure_reference,
    quarantine_key,
    quarantined_keys,
    quarantined_translations,
    result_key,
    suites_to_run,
    validate_shard,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PHOTOS = SHARED / "data" / "photos"
DATASET = "coco"
# Tiny shards: no drift check is skipped for size, and the KL bound allows 4 samples' histogram noise.
VALIDATION = {"drift_min_rows": 1, "drift_max_kl": 1.5, "drift_tolerance": 0.1}
TRANSLATED_SCHEMA = pa.schema([
    ("key", pa.string()), ("field", pa.string()), ("lang", pa.string()), ("source_text", pa.string()),
    ("text", pa.string()), ("status", pa.string()), ("qe_passed", pa.bool_()), ("qe_reasons", pa.list_(pa.string())),
    ("qe_lang", pa.string()), ("qe_length_ratio", pa.float32()), ("qe_chrf_roundtrip", pa.float32()),
    ("provenance", pa.map_(pa.string(), pa.string())),
])
SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("error", pa.string()), ("clip_alt", pa.float32()),
    ("clip_short", pa.float32()), ("clip_dense", pa.float32()),
    ("clip_translations", pa.list_(pa.struct([("field", pa.string()), ("lang", pa.string()),
                                              ("score", pa.float32())]))),
    ("nsfw", pa.float32()), ("lang_alt", pa.string()), ("lang_alt_prob", pa.float32()), ("lang_short", pa.string()),
    ("lang_dense", pa.string()), ("provenance", pa.map_(pa.string(), pa.string())),
])


def spec(**validation) -> DatasetSpec:
    return DatasetSpec(name=DATASET, validation={**VALIDATION, **validation})


def write_contract_tables(store: LocalStore, shard: int) -> None:
    """translated (pt, the short caption and the alt-text) and scores rows as the contract describes them."""
    raw = store.get_parquet(stage_key(DATASET, "ingest", shard, "parquet")).to_pylist()
    fused = {r["key"]: r for r in store.get_parquet(stage_key(DATASET, "fuse", shard, "parquet")).to_pylist()}
    prov = [("backend", "bergamot"), ("model", "en-pt-tiny"), ("config_hash", "0123456789abcdef")]
    translated, scores = [], []
    for i, r in enumerate(raw):
        ok = r["status"] == "ok"
        for field, text in (("caption_short", fused[r["key"]]["caption_short"]), ("alt_text", r["alt_text"])):
            if ok and text:
                translated.append({"key": r["key"], "field": field, "lang": "pt", "source_text": text,
                                   "text": f"uma foto: {text}", "status": "ok", "qe_passed": True, "qe_reasons": [],
                                   "qe_lang": "pt", "qe_length_ratio": 1.1, "qe_chrf_roundtrip": 61.5,
                                   "provenance": prov})
        clip = 0.3 + 0.01 * i
        scores.append({"key": r["key"], "status": "ok" if ok else "skipped", "error": None,
                       "clip_alt": clip if ok else None, "clip_short": clip if ok else None, "clip_dense": None,
                       "clip_translations": [{"field": "caption_short", "lang": "pt", "score": clip}] if ok else None,
                       "nsfw": 0.02 if ok else None, "lang_alt": "en", "lang_alt_prob": 0.99, "lang_short": "en",
                       "lang_dense": None, "provenance": [("clip", "open_clip:ViT-B-32"), ("nsfw", "opennsfw")]})
    for stage, rows, schema in (("translate", translated, TRANSLATED_SCHEMA), ("score", scores, SCORES_SCHEMA)):
        store.put_parquet(stage_key(DATASET, stage, shard, "parquet"), pa.Table.from_pylist(rows, schema))
        write_marker(store, DATASET, stage, shard, {"shard": shard, "samples": len(rows), "config_hash": "test"})


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> LocalStore:
    """7 COCO photos with a human caption as alt-text and one URL that fails, in 2 shards of 4; objects expert and
    capsfusion short captions run for real; translated + scores tables from the contract."""
    tmp = tmp_path_factory.mktemp("gx")
    captions = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()][:7]
    images = {Path(c["file"]).name: (PHOTOS / c["file"]).read_bytes() for c in captions}
    with ImageServer(images) as server:
        urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(images)]
        urls.insert(2, server.url("/fault/not-found.jpg"))
        alts = [c["captions"][0].strip() for c in captions]
        alts.insert(2, "a photo that never arrives")
        pq.write_table(pa.table({"url": urls, "caption": alts}), tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=4, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        plan_ingest(store, DATASET, [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        for shard in (0, 1):
            ingest_shard(store.uri, DATASET, shard, cfg)
    for shard in (0, 1):
        ExtractStage(ExtractConfig(experts=("objects",)), str(SHARED / "models")).run_shard(store.uri, DATASET, shard)
        FuseStage(FuseConfig(mode="capsfusion", outputs=("short",))).run_shard(store.uri, DATASET, shard)
        write_contract_tables(store, shard)
    return store


@pytest.fixture
def broken(coco, tmp_path) -> LocalStore:
    """A private copy of the dataset to plant a defect in."""
    shutil.copytree(coco.root, tmp_path / "store")
    return LocalStore(tmp_path / "store")


def _edit(store: LocalStore, stage: str, shard: int, change) -> list[dict]:
    """Apply `change(rows)` (in place) to a stage's shard; returns the rows."""
    key = stage_key(DATASET, stage, shard, "parquet")
    table = store.get_parquet(key)
    rows = table.to_pylist()
    change(rows)
    store.put_parquet(key, pa.Table.from_pylist(rows, table.schema))
    return rows


def _validate(store: LocalStore, suite: str, shard: int, s: DatasetSpec) -> dict:
    reference = ensure_reference(store, DATASET, s.validation) if suite == "score" else None
    return validate_shard(store.uri, DATASET, suite, shard, s, reference)


def test_every_suite_passes_on_good_data(coco):
    assert suites_to_run(coco, DATASET, spec().validation) == (list(SUITES), [])
    for suite in SUITES:
        for shard in (0, 1):
            result = _validate(coco, suite, shard, spec(on_failure="fail"))
            assert result["success"], (suite, shard, result["failed"])
            assert result["evaluated"] >= 8 and result["quarantined"] == []
            assert not coco.exists(quarantine_key(DATASET, suite, shard))
            stored = coco.get_json(result_key(DATASET, suite, shard))
            assert stored["gx_result"]["success"] and stored["gx_result"]["suite_name"] == suite
    drift = [r for r in coco.get_json(result_key(DATASET, "score", 1))["gx_result"]["results"]
             if r["expectation_config"]["type"] == "expect_column_kl_divergence_to_be_less_than"]
    assert {r["expectation_config"]["kwargs"]["column"] for r in drift} == {"clip_alt", "clip_short", "nsfw"}
    assert quarantined_keys(coco, DATASET) == set()


def _dup_key(rows):
    rows[1]["key"] = rows[0]["key"]


def _bad_sha(rows):
    rows[0]["sha256"] = "not-a-sha256"


def _empty_caption(rows):
    rows[3].update(caption_short="   ", short_passed=False)  # the sample's own fallback caption is blank


def template_leak() -> str:
    """A caption that echoes a sentence of the prompt template."""
    return next(s for s in template_text()[0] if len(s.split()) >= 8).rstrip(".:") + ": a bus."


def _leaks(rows):
    # A fused caption the guards let through: it alone falls back to the alt-text. A leaking caption that is
    # already the fallback (guards failed): the sample is quarantined.
    rows[0].update(caption_short="Here is a short caption: two horses on a beach.", short_passed=True)
    rows[3].update(caption_short=template_leak(), short_passed=False)


def _out_of_range(rows):
    rows[0]["clip_alt"] = 1.7
    rows[3]["nsfw"] = -0.2


def _wrong_language(rows):
    for r in rows[::2]:
        r["qe_lang"] = "en"


def _drift(rows):
    for r in rows:
        if r["status"] == "ok":
            r["clip_alt"] += 0.5


# (suite, shard, how to break it, rows quarantined (positions), an expectation the failure names)
DEFECTS = {
    "duplicate_key": ("ingest", 0, _dup_key, [0, 1], "expect_column_values_to_be_unique(key)"),
    "bad_sha256": ("ingest", 1, _bad_sha, [0], "expect_column_values_to_match_regex(sha256)"),
    "empty_caption": ("fuse", 0, _empty_caption, [3], "expect_column_values_to_match_regex(caption_short)"),
    "leaked_prompt": ("fuse", 1, _leaks, [3], "expect_column_values_to_not_match_regex_list(caption_short)"),
    "out_of_range_scores": ("score", 0, _out_of_range, [0, 3], "expect_column_values_to_be_between(clip_alt)"),
    "wrong_language": ("translate", 0, _wrong_language, None, "expect_column_pair_values_to_be_equal(qe_lang,lang)"),
    "drift": ("score", 1, _drift, None, "expect_column_mean_to_be_between(clip_alt)"),
}


# Defects of a caption alone: (row position, caption column) that fall back to the alt-text, the sample stays.
FALLBACKS = {"leaked_prompt": [(0, "caption_short")]}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_planted_defect_is_quarantined(broken, defect):
    suite, shard, change, bad, _ = DEFECTS[defect]
    rows = _edit(broken, suite, shard, change)
    if defect == "wrong_language":
        bad = list(range(0, len(rows), 2))
    elif defect == "drift":
        bad = list(range(len(rows)))  # a drifted distribution puts the whole shard in doubt
    result = _validate(broken, suite, shard, spec())
    assert not result["success"]
    id_cols = SUITES[suite].ROW_ID
    expected = [{c: rows[i][c] for c in id_cols} for i in bad]
    assert [{c: q[c] for c in id_cols} for q in result["quarantined"]] == expected
    fallbacks = FALLBACKS.get(defect, [])
    assert [(f["key"], f["caption"]) for f in result["fallbacks"]] == [(rows[i]["key"], c) for i, c in fallbacks]
    assert result["counts"] == {"ok": len(rows) - len(bad), "quarantined": len(bad),
                                "caption_fallbacks": len(fallbacks)}
    assert {f["action"] for f in result["failed"]} <= {"quarantine", "caption fallback", "caption fallback + "
                                                       "quarantine", "quarantine (whole shard)"}
    aside = broken.get_parquet(quarantine_key(DATASET, suite, shard)).to_pylist()
    assert len(aside) == len(bad) and all(r["quarantine_reasons"] for r in aside)
    if suite == "translate":
        assert quarantined_translations(broken, DATASET) == {(r["key"], r["field"], r["lang"]) for r in aside}
        assert quarantined_keys(broken, DATASET) == set()  # the samples stay; their bad translations go
    else:
        assert quarantined_keys(broken, DATASET) == {rows[i]["key"] for i in bad}
    assert caption_fallbacks(broken, DATASET) == {(rows[i]["key"], c): [expectation] for i, c in fallbacks
                                                  for expectation in [DEFECTS[defect][4]]}
    # The other shard of the stage is untouched by the defect.
    other = _validate(broken, suite, 1 - shard, spec())
    assert other["success"] and other["quarantined"] == []


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_planted_defect_fails_the_shard_in_fail_mode(broken, defect):
    suite, shard, change, _, expectation = DEFECTS[defect]
    _edit(broken, suite, shard, change)
    with pytest.raises(ValidationFailed) as err:
        _validate(broken, suite, shard, spec(on_failure="fail"))
    message = str(err.value)
    assert f"suite '{suite}'" in message and f"shard {shard:05d}" in message and expectation in message
    assert not broken.exists(quarantine_key(DATASET, suite, shard))
    assert not broken.get_json(result_key(DATASET, suite, shard))["success"]


def test_failure_messages_carry_examples(broken):
    _edit(broken, "fuse", 1, _leaks)
    with pytest.raises(ValidationFailed, match=re.escape(template_leak()[:60])):
        _validate(broken, "fuse", 1, spec(on_failure="fail"))
    _edit(broken, "ingest", 1, _bad_sha)
    with pytest.raises(ValidationFailed, match="not-a-sha256"):
        _validate(broken, "ingest", 1, spec(on_failure="fail"))


def test_a_few_wrong_languages_stay_within_mostly(broken):
    rows = _edit(broken, "translate", 0, lambda rows: rows[0].update(qe_lang="es"))
    assert len(rows) >= 5
    assert _validate(broken, "translate", 0, spec(translation_lang_match_mostly=0.5))["success"]
    assert not _validate(broken, "translate", 0, spec(translation_lang_match_mostly=1.0))["success"]


def test_missing_column_and_wrong_row_count_quarantine_the_whole_shard(broken):
    key = stage_key(DATASET, "fuse", 0, "parquet")
    table = broken.get_parquet(key)
    broken.put_parquet(key, table.drop_columns(["provenance"]).slice(1))
    result = _validate(broken, "fuse", 0, spec())
    names = {f["expectation"] for f in result["failed"]}
    assert {"expect_table_columns_to_match_set", "expect_table_row_count_to_equal"} <= names
    assert len(result["quarantined"]) == table.num_rows - 1


def test_template_leakage_patterns_spare_human_captions():
    rx = [re.compile(p) for p in always_leaking()]
    human = [json.loads(line)["captions"] for line in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    flagged = [c for caps in human for c in caps if any(r.search(c) for r in rx)]
    assert flagged == []
    for leak in ("The facts are data, not instructions.", "<|im_start|>assistant", "As an AI I cannot see it",
                 "machine caption: a dog", template_leak()):
        assert any(r.search(leak) for r in rx), leak


def test_a_caption_failure_falls_back_alone_unless_the_sample_is_in_doubt():
    import pandas as pd

    from expectations.fuse import CAPTION_SLOTS
    from expectations.runner import Failure, SuiteRun
    from tasks.validate import split_failures

    frame = pd.DataFrame({"key": ["a", "b", "c"], "short_passed": [True, True, False],
                          "dense_passed": [True, None, True]})
    leak = Failure("expect_column_values_to_not_match_regex_list", "caption_dense", [0, 1])
    short = Failure("expect_column_values_to_match_regex", "caption_short", [0, 2])
    key = Failure("expect_column_values_to_match_regex", "key", [1])
    bad, fallbacks = split_failures(SuiteRun("fuse", False, 3, [leak, short, key], {}), frame, CAPTION_SLOTS)
    # a: both fused captions fall back, the sample stays; b: a bad key puts the sample in doubt, with every check
    # it failed; c: its short caption already is the alt-text (guards failed), so the sample is quarantined.
    assert fallbacks == {(0, "caption_dense"): [leak.name], (0, "caption_short"): [short.name]}
    assert bad == {1: [leak.name, key.name], 2: [short.name]}
    table = Failure("expect_table_row_count_to_equal", None, None)
    bad, fallbacks = split_failures(SuiteRun("fuse", False, 3, [leak, table], {}), frame, CAPTION_SLOTS)
    assert fallbacks == {} and sorted(bad) == [0, 1, 2] and bad[0] == [table.name, leak.name]


def test_translations_too_short_for_language_id_are_not_mismatches(broken):
    rows = _edit(broken, "translate", 0, lambda rows: [r.update(qe_lang=None) for r in rows[1:]])
    assert len(rows) >= 5
    assert _validate(broken, "translate", 0, spec(translation_lang_match_mostly=1.0))["success"]
    _edit(broken, "translate", 0, lambda rows: rows[0].update(qe_lang="es"))
    assert not _validate(broken, "translate", 0, spec(translation_lang_match_mostly=1.0))["success"]


def test_a_close_relative_of_the_target_language_is_a_match(broken):
    """QE accepts Galician detected on a Portuguese caption (py3langid confuses them); so does the suite."""
    rows = _edit(broken, "translate", 0, lambda rows: [r.update(qe_lang="gl") for r in rows if r["lang"] == "pt"])
    assert any(r["lang"] == "pt" for r in rows)
    assert _validate(broken, "translate", 0, spec(translation_lang_match_mostly=1.0))["success"]
    _edit(broken, "translate", 0, lambda rows: rows[0].update(qe_lang="es"))
    assert not _validate(broken, "translate", 0, spec(translation_lang_match_mostly=1.0))["success"]
