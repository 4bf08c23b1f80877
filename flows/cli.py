"""The `capfactory` command line: every stage runs as a Prefect flow on a Dask cluster.

Each stage command is its options laid over the dataset spec plus one call of `_run`, which runs the stage
(flows/stage.py) and prints its summary; the options every stage shares are defined once below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.settings import DatasetSpec, SpecError, build_spec, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="capfactory: a workflow-orchestrated factory for image-text training data.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"capfactory {version('capfactory')}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False) -> None:
    """capfactory: a workflow-orchestrated factory for image-text training data."""

# ---- the options every stage command shares ------------------------------------------------------------------------

Dataset = Annotated[str | None, typer.Option(help="dataset name (folder in the store)")]
Spec = Annotated[Path | None, typer.Option(help="YAML dataset spec; command-line options override it")]
Store = Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix "
                                                "[$CAPFACTORY_STORE or ./capfactory-data]")]
ModelsDir = Annotated[str | None, typer.Option(help="local models folder [$CAPFACTORY_MODELS_DIR or ./models]")]
Profile = Annotated[str | None, typer.Option(help="cpu|gpu: the default backend of each model role [cpu]")]
DaskAddress = Annotated[str | None, typer.Option(help="attach to this Dask scheduler [a new LocalCluster]")]
Workers = Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")]
ClipModel = Annotated[str | None, typer.Option(help="open_clip architecture [ViT-B-32]")]
ClipPretrained = Annotated[str | None, typer.Option(help="open_clip tag or local checkpoint file [laion2b_s34b_b79k]")]
Endpoint = Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (vLLM, llama.cpp server)")]
ServedModel = Annotated[str | None, typer.Option(help="model: a local file or folder, or a served model name")]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _comma_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def resolve_spec(spec_path: Path | None, dataset: str | None, inputs: list[str], input_options: dict,
                 overrides: dict[str, Any]) -> DatasetSpec:
    """The dataset spec from a YAML file (optional) with command-line values laid over it."""
    try:
        data = load_spec(spec_path).to_json() if spec_path else {}
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
        return build_spec(data, "the command line")
    except SpecError as e:
        _fail(str(e))
        raise


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user can fix: printed as one `error:` line with exit code 2."""
    from infra.models import ModelUnavailable
    from infra.store import StoreError, StoreUnavailable
    from tasks.inputs import InputError
    from tasks.stage import StageError
    from tasks.validate import ValidationFailed

    return (InputError, ModelUnavailable, SpecError, StageError, StoreError, StoreUnavailable, ValidationFailed,
            ValueError)


def stage_lines(name: str, result: dict) -> list[str]:
    """The console summary of a stage's result."""
    from flows.stage import header_line, make_stage
    from tasks.stage import ShardStage

    stage = make_stage(name, DatasetSpec(name=result["dataset"]))
    header = [header_line(name, result)] if isinstance(stage, ShardStage) else [""]
    return header + stage.summary(result)


def _emit(result: dict, json_out: Path | None) -> None:
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


def _run(name: str, spec: Path | None, dataset: str | None, store: str | None, overrides: dict[str, Any], *,
         models_dir: str | None = None, dask_address: str | None, workers: int | None, json_out: Path | None,
         inputs: list[str] | None = None, input_options: dict | None = None, **options: Any) -> dict:
    """One stage command: the spec with the options over it, the stage run, its summary printed."""
    from flows.stage import run_stage
    from infra.runtime import stop_on_sigterm

    stop_on_sigterm()  # SIGTERM stops the Prefect server and the workers this command started

    ds = resolve_spec(spec, dataset, inputs or [], input_options or {}, {"store": store, **overrides})
    try:
        result = run_stage(name, ds, models_dir=models_dir, dask_address=dask_address, workers=workers,
                           progress=sys.stderr.isatty(), **options)
    except _user_errors() as e:
        _fail(str(e))
    except RuntimeError as e:  # shards that failed after their retries: the finished ones are kept
        _fail(str(e), code=1)
    for line in stage_lines(name, result):
        typer.echo(line)
    _emit(result, json_out)
    return result


# ---- the stages ----------------------------------------------------------------------------------------------------


@app.command()
def ingest(
    inputs: Annotated[list[str] | None, typer.Argument(help="URL lists (parquet/csv/tsv/jsonl[.gz]), folders")] = None,
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    shard_size: Annotated[int | None, typer.Option(help="samples per shard [1000]")] = None,
    url_col: Annotated[str | None, typer.Option(help="URL column (default: by preset)")] = None,
    caption_col: Annotated[str | None, typer.Option(help="caption column (default: by preset)")] = None,
    input_format: Annotated[str | None, typer.Option(help="parquet|csv|tsv|jsonl|folder [auto]")] = None,
    preset: Annotated[str | None, typer.Option(help="laion|cc3m|wit|generic [auto]")] = None,
    image_size: Annotated[int | None, typer.Option(help="target size in pixels [256]")] = None,
    resize_mode: Annotated[str | None, typer.Option(help="no|keep_ratio|keep_ratio_largest|center_crop|border")] = None,
    resize_only_if_bigger: Annotated[bool | None, typer.Option(help="never upscale")] = None,
    encode_format: Annotated[str | None, typer.Option(help="jpg|webp|png [jpg]")] = None,
    encode_quality: Annotated[int | None, typer.Option(help="1-100 [95]")] = None,
    min_image_size: Annotated[int | None, typer.Option(help="filter: smallest side of the original")] = None,
    max_aspect_ratio: Annotated[float | None, typer.Option(help="filter: longer/shorter side")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="decompression-bomb limit [50M]")] = None,
    phash_threshold: Annotated[int | None, typer.Option(help="near-duplicate Hamming distance [4]")] = None,
    concurrency: Annotated[int | None, typer.Option(help="requests in flight per worker [64]")] = None,
    per_host: Annotated[int | None, typer.Option(help="connections per host per worker [16]")] = None,
    timeout: Annotated[float | None, typer.Option(help="total seconds per request attempt [30]")] = None,
    retries: Annotated[int | None, typer.Option(help="retries on transient errors [2]")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="body size cap [20MB]")] = None,
    user_agent_token: Annotated[str | None, typer.Option(help="our robots.txt agent token [capfactory]")] = None,
    robots_txt: Annotated[bool | None, typer.Option("--robots-txt/--no-robots-txt", help="honour robots.txt")] = None,
    x_robots_tag: Annotated[bool | None, typer.Option("--x-robots-tag/--no-x-robots-tag",
                                                      help="honour X-Robots-Tag")] = None,
    allow_cidr: Annotated[list[str] | None, typer.Option(help="open a private/loopback range (repeatable)")] = None,
    retry_failed: Annotated[bool, typer.Option(help="download the failed samples of finished shards again")] = False,
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
    experts: Annotated[str | None, typer.Option(help="comma list of ocr,objects,attributes,caption "
                                                     "[ocr,objects,attributes]")] = None,
    profile: Profile = None, models_dir: ModelsDir = None,
    batch_size: Annotated[int | None, typer.Option(help="images per model call [16]")] = None,
    ocr_backend: Annotated[str | None, typer.Option(help="rapidocr|paddleocr")] = None,
    ocr_min_score: Annotated[float | None, typer.Option(help="drop OCR lines below this score [0.5]")] = None,
    detector_backend: Annotated[str | None, typer.Option(help="yolox-onnx|owlv2")] = None,
    detector_model: Annotated[str | None, typer.Option(help="model file under the models folder, or a path")] = None,
    detector_threshold: Annotated[float | None, typer.Option(help="detection score threshold [0.3]")] = None,
    clip_backend: Annotated[str | None, typer.Option(help="open_clip: CLIP tags in attributes")] = None,
    clip_model: ClipModel = None, clip_pretrained: ClipPretrained = None,
    captioner_backend: Annotated[str | None, typer.Option(help="openai|transformers")] = None,
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
    mode: Annotated[str | None, typer.Option(help="experts|capsfusion|rank-and-fuse [experts]")] = None,
    profile: Profile = None,
    backend: Annotated[str | None, typer.Option(help="llamacpp|openai|vllm")] = None,
    model: ServedModel = None, endpoint: Endpoint = None,
    prompt_version: Annotated[str | None, typer.Option(help="prompt template version [v1]")] = None,
    outputs: Annotated[str | None, typer.Option(help="comma list of short,dense [short,dense]")] = None,
    max_unsupported: Annotated[int | None, typer.Option(help="objects a caption may assert unsupported [0]")] = None,
    language: Annotated[str | None, typer.Option(help="expected caption language [en]")] = None,
    concurrency: Annotated[int | None, typer.Option(help="requests in flight (openai backend) [16]")] = None,
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
    languages: Annotated[str | None, typer.Option(help="comma list of target languages, e.g. pt,es,de [pt]")] = None,
    fields: Annotated[str | None, typer.Option(help="comma list of caption_short,caption_dense,alt_text "
                                                    "[caption_short]")] = None,
    allocation: Annotated[str | None, typer.Option(help="all|sample [all]")] = None,
    per_sample: Annotated[int | None, typer.Option(help="languages per sample with --allocation sample [1]")] = None,
    distribution: Annotated[str | None, typer.Option(help="mc4|uniform or pt=0.6,es=0.4 [mc4]")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the per-sample language draw [0]")] = None,
    profile: Profile = None,
    backend: Annotated[str | None, typer.Option(help="bergamot|ctranslate2|openai")] = None,
    model: ServedModel = None, endpoint: Endpoint = None,
    models_dir: ModelsDir = None,
    round_trip: Annotated[bool | None, typer.Option("--round-trip/--no-round-trip",
                                                    help="QE by back translation + chrF")] = None,
    min_chrf: Annotated[float | None, typer.Option(help="round-trip chrF below this is flagged [35]")] = None,
    drop_failed: Annotated[bool | None, typer.Option("--drop-failed/--keep-failed",
                                                     help="publish leaves flagged translations out")] = None,
    concurrency: Annotated[int | None, typer.Option(help="requests/threads in flight per shard [8]")] = None,
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
        "translate.endpoint": endpoint, "translate.round_trip": round_trip, "translate.min_chrf": min_chrf,
        "translate.drop_failed": drop_failed, "translate.concurrency": concurrency,
    }
    _run("translate", spec, dataset, store, overrides, models_dir=models_dir, dask_address=dask_address,
         workers=workers, json_out=json_out)


@app.command()
def score(
    dataset: Dataset = None, spec: Spec = None, store: Store = None,
    profile: Profile = None, models_dir: ModelsDir = None,
    clip_backend: Annotated[str | None, typer.Option(help="open_clip: turn CLIP scores on")] = None,
    clip_model: ClipModel = None, clip_pretrained: ClipPretrained = None,
    multilingual: Annotated[bool | None, typer.Option("--multilingual/--no-multilingual",
                                                      help="the CLIP model is multilingual: score translations")]
    = None,
    nsfw: Annotated[bool | None, typer.Option("--nsfw/--no-nsfw", help="open_nsfw scores [on]")] = None,
    semdedup: Annotated[bool | None, typer.Option("--semdedup/--no-semdedup", help="semantic dedup [on]")] = None,
    semdedup_eps: Annotated[float | None, typer.Option(help="duplicates: cosine > 1 - eps [0.05]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per model call [32]")] = None,
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
    on_failure: Annotated[str | None, typer.Option(help="quarantine|fail [quarantine]")] = None,
    stages: Annotated[str | None, typer.Option(help="comma list of ingest,extract,fuse,translate,score "
                                                    "[every output present]")] = None,
    drift_reference_shard: Annotated[int | None, typer.Option(help="score shard the drift checks compare "
                                                                   "with [the first]")] = None,
    data_docs: Annotated[bool | None, typer.Option("--data-docs/--no-data-docs", help="build GX data docs")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Run the Great Expectations suites on every stage output: quarantine bad rows or fail the run."""
    overrides = {"validate.on_failure": on_failure, "validate.data_docs": data_docs,
                 "validate.stages": _comma_list(stages), "validate.drift_reference_shard": drift_reference_shard}
    _run("validate", spec, dataset, store, overrides, dask_address=dask_address, workers=workers, json_out=json_out)


@app.command()
def publish(
    dataset: Dataset = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec (its quality filters apply)")] = None,
    store: Store = None,
    caption_field: Annotated[str | None, typer.Option(help="KEY.txt: caption_short|caption_dense|alt_text "
                                                           "[caption_short]")] = None,
    shard_size: Annotated[int | None, typer.Option(help="samples per published tar [1000]")] = None,
    selected_only: Annotated[bool | None, typer.Option("--selected-only/--all-rows",
                                                       help="samples.parquet: selected rows only [all rows]")] = None,
    license_id: Annotated[str | None, typer.Option("--license", help="dataset-card license id [other]")] = None,
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
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec (its quality filters apply)")] = None,
    store: Store = None,
    gallery_size: Annotated[int | None, typer.Option(help="sample thumbnails in the gallery [24]")] = None,
    dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Write the dataset report (plots, filter counts, a sample gallery) to <dataset>/report/index.html."""
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
    stages: Annotated[str | None, typer.Option(help="comma list of stages to run [the spec's `stages`: all]")] = None,
    store: Store = None, dask_address: DaskAddress = None, workers: Workers = None, json_out: JsonOut = None,
) -> None:
    """Run every stage the spec names, in order (ingest, extract, fuse, translate, score, validate, publish,
    report), each skipping its finished shards: the same command builds, resumes and refreshes a dataset."""
    from flows.build import run_build
    from infra.runtime import stop_on_sigterm

    stop_on_sigterm()
    ds = resolve_spec(spec, None, [], {}, {"store": store})
    try:
        result = run_build(ds, _comma_list(stages), dask_address=dask_address, workers=workers,
                           progress=sys.stderr.isatty())
    except (*_user_errors(), RuntimeError) as e:
        _fail(str(e))
    for line in build_lines(result):
        typer.echo(line)
    _emit(result, json_out)


@app.command()
def deploy(
    spec: Annotated[Path | None, typer.Option(help="dataset spec for every deployment [prefect.yaml's]")] = None,
    pool: Annotated[str | None, typer.Option(help="work pool (created as a process pool if missing) "
                                                  "[prefect.yaml's: capfactory]")] = None,
    name: Annotated[list[str] | None, typer.Option(help="only this deployment (repeatable) [all]")] = None,
) -> None:
    """Register prefect.yaml's deployments (build, refresh on a schedule, one per stage) on $PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL

    from infra.deploy import DeployError, register_deployments

    if not PREFECT_API_URL.value():
        _fail("set PREFECT_API_URL to the Prefect server to deploy to (or run `capfactory serve`)")
    try:
        ids = register_deployments(spec=spec, pool=pool, names=name)
    except DeployError as e:
        _fail(str(e))
    for full_name in ids:
        typer.echo(f"deployed {full_name}")
    typer.echo(f"start a worker: prefect worker start --pool {pool or 'capfactory'} (with CAPFACTORY_PROJECT_DIR "
               "set to the project folder)")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address of the Prefect server and UI")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the Prefect server and UI")] = 4200,
    spec: Annotated[Path | None, typer.Option(help="dataset spec for every deployment [prefect.yaml's]")] = None,
    pool: Annotated[str, typer.Option(help="work pool the local worker serves")] = "capfactory",
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
    store: Annotated[str | None, typer.Option(help="artifact store [./capfactory-data]")] = None,
    samples: Annotated[int, typer.Option(help="image URLs to crawl")] = 400,
    dataset: Annotated[str, typer.Option(help="dataset name")] = "demo",
) -> None:
    """Crawl scikit-image's sample photos from a loopback server (with faults mixed in), then run every stage:
    vision experts (objects and attributes when the models folder has the detector), fusion, translation to
    Portuguese, scores, Great Expectations, publish and the HTML report."""
    from flows.demo import run_demo
    from infra.runtime import stop_on_sigterm

    stop_on_sigterm()
    try:
        result = run_demo(store=store, samples=samples, dataset=dataset)
    except (*_user_errors(), RuntimeError) as e:
        _fail(str(e))
    stages = result["stages"]
    for name in ("ingest", "extract", "fuse", "translate"):
        for line in stage_lines(name, stages[name]):
            typer.echo(line)
    report = stages["report"]
    typer.echo(f"\npublished: {report['selected']} of {report['samples']} samples selected "
               f"({stages['publish']['folder']}); report: {report['path']}")
    typer.echo("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))


if __name__ == "__main__":
    app()
