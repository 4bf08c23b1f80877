"""Image validation and transformation: magic bytes, bounded decode, EXIF transpose, resize, re-encode, hashes.

`process_image` is the per-sample hot path of ingest; it does one decode (at reduced scale when the target
size allows, JPEG draft mode) and derives everything else from that decoded image.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageOps

from infra.settings import ImageConfig

# We enforce cfg.max_image_pixels from the header, before decoding. Pillow's own process-wide limit stays on (a
# backstop for every other Pillow user in the worker): images above 2 x Image.MAX_IMAGE_PIXELS are refused by open().
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_ENCODE = {"jpg": ("JPEG", "jpg"), "webp": ("WEBP", "webp"), "png": ("PNG", "png")}
# Source formats whose bytes can be stored as they came (the experts and every image reader decode them), by ext.
_AS_IS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# The longest side of a re-encoded analysis copy when analysis_size is 0 (originals of other formats): WebP's limit.
ANALYSIS_MAX_SIDE = 16383
_ORIENTATION_SWAPS = {5, 6, 7, 8}
# Fitting the short side of a thin image (50000x2) to image_size would ask for a 6.4M x 256 output: gigabytes, and
# beyond what JPEG (65500) or WebP (16383) can encode. The long side of an output is capped at this x image_size.
MAX_OUTPUT_ASPECT = 50


class ImageError(Exception):
    def __init__(self, error_class: str, message: str, status: str = "error"):
        super().__init__(message)
        self.error_class = error_class
        self.status = status


@dataclass(slots=True)
class ProcessedImage:
    data: bytes  # the training copy: re-encoded, or the original bytes when no transform was needed
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str  # of the original bytes
    phash: str  # 16 hex digits
    source_format: str
    original_bytes: int
    # The analysis copy the experts read (None: analysis off, or identical to the training copy) and how it was
    # made: "original" (the bytes as they came), "resized" (re-encoded within the bound), "training" (the same
    # bytes as the training copy, stored once) or None (analysis off).
    analysis: bytes | None = None
    analysis_ext: str | None = None
    analysis_kind: str | None = None


def sniff(data: bytes) -> str | None:
    """The image format from magic bytes, 'html'/'text' for markup, or None."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "avif" if data[8:12].startswith(b"avi") else "heic"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<svg")):
        return "svg" if b"<svg" in head else "html"
    if head.startswith((b"<", b"{", b"[")):
        return "text"
    return None


def target_size(w: int, h: int, cfg: ImageConfig) -> tuple[int, int]:
    """Output size before any crop/pad, following img2dataset's resize modes."""
    size, mode = cfg.image_size, cfg.resize_mode
    if mode == "no":
        return w, h
    # keep_ratio / center_crop fit the smaller side; keep_ratio_largest / border fit the larger side.
    scale = size / min(w, h) if mode in ("keep_ratio", "center_crop") else size / max(w, h)
    # Bounded before any decode: the long side (see MAX_OUTPUT_ASPECT) and the pixel count (the input's limit).
    scale = min(scale, size * MAX_OUTPUT_ASPECT / max(w, h), (cfg.max_image_pixels / (w * h)) ** 0.5)
    if cfg.resize_only_if_bigger and scale >= 1:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


@cache
def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m.astype(np.float32)


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash (DCT of a 32x32 grey thumbnail, low 8x8 frequencies against their median)."""
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    d = _dct_matrix()
    low = (d @ grey @ d.T)[:8, :8].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def phash_hex(value: int) -> str:
    return f"{value:016x}"


def analysis_target(w: int, h: int, cfg: ImageConfig) -> tuple[int, int]:
    """Size of a re-encoded analysis copy: the longest side within the bound, never upscaled; a thin image keeps
    at least one pixel across."""
    bound = cfg.analysis_size or ANALYSIS_MAX_SIDE
    scale = min(1.0, bound / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def keeps_original(kind: str, w: int, h: int, cfg: ImageConfig) -> bool:
    """Whether the original bytes serve as the analysis copy: a format every reader decodes, within the bound
    (EXIF rotation and colour modes are applied when the copy is decoded, see `decode_rgb`)."""
    return kind in _AS_IS and (cfg.analysis_size == 0 or max(w, h) <= cfg.analysis_size)


def decode_rgb(data: bytes) -> Image.Image:
    """A stored image (training or analysis copy) as the viewer sees it: EXIF-rotated, RGB, alpha on white."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.format in ("JPEG", "TIFF", "WEBP", "PNG") and img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def _encode(img: Image.Image, cfg: ImageConfig) -> bytes:
    fmt, _ = _ENCODE[cfg.encode_format]
    buf = io.BytesIO()
    params = {"quality": cfg.encode_quality} if fmt in ("JPEG", "WEBP") else {}
    try:
        img.save(buf, fmt, **params)
    except (OSError, ValueError) as e:  # e.g. a "no" resize_mode side beyond the encoder's limit
        raise ImageError("encode_error", f"cannot encode {img.width}x{img.height} as {fmt}: {e}") from None
    return buf.getvalue()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit greyscale (PNG/TIFF): scale to 8 bits; convert("RGB") would clip every value above 255 to white.
        img = img.convert("I").point(lambda v: v / 257).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _scale(img: Image.Image, cfg: ImageConfig, original: tuple[int, int]) -> Image.Image:
    """Scale to the size computed from the original (`img` may be a reduced-scale JPEG draft).
    Downscaling uses area averaging (BOX), as img2dataset does with cv2.INTER_AREA; upscaling uses Lanczos."""
    tw, th = target_size(*original, cfg)
    if (tw, th) == img.size:
        return img
    resample = Image.Resampling.LANCZOS if tw > img.width else Image.Resampling.BOX
    return img.resize((tw, th), resample)


def _crop_or_pad(img: Image.Image, cfg: ImageConfig) -> Image.Image:
    size, (w, h) = cfg.image_size, img.size
    if cfg.resize_mode == "center_crop" and (w, h) != (size, size) and min(w, h) >= size:
        left, top = (w - size) // 2, (h - size) // 2
        return img.crop((left, top, left + size, top + size))
    if cfg.resize_mode == "border" and (w, h) != (size, size) and max(w, h) <= size:
        canvas = Image.new("RGB", (size, size), (255, 255, 255))  # white, as img2dataset pads
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        return canvas
    return img


class Laps:
    """Thread CPU seconds per step of `process_image` (bench/image_path.py's split)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.thread_time()

    def __call__(self, step: str) -> None:
        now = time.thread_time()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self._t
        self._t = now


def _no_lap(step: str) -> None:
    pass


def process_image(data: bytes, cfg: ImageConfig, *, laps: Laps | None = None) -> ProcessedImage:
    """Validate, decode, transpose, resize and re-encode one image (the training copy), and make its analysis copy.
    Raises ImageError with a class. `laps` collects the CPU time per step."""
    lap = laps or _no_lap
    kind = sniff(data)
    if kind in (None, "html", "text", "svg"):
        what = {"html": "an HTML page", "text": "text", "svg": "SVG markup"}.get(kind, "not a known image format")
        raise ImageError("not_image", f"body is {what}, not an image")
    sha = hashlib.sha256(data).hexdigest()
    lap("hash")
    try:
        img = Image.open(io.BytesIO(data))
        ow, oh = img.size
        if ow * oh > cfg.max_image_pixels:
            raise ImageError(
                "decompression_bomb", f"{ow}x{oh} = {ow * oh} pixels exceeds the {cfg.max_image_pixels} limit"
            )
        if min(ow, oh) < cfg.min_image_size:
            raise ImageError("too_small", f"{ow}x{oh} is smaller than {cfg.min_image_size}px", status="filtered")
        if cfg.max_aspect_ratio and max(ow, oh) / min(ow, oh) > cfg.max_aspect_ratio:
            raise ImageError(
                "bad_aspect", f"{ow}x{oh} has aspect ratio above {cfg.max_aspect_ratio}", status="filtered"
            )
        orientation = img.getexif().get(0x0112, 1) if img.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
        # An analysis copy to re-encode needs pixels at its own (larger) size; the original bytes need none.
        resized_analysis = cfg.analysis_size is not None and not keeps_original(kind, ow, oh, cfg)
        if img.format == "JPEG":
            # Decode at the smallest DCT scale that still covers the outputs (and the 32px phash thumbnail).
            # libjpeg-turbo's other M/8 scales (3/8, 5/8 ...; simplejpeg) were slower to decode than the full image
            # here and 3-6 dB further from a Lanczos reference: bench/image_path.py --candidates.
            # ow, oh are still the stored (pre-rotation) sizes, the orientation draft() works in: no swap here.
            tw, th = target_size(ow, oh, cfg)
            aw, ah = analysis_target(ow, oh, cfg) if resized_analysis else (0, 0)
            img.draft("RGB", (max(tw, aw, 32), max(th, ah, 32)))
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as e:
        raise ImageError("decode_error", f"cannot decode {kind}: {e}") from None
    except MemoryError:
        raise ImageError("decode_error", f"out of memory decoding {kind} {ow}x{oh}") from None
    lap("decode")
    decoded = img
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    # Sizes as the viewer sees them: after EXIF rotation.
    if orientation in _ORIENTATION_SWAPS:
        ow, oh = oh, ow
    lap("transpose")
    scaled = _scale(img, cfg, (ow, oh))
    lap("resize")
    hash_value = phash(scaled)  # before crop/pad, so it does not depend on the resize mode
    lap("hash")
    out = _crop_or_pad(scaled, cfg)
    lap("resize")
    ext = _ENCODE[cfg.encode_format][1]
    # img2dataset's skip_reencode: nothing was done to the pixels (no rotation, conversion, resize, crop or pad, nor
    # a reduced-scale JPEG decode) and the format is already the output's.
    untouched = out is decoded and out.size == (ow, oh) and _AS_IS.get(kind) == ext
    training = data if cfg.skip_reencode and untouched else _encode(out, cfg)
    lap("encode")
    analysis = analysis_ext = analysis_kind = None
    if resized_analysis:
        target = analysis_target(ow, oh, cfg)
        copy = img if target == img.size else img.resize(target, Image.Resampling.BOX)
        analysis, analysis_ext, analysis_kind = _encode(copy, cfg), ext, "resized"
    elif cfg.analysis_size is not None:
        analysis, analysis_ext, analysis_kind = data, _AS_IS[kind], "original"
    if analysis == training:  # stored once: the readers take the training copy for it
        analysis, analysis_ext, analysis_kind = None, None, "training"
    lap("analysis")
    return ProcessedImage(
        data=training, ext=ext, width=out.width, height=out.height, original_width=ow, original_height=oh,
        sha256=sha, phash=phash_hex(hash_value), source_format=kind, original_bytes=len(data),
        analysis=analysis, analysis_ext=analysis_ext, analysis_kind=analysis_kind,
    )
