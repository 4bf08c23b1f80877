"""The caption expert: a synthetic caption per image from a captioning model (role `captioner`)."""

from __future__ import annotations

import pyarrow as pa

from infra.models import ModelUnavailable
from tasks.experts import Expert, resolve_backend


class CaptionExpert(Expert):
    name = "caption"
    roles = ("captioner",)
    columns = (pa.field("caption_synthetic", pa.string()),)

    @classmethod
    def plan(cls, cfg, models_dir):
        c = cfg.captioner
        backend = resolve_backend("captioner", c.backend, cfg.profile, True)
        if backend == "openai" and not (c.endpoint and c.model):
            raise ModelUnavailable("captioner", backend, "set extract.captioner.endpoint (an OpenAI-compatible "
                                   "server such as vLLM) and extract.captioner.model")
        return {"captioner": (backend, {"endpoint": c.endpoint, "model": c.model, "prompt": c.prompt,
                                        "max_tokens": c.max_tokens, "concurrency": c.concurrency,
                                        "timeout": c.timeout})}

    @classmethod
    def expectations(cls, inputs):
        from expectations.common import text_column

        cfg = inputs.cfg
        return text_column("caption_synthetic", cfg.caption_min_chars, cfg.caption_max_chars)

    def run(self, images, rows):
        for row, (caption, error) in zip(rows, self.models["captioner"].caption_batch(images), strict=True):
            row["caption_synthetic"] = caption
            if error:
                row["status"], row["error"] = "error", f"captioner: {error}"  # tasks.extract.CAPTIONER_ERROR
