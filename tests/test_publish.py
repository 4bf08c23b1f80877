"""Publish: the joined table, filters and quarantine as a view, and the release read back by the `webdataset`
library and Hugging Face `datasets`, on COCO photos ingested from a loopback server. The experts, fused,
translated and scores tables are written directly in their contract schemas (their stages have their own tests)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from infra.loopback_server import ImageServer
from infra.settings import (
    DatasetSpec,
    DownloadConfig,
    IngestConfig,
    InputSpec,
    PublishConfig,
    ScoreConfig,
    TranslateConfig,
)
from infra.store import LocalStore
from tasks.experts import experts_schema
from tasks.fuse import FUSED_SCHEMA
from tasks.ingest import dedup_dataset, ingest_shard, plan_ingest
from tasks.semdedup import SEMDEDUP_KEY
from tasks.shards import read_shard_members, stage_key, write_marker
from tasks.validate import quarantine_key

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
HOSTILE = '<script>alert("pwned")</script><img src=x onerror="alert(2)"> a cat'
SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("error", pa.string()), ("clip_alt", pa.float32()),
    ("clip_short", pa.float32()), ("clip_dense", pa.float32()),
    ("clip_translations", pa.list_(pa.struct([("field", pa.string()), ("lang", pa.string()),
                                              ("score", pa.float32())]))),
    ("nsfw", pa.float32()), ("lang_alt", pa.string()), ("lang_alt_prob", pa.float32()), ("lang_short", pa.string()),
    ("lang_dense", pa.string()), ("provenance", pa.map_(pa.string(), pa.string())),
])
TRANSLATED_SCHEMA = pa.schema([
    ("key", pa.string()), ("field", pa.string()), ("lang", pa.string()), ("source_text", pa.string()),
    ("text", pa.string()), ("status", pa.string()), ("qe_passed", pa.bool_()), ("qe_reasons", pa.list_(pa.string())),
    ("qe_lang", pa.string()), ("qe_length_ratio", pa.float32()), ("qe_chrf_roundtrip", pa.float32()),
    ("provenance", pa.map_(pa.string(), pa.string())),
])
QUALITY = ScoreConfig(filters=ScoreConfig.Filters(clip_min={"short": 0.2}))


def _write(store: LocalStore, dataset: str, stage: str, shard: int, table: pa.Table) -> None:
    store.put_parquet(stage_key(dataset, stage, shard, "parquet"), table)
    write_marker(store, dataset, stage, shard, {"shard": shard, "config_hash": "test"})


def copy_raw(store: LocalStore, source: str, dataset: str) -> None:
    for key in store.list(f"{source}/ingest"):
        store.put_bytes(dataset + key[len(source):], store.get_bytes(key))


def add_stages(store: LocalStore, dataset: str, shards: list[int]) -> None:
    """Experts, fused, translated and scores tables for `shards`, and a dataset-wide semdedup table. Scores grow
    with the row number (the first ok row scores 0.15, under the 0.2 minimum); the second ok row has OCR text, a
    flagged and an errored translation; the third is a semantic duplicate of the second."""
    n = 0
    semdedup = []
    for shard in shards:
        raw = store.get_parquet(stage_key(dataset, "ingest", shard, "parquet")).to_pylist()
        experts, fused, translated, scores = [], [], [], []
        for r in raw:
            ok = r["status"] == "ok"
            n += ok
            experts.append({"key": r["key"], "status": "ok" if ok else "skipped",
                            "ocr_text": "STOP" if n == 2 and ok else None,
                            "ocr": [{"text": "STOP", "score": 0.9, "box": [[8, 8], [90, 8], [90, 40], [8, 40]]}]
                            if n == 2 and ok else [],
                            # the detector found objects in some images and none in others
                            "object_counts": [] if n == 4 else [("cat", 1)],
                            "objects": [] if n == 4 else [{"label": "cat", "score": 0.8, "box": [20, 30, 150, 140]}],
                            "provenance": [("ocr", "rapidocr:test")]})
            short = f"A photo number {n}." if ok else r["alt_text"]
            fused.append({"key": r["key"], "status": "ok" if ok else "skipped", "alt_text": r["alt_text"],
                          "caption_short": short, "caption_dense": f"A long detailed photo number {n} caption.",
                          "short_passed": ok, "dense_passed": ok, "provenance": [("llm", "llamacpp:test")]})
            if ok:
                status = {2: "flagged"}.get(n, "ok")
                translated.append({"key": r["key"], "field": "caption_short", "lang": "pt", "source_text": short,
                                   "text": f"Uma foto número {n}.", "status": status, "qe_passed": status == "ok",
                                   "qe_reasons": ["length_ratio"] if status == "flagged" else [],
                                   "provenance": [("backend", "bergamot")]})
                if n == 2:
                    translated.append({"key": r["key"], "field": "caption_short", "lang": "es",
                                       "source_text": short, "text": None, "status": "error",
                                       "qe_passed": False, "qe_reasons": ["error"]})
            scores.append({"key": r["key"], "status": "ok" if ok else "skipped",
                           "clip_alt": 0.3 if ok else None, "clip_short": 0.1 * n + 0.05 if ok else None,
                           "nsfw": 0.05 * n if ok else None, "lang_alt": "en" if ok else None,
                           "provenance": [("clip", "open_clip:test")]})
            semdedup.append({"key": r["key"], "semdedup_cluster": 0,
                             "semdedup_duplicate_of": semdedup[-1]["key"] if n == 3 and ok else None})
        _write(store, dataset, "extract", shard, pa.Table.from_pylist(experts, experts_schema()))
        _write(store, dataset, "fuse", shard, pa.Table.from_pylist(fused, FUSED_SCHEMA))
        _write(store, dataset, "translate", shard, pa.Table.from_pylist(translated, TRANSLATED_SCHEMA))
        _write(store, dataset, "score", shard, pa.Table.from_pylist(scores, SCORES_SCHEMA))
    store.put_parquet(SEMDEDUP_KEY.format(dataset=dataset), pa.Table.from_pylist(semdedup, pa.schema([
        ("key", pa.string()), ("semdedup_cluster", pa.int32()), ("semdedup_duplicate_of", pa.string())])))


def make_store(tmp: Path) -> LocalStore:
    """Dataset `bare` (ingest only): 7 COCO photos (one twice, one with a hostile alt-text) and a URL that fails,
    in 3 shards of 3; dataset `full`: the same raw shards with every later stage."""
    captions = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()][:6]
    images = {Path(c["file"]).name: (PHOTOS / c["file"]).read_bytes() for c in captions}
    with ImageServer(images) as server:
        urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(images)]
        alts = [c["captions"][0].strip() for c in captions]
        alts[3] = HOSTILE
        urls += [server.url(f"/img/6/{next(iter(images))}"), server.url("/fault/not-found-image.jpg")]
        alts += [alts[0], "a photo that never arrives"]
        pq.write_table(pa.table({"url": urls, "caption": alts}), tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=3, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        plan = plan_ingest(store, "bare", [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        for shard in plan.todo:
            ingest_shard(store.uri, "bare", shard, cfg)
    dedup_dataset(store, "bare", cfg.phash_threshold)
    copy_raw(store, "bare", "full")
    add_stages(store, "full", [0, 1, 2])
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LocalStore:
    return make_store(tmp_path_factory.mktemp("publish"))


def publish_inline(store: LocalStore, dataset: str, spec: DatasetSpec) -> dict:
    """The publish flow's steps in this process (the flow itself is tested on a LocalCluster below)."""
    from tasks.publish import finish_publish, plan_publish, publish_shard

    plan = plan_publish(store.uri, dataset, spec)
    stats = [publish_shard(store.uri, dataset, s, plan["plan"], spec.publish) for s in range(plan["shards"])]
    return finish_publish(store.uri, dataset, spec, plan, stats)


def _raw_images(store: LocalStore, dataset: str) -> dict[str, bytes]:
    images = {}
    for key in store.list(f"{dataset}/ingest"):
        if key.endswith(".tar"):
            shard = int(key.rsplit("shard-", 1)[1][:-len(".tar")])
            images |= {n[:-4]: b for n, b in read_shard_members(store, dataset, shard).items() if
                       n.endswith(".jpg")}
    return images


def test_joined_table_has_each_stage_that_ran(store):
    from tasks.publish import joined_table

    full = joined_table(store, "full", drop_failed_translations=True)
    bare = joined_table(store, "bare")
    assert full.num_rows == bare.num_rows == 8
    names = full.column_names
    for col in ("ocr_text", "object_counts", "caption_short", "dense_passed", "translations", "clip_short", "nsfw",
                "lang_alt", "semdedup_duplicate_of", "raw_shard", "provenance"):
        assert col in names, col
    assert names.index("sha256") < names.index("ocr_text") < names.index("caption_short") \
        < names.index("translations") < names.index("clip_short") < names.index("semdedup_duplicate_of")
    for col in ("ocr_text", "caption_short", "translations", "clip_short", "semdedup_duplicate_of"):
        assert col not in bare.column_names, col
    rows = [r for r in full.to_pylist() if r["status"] == "ok"]
    # The flagged translation is dropped with drop_failed, the errored one always; the others are kept.
    assert rows[1]["translations"] == [] and rows[0]["translations"][0]["text"] == "Uma foto número 1."
    kept = joined_table(store, "full").to_pylist()
    assert [t["status"] for t in [r for r in kept if r["status"] == "ok"][1]["translations"]] == ["flagged"]
    assert rows[2]["semdedup_duplicate_of"] == rows[1]["key"]
    prov = dict(rows[0]["provenance"])
    assert prov["fuse.llm"] == "llamacpp:test" and prov["score.clip"] == "open_clip:test"
    assert [r["raw_shard"] for r in full.to_pylist()] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_a_stage_that_ran_on_some_shards_gives_nulls_on_the_others(store, tmp_path):
    from tasks.publish import joined_table

    copy_raw(store, "bare", "half")
    add_stages(store, "half", [1])
    table = joined_table(store, "half")
    by_shard = {s: [r["clip_short"] for r in table.to_pylist() if r["raw_shard"] == s] for s in (0, 1, 2)}
    assert by_shard[0] == [None] * 3 and any(v is not None for v in by_shard[1])
    assert joined_table(store, "half", shards=[0]).num_rows == 3


def test_publish_selected_samples_and_every_row_in_parquet(store, tmp_path):
    import datasets
    import webdataset as wds

    from tasks.publish import joined_table

    all_rows = {r["key"]: r for r in joined_table(store, "full").to_pylist()}
    ok = [k for k, r in all_rows.items() if r["status"] == "ok"]
    # Validation (quarantine mode) set aside one sample in the scores suite and one translation.
    quarantined = ok[4]
    store.put_parquet(quarantine_key("full", "score", 1), pa.table({"key": [quarantined]}))
    store.put_parquet(quarantine_key("full", "translate", 1), pa.table({"key": [ok[5]], "field": ["caption_short"],
                                                                          "lang": ["pt"]}))
    spec = DatasetSpec(name="full", score=QUALITY, publish=PublishConfig(shard_size=2))
    release = publish_inline(store, "full", spec)

    samples = pq.read_table(store.root / "full/publish/samples.parquet").to_pylist()
    assert len(samples) == 8 == release["samples"]
    by_key = {r["key"]: r for r in samples}
    # Not selected: the failed download, the duplicate photo, the low CLIP score, the semantic duplicate and the
    # quarantined row; each says why.
    assert "clip_short_min" in by_key[ok[0]]["failed_filters"]
    assert "semdedup" in by_key[ok[2]]["failed_filters"]
    assert by_key[quarantined]["failed_filters"] == ["quarantined"]
    assert release["filters"]["quarantined"] == 1 and release["filters"]["quarantined_translations"] == 1
    assert by_key[ok[5]]["translations"] == [] and by_key[ok[3]]["translations"][0]["lang"] == "pt"
    assert [r["failed_filters"] for r in samples if r["duplicate_of"]] == [["duplicate"]]
    assert all(not r["selected"] for r in samples if r["status"] != "ok")
    selected = [r["key"] for r in samples if r["selected"]]
    assert selected and all(not r["failed_filters"] for r in samples if r["selected"])
    assert release["selected"] == len(selected)
    assert len(release["shards"]) == (len(selected) + 1) // 2

    # webdataset reads the tars unchanged: keys, captions, metadata, and the raw image bytes untouched.
    urls = [str(store.root / k) for k in release["shards"]]
    raw_images = _raw_images(store, "full")
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        seen[sample["__key__"]] = sample
        assert sample["jpg"] == raw_images[sample["__key__"]]
        assert sample["txt"] == all_rows[sample["__key__"]]["caption_short"]
        assert sample["json"]["selected"] is True and sample["json"]["key"] == sample["__key__"]
    assert seen[ok[3]]["json"]["translations"] == [{"field": "caption_short", "lang": "pt", "status": "ok",
                                                   "text": "Uma foto número 4.", "qe_passed": True, "qe_reasons": []}]
    assert sorted(seen) == sorted(selected)
    # Every JSON field keeps one type across samples: maps are lists of key/value pairs, the empty ones too.
    counts = [sample["json"]["object_counts"] for sample in seen.values()]
    assert [{"key": "cat", "value": 1}] in counts and [] in counts
    pil = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("pil")))
    assert pil["jpg"].size[0] > 0
    assert {p["key"]: p["value"] for p in pil["json"]["provenance"]}["fuse.llm"] == "llamacpp:test"

    # Hugging Face datasets reads both, offline.
    parquet = datasets.load_dataset("parquet", data_files=str(store.root / "full/publish/samples.parquet"),
                                    split="train", cache_dir=str(tmp_path / "hf"))
    assert parquet.num_rows == 8 and sum(parquet["selected"]) == len(selected)
    web = datasets.load_dataset("webdataset", data_files=urls, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(web["__key__"]) == sorted(selected)
    assert isinstance(web[0]["jpg"], Image.Image) and web[0]["txt"]

    card = (store.root / "full/publish/README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["task_categories"][0] == "image-to-text" and header["license"] == "other"
    assert set(header["language"]) == {"en", "pt"} and header["size_categories"] == ["n<1K"]
    assert "| quarantined | 1 |" in card and "open_clip:test" in card and "datasets.load_dataset" in card
    assert json.loads((store.root / "full/publish/_published.json").read_text())["selected"] == len(selected)
    assert not (store.root / "full/publish/_plan.parquet").exists()


def test_ingest_only_dataset_publishes_alt_text(store):
    spec = DatasetSpec(name="bare", publish=PublishConfig(include_unselected_in_parquet=False))
    release = publish_inline(store, "bare", spec)
    samples = pq.read_table(store.root / "bare/publish/samples.parquet").to_pylist()
    assert len(samples) == release["selected"] == 6  # 8 rows less the failed download and the duplicate
    assert "caption_short" not in samples[0] and "skipped" in release["filters"]
    with tarfile.open(store.root / release["shards"][0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    hostile = next(r["key"] for r in samples if r["alt_text"] == HOSTILE)
    assert members[f"{hostile}.txt"].decode() == HOSTILE  # the data is published as it is; the report escapes
    meta = json.loads(members[f"{samples[0]['key']}.json"])
    assert meta["alt_text"] == samples[0]["alt_text"] and "clip_short" not in meta
    assert Image.open(io.BytesIO(members[f"{samples[0]['key']}.jpg"])).size == (samples[0]["width"],
                                                                             samples[0]["height"])
    card = (store.root / "bare/publish/README.md").read_text()
    assert "Stages that ran: ingest." in card and "language:" not in card


def test_republish_replaces_the_release_and_removes_stale_shards(store):
    copy_raw(store, "bare", "again")
    first = publish_inline(store, "again", DatasetSpec(name="again", publish=PublishConfig(shard_size=1)))
    assert len(first["shards"]) == 6 and first["stale_removed"] == []
    tars = sorted(k for k in store.list("again/publish") if k.endswith(".tar"))
    assert tars == first["shards"]
    second = publish_inline(store, "again", DatasetSpec(name="again", publish=PublishConfig(
        shard_size=4, caption_field="caption_dense")))
    assert len(second["shards"]) == 2 and len(second["stale_removed"]) == 4
    assert sorted(k for k in store.list("again/publish") if k.endswith(".tar")) == second["shards"]
    marker = json.loads((store.root / "again/publish/_published.json").read_text())
    assert marker["shards"] == second["shards"] and marker["config_hash"] != first["config_hash"]


def test_a_selected_sample_without_its_image_fails_the_shard(store):
    from tasks.publish import plan_publish, publish_shard

    copy_raw(store, "bare", "broken")
    spec = DatasetSpec(name="broken")
    with tarfile.open(store.root / "broken/ingest/shard-00000.tar", "w"):
        pass  # an empty raw tar: its images are gone
    plan = plan_publish(store.uri, "broken", spec)
    with pytest.raises(RuntimeError, match="no image in their raw tar"):
        publish_shard(store.uri, "broken", 0, plan["plan"], spec.publish)
    assert not store.exists("broken/publish/_published.json")


@pytest.mark.slow
def test_publish_flow_on_a_local_cluster(store):
    from flows.stage import run_stage

    copy_raw(store, "bare", "flow")
    add_stages(store, "flow", [0, 1, 2])
    spec = DatasetSpec(name="flow", score=QUALITY, publish=PublishConfig(shard_size=2))
    result = run_stage("publish", spec.model_copy(update={"store": store.uri}), workers=1)
    assert result["selected"] == 4 and len(result["shards"]) == 2
    assert all(store.exists(k) for k in result["shards"])
    assert pq.read_table(store.root / "flow/publish/samples.parquet").num_rows == 8


def leaked_caption() -> str:
    """A dense caption that starts with a sentence of the prompt template, as SmolLM2 wrote them."""
    from expectations.fuse import template_text

    return next(s for s in template_text()[0] if len(s.split()) >= 8).rstrip(".:") + ": a cat on a sofa."


def test_a_leaked_dense_caption_falls_back_alone_and_the_sample_is_published(store, tmp_path):
    """The fuse suite finds a dense caption that leaks the prompt template (it passed the guards); the dense slot
    falls back to the alt-text, the short caption stays, and the sample is published, not quarantined."""
    import datasets

    from tasks.validate import caption_fallbacks, fallback_key, quarantined_keys, validate_shard

    copy_raw(store, "bare", "leak")
    add_stages(store, "leak", [0, 1, 2])
    key = stage_key("leak", "fuse", 0, "parquet")
    fused = store.get_parquet(key).to_pylist()
    leaked = next(r for r in fused if r["status"] == "ok")
    text = leaked_caption()
    leaked.update(caption_dense=text, dense_passed=True, dense_reasons=[])
    store.put_parquet(key, pa.Table.from_pylist(fused, FUSED_SCHEMA))
    spec = DatasetSpec(name="leak", publish=PublishConfig(caption_field="caption_dense"))

    result = validate_shard(store.uri, "leak", "fuse", 0, spec)
    check = "expect_column_values_to_not_match_regex_list(caption_dense)"
    assert not result["success"] and result["quarantined"] == [] and quarantined_keys(store, "leak") == set()
    assert result["counts"]["caption_fallbacks"] == 1
    assert result["fallbacks"] == [{"key": leaked["key"], "caption": "caption_dense", "text": text,
                                    "reasons": [check]}]
    failed = next(f for f in result["failed"] if f["expectation"] in check)
    assert failed["action"] == "caption fallback" and failed["row_ids"] == [{"key": leaked["key"]}]
    assert caption_fallbacks(store, "leak") == {(leaked["key"], "caption_dense"): [check]}
    assert store.exists(fallback_key("leak", "fuse", 0))

    release = publish_inline(store, "leak", spec)
    assert release["filters"]["caption_fallbacks"] == 1 and release["filters"]["quarantined"] == 0
    row = next(r for r in pq.read_table(store.root / "leak/publish/samples.parquet").to_pylist()
               if r["key"] == leaked["key"])
    assert row["selected"] and row["failed_filters"] == []
    assert row["caption_dense"] == leaked["alt_text"] and row["dense_passed"] is False
    assert row["caption_short"] == leaked["caption_short"] == "A photo number 1." and row["short_passed"]
    assert row["dense_reasons"] == [f"validate: {check}"] and row["short_reasons"] is None
    members = {}
    for tar_key in release["shards"]:
        with tarfile.open(store.root / tar_key) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar}
    meta = json.loads(members[f"{leaked['key']}.json"])
    assert meta["caption_dense"] == leaked["alt_text"] and meta["caption_short"] == "A photo number 1."
    assert meta["dense_passed"] is False and meta["dense_reasons"] == [f"validate: {check}"]
    assert members[f"{leaked['key']}.txt"].decode() == leaked["alt_text"]  # caption_field: caption_dense
    assert text not in b"".join(members.values()).decode("utf-8", "replace")
    card = (store.root / "leak/publish/README.md").read_text()
    assert "Validation also set aside 1 captions (back to the alt-text)" in card
    web = datasets.load_dataset("webdataset", data_files=[str(store.root / k) for k in release["shards"]],
                                split="train", cache_dir=str(tmp_path / "hf"))
    assert leaked["key"] in web["__key__"]

    # Without the fallback (a re-validated shard whose caption is fixed) the fused caption is published again.
    leaked.update(caption_dense="A long detailed photo number 1 caption.")
    store.put_parquet(key, pa.Table.from_pylist(fused, FUSED_SCHEMA))
    assert validate_shard(store.uri, "leak", "fuse", 0, spec)["success"]
    assert caption_fallbacks(store, "leak") == {} and not store.exists(fallback_key("leak", "fuse", 0))


def late_values_store(tmp: Path, filled_from: int = 7) -> LocalStore:
    """Dataset `late`: 9 distinct COCO photos in one raw shard; the first `filled_from - 1` samples have no OCR
    text, objects, tags, synthetic caption, input warning, CLIP score, language or translations (null or empty
    strings, floats, lists, maps and nested fields), the later ones have them all."""
    captions = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()][:9]
    images = {Path(c["file"]).name: (PHOTOS / c["file"]).read_bytes() for c in captions}
    with ImageServer(images) as server:
        urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(images)]
        pq.write_table(pa.table({"url": urls, "caption": [c["captions"][0].strip() for c in captions]}),
                       tmp / "late.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=16, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        for shard in plan_ingest(store, "late", [InputSpec(path=str(tmp / "late.parquet"))], cfg).todo:
            ingest_shard(store.uri, "late", shard, cfg)
    dedup_dataset(store, "late", cfg.phash_threshold)
    key = stage_key("late", "ingest", 0, "parquet")
    raw = store.get_parquet(key).to_pylist()
    assert [r["status"] for r in raw] == ["ok"] * 9
    for n, r in enumerate(raw, 1):
        r["input_warning"] = "caption truncated" if n >= filled_from else None
    store.put_parquet(key, pa.Table.from_pylist(raw, store.get_parquet(key).schema))
    experts, fused, translated, scores = [], [], [], []
    for n, r in enumerate(raw, 1):
        late = n >= filled_from
        experts.append({"key": r["key"], "status": "ok", "ocr_text": "STOP" if late else None,
                        "ocr": [{"text": "STOP", "score": 0.9, "box": [[8, 8], [90, 8], [90, 40], [8, 40]]}]
                        if late else [],
                        "objects": [{"label": "dog", "score": 0.7, "box": [1, 2, 3, 4], "color": "brown"}]
                        if late else [],
                        "object_counts": [("dog", 1 + n)] if late else [], "caption_synthetic": f"synthetic {n}"
                        if late else None, "tags": [{"tag": "outdoor", "score": 0.6}] if late else None,
                        "provenance": [("ocr", "rapidocr:test")] + ([("tagger", "ram:test")] if late else [])})
        fused.append({"key": r["key"], "status": "ok", "alt_text": r["alt_text"], "caption_short": f"Photo {n}.",
                      "caption_dense": f"A long photo {n}.", "short_passed": True, "dense_passed": not late,
                      "dense_reasons": ["too_long"] if late else [], "provenance": [("llm", "llamacpp:test")]})
        if late:
            translated.append({"key": r["key"], "field": "caption_short", "lang": "pt", "source_text": f"Photo {n}.",
                               "text": f"Foto {n}.", "status": "flagged", "qe_passed": False,
                               "qe_reasons": ["length_ratio"], "provenance": [("backend", "bergamot")]})
        scores.append({"key": r["key"], "status": "ok", "clip_short": 0.25 + n / 100 if late else None,
                       "lang_alt": "en" if late else None, "provenance": [("clip", "open_clip:test")]})
    _write(store, "late", "extract", 0, pa.Table.from_pylist(experts, experts_schema()))
    _write(store, "late", "fuse", 0, pa.Table.from_pylist(fused, FUSED_SCHEMA))
    _write(store, "late", "translate", 0, pa.Table.from_pylist(translated, TRANSLATED_SCHEMA))
    _write(store, "late", "score", 0, pa.Table.from_pylist(scores, SCORES_SCHEMA))
    return store


def test_fields_null_in_the_first_samples_and_filled_later_load_everywhere(tmp_path):
    """HF `datasets`' webdataset loader infers KEY.json's types from the first 5 samples of the first tar: a field
    null or empty there and filled later (a string, a float, lists, a map, fields nested in lists) used to fail
    the load (`Couldn't cast array of type string to null`); a map's keys seen later were silently dropped."""
    import datasets
    import webdataset as wds

    store = late_values_store(tmp_path)
    spec = DatasetSpec(name="late", translate=TranslateConfig(drop_failed=False))
    release = publish_inline(store, "late", spec)
    assert release["selected"] == 9 and release["untyped_fields"] == []
    urls = [str(store.root / k) for k in release["shards"]]
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert len(samples) == 9
    metas = [s["json"] for s in samples.values()]
    # One JSON type per field in every sample (null aside): the release keeps its nulls and its empty lists.
    for field in metas[0]:
        kinds = {type(m[field]).__name__ for m in metas} - {"NoneType"}
        assert len(kinds) <= 1, (field, kinds)
        assert all(field in m for m in metas)
    early = [m for m in metas if m["ocr_text"] is None]
    late = [m for m in metas if m["ocr_text"] is not None]
    assert len(early) == 6 and len(late) == 3
    assert all(m["clip_short"] is None and m["objects"] == [] and m["tags"] is None for m in early)
    assert all(m["input_warning"] is None and m["object_counts"] == [] for m in early)
    dogs = {m["key"]: m for m in late}
    for m in late:
        assert m["ocr_text"] == "STOP" and m["caption_synthetic"].startswith("synthetic") and m["clip_short"] > 0.25
        assert m["objects"][0]["label"] == "dog" and m["tags"] == [{"tag": "outdoor", "score": pytest.approx(0.6)}]
        assert m["translations"][0]["qe_reasons"] == ["length_ratio"] and m["dense_reasons"] == ["too_long"]
        assert [p["key"] for p in m["object_counts"]] == ["dog"]
    assert {p["value"] for m in late for p in m["object_counts"]} == {8, 9, 10}

    # The webdataset loader, as users call it (types inferred from the tars alone), and the published folder.
    web = datasets.load_dataset("webdataset", data_files=str(store.root / "late/publish/shard-*.tar"),
                                split="train", cache_dir=str(tmp_path / "hf"))
    assert web.num_rows == 9
    rows = {r["__key__"]: r["json"] for r in web}
    for key, meta in dogs.items():
        row = rows[key]
        assert row["ocr_text"] == "STOP" and row["input_warning"] == "caption truncated"
        assert row["clip_short"] == pytest.approx(meta["clip_short"]) and row["lang_alt"] == "en"
        assert row["objects"][0]["color"] == "brown" and row["translations"][0]["text"] == meta["translations"][0][
            "text"]
        assert row["object_counts"] == meta["object_counts"] and row["dense_reasons"] == ["too_long"]
        assert dict((p["key"], p["value"]) for p in row["provenance"])["extract.tagger"] == "ram:test"
    assert sum(r["clip_short"] is None for r in rows.values()) == 6  # nulls stay null
    folder = datasets.load_dataset(str(store.root / "late/publish"), split="train", cache_dir=str(tmp_path / "hf2"))
    assert folder.num_rows == 9 and sum(r["json"]["ocr_text"] == "STOP" for r in folder) == 3
    parquet = datasets.load_dataset("parquet", data_files=str(store.root / "late/publish/samples.parquet"),
                                    split="train", cache_dir=str(tmp_path / "hf"))
    assert parquet.num_rows == 9 and sum(v is None for v in parquet["clip_short"]) == 6
    assert sorted(parquet.features) == sorted(folder[0]["json"]) == sorted(rows[next(iter(dogs))])
    # Maps are lists of key/value pairs in both (the Parquet's int32 counts are int64 when inferred from JSON).
    assert set(parquet.features["object_counts"].feature) == set(folder.features["json"]["object_counts"].feature)


def test_type_witnesses_cover_every_path_or_name_the_rest():
    """The set cover behind the release order: unselected rows never count, nested paths do, and paths that no
    5 samples can show together are named (the card then tells users to pass `features`)."""
    from tasks.publish import dataset_card, type_witnesses

    item = pa.struct([("text", pa.string()), ("score", pa.float32())])
    schema = pa.schema([("selected", pa.bool_()), *((f"f{j}", pa.string()) for j in range(7)),
                        ("items", pa.list_(item))])
    rows = [{"selected": False, **{f"f{j}": "x" for j in range(7)}, "items": [{"text": "a", "score": 1.0}]}]
    rows += [{"selected": True, f"f{i}": "x", "items": []} for i in range(7)]
    rows += [{"selected": True, "items": [{"text": None, "score": float("nan")}]},
             {"selected": True, "f0": "x", "f1": "y", "items": [{"text": "b", "score": None}]}]
    chosen, untyped = type_witnesses(pa.Table.from_pylist(rows, schema))
    # Row 9 shows f0, f1 and the list items' text; f2..f5 take one row each, and f6 is left.
    assert chosen == [9, 3, 4, 5, 6] and untyped == {"f6"}
    # A NaN or a null inside a list item shows no type: no row fills the items' score, so none is needed.
    chosen, untyped = type_witnesses(pa.Table.from_pylist(rows[8:], schema))
    assert chosen == [1] and untyped == set()
    assert type_witnesses(pa.Table.from_pylist(rows[:1], schema)) == ([], set())
    table = pa.table({"key": ["a"], "provenance": pa.array([[]], pa.map_(pa.string(), pa.string()))})
    plan = {"selected": 1, "samples": 1, "shards": 1, "filters": {}, "untyped": ["f6"]}
    assert "No 5 samples show the type of f6: pass `features`" in dataset_card("d", table, plan, DatasetSpec(name="d"))
