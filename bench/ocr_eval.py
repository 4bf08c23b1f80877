"""OCR accuracy and speed on the ICDAR2015 test images and word crops in shared/data/text_images.

What it measures, per system:
- scene text (the ICDAR2015 "incidental scene text" test images in labels.jsonl; 30 in the development split):
  word-level precision / recall / F1, micro over all images. Ground truth = the transcription of every box not
  marked ignore (`###`); prediction = the system's whole text of the image. Both sides go through
  `tasks.ocr.ocr_words` (split on whitespace, punctuation and symbols stripped at the word ends, casefolded); a word
  matches once per occurrence (multiset intersection per image), so the score does not depend on how the engine
  groups words into lines.
- word crops (the ICDAR2015 cropped words in labels.jsonl; 10 in the development split): accuracy = the crop's word
  equals the concatenated prediction, both normalised as above (the full detect + recognise pipeline, as the stage
  runs it).
- speed over the scene images (decoded beforehand), one image per call, after one warm-up call, median of
  `--repeats` passes: images/s (wall) and CPU seconds per image (process time, all threads): the bare engine uses
  every core, the backend one ONNX Runtime thread.
- lines containing CJK characters: the wheel's recogniser reads Chinese + English, and the ICDAR2015 ground truth
  transcribes Latin script only, so a CJK line is either a misread or real Chinese text the ground truth leaves out
  (both occur: see per_image in the JSON). CJK words never match the ground truth, so they count against precision.

Systems:
- `bare RapidOCR()(np.array(img))`: the engine at its own defaults (text_score 0.5, all threads), given the RGB
  array exactly like that -- RapidOCR takes an ndarray as BGR, so it sees red and blue swapped;
- `bare RapidOCR()(pil_img)`: the same engine given the PIL image, which it converts to BGR itself;
- `bare RapidOCR rec-only` (crops only): recognition without detection (`use_det=False`), the crop as one line;
- `RapidOCRBackend min_score=S`: our backend (tasks/ocr.py), as the stage calls it, for each `--min-scores`;
- `tesseract` (only when the `tesseract` binary is on PATH): `tesseract IMG stdout -l eng`, one subprocess per image;
- `pipeline [S]` for each `--pipeline` setting S: the scene images served by a loopback HTTP server, crawled by
  ingest with default settings except the analysis copy (`default`: as shipped; `none`: no analysis copy, as before
  it existed, so OCR reads the 256 px training copy; a number: `analysis_size`), then the extract stage (OCR expert,
  default `ExtractConfig`) and its table's `ocr` lines: what `capfactory extract` gives (bench/expert_path.py). Its
  speed columns are the stage's wall time per image (ingest not included).

- `--gates 0,640` (the text gate, `OCRConfig.gate_side`; 0 = off): instead of the systems above, our backend at
  min_score 0.5 with each gate setting, the settings' timed passes alternating (A B A B, `--repeats` rounds) in one
  process, on the scene images (word P/R/F1 against the ground truth) and on the COCO photos of `--photos` (no OCR
  ground truth, and most have no text: P/R/F1 against the first setting's output, i.e. how much of the ungated
  read survives). Speed: images/s (wall) and CPU s/image, median over the rounds; "gated" = images whose text
  gate found no text (the full read skipped). Writes bench/results/ocr_gate.json by default.

Run:  .venv/bin/python bench/ocr_eval.py [--data DIR] [--min-scores 0.5,0.0] [--pipeline default,none]
      [--out bench/results/ocr_eval.json]
      .venv/bin/python bench/ocr_eval.py --gates 0,640 [--photos DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_info  # noqa: E402
from bench.expert_path import describe, image_settings, ingest_and_extract  # noqa: E402
from infra.settings import ExtractConfig  # noqa: E402
from tasks.ocr import RapidOCRBackend, ocr_words  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "text_images"
DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "photos" / "images"
DEFAULT_OUT = ROOT / "bench" / "results" / "ocr_eval.json"
CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")

Reader = Callable[[Image.Image], list[str]]  # image -> its text lines


def load(data: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (data / "labels.jsonl").read_text(encoding="utf-8").splitlines() if line]
    scenes = [r for r in rows if r["kind"] == "scene_text"]
    crops = [r for r in rows if r["kind"] == "word_crop"]
    for r in scenes:
        r["gt_words"] = [w for b in r["boxes"] if not b["ignore"] and b["text"] != "###" for w in ocr_words(b["text"])]
    for r in crops:
        r["gt_words"] = ocr_words(r["text"])
    return scenes, crops


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def bare_engine_readers() -> dict[str, Reader]:
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()  # its own defaults

    def lines(result) -> list[str]:
        return [text for _, text, _ in (result[0] or [])]

    def rec_only(img: Image.Image) -> list[str]:
        result, _ = engine(img, use_det=False, use_cls=False)
        return [text for text, score in (result or []) if score >= engine.text_score]

    return {
        "bare RapidOCR()(np.array(img))": lambda img: lines(engine(np.array(img))),
        "bare RapidOCR()(pil_img)": lambda img: lines(engine(img)),
        "bare RapidOCR rec-only (crops)": rec_only,
    }


def backend_reader(min_score: float) -> tuple[str, Reader, str]:
    backend = RapidOCRBackend(min_score=min_score, lang="en", model_dir=None)
    return (f"RapidOCRBackend min_score={min_score:g}",
            lambda img: [ln.text for ln in backend.read([img])[0].lines], backend.model_id)


def tesseract_reader(binary: str) -> Reader:
    def read(img: Image.Image) -> list[str]:
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            img.save(f.name)
            out = subprocess.run([binary, f.name, "stdout", "-l", "eng"], capture_output=True, text=True,
                                 timeout=120, check=False)
        return [line for line in out.stdout.splitlines() if line.strip()]

    return read


def score_scenes(read: Reader, scenes: list[dict], data: Path, repeats: int) -> dict:
    images = [open_rgb(data / r["file"]) for r in scenes]  # decoded once: the timing is OCR only
    read(images[0])  # warm-up (first-run allocations), not timed
    walls, cpus, outputs = [], [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        outputs = [read(img) for img in images]
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return score_outputs(scenes, outputs, walls, cpus)


def score_pipeline(setting: str, scenes: list[dict], data: Path) -> dict:
    """The scene images through ingest (loopback crawl) and the extract stage's OCR expert."""
    files = [data / r["file"] for r in scenes]
    c0 = time.process_time()
    run = ingest_and_extract(files, ExtractConfig(experts=("ocr",)), "", image_settings(setting))
    outputs = [[line["text"] for line in run["rows"][f]["ocr"] or []] for f in files]
    result = score_outputs(scenes, outputs, [run["extract_s"]], [time.process_time() - c0])
    return {**result, "tar_bytes": run["tar_bytes"], "training_copy_images": run["training_copy_images"]}


def score_outputs(scenes: list[dict], outputs: list[list[str]], walls: list[float], cpus: list[float]) -> dict:
    tp = n_pred = n_gt = cjk_lines = 0
    per_image = []
    for r, lines in zip(scenes, outputs, strict=True):
        pred = [w for line in lines for w in ocr_words(line)]
        matched = sum((Counter(pred) & Counter(r["gt_words"])).values())
        tp, n_pred, n_gt = tp + matched, n_pred + len(pred), n_gt + len(r["gt_words"])
        cjk_lines += sum(1 for line in lines if CJK.search(line))
        per_image.append({"file": r["file"], "gt": r["gt_words"], "pred": lines, "matched": matched})
    p = tp / n_pred if n_pred else 0.0
    rec = tp / n_gt if n_gt else 0.0
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {
        "images": len(scenes), "gt_words": n_gt, "pred_words": n_pred, "matched": tp,
        "precision": p, "recall": rec, "f1": 2 * p * rec / (p + rec) if p + rec else 0.0, "cjk_lines": cjk_lines,
        "pass_wall_s": walls, "pass_cpu_s": cpus, "images_per_s": len(scenes) / wall,
        "cpu_s_per_image": cpu / len(scenes), "per_image": per_image,
    }


def score_crops(read: Reader, crops: list[dict], data: Path) -> dict:
    correct, per_crop = 0, []
    for r in crops:
        lines = read(open_rgb(data / r["file"]))
        pred = "".join(w for line in lines for w in ocr_words(line))
        ok = pred == "".join(r["gt_words"])
        correct += ok
        per_crop.append({"file": r["file"], "gt": r["text"], "pred": lines, "correct": ok})
    return {"crops": len(crops), "correct": correct, "accuracy": correct / len(crops), "per_crop": per_crop}


def word_scores(truth: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro word P/R/F1 over images (multiset match per image)."""
    tp = sum(sum((Counter(t) & Counter(p)).values()) for t, p in zip(truth, pred, strict=True))
    n_t, n_p = sum(map(len, truth)), sum(map(len, pred))
    prec, rec = (tp / n_p if n_p else 1.0), (tp / n_t if n_t else 1.0)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "matched": tp, "truth_words": n_t, "pred_words": n_p}


def compare_gates(gates: list[int], scenes: list[dict], data: Path, photos: Path, repeats: int) -> list[dict]:
    """Our backend with each gate setting, passes alternating between the settings (wall-clock noise shared)."""
    sets = {"icdar_scenes": [open_rgb(data / r["file"]) for r in scenes],
            "coco_photos": [open_rgb(f) for f in sorted(photos.glob("*.jpg"))]}
    backends = {g: RapidOCRBackend(min_score=0.5, lang="en", model_dir=None, gate_side=g) for g in gates}
    for b in backends.values():
        b.read(sets["icdar_scenes"][:1])  # warm-up, not timed
    timing = {(g, name): ([], []) for g in gates for name in sets}
    words: dict[tuple[int, str], list[list[str]]] = {}
    gated: dict[tuple[int, str], int] = {}
    for _ in range(repeats):
        for name, images in sets.items():
            for g, b in backends.items():
                b.counts.clear()
                t0, c0 = time.perf_counter(), time.process_time()
                out = b.read(images)
                timing[g, name][0].append(time.perf_counter() - t0)
                timing[g, name][1].append(time.process_time() - c0)
                words[g, name] = [ocr_words(r.full_text) for r in out]
                gated[g, name] = b.counts["gated"]
    truth = {"icdar_scenes": [r["gt_words"] for r in scenes], "coco_photos": words[gates[0], "coco_photos"]}
    rows = []
    for name, images in sets.items():
        for g in gates:
            walls, cpus = timing[g, name]
            rows.append({"set": name, "gate_side": g, "images": len(images), "gated": gated[g, name],
                         "truth": "ground truth" if name == "icdar_scenes" else f"gate_side={gates[0]} output",
                         **word_scores(truth[name], words[g, name]),
                         "images_per_s": len(images) / statistics.median(walls),
                         "cpu_s_per_image": statistics.median(cpus) / len(images),
                         "pass_wall_s": walls, "pass_cpu_s": cpus})
    return rows


def main_gates(args: argparse.Namespace, scenes: list[dict]) -> None:
    gates = [int(x) for x in args.gates.split(",") if x.strip()]
    rows = compare_gates(gates, scenes, args.data, args.photos, args.repeats)
    header = f"{'set':<13} {'gate':>5} {'gated':>7} {'P':>6} {'R':>6} {'F1':>6} {'img/s':>6} {'cpu s/img':>9}  truth"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['set']:<13} {r['gate_side']:>5} {r['gated']:>3}/{r['images']:<3} {r['precision']:>6.3f} "
              f"{r['recall']:>6.3f} {r['f1']:>6.3f} {r['images_per_s']:>6.2f} {r['cpu_s_per_image']:>9.3f}  "
              f"{r['truth']}")
    out = args.out if args.out != DEFAULT_OUT else ROOT / "bench" / "results" / "ocr_gate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "ocr_eval --gates", "data": str(args.data), "photos": str(args.photos),
                               "repeats": args.repeats, "machine": machine_info(), "rows": rows}, indent=1) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--min-scores", default="0.5,0.0", help="comma-separated min_score values for our backend")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the scene images (median reported)")
    ap.add_argument("--pipeline", default="default,none",
                    help="ingest image settings to run the pipeline path with (default | none | analysis_size)")
    ap.add_argument("--gates", default="", help="comma-separated gate_side values to compare (0 = off); see above")
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="photo folder for --gates")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if not (args.data / "labels.jsonl").is_file():
        raise SystemExit(f"no labels.jsonl in {args.data} (the ICDAR2015 split of shared/data/text_images)")
    scenes, crops = load(args.data)
    if args.gates:
        main_gates(args, scenes)
        return

    bare = bare_engine_readers()
    systems: list[tuple[str, Reader, bool, bool]] = [  # name, reader, on scenes, on crops
        ("bare RapidOCR()(np.array(img))", bare["bare RapidOCR()(np.array(img))"], True, True),
        ("bare RapidOCR()(pil_img)", bare["bare RapidOCR()(pil_img)"], True, True),
        ("bare RapidOCR rec-only (crops)", bare["bare RapidOCR rec-only (crops)"], False, True),
    ]
    model_id = None
    for s in (float(x) for x in args.min_scores.split(",") if x.strip()):
        name, reader, model_id = backend_reader(s)
        systems.append((name, reader, True, True))
    tesseract = shutil.which("tesseract")
    if tesseract:
        systems.append(("tesseract -l eng", tesseract_reader(tesseract), True, True))

    results = []
    for name, reader, on_scenes, on_crops in systems:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append({"system": name,
                        "scenes": score_scenes(reader, scenes, args.data, args.repeats) if on_scenes else None,
                        "crops": score_crops(reader, crops, args.data) if on_crops else None})

    for setting in (x.strip() for x in args.pipeline.split(",") if x.strip()):
        name = describe(setting)
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append({"system": name, "scenes": score_pipeline(setting, scenes, args.data), "crops": None})

    header = (f"{'system':<48} {'P':>6} {'R':>6} {'F1':>6} {'match/gt/pred':>14} {'CJK':>4} "
              f"{'img/s':>6} {'cpu s/img':>9} {'crops acc':>10}")
    print(f"\nICDAR2015 test: {len(scenes)} scene images (word P/R/F1), {len(crops)} word crops (accuracy)")
    print(header)
    print("-" * len(header))
    for r in results:
        s, c = r["scenes"], r["crops"]
        crops_txt = f"{c['correct']}/{c['crops']} {c['accuracy']:.2f}" if c else "-"
        if s:
            print(f"{r['system']:<48} {s['precision']:>6.3f} {s['recall']:>6.3f} {s['f1']:>6.3f} "
                  f"{s['matched']:>4}/{s['gt_words']}/{s['pred_words']:<4} {s['cjk_lines']:>4} "
                  f"{s['images_per_s']:>6.2f} {s['cpu_s_per_image']:>9.2f} {crops_txt:>10}")
        else:
            print(f"{r['system']:<48} {'-':>6} {'-':>6} {'-':>6} {'-':>14} {'-':>4} {'-':>6} {'-':>9} {crops_txt:>10}")
    if not tesseract:
        print("(tesseract: not installed, no row)")
    reference = next(r for r in results if r["system"] == "bare RapidOCR()(pil_img)")["scenes"]["per_image"]
    for r in results:
        if r["scenes"] and r["system"].startswith(("RapidOCRBackend", "pipeline")):
            same = sum(Counter(a["pred"]) == Counter(b["pred"]) for a, b in zip(r["scenes"]["per_image"], reference,
                                                                                strict=True))
            r["scenes"]["same_lines_as_bare_pil"] = same
            print(f"{r['system']}: the same lines as bare RapidOCR()(pil_img) on {same}/{len(reference)} images")

    out = {
        "benchmark": "ocr_eval",
        "data": str(args.data),
        "versions": {"rapidocr-onnxruntime": importlib.metadata.version("rapidocr-onnxruntime"),
                     "onnxruntime": importlib.metadata.version("onnxruntime"), "backend_model_id": model_id,
                     "tesseract": tesseract},
        "machine": machine_info(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
