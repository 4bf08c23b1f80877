"""The demo's inputs (flows/demo.py): distinct photos with a human caption as alt-text, planted exact and near
duplicates that ingest's own image path and dedup flag (and nothing else), the scikit-image fallback, and the
choice of detector and LLM. The whole demo run is timed by hand (see the README), not here."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from flows import demo
from infra.models import ModelUnavailable
from infra.settings import ImageConfig, IngestConfig
from tasks import darknet
from tasks.dedup import find_duplicates
from tasks.images import process_image

pytestmark = pytest.mark.skipif(not (demo.SHARED_PHOTOS / "captions.jsonl").is_file(),
                                reason="../shared/data/photos is not beside the repository")


def test_demo_photos_are_distinct_coco_photos_with_human_alt_texts():
    photos, source = demo.demo_photos(12)
    assert "COCO" in source
    originals = [p for p in photos if not p.planted]
    assert len(originals) == 12 and len({hashlib.sha256(p.data).digest() for p in originals}) == 12
    captions = {json.loads(line)["file"].split("/")[-1]: json.loads(line)["captions"]
                for line in (demo.SHARED_PHOTOS / "captions.jsonl").read_text().splitlines()}
    assert all(p.alt == " ".join(captions[p.name][0].split()) for p in originals)
    assert len({p.name for p in photos}) == len(photos)  # every copy has its own URL
    kinds = sorted(p.planted for p in photos if p.planted)
    assert kinds.count("exact") == 2 and len(kinds) == 5


def test_planted_copies_and_only_they_are_flagged_by_ingest_dedup():
    photos, _ = demo.demo_photos(12)
    processed = [process_image(p.data, ImageConfig()) for p in photos]
    dup = find_duplicates([r.sha256 for r in processed], [r.phash for r in processed],
                          IngestConfig().phash_threshold)
    for i, photo in enumerate(photos):
        if photo.planted:
            assert dup[i] == i - 1, (photo.name, photo.planted)  # points at its original, just before it
            exact = processed[i].sha256 == processed[i - 1].sha256
            assert exact == (photo.planted == "exact"), photo.name
        else:
            assert dup[i] is None, photo.name


def test_fewer_photos_than_planted_copies_and_bad_sizes():
    photos, _ = demo.demo_photos(2)
    assert [p.planted for p in photos] == ["", "", "exact"]
    with pytest.raises(demo.InputError, match="at least 1"):
        demo.demo_photos(0)


def test_without_shared_photos_the_demo_falls_back_to_scikit_image(monkeypatch, tmp_path, capsys):
    if importlib.util.find_spec("skimage") is None:  # its data files only; the library is never imported
        pytest.skip("scikit-image (its sample photos) is not installed")
    monkeypatch.setattr(demo, "SHARED_PHOTOS", tmp_path / "absent")
    photos, source = demo.demo_photos(50)
    assert source == "scikit-image's sample photos"
    assert "scikit-image" in capsys.readouterr().out
    assert sum(not p.planted for p in photos) == len(demo.SKIMAGE_PHOTOS)


def test_the_detector_comes_from_the_models_folder_then_shared_models(monkeypatch, tmp_path, capsys):
    own = tmp_path / "models" / "detector" / "yolox_nano.onnx"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"onnx")
    assert demo.demo_detector(str(tmp_path / "models")) == (["ocr", "objects", "attributes"],
                                                           {"model": str(own.resolve())})
    shared = tmp_path / "shared-models"
    (shared / "detector").mkdir(parents=True)
    (shared / "detector" / "yolox_nano.onnx").write_bytes(b"onnx")
    monkeypatch.setattr(demo, "SHARED_MODELS", shared)
    assert demo.demo_detector(str(tmp_path / "empty"))[1] == {"model": str((shared / "detector" /
                                                                            "yolox_nano.onnx").resolve())}
    monkeypatch.setattr(demo, "SHARED_MODELS", tmp_path / "none")
    try:  # a fresh machine: YOLOv3-tiny from its wheel when installed, else no detector
        darknet.wheel_files()
    except ModelUnavailable:
        assert demo.demo_detector(str(tmp_path / "empty")) == (["ocr"], {})
        assert "OCR only" in capsys.readouterr().out
    else:
        assert demo.demo_detector(str(tmp_path / "empty")) == (["ocr", "objects", "attributes"],
                                                               {"backend": "yolov3-tiny"})
        assert "YOLOv3-tiny" in capsys.readouterr().out
        monkeypatch.setattr(darknet, "WHEEL", "capfactory-test-absent")
        assert demo.demo_detector(str(tmp_path / "empty")) == (["ocr"], {})
        assert "OCR only" in capsys.readouterr().out


def test_the_demo_uses_qwen_when_installed_else_says_how(tmp_path, capsys):
    assert demo.demo_llm(str(tmp_path)) is None
    assert "capfactory models install qwen2.5-1.5b" in capsys.readouterr().out
