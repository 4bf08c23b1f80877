"""process_image on the shared photos (read in place) and on images made here with Pillow: resize modes as
img2dataset defines them, EXIF rotation, odd modes and formats, hostile inputs, filters, encodings and hashes."""

from __future__ import annotations

import hashlib
import io
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from infra.loopback_server import build_png_bomb
from infra.settings import ImageConfig
from tasks.images import ImageError, ProcessedImage, process_image, sniff, target_size

pytestmark = pytest.mark.timeout(60)

MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def run(data: bytes, **cfg: object) -> ProcessedImage:
    """process_image, plus the invariants every result must hold."""
    out = process_image(data, ImageConfig(**cfg))
    img = decode(out.data)
    assert img.size == (out.width, out.height)
    assert img.mode == "RGB"
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert out.original_bytes == len(data)
    assert len(out.phash) == 16 and int(out.phash, 16) >= 0
    return out


def fails(data: bytes, **cfg: object) -> ImageError:
    with pytest.raises(ImageError) as err:
        process_image(data, ImageConfig(**cfg))
    return err.value


def close(pixel: tuple[int, ...], colour: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True))


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


# ---- sizes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "h", "mode", "only_if_bigger", "expected"),
    [
        (640, 426, "no", False, (640, 426)),
        (640, 426, "keep_ratio", False, (385, 256)),  # smallest side = 256 (640 * 256 / 426 = 384.6)
        (426, 640, "keep_ratio", False, (256, 385)),
        (640, 426, "center_crop", False, (385, 256)),  # before the crop
        (640, 426, "keep_ratio_largest", False, (256, 170)),  # largest side = 256
        (640, 426, "border", False, (256, 170)),  # before the padding
        (100, 50, "keep_ratio", False, (512, 256)),  # upscales...
        (100, 50, "keep_ratio", True, (100, 50)),  # ... unless only-if-bigger
        (1000, 200, "keep_ratio", True, (1000, 200)),  # smallest side 200 is not bigger than 256
        (1000, 200, "keep_ratio_largest", True, (256, 51)),  # largest side 1000 is
        (256, 256, "keep_ratio", True, (256, 256)),
        (12000, 300, "keep_ratio", False, (10240, 256)),
        (12000, 300, "keep_ratio_largest", False, (256, 6)),
        (100000, 10, "keep_ratio_largest", False, (256, 1)),  # never a zero side
    ],
)
def test_target_size(w: int, h: int, mode: str, only_if_bigger: bool, expected: tuple[int, int]) -> None:
    cfg = ImageConfig(image_size=256, resize_mode=mode, resize_only_if_bigger=only_if_bigger)
    assert target_size(w, h, cfg) == expected


def _expected_size(w: int, h: int, mode: str, size: int) -> tuple[int, int]:
    if mode == "no":
        return w, h
    if mode in ("center_crop", "border"):
        return size, size
    side = min(w, h) if mode == "keep_ratio" else max(w, h)
    return max(1, round(w * size / side)), max(1, round(h * size / side))


@pytest.mark.parametrize("mode", MODES)
def test_resize_modes_on_real_photos(photos: list[Path], mode: str) -> None:
    for path in photos[:8]:
        data = path.read_bytes()
        w, h = Image.open(path).size
        out = run(data, image_size=160, resize_mode=mode)
        assert (out.width, out.height) == _expected_size(w, h, mode, 160), (path.name, w, h)
        assert (out.original_width, out.original_height, out.source_format, out.ext) == (w, h, "jpeg", "jpg")
        if mode == "keep_ratio":
            assert min(out.width, out.height) == 160
        if mode == "keep_ratio_largest":
            assert max(out.width, out.height) == 160
        if mode in ("keep_ratio", "keep_ratio_largest"):
            assert abs(out.width / out.height - w / h) < 0.02


def test_border_pads_with_white_around_the_centred_image() -> None:
    out = run(
        encode(Image.new("RGB", (200, 100), RED), "PNG"), image_size=64, resize_mode="border", encode_format="png"
    )
    img = decode(out.data)
    assert img.size == (64, 64)
    assert img.getpixel((32, 2)) == WHITE and img.getpixel((32, 61)) == WHITE  # img2dataset pads white
    assert img.getpixel((32, 32)) == RED and img.getpixel((0, 32)) == RED and img.getpixel((63, 32)) == RED


def test_center_crop_keeps_the_middle() -> None:
    img = Image.new("RGB", (300, 100), RED)
    img.paste(GREEN, (100, 0, 200, 100))
    img.paste(BLUE, (200, 0, 300, 100))
    out = decode(run(encode(img, "PNG"), image_size=50, resize_mode="center_crop", encode_format="png").data)
    assert out.size == (50, 50)
    assert {out.getpixel((x, y)) for x in (0, 25, 49) for y in (0, 49)} == {GREEN}


def test_resize_only_if_bigger() -> None:
    small = encode(Image.new("RGB", (100, 60), RED), "PNG")
    for mode in ("keep_ratio", "keep_ratio_largest", "center_crop"):
        out = run(small, image_size=256, resize_mode=mode, resize_only_if_bigger=True)
        assert (out.width, out.height) == (100, 60), mode
    # border never upscales, but still pads to the square (img2dataset would leave a small image unpadded).
    out = run(small, image_size=256, resize_mode="border", resize_only_if_bigger=True)
    assert (out.width, out.height) == (256, 256)
    big = encode(Image.new("RGB", (600, 300), RED), "PNG")
    out = run(big, image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True)
    assert (out.width, out.height) == (512, 256)


@pytest.mark.parametrize("mode", MODES)
def test_jpeg_draft_decode_matches_full_decode(photos: list[Path], mode: str) -> None:
    # The same pixels as PNG take the full-decode path; sizes must agree and the hash stay close.
    for path in photos[:4]:
        jpeg = path.read_bytes()
        png = encode(decode(jpeg), "PNG")
        a, b = run(jpeg, image_size=100, resize_mode=mode), run(png, image_size=100, resize_mode=mode)
        assert (a.width, a.height, a.original_width, a.original_height) == (
            b.width,
            b.height,
            b.original_width,
            b.original_height,
        )
        assert hamming(a.phash, b.phash) <= 6


def test_jpeg_is_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[tuple[int, int]] = []
    original_load = JpegImagePlugin.JpegImageFile.load

    def spy(self: JpegImagePlugin.JpegImageFile):  # type: ignore[no-untyped-def]
        decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait: the draft works in stored orientation
    for orientation_exif in (b"", exif.tobytes()):
        decoded.clear()
        data = encode(halves((1600, 800), RED, BLUE), "JPEG", quality=90, exif=orientation_exif)
        out = run(data, image_size=100, resize_mode="keep_ratio", analysis_size=None)
        assert decoded[0] == (200, 100), "1/8 scale covers a 100px smallest side"
        assert sorted((out.width, out.height)) == [100, 200]
        # With an analysis copy the decode covers it too: 1/4 scale (800x400) for a 600px bound.
        decoded.clear()
        out = run(data, image_size=100, resize_mode="keep_ratio", analysis_size=600)
        assert decoded[0] == (800, 400)
        assert sorted(decode(out.analysis).size) == [300, 600] and out.analysis_kind == "resized"


# ---- EXIF orientation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, RED, BLUE), (8, BLUE, RED)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_rotation(orientation: int, top: tuple[int, int, int], bottom: tuple[int, int, int], fmt: str) -> None:
    # Stored 400x200, red left / blue right. 6 = rotate 90° clockwise to display (left goes to the top), 8 = ccw.
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(halves((400, 200), RED, BLUE), fmt, exif=exif.tobytes())
    out = run(data, image_size=100, resize_mode="keep_ratio", encode_format="png")
    assert (out.original_width, out.original_height) == (200, 400)  # as the viewer sees it
    assert (out.width, out.height) == (100, 200)
    img = decode(out.data)
    assert close(img.getpixel((50, 10)), top) and close(img.getpixel((50, 190)), bottom)
    full = run(data, resize_mode="no")
    assert (full.width, full.height) == (200, 400)


def test_exif_orientation_3_keeps_the_size_and_flips() -> None:
    exif = Image.Exif()
    exif[0x0112] = 3
    out = run(encode(halves((400, 200), RED, BLUE), "JPEG", exif=exif.tobytes()), resize_mode="no", encode_format="png")
    assert (out.width, out.height, out.original_width, out.original_height) == (400, 200, 400, 200)
    img = decode(out.data)
    assert close(img.getpixel((10, 100)), BLUE) and close(img.getpixel((390, 100)), RED)


# ---- modes, formats, odd shapes -----------------------------------------------------------------------------------


def test_grayscale_jpeg() -> None:
    out = run(encode(Image.new("L", (120, 80), 128), "JPEG"), image_size=64, encode_format="png")
    assert (out.width, out.height) == (96, 64)
    assert close(decode(out.data).getpixel((10, 10)), (128, 128, 128), tol=3)


def test_progressive_jpeg_matches_baseline(photos: list[Path]) -> None:
    # A progressive photo takes the same draft decode as a baseline one: same sizes, near-identical pixels.
    photo = decode(photos[0].read_bytes()).convert("RGB")
    baseline = encode(photo, "JPEG", quality=95)
    progressive = encode(photo, "JPEG", quality=95, progressive=True)
    assert b"\xff\xc2" in progressive and b"\xff\xc2" not in baseline  # SOF2: progressive DCT
    for size in (100, 256):  # drafted at 1/4, and decoded in full
        a, b = run(baseline, image_size=size), run(progressive, image_size=size)
        assert (a.width, a.height) == (b.width, b.height)
        diff = np.abs(np.asarray(decode(a.data), dtype=int) - np.asarray(decode(b.data), dtype=int))
        assert diff.mean() < 1.0


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG")
    assert decode(data).mode == "CMYK"
    out = run(data, image_size=64, encode_format="png")
    assert (out.width, out.height) == (96, 64)
    assert close(decode(out.data).getpixel((48, 32)), RED)


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256), (32, 1)).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert decode(data).mode.startswith("I")
    out = np.asarray(decode(run(data, resize_mode="no", encode_format="png").data).convert("L"), dtype=float)
    assert np.abs(out[0] - np.linspace(0, 255, 256)).max() <= 1  # not a white image


def test_palette_with_transparency_goes_on_white() -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.paste(1, (32, 0, 64, 64))  # right half: index 1 (blue), made transparent
    img.info["transparency"] = 1
    data = encode(img, "PNG", transparency=1)
    out = decode(run(data, image_size=64, encode_format="png").data)
    assert out.getpixel((10, 32)) == RED and out.getpixel((50, 32)) == WHITE


def test_rgba_png_goes_on_white() -> None:
    img = Image.new("RGBA", (64, 64), (0, 0, 255, 0))  # fully transparent blue
    img.paste((255, 0, 0, 255), (0, 0, 32, 64))
    out = decode(run(encode(img, "PNG"), image_size=64, encode_format="png").data)
    assert out.getpixel((10, 32)) == RED and out.getpixel((50, 32)) == WHITE


def test_one_pixel_image() -> None:
    data = encode(Image.new("RGB", (1, 1), GREEN), "PNG")
    assert (run(data, resize_mode="no").width, run(data, resize_mode="no").height) == (1, 1)
    for mode in ("keep_ratio", "keep_ratio_largest", "center_crop", "border"):
        out = run(data, image_size=32, resize_mode=mode, encode_format="png")
        assert (out.width, out.height) == (32, 32), mode
        assert decode(out.data).getpixel((16, 16)) == GREEN


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep_ratio", (10240, 256)),
        ("keep_ratio_largest", (256, 6)),
        ("center_crop", (256, 256)),
        ("border", (256, 256)),
        ("no", (12000, 300)),
    ],
)
def test_panorama(mode: str, expected: tuple[int, int]) -> None:
    data = encode(Image.new("RGB", (12000, 300), BLUE), "JPEG", quality=50)
    out = run(data, image_size=256, resize_mode=mode)
    assert (out.width, out.height) == expected
    assert (out.original_width, out.original_height) == (12000, 300)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (80, 40), c).convert("P") for c in (RED, BLUE, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert decode(data).n_frames == 3
    out = run(data, image_size=40, encode_format="png")
    assert out.source_format == "gif" and (out.width, out.height) == (80, 40)
    assert close(decode(out.data).getpixel((40, 20)), RED, tol=5)


# ---- hostile input ------------------------------------------------------------------------------------------------


def test_truncated_jpeg_is_a_decode_error(photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    err = fails(data[: len(data) // 2])
    assert (err.error_class, err.status) == ("decode_error", "error")
    assert fails(b"\xff\xd8\xff" + bytes(range(256)) * 4).error_class == "decode_error"
    assert fails(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).error_class == "decode_error"


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"<!DOCTYPE html><html><body>hi</body></html>", "HTML"),
        (b"  \n<html><head></head></html>", "HTML"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b'{"error": "not found"}', "text"),
        (b"", "not a known image format"),
        (b"\x00\x01\x02\x03garbage", "not a known image format"),
    ],
)
def test_non_images_are_refused_before_decoding(data: bytes, what: str) -> None:
    err = fails(data)
    assert (err.error_class, err.status) == ("not_image", "error")
    assert what in str(err)


def test_decompression_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = build_png_bomb()  # 30000 x 30000 in ~110 KB

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("the bomb's pixels must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    t0 = time.monotonic()
    err = fails(bomb)
    assert (err.error_class, err.status) == ("decompression_bomb", "error")
    assert "900000000" in str(err)  # 30000 x 30000 pixels, refused by our limit or by Pillow's own
    assert time.monotonic() - t0 < 1


def test_pixel_limit_is_configurable() -> None:
    small_bomb = build_png_bomb(2000)  # 4 Mpx
    assert fails(small_bomb, max_image_pixels=3_999_999).error_class == "decompression_bomb"
    out = run(small_bomb, image_size=64, max_image_pixels=4_000_000, encode_format="png")
    assert (out.width, out.height, out.original_width) == (64, 64, 2000)


def test_filters_give_status_filtered() -> None:
    data = encode(Image.new("RGB", (300, 100), RED), "PNG")
    err = fails(data, min_image_size=101)
    assert (err.error_class, err.status) == ("too_small", "filtered")
    assert run(data, min_image_size=100).original_height == 100
    err = fails(data, max_aspect_ratio=2.9)
    assert (err.error_class, err.status) == ("bad_aspect", "filtered")
    assert run(data, max_aspect_ratio=3.0).original_width == 300


# ---- encodings and hashes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "magic"), [("jpg", "jpeg"), ("webp", "webp"), ("png", "png")])
def test_encode_formats(photos: list[Path], fmt: str, magic: str) -> None:
    out = run(photos[0].read_bytes(), image_size=128, encode_format=fmt)
    assert out.ext == fmt and sniff(out.data) == magic
    assert decode(out.data).format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]


def test_encode_quality_changes_the_output(photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    low, high = run(data, encode_quality=20), run(data, encode_quality=95)
    assert len(low.data) < len(high.data)
    assert low.phash == high.phash  # the hash is of the decoded image, not the encoding


def test_phash_is_stable_under_resizing_and_reencoding(photos: list[Path]) -> None:
    for path in photos[:10]:
        original = run(path.read_bytes())
        img = decode(path.read_bytes()).convert("RGB")
        smaller = encode(img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC), "JPEG", quality=60)
        for variant in (smaller, encode(img, "WEBP", quality=50), encode(img, "PNG")):
            assert hamming(original.phash, run(variant).phash) <= 4, path.name
        # ... and independent of the resize mode.
        assert hamming(original.phash, run(path.read_bytes(), resize_mode="center_crop").phash) <= 4


def test_phash_separates_different_photos(photos: list[Path]) -> None:
    hashes = {p.name: run(p.read_bytes()).phash for p in photos[:25]}
    distances = [hamming(a, b) for a, b in itertools.combinations(hashes.values(), 2)]
    assert min(distances) > 10


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (b"BM", "bmp"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"\x00\x00\x00\x1cftypavif", "avif"),
        (b"\x00\x00\x00\x1cftypheic", "heic"),
        (b"<html>", "html"),
        (b"<svg/>", "svg"),
        (b"[1, 2]", "text"),
        (b"RIFF\x00\x00\x00\x00WAVE", None),
        (b"", None),
    ],
)
def test_sniff(head: bytes, kind: str | None) -> None:
    assert sniff(head) == kind
