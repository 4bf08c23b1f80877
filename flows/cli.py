"""The `capfactory` command line: every stage runs as a Prefect flow on a Dask cluster."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.settings import DatasetSpec, SpecError, build_spec, load_spec
from infra.store import StoreError
from tasks.inputs import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="capfactory: a workflow-orchestrated factory for image-text training data.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def resolve_spec(spec_path: Path | None, dataset: str | None, inputs: list[str], input_options: dict,
                 overrides: dict[str, Any]) -> DatasetSpec:
    """The dataset spec from a YAML file (optional) with command-line values laid over it."""
    try:
        data = load_spec(spec_path).model_dump(mode="json", exclude_unset=True) if spec_path else {}
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


def _print_summary(result: dict) -> None:
    counts = result["counts"]
    typer.echo(f"\ndataset {result['dataset']} in {result['store']}")
    typer.echo(f"  shards ingested now: {len(result['shards_ingested'])}, already done: "
               f"{len(result['shards_already_done'])}, new samples: {result['new_samples']}, "
               f"already known: {result['known_samples']}, repeated URLs skipped: {result['duplicate_urls']}")
    typer.echo("  status: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing to do"))
    if result["error_classes"]:
        top = sorted(result["error_classes"].items(), key=lambda kv: -kv[1])
        typer.echo("  errors: " + ", ".join(f"{k}={v}" for k, v in top))
    d = result["dedup"]
    typer.echo(f"  duplicates: exact={d['exact_duplicates']} near={d['near_duplicates']} "
               f"(phash distance <= {d['phash_threshold']})")


def _print_extract_summary(result: dict) -> None:
    typer.echo(f"\ndataset {result['dataset']} in {result['store']}: experts on "
               f"{len(result['shards_extracted'])} shards, {len(result['shards_already_done'])} already done")
    typer.echo("  status: " + (", ".join(f"{k}={v}" for k, v in sorted(result["counts"].items())) or "nothing to do"))
    typer.echo(f"  images with text: {result['with_text']}; objects: {result['objects']}")
    for role, model in result["provenance"].items():
        typer.echo(f"  {role}: {model}")


def _print_fuse_summary(result: dict) -> None:
    typer.echo(f"\ndataset {result['dataset']} in {result['store']}: fused {len(result['shards_fused'])} shards, "
               f"{len(result['shards_already_done'])} already done")
    typer.echo("  status: " + (", ".join(f"{k}={v}" for k, v in sorted(result["counts"].items())) or "nothing to do"))
    typer.echo(f"  captions that passed their guards: {result['passed']}; LLM calls {result['llm_calls']}, "
               f"cache hits {result['cache_hits']}; inputs with injected instructions: {result['injections_found']}")
    for k, v in result["provenance"].items():
        typer.echo(f"  {k}: {v}")


@app.command()
def ingest(
    inputs: Annotated[list[str] | None, typer.Argument(help="URL lists (parquet/csv/tsv/jsonl[.gz]), folders")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec; command-line options override it")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
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
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """Download, validate, resize, hash and dedup images into WebDataset + Parquet shards."""
    from infra.settings import Settings

    overrides = {
        "store": store, "ingest.shard_size": shard_size, "ingest.phash_threshold": phash_threshold,
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
    input_options = {"url_col": url_col, "caption_col": caption_col, "format": input_format, "preset": preset}
    ds = resolve_spec(spec, dataset, inputs or [], input_options, overrides)
    if not ds.inputs and not retry_failed:
        typer.echo("no inputs given: resuming the dataset's unfinished shards", err=True)
    settings = Settings()
    from flows.ingest import run_ingest

    try:
        result = run_ingest(ds.name, list(ds.inputs), store=ds.store or settings.store, config=ds.ingest,
                            retry_failed=retry_failed, dask_address=dask_address or settings.dask_address,
                            workers=workers or settings.dask_workers, progress=sys.stderr.isatty())
    except (InputError, StoreError, SpecError) as e:
        _fail(str(e))
    _print_summary(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


@app.command()
def extract(
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec; command-line options override it")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    experts: Annotated[str | None, typer.Option(help="comma list of ocr,objects,attributes,caption "
                                                     "[ocr,objects,attributes]")] = None,
    profile: Annotated[str | None, typer.Option(help="cpu|gpu: default backend per role [cpu]")] = None,
    models_dir: Annotated[str | None, typer.Option(help="local models folder [$CAPFACTORY_MODELS_DIR or "
                                                        "./models]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per model call [16]")] = None,
    ocr_backend: Annotated[str | None, typer.Option(help="rapidocr|paddleocr")] = None,
    ocr_min_score: Annotated[float | None, typer.Option(help="drop OCR lines below this score [0.5]")] = None,
    detector_backend: Annotated[str | None, typer.Option(help="yolox-onnx|owlv2")] = None,
    detector_model: Annotated[str | None, typer.Option(help="model file under the models folder, or a path")] = None,
    detector_threshold: Annotated[float | None, typer.Option(help="detection score threshold [0.3]")] = None,
    clip_backend: Annotated[str | None, typer.Option(help="open_clip: CLIP tags in attributes")] = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip architecture [ViT-B-32]")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="open_clip tag or local checkpoint file")] = None,
    captioner_backend: Annotated[str | None, typer.Option(help="openai|transformers")] = None,
    captioner_endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (vLLM)")] = None,
    captioner_model: Annotated[str | None, typer.Option(help="served model name or local model folder")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """Run vision experts (OCR, objects + attributes, CLIP tags, a synthetic caption) over ingested shards."""
    from infra.models import ModelUnavailable
    from infra.settings import Settings

    overrides = {
        "store": store, "experts.profile": profile, "experts.batch_size": batch_size,
        "experts.experts": [e.strip() for e in experts.split(",") if e.strip()] if experts else None,
        "experts.ocr.backend": ocr_backend, "experts.ocr.min_score": ocr_min_score,
        "experts.detector.backend": detector_backend, "experts.detector.model": detector_model,
        "experts.detector.score_threshold": detector_threshold, "experts.clip.backend": clip_backend,
        "experts.clip.model": clip_model, "experts.clip.pretrained": clip_pretrained,
        "experts.captioner.backend": captioner_backend, "experts.captioner.endpoint": captioner_endpoint,
        "experts.captioner.model": captioner_model,
    }
    ds = resolve_spec(spec, dataset, [], {}, overrides)
    settings = Settings()
    from flows.extract import run_extract

    try:
        result = run_extract(ds.name, store=ds.store or settings.store, config=ds.experts,
                             models_dir=models_dir or settings.models_dir,
                             dask_address=dask_address or settings.dask_address,
                             workers=workers or settings.dask_workers, progress=sys.stderr.isatty())
    except (ModelUnavailable, StoreError, SpecError, ValueError) as e:
        _fail(str(e))
    _print_extract_summary(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


@app.command()
def fuse(
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec; command-line options override it")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    mode: Annotated[str | None, typer.Option(help="experts|capsfusion|rank-and-fuse [experts]")] = None,
    profile: Annotated[str | None, typer.Option(help="cpu|gpu: default LLM backend [cpu: llamacpp]")] = None,
    backend: Annotated[str | None, typer.Option(help="llamacpp|openai|vllm")] = None,
    model: Annotated[str | None, typer.Option(help="GGUF file, served model name, or vLLM model id")] = None,
    endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (vLLM, llama.cpp server)")] = None,
    prompt_version: Annotated[str | None, typer.Option(help="prompt template version [v1]")] = None,
    outputs: Annotated[str | None, typer.Option(help="comma list of short,dense [short,dense]")] = None,
    max_unsupported: Annotated[int | None, typer.Option(help="objects a caption may assert unsupported [0]")] = None,
    language: Annotated[str | None, typer.Option(help="expected caption language [en]")] = None,
    concurrency: Annotated[int | None, typer.Option(help="requests in flight (openai backend) [16]")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """LLM fusion: merge alt-text and expert outputs into short and dense captions, with guards."""
    from infra.models import ModelUnavailable
    from infra.settings import Settings

    overrides = {
        "store": store, "fuse.mode": mode, "fuse.profile": profile, "fuse.backend": backend, "fuse.model": model,
        "fuse.endpoint": endpoint, "fuse.prompt_version": prompt_version,
        "fuse.outputs": [o.strip() for o in outputs.split(",") if o.strip()] if outputs else None,
        "fuse.max_unsupported": max_unsupported, "fuse.language": language, "fuse.concurrency": concurrency,
    }
    ds = resolve_spec(spec, dataset, [], {}, overrides)
    settings = Settings()
    from flows.fuse import run_fuse

    try:
        result = run_fuse(ds.name, store=ds.store or settings.store, config=ds.fuse,
                          dask_address=dask_address or settings.dask_address,
                          workers=workers or settings.dask_workers, progress=sys.stderr.isatty())
    except (ModelUnavailable, StoreError, SpecError, ValueError) as e:
        _fail(str(e))
    _print_fuse_summary(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


@app.command()
def build(
    spec: Annotated[Path, typer.Argument(help="YAML dataset spec")],
    stages: Annotated[str | None, typer.Option(help="comma list of stages to run [the spec's `stages`: all]")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """Run every stage the spec names, in order (ingest, extract, fuse, translate, score, validate, publish,
    report), each skipping its finished shards: the same command builds, resumes and refreshes a dataset."""
    from flows.build import run_build, selected_stages
    from infra.models import ModelUnavailable

    ds = resolve_spec(spec, None, [], {}, {"store": store})
    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    try:
        selected_stages(ds, chosen)
        result = run_build(ds, chosen, dask_address=dask_address, workers=workers, progress=sys.stderr.isatty())
    except (InputError, ModelUnavailable, StoreError, SpecError, ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(f"\ndataset {result['dataset']} in {result['store']}")
    for stage, seconds in result["seconds"].items():
        counts = result["stages"].get(stage, {}).get("counts")
        typer.echo(f"  {stage:<10} {seconds:8.1f} s" + (f"  {counts}" if counts else ""))
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


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
def score(
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec; command-line options override it")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    profile: Annotated[str | None, typer.Option(help="cpu|gpu: cpu has CLIP off by default [cpu]")] = None,
    models_dir: Annotated[str | None, typer.Option(help="local models folder [$CAPFACTORY_MODELS_DIR or "
                                                        "./models]")] = None,
    clip_backend: Annotated[str | None, typer.Option(help="open_clip: turn CLIP scores on")] = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip architecture [ViT-B-32]")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="open_clip tag or local checkpoint file "
                                                             "[laion2b_s34b_b79k]")] = None,
    multilingual: Annotated[bool | None, typer.Option("--multilingual/--no-multilingual",
                                                      help="the CLIP model is multilingual: score translations")]
    = None,
    nsfw: Annotated[bool | None, typer.Option("--nsfw/--no-nsfw", help="open_nsfw scores [on]")] = None,
    semdedup: Annotated[bool | None, typer.Option("--semdedup/--no-semdedup", help="semantic dedup [on]")] = None,
    semdedup_eps: Annotated[float | None, typer.Option(help="duplicates: cosine > 1 - eps [0.05]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per model call [32]")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """Score samples (CLIP image-text similarity, NSFW, language) and find semantic duplicates; deletes nothing."""
    from infra.models import ModelUnavailable
    from infra.settings import Settings

    overrides = {
        "store": store, "quality.profile": profile, "quality.clip.backend": clip_backend,
        "quality.clip.model": clip_model, "quality.clip.pretrained": clip_pretrained,
        "quality.multilingual": multilingual, "quality.nsfw": nsfw, "quality.semdedup.enabled": semdedup,
        "quality.semdedup.eps": semdedup_eps, "quality.batch_size": batch_size,
    }
    ds = resolve_spec(spec, dataset, [], {}, overrides)
    settings = Settings()
    from flows.score import run_score

    try:
        result = run_score(ds.name, store=ds.store or settings.store, config=ds.quality,
                           models_dir=models_dir or settings.models_dir,
                           dask_address=dask_address or settings.dask_address,
                           workers=workers or settings.dask_workers, progress=sys.stderr.isatty())
    except (ModelUnavailable, StoreError, SpecError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"\ndataset {result['dataset']} in {result['store']}: scored {len(result['shards_scored'])} shards, "
               f"{len(result['shards_already_done'])} already done")
    typer.echo("  status: " + (", ".join(f"{k}={v}" for k, v in sorted(result["counts"].items())) or "nothing to do"))
    for role, model in result["models"].items():
        typer.echo(f"  {role}: {model}")
    typer.echo(f"  images embedded {result['images_embedded']}, embeddings reused {result['embeddings_reused']}; "
               f"semantic dedup: {result['semdedup']}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


def _print_translate_summary(result: dict) -> None:
    typer.echo(f"\ndataset {result['dataset']} in {result['store']}: translated "
               f"{len(result['shards_translated'])} shards, {len(result['shards_already_done'])} already done, "
               f"{len(result['shards_waiting'])} waiting for ingest/fuse")
    typer.echo("  rows: " + (", ".join(f"{k}={v}" for k, v in sorted(result["counts"].items())) or "nothing to do"))
    typer.echo("  languages: " + ", ".join(f"{k}={v}" for k, v in sorted(result["languages"].items())))
    if result["qe_reasons"]:
        typer.echo("  QE flags: " + ", ".join(f"{k}={v}" for k, v in sorted(result["qe_reasons"].items())))
    typer.echo(f"  translator calls {result['translator_calls']}, cache hits {result['cache_hits']}")
    for k, v in result["provenance"].items():
        typer.echo(f"  {k}: {v}")


def _comma_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def translate(
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec; command-line options override it")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    languages: Annotated[str | None, typer.Option(help="comma list of target languages, e.g. pt,es,de [pt]")] = None,
    fields: Annotated[str | None, typer.Option(help="comma list of caption_short,caption_dense,alt_text "
                                                    "[caption_short]")] = None,
    allocation: Annotated[str | None, typer.Option(help="all|sample [all]")] = None,
    per_sample: Annotated[int | None, typer.Option(help="languages per sample with --allocation sample [1]")] = None,
    distribution: Annotated[str | None, typer.Option(help="mc4|uniform or pt=0.6,es=0.4 [mc4]")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the per-sample language draw [0]")] = None,
    profile: Annotated[str | None, typer.Option(help="cpu|gpu: default backend [cpu: bergamot]")] = None,
    backend: Annotated[str | None, typer.Option(help="bergamot|ctranslate2|openai")] = None,
    model: Annotated[str | None, typer.Option(help="CTranslate2 model folder, or served model name")] = None,
    endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (vLLM, llama.cpp server)")] = None,
    models_dir: Annotated[str | None, typer.Option(help="local models folder [$CAPFACTORY_MODELS_DIR or "
                                                        "./models]")] = None,
    round_trip: Annotated[bool | None, typer.Option("--round-trip/--no-round-trip",
                                                    help="QE by back translation + chrF")] = None,
    min_chrf: Annotated[float | None, typer.Option(help="round-trip chrF below this is flagged [35]")] = None,
    drop_failed: Annotated[bool | None, typer.Option("--drop-failed/--keep-failed",
                                                     help="publish leaves flagged translations out")] = None,
    concurrency: Annotated[int | None, typer.Option(help="requests/threads in flight per shard [8]")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """Machine-translate fused captions (and/or alt-text) with quality estimation, into translated/."""
    from infra.models import ModelUnavailable
    from infra.settings import Settings

    if distribution and "=" in distribution:
        try:
            dist: Any = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in _comma_list(distribution))}
        except ValueError:
            _fail(f"--distribution {distribution!r}: expected mc4, uniform or lang=weight,lang=weight")
    else:
        dist = distribution
    overrides = {
        "store": store, "translate.languages": _comma_list(languages), "translate.fields": _comma_list(fields),
        "translate.allocation": allocation, "translate.per_sample": per_sample, "translate.distribution": dist,
        "translate.seed": seed, "translate.profile": profile, "translate.backend": backend, "translate.model": model,
        "translate.endpoint": endpoint, "translate.round_trip": round_trip, "translate.min_chrf": min_chrf,
        "translate.drop_failed": drop_failed, "translate.concurrency": concurrency,
    }
    ds = resolve_spec(spec, dataset, [], {}, overrides)
    settings = Settings()
    from flows.translate import run_translate

    try:
        result = run_translate(ds.name, store=ds.store or settings.store, config=ds.translate,
                               models_dir=models_dir or settings.models_dir,
                               dask_address=dask_address or settings.dask_address,
                               workers=workers or settings.dask_workers, progress=sys.stderr.isatty())
    except (ModelUnavailable, StoreError, SpecError, ValueError) as e:
        _fail(str(e))
    _print_translate_summary(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


@app.command()
def publish(
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec (its quality filters apply)")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    caption_field: Annotated[str | None, typer.Option(help="KEY.txt: caption_short|caption_dense|alt_text "
                                                           "[caption_short]")] = None,
    shard_size: Annotated[int | None, typer.Option(help="samples per published tar [1000]")] = None,
    selected_only: Annotated[bool | None, typer.Option("--selected-only/--all-rows",
                                                       help="samples.parquet: selected rows only [all rows]")] = None,
    license_id: Annotated[str | None, typer.Option("--license", help="dataset-card license id [other]")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """Publish the selected samples as WebDataset shards, every sample as one Parquet table, and a dataset card."""
    from infra.settings import Settings

    overrides = {"store": store, "publish.caption_field": caption_field, "publish.shard_size": shard_size,
                 "publish.include_unselected_in_parquet": None if selected_only is None else not selected_only,
                 "publish.license": license_id}
    ds = resolve_spec(spec, dataset, [], {}, overrides)
    settings = Settings()
    from flows.publish import run_publish

    try:
        result = run_publish(ds.name, store=ds.store or settings.store, spec=ds,
                             dask_address=dask_address or settings.dask_address,
                             workers=workers or settings.dask_workers, progress=sys.stderr.isatty())
    except (StoreError, SpecError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"\ndataset {result['dataset']}: {result['selected']} of {result['samples']} samples published in "
               f"{len(result['shards'])} shards under {result['store']}/{result['folder']}/")
    typer.echo("  filters: " + ", ".join(f"{k}={v}" for k, v in result["filters"].items() if k != "skipped"))
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


@app.command()
def report(
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec (its quality filters apply)")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    gallery_size: Annotated[int | None, typer.Option(help="sample thumbnails in the gallery [24]")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
) -> None:
    """Write the dataset report (plots, filter counts, a sample gallery) to <dataset>/report/index.html."""
    from infra.settings import Settings

    ds = resolve_spec(spec, dataset, [], {}, {"store": store, "publish.gallery_size": gallery_size})
    settings = Settings()
    from flows.report import run_report

    try:
        result = run_report(ds.name, store=ds.store or settings.store, spec=ds,
                            dask_address=dask_address or settings.dask_address,
                            workers=workers or settings.dask_workers)
    except (StoreError, SpecError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"\nreport of {result['dataset']}: {result['path']}")
    typer.echo(f"  {result['selected']} of {result['samples']} samples selected; stages run: "
               f"{', '.join(result['stages_run'])}")


@app.command()
def validate(
    dataset: Annotated[str | None, typer.Option(help="dataset name (folder in the store)")] = None,
    spec: Annotated[Path | None, typer.Option(help="YAML dataset spec; command-line options override it")] = None,
    store: Annotated[str | None, typer.Option(help="artifact store: a folder or s3://bucket/prefix")] = None,
    on_failure: Annotated[str | None, typer.Option(help="quarantine|fail [quarantine]")] = None,
    stages: Annotated[str | None, typer.Option(help="comma list of raw,experts,fused,translated,scores "
                                                    "[every output present]")] = None,
    drift_reference_shard: Annotated[int | None, typer.Option(help="scores shard the drift checks compare "
                                                                   "with [the first]")] = None,
    data_docs: Annotated[bool | None, typer.Option("--data-docs/--no-data-docs", help="build GX data docs")] = None,
    dask_address: Annotated[str | None, typer.Option(help="attach to this Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes [cores]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary as JSON here")] = None,
) -> None:
    """Run the Great Expectations suites on every stage output: quarantine bad rows or fail the run."""
    from infra.settings import Settings
    from tasks.validate import ValidationFailed

    overrides = {
        "store": store, "validation.on_failure": on_failure, "validation.data_docs": data_docs,
        "validation.stages": [s.strip() for s in stages.split(",") if s.strip()] if stages else None,
        "validation.drift_reference_shard": drift_reference_shard,
    }
    ds = resolve_spec(spec, dataset, [], {}, overrides)
    settings = Settings()
    from flows.validate import run_validate

    try:
        result = run_validate(ds.name, store=ds.store or settings.store, spec=ds,
                              dask_address=dask_address or settings.dask_address,
                              workers=workers or settings.dask_workers, progress=sys.stderr.isatty())
    except (ValidationFailed, StoreError, SpecError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"\ndataset {result['dataset']} in {result['store']}: {result['on_failure']} mode; "
               f"no output yet: {', '.join(result['skipped_suites']) or '-'}")
    for suite, s in result["suites"].items():
        failing = ", ".join(f"{k} x{v}" for k, v in sorted(s["failing_expectations"].items())) or "-"
        typer.echo(f"  {suite}: {s['passed']}/{s['shards']} shards passed, {s['quarantined_rows']} rows "
                   f"quarantined; failing: {failing}")
    if result["data_docs"]:
        typer.echo(f"  data docs: {result['data_docs']}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))


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
    from infra.models import ModelUnavailable

    try:
        result = run_demo(store=store, samples=samples, dataset=dataset)
    except (InputError, StoreError, SpecError, ModelUnavailable, RuntimeError) as e:
        _fail(str(e))
    stages = result["stages"]
    _print_summary(stages["ingest"])
    _print_extract_summary(stages["extract"])
    _print_fuse_summary(stages["fuse"])
    _print_translate_summary(stages["translate"])
    report = stages["report"]
    typer.echo(f"\npublished: {report['selected']} of {report['samples']} samples selected "
               f"({stages['publish']['folder']}); report: {report['path']}")
    typer.echo("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))


if __name__ == "__main__":
    app()
