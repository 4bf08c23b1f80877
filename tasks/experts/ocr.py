"""The OCR expert: text lines with scores and boxes, and the full text in reading order (role `ocr`)."""

from __future__ import annotations

import pyarrow as pa

from tasks.experts import Expert, resolve_backend

OCR_LINE = pa.struct([("text", pa.string()), ("score", pa.float32()), ("box", pa.list_(pa.list_(pa.float32())))])


class OCRExpert(Expert):
    name = "ocr"
    roles = ("ocr",)
    columns = (pa.field("ocr", pa.list_(OCR_LINE)), pa.field("ocr_text", pa.string()))
    published = ("ocr_text",)

    @classmethod
    def plan(cls, cfg, models_dir):
        backend = resolve_backend("ocr", cfg.ocr.backend, cfg.profile, True)
        ocr = cfg.ocr
        options = {"min_score": ocr.min_score, "lang": ocr.lang, "model_dir": ocr.model_dir}
        if backend == "rapidocr":  # the text gate uses RapidOCR's own detector
            options["gate_side"] = ocr.gate_side
        return {"ocr": (backend, options)}

    def run(self, images, rows):
        for row, result in zip(rows, self.models["ocr"].read(images), strict=True):
            row["ocr"] = [{"text": ln.text, "score": ln.score, "box": ln.box} for ln in result.lines]
            row["ocr_text"] = result.full_text
