"""Attributes: colour / size / position of detected objects, and the open_clip scorer + zero-shot tags.

CLIP tests use a tiny open_clip architecture registered here, with random weights (no pretrained CLIP exists on
these machines and nothing may download): they check the plumbing, not the quality of the scores.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from infra.models import Detection, ModelUnavailable, load_backend
from tasks.attributes import color_names, dominant_color, object_attributes, position, relative_size

TINY = "capfactory-tiny-test"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def canvas(size=(300, 300), fill=(255, 255, 255)) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", size, fill)
    return im, ImageDraw.Draw(im)


# ---- object attributes ---------------------------------------------------------------------------------------


def test_red_square_top_left():
    im, draw = canvas()
    draw.rectangle([10, 10, 59, 59], fill=(220, 20, 30))
    draw.rectangle([5, 250, 14, 259], fill=(30, 160, 40))  # 10 x 10 green: 0.1 % of the image
    dets = [Detection("kite", 0.9, [10, 10, 60, 60]), Detection("ball", 0.4, [5, 250, 15, 260])]
    red, green = object_attributes(im, dets)
    assert red == {"label": "kite", "score": 0.9, "box": [10.0, 10.0, 60.0, 60.0], "color": "red",
                   "size": "medium", "position": "top-left"}  # fmt: skip
    assert (green["color"], green["size"], green["position"]) == ("green", "small", "bottom-left")


def test_big_blue_rectangle_is_large_and_centered():
    im, draw = canvas((400, 300))
    draw.rectangle([40, 30, 359, 269], fill=(20, 40, 200))
    [a] = object_attributes(im, [{"label": "bus", "score": 0.7, "box": [40, 30, 360, 270]}])
    assert (a["color"], a["size"], a["position"]) == ("blue", "large", "middle-center")


def test_object_colour_wins_over_some_background():
    im, draw = canvas()
    draw.ellipse([100, 100, 200, 200], fill=(255, 140, 0))  # an orange disc in a box that includes white corners
    [a] = object_attributes(im, [Detection("orange", 0.8, [100, 100, 201, 201])])
    assert a["color"] == "orange"
    assert a["position"] == "middle-center"


@pytest.mark.parametrize(
    ("fill", "name"),
    [((0, 0, 0), "black"), ((20, 20, 25), "black"), ((128, 128, 128), "gray"), ((70, 70, 70), "gray"),
     ((200, 200, 205), "gray"), ((255, 255, 255), "white"), ((245, 245, 240), "white"), ((250, 240, 60), "yellow"),
     ((120, 30, 150), "purple"), ((250, 170, 190), "pink"), ((120, 70, 30), "brown"), ((10, 20, 80), "blue")],
)  # fmt: skip
def test_colour_names_including_achromatic(fill, name):
    im, draw = canvas((120, 120), (255, 255, 255) if name != "white" else (0, 0, 0))
    draw.rectangle([20, 20, 99, 99], fill=fill)
    [a] = object_attributes(im, [Detection("thing", 0.5, [20, 20, 100, 100])])
    assert a["color"] == name
    assert color_names(np.array(fill)) == name


def test_noisy_region_dominant_colour():
    rng = np.random.default_rng(0)
    px = np.clip(rng.normal((200, 30, 40), 25, size=(60, 60, 3)), 0, 255).astype(np.uint8)
    px[:15] = 255  # a quarter white
    assert dominant_color(px) == "red"


def test_geometry_helpers_and_degenerate_boxes():
    assert relative_size([0, 0, 10, 10], 100, 100) == "medium"  # exactly 1 %: no longer small
    assert relative_size([0, 0, 9, 9], 100, 100) == "small"
    assert relative_size([0, 0, 31, 31], 100, 100) == "medium"
    assert relative_size([0, 0, 40, 40], 100, 100) == "large"
    assert position([90, 90, 100, 100], 100, 100) == "bottom-right"
    assert position([40, 0, 60, 10], 100, 100) == "top-center"
    im = Image.new("L", (50, 40), 200)  # not RGB; boxes outside / empty / reversed
    out = object_attributes(im, [Detection("a", 0.5, [-20, -20, 500, 500]), Detection("b", 0.5, [10, 10, 10, 10]),
                                 Detection("c", 0.5, [49.5, 39.5, 60, 60])])  # fmt: skip
    assert [o["color"] for o in out] == ["gray", "gray", "gray"]
    assert out[0]["size"] == "large" and out[1]["size"] == "small"


def test_empty_detections():
    im, _ = canvas()
    assert object_attributes(im, []) == []


# ---- CLIP ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    open_clip = pytest.importorskip("open_clip")
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir / f"{TINY}.json")
    return TINY


@pytest.fixture(scope="module")
def scorer(tiny_model):
    from tasks.attributes import OpenClipScorer

    return OpenClipScorer(tiny_model, pretrained=None, batch_size=2)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    photos = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "images"
    real = [Image.open(p) for p in sorted(photos.glob("*.jpg"))[:2]]
    return [*real, Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("L", (10, 100), 128),
            Image.new("RGBA", (33, 33), (0, 0, 255, 128))]  # fmt: skip


def test_image_and_text_embeddings_are_unit_vectors(scorer, images):
    emb = scorer.image_embeddings(images)  # batch_size 2: three batches
    assert emb.shape == (len(images), 32) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(scorer.image_embeddings(images[:1]), emb[:1], atol=1e-5)  # batching does not change results
    txt = scorer.text_embeddings(["a dog", "a cat", "a dog"])
    assert txt.shape == (3, 32) and np.allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(txt[0], txt[2])
    assert scorer.image_embeddings([]).shape == (0, 32)
    assert scorer.model_id == f"open_clip:{TINY}:random-init"


def test_scores_are_cosines(scorer, images):
    texts = ["a photo of a dog", "a red square", "text"]
    s = scorer.scores(images, texts)
    assert s.shape == (len(images), 3)
    assert np.all(s >= -1.0) and np.all(s <= 1.0)
    expected = scorer.image_embeddings(images) @ scorer.text_embeddings(texts).T
    assert np.allclose(s, expected, atol=1e-5)


def test_clip_tags_top_k(scorer, images):
    from tasks.attributes import clip_tags

    tags = ["dog", "cat", "car", "tree", "sky"]
    out = clip_tags(scorer, images, tags, top_k=3)
    assert len(out) == len(images)
    sims = scorer.scores(images, [f"a photo of {t}" for t in tags])
    for row, sim in zip(out, sims, strict=True):
        assert len(row) == 3
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert [t for t, _ in row] == [tags[i] for i in np.argsort(-sim, kind="stable")[:3]]
    assert all(len(r) == len(tags) for r in clip_tags(scorer, images[:1], tags, top_k=50))
    assert abs(sum(p for _, p in clip_tags(scorer, images[:1], tags, top_k=50)[0]) - 1) < 1e-4
    assert clip_tags(scorer, [], tags, 3) == []


def test_local_checkpoint_roundtrip(scorer, images, tmp_path):
    import torch

    from tasks.attributes import OpenClipScorer

    ckpt = tmp_path / "tiny.pt"
    torch.save(scorer.model.state_dict(), ckpt)
    loaded = OpenClipScorer(TINY, pretrained=str(ckpt))
    assert loaded.model_id.startswith(f"open_clip:{TINY}:tiny.pt@")
    assert np.allclose(loaded.image_embeddings(images), scorer.image_embeddings(images), atol=1e-5)
    assert np.allclose(loaded.text_embeddings(["a dog"]), scorer.text_embeddings(["a dog"]), atol=1e-5)


def test_registry_builds_the_clip_backend(tiny_model):
    from tasks.attributes import OpenClipScorer

    a = load_backend("clip", "open_clip", model=tiny_model, pretrained=None)
    assert isinstance(a, OpenClipScorer) and a is load_backend("clip", "open_clip", model=tiny_model, pretrained=None)


def test_hub_tag_offline_is_a_clear_error_without_network(monkeypatch, tmp_path):
    from tasks.attributes import OpenClipScorer

    attempts = []

    def no_network(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as err:
        OpenClipScorer("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert err.value.role == "clip" and err.value.backend == "open_clip"
    assert "laion2b_s34b_b79k" in str(err.value) and "local checkpoint file" in str(err.value)
    assert attempts == []


def test_bad_names_are_clear_errors(tiny_model, tmp_path):
    from tasks.attributes import OpenClipScorer

    with pytest.raises(ModelUnavailable, match="neither a checkpoint file nor an open_clip tag"):
        OpenClipScorer(tiny_model, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ModelUnavailable, match="unknown open_clip architecture"):
        OpenClipScorer("no-such-arch", pretrained=None)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable) as err:
        OpenClipScorer(tiny_model, pretrained=str(tmp_path / "garbage.pt"))
    assert err.value.role == "clip"
