"""The stages in pipeline order: the one list that `build`, validation, the suites, publish, the report, the CLI
and the deployments read. A stage's name is its command, its store folder, its spec section and its deployment.

Classes are named as "module:Class" and imported on use, so reading the order costs no model-stack import.
"""

from __future__ import annotations

import importlib
from functools import cache

# name -> "module:Class"; every stage but the last three maps a task over shards.
STAGES: dict[str, str] = {
    "ingest": "tasks.ingest:IngestStage",
    "extract": "tasks.extract:ExtractStage",
    "fuse": "tasks.fuse:FuseStage",
    "translate": "tasks.translate:TranslateStage",
    "score": "tasks.score:ScoreStage",
    "validate": "tasks.validate:ValidateStage",
    "publish": "tasks.publish:PublishStage",
    "report": "tasks.report:ReportStage",
}
ORDER: tuple[str, ...] = tuple(STAGES)
# Stages whose per-shard tables the quality stages read (validated by a suite, joined into the release).
OUTPUT_STAGES: tuple[str, ...] = ("ingest", "extract", "fuse", "translate", "score")
# Store folders of datasets built before the stages shared one name (infra/stages.py: migrate_layout moves them).
LEGACY_FOLDERS: dict[str, str] = {"raw": "ingest", "experts": "extract", "fused": "fuse", "translated": "translate",
                                  "scores": "score", "validation": "validate", "published": "publish"}


@cache
def stage_class(name: str) -> type:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(ORDER)}")
    module, _, cls = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def in_order(names) -> tuple[str, ...]:
    """`names` in pipeline order; unknown names raise ValueError naming the known ones."""
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    return tuple(n for n in ORDER if n in names)


def _current_key(key: str) -> str:
    """A key of the old layout under the current folder names: the stage folder, and inside validation the
    suite folders (`validation/raw/...`, `validation/quarantine/raw/...`, `validation/scores/_reference.json`)."""
    parts = key.split("/")
    depth = 2 if parts[1] != "validation" else (4 if len(parts) > 3 and parts[2] == "quarantine" else 3)
    for i in range(1, min(depth, len(parts) - 1)):
        parts[i] = LEGACY_FOLDERS.get(parts[i], parts[i])
    return "/".join(parts)


def migrate_layout(store, dataset: str) -> int:
    """Move a dataset built with the old folder names (raw/, experts/, fused/, ...) to the stage names, so that it
    resumes and refreshes like any other. Idempotent: an interrupted move is finished by the next call. Returns
    how many objects were moved."""
    moved = 0
    for old in LEGACY_FOLDERS:
        for key in store.list(f"{dataset}/{old}"):
            store.move(key, _current_key(key))
            moved += 1
    return moved
