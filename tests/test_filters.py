"""Filters as views on hand-made joined tables: each filter, exact top-k % counts, the LAION preset, skipped
columns, and nothing deleted."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from infra.settings import ScoreConfig
from tasks.filters import apply_filters
from tasks.score import TRANSLATION_SCORE


def cfg(**filters) -> ScoreConfig:
    return ScoreConfig(filters={"drop_duplicates": False, "drop_semdedup": False, **filters})


def table(**overrides) -> pa.Table:
    """Ten samples; every column good unless overridden."""
    n = 10
    data = {
        "key": [f"{i:03d}" for i in range(n)],
        "status": ["ok"] * n,
        "alt_text": ["a dog on a red couch"] * n,
        "original_width": [640] * n,
        "original_height": [480] * n,
        "duplicate_of": pa.array([None] * n, pa.string()),
        "clip_alt": pa.array([0.30 + i / 100 for i in range(n)], pa.float32()),
        "nsfw": pa.array([0.01] * n, pa.float32()),
        "lang_alt": ["en"] * n,
    }
    data.update(overrides)
    return pa.table(data)


def failed(t: pa.Table) -> dict[str, list[str]]:
    return dict(zip(t.column("key").to_pylist(), t.column("failed_filters").to_pylist(), strict=True))


def test_status_duplicates_and_semdedup_mark_rows_and_delete_nothing():
    t = table(status=["ok", "error", "opted_out"] + ["ok"] * 7,
              duplicate_of=pa.array([None, None, None, "000"] + [None] * 6, pa.string()),
              semdedup_duplicate_of=pa.array([None] * 9 + ["004"], pa.string()))
    out, counts = apply_filters(t, ScoreConfig())
    assert out.num_rows == 10 and out.column_names[:len(t.column_names)] == t.column_names
    assert out.select(t.column_names).equals(t)  # the scores and raw columns are untouched
    f = failed(out)
    assert f["001"] == ["status"] and f["002"] == ["status"] and f["003"] == ["duplicate"] and f["009"] == ["semdedup"]
    assert counts == {"status": 2, "duplicate": 1, "semdedup": 1, "selected": 6, "skipped": []}
    assert out.column("selected").to_pylist() == [not v for v in f.values()]
    # Without the dedup filters, duplicates are selected again.
    _, counts = apply_filters(t, cfg())
    assert counts["selected"] == 8 and "duplicate" not in counts


def test_absolute_clip_threshold_and_null_scores_fail():
    t = table(clip_alt=pa.array([0.1, 0.27, 0.28, 0.35, None, 0.5, 0.2, 0.29, 0.3, 0.9], pa.float32()))
    out, counts = apply_filters(t, cfg(clip_min={"alt": 0.28}))
    assert counts["clip_alt_min"] == 4  # 0.1, 0.27, null, 0.2 (0.28 itself passes)
    assert [k for k, v in failed(out).items() if v] == ["000", "001", "004", "006"]


def test_laion_preset_uses_0_28_for_english_and_0_26_otherwise():
    t = table(clip_alt=pa.array([0.27, 0.27, 0.25, 0.30] + [0.5] * 6, pa.float32()),
              lang_alt=["en", "pt", "de", "fr"] + ["en"] * 6)
    out, counts = apply_filters(t, cfg(clip_min="laion"))
    assert [k for k, v in failed(out).items() if v] == ["000", "002"]
    assert counts["clip_alt_min"] == 2
    # A multilingual score of a non-English alt-text replaces the English model's score.
    multi = pa.array([[]] * 2 + [[{"field": "alt_text", "lang": "de", "score": 0.4}]] + [[]] * 7,
                     pa.list_(TRANSLATION_SCORE))
    out, _ = apply_filters(t.append_column("clip_translations", multi), cfg(clip_min="laion"))
    assert [k for k, v in failed(out).items() if v] == ["000"]


def test_top_k_percent_keeps_an_exact_count_with_ties_by_key():
    scores = [0.5, 0.9, 0.9, 0.1, 0.3, 0.7, 0.2, 0.9, 0.6, 0.4]
    t = table(clip_alt=pa.array(scores, pa.float32()))
    for percent, expected in ((30, 3), (25, 3), (10, 1), (100, 10), (1, 0)):
        out, counts = apply_filters(t, cfg(clip_top_percent={"alt": percent}))
        assert counts["selected"] == expected and counts["clip_alt_topk"] == 10 - expected
    out, _ = apply_filters(t, cfg(clip_top_percent={"alt": 20}))
    assert out.filter(out.column("selected")).column("key").to_pylist() == ["001", "002"]  # 0.9 ties: lowest keys
    with pytest.raises(ValidationError, match="percentage"):
        cfg(clip_top_percent={"alt": 0})


def test_datacomp_basic_filter():
    t = table(alt_text=["a dog on a couch", "two words", "un chien sur le canapé rouge", "a dog on a couch",
                        "a dog on a couch", "a dog on a couch", None, "a dog on a couch", "a b c", "a dog"],
              lang_alt=["en", "en", "fr", "en", "en", "en", None, "en", "en", "en"],
              original_width=[640, 640, 640, 199, 900, 300, 640, 200, 640, 640],
              original_height=[480, 480, 480, 400, 200, 100, 480, 600, 480, 480])
    out, counts = apply_filters(t, cfg(datacomp_basic=True))
    # two words; French; short side 199; aspect 4.5 (900x200 passes? 4.5 > 3: fails); aspect 3 passes (200x600).
    assert [k for k, v in failed(out).items() if v] == ["001", "002", "003", "004", "005", "006", "009"]
    assert counts["datacomp_basic"] == 7


def test_size_aspect_language_and_nsfw():
    t = table(original_width=[640, 150, 640, 3000] + [640] * 6, original_height=[480, 180, 480, 500] + [480] * 6,
              lang_alt=["en", "en", "pt", "en"] + ["en"] * 6,
              nsfw=pa.array([0.01, 0.01, 0.01, 0.01, 0.95, 0.5] + [0.01] * 4, pa.float32()))
    out, counts = apply_filters(t, cfg(min_size=200, max_aspect=3.0, languages=("en", "de"), nsfw_max=0.5))
    f = failed(out)
    assert f["001"] == ["min_size"] and f["002"] == ["language"] and f["003"] == ["max_aspect"]
    assert f["004"] == ["nsfw"] and f["005"] == []  # 0.5 is allowed
    assert counts == {"status": 0, "min_size": 1, "max_aspect": 1, "language": 1, "nsfw": 1, "selected": 6,
                      "skipped": []}


def test_absent_or_all_null_columns_skip_their_filters_and_are_reported():
    t = pa.table({"key": ["a", "b"], "status": ["ok", "ok"], "clip_alt": pa.array([None, None], pa.float32())})
    q = ScoreConfig(filters={"clip_min": "laion", "clip_top_percent": {"dense": 50}, "datacomp_basic": True,
                               "min_size": 10, "max_aspect": 2, "languages": ["en"], "nsfw_max": 0.5})
    out, counts = apply_filters(t, q)
    assert counts["skipped"] == ["duplicate", "semdedup", "clip_alt_min", "clip_dense_topk", "datacomp_basic",
                                 "min_size", "max_aspect", "language", "nsfw"]
    assert counts["selected"] == 2 and out.column("failed_filters").to_pylist() == [[], []]
    again, _ = apply_filters(out, q)  # re-applying replaces the view columns
    assert again.column_names == out.column_names


def test_filters_do_not_change_the_score_config_hash():
    assert ScoreConfig(filters={"clip_min": "laion", "nsfw_max": 0.1}).config_hash() == ScoreConfig().config_hash()
    assert ScoreConfig(semdedup={"eps": 0.1}, batch_size=4).config_hash() == ScoreConfig().config_hash()
    assert ScoreConfig(nsfw=False).config_hash() != ScoreConfig().config_hash()
    assert ScoreConfig(clip={"backend": "open_clip"}).config_hash() != ScoreConfig().config_hash()
