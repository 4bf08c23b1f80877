"""The analysis copy: what ingest keeps for the experts beside the small training copy (bounded, or the original
bytes as they came), what extract reads (text the 256 px copy loses, boxes in original pixels), old shards without
it, and a release that never ships it. Real photos, a real loopback server, the real cpu-profile models."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from infra.loopback_server import ImageServer, build_png_bomb
from infra.settings import DatasetSpec, DownloadConfig, ExtractConfig, ImageConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.extract import ExtractStage
from tasks.images import ANALYSIS_MAX_SIDE, ImageError, decode_rgb, process_image
from tasks.ingest import ingest_shard, plan_ingest
from tasks.shards import read_shard_images, stage_key

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = str(SHARED / "models")
PHOTO = SHARED / "data" / "photos" / "images" / "000000214753.jpg"  # COCO 640x480: 2 horses, 2 people
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
TEXT = "OPEN SUNDAY 9 TO 5"
LEGACY = ImageConfig(analysis_size=None, skip_reencode=False)  # the output made before analysis copies


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def sign(width: int, font_size: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """A white PNG with one line of small black text; returns it and the text's box in its pixels."""
    img = Image.new("RGB", (width, width * 3 // 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(FONT, font_size)
    xy = (width // 5, width // 3)
    draw.text(xy, TEXT, fill=(0, 0, 0), font=font)
    return encode(img, "PNG"), draw.textbbox(xy, TEXT, font=font)


# ---- process_image ------------------------------------------------------------------------------------------------


def test_a_large_image_gets_a_bounded_copy_and_a_small_one_keeps_its_bytes() -> None:
    big = encode(Image.new("RGB", (3000, 1500), (200, 30, 30)), "JPEG", quality=90)
    out = process_image(big, ImageConfig())
    assert decode_rgb(out.analysis).size == (2048, 1024) and (out.analysis_ext, out.analysis_kind) == ("jpg", "resized")
    assert (out.width, out.height) == (512, 256)  # the training copy is as before
    small = PHOTO.read_bytes()
    out = process_image(small, ImageConfig())
    assert out.analysis == small and (out.analysis_ext, out.analysis_kind) == ("jpg", "original")
    png, _ = sign(1000, 11)
    out = process_image(png, ImageConfig())
    assert out.analysis == png and out.analysis_ext == "png"
    assert process_image(png, ImageConfig(analysis_size=800)).analysis_kind == "resized"
    assert decode_rgb(process_image(png, ImageConfig(analysis_size=800)).analysis).size == (800, 600)


def test_analysis_size_zero_keeps_any_original_and_null_turns_it_off() -> None:
    big = encode(Image.new("RGB", (3000, 1500), (200, 30, 30)), "JPEG", quality=90)
    out = process_image(big, ImageConfig(analysis_size=0))
    assert out.analysis == big and out.analysis_kind == "original"
    gif = encode(Image.new("RGB", (300, 200), (0, 0, 255)).convert("P"), "GIF")  # not a format kept as it is
    out = process_image(gif, ImageConfig(analysis_size=0))
    assert out.analysis_kind == "resized" and decode_rgb(out.analysis).size == (300, 200)
    out = process_image(big, ImageConfig(analysis_size=None))
    assert (out.analysis, out.analysis_kind) == (None, None)
    assert out.data == process_image(big, LEGACY).data  # the training copy does not depend on it here


def test_exif_rotated_original_is_kept_and_read_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400x200, shown 200x400
    data = encode(Image.new("RGB", (400, 200), (0, 200, 0)), "JPEG", exif=exif.tobytes())
    out = process_image(data, ImageConfig())
    assert out.analysis == data and decode_rgb(out.analysis).size == (200, 400) == (out.original_width,
                                                                                  out.original_height)


def test_training_copy_skips_the_reencode_when_nothing_changes() -> None:
    photo = PHOTO.read_bytes()
    out = process_image(photo, ImageConfig(resize_mode="no"))
    assert out.data == photo and out.analysis is None and out.analysis_kind == "training"  # stored once
    assert process_image(photo, ImageConfig(resize_mode="no", skip_reencode=False)).data != photo
    assert process_image(photo, ImageConfig(resize_mode="no", encode_format="webp")).data != photo  # format differs
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated = encode(Image.open(PHOTO), "JPEG", exif=exif.tobytes())
    assert process_image(rotated, ImageConfig(resize_mode="no")).data != rotated  # pixels rotated: re-encoded


def test_hostile_inputs_stay_bounded() -> None:
    with pytest.raises(ImageError) as err:
        process_image(build_png_bomb(), ImageConfig(analysis_size=0))
    assert err.value.error_class == "decompression_bomb"
    thin = encode(Image.new("RGB", (50000, 2), (10, 10, 10)), "PNG")
    out = process_image(thin, ImageConfig())
    assert decode_rgb(out.analysis).size == (2048, 1) and max(out.width, out.height) <= 256 * 50
    thin_gif = encode(Image.new("RGB", (40000, 2), (10, 10, 10)).convert("P"), "GIF")
    out = process_image(thin_gif, ImageConfig(analysis_size=0, encode_format="webp"))
    assert decode_rgb(out.analysis).size == (ANALYSIS_MAX_SIDE, 1)


def test_config_hash_changes_only_with_the_output() -> None:
    assert IngestConfig(images=LEGACY).config_hash() == "8152e2c1606082a3"  # the hash before analysis copies
    assert IngestConfig().config_hash() != IngestConfig(images=LEGACY).config_hash()
    assert IngestConfig(images=ImageConfig(analysis_size=1024)).config_hash() != IngestConfig().config_hash()
    assert IngestConfig(images=ImageConfig(analysis_size=0)).config_hash() != IngestConfig().config_hash()


# ---- ingest -> extract -> publish ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[LocalStore, dict, dict]:
    """Datasets `new` (default settings) and `old` (as ingested before analysis copies) of the same 3 images."""
    tmp = tmp_path_factory.mktemp("analysis")
    small_sign, small_box = sign(1000, 11)  # within the bound: its analysis copy is the original PNG
    large_sign, large_box = sign(2600, 28)  # over it: a 2048 px copy
    images = {"small.png": small_sign, "large.png": large_sign, "photo.jpg": PHOTO.read_bytes()}
    store = LocalStore(tmp / "store")
    with ImageServer(images) as server:
        pq.write_table(pa.table({"url": [server.url(f"/img/{i}/{n}") for i, n in enumerate(images)],
                                 "caption": ["a sign", "another sign", "horses"]}), tmp / "urls.parquet")
        for dataset, images_cfg in (("new", ImageConfig()), ("old", LEGACY)):
            cfg = IngestConfig(images=images_cfg, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
            for shard in plan_ingest(store, dataset, [InputSpec(path=str(tmp / "urls.parquet"))], cfg).todo:
                ingest_shard(store.uri, dataset, shard, cfg)
    raw = store.get_parquet(stage_key("new", "ingest", 0, "parquet"))
    keys = {u.rsplit("/", 1)[-1]: k for u, k in zip(raw.column("url").to_pylist(), raw.column("key").to_pylist(),
                                                    strict=True)}
    return store, keys, {"small.png": (small_sign, small_box), "large.png": (large_sign, large_box)}


def _members(store: LocalStore, dataset: str) -> dict[str, bytes]:
    with tarfile.open(store.root / stage_key(dataset, "ingest", 0, "tar")) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_the_tar_holds_the_analysis_copy_beside_the_training_copy(datasets) -> None:
    store, keys, signs = datasets
    members = _members(store, "new")
    assert members[f"{keys['small.png']}.analysis.png"] == signs["small.png"][0]  # byte-identical original
    assert members[f"{keys['photo.jpg']}.analysis.jpg"] == PHOTO.read_bytes()
    assert Image.open(io.BytesIO(members[f"{keys['large.png']}.analysis.jpg"])).size == (2048, 1536)
    assert Image.open(io.BytesIO(members[f"{keys['large.png']}.jpg"])).size == (341, 256)
    marker = store.get_json(stage_key("new", "ingest", 0, "stats.json"))
    assert marker["analysis"] == "2048px" and marker["analysis_copies"] == {"original": 2, "resized": 1}
    assert not any(".analysis." in name for name in _members(store, "old"))
    # Readers that want the training copy (CLIP scores, rank-and-fuse) get exactly the sample keys.
    assert set(read_shard_images(store, "new", 0)) == set(keys.values())
    assert read_shard_images(store, "new", 0, analysis=True)[keys["photo.jpg"]] == PHOTO.read_bytes()


def _extract(store: LocalStore, dataset: str) -> tuple[dict[str, dict], dict, list[str]]:
    stage = ExtractStage(ExtractConfig(experts=("ocr", "objects")), MODELS)
    stats = stage.run_shard(store.uri, dataset, 0)
    rows = {r["key"]: r for r in store.get_parquet(stage_key(dataset, "extract", 0, "parquet")).to_pylist()}
    return rows, stats, stage.summary(stats)


def test_extract_reads_small_text_at_analysis_resolution_with_boxes_in_original_pixels(datasets) -> None:
    from infra.settings import DetectorConfig
    from tasks.detect import YoloxOnnxDetector

    store, keys, signs = datasets
    rows, stats, summary = _extract(store, "new")
    assert stats["training_copy_images"] == 0 and not any("training copy" in line for line in summary)
    for name, (_, (x0, y0, x1, y1)) in signs.items():
        row = rows[keys[name]]
        assert row["ocr_text"] == TEXT, name
        xs = [p[0] for p in row["ocr"][0]["box"]]
        ys = [p[1] for p in row["ocr"][0]["box"]]
        # The line's box lands on the drawn text in the original's pixels (not the 2048 px copy's).
        assert abs(min(xs) - x0) < 12 and abs(max(xs) - x1) < 12 and abs(min(ys) - y0) < 12, (name, xs, ys)
        assert abs(max(ys) - y1) < 12, (name, ys)
    # Detection through the pipeline equals the bare detector on the original file.
    cfg = DetectorConfig()
    bare = YoloxOnnxDetector(str(Path(MODELS) / cfg.model), score_threshold=cfg.score_threshold,
                             nms_iou=cfg.nms_iou).detect([Image.open(PHOTO).convert("RGB")])[0]
    got = rows[keys["photo.jpg"]]["objects"]
    assert [o["label"] for o in got] == [d.label for d in bare]
    assert all(o["box"] == pytest.approx(list(d.box), abs=1e-3) for o, d in zip(got, bare, strict=True))


def test_an_old_shard_without_analysis_copies_still_works_and_says_so(datasets) -> None:
    store, keys, _ = datasets
    rows, stats, summary = _extract(store, "old")
    assert all(r["status"] == "ok" for r in rows.values())
    assert stats["training_copy_images"] == 3
    assert sum("read from the small training copy" in line for line in summary) == 1
    # What the 256 px copy loses: the small text.
    assert "SUNDAY" not in (rows[keys["small.png"]]["ocr_text"] or "")
    # Boxes are still in the original's pixels: people and horses on a 640x480 photo, not a 341x256 one.
    boxes = [o["box"] for o in rows[keys["photo.jpg"]]["objects"]]
    assert boxes and max(b[2] for b in boxes) > 341


def test_a_release_ships_the_training_copy_only(datasets) -> None:
    from infra.settings import PublishConfig
    from tasks.publish import finish_publish, plan_publish, publish_shard

    store, keys, _ = datasets
    spec = DatasetSpec(name="new", publish=PublishConfig(include_unselected_in_parquet=False))
    plan = plan_publish(store.uri, "new", spec)
    stats = [publish_shard(store.uri, "new", s, plan["plan"], spec.publish) for s in range(plan["shards"])]
    release = finish_publish(store.uri, "new", spec, plan, stats)
    raw = _members(store, "new")
    names = []
    for shard in release["shards"]:
        with tarfile.open(store.root / shard) as tar:
            for m in tar:
                names.append(m.name)
                if m.name.endswith(".jpg"):
                    assert tar.extractfile(m).read() == raw[m.name]  # the training copy, as stored
    assert sorted(n for n in names if n.endswith(".jpg")) == sorted(f"{k}.jpg" for k in keys.values())
    assert not any(".analysis." in n for n in names)


def test_boxes_of_a_cropped_or_padded_training_copy_are_not_scaled_to_the_original():
    from tasks.extract import to_original_coordinates

    row = {"key": "k", "objects": [{"label": "dog", "box": [0.0, 0.0, 256.0, 256.0]}], "ocr": None}
    # a keep_ratio copy of a 1000x500 original: scaled back
    scaled = to_original_coordinates(row, (512, 256), (1000, 500))
    assert scaled["objects"][0]["box"] == pytest.approx([0, 0, 500, 500])
    # a center_crop / border square of the same original (an old shard): no scaling maps it back; left as read
    assert to_original_coordinates(row, (256, 256), (1000, 500)) is row
