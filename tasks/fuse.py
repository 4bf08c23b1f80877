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
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa
import yaml

from infra.models import PROFILES, ModelUnavailable, backend_class, load_backend
from infra.settings import FuseConfig
from infra.store import StoreError, open_store
from tasks.extract import STAGE as EXPERTS
from tasks.guards import check_caption, find_injection, injection_payloads
from tasks.ingest import STAGE as RAW
from tasks.shards import read_marker, shard_status, stage_key, upstream_fingerprint, write_marker

STAGE = "fused"
UPSTREAM = (RAW, EXPERTS)  # the stage outputs fusion reads
PROMPTS = Path(__file__).with_name("prompts")
MAX_FIELD_CHARS = 600  # untrusted text fields are cut to this length in prompts
_DELIMITERS = re.compile(r"</?\s*data\s*>", re.IGNORECASE)
# Completion errors (as the LLM backends label them) that mean "try again later", not "this prompt fails".
TRANSIENT_ERRORS = {"timeout", "connection", "http_408", "http_429", "http_500", "http_502", "http_503", "http_504"}

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


def _clean(text: str | None) -> str:
    """Untrusted text as prompt data: no delimiters, one line, bounded length; '(none)' when empty."""
    if not text:
        return "(none)"
    text = " ".join(_DELIMITERS.sub(" ", text).split())
    return (text[:MAX_FIELD_CHARS] + "...") if len(text) > MAX_FIELD_CHARS else (text or "(none)")


def _strip_injection(text: str | None) -> tuple[str | None, str | None]:
    """Remove the sentences of `text` that carry instructions; returns (clean text, what was found)."""
    found = find_injection(text) if text else None
    if not found:
        return text, None
    kept = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s and not find_injection(s)]
    return " ".join(kept) or None, found


def describe_objects(objects: list[dict] | None) -> str:
    """'2 persons (large at middle-center; small at top-left); 1 white horse (medium at top-left)': grouped by
    label, the colour of a single instance, sizes and positions of up to three."""
    if not objects:
        return "(none)"
    groups: dict[str, list[dict]] = {}
    for o in objects:
        groups.setdefault(o["label"], []).append(o)
    parts = []
    for label, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        n = len(items)
        colour = items[0].get("color")
        where = "; ".join(f"{o.get('size')} at {o.get('position')}" for o in items[:3] if o.get("size"))
        name = label if n == 1 else (label + ("es" if label.endswith(("s", "sh", "ch")) else "s"))
        parts.append(f"{n} {colour + ' ' if colour and n == 1 else ''}{name}" + (f" ({where})" if where else ""))
    return "; ".join(parts)


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


def build_messages(inputs: FuseInputs, mode: str, output: str, version: str) -> tuple[list[dict], str | None]:
    """The chat messages for one output, and any injection found (and removed) in the untrusted inputs."""
    prompts = load_prompts(version)
    alt, found_alt = _strip_injection(inputs.alt_text)
    ocr, found_ocr = _strip_injection(inputs.ocr_text)
    fields = {
        "alt_text": _clean(alt), "ocr_text": _clean(ocr), "objects": describe_objects(inputs.objects),
        "synthetic": _clean(inputs.synthetic),
        "candidates": "\n".join(f"caption {i + 1}: {_clean(c)}" for i, c in enumerate(inputs.candidates or [])),
    }
    user = prompts["modes"][mode][output].format(**fields)
    return [{"role": "system", "content": prompts["system"]}, {"role": "user", "content": user}], \
        found_alt or found_ocr


def normalise_output(text: str | None) -> str | None:
    """The caption out of a completion: first paragraph, without wrapping quotes or whitespace runs."""
    if text is None:
        return None
    text = text.strip().split("\n\n", 1)[0]
    text = " ".join(text.split()).strip().strip('"“”\'').strip()
    return text or None


@dataclass(frozen=True)
class LLMChoice:
    name: str
    options: dict


def plan_llm(cfg: FuseConfig) -> LLMChoice:
    """The LLM backend for a config; raises ModelUnavailable before anything runs when it cannot be used."""
    name = cfg.backend or PROFILES[cfg.profile]["llm"]
    backend_class("llm", name)
    if name == "llamacpp":
        options = {"model_path": cfg.model, "n_ctx": cfg.n_ctx, "seed": cfg.seed}
    elif name == "openai":
        if not (cfg.endpoint and cfg.model):
            raise ModelUnavailable("llm", name, "set fuse.endpoint (an OpenAI-compatible server such as `vllm "
                                   "serve` or llama.cpp's server) and fuse.model")
        options = {"endpoint": cfg.endpoint, "model": cfg.model, "concurrency": cfg.concurrency,
                   "timeout": cfg.timeout}
    else:
        options = {"model": cfg.model, "seed": cfg.seed}
    if cfg.mode == "rank-and-fuse":
        backend_class("clip", "open_clip")
    load_prompts(cfg.prompt_version)
    return LLMChoice(name, options)


def _cache_key(messages: list[dict], model_id: str, max_tokens: int, cfg: FuseConfig) -> str:
    blob = json.dumps([messages, model_id, max_tokens, cfg.temperature, cfg.seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_inputs(store, dataset: str, shard: int) -> tuple[list[dict], dict[str, dict]]:
    raw = store.get_parquet(stage_key(dataset, RAW, shard, "parquet"), columns=["key", "status", "alt_text"])
    try:
        experts = store.get_parquet(stage_key(dataset, EXPERTS, shard, "parquet"),
                                    columns=["key", "ocr_text", "objects", "caption_synthetic"])
        by_key = {r["key"]: r for r in experts.to_pylist()}
    except StoreError:
        by_key = {}  # fusion from alt-text alone when the experts stage has not run
    return raw.to_pylist(), by_key


def _previous_completions(store, dataset: str, shard: int) -> dict[str, str]:
    try:
        old = store.get_parquet(stage_key(dataset, STAGE, shard, "parquet"),
                                columns=["cache_short", "fused_short", "cache_dense", "fused_dense"]).to_pylist()
    except (StoreError, KeyError, pa.ArrowInvalid):
        return {}
    cached = {}
    for row in old:
        for out in ("short", "dense"):
            if row[f"cache_{out}"] and row[f"fused_{out}"] is not None:
                cached[row[f"cache_{out}"]] = row[f"fused_{out}"]
    return cached


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


def fuse_shard(store_uri: str, dataset: str, shard: int, cfg: FuseConfig) -> dict:
    """Fuse one shard; writes `<dataset>/fused/shard-NNNNN.parquet` and its done marker; returns stats."""
    started = time.time()
    store = open_store(store_uri)
    raw_marker = read_marker(store, dataset, RAW, shard)
    if raw_marker is None:
        raise RuntimeError(f"raw shard {shard:05d} of {dataset} is not finished; run ingest first")
    choice = plan_llm(cfg)
    llm = load_backend("llm", choice.name, **choice.options)
    raw_rows, experts = _read_inputs(store, dataset, shard)
    cached = _previous_completions(store, dataset, shard)
    inputs = []
    for r in raw_rows:
        e = experts.get(r["key"], {})
        inputs.append(FuseInputs(r["key"], r["alt_text"], e.get("ocr_text"), e.get("objects"),
                                 e.get("caption_synthetic")))
    todo = [i for i, r in enumerate(raw_rows) if r["status"] == "ok"]
    if cfg.mode == "rank-and-fuse":
        from tasks.extract import read_shard_images

        scorer = load_backend("clip", "open_clip", model=cfg.clip.model, pretrained=cfg.clip.pretrained)
        rank_candidates([inputs[i] for i in todo], read_shard_images(store, dataset, shard), scorer)

    # One prompt per (sample, output); completions already in the cache are not requested again.
    requests: list[tuple[int, str, list[dict], str]] = []
    injections: dict[int, str | None] = {}
    for i in todo:
        for out in cfg.outputs:
            messages, found = build_messages(inputs[i], cfg.mode, out, cfg.prompt_version)
            injections[i] = injections.get(i) or found
            max_tokens = cfg.max_tokens_short if out == "short" else cfg.max_tokens_dense
            requests.append((i, out, messages, _cache_key(messages, llm.model_id, max_tokens, cfg)))
    # Identical prompts (duplicate images with the same alt-text) are sent once.
    missing = list({r[3]: r for r in requests if r[3] not in cached}.values())
    answers: dict[str, tuple[str | None, str | None]] = {key: (text, None) for key, text in cached.items()}
    for out in cfg.outputs:
        batch = [r for r in missing if r[1] == out]
        max_tokens = cfg.max_tokens_short if out == "short" else cfg.max_tokens_dense
        for start in range(0, len(batch), cfg.batch_size):
            chunk = batch[start:start + cfg.batch_size]
            results = llm.generate([r[2] for r in chunk], max_tokens=max_tokens, temperature=cfg.temperature)
            for (_, _, _, key), res in zip(chunk, results, strict=True):
                answers[key] = (res.text, res.error)
    completions = {(i, out): (*answers[key], key) for i, out, _, key in requests}

    rows, llm_calls = [], len(missing)
    for i, r in enumerate(raw_rows):
        row = {name: None for name in FUSED_SCHEMA.names}
        # The fallback caption is the alt-text without any injected instructions (the `alt_text` column itself
        # stays as it came).
        fallback = _strip_injection(r["alt_text"])[0]
        row.update(key=r["key"], alt_text=r["alt_text"], caption_short=fallback, caption_dense=fallback)
        if i not in injections:
            row["status"] = "skipped"
            rows.append(row)
            continue
        row["status"], row["input_injection"] = "ok", injections[i]
        payloads = injection_payloads(inputs[i].alt_text or "") + injection_payloads(inputs[i].ocr_text or "")
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
                caption, alt_text=inputs[i].alt_text, ocr_text=inputs[i].ocr_text, labels=inputs[i].labels,
                min_words=cfg.min_words, max_words=cfg.max_words_short if out == "short" else cfg.max_words_dense,
                language=cfg.language, max_unsupported=cfg.max_unsupported, injection_markers=payloads)
            row[f"{out}_passed"], row[f"{out}_reasons"] = verdict.passed, verdict.reasons
            mentioned |= set(verdict.mentioned)
            unsupported |= set(verdict.unsupported)
            if verdict.passed:
                row[f"caption_{out}"] = caption
        if errors and len(errors) == len(cfg.outputs):
            row["status"] = "error"
        row["mentioned"], row["unsupported"] = sorted(mentioned), sorted(unsupported)
        row["provenance"] = [("llm", llm.model_id), ("mode", cfg.mode), ("prompt_version", cfg.prompt_version),
                             ("prompt_hash", prompt_hash(cfg.prompt_version, cfg.mode)),
                             ("config_hash", cfg.config_hash())]
        rows.append(row)
    table = pa.Table.from_pylist(rows, FUSED_SCHEMA)
    store.put_parquet(stage_key(dataset, STAGE, shard, "parquet"), table)
    transient = [e for _, e in answers.values() if e and e.split(":", 1)[0].strip() in TRANSIENT_ERRORS]
    if transient:
        # The server went away (or timed out): the completions that arrived are saved above without a done
        # marker, so the retried shard only asks for the missing ones.
        raise RuntimeError(f"{len(transient)} completions failed on transient errors (e.g. {transient[0]}); "
                           "the shard is retried, keeping the completions already made")
    counts = Counter(r["status"] for r in rows)
    stats = {
        "shard": shard, "config_hash": cfg.config_hash(),
        "input_marker": upstream_fingerprint(store, dataset, shard, UPSTREAM),
        "samples": len(rows), "counts": dict(counts), "llm_calls": llm_calls,
        "cache_hits": sum(1 for r in requests if r[3] in cached),
        "passed": {out: sum(1 for r in rows if r[f"{out}_passed"]) for out in cfg.outputs},
        "injections_found": sum(1 for r in rows if r["input_injection"]),
        "provenance": {"llm": llm.model_id, "prompt_hash": prompt_hash(cfg.prompt_version, cfg.mode)},
        "seconds": round(time.time() - started, 3),
    }
    write_marker(store, dataset, STAGE, shard, stats)
    return stats


def shards_to_fuse(store, dataset: str, cfg: FuseConfig) -> tuple[list[int], list[int], list[int]]:
    """(to run, already done, raw shards not finished). A re-run of ingest or the experts invalidates a shard."""
    return shard_status(store, dataset, STAGE, cfg.config_hash(), UPSTREAM)
