"""The OCR expert (tasks/ocr.py) with the real PP-OCRv4 ONNX models on the shared ICDAR2015 images (read in place).

Measured here (RapidOCRBackend, min_score 0.5, dev split: 30 scene images, 10 word crops): word recall 0.415 and
precision 0.482 on the scene images, 4/10 word crops read exactly (bench/ocr_eval.py has the full table). The floors
below are set well under those values: they catch a broken pipeline, not a point of accuracy.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

pytest.importorskip("rapidocr_onnxruntime", reason="the experts extra (rapidocr-onnxruntime) is not installed")

from infra.models import ModelUnavailable, OCRLine, OCRResult, load_backend
from tasks import ocr as ocr_mod
from tasks.ocr import PaddleOCRBackend, RapidOCRBackend, _plan_tiles, _to_lines, ocr_words, reading_order

TEXT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "text_images"
# (file, words that must be read): images where the backend was checked to read these words
KNOWN = {
    "icdar2015_test/img_230.jpg": {"esplanade", "theatres", "bay"},
    "icdar2015_test/img_396.jpg": {"make", "new", "era", "flag"},
    "icdar2015_test/img_89.jpg": {"exit", "jollibean", "everyday"},
    "icdar2015_test/img_77.jpg": {"sarawak", "kuching", "kolo"},
}
SCENE_RECALL_FLOOR, SCENE_PRECISION_FLOOR, CROP_ACCURACY_FLOOR = 0.30, 0.35, 0.2
FONT = ImageFont.load_default(size=48)


def _labels(kind: str) -> list[dict]:
    path = TEXT_IMAGES / "labels.jsonl"
    assert path.is_file(), f"the shared text images are missing from {TEXT_IMAGES} (the tests read ../shared/data)"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def _open(rel: str) -> Image.Image:
    with Image.open(TEXT_IMAGES / rel) as im:
        return im.convert("RGB")


def _words(result: OCRResult) -> list[str]:
    return ocr_words(result.full_text)


def _text_image(size: tuple[int, int], texts: list[tuple[tuple[int, int], str]]) -> tuple[Image.Image, list]:
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    for xy, text in texts:
        draw.text(xy, text, fill="black", font=FONT)
    return im, [draw.textbbox(xy, text, font=FONT) for xy, text in texts]


def _inside(box: list[list[float]], size: tuple[int, int]) -> bool:
    return all(0 <= x <= size[0] and 0 <= y <= size[1] for x, y in box)


def _covers(box: list[list[float]], target: tuple[int, int, int, int], slack: float = 6) -> bool:
    xs, ys = [p[0] for p in box], [p[1] for p in box]
    x0, y0, x1, y1 = target
    return min(xs) <= x0 + slack and min(ys) <= y0 + slack and max(xs) >= x1 - slack and max(ys) >= y1 - slack


@pytest.fixture(scope="module")
def backend() -> RapidOCRBackend:
    return load_backend("ocr", "rapidocr", min_score=0.5, lang="en", model_dir=None)


@pytest.fixture(scope="module")
def scene_results(backend: RapidOCRBackend) -> list[tuple[dict, OCRResult]]:
    rows = _labels("scene_text")
    assert rows, "no ICDAR2015 scene images in labels.jsonl"
    return list(zip(rows, backend.read([_open(r["file"]) for r in rows]), strict=True))


# ---- registry ---------------------------------------------------------------------------------------------------

def test_registry_loads_once_per_process(backend: RapidOCRBackend) -> None:
    again = load_backend("ocr", "rapidocr", min_score=0.5, lang="en", model_dir=None)
    assert again is backend
    assert isinstance(backend, RapidOCRBackend)
    assert backend.model_id.startswith("rapidocr-onnxruntime==1.4.4/PP-OCRv4")


def test_onnxruntime_sessions_use_one_thread(backend: RapidOCRBackend) -> None:
    engine = backend.engine
    for part in (engine.text_det.infer, engine.text_cls.infer, engine.text_rec.session):
        assert part.session.get_session_options().intra_op_num_threads == 1


# ---- real data --------------------------------------------------------------------------------------------------

def test_icdar_known_words_are_read(scene_results: list[tuple[dict, OCRResult]]) -> None:
    by_file = {row["file"]: result for row, result in scene_results}
    for file, expected in KNOWN.items():
        assert file in by_file, f"{file} is missing from the shared text images"
        words = set(_words(by_file[file]))
        assert expected <= words, f"{file}: expected {sorted(expected)} in {by_file[file].full_text!r}"


def test_icdar_word_recall_and_precision(scene_results: list[tuple[dict, OCRResult]]) -> None:
    matched = n_gt = n_pred = 0
    for row, result in scene_results:
        gt = [w for b in row["boxes"] if not b["ignore"] for w in ocr_words(b["text"])]
        pred = _words(result)
        matched += sum((Counter(gt) & Counter(pred)).values())
        n_gt, n_pred = n_gt + len(gt), n_pred + len(pred)
        for line in result.lines:
            assert _inside(line.box, (row["width"], row["height"])) and len(line.box) == 4
            assert line.score >= 0.5 and line.text == line.text.strip() and line.text
    assert matched / n_gt >= SCENE_RECALL_FLOOR, (matched, n_gt)
    assert matched / n_pred >= SCENE_PRECISION_FLOOR, (matched, n_pred)


def test_icdar_word_crops(backend: RapidOCRBackend) -> None:
    rows = _labels("word_crop")
    pairs = list(zip(rows, backend.read([_open(r["file"]) for r in rows]), strict=True))
    correct = sum("".join(_words(res)) == "".join(ocr_words(r["text"])) for r, res in pairs)
    assert correct / len(rows) >= CROP_ACCURACY_FLOOR, [(r["text"], res.full_text) for r, res in pairs]


# ---- synthetic images -------------------------------------------------------------------------------------------

def test_hello_2024_read_exactly_with_its_box(backend: RapidOCRBackend) -> None:
    im, (bbox,) = _text_image((640, 200), [((40, 60), "HELLO 2024")])
    (result,) = backend.read([im])
    assert result.full_text == "HELLO 2024"
    (line,) = result.lines
    assert line.score > 0.9
    assert _inside(line.box, im.size) and _covers(line.box, bbox)
    assert all(isinstance(v, float) for p in line.box for v in p)


def test_reading_order_rows_then_left_to_right(backend: RapidOCRBackend) -> None:
    # RIGHT sits a little higher than LEFT (less than half a line): same row, so LEFT comes first
    im, bboxes = _text_image((900, 420), [((40, 300), "LEFT"), ((560, 288), "RIGHT"), ((40, 40), "TOP LINE"),
                                          ((40, 160), "SECOND")])
    (result,) = backend.read([im])
    assert [ln.text for ln in result.lines] == ["TOP LINE", "SECOND", "LEFT", "RIGHT"]
    for line, bbox in zip(result.lines, [bboxes[2], bboxes[3], bboxes[0], bboxes[1]], strict=True):
        assert _covers(line.box, bbox)


def test_panorama_is_tiled_and_boxes_map_back(backend: RapidOCRBackend) -> None:
    # 12000x300 would be shrunk 6x to fit RapidOCR's 2000 px limit; tiles keep the text readable and in place
    xs = [100, 10950]
    im, bboxes = _text_image((12000, 300), [((x, 120), "HELLO 2024") for x in xs])
    (result,) = backend.read([im])
    assert [ln.text for ln in result.lines] == ["HELLO 2024", "HELLO 2024"]  # once each: no duplicates from overlaps
    for line, bbox in zip(result.lines, bboxes, strict=True):
        assert _inside(line.box, im.size) and _covers(line.box, bbox)


def test_weird_images_give_empty_results_without_raising(backend: RapidOCRBackend) -> None:
    gradient = np.zeros((480, 640, 3), np.uint8)
    gradient[..., 0] = np.linspace(0, 255, 640)[None, :]
    gradient[..., 2] = np.linspace(255, 0, 480)[:, None]
    shapes = Image.fromarray(gradient)
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((100, 100, 300, 300), fill=(20, 200, 20))
    draw.rectangle((400, 50, 600, 200), fill=(250, 250, 0))
    weird = [
        Image.new("RGB", (1, 1)),
        Image.new("RGB", (7, 500), "white"),  # a side under 8 px: not read
        Image.new("RGB", (640, 480)),  # pure black
        Image.new("RGB", (20, 600), "white"),  # tall strip: tiled vertically
        Image.new("RGBA", (200, 100)),  # not RGB: converted
        shapes,  # no text
    ]
    results = backend.read(weird)
    assert len(results) == len(weird)
    assert all(isinstance(r, OCRResult) and r.lines == [] for r in results), results


def test_grayscale_and_mixed_batch_keep_order(backend: RapidOCRBackend) -> None:
    gray = _open("icdar2015_test/img_230.jpg").convert("L").convert("RGB")
    hello, _ = _text_image((640, 200), [((40, 60), "HELLO 2024")])
    results = backend.read([hello, Image.new("RGB", (1, 1)), gray, Image.new("RGB", (640, 480)), hello])
    assert [r.full_text for r in results][:2] == ["HELLO 2024", ""]
    assert {"esplanade", "theatres"} <= set(_words(results[2]))
    assert results[3].lines == [] and results[4].full_text == "HELLO 2024"
    assert backend.read([]) == []


def test_engine_failure_on_one_image_is_contained(backend: RapidOCRBackend, monkeypatch, caplog) -> None:
    hello, _ = _text_image((640, 200), [((40, 60), "HELLO 2024")])
    real = backend._recognise
    calls = iter([RuntimeError("boom"), None])

    def flaky(bgr):
        exc = next(calls)
        if exc:
            raise exc
        return real(bgr)

    monkeypatch.setattr(backend, "_recognise", flaky)
    results = backend.read([hello, hello])
    assert [r.full_text for r in results] == ["", "HELLO 2024"]
    assert "OCR failed" in caplog.text


# ---- configuration ----------------------------------------------------------------------------------------------

def test_model_dir_with_onnx_exports(tmp_path: Path) -> None:
    shipped = Path(sys.modules["rapidocr_onnxruntime"].__file__).parent / "models"
    for name in ("ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"):
        (tmp_path / name).symlink_to(shipped / name)
    custom = RapidOCRBackend(min_score=0.5, lang="xx", model_dir=str(tmp_path))  # any lang: the models decide
    assert custom.model_id.endswith(f"/{tmp_path.name}:ch_PP-OCRv4_det_infer+ch_PP-OCRv4_rec_infer")
    im, _ = _text_image((640, 200), [((40, 60), "HELLO 2024")])
    assert custom.read([im])[0].full_text == "HELLO 2024"

    (tmp_path / "ch_PP-OCRv4_rec_infer.onnx").unlink()
    with pytest.raises(ModelUnavailable, match=r"recogniser \(\*rec\*\.onnx\); found: none"):
        RapidOCRBackend(model_dir=str(tmp_path))
    with pytest.raises(ModelUnavailable, match="is not a folder"):
        RapidOCRBackend(model_dir=str(tmp_path / "nope"))


def test_rapidocr_refuses_languages_its_models_do_not_read() -> None:
    with pytest.raises(ModelUnavailable, match=r"ocr backend 'rapidocr'.*lang 'ar'.*model_dir.*paddleocr"):
        RapidOCRBackend(lang="ar")


def test_paddleocr_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # as if not installed, even where it is
    with pytest.raises(ModelUnavailable) as err:
        PaddleOCRBackend()
    msg = str(err.value)
    assert err.value.role == "ocr" and err.value.backend == "paddleocr"
    assert "pip install 'capfactory[gpu]'" in msg and "paddleocr 3.x" in msg and "ocr.model_dir" in msg
    with pytest.raises(ModelUnavailable, match="paddleocr"):
        load_backend("ocr", "paddleocr", min_score=0.5, lang="en", model_dir=None)


class _FakePaddleOCR:
    """Stands in for paddleocr.PaddleOCR (not installable here): records its options, returns 3.x-shaped results."""

    last_options: ClassVar[dict] = {}

    def __init__(self, **options):
        type(self).last_options = options

    def predict(self, bgr):
        h, w = bgr.shape[:2]
        return [{"rec_texts": ["TOP", "", "LOW"], "rec_scores": [0.9, 0.99, 0.3],
                 "rec_polys": [np.array([[10, 10], [110, 10], [110, 40], [10, 40]], np.int16),
                               np.array([[0, 0], [5, 0], [5, 5], [0, 5]], np.int16),
                               np.array([[10, 60], [60, 60], [60, 90], [10, 90]], np.int16)],
                 "input_shape": (h, w)}]


def test_paddleocr_plumbing_with_a_stand_in(monkeypatch, tmp_path: Path) -> None:
    """Our side of the PaddleOCR 3.x integration (options, model folders, result conversion); not PaddleOCR itself."""
    fake = type(sys)("paddleocr")
    fake.PaddleOCR = _FakePaddleOCR
    monkeypatch.setitem(sys.modules, "paddleocr", fake)

    hub = PaddleOCRBackend(min_score=0.5, lang="fr")
    opts = _FakePaddleOCR.last_options
    assert opts["lang"] == "fr" and opts["use_textline_orientation"] is True
    assert opts["use_doc_orientation_classify"] is False and opts["use_doc_unwarping"] is False
    assert "text_detection_model_dir" not in opts and hub.model_id.endswith("/lang=fr")
    (result,) = hub.read([Image.new("RGB", (200, 120), "white")])
    assert [(ln.text, ln.box[0]) for ln in result.lines] == [("TOP", [10.0, 10.0])]  # empty and 0.3 dropped

    for name in ("PP-OCRv5_server_det", "en_PP-OCRv5_mobile_rec", "PP-LCNet_x1_0_textline_ori"):
        (tmp_path / name).mkdir()
    local = PaddleOCRBackend(model_dir=str(tmp_path))
    opts = _FakePaddleOCR.last_options
    assert opts["text_detection_model_dir"] == str(tmp_path / "PP-OCRv5_server_det")
    assert opts["text_recognition_model_dir"] == str(tmp_path / "en_PP-OCRv5_mobile_rec")
    assert opts["textline_orientation_model_dir"] == str(tmp_path / "PP-LCNet_x1_0_textline_ori")
    assert "lang" not in opts and local.model_id.endswith("/PP-OCRv5_server_det+en_PP-OCRv5_mobile_rec")

    (tmp_path / "en_PP-OCRv5_mobile_rec").rmdir()
    with pytest.raises(ModelUnavailable, match="text recognition model folder"):
        PaddleOCRBackend(model_dir=str(tmp_path))


# ---- pure functions ---------------------------------------------------------------------------------------------

def _line(text: str, x: float, y: float, w: float = 80, h: float = 30) -> OCRLine:
    return OCRLine(text, 0.9, [[x, y], [x + w, y], [x + w, y + h], [x, y + h]])


def test_reading_order_groups_by_half_line_height() -> None:
    lines = [_line("c", 300, 104), _line("a", 10, 10), _line("d", 10, 110), _line("b", 200, 2)]
    assert [ln.text for ln in reading_order(lines)] == ["a", "b", "d", "c"]
    # 20 px apart with 30 px lines: more than half a line, so two rows even though they overlap vertically
    assert [ln.text for ln in reading_order([_line("low-left", 0, 20), _line("high-right", 300, 0)])] == [
        "high-right", "low-left"]
    assert reading_order([]) == []


def test_to_lines_maps_filters_and_clips() -> None:
    raw = [("  A  ", 0.8, [[12, 12], [32, 12], [32, 22], [12, 22]]), ("", 0.99, [[0, 0]] * 4),
           ("B", 0.49, [[0, 0]] * 4), ("C", math.nan, [[0, 0]] * 4),
           ("D", 0.7, [[-50, 0], [9000, 0], [9000, 900], [-50, 900]]),
           ("E", 0.6, [[2, 2], [9, 3], [10, 9], [4, 12], [1, 6]])]  # a 5-point polygon -> its rectangle
    out = _to_lines(raw, min_score=0.5, size=(400, 300), scale=2.0, border=2, offset=(100, 0))
    assert [ln.text for ln in out] == ["A", "D", "E"]
    assert out[0].box == [[105.0, 5.0], [115.0, 5.0], [115.0, 10.0], [105.0, 10.0]]
    assert out[1].box == [[74.0, 0.0], [400.0, 0.0], [400.0, 300.0], [74.0, 300.0]]
    assert out[2].box == [[99.5, 0.0], [104.0, 0.0], [104.0, 5.0], [99.5, 5.0]]


def test_tile_plan() -> None:
    assert _plan_tiles(1280, 720) == [(0, 1280)]
    assert _plan_tiles(2400, 300) == [(0, 2400)]  # aspect 8: one tile
    spans = _plan_tiles(12000, 300)
    assert len(spans) <= ocr_mod.MAX_TILES and spans[0][0] == 0 and spans[-1][1] == 12000
    assert all(b - a >= 4 * 300 for a, b in spans)
    assert all(nxt[0] <= cur[1] - 300 for cur, nxt in itertools.pairwise(spans))  # overlap >= short side
    assert len(_plan_tiles(100_000, 8)) <= ocr_mod.MAX_TILES


def test_ocr_words() -> None:
    assert ocr_words(" (Upp Serangoon RdJ  IT'S big! 70%off H&M -- 50% ") == [
        "upp", "serangoon", "rdj", "it's", "big", "70%off", "h&m", "50"]
    assert ocr_words("STRASSE Straße") == ["strasse", "strasse"]
    assert ocr_words("") == []


# ---- the text gate (OCRConfig.gate_side) ----------------------------------------------------------------------

PHOTOS = TEXT_IMAGES.parent / "photos" / "images"
NO_TEXT_PHOTO = "000000101780.jpg"  # a COCO photo (480x640) neither the gate nor the full read finds text in
TINY_WORD = "icdar2015_test_words/word_831.png"  # "WET", 45x25 px
SMALL_WORD = "icdar2015_test_words/word_1247.png"  # "TIMEWISE", 73x35 px


class _Calls:
    """Counts the calls to the engine's recogniser, then runs the real one."""

    def __init__(self, part):
        self.part, self.calls = part, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.part(*args, **kwargs)


@pytest.fixture(scope="module")
def gated() -> RapidOCRBackend:
    backend = load_backend("ocr", "rapidocr", min_score=0.5, lang="en", model_dir=None, gate_side=640)
    assert backend.gate_side == 640
    return backend


@pytest.fixture
def spied(gated: RapidOCRBackend, monkeypatch) -> tuple[RapidOCRBackend, _Calls]:
    rec = _Calls(gated.engine.text_rec)
    monkeypatch.setattr(gated.engine, "text_rec", rec)
    gated.counts.clear()
    return gated, rec


def _photo(name: str) -> Image.Image:
    with Image.open(PHOTOS / name) as im:
        return im.convert("RGB")


def test_gate_skips_the_full_read_of_a_photo_without_text(spied, backend: RapidOCRBackend) -> None:
    gated, rec = spied
    photo = _photo(NO_TEXT_PHOTO)
    (result,) = gated.read([photo])
    assert result.lines == [] and result.full_text == ""
    assert gated.counts == {"gated": 1} and rec.calls == 0  # no full-size detection, no recognition
    assert backend.read([photo])[0].lines == []  # the full read finds nothing there either


def test_gate_reads_icdar_text_exactly_like_the_full_read(spied, scene_results) -> None:
    gated, rec = spied
    by_file = {row["file"]: result for row, result in scene_results}
    results = gated.read([_open(f) for f in KNOWN])
    assert gated.counts == {"read": len(KNOWN)} and rec.calls == len(KNOWN)  # 1280x720: no gate (see test_gate_size)
    for file, result in zip(KNOWN, results, strict=True):
        assert KNOWN[file] <= set(_words(result)), (file, result.full_text)
        assert result.lines == by_file[file].lines, file  # the full read, unchanged


def test_gate_finds_a_small_word_in_a_large_photo(spied, backend: RapidOCRBackend) -> None:
    gated, rec = spied
    big = _photo(NO_TEXT_PHOTO).resize((1536, 2048), Image.Resampling.BICUBIC)  # an analysis copy at its largest
    big.paste(_open(TINY_WORD), (1100, 1400))  # 45x25 px: 0.04% of the image
    (result,) = gated.read([big])
    assert gated.counts == {"read": 1} and rec.calls == 1  # no gate at this size: a gate at 2/3 missed this word
    assert result.lines == backend.read([big])[0].lines
    (line,) = result.lines
    assert ocr_words(line.text)[0].startswith("we"), line.text  # read as "WEI" (the crop's word is "WET")
    assert _covers(line.box, (1100, 1400, 1145, 1425), slack=12) and _inside(line.box, big.size)


def test_gate_passes_a_small_word_in_a_medium_photo(spied, backend: RapidOCRBackend) -> None:
    gated, rec = spied
    photo = _photo(NO_TEXT_PHOTO)  # 480x640: the full detector reads it at 736x992, the gate at 480x640
    photo.paste(_open(SMALL_WORD), (300, 200))
    (result,) = gated.read([photo])
    assert gated.counts == {"passed": 1} and rec.calls == 1
    assert result.lines == backend.read([photo])[0].lines
    assert result.full_text == "TIMEWISE"


def test_gate_size() -> None:
    gate_size = ocr_mod._gate_size
    assert gate_size(480, 640, 640) == (480, 640)  # the full detector would scale it up to 736x981
    assert gate_size(426, 640, 640) == (480, 736)  # never under 2/3 of the full detector's 736x1106
    assert gate_size(40, 100, 640) == (480, 1216)  # (2/3 of 736x1840)
    # a gate not much smaller than the full detector's input (over half its pixels): no gate. 600x800: the gate
    # would not shrink it below its own size (66% of the full detector's 736x981)
    for h, w, side in ((600, 800, 640), (720, 1280, 640), (1500, 2000, 640), (150, 200, 4000)):
        assert gate_size(h, w, side) is None, (h, w, side)


def test_gate_config_hash_and_plan() -> None:
    from infra.settings import ExtractConfig, OCRConfig
    from tasks.experts.ocr import OCRExpert

    off = ExtractConfig(ocr=OCRConfig(gate_side=0))
    assert off.config_hash() == "f2f7956322189999"  # gate off: the hash before the gate existed (same output)
    assert ExtractConfig().config_hash() != off.config_hash()  # the default gate can drop lines: recompute
    assert ExtractConfig(ocr=OCRConfig(gate_side=960)).config_hash() != ExtractConfig().config_hash()
    with pytest.raises(ValueError, match="gate_side"):
        OCRConfig(gate_side=-1)
    assert OCRExpert.plan(ExtractConfig(), "models")["ocr"] == (
        "rapidocr", {"min_score": 0.5, "lang": "en", "model_dir": None, "gate_side": 640})
    assert "gate_side" not in OCRExpert.plan(ExtractConfig(profile="gpu"), "models")["ocr"][1]
