"""The attributes expert: colour, size and position of each detected object, and CLIP zero-shot tags when a CLIP
model is configured (roles `detector` through the objects expert, and `clip`)."""

from __future__ import annotations

import pyarrow as pa

from infra.models import PROFILES
from tasks.attributes import clip_tags, object_attributes
from tasks.experts import Expert, resolve_backend

TAG = pa.struct([("tag", pa.string()), ("score", pa.float32())])


class AttributesExpert(Expert):
    name = "attributes"
    roles = ("clip",)
    requires = ("objects",)
    columns = (pa.field("tags", pa.list_(TAG)),)

    @classmethod
    def plan(cls, cfg, models_dir):
        # CLIP tags are part of attributes when a CLIP model is configured (or the profile has one).
        on = (cfg.clip.backend or PROFILES[cfg.profile]["clip"]) is not None
        clip = resolve_backend("clip", cfg.clip.backend, cfg.profile, on)
        return {"clip": (clip, {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained}) if clip else None}

    def run(self, images, rows):
        for image, row in zip(images, rows, strict=True):
            row["objects"] = object_attributes(image, row["objects"] or [])
        clip = self.models.get("clip")
        if clip is not None:
            tags = clip_tags(clip, images, list(self.cfg.attributes.tags), self.cfg.attributes.top_k)
            for row, image_tags in zip(rows, tags, strict=True):
                row["tags"] = [{"tag": t, "score": s} for t, s in image_tags]
