"""Attributes: cheap per-object attributes from pixels and geometry, and CLIP (open_clip) zero-shot tags.

- `object_attributes(image, detections)`: for each detected object, its dominant colour name (pixels inside the box
  mapped to the nearest of 11 basic colour names in CIELAB, achromatic pixels first split into black / gray /
  white by lightness; the most frequent name wins), its size relative to the image (small / medium / large, COCO-like
  area fractions) and its position (the box centre's third of the image: top/middle/bottom - left/center/right).
- `OpenClipScorer`: the `clip` role (`infra.models.ClipScorer`): L2-normalised image and text embeddings and cosine
  scores, from an open_clip model loaded once per process.
- `clip_tags(scorer, images, tags, top_k)`: zero-shot tagging with the prompt "a photo of {tag}".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from infra.models import Detection, ModelUnavailable

log = logging.getLogger(__name__)

# ---- colour names ------------------------------------------------------------------------------------------------

# Chromatic prototypes (sRGB), several per name so that light/dark/saturated variants land on the right name.
_CHROMATIC: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (200, 16, 32), (150, 10, 20), (220, 60, 50), (178, 34, 34)),
    "orange": ((255, 140, 0), (255, 165, 0), (230, 110, 20), (245, 150, 70)),
    "yellow": ((255, 255, 0), (255, 220, 0), (240, 230, 120), (210, 190, 40), (250, 240, 170)),
    "green": ((0, 128, 0), (0, 255, 0), (34, 139, 34), (144, 238, 144), (85, 107, 47), (60, 180, 75), (0, 90, 40),
              (128, 160, 60), (0, 160, 120)),
    "blue": ((0, 0, 255), (0, 0, 128), (30, 60, 200), (70, 130, 180), (135, 206, 235), (0, 160, 230), (25, 25, 112),
             (100, 149, 237), (0, 180, 200), (176, 210, 230)),
    "purple": ((128, 0, 128), (148, 0, 211), (160, 100, 200), (90, 40, 120), (200, 160, 220), (110, 60, 160)),
    "pink": ((255, 192, 203), (255, 105, 180), (230, 50, 140), (240, 150, 170), (255, 0, 255), (200, 100, 130)),
    "brown": ((139, 69, 19), (160, 82, 45), (101, 67, 33), (150, 110, 70), (210, 180, 140), (120, 90, 60),
              (80, 50, 30), (190, 140, 90)),
}  # fmt: skip
COLOR_NAMES: tuple[str, ...] = ("black", "gray", "white", *_CHROMATIC)
ACHROMATIC_CHROMA = 12.0  # C*ab below this: black / gray / white by L*
BLACK_L, WHITE_L = 25.0, 87.0
MAX_COLOR_PIXELS = 96  # boxes are sampled on at most a 96 x 96 grid


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] sRGB (0..255) -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])  # fmt: skip
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PROTO_NAMES = np.array([name for name, protos in _CHROMATIC.items() for _ in protos])
_PROTO_LAB = srgb_to_lab(np.array([p for protos in _CHROMATIC.values() for p in protos]))


def color_names(rgb: np.ndarray) -> np.ndarray:
    """Basic colour name of each [..., 3] sRGB pixel (an array of str, same leading shape)."""
    lab = srgb_to_lab(rgb).reshape(-1, 3)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    d = ((lab[:, None, :] - _PROTO_LAB[None, :, :]) ** 2).sum(-1)
    names = _PROTO_NAMES[d.argmin(1)].astype(object)
    grey = chroma < ACHROMATIC_CHROMA
    light = lab[:, 0]
    names[grey] = np.where(light[grey] < BLACK_L, "black", np.where(light[grey] > WHITE_L, "white", "gray"))
    return names.reshape(np.shape(rgb)[:-1])


def dominant_color(rgb: np.ndarray) -> str:
    """The most frequent colour name among the pixels of an [h, w, 3] region (quantised to 32 levels per channel
    first, so each distinct colour is named once)."""
    px = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    if len(px) == 0:
        return "gray"
    q = (px // 8).astype(np.int32)
    codes, inverse_counts = np.unique(q[:, 0] * 1024 + q[:, 1] * 32 + q[:, 2], return_counts=True)
    centres = np.stack([codes // 1024, (codes // 32) % 32, codes % 32], axis=1) * 8 + 4
    names = color_names(centres)
    totals: dict[str, int] = {}
    for name, n in zip(names, inverse_counts, strict=True):
        totals[name] = totals.get(name, 0) + int(n)
    return max(totals.items(), key=lambda kv: (kv[1], -COLOR_NAMES.index(kv[0])))[0]


# ---- per-object attributes ---------------------------------------------------------------------------------------

SIZE_SMALL, SIZE_MEDIUM = 0.01, 0.10  # box area / image area: < 1 % small, < 10 % medium, else large


def _field(det: Detection | dict, name: str) -> Any:
    return det[name] if isinstance(det, dict) else getattr(det, name)


def relative_size(box: Sequence[float], width: int, height: int) -> str:
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    frac = area / max(width * height, 1)
    return "small" if frac < SIZE_SMALL else "medium" if frac < SIZE_MEDIUM else "large"


def position(box: Sequence[float], width: int, height: int) -> str:
    """'{top|middle|bottom}-{left|center|right}': the third of the image the box centre falls in."""
    cx, cy = (box[0] + box[2]) / 2 / max(width, 1), (box[1] + box[3]) / 2 / max(height, 1)
    horizontal = "left" if cx < 1 / 3 else "center" if cx < 2 / 3 else "right"
    vertical = "top" if cy < 1 / 3 else "middle" if cy < 2 / 3 else "bottom"
    return f"{vertical}-{horizontal}"


def _box_pixels(rgb: np.ndarray, box: Sequence[float], inner: float = 0.8) -> np.ndarray:
    """The central `inner` fraction of the box (less background), sampled on at most a 96 x 96 grid."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * inner, (y1 - y0) * inner
    xa, xb = int(np.clip(np.floor(cx - bw / 2), 0, w - 1)), int(np.clip(np.ceil(cx + bw / 2), 1, w))
    ya, yb = int(np.clip(np.floor(cy - bh / 2), 0, h - 1)), int(np.clip(np.ceil(cy + bh / 2), 1, h))
    xb, yb = max(xb, xa + 1), max(yb, ya + 1)
    sx, sy = max(1, (xb - xa) // MAX_COLOR_PIXELS), max(1, (yb - ya) // MAX_COLOR_PIXELS)
    return rgb[ya:yb:sy, xa:xb:sx]


def object_attributes(image: Image.Image, detections: Sequence[Detection | dict]) -> list[dict]:
    """One dict per detection: {label, score, box, color, size, position}, in the detections' order."""
    if not detections:
        return []
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    width, height = image.size
    out = []
    for det in detections:
        box = [float(v) for v in _field(det, "box")]
        out.append(
            {
                "label": _field(det, "label"),
                "score": float(_field(det, "score")),
                "box": box,
                "color": dominant_color(_box_pixels(rgb, box)),
                "size": relative_size(box, width, height),
                "position": position(box, width, height),
            }
        )
    return out


# ---- CLIP (open_clip) --------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def _hub_offline_mode(enabled: bool) -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; honour the variable as it is now, for this call."""
    if not enabled:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _sha256_prefix(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:12]


class OpenClipScorer:
    """An open_clip model, its preprocessing and tokenizer, loaded once.

    `pretrained`: an open_clip tag (e.g. "laion2b_s34b_b79k": downloaded from the Hugging Face hub on first use, then
    cached; with HF_HUB_OFFLINE=1 only the local cache is used), or a local checkpoint file (a state_dict saved with
    torch.save, or the hub's open_clip_pytorch_model.bin / .safetensors). `pretrained=None` builds the architecture
    with RANDOM weights: only for tests of the plumbing; its scores mean nothing.
    On CPU the process uses `num_threads` torch threads (1 by default: one model per Dask worker process).
    """

    role, backend = "clip", "open_clip"

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "laion2b_s34b_b79k",
        device: str | None = None,
        batch_size: int = 32,
        num_threads: int | None = 1,
        cache_dir: str | None = None,
    ):
        try:
            import open_clip
            import torch
        except ImportError as e:
            raise ModelUnavailable(
                self.role, self.backend, f"{e.name} is not installed; pip install 'capfactory[clip]'"
            ) from None
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu" and num_threads:
            torch.set_num_threads(int(num_threads))
        self.batch_size = int(batch_size)

        weights, source = self._resolve(open_clip, model, pretrained)
        offline = hub_offline()
        try:
            with _hub_offline_mode(offline):
                clip, _, preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=weights, device=self.device, cache_dir=cache_dir
                )
                tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
        except ModelUnavailable:
            raise
        except Exception as e:  # download, checkpoint and config errors come in many types
            how = (
                f"cannot load open_clip model {model!r} with weights {source} ({type(e).__name__}: {e}); "
                "give extract.clip.pretrained as a local checkpoint file, or run where the Hugging Face hub is "
                "reachable (or its cache already holds the weights)"
            )
            if offline:
                how += "; HF_HUB_OFFLINE is set, so only the local cache was tried"
            raise ModelUnavailable(self.role, self.backend, how) from None
        self.model = clip.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.embed_dim = int(getattr(clip.visual, "output_dim", 0)) or int(clip.text_projection.shape[-1])
        self.model_id = f"open_clip:{model}:{source}"
        self._text_cache: dict[str, np.ndarray] = {}

    def _resolve(self, open_clip: Any, model: str, pretrained: str | None) -> tuple[str | None, str]:
        """(what to pass open_clip as `pretrained`, how it is named in model_id)."""
        if model.startswith(("hf-hub:", "local-dir:")):
            return None, model
        if model.replace("/", "-") not in open_clip.list_models():
            raise ModelUnavailable(self.role, self.backend, f"unknown open_clip architecture {model!r}")
        if pretrained is None:
            log.warning("open_clip %s with random weights (pretrained=None): for tests only", model)
            return None, "random-init"
        path = Path(pretrained).expanduser()
        if path.is_file():
            return str(path), f"{path.name}@{_sha256_prefix(path)}"
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained in tags:
            cfg = open_clip.get_pretrained_cfg(model, pretrained)
            if hub_offline() and not cfg.get("hf_hub") and not cfg.get("file"):
                raise ModelUnavailable(
                    self.role,
                    self.backend,
                    f"weights {pretrained!r} of {model} download from a URL, and HF_HUB_OFFLINE is set; "
                    "download the checkpoint elsewhere and give its path as extract.clip.pretrained",
                )
            return pretrained, pretrained
        raise ModelUnavailable(
            self.role,
            self.backend,
            f"{pretrained!r} is neither a checkpoint file nor an open_clip tag for {model} "
            f"(known tags: {', '.join(tags) or 'none'})",
        )

    def _encode(self, items: list, encode: Any) -> np.ndarray:
        torch = self._torch
        chunks = []
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                feats = encode(batch).float()
                chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32)

    def image_embeddings(self, images: list[Image.Image]) -> np.ndarray:
        """[n, d] float32, L2-normalised."""
        torch = self._torch

        def encode(batch: list[Image.Image]) -> Any:
            x = torch.stack([self.preprocess(im if im.mode == "RGB" else im.convert("RGB")) for im in batch])
            return self.model.encode_image(x.to(self.device))

        return self._encode(list(images), encode)

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        """[m, d] float32, L2-normalised; cached per text (tag prompts repeat every batch)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            vecs = self._encode(missing, lambda b: self.model.encode_text(self.tokenizer(b).to(self.device)))
            if len(self._text_cache) + len(missing) > 10_000:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, vecs, strict=True))
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.stack([self._text_cache[t] for t in texts])

    def scores(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """[len(images), len(texts)] cosine similarities in [-1, 1]."""
        sims = self.image_embeddings(images) @ self.text_embeddings(texts).T
        return np.clip(sims, -1.0, 1.0)


def clip_tags(
    scorer: Any,
    images: list[Image.Image],
    tags: Sequence[str],
    top_k: int = 5,
    template: str = "a photo of {tag}",
    logit_scale: float = 100.0,
) -> list[list[tuple[str, float]]]:
    """Zero-shot tags per image: softmax over the tags of `logit_scale` x cosine(image, template(tag)); the `top_k`
    most probable as (tag, probability), most probable first."""
    if not images:
        return []
    if not tags:
        return [[] for _ in images]
    sims = np.asarray(scorer.scores(images, [template.format(tag=t) for t in tags]), dtype=np.float64)
    logits = logit_scale * sims
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(int(top_k), len(tags))
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(tags[i], round(float(row[i]), 6)) for i in order])
    return out
