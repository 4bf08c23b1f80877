"""Detector accuracy and speed on the annotated COCO val2017 photos in shared/data/photos.

What it measures (for `YoloxOnnxDetector`, the cpu profile's detector):
- mAP@0.5: detections at a low score threshold (`--map-threshold`, default 0.01), per class ranked by score over all
  images and matched greedily (best-IoU unmatched ground truth of the same class, IoU >= 0.5) -> precision/recall
  curve -> AP by all-point interpolation (VOC2010+/COCO style: area under the monotone precision envelope);
  averaged over the classes that have ground truth. `iscrowd` boxes are not ground truth: a detection that
  matches none but covers a crowd box (intersection / detection area >= 0.5) is ignored, neither TP nor FP.
  A class with ground truth and no detections has AP 0.
- precision and recall at the default threshold (DetectorConfig: 0.3), same matching.
- speed: images/s of `detect()` on decoded images (median of `--repeats` passes, one image per call, as the stage
  calls it with one ONNX run per image), and images/s including JPEG decode.
- the pipeline path, for each `--pipeline` setting: the photos served by a loopback HTTP server, crawled by ingest
  with default settings except the analysis copy (`default`: as shipped; `none`: no analysis copy, as before it
  existed, so the detector reads the 256 px training copy; a number: `analysis_size`), then the extract stage
  (objects expert; the detector's score threshold set to `--map-threshold` so that mAP sees the same low-score
  detections as the bare engine's) and the boxes of its table (in the original image's pixels): what
  `capfactory extract` gives (bench/expert_path.py). Same scoring as the bare engine.

Run:  .venv/bin/python bench/detect_eval.py [--model PATH] [--photos DIR] [--pipeline default,none]
      [--out bench/results/detect_eval.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_info  # noqa: E402
from bench.expert_path import describe, image_settings, ingest_and_extract  # noqa: E402
from infra.models import Detection  # noqa: E402
from infra.settings import DetectorConfig, ExtractConfig  # noqa: E402
from tasks.detect import YoloxOnnxDetector  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_PHOTOS = SHARED / "data" / "photos"
DEFAULT_MODEL = SHARED / "models" / "detector" / "yolox_nano.onnx"
IOU_MATCH = 0.5


def load_annotations(photos: Path) -> list[dict]:
    rows = [json.loads(line) for line in (photos / "objects.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        gt = [(o["label"], _xywh_to_xyxy(o["bbox_xywh"]), bool(o.get("iscrowd"))) for o in r["objects"]]
        r["gt"] = gt
    return rows


def _xywh_to_xyxy(b: list[float]) -> list[float]:
    x, y, w, h = b
    return [x, y, x + w, y + h]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, m] IoU of boxes a [n, 4] and b [m, 4] (x0, y0, x1, y1)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def ioa(dets: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """[n, m] intersection over the detection's area (COCO's overlap with crowd regions)."""
    if len(dets) == 0 or len(crowd) == 0:
        return np.zeros((len(dets), len(crowd)))
    ix0 = np.maximum(dets[:, None, 0], crowd[None, :, 0])
    iy0 = np.maximum(dets[:, None, 1], crowd[None, :, 1])
    ix1 = np.minimum(dets[:, None, 2], crowd[None, :, 2])
    iy1 = np.minimum(dets[:, None, 3], crowd[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    return inter / np.maximum(area[:, None], 1e-9)


def match_image(dets: list, gt: list) -> dict[str, list[tuple[float, int]]]:
    """Per class: (score, outcome) per detection, outcome 1 = TP, 0 = FP, -1 = ignored (crowd)."""
    out: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for label in {d.label for d in dets}:
        ds = sorted((d for d in dets if d.label == label), key=lambda d: -d.score)
        boxes = np.array([d.box for d in ds], dtype=np.float64)
        g = np.array([b for lab, b, crowd in gt if lab == label and not crowd], dtype=np.float64).reshape(-1, 4)
        c = np.array([b for lab, b, crowd in gt if lab == label and crowd], dtype=np.float64).reshape(-1, 4)
        ious, over_crowd = iou_matrix(boxes, g), ioa(boxes, c)
        taken = np.zeros(len(g), dtype=bool)
        for i, d in enumerate(ds):
            cand = np.where(~taken & (ious[i] >= IOU_MATCH), ious[i], -1.0) if len(g) else np.array([])
            if len(cand) and cand.max() >= IOU_MATCH:
                taken[int(cand.argmax())] = True
                out[label].append((d.score, 1))
            elif len(c) and over_crowd[i].max() >= IOU_MATCH:
                out[label].append((d.score, -1))
            else:
                out[label].append((d.score, 0))
    return out


def average_precision(outcomes: list[tuple[float, int]], n_gt: int) -> float:
    """All-point interpolated AP from (score, TP/FP) pairs over all images."""
    if n_gt == 0:
        return float("nan")
    scored = sorted((o for o in outcomes if o[1] >= 0), key=lambda o: -o[0])
    if not scored:
        return 0.0
    tp = np.cumsum([o[1] for o in scored])
    fp = np.cumsum([1 - o[1] for o in scored])
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, 1e-9)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def evaluate(rows: list[dict], detections: list[list]) -> dict:
    per_class: dict[str, list[tuple[float, int]]] = defaultdict(list)
    n_gt: dict[str, int] = defaultdict(int)
    for r, dets in zip(rows, detections, strict=True):
        for label, _, crowd in r["gt"]:
            if not crowd:
                n_gt[label] += 1
        for label, outs in match_image(dets, r["gt"]).items():
            per_class[label].extend(outs)
    aps = {label: average_precision(per_class.get(label, []), n) for label, n in sorted(n_gt.items())}
    tp = sum(o == 1 for outs in per_class.values() for _, o in outs)
    fp = sum(o == 0 for outs in per_class.values() for _, o in outs)
    total_gt = sum(n_gt.values())
    return {
        "map50": float(np.mean(list(aps.values()))) if aps else float("nan"),
        "ap50_per_class": aps,
        "gt_per_class": dict(sorted(n_gt.items())),
        "gt_boxes": total_gt,
        "classes_with_gt": len(n_gt),
        "tp": tp,
        "fp": fp,
        "ignored": sum(o == -1 for outs in per_class.values() for _, o in outs),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / total_gt if total_gt else float("nan"),
    }


def timed_passes(det: YoloxOnnxDetector, images: list[Image.Image], repeats: int) -> list[float]:
    det.detect(images[:2])  # warm-up
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for im in images:
            det.detect([im])
        secs.append(time.perf_counter() - t0)
    return secs


def pipeline_scores(setting: str, rows: list[dict], photos: Path, model: Path, low: float, threshold: float) -> dict:
    """mAP and P/R at `threshold` of the extract table's detections, the photos ingested with `setting`."""
    files = [photos / r["file"] for r in rows]
    extract = ExtractConfig(experts=("objects",), detector={"model": str(model), "score_threshold": low})
    run = ingest_and_extract(files, extract, str(model.parent), image_settings(setting))
    dets = [[Detection(o["label"], o["score"], o["box"]) for o in run["rows"][f]["objects"] or []] for f in files]
    at_low = evaluate(rows, dets)
    at_default = evaluate(rows, [[d for d in ds if d.score >= threshold] for ds in dets])
    return {"setting": setting, "system": describe(setting), "map50": at_low["map50"],
            "precision_at_threshold": at_default["precision"], "recall_at_threshold": at_default["recall"],
            "tp_at_threshold": at_default["tp"], "fp_at_threshold": at_default["fp"],
            "tar_bytes": run["tar_bytes"], "training_copy_images": run["training_copy_images"],
            "extract_s": run["extract_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    ap.add_argument("--threshold", type=float, default=DetectorConfig().score_threshold)
    ap.add_argument("--map-threshold", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pipeline", default="default,none",
                    help="ingest image settings to run the pipeline path with (default | none | analysis_size)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "detect_eval.json")
    args = ap.parse_args(argv)

    rows = load_annotations(args.photos)
    t0 = time.perf_counter()
    images = [Image.open(args.photos / r["file"]).convert("RGB") for r in rows]
    decode_s = time.perf_counter() - t0
    cfg = DetectorConfig()
    low = YoloxOnnxDetector(str(args.model), score_threshold=args.map_threshold, nms_iou=cfg.nms_iou)
    default = YoloxOnnxDetector(str(args.model), score_threshold=args.threshold, nms_iou=cfg.nms_iou)

    at_low = evaluate(rows, [low.detect([im])[0] for im in images])
    at_default = evaluate(rows, [default.detect([im])[0] for im in images])
    secs = timed_passes(default, images, args.repeats)
    detect_s = statistics.median(secs)
    pipeline = [pipeline_scores(x.strip(), rows, args.photos, args.model, args.map_threshold, args.threshold)
                for x in args.pipeline.split(",") if x.strip()]

    result = {
        "model_id": default.model_id,
        "providers": default.providers,
        "images": len(rows),
        "gt_boxes": at_low["gt_boxes"],
        "crowd_boxes": sum(crowd for r in rows for *_, crowd in r["gt"]),
        "classes_with_gt": at_low["classes_with_gt"],
        "map50": at_low["map50"],
        "map_score_threshold": args.map_threshold,
        "score_threshold": args.threshold,
        "nms_iou": cfg.nms_iou,
        "precision_at_threshold": at_default["precision"],
        "recall_at_threshold": at_default["recall"],
        "tp_at_threshold": at_default["tp"],
        "fp_at_threshold": at_default["fp"],
        "ms_per_image": 1000 * detect_s / len(images),
        "images_per_s": len(images) / detect_s,
        "images_per_s_with_decode": len(images) / (detect_s + decode_s),
        "detect_pass_seconds": secs,
        "ap50_per_class": at_low["ap50_per_class"],
        "gt_per_class": at_low["gt_per_class"],
        "pipeline": pipeline,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"detector {result['model_id']} on {result['providers'][0]}; {len(rows)} photos, "
        f"{result['gt_boxes']} boxes ({result['crowd_boxes']} crowd ignored), {result['classes_with_gt']} classes"
    )
    print(f"{'metric':<34} {'value':>10}")
    print(f"{'-' * 34} {'-' * 10}")
    table = [
        (f"mAP@0.5 (dets >= {args.map_threshold})", f"{result['map50']:.3f}"),
        (f"precision @ score >= {args.threshold}, IoU 0.5", f"{result['precision_at_threshold']:.3f}"),
        (f"recall @ score >= {args.threshold}, IoU 0.5", f"{result['recall_at_threshold']:.3f}"),
        ("TP / FP at threshold", f"{result['tp_at_threshold']} / {result['fp_at_threshold']}"),
        ("ms per image (detect)", f"{result['ms_per_image']:.1f}"),
        ("images/s (detect)", f"{result['images_per_s']:.1f}"),
        ("images/s (decode + detect)", f"{result['images_per_s_with_decode']:.1f}"),
    ]
    for name, value in table:
        print(f"{name:<34} {value:>10}")
    print(f"\n{'system (mAP and P/R as above)':<48} {'mAP@0.5':>8} {'P':>6} {'R':>6} {'TP/FP':>9}")
    print(f"{'bare engine on the original files':<48} {result['map50']:>8.3f} "
          f"{result['precision_at_threshold']:>6.3f} {result['recall_at_threshold']:>6.3f} "
          f"{result['tp_at_threshold']:>4}/{result['fp_at_threshold']:<4}")
    for p in pipeline:
        print(f"{p['system']:<48} {p['map50']:>8.3f} {p['precision_at_threshold']:>6.3f} "
              f"{p['recall_at_threshold']:>6.3f} {p['tp_at_threshold']:>4}/{p['fp_at_threshold']:<4}")
    worst = sorted(result["ap50_per_class"].items(), key=lambda kv: kv[1])[:5]
    print("lowest AP classes: " + ", ".join(f"{k} {v:.2f} (n={result['gt_per_class'][k]})" for k, v in worst))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
