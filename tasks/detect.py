"""Object detection: the `detector` role of the vision experts.

Two backends behind `infra.models.Detector` (`model_id`, `detect(images) -> list[list[Detection]]`):

- `YoloxOnnxDetector` (cpu profile): YOLOX-Nano, COCO-80 classes, exported to ONNX, run by ONNX Runtime with one
  intra-op and one inter-op thread (Dask runs one model per worker process; parallelism comes from the workers).
  Pre/post-processing follows the upstream YOLOX demo: BGR, letterbox into the top-left of a square canvas filled
  with 114, no normalisation; grid decode over strides 8/16/32, score = objectness x class probability, boxes
  divided by the letterbox ratio, class-wise NMS.
- `Owlv2Detector` (gpu profile): OWLv2 open-vocabulary detection through `transformers`, over a configured
  vocabulary (COCO-80 names by default); weights from the Hugging Face hub or a local folder.

Plain helpers: `nms` (greedy IoU suppression, numpy) and `counts` (label -> number of detections).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from infra.models import Detection, ModelUnavailable

try:  # optional: exact INTER_LINEAR resize (installed with rapidocr); numpy fallback otherwise
    import cv2 as _cv2
except ImportError:  # pragma: no cover - depends on the environment
    _cv2 = None

log = logging.getLogger(__name__)

COCO80_LABELS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

YOLOX_STRIDES = (8, 16, 32)
LETTERBOX_FILL = 114
MAX_CANDIDATES = 4000  # (box, class) pairs kept for NMS, by score; bounds the work at very low thresholds


# ---- plain helpers --------------------------------------------------------------------------------------------


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one [x0, y0, x1, y1] box against an [n, 4] array."""
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: Any, scores: Any, iou: float = 0.45) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the boxes kept, highest score first.

    A box is dropped when its IoU with an already kept, higher-scoring box is above `iou`.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms: {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Class-wise NMS in one pass: boxes of different classes are shifted apart so they never overlap."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(boxes.max() - min(boxes.min(), 0.0)) + 1.0
    shifted = boxes + (classes.astype(np.float64) * span)[:, None]
    return nms(shifted, scores, iou)


def counts(detections: Iterable[Detection | dict]) -> dict[str, int]:
    """Label -> number of detections (most frequent first), e.g. {"person": 3, "dog": 1}."""
    labels = [d["label"] if isinstance(d, dict) else d.label for d in detections]
    return dict(Counter(labels).most_common())


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_model_path(path: str | Path, models_dir: str | Path | None = None) -> Path:
    """A model file given as an absolute path, a path from the working directory, or a path under the models
    folder (`models_dir`, default `CAPFACTORY_MODELS_DIR` / Settings.models_dir)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    if models_dir is None:
        from infra.settings import Settings

        models_dir = Settings().models_dir
    return Path(models_dir).expanduser() / p


def _rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


# ---- YOLOX on ONNX Runtime -------------------------------------------------------------------------------------


def yolox_grid(input_size: int, strides: Sequence[int] = YOLOX_STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """(grid [n, 2] of cell x, y; stride [n, 1]) for every output row, in the model's output order."""
    grids, expanded = [], []
    for stride in strides:
        cells = input_size // stride
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([xs, ys], axis=-1).reshape(-1, 2)
        grids.append(grid)
        expanded.append(np.full((len(grid), 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(expanded).astype(np.float32)


def resize_bilinear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of an [h, w, c] uint8 array without anti-aliasing, OpenCV INTER_LINEAR's convention: the
    resize YOLOX was trained with. Pillow's BILINEAR filters over the whole footprint when shrinking, which cost
    this model about 2 points of mAP@0.5 on the COCO photos. Uses OpenCV when installed (it comes with rapidocr),
    else numpy (within 1 grey level of OpenCV)."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    if _cv2 is not None:
        return _cv2.resize(img, (width, height), interpolation=_cv2.INTER_LINEAR)

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(np.intp)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    fy, fx = fy[:, None, None], fx[None, :, None]
    rows = img[y0] * (1 - fy) + img[y1] * fy  # [height, w, c] float32
    out = rows[:, x0] * (1 - fx) + rows[:, x1] * fx
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """YOLOX pre-processing: BGR, resized by `ratio` into the top-left of a size x size canvas of 114; CHW float32
    in 0..255. Returns (tensor [3, size, size], ratio)."""
    h, w = rgb.shape[:2]
    ratio = min(size / h, size / w)
    nw, nh = max(1, min(size, int(w * ratio))), max(1, min(size, int(h * ratio)))
    resized = resize_bilinear(rgb, nw, nh)
    canvas = np.full((size, size, 3), LETTERBOX_FILL, dtype=np.uint8)
    canvas[:nh, :nw] = resized[:, :, ::-1]  # RGB -> BGR
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), ratio


def yolox_postprocess(
    raw: np.ndarray,
    ratio: float,
    width: int,
    height: int,
    *,
    grid: np.ndarray,
    strides: np.ndarray,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image's raw output [n, 5 + classes] -> (boxes [k, 4] in image pixels, scores [k], classes [k]).

    Every (box, class) pair whose objectness x class score passes the threshold is a candidate (class-aware, as
    in YOLOX's `multiclass_nms_class_aware`); NMS runs per class; the best `max_detections` are kept.
    """
    xy = (raw[:, :2] + grid) * strides
    wh = np.exp(np.clip(raw[:, 2:4], None, 30.0)) * strides
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1) / ratio
    scores = raw[:, 4:5] * raw[:, 5:]
    rows, cls = np.nonzero(scores > score_threshold)
    cand_scores = scores[rows, cls]
    if len(cand_scores) > MAX_CANDIDATES:
        top = np.argpartition(-cand_scores, MAX_CANDIDATES)[:MAX_CANDIDATES]
        rows, cls, cand_scores = rows[top], cls[top], cand_scores[top]
    cand_boxes = clip_boxes(boxes[rows].astype(np.float64), width, height)
    keep = batched_nms(cand_boxes, cand_scores, cls, nms_iou)[:max_detections]
    return cand_boxes[keep], cand_scores[keep].astype(np.float64), cls[keep]


class YoloxOnnxDetector:
    """YOLOX (COCO-80) exported to ONNX, on ONNX Runtime: CPU, or CUDA first when onnxruntime-gpu offers it.

    `model_path`: the .onnx file; a relative path is looked up from the working directory, then under the models
    folder (`CAPFACTORY_MODELS_DIR`). `vocabulary`, when not empty, keeps only those COCO labels.
    """

    role, backend = "detector", "yolox-onnx"

    def __init__(
        self,
        model_path: str = "detector/yolox_nano.onnx",
        score_threshold: float = 0.3,
        nms_iou: float = 0.45,
        input_size: int = 416,
        vocabulary: Sequence[str] = (),
        max_detections: int = 100,
        device: str | None = None,
        models_dir: str | None = None,
    ):
        path = resolve_model_path(model_path, models_dir)
        if not path.is_file():
            raise ModelUnavailable(
                self.role,
                self.backend,
                f"no model file at {path}; put yolox_nano.onnx under the models folder (CAPFACTORY_MODELS_DIR) "
                "or set extract.detector.model",
            )
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelUnavailable(
                self.role, self.backend, "onnxruntime is not installed; pip install 'capfactory[experts]'"
            ) from None
        unknown = sorted(set(vocabulary) - set(COCO80_LABELS))
        if unknown:
            raise ValueError(f"yolox-onnx detects only COCO-80 labels; not among them: {unknown}")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt/unsupported files
            raise ModelUnavailable(self.role, self.backend, f"cannot load {path}: {e}") from None

        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.max_batch = fixed_batch or 64  # a fixed batch dim (1 for the stock export) means one image per run
        fixed_size = inp.shape[2] if isinstance(inp.shape[2], int) else None
        if fixed_size is not None and fixed_size != input_size:
            raise ValueError(f"input_size {input_size} does not match the model's fixed input size {fixed_size}")
        out_shape = self.session.get_outputs()[0].shape
        n_classes = out_shape[-1] - 5 if isinstance(out_shape[-1], int) else len(COCO80_LABELS)
        if n_classes != len(COCO80_LABELS):
            raise ValueError(f"{path} predicts {n_classes} classes; this backend expects COCO-80")

        self.path = path
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.input_size = int(input_size)
        self.max_detections = int(max_detections)
        self.labels = COCO80_LABELS
        self.allowed = np.array([lab in set(vocabulary) for lab in COCO80_LABELS]) if vocabulary else None
        self.grid, self.strides = yolox_grid(self.input_size)
        self.providers = self.session.get_providers()
        self.model_id = f"yolox-onnx:{path.name}@{file_sha256(path)[:12]}"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        """Detections per image, in the input order; boxes [x0, y0, x1, y1] in the image's pixels."""
        prepared = [letterbox(_rgb_array(im), self.input_size) for im in images]
        results: list[list[Detection]] = []
        for start in range(0, len(prepared), self.max_batch):
            chunk = prepared[start : start + self.max_batch]
            raw = self._infer(np.stack([t for t, _ in chunk]))
            for j, (_, ratio) in enumerate(chunk):
                im = images[start + j]
                boxes, scores, classes = yolox_postprocess(
                    raw[j],
                    ratio,
                    im.width,
                    im.height,
                    grid=self.grid,
                    strides=self.strides,
                    score_threshold=self.score_threshold,
                    nms_iou=self.nms_iou,
                    max_detections=self.max_detections,
                )
                if self.allowed is not None:
                    ok = self.allowed[classes]
                    boxes, scores, classes = boxes[ok], scores[ok], classes[ok]
                results.append(
                    [
                        Detection(self.labels[c], round(float(s), 5), [round(float(v), 2) for v in b])
                        for b, s, c in zip(boxes, scores, classes, strict=True)
                    ]
                )
        return results


# ---- OWLv2 via transformers (gpu profile) ------------------------------------------------------------------------


class Owlv2Detector:
    """OWLv2 open-vocabulary detector (`transformers` Owlv2Processor + Owlv2ForObjectDetection).

    `model`: a hub id (downloaded by transformers into its cache; set HF_HUB_OFFLINE=1 to forbid that) or a local
    folder saved with `save_pretrained`. Each vocabulary entry is queried as "a photo of a {label}"; the label is
    reported as given. Boxes come back normalised to the padded square input, so they are scaled by max(w, h) of the
    original image (independent of the transformers version's own post-processing) and clipped to the image.
    """

    role, backend = "detector", "owlv2"

    def __init__(
        self,
        model: str = "google/owlv2-base-patch16-ensemble",
        vocabulary: Sequence[str] = (),
        score_threshold: float = 0.1,
        nms_iou: float = 0.3,
        device: str | None = None,
        batch_size: int = 8,
        prompt: str = "a photo of a {label}",
        max_detections: int = 100,
    ):
        try:
            import torch
            from transformers import Owlv2ForObjectDetection, Owlv2Processor
        except ImportError as e:
            raise ModelUnavailable(
                self.role,
                self.backend,
                f"{e.name or 'transformers'} is not installed; pip install 'capfactory[gpu]' (transformers, torch); "
                f"the weights ({model}) come from the Hugging Face hub or a local folder (extract.detector.model)",
            ) from None
        self.vocabulary = tuple(vocabulary) or COCO80_LABELS
        self.queries = [prompt.format(label=v) for v in self.vocabulary]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        local = Path(model).expanduser()
        source = str(local) if local.exists() else model
        try:
            self.processor = Owlv2Processor.from_pretrained(source)
            self.model = Owlv2ForObjectDetection.from_pretrained(source).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise ModelUnavailable(
                self.role,
                self.backend,
                f"cannot load {model!r} ({e}); give a hub id reachable from this machine, or a local folder "
                "with the processor and model files (save_pretrained) in extract.detector.model",
            ) from None
        self._torch = torch
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.batch_size = int(batch_size)
        self.max_detections = int(max_detections)
        revision = getattr(self.model.config, "_commit_hash", None) or "local"
        self.model_id = f"owlv2:{model}@{str(revision)[:12]}"

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        torch = self._torch
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") if im.mode != "RGB" else im for im in images[start : start + self.batch_size]]
            inputs = self.processor(text=[self.queries] * len(batch), images=batch, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                out = self.model(**inputs)
            logits = out.logits.float().cpu().numpy()  # [b, patches, queries]
            pred = out.pred_boxes.float().cpu().numpy()  # [b, patches, 4] cx, cy, w, h in 0..1 of the padded square
            for im, lg, pb in zip(batch, logits, pred, strict=True):
                cls = lg.argmax(-1)
                scores = 1.0 / (1.0 + np.exp(-lg.max(-1)))
                ok = scores > self.score_threshold
                side = max(im.width, im.height)
                cx, cy, w, h = (pb[ok] * side).T
                boxes = clip_boxes(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), *im.size)
                s, c = scores[ok], cls[ok]
                keep = batched_nms(boxes, s, c, self.nms_iou)[: self.max_detections]
                results.append(
                    [
                        Detection(self.vocabulary[c[k]], round(float(s[k]), 5), [round(float(v), 2) for v in boxes[k]])
                        for k in keep
                    ]
                )
        return results
