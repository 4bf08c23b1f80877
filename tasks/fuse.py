"""LLM fusion (FuseCap / CapsFusion / rank-and-fuse) over one shard: enriched short and dense captions.

For each ingested sample, the alt-text, the experts' outputs (OCR text, objects with counts, colours and
positions, a synthetic caption) are put into a versioned prompt template as delimited data; an LLM writes the
captions; guards check every caption (length, leakage/refusal, language, grounding of asserted objects,
injected payloads). A caption that fails is not used: `caption_short` / `caption_dense` fall back to the
alt-text (without injected instructions) and the reasons are kept. The alt-text itself is never replaced.

Completions are cached by (prompt hash, inputs hash, model id, generation settings): a re-run with a changed
guard threshold re-checks stored completions without calling the LLM again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa
import yaml

from infra.model_assets import DEFAULT_LLM, resolve_llm
from infra.models import PROFILES, backend_class, load_backend, needs_gpu
from infra.settings import FuseConfig, Settings
from tasks.guards import check_caption, find_injection, injection_payloads
from tasks.lib.openai_http import server_options
from tasks.lib.text import pluralize
from tasks.shards import RAW
from tasks.stage import ShardContext, ShardOutput, ShardStage, StagePlan, counts_line
from tasks.verify import Sources, build_support, omissions, template_runs, verify_claims

EXTRACT = "extract"
PROMPTS = Path(__file__).with_name("prompts")
MAX_FIELD_CHARS = 600  # untrusted text fields are cut to this length in prompts
_DELIMITERS = re.compile(r"</?\s*data\s*>", re.IGNORECASE)

FUSED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),  # ok | skipped (no image) | error (LLM failed)
    ("alt_text", pa.string()),
    ("caption_short", pa.string()),  # the fused short caption if it passed its guards, else the alt-text
    ("caption_dense", pa.string()),
    ("fused_short", pa.string()),  # the LLM's output, kept even when rejected
    ("fused_dense", pa.string()),
    ("short_passed", pa.bool_()),
    ("dense_passed", pa.bool_()),
    ("short_reasons", pa.list_(pa.string())),
    ("dense_reasons", pa.list_(pa.string())),
    ("mentioned", pa.list_(pa.string())),  # object concepts the accepted/attempted captions assert
    ("unsupported", pa.list_(pa.string())),
    ("input_injection", pa.string()),  # instruction-like text found in alt-text or OCR, removed from the prompt
    ("cache_short", pa.string()),
    ("cache_dense", pa.string()),
    ("provenance", pa.map_(pa.string(), pa.string())),
])


@cache
def load_prompts(version: str) -> dict:
    path = PROMPTS / f"{version}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPTS.glob("*.yaml"))
        raise ValueError(f"no prompt version {version!r} (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def prompt_hash(version: str, mode: str) -> str:
    p = load_prompts(version)
    return hashlib.sha256(json.dumps([p["system"], p["modes"][mode]], sort_keys=True).encode()).hexdigest()[:16]


def _clean(text: str | None) -> str | None:
    """Untrusted text as prompt data: no delimiters, one line, bounded length; None when empty."""
    if not text:
        return None
    text = " ".join(_DELIMITERS.sub(" ", text).split())
    return ((text[:MAX_FIELD_CHARS] + "...") if len(text) > MAX_FIELD_CHARS else text) or None


def _strip_injection(text: str | None) -> tuple[str | None, str | None]:
    """Remove the sentences of `text` that carry instructions; returns (clean text, what was found)."""
    found = find_injection(text) if text else None
    if not found:
        return text, None
    kept = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s and not find_injection(s)]
    return " ".join(kept) or None, found


def fallback_caption(alt_text: str | None) -> str | None:
    """What a caption slot holds when its fused caption is not used: the alt-text without injected instructions
    (the `alt_text` column itself stays as it came)."""
    return _strip_injection(alt_text)[0]


_NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


# Labels whose box colour is no colour of the thing: a person's is their clothes (and reads as race), food's a mix.
_NO_COLOUR = frozenset({"person", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
                        "donut", "cake", "potted plant"})


def stated_colours(objects: list[dict]) -> list[dict]:
    """The detections with the colours a caption may state: that of a single object only (the dominant colour of
    one box; several boxes rarely agree), never for people or food. The same list is the prompt's facts and the
    verifier's support."""
    counts = Counter(o["label"] for o in objects)
    return [o if counts[o["label"]] == 1 and o["label"] not in _NO_COLOUR else {**o, "color": None}
            for o in objects]


def describe_objects(objects: list[dict] | None) -> str | None:
    """The detections as a plain English phrase, counts as words, most frequent first: 'two people, a white
    horse' (colours as `stated_colours` leaves them). None when nothing was detected."""
    if not objects:
        return None
    groups: dict[str, list[dict]] = {}
    for o in stated_colours(objects):
        groups.setdefault(o["label"], []).append(o)
    parts = []
    for label, items in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        n = len(items)
        colour = items[0].get("color")
        name = label if n == 1 else ("people" if label == "person" else pluralize(label))
        count = _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else "many"
        if n == 1:
            count = "an" if (colour or label)[0] in "aeiou" else "a"
        parts.append(" ".join(p for p in (count, colour, name) if p))
    return ", ".join(parts)


def confident(objects: list[dict] | None, min_score: float) -> list[dict]:
    """The detections a caption may state: at least `min_score` (an object without a score counts), with the
    colours it may state."""
    return stated_colours([o for o in objects or [] if (o.get("score") is None or o["score"] >= min_score)])


@dataclass
class FuseInputs:
    key: str
    alt_text: str | None
    ocr_text: str | None
    objects: list[dict] | None
    synthetic: str | None
    candidates: list[str] | None = None  # rank-and-fuse: the two best captions

    @property
    def labels(self) -> list[str]:
        return [o["label"] for o in self.objects or []]


FACT_LABELS = {"alt_text": "alt-text", "ocr_text": "text in the image", "objects": "objects",
                "synthetic": "machine caption"}


def facts_block(facts: dict) -> str:
    """The facts of one image as 'label: value' lines; missing facts are left out; OCR text is quoted."""
    lines = []
    for name, label in FACT_LABELS.items():
        value = facts.get(name)
        if value:
            lines.append(f'{label}: "{value}"' if name == "ocr_text" else f"{label}: {value}")
    lines += [f"caption {i + 1}: {c}" for i, c in enumerate(facts.get("candidates") or [])]
    return "\n".join(lines) or "alt-text: (no facts)"


def prompt_spec(version: str, mode: str, output: str) -> dict:
    """One output's prompt: {'instruction', 'examples', 'stop'} or {'template', 'stop'}."""
    modes = load_prompts(version)["modes"]
    if mode not in modes or output not in modes[mode]:
        raise ValueError(f"prompt version {version!r} has no {mode}/{output} prompt")
    return modes[mode][output]


def prompt_texts(version: str) -> list[str]:
    """The fixed text of a prompt version (system, instructions, templates): what a caption must not echo."""
    p = load_prompts(version)
    texts = [p["system"]]
    for outputs in p["modes"].values():
        texts += [spec.get("instruction") or spec.get("template", "") for spec in outputs.values()]
    return texts


def build_messages(inputs: FuseInputs, mode: str, output: str, version: str) -> tuple[list[dict], str | None]:
    """The chat messages for one output, and any injection found (and removed) in the untrusted inputs.

    The system message and the few-shot examples (earlier user/assistant turns) come first and are the same for
    every sample; the sample's facts come last."""
    alt, found_alt = _strip_injection(inputs.alt_text)
    ocr, found_ocr = _strip_injection(inputs.ocr_text)
    facts = {"alt_text": _clean(alt), "ocr_text": _clean(ocr), "objects": describe_objects(inputs.objects),
             "synthetic": _clean(inputs.synthetic),
             "candidates": [c for c in (_clean(_strip_injection(c)[0]) for c in inputs.candidates or []) if c]}
    spec = prompt_spec(version, mode, output)
    messages = [{"role": "system", "content": load_prompts(version)["system"]}]
    if "template" in spec:
        user = spec["template"].format(**{k: v or "" for k, v in facts.items() if k != "candidates"})
    else:
        for example in spec.get("examples", []):
            messages += [{"role": "user", "content": f"{facts_block(example['facts'])}\n\n{spec['instruction']}"},
                         {"role": "assistant", "content": " ".join(example["caption"].split())}]
        user = f"{facts_block(facts)}\n\n{spec['instruction']}"
    return [*messages, {"role": "user", "content": user}], found_alt or found_ocr


def normalise_output(text: str | None) -> str | None:
    """The caption out of a completion: first paragraph, without wrapping quotes or whitespace runs."""
    if text is None:
        return None
    text = text.strip().split("\n\n", 1)[0]
    text = " ".join(text.split()).strip()
    if text[:1] in "\"“" and text.count('"') + text.count("“") + text.count("”") == 2 and text[-1:] in "\"”":
        text = text[1:-1].strip()  # the whole caption in quotes; quoted OCR text inside stays
    return (text[:1].upper() + text[1:]) or None


@dataclass(frozen=True)
class LLMChoice:
    name: str
    options: dict


def plan_llm(cfg: FuseConfig, models_dir: str | None = None) -> LLMChoice:
    """The LLM backend for a config; raises ModelUnavailable before anything runs when it cannot be used (for
    llama.cpp: a model name that is not installed, a file that is not there)."""
    name = cfg.backend or PROFILES[cfg.profile]["llm"]
    backend_class("llm", name)
    if name == "llamacpp":
        resolve_llm(cfg.model, models_dir or Settings().models_dir)
        # the translate stage's in-process LLM passes the same options (the model by its name, the default n_ctx
        # and seed), so a worker running both loads the model once
        options = {"model_path": cfg.model or DEFAULT_LLM, "models_dir": models_dir, "n_ctx": cfg.n_ctx,
                   "seed": cfg.seed}
    elif name == "openai":
        options = server_options("llm", "fuse", cfg)
    else:
        options = {"model": cfg.model, "seed": cfg.seed}
    if cfg.mode == "rank-and-fuse":
        backend_class("clip", "open_clip")
    load_prompts(cfg.prompt_version)
    return LLMChoice(name, options)


def _cache_key(messages: list[dict], model_id: str, max_tokens: int, cfg: FuseConfig) -> str:
    blob = json.dumps([messages, model_id, max_tokens, cfg.temperature, cfg.seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def rank_candidates(inputs: list[FuseInputs], images: dict[str, bytes] | None, scorer) -> None:
    """rank-and-fuse: score alt-text, synthetic caption and an OCR-based line with the image-text scorer and keep
    the best two per sample (in place)."""
    import io

    from PIL import Image

    for item in inputs:
        pool = [c for c in (item.alt_text, item.synthetic, f"text: {item.ocr_text}" if item.ocr_text else None) if c]
        if len(pool) <= 2 or not images or item.key not in images:
            item.candidates = pool[:2]
            continue
        image = Image.open(io.BytesIO(images[item.key])).convert("RGB")
        scores = scorer.scores([image], pool)[0]
        order = sorted(range(len(pool)), key=lambda i: -float(scores[i]))
        item.candidates = [pool[i] for i in order[:2]]


class FuseStage(ShardStage):
    name = "fuse"
    description = "LLM fusion of alt-text and expert outputs into short and dense captions."
    schema = FUSED_SCHEMA
    reads = ("ingest", "extract")  # the experts' output where it exists; fusion from alt-text alone otherwise
    published = ("caption_short", "caption_dense", "short_passed", "dense_passed", "short_reasons", "dense_reasons")
    retries = 2
    warm = ("tasks.fuse",)

    def plan(self) -> StagePlan:
        choice = plan_llm(self.config, self.models_dir)
        model = choice.options.get("model") or choice.options.get("model_path") or ""
        return StagePlan({"llm": f"{choice.name} {model}".strip()}, needs_gpu(self.config.profile, [choice.name]),
                         choice)

    def check_backends(self) -> None:
        choice = plan_llm(self.config, self.models_dir)
        if choice.name == "openai":
            backend_class("llm", choice.name)(**choice.options).health_check()

    def process(self, ctx: ShardContext) -> ShardOutput:
        cfg = self.config
        choice = plan_llm(cfg, self.models_dir)
        llm = load_backend("llm", choice.name, **choice.options)
        raw_rows = ctx.read_rows(RAW, ["key", "status", "alt_text"])
        experts = {r["key"]: r for r in ctx.read_rows(EXTRACT, ["key", "ocr_text", "objects", "caption_synthetic"],
                                                      missing_ok=True)}
        inputs = [FuseInputs(r["key"], r["alt_text"], experts.get(r["key"], {}).get("ocr_text"),
                             confident(experts.get(r["key"], {}).get("objects"), cfg.min_object_score),
                             experts.get(r["key"], {}).get("caption_synthetic")) for r in raw_rows]
        todo = [i for i, r in enumerate(raw_rows) if r["status"] == "ok"]
        if cfg.mode == "rank-and-fuse":
            scorer = load_backend("clip", "open_clip", model=cfg.clip.model, pretrained=cfg.clip.pretrained)
            rank_candidates([inputs[i] for i in todo], ctx.images(), scorer)
        cached = _previous_completions(ctx)
        requests, injections = _requests(inputs, todo, cfg, llm.model_id)
        missing = list({r[3]: r for r in requests if r[3] not in cached}.values())
        answers = {key: (text, None) for key, text in cached.items()} | _complete(llm, missing, cfg, ctx.progress)
        completions = {(i, out): (*answers[key], key) for i, out, _, key in requests}
        provenance = [("llm", llm.model_id), ("mode", cfg.mode), ("prompt_version", cfg.prompt_version),
                      ("prompt_hash", prompt_hash(cfg.prompt_version, cfg.mode)), ("config_hash", self.config_hash)]
        rows = [_fused_row(r, inputs[i], injections, completions, i, cfg, provenance)
                for i, r in enumerate(raw_rows)]
        stats = {
            "llm_calls": len(missing), "cache_hits": sum(1 for r in requests if r[3] in cached),
            "passed": {out: sum(1 for r in rows if r[f"{out}_passed"]) for out in cfg.outputs},
            "injections_found": sum(1 for r in rows if r["input_injection"]),
            "provenance": {"llm": llm.model_id, "prompt_hash": prompt_hash(cfg.prompt_version, cfg.mode)},
        }
        return ShardOutput(rows, stats, [e for _, e in answers.values() if e])

    def summary(self, result: dict) -> list[str]:
        return [counts_line("status", result.get("counts", {})),
                f"  captions verified and kept (else the alt-text): {result.get('passed', {})}; LLM calls "
                f"{result.get('llm_calls', 0)}, cache hits {result.get('cache_hits', 0)}; inputs with injected "
                f"instructions: {result.get('injections_found', 0)}",
                *(f"  {k}: {v}" for k, v in result.get("provenance", {}).items())]


def _previous_completions(ctx: ShardContext) -> dict[str, str]:
    """cache key -> completion, from the shard's previous output (kept even when its marker was not written)."""
    cached = {}
    for row in ctx.read_rows(FuseStage.name, ["cache_short", "fused_short", "cache_dense", "fused_dense"],
                             missing_ok=True):
        for out in ("short", "dense"):
            if row[f"cache_{out}"] and row[f"fused_{out}"] is not None:
                cached[row[f"cache_{out}"]] = row[f"fused_{out}"]
    return cached


def _requests(inputs: list[FuseInputs], todo: list[int], cfg: FuseConfig, model_id: str
              ) -> tuple[list[tuple[int, str, list[dict], str]], dict[int, str | None]]:
    """One prompt per (sample, output) with its cache key, and the injections found per sample."""
    requests: list[tuple[int, str, list[dict], str]] = []
    injections: dict[int, str | None] = {}
    for i in todo:
        for out in cfg.outputs:
            messages, found = build_messages(inputs[i], cfg.mode, out, cfg.prompt_version)
            injections[i] = injections.get(i) or found
            requests.append((i, out, messages, _cache_key(messages, model_id, _max_tokens(cfg, out), cfg)))
    return requests, injections


def _max_tokens(cfg: FuseConfig, out: str) -> int:
    return cfg.max_tokens_short if out == "short" else cfg.max_tokens_dense


def _complete(llm, missing: list[tuple[int, str, list[dict], str]], cfg: FuseConfig, progress
              ) -> dict[str, tuple[str | None, str | None]]:
    """cache key -> (text, error) for the prompts not in the cache; identical prompts were merged before.
    `progress(done, total)` is told after each batch."""
    answers = {}
    for out in cfg.outputs:
        batch = [r for r in missing if r[1] == out]
        stop = prompt_spec(cfg.prompt_version, cfg.mode, out).get("stop")
        for start in range(0, len(batch), cfg.batch_size):
            chunk = batch[start:start + cfg.batch_size]
            results = llm.generate([r[2] for r in chunk], max_tokens=_max_tokens(cfg, out),
                                   temperature=cfg.temperature, stop=stop)
            for (_, _, _, key), res in zip(chunk, results, strict=True):
                answers[key] = (res.text, res.error)
            progress(len(answers), len(missing))
    return answers


@cache
def _echo_runs(version: str) -> frozenset[tuple[str, ...]]:
    return template_runs(prompt_texts(version))


def _fused_row(raw: dict, inputs: FuseInputs, injections: dict, completions: dict, i: int, cfg: FuseConfig,
               provenance: list) -> dict:
    row = {name: None for name in FUSED_SCHEMA.names}
    fallback = fallback_caption(raw["alt_text"])
    row.update(key=raw["key"], alt_text=raw["alt_text"], caption_short=fallback, caption_dense=fallback)
    if i not in injections:
        row["status"] = "skipped"
        return row
    row["status"], row["input_injection"] = "ok", injections[i]
    payloads = injection_payloads(inputs.alt_text or "") + injection_payloads(inputs.ocr_text or "")
    sources = Sources(_strip_injection(inputs.alt_text)[0], _strip_injection(inputs.ocr_text)[0], inputs.synthetic,
                      tuple(inputs.objects or ()))
    support = build_support(sources)
    mentioned, unsupported, errors = set(), set(), []
    for out in cfg.outputs:
        text, error, key = completions[(i, out)]
        caption = normalise_output(text)
        row[f"fused_{out}"], row[f"cache_{out}"] = caption, key
        if caption is None:
            row[f"{out}_passed"], row[f"{out}_reasons"] = False, [f"llm_error: {error or 'empty output'}"]
            errors.append(out)
            continue
        verdict = check_caption(
            caption, alt_text=inputs.alt_text, ocr_text=inputs.ocr_text, labels=inputs.labels,
            min_words=cfg.min_words, max_words=cfg.max_words_short if out == "short" else cfg.max_words_dense,
            language=cfg.language, max_unsupported=cfg.max_unsupported, injection_markers=payloads)
        reasons = [*verdict.reasons, *verify_claims(caption, sources, _echo_runs(cfg.prompt_version), support),
                   *omissions(caption, sources)]
        row[f"{out}_passed"], row[f"{out}_reasons"] = not reasons, reasons
        mentioned |= set(verdict.mentioned)
        unsupported |= set(verdict.unsupported)
        if not reasons:
            row[f"caption_{out}"] = caption
    if errors and len(errors) == len(cfg.outputs):
        row["status"] = "error"
    row["mentioned"], row["unsupported"] = sorted(mentioned), sorted(unsupported)
    row["provenance"] = provenance
    return row
