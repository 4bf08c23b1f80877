"""How rich can a faithful caption be with this detector? The ceiling of issue 12's measure, without an LLM.

A fused caption can only name the COCO classes that its sources name: the alt-text's and the detector's. This bench
takes, for each annotated COCO photo (shared/data/photos: objects.jsonl, captions.jsonl with the first human caption
as the alt-text), the union of the alt-text's concepts and the detected classes, and scores it with the measure of
bench/fusion_eval.py:
- classes: annotated COCO classes in the union, relative to those the alt-text alone names (the goal is 1.5x);
- unsupported: concepts in the union that are not annotated, over all concepts in it (the goal is at most the
  alt-text's own rate + 3 points).
No caption can beat the row of its detector setting: the LLM and the verifier only drop from it.

Detector settings compared (YOLOX-Nano, the cpu profile's; test-time augmentation tried for recall):
- `full >= t`: the whole image at the model's input (416), score threshold t;
- `+ tiles >= t`: also 2x2 overlapping tiles (25% overlap), each at 416, i.e. twice the resolution (SAHI-style
  slicing, for small objects);
- `+ agreed`: a detection under t kept where the flipped image and a tile both see its class at >= 0.25 / 0.3.

Run:  .venv/bin/python bench/detect_ceiling.py [--photos DIR] [--model PATH] [--images 40]
      [--out bench/results/detect_ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_info  # noqa: E402
from bench.fusion_eval import load_data  # noqa: E402
from tasks.detect import YoloxOnnxDetector  # noqa: E402
from tasks.grounding import canonical_labels, mentioned_concepts  # noqa: E402

SHARED = ROOT.parent / "shared"
TILE_GRID, TILE_OVERLAP = 2, 0.25

Scored = list[tuple[str, float]]  # (label, score)


def tiles(image: Image.Image) -> list[Image.Image]:
    """TILE_GRID x TILE_GRID crops overlapping by TILE_OVERLAP of a tile."""
    w, h = image.size
    span = TILE_GRID - (TILE_GRID - 1) * TILE_OVERLAP
    tw, th = w / span, h / span
    out = []
    for i in range(TILE_GRID):
        for j in range(TILE_GRID):
            x0, y0 = int(i * tw * (1 - TILE_OVERLAP)), int(j * th * (1 - TILE_OVERLAP))
            out.append(image.crop((x0, y0, min(w, int(x0 + tw)), min(h, int(y0 + th)))))
    return out


def detect_views(detector: YoloxOnnxDetector, image: Image.Image) -> dict[str, Scored]:
    def scored(im: Image.Image) -> Scored:
        return [(d.label, d.score) for d in detector.detect([im])[0]]

    return {"full": scored(image), "flip": scored(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
            "tiles": [x for t in tiles(image) for x in scored(t)]}


def settings() -> dict[str, Callable[[dict[str, Scored]], list[str]]]:
    def full(t: float):
        return lambda v: [lab for lab, s in v["full"] if s >= t]

    def with_tiles(t: float, tile_t: float):
        return lambda v: full(t)(v) + [lab for lab, s in v["tiles"] if s >= tile_t]

    def agreed(t: float):
        def pick(v: dict[str, Scored]) -> list[str]:
            flipped = {lab for lab, s in v["flip"] if s >= 0.25}
            tiled = {lab for lab, s in v["tiles"] if s >= 0.3}
            return full(t)(v) + [lab for lab, s in v["full"] if s >= 0.25 and lab in flipped and lab in tiled]
        return pick

    out: dict[str, Callable] = {"alt-text only": lambda v: []}
    for t in (0.6, 0.5, 0.4, 0.3):
        out[f"full >= {t}"] = full(t)
    for t in (0.6, 0.5, 0.4):
        out[f"full >= {t} + tiles >= {t}"] = with_tiles(t, t)
        out[f"full >= {t} + tiles >= {t + 0.15:.2f}"] = with_tiles(t, t + 0.15)
        out[f"full >= {t} + agreed"] = agreed(t)
    return out


def ceiling(samples: list[dict], pick: Callable[[dict[str, Scored]], list[str]]) -> dict:
    union_hits = alt_hits = concepts = unsupported = 0
    for s in samples:
        union = s["alt"] | canonical_labels(pick(s["views"]))
        union_hits += len(union & s["truth"])
        alt_hits += len(s["alt"] & s["truth"])
        concepts += len(union)
        unsupported += len(union - s["truth"])
    return {"classes_vs_alt": union_hits / alt_hits if alt_hits else None,
            "unsupported_rate": unsupported / concepts if concepts else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=SHARED / "data" / "photos")
    p.add_argument("--model", type=Path, default=SHARED / "models" / "detector" / "yolox_nano.onnx")
    p.add_argument("--images", type=int, default=40, help="annotated photos to use, in captions.jsonl order")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "detect_ceiling.json")
    args = p.parse_args(argv)

    chosen, truth = load_data(args.photos, args.images)
    detector = YoloxOnnxDetector(model_path=str(args.model), score_threshold=0.2)
    samples = []
    for c in chosen:
        with Image.open(args.photos / c["file"]) as im:
            views = detect_views(detector, im.convert("RGB"))
        samples.append({"file": c["file"], "views": views, "alt": mentioned_concepts(c["captions"][0]),
                        "truth": truth[Path(c["file"]).name]})

    rows = {name: ceiling(samples, pick) for name, pick in settings().items()}
    goal = rows["alt-text only"]["unsupported_rate"] + 0.03
    print(f"\n{len(samples)} annotated photos; goals: classes >= 1.50x, unsupported <= {100 * goal:.1f}%")
    print(f"{'sources of the caption':<36} {'classes':>8} {'unsupported':>12}  both goals")
    for name, r in rows.items():
        ok = r["classes_vs_alt"] >= 1.5 and r["unsupported_rate"] <= goal + 1e-9
        print(f"{name:<36} {r['classes_vs_alt']:>7.2f}x {100 * r['unsupported_rate']:>11.1f}%  {'yes' if ok else 'no'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "detect_ceiling", "machine": machine_info(),
                                    "model": str(args.model), "images": len(samples), "rows": rows,
                                    "unsupported_goal": goal}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
