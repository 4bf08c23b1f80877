"""Machine translation of captions with quality estimation, one shard at a time (the mBLIP recipe, checked).

mBLIP translated each English caption into one language sampled in proportion to mC4 with NLLB-200 and kept
every output. Here the fused captions (`caption_short`, `caption_dense` from fuse/) and optionally the alt-text
(ingest/) are translated either into every configured language (`allocation: all`) or into `per_sample` languages
drawn per sample from a distribution (`allocation: sample`; the "mc4" preset is mBLIP's choice). The draw is a
function of (seed, sample key) only, so re-runs and appended data give the same languages.

Multi-sentence text is translated sentence by sentence and reassembled in order; identical segments in a shard
are translated once; translations already in the previous translate/ shard are reused by (source text hash,
language, model id), so a re-run with other QE thresholds makes no translator call.

Each target language has its own translator (`plan_translation`): `translate.backends[lang]`, else
`translate.backend`, else the profile's routing: the profile's translator where it has the pair, then its fallback
(cpu: Bergamot for en<->pt, the in-process llama.cpp LLM for every other language). The round trip comes back
through the same translator; it is on for every language with `round_trip`, and for the llamacpp languages unless
`llm_round_trip` is off (a small CPU model's fluent mistranslations pass the other checks). Each row's provenance
and the stage summary name the backend and model per language.

Segmentation and quality estimation live in tasks/translation_qe.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from infra.languages import PRESETS
from infra.models import PROFILES, TRANSLATOR_FALLBACK, ModelUnavailable, backend_class, load_backend, needs_gpu
from infra.settings import TranslateConfig
from tasks.lib.openai_http import server_options
from tasks.shards import RAW, read_marker
from tasks.stage import ShardContext, ShardOutput, ShardStage, StageError, StagePlan, counts_line
from tasks.translation_qe import MAX_SOURCE_CHARS, check_translation, chrf, cut, prepare_source, split_sentences

FUSE = "fuse"
# One translation as the published table carries it (a list of these per sample).
TRANSLATION = pa.struct([("field", pa.string()), ("lang", pa.string()), ("text", pa.string()),
                         ("status", pa.string()), ("qe_passed", pa.bool_()), ("qe_reasons", pa.list_(pa.string()))])
FUSED_FIELDS = ("caption_short", "caption_dense")

TRANSLATED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("field", pa.string()),  # caption_short | caption_dense | alt_text
    ("lang", pa.string()),  # canonical code (ISO 639-1 where one exists)
    ("source_text", pa.string()),
    ("text", pa.string()),  # the translation, kept when flagged; null on error
    ("status", pa.string()),  # ok | flagged | error
    ("qe_passed", pa.bool_()),
    ("qe_reasons", pa.list_(pa.string())),
    ("qe_lang", pa.string()),  # detected language of the output (null: too short to check)
    ("qe_length_ratio", pa.float32()),
    ("qe_chrf_roundtrip", pa.float32()),  # null when round trip is off
    ("provenance", pa.map_(pa.string(), pa.string())),
])


# ---- which languages each sample gets --------------------------------------------------------------------------


def language_weights(cfg: TranslateConfig) -> dict[str, float]:
    """Normalised sampling weights over cfg.languages (sample mode); ValueError for a language with no weight."""
    targets = [lang for lang in cfg.languages if lang != cfg.source_language]
    table = PRESETS[cfg.distribution] if isinstance(cfg.distribution, str) else cfg.distribution
    if table is None:
        table = dict.fromkeys(targets, 1.0)
    missing = [lang for lang in targets if not table.get(lang)]
    if missing:
        what = f"the {cfg.distribution!r} preset" if isinstance(cfg.distribution, str) else "translate.distribution"
        raise ValueError(f"{what} has no weight for {', '.join(missing)}; give translate.distribution as a "
                         "{lang: weight} mapping")
    total = sum(table[lang] for lang in targets)
    return {lang: table[lang] / total for lang in targets}


def _unit_float(*parts: object) -> float:
    """A uniform number in (0, 1) from a hash: the same inputs always give the same number."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2**64


def choose_languages(key: str, cfg: TranslateConfig, weights: dict[str, float] | None = None) -> list[str]:
    """The target languages of one sample: all of them, or `per_sample` drawn without replacement with
    probability proportional to their weight (Efraimidis-Spirakis keys from hash(seed, key, lang))."""
    targets = [lang for lang in cfg.languages if lang != cfg.source_language]
    if cfg.allocation == "all":
        return targets
    weights = weights or language_weights(cfg)
    ranked = sorted(targets, key=lambda lang: math.log(_unit_float(cfg.seed, key, lang)) / weights[lang],
                    reverse=True)
    return sorted(ranked[:cfg.per_sample], key=targets.index)


# ---- planning -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TranslatorChoice:
    name: str
    options: dict


@dataclass(frozen=True)
class TranslationPlan:
    """The translator of each target language (the round trip comes back through the same one)."""

    routes: dict[str, TranslatorChoice]
    round_trip: dict[str, bool]  # per language: translated back and judged by chrF

    @property
    def names(self) -> list[str]:
        return sorted({c.name for c in self.routes.values()})

    def describe(self) -> str:
        """'bergamot: pt; llamacpp: cs, de' (backend: languages)."""
        return "; ".join(f"{name}: {', '.join(lang for lang, c in self.routes.items() if c.name == name)}"
                         for name in self.names)


_PAIRS_HOW = "use backend ctranslate2 with an NLLB-200 model, openai, or llamacpp"


def _options(name: str, cfg: TranslateConfig, models_dir: str | None) -> dict:
    if name == "bergamot":
        return {"concurrency": cfg.concurrency}
    if name == "ctranslate2":
        return {"model": cfg.model, "models_dir": models_dir, "batch_size": cfg.batch_size,
                "device": "cuda" if cfg.profile == "gpu" else "cpu"}
    if name == "openai":
        return server_options("translator", "translate", cfg)
    if name == "llamacpp":
        return _llamacpp_options(cfg, models_dir)
    return {"model": cfg.model}


def _llamacpp_options(cfg: TranslateConfig, models_dir: str | None) -> dict:
    """The in-process LLM's options, its package and model file checked now (nothing is loaded)."""
    from infra.model_assets import DEFAULT_LLM, resolve_llm
    from infra.settings import Settings

    if importlib.util.find_spec("llama_cpp") is None:
        raise ModelUnavailable("translator", "llamacpp", "pip install 'capfactory[llm]' (llama-cpp-python)")
    try:
        resolve_llm(cfg.llm_model, models_dir or Settings().models_dir)
    except ModelUnavailable as e:
        how = e.how.replace("fuse.model", "translate.llm_model")  # the resolver speaks of the fusion setting
        raise ModelUnavailable("translator", "llamacpp", how) from None
    # the fuse stage's options with its default n_ctx and seed: a worker running both stages loads the model once
    return {"model_path": cfg.llm_model or DEFAULT_LLM, "models_dir": models_dir, "n_ctx": 2048, "seed": 0}


def _route(cfg: TranslateConfig, lang: str, models_dir: str | None) -> TranslatorChoice:
    """The first candidate translator that has the pairs of `lang` (there and back with the round trip): the
    configured one, or the profile's translator then its fallback."""
    explicit = cfg.backends.get(lang) or cfg.backend
    candidates = [explicit] if explicit else [b for b in (PROFILES[cfg.profile]["translator"],
                                                          TRANSLATOR_FALLBACK.get(cfg.profile)) if b]
    pairs = [(cfg.source_language, lang)] + ([(lang, cfg.source_language)] if cfg.round_trip else [])
    for i, name in enumerate(candidates):
        cls = backend_class("translator", name)
        try:
            options = _options(name, cfg, models_dir)
        except ModelUnavailable as e:
            if i == 0:
                raise
            raise ModelUnavailable("translator", name, f"it translates {cfg.source_language}->{lang}, which "
                                   f"{candidates[0]} lacks: {e.how}") from None
        missing = cls.unsupported(pairs, **options)
        if not missing:
            return TranslatorChoice(name, options)
    has = ", ".join(f"{a}->{b}" for a, b in cls.supported(**options))
    raise ModelUnavailable("translator", name, "cannot translate " + ", ".join(f"{a}->{b}" for a, b in missing)
                           + f" (it has: {has}); {_PAIRS_HOW}")


def plan_translation(cfg: TranslateConfig, models_dir: str | None = None) -> TranslationPlan:
    """The translator of each target language; raises ModelUnavailable (or ValueError for the languages) before
    anything runs when a backend, its model or a language pair cannot be provided."""
    targets = [lang for lang in cfg.languages if lang != cfg.source_language]
    if not targets:
        raise ValueError(f"translate.languages has no language other than the source ({cfg.source_language})")
    if cfg.allocation == "sample":
        language_weights(cfg)
        if cfg.per_sample > len(targets):
            raise ValueError(f"translate.per_sample is {cfg.per_sample} but only {len(targets)} target languages "
                             "are configured")
    routes = {lang: _route(cfg, lang, models_dir) for lang in targets}
    return TranslationPlan(routes, {lang: cfg.round_trip or (cfg.llm_round_trip and c.name == "llamacpp")
                                    for lang, c in routes.items()})


# ---- the stage ----------------------------------------------------------------------------------------------------

@dataclass
class _Unit:
    key: str
    field: str
    lang: str
    source_text: str  # as stored upstream
    clean: str  # what the translator sees
    cut: bool
    text: str | None = None
    error: str | None = None
    chrf: float | None = None
    cached: bool = False


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def needs_fused(cfg: TranslateConfig) -> bool:
    return any(f in FUSED_FIELDS for f in cfg.fields)


def _previous(ctx: ShardContext, models: dict[str, str]) -> dict[tuple[str, str], tuple[str, float | None]]:
    """(source text hash, lang) -> (translation, round-trip chrF) from the previous translated shard, for rows
    made by the model that translates their language now (`models`: lang -> model id)."""
    cached = {}
    for r in ctx.read_rows(TranslateStage.name, ["lang", "source_text", "text", "qe_chrf_roundtrip", "provenance"],
                           missing_ok=True):
        prov = dict(r["provenance"] or [])
        made_by = prov.get(f"model.{r['lang']}", prov.get("model"))  # "model": shards made before the routing
        if r["text"] is not None and made_by == models.get(r["lang"]):
            cached[(_text_hash(prepare_source(r["source_text"])[0]), r["lang"])] = (r["text"], r["qe_chrf_roundtrip"])
    return cached


def _translate_all(backends: dict[str, object], requests: list[tuple[str, str, str]],
                   batch_size: int, source: str) -> dict[tuple, object]:
    """Translate unique (segment, source, target) requests, grouped by direction, in batches, each direction by
    the backend of its language other than `source`."""
    results: dict[tuple, object] = {}
    by_pair: dict[tuple[str, str], list[str]] = {}
    for seg, src, tgt in dict.fromkeys(requests):
        by_pair.setdefault((src, tgt), []).append(seg)
    for (src, tgt), segments in by_pair.items():
        backend = backends[tgt if src == source else src]
        for start in range(0, len(segments), batch_size):
            chunk = segments[start:start + batch_size]
            for seg, res in zip(chunk, backend.translate(chunk, src, tgt), strict=True):
                results[(seg, src, tgt)] = res
    return results


def _assemble(segments: list[str], results: dict, src: str, tgt: str) -> tuple[str | None, str | None]:
    parts = [results[(s, src, tgt)] for s in segments]
    errors = [p.error for p in parts if p.text is None]
    if errors:
        return None, errors[0]
    return " ".join(p.text for p in parts), None


def _segments(text: str, cfg: TranslateConfig) -> list[str]:
    return split_sentences(text) if cfg.segment else cut(text)


class TranslateStage(ShardStage):
    name = "translate"
    description = "Machine translation of the captions into the spec's target languages."
    schema = TRANSLATED_SCHEMA
    reads = (RAW, FUSE)
    published = ("translations",)  # the long table pivoted, see release_columns
    retries = 2
    warm = ("tasks.translate",)

    def upstream(self) -> tuple[str, ...]:
        """The raw shard and, when caption fields are translated, the fused one."""
        return (RAW, FUSE) if needs_fused(self.config) else (RAW,)

    def required(self) -> tuple[str, ...]:
        return self.upstream()

    def plan(self) -> StagePlan:
        plan = plan_translation(self.config, self.models_dir)
        return StagePlan({"translator": plan.describe()}, needs_gpu(self.config.profile, plan.names), plan)

    def check_backends(self) -> None:
        plan = plan_translation(self.config, self.models_dir)
        for choice in {c.name: c for c in plan.routes.values()}.values():
            if choice.name == "openai":
                backend_class("translator", choice.name)(**choice.options).health_check()

    def check_dataset(self, store, dataset: str, shards: list[int]) -> None:
        if needs_fused(self.config) and shards and not any(read_marker(store, dataset, FUSE, s) for s in shards):
            fields = ", ".join(f for f in self.config.fields if f in FUSED_FIELDS)
            raise StageError(f"translate.fields asks for {fields}, which come from the fuse stage, but dataset "
                             f"{dataset!r} was never fused: run `capfactory fuse --dataset {dataset}` first, or "
                             "translate --fields alt_text")

    def process(self, ctx: ShardContext) -> ShardOutput:
        cfg = self.config
        plan = plan_translation(cfg, self.models_dir)
        backends = {lang: load_backend("translator", c.name, **c.options) for lang, c in plan.routes.items()}
        models = {lang: b.model_id for lang, b in backends.items()}
        units = self._units(ctx)
        previous = _previous(ctx, models)
        for u in units:
            hit = previous.get((_text_hash(u.clean), u.lang))
            if hit:
                u.text, u.chrf, u.cached = hit[0], hit[1], True
        calls = _translate_units(backends, [u for u in units if not u.cached], units, cfg, plan.round_trip)
        prov = {lang: [(f"backend.{lang}", c.name), (f"model.{lang}", models[lang]),
                       ("config_hash", self.config_hash), ("source_language", cfg.source_language)]
                for lang, c in plan.routes.items()}
        rows = [_translated_row(u, cfg, prov[u.lang], plan.round_trip[u.lang]) for u in units]
        stats = {
            "samples": len({u.key for u in units}), "rows": len(rows),
            "languages": dict(Counter(r["lang"] for r in rows)),
            "languages_ok": dict(Counter(r["lang"] for r in rows if r["status"] == "ok")),
            "qe_reasons": dict(Counter(reason.split(":", 1)[0] for r in rows for reason in r["qe_reasons"])),
            "translator_calls": calls, "cache_hits": sum(1 for u in units if u.cached),
            "provenance": {f"translator {lang}": f"{c.name} ({models[lang]})"
                           + (", round trip" if plan.round_trip[lang] else "") for lang, c in plan.routes.items()},
        }
        return ShardOutput(rows, stats, [u.error for u in units if u.error])

    def _units(self, ctx: ShardContext) -> list[_Unit]:
        """One unit per (sample with an image, field with text, language), in shard order."""
        cfg = self.config
        fused = {r["key"]: r for r in ctx.read_rows(FUSE, ["key", *FUSED_FIELDS])} if needs_fused(cfg) else {}
        weights = language_weights(cfg) if cfg.allocation == "sample" else None
        units = []
        for r in ctx.read_rows(RAW, ["key", "status", "alt_text"]):
            if r["status"] != "ok":
                continue
            langs = choose_languages(r["key"], cfg, weights)
            for name in cfg.fields:
                text = r["alt_text"] if name == "alt_text" else fused.get(r["key"], {}).get(name)
                clean, cut = prepare_source(text)
                if clean:
                    units.extend(_Unit(r["key"], name, lang, text, clean, cut) for lang in langs)
        return units

    def release_columns(self, keys: pa.Array, table: pa.Table, drop_failed_translations: bool = False,
                        **options) -> dict[str, pa.Array]:
        """The long table (one row per key, field, lang) as one `translations` list per key; failed translations
        (no text), and flagged ones with `drop_failed_translations`, are left out."""
        by_key: dict[str, list[dict]] = {}
        for r in table.select(["key", *TRANSLATION.names]).to_pylist():
            if r["text"] is None or r["status"] == "error" or (drop_failed_translations and r["status"] != "ok"):
                continue
            by_key.setdefault(r["key"], []).append({n: r[n] for n in TRANSLATION.names})
        return {"translations": pa.array([by_key.get(k, []) for k in keys.to_pylist()], pa.list_(TRANSLATION))}

    def summary(self, result: dict) -> list[str]:
        ok = result.get("languages_ok", {})
        lines = [counts_line("rows", result.get("counts", {})),
                 "  languages (rows, QE passed): " + ", ".join(f"{k}={v} ({ok.get(k, 0)} ok)"
                                                              for k, v in sorted(result.get("languages", {}).items()))]
        if result.get("qe_reasons"):
            lines.append("  QE flags: " + ", ".join(f"{k}={v}" for k, v in sorted(result["qe_reasons"].items())))
        lines.append(f"  translator calls {result.get('translator_calls', 0)}, cache hits "
                     f"{result.get('cache_hits', 0)}")
        return lines + [f"  {k}: {v}" for k, v in result.get("provenance", {}).items()]


def _translate_units(backends: dict[str, object], todo: list[_Unit], units: list[_Unit], cfg: TranslateConfig,
                     round_trip: dict[str, bool]) -> int:
    """Translate the units not in the cache (and, for the languages with a round trip, back), each language by its
    backend; returns the translator calls made."""
    src_lang = cfg.source_language
    forward = _translate_all(backends, [(s, src_lang, u.lang) for u in todo for s in _segments(u.clean, cfg)],
                             cfg.batch_size, src_lang)
    for u in todo:
        u.text, u.error = _assemble(_segments(u.clean, cfg), forward, src_lang, u.lang)
    backward: dict = {}
    back_units = [u for u in units if u.text is not None and u.chrf is None and round_trip[u.lang]]
    if back_units:
        backward = _translate_all(backends, [(s, u.lang, src_lang) for u in back_units
                                             for s in _segments(u.text, cfg)], cfg.batch_size, src_lang)
        for u in back_units:
            back, _ = _assemble(_segments(u.text, cfg), backward, u.lang, src_lang)
            u.chrf = chrf(back, u.clean) if back is not None else None
    return len(forward) + len(backward)


def _translated_row(u: _Unit, cfg: TranslateConfig, base_prov: list, round_trip: bool) -> dict:
    row = {"key": u.key, "field": u.field, "lang": u.lang, "source_text": u.source_text, "text": u.text,
           "provenance": [*base_prov, ("cache", "hit" if u.cached else "miss")]}
    if u.text is None:
        row.update(status="error", qe_passed=False, qe_reasons=[f"translator_error: {u.error}"])
        return row
    qe = check_translation(u.clean, u.text, u.lang, source_language=cfg.source_language,
                           min_ratio=cfg.min_length_ratio, max_ratio=cfg.max_length_ratio,
                           chrf_roundtrip=u.chrf if round_trip else None, min_chrf=cfg.min_chrf)
    reasons = list(qe.reasons)
    if round_trip and u.chrf is None:
        reasons.append("roundtrip_chrf: the back translation failed")
    if u.cut:
        reasons.append(f"source_truncated: only the first {MAX_SOURCE_CHARS} characters were translated")
    row.update(status="flagged" if reasons else "ok", qe_passed=not reasons, qe_reasons=reasons, qe_lang=qe.lang,
               qe_length_ratio=qe.length_ratio, qe_chrf_roundtrip=u.chrf if round_trip else None)
    return row
