"""The detector role: YOLOX-Nano (ONNX Runtime) on real annotated COCO photos, NMS, edge-case images, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.models import Detection, ModelUnavailable, load_backend
from tasks import detect as detect_mod
from tasks.detect import (
    COCO80_LABELS,
    Owlv2Detector,
    YoloxOnnxDetector,
    batched_nms,
    counts,
    nms,
    resize_bilinear,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "detector" / "yolox_nano.onnx"
PHOTOS = SHARED / "data" / "photos"

# (photo, a COCO label with a clear, unoccluded instance there), checked against the COCO boxes below.
KNOWN = [
    ("000000136334.jpg", "person"),
    ("000000192699.jpg", "person"),
    ("000000022192.jpg", "dog"),
    ("000000073326.jpg", "refrigerator"),
    ("000000460229.jpg", "stop sign"),  # portrait photo (383 x 640)
    ("000000519611.jpg", "bear"),
    ("000000423617.jpg", "bus"),
]


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def detector() -> YoloxOnnxDetector:
    assert MODEL.is_file(), f"the shared detector model is missing: {MODEL} (the tests read ../shared/models)"
    return YoloxOnnxDetector(str(MODEL))


@pytest.fixture(scope="module")
def annotations() -> dict[str, dict]:
    rows = [json.loads(line) for line in (PHOTOS / "objects.jsonl").read_text().splitlines() if line.strip()]
    return {Path(r["file"]).name: r for r in rows}


def gt_boxes(row: dict, label: str) -> list[list[float]]:
    return [
        [x, y, x + w, y + h]
        for o in row["objects"]
        if o["label"] == label and not o["iscrowd"]
        for x, y, w, h in [o["bbox_xywh"]]
    ]


def load(name: str) -> Image.Image:
    return Image.open(PHOTOS / "images" / name).convert("RGB")


def test_finds_annotated_objects_in_a_batch_in_order(detector, annotations):
    images = [load(name) for name, _ in KNOWN]
    results = detector.detect(images)
    assert len(results) == len(KNOWN)
    for (name, label), dets in zip(KNOWN, results, strict=True):
        truth = gt_boxes(annotations[name], label)
        assert truth, f"{name} has no COCO {label}"
        best = max((iou(d.box, t) for d in dets if d.label == label for t in truth), default=0.0)
        assert best >= 0.5, f"{name}: no {label} matching a COCO box (best IoU {best:.2f}); got {counts(dets)}"
    # the batch keeps the input order: reversed input, reversed output
    assert detector.detect(images[::-1]) == results[::-1]


def test_detections_are_well_formed(detector, annotations):
    names = sorted(annotations)[:12]
    images = [load(n) for n in names]
    results = detector.detect(images)
    assert sum(len(r) for r in results) > 20
    for im, dets in zip(images, results, strict=True):
        for d in dets:
            assert isinstance(d, Detection)
            assert d.label in COCO80_LABELS
            assert detector.score_threshold <= d.score <= 1.0
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= im.width and 0 <= y0 <= y1 <= im.height
        scores = [d.score for d in dets]
        assert scores == sorted(scores, reverse=True)


def test_nms_removes_same_class_duplicates_on_real_output(annotations):
    low = YoloxOnnxDetector(str(MODEL), score_threshold=0.05, nms_iou=0.45)
    dets = low.detect([load("000000034417.jpg")])[0]  # many donuts and people, low threshold: many overlaps
    assert len(dets) > 10
    for i, a in enumerate(dets):
        for b in dets[i + 1 :]:
            if a.label == b.label:
                assert iou(a.box, b.box) <= 0.45 + 1e-6


def test_nms_unit():
    boxes = np.array(
        [
            [0, 0, 10, 10],
            [1, 1, 11, 11],  # IoU 0.68 with the first: suppressed
            [20, 20, 30, 30],  # disjoint: kept
            [0, 0, 10, 5],  # IoU 0.5 with the first: kept at 0.6, suppressed at 0.45
        ],
        dtype=float,
    )
    scores = np.array([0.9, 0.8, 0.3, 0.7])
    assert nms(boxes, scores, 0.6).tolist() == [0, 3, 2]
    assert nms(boxes, scores, 0.45).tolist() == [0, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    # class-wise: the same box in two classes survives in both
    kept = batched_nms(boxes[[0, 1, 0]], np.array([0.9, 0.8, 0.7]), np.array([0, 0, 5]), 0.45)
    assert sorted(kept.tolist()) == [0, 2]
    with pytest.raises(ValueError):
        nms(boxes, scores[:2], 0.5)


def test_counts():
    dets = [Detection("dog", 0.9, [0, 0, 1, 1]), Detection("person", 0.8, [0, 0, 1, 1]),
            Detection("person", 0.5, [0, 0, 1, 1])]  # fmt: skip
    assert counts(dets) == {"person": 2, "dog": 1}
    assert list(counts(dets)) == ["person", "dog"]
    assert counts([{"label": "cat"}]) == {"cat": 1}
    assert counts([]) == {}


def test_odd_images_do_not_crash(detector):
    photo = load("000000136334.jpg")
    odd = [
        Image.new("RGB", (1, 1), (200, 30, 30)),
        Image.new("RGB", (12000, 300), (90, 120, 200)),
        Image.new("RGB", (300, 12000), (90, 120, 200)),
        Image.new("RGB", (640, 480), (0, 0, 0)),
        photo.convert("L"),
        photo.convert("RGBA"),
        photo.convert("P"),
    ]
    results = detector.detect(odd)
    assert len(results) == len(odd)
    for im, dets in zip(odd, results, strict=True):
        for d in dets:
            assert 0 <= d.box[0] <= d.box[2] <= im.width and 0 <= d.box[1] <= d.box[3] <= im.height
    assert len(results[3]) <= 2  # a black frame: nothing, or next to nothing
    assert "person" in counts(results[4])  # grayscale -> RGB still finds the person
    assert detector.detect([]) == []


def test_numpy_resize_matches_opencv(monkeypatch):
    rgb = np.asarray(load("000000022192.jpg"))
    cv2 = pytest.importorskip("cv2")
    expected = cv2.resize(rgb, (416, 277), interpolation=cv2.INTER_LINEAR)
    monkeypatch.setattr(detect_mod, "_cv2", None)
    got = resize_bilinear(rgb, 416, 277)
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_model_id_and_relative_path_under_models_dir(monkeypatch, detector):
    assert detector.model_id.startswith("yolox-onnx:yolox_nano.onnx@")
    assert len(detector.model_id.rsplit("@", 1)[1]) == 12
    monkeypatch.setenv("CAPFACTORY_MODELS_DIR", str(SHARED / "models"))
    via_dir = YoloxOnnxDetector("detector/yolox_nano.onnx")
    assert via_dir.model_id == detector.model_id
    assert via_dir.session.get_session_options().intra_op_num_threads == 1


def test_registry_builds_yolox_once():
    a = load_backend("detector", "yolox-onnx", model_path=str(MODEL), score_threshold=0.3)
    b = load_backend("detector", "yolox-onnx", model_path=str(MODEL), score_threshold=0.3)
    assert isinstance(a, YoloxOnnxDetector) and a is b


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable) as err:
        YoloxOnnxDetector(str(tmp_path / "nope" / "yolox_nano.onnx"))
    msg = str(err.value)
    assert err.value.role == "detector" and err.value.backend == "yolox-onnx"
    assert "no model file at" in msg and str(tmp_path / "nope") in msg
    assert "CAPFACTORY_MODELS_DIR" in msg and "extract.detector.model" in msg


def test_bad_vocabulary_and_input_size():
    with pytest.raises(ValueError, match="COCO-80"):
        YoloxOnnxDetector(str(MODEL), vocabulary=("unicorn",))
    with pytest.raises(ValueError, match="416"):
        YoloxOnnxDetector(str(MODEL), input_size=640)


def test_vocabulary_filters_labels(annotations):
    only_dogs = YoloxOnnxDetector(str(MODEL), vocabulary=("dog",))
    dets = only_dogs.detect([load("000000022192.jpg")])[0]
    assert dets and {d.label for d in dets} == {"dog"}


def test_owlv2_without_transformers_names_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed, whatever this venv holds
    with pytest.raises(ModelUnavailable) as err:
        Owlv2Detector(vocabulary=("cat", "dog"))
    assert err.value.role == "detector" and err.value.backend == "owlv2"
    assert "capfactory[gpu]" in str(err.value) and "hub" in str(err.value)
