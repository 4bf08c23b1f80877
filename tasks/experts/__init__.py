"""The vision experts as plug-ins of the extract stage, in the order they run.

An expert declares its name, the model roles it uses (planned and loaded once per role, shared by the experts that
use it), its output columns and its expectations; the extract table's schema, the columns that reach the release
and the extract suite are derived from this list. Adding an expert: one module here with an `Expert` subclass, one
entry in EXPERTS, its config in `ExtractConfig` (see CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from PIL import Image

from infra.models import PROFILES, ModelUnavailable, backend_class

Choice = tuple[str, dict]  # (backend name, its options)


class Expert:
    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]] = ()  # model roles (infra/models.py) this expert calls
    requires: ClassVar[tuple[str, ...]] = ()  # experts whose columns it reads (they run too, and before it)
    columns: ClassVar[tuple[pa.Field, ...]] = ()
    published: ClassVar[tuple[str, ...] | None] = None  # columns that reach the release (None: all of them)

    @classmethod
    def plan(cls, cfg, models_dir: str) -> dict[str, Choice | None]:
        """role -> (backend, options), or None for an optional role that is off; raise ModelUnavailable for what
        cannot run."""
        return {}

    @classmethod
    def expectations(cls, inputs) -> list:
        """GX expectations on this expert's columns (expectations/extract.py adds them to the suite)."""
        return []

    def __init__(self, models: dict[str, Any], cfg):
        self.models, self.cfg = models, cfg

    def run(self, images: list[Image.Image], rows: list[dict]) -> None:
        """Fill this expert's columns of `rows` (one per image, same order). Raises if its backend fails; the
        stage then isolates the failing image."""
        raise NotImplementedError


def resolve_backend(role: str, explicit: str | None, profile: str, needed: bool) -> str | None:
    """The backend name of a role: the explicit one, else the profile's default; checked before any task runs."""
    name = explicit or PROFILES[profile][role]
    if needed and name is None:
        raise ModelUnavailable(role, "none", f"the {profile} profile has no default {role}; set "
                               f"extract.{role}.backend (e.g. {PROFILES['gpu'][role]!r}) or leave this expert out")
    if name is not None:
        backend_class(role, name)  # an unknown backend name fails here, before any task is submitted
    return name if needed else None


def _registry() -> tuple[type[Expert], ...]:
    from tasks.experts.attributes import AttributesExpert
    from tasks.experts.caption import CaptionExpert
    from tasks.experts.objects import ObjectsExpert
    from tasks.experts.ocr import OCRExpert

    return (OCRExpert, ObjectsExpert, AttributesExpert, CaptionExpert)


EXPERTS: tuple[type[Expert], ...] = _registry()
_BASE = (pa.field("key", pa.string()), pa.field("status", pa.string()), pa.field("error", pa.string()))
PROVENANCE = pa.field("provenance", pa.map_(pa.string(), pa.string()))


# The functions below read EXPERTS when called (not at import), so that the registry is the only thing to edit.


def by_name() -> dict[str, type[Expert]]:
    return {e.name: e for e in EXPERTS}


def experts_schema() -> pa.Schema:
    """The extract table: key, status (ok | error | skipped), error, every expert's columns, provenance."""
    return pa.schema([*_BASE, *(c for e in EXPERTS for c in e.columns), PROVENANCE])


def published_columns() -> tuple[str, ...]:
    return tuple(c for e in EXPERTS for c in (e.published if e.published is not None else
                                               tuple(f.name for f in e.columns)))


def selected(names) -> list[type[Expert]]:
    """The experts to run for `extract.experts`, with the ones they require, in registry order."""
    known = by_name()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"extract.experts: unknown expert(s) {', '.join(unknown)} (known: {', '.join(known)})")
    wanted, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(known[name].requires)
    return [e for e in EXPERTS if e.name in wanted]
