"""The OCR expert: text lines (text, score, quadrilateral) read from images, in reading order.

Two backends (registered in `infra.models.BACKENDS["ocr"]`), both built once per worker process by the registry as
`Class(min_score=, lang=, model_dir=)`, both satisfying `infra.models.OCRBackend`:

- `RapidOCRBackend` ("rapidocr", the cpu profile's default; also takes `gate_side=`): `rapidocr_onnxruntime.RapidOCR`,
  i.e. PaddleOCR's
  PP-OCRv4 det + rec (Chinese/English recogniser) and the mobile text-line direction classifier, exported to ONNX and
  shipped inside the wheel, run by ONNX Runtime on CPU with one intra-op thread per session (Dask runs one
  single-threaded worker per core). Nothing is downloaded. `model_dir` may name a folder of other PP-OCR ONNX
  exports (`*det*.onnx`, `*rec*.onnx`, optional `*cls*.onnx` and a `*dict*.txt`/`*keys*.txt` character list, needed
  when the recogniser does not carry its characters in its metadata). Without `model_dir`, `lang` must be one the
  shipped recogniser reads ("en", "ch", "zh"); anything else is a `ModelUnavailable`, not a silent misread.
  The text gate (`gate_side` > 0): the DB detector's cost grows with pixels and RapidOCR scales every input's short
  side up to 736 px, so a 640x480 photo is detected at 981x736. Where the full detector scales an image up that
  much, the gate first runs the same detector on a copy whose long side is `gate_side` (never smaller than the image
  itself nor than 2/3 of the full detector's input; no gate where that would cost over half the full detection, e.g.
  1280x720 frames and 2048 px analysis copies, so small text in large images is found as before; see `_gate_size`)
  and counts a box scoring >= 0.2 (the full detector keeps >= 0.5) as text; where it finds none, the full read
  (detection at full size, classifier, recogniser) is skipped and the tile reads as no text. Where it finds text, the
  full read runs exactly as without the gate, so those images read the same.
- `PaddleOCRBackend` ("paddleocr", the gpu profile's default): PaddleOCR 3.x (`paddleocr.PaddleOCR(...).predict`),
  its models from its hub or from `model_dir` (sub-folders for det / rec / optional text-line orientation).

Both share one path around the engine (`_OCRBase.read`): the image becomes an RGB array; images with a side under
8 px give an empty result; very long images (aspect ratio above 8, e.g. 12000x300 panoramas) are cut into
overlapping tiles along their long side so the text keeps its resolution; each tile is scaled into the size range
the engine handles (small images also get a replicated-edge border, see `_fit`); the engine reads it;
`_to_lines` maps the boxes back to the input image's coordinates, drops lines under `min_score` or with empty text;
lines found twice in a tile overlap are de-duplicated; `reading_order` sorts them. A failure on one image is
logged and gives that image an empty result; the other images of the batch are unaffected.

`ocr_words` is the tokenisation the tests and `bench/ocr_eval.py` use for word-level scores.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from infra.models import ModelUnavailable, OCRLine, OCRResult

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 8  # images with a smaller side are not read at all (empty result)
TILE_TRIGGER_ASPECT = 8.0  # longer/shorter side above this: cut into tiles
TILE_ASPECT = 4  # a tile is TILE_ASPECT short sides long and overlaps its neighbour by one short side
MAX_TILES = 12  # beyond this many, tiles get longer instead of more numerous
SMALL_IMAGE, BORDER = 64, 32  # images with a side under SMALL_IMAGE px get a border of up to BORDER px (see `_fit`)
RAPIDOCR_LANGS = frozenset({"en", "ch", "zh"})  # what the wheel's PP-OCRv4 recogniser reads (Chinese + Latin/ASCII)
# The text gate (RapidOCR, `gate_side`): the DB detector alone, on a smaller copy, before the full read
DET_MIN_SIDE = 736  # RapidOCR 1.4.4's det: limit_type "min", limit_side_len 736 (short side scaled up to 736)
# the gate's copy is never smaller than the image itself nor than 1/GATE_MAX_SHRINK of what the full detector sees,
# so small text stays found: at 1/2, ICDAR2015 img_363's text vanished from the gate (dev split, bench/ocr_eval.py
# --gates), and a 45x25 px ICDAR word pasted into a 2048 px photo vanished at 2/3 of the full detector's size
GATE_MAX_SHRINK = 1.5
GATE_MAX_COST = 0.5  # a gate over this share of the full detector's pixels saves too little: the full read runs
GATE_BOX_THRESH = 0.2  # box score the gate counts as text; under the full detector's 0.5, so the gate errs to "read"

RawLine = tuple[str, float, Any]  # (text, score, quadrilateral as 4 [x, y]) in the engine input's coordinates


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- geometry ---------------------------------------------------------------------------------------------------

def _centre_and_height(box: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    pts = np.asarray(box, dtype=np.float64)
    cx, cy = pts.mean(axis=0)
    # mean length of the left and right edges (tl-bl, tr-br); the bbox height for degenerate quads
    height = (np.linalg.norm(pts[0] - pts[3]) + np.linalg.norm(pts[1] - pts[2])) / 2
    if height <= 0:
        height = pts[:, 1].max() - pts[:, 1].min()
    return float(cx), float(cy), float(height)


def reading_order(lines: Iterable[OCRLine]) -> list[OCRLine]:
    """Top to bottom by box centre, grouping lines whose vertical centres are within half a line height, then left
    to right inside each group."""
    items = sorted(((*_centre_and_height(ln.box), ln) for ln in lines), key=lambda t: (t[1], t[0]))
    rows: list[list[tuple[float, float, float, OCRLine]]] = []
    for item in items:
        if rows:
            row = rows[-1]
            row_cy = sum(t[1] for t in row) / len(row)
            row_h = sum(t[2] for t in row) / len(row)
            if abs(item[1] - row_cy) <= 0.5 * (row_h + item[2]) / 2:
                row.append(item)
                continue
        rows.append([item])
    return [t[3] for row in rows for t in sorted(row, key=lambda t: min(p[0] for p in t[3].box))]


def _plan_tiles(length: int, short: int) -> list[tuple[int, int]]:
    """[start, end) spans along the long side: one span, or overlapping tiles for very elongated images."""
    if length <= TILE_TRIGGER_ASPECT * short:
        return [(0, length)]
    overlap, size = short, TILE_ASPECT * short
    stride = size - overlap
    if 1 + math.ceil((length - size) / stride) > MAX_TILES:
        stride = math.ceil((length - overlap) / MAX_TILES)
        size = stride + overlap
    starts = sorted({min(k * stride, length - size) for k in range(math.ceil((length - overlap) / stride))})
    return [(s, s + size) for s in starts]


def _fit(array: np.ndarray, min_side: int, max_side: int) -> tuple[np.ndarray, float, int]:
    """The engine's input for one tile, and how to map its coordinates back: (array, scale, border).

    - scaled so the short side is >= min_side unless that pushes the long side over max_side (the long side is
      always <= max_side);
    - a small image (short side < SMALL_IMAGE px: word crops, thumbnails, thin banners) gets a border of up to
      BORDER px of replicated edge pixels on every side: text touching the image edge is otherwise often missed by
      the detector (ICDAR2015 word crops, dev split: 1/10 read without it, 4/10 with it);
    - a short side still under min_side, or under 1/TILE_ASPECT of the long side, is padded (black) at the bottom or
      right, which moves no coordinates: the detectors scale the short side up to a fixed size (RapidOCR: 736 px),
      so a 30x900 strip would otherwise become a 736x22000 input.
    """
    h, w = array.shape[:2]
    scale = 1.0
    if min(h, w) < min_side:
        scale = min_side / min(h, w)
    if max(h, w) * scale > max_side:
        scale = max_side / max(h, w)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.BILINEAR
        array = np.asarray(Image.fromarray(array).resize(size, resample, reducing_gap=None if scale > 1 else 2.0))
    border = 0
    if min(h, w) < SMALL_IMAGE:
        border = min(min(array.shape[:2]), BORDER)
        array = np.pad(array, ((border, border), (border, border), (0, 0)), mode="edge")
    h2, w2 = array.shape[:2]
    short = max(min_side, math.ceil(max(h2, w2) / TILE_ASPECT))
    if min(h2, w2) < short:
        padded = np.zeros((max(h2, short) if h2 < w2 else h2, w2 if h2 < w2 else max(w2, short), 3), array.dtype)
        padded[:h2, :w2] = array
        array = padded
    return array, scale, border


def _gate_size(h: int, w: int, gate_side: int) -> tuple[int, int] | None:
    """(height, width) of the text gate's input for an engine input of h x w, or None: no gate, the full read.

    The full detector scales the short side up to DET_MIN_SIDE (a 640x480 photo is read at 981x736). The gate reads
    a copy with a long side of gate_side px, but never smaller than the image itself (small text keeps its pixels)
    nor than 1/GATE_MAX_SHRINK of the full detector's input; in multiples of 32, as the DB network needs. Where that
    is over GATE_MAX_COST of the full detector's pixels (images the full detector barely or does not scale up, such
    as 1280x720 frames or 2048 px analysis copies), there is no gate."""
    full = max(1.0, DET_MIN_SIDE / min(h, w))  # the full detector's scale
    scale = min(full, max(gate_side / max(h, w), full / GATE_MAX_SHRINK, 1.0))
    if (scale / full) ** 2 > GATE_MAX_COST:
        return None
    return max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32)


def _to_lines(
    raw: Iterable[RawLine],
    *,
    min_score: float,
    size: tuple[int, int],
    scale: float = 1.0,
    border: int = 0,
    offset: tuple[int, int] = (0, 0),
) -> list[OCRLine]:
    """Engine output -> OCRLines in the input image's coordinates (the one conversion path of every backend):
    a point (x, y) of the engine's input is ((x - border) / scale + offset_x, ...), clipped to the image `size`."""
    (ox, oy), (w, h) = offset, size
    out = []
    for text, score, quad in raw:
        text, score = str(text).strip(), float(score)
        if not text or not score >= min_score:  # `not >=` also drops NaN scores
            continue
        pts = np.asarray(quad, dtype=np.float64).reshape(-1, 2)
        if pts.shape[0] != 4:  # a polygon from a curved-text model: its bounding rectangle
            x0, y0 = pts.min(axis=0)
            x1, y1 = pts.max(axis=0)
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        pts = (pts - border) / scale + (ox, oy)
        pts[:, 0] = pts[:, 0].clip(0, w)
        pts[:, 1] = pts[:, 1].clip(0, h)
        out.append(OCRLine(text=text, score=score, box=[[round(float(x), 2), round(float(y), 2)] for x, y in pts]))
    return out


def _bbox(line: OCRLine) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in line.box], [p[1] for p in line.box]
    return min(xs), min(ys), max(xs), max(ys)


def _dedupe_tiles(found: list[tuple[int, bool, OCRLine]]) -> list[OCRLine]:
    """Lines read in two overlapping tiles: keep one (not cut by a tile edge first, then the larger, then the more
    confident); lines from the same tile are never merged."""
    def area(b: tuple[float, float, float, float]) -> float:
        return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])

    boxes = [_bbox(ln) for _, _, ln in found]
    order = sorted(range(len(found)), key=lambda i: (found[i][1], -area(boxes[i]), -found[i][2].score))
    kept: list[int] = []
    for i in order:
        bi = boxes[i]
        for j in kept:
            if found[j][0] == found[i][0]:
                continue
            bj = boxes[j]
            inter = area((max(bi[0], bj[0]), max(bi[1], bj[1]), min(bi[2], bj[2]), min(bi[3], bj[3])))
            if inter > 0.5 * max(1e-6, min(area(bi), area(bj))):
                break
        else:
            kept.append(i)
    return [found[i][2] for i in sorted(kept)]


def _rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


# ---- the shared backend path ------------------------------------------------------------------------------------

class _OCRBase:
    """Everything but the engine call: tiling, scaling, coordinate mapping, filtering, de-duplication, ordering."""

    model_id: str
    min_score: float
    min_side: int  # the engine's input size range (see `_fit`)
    max_side: int

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the engines keep per-call state; one call at a time per backend instance

    def _recognise(self, bgr: np.ndarray) -> list[RawLine]:
        raise NotImplementedError

    def read(self, images: list[Image.Image]) -> list[OCRResult]:
        return [self._read_one(image) for image in images]

    def _read_one(self, image: Image.Image) -> OCRResult:
        try:
            return OCRResult(self._lines(image))
        except Exception:  # one weird image must not fail the batch; it is logged and reads as "no text"
            logger.warning("OCR failed on a %s image of size %s", getattr(image, "mode", "?"),
                           getattr(image, "size", "?"), exc_info=True)
            return OCRResult()

    def _lines(self, image: Image.Image) -> list[OCRLine]:
        w, h = image.size
        if min(w, h) < MIN_IMAGE_SIDE:
            return []
        rgb = _rgb_array(image)
        horizontal = w >= h
        length = max(w, h)
        spans = _plan_tiles(length, min(w, h))
        found: list[tuple[int, bool, OCRLine]] = []
        for k, (a, b) in enumerate(spans):
            tile = rgb[:, a:b] if horizontal else rgb[a:b, :]
            offset = (a, 0) if horizontal else (0, a)
            fitted, scale, border = _fit(np.ascontiguousarray(tile), self.min_side, self.max_side)
            with self._lock:
                raw = self._recognise(np.ascontiguousarray(fitted[:, :, ::-1]))
            margin = max(2.0, 2.0 / scale)
            for line in _to_lines(raw, min_score=self.min_score, size=(w, h), scale=scale, border=border,
                                  offset=offset):
                x0, y0, x1, y1 = _bbox(line)
                lo, hi = (x0, x1) if horizontal else (y0, y1)
                cut = (a > 0 and lo <= a + margin) or (b < length and hi >= b - margin)  # touches an inner tile edge
                found.append((k, cut, line))
        lines = _dedupe_tiles(found) if len(spans) > 1 else [line for _, _, line in found]
        return reading_order(lines)


# ---- RapidOCR (cpu profile) ---------------------------------------------------------------------------------------

def _one(folder: Path, patterns: tuple[str, ...], what: str, required: bool = True) -> Path | None:
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(found) == 1:
        return found[0]
    if not found and not required:
        return None
    names = ", ".join(p.name for p in found) or "none"
    raise ModelUnavailable("ocr", "rapidocr", f"ocr.model_dir {folder} needs exactly one {what} "
                                              f"({' or '.join(patterns)}); found: {names}")


class RapidOCRBackend(_OCRBase):
    """PP-OCRv4 (ONNX, inside the `rapidocr-onnxruntime` wheel) on ONNX Runtime, CPU, one thread per session."""

    min_side, max_side = 30, 2000  # RapidOCR's own min_side_len / max_side_len, so its resizing never kicks in

    def __init__(self, min_score: float = 0.5, lang: str = "en", model_dir: str | None = None, gate_side: int = 0):
        super().__init__()
        try:
            from rapidocr_onnxruntime import RapidOCR
            from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess
        except ImportError as e:
            raise ModelUnavailable("ocr", "rapidocr", "pip install 'capfactory[experts]' (rapidocr-onnxruntime==1.4.4 "
                                                      f"+ onnxruntime; Python < 3.13) [{e}]") from None
        import cv2

        # One single-threaded backend per worker process: OpenCV's own thread pool would oversubscribe the cores.
        cv2.setNumThreads(1)
        self.min_score, self.lang = float(min_score), lang
        options: dict[str, Any] = {}
        model = "PP-OCRv4"
        if model_dir is not None:
            folder = Path(model_dir).expanduser()
            if not folder.is_dir():
                raise ModelUnavailable("ocr", "rapidocr", f"ocr.model_dir {folder} is not a folder (it should hold "
                                                          "PP-OCR ONNX exports: *det*.onnx, *rec*.onnx)")
            det, rec = _one(folder, ("*det*.onnx",), "detector"), _one(folder, ("*rec*.onnx",), "recogniser")
            cls = _one(folder, ("*cls*.onnx",), "direction classifier", required=False)
            keys = _one(folder, ("*dict*.txt", "*keys*.txt"), "character dictionary", required=False)
            options.update(det_model_path=str(det), rec_model_path=str(rec))
            if cls is not None:
                options["cls_model_path"] = str(cls)
            if keys is not None:
                options["rec_keys_path"] = str(keys)
            model = f"{folder.name}:{det.stem}+{rec.stem}"
        elif lang not in RAPIDOCR_LANGS:
            raise ModelUnavailable(
                "ocr", "rapidocr",
                f"lang {lang!r}: the rapidocr-onnxruntime wheel ships only the Chinese/English PP-OCRv4 recogniser "
                f"(lang one of {sorted(RAPIDOCR_LANGS)}); give PP-OCR ONNX models for {lang!r} in ocr.model_dir, or "
                "use the paddleocr backend")
        # text_score=0: the engine keeps every line and `_to_lines` applies min_score (one filter, ours).
        self.engine = RapidOCR(text_score=0.0, intra_op_num_threads=1, inter_op_num_threads=1, **options)
        self.model_id = f"rapidocr-onnxruntime=={_version('rapidocr-onnxruntime')}/{model}"
        self.gate_side = int(gate_side)
        det = self.engine.text_det
        self._gate_post = DBPostProcess(thresh=det.postprocess_op.thresh, box_thresh=GATE_BOX_THRESH,
                                        unclip_ratio=det.postprocess_op.unclip_ratio, use_dilation=True)
        # engine inputs per outcome: "gated" (the gate saw no text: no full detection, classifier or recogniser),
        # "passed" (it saw text: the full read), "read" (no gate: the full read); for the tests and bench/ocr_eval.py
        self.counts: Counter[str] = Counter()

    def _has_text(self, bgr: np.ndarray, size: tuple[int, int]) -> bool:
        """The text gate: the engine's DB detector on a copy of `size` (from `_gate_size`); any box scoring at least
        GATE_BOX_THRESH counts as text."""
        import cv2

        det = self.engine.text_det
        h, w = size
        small = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA if w < bgr.shape[1] else cv2.INTER_LINEAR)
        x = ((small.astype(np.float32) / 255 - det.mean) / det.std).transpose(2, 0, 1)[None].astype(np.float32)
        boxes, _ = self._gate_post(det.infer(x)[0], (h, w))
        return len(boxes) > 0

    def _recognise(self, bgr: np.ndarray) -> list[RawLine]:
        size = _gate_size(*bgr.shape[:2], self.gate_side) if self.gate_side else None
        if size is not None and not self._has_text(bgr, size):
            self.counts["gated"] += 1
            return []
        self.counts["read" if size is None else "passed"] += 1
        result, _ = self.engine(bgr)  # an ndarray is taken as BGR, as cv2 would have read it
        return [(text, score, box) for box, text, score in (result or [])]


# ---- PaddleOCR 3.x (gpu profile) ------------------------------------------------------------------------------

PADDLE_HOW = ("pip install 'capfactory[gpu]' (paddleocr 3.x + paddlepaddle-gpu) and give models via ocr.model_dir "
              "or network access to its hub")


def _paddle_subdir(root: Path, keys: tuple[str, ...]) -> Path | None:
    """The sub-folder of `root` named like one of `keys` ("det", "PP-OCRv5_server_det", "en_..._rec_infer")."""
    hits = sorted(p for p in root.iterdir() if p.is_dir() and any(
        p.name == k or p.name.endswith(f"_{k}") or f"_{k}_" in p.name for k in keys))
    if len(hits) > 1:
        raise ModelUnavailable("ocr", "paddleocr", f"ocr.model_dir {root} has several {keys[0]} model folders "
                                                   f"({', '.join(p.name for p in hits)}); keep one")
    return hits[0] if hits else None


class PaddleOCRBackend(_OCRBase):
    """PaddleOCR 3.x pipeline (text detection + recognition [+ text-line orientation]); GPU when Paddle sees one."""

    min_side, max_side = 32, 4000  # PaddleOCR's own det max_side_limit is 4000

    def __init__(self, min_score: float = 0.5, lang: str = "en", model_dir: str | None = None):
        super().__init__()
        try:
            from paddleocr import PaddleOCR
        except ImportError as e:
            raise ModelUnavailable("ocr", "paddleocr", f"{PADDLE_HOW} [{e}]") from None
        self.min_score, self.lang = float(min_score), lang
        options: dict[str, Any] = {
            "use_doc_orientation_classify": False,  # whole-page deskew/unwarp: for scanned documents, not photos
            "use_doc_unwarping": False,
            "text_rec_score_thresh": 0.0,  # `_to_lines` applies min_score
            "cpu_threads": 1,  # only used when Paddle runs on CPU
        }
        if model_dir is None:
            options.update(lang=lang, use_textline_orientation=True)
            model = f"lang={lang}"
        else:
            root = Path(model_dir).expanduser()
            if not root.is_dir():
                raise ModelUnavailable("ocr", "paddleocr", f"ocr.model_dir {root} is not a folder; {PADDLE_HOW}")
            det, rec = _paddle_subdir(root, ("det",)), _paddle_subdir(root, ("rec",))
            ori = _paddle_subdir(root, ("textline_ori", "textline_orientation", "cls"))
            if det is None or rec is None:
                raise ModelUnavailable("ocr", "paddleocr", f"ocr.model_dir {root} needs a text detection and a text "
                                                           "recognition model folder (e.g. det/ and rec/, or "
                                                           "PP-OCRv5_server_det/ and en_PP-OCRv5_mobile_rec/)")
            options.update(text_detection_model_dir=str(det), text_recognition_model_dir=str(rec),
                           use_textline_orientation=ori is not None)
            if ori is not None:
                options["textline_orientation_model_dir"] = str(ori)
            model = f"{det.name}+{rec.name}"
        try:
            self.engine = PaddleOCR(**options)
        except Exception as e:  # no model on disk and no hub, a broken paddle install, ...
            raise ModelUnavailable("ocr", "paddleocr", f"{PADDLE_HOW} [{type(e).__name__}: {e}]") from e
        self.model_id = f"paddleocr=={_version('paddleocr')}/{model}"

    def _recognise(self, bgr: np.ndarray) -> list[RawLine]:
        raw: list[RawLine] = []
        for res in self.engine.predict(bgr):  # an ndarray is taken as BGR
            raw.extend(zip(res["rec_texts"], res["rec_scores"], res["rec_polys"], strict=False))
        return raw


# ---- evaluation helper ------------------------------------------------------------------------------------------

def _edge(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"  # punctuation or symbol


def ocr_words(text: str) -> list[str]:
    """Words for evaluation: split on whitespace, punctuation/symbols stripped at both ends, casefolded."""
    words = []
    for token in text.split():
        start, end = 0, len(token)
        while start < end and _edge(token[start]):
            start += 1
        while end > start and _edge(token[end - 1]):
            end -= 1
        if start < end:
            words.append(token[start:end].casefold())
    return words
