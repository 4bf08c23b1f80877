"""The `translate` flow: machine translation with quality estimation over every shard whose inputs are ready."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import gather_shards
from infra.runtime import flow_runtime
from infra.settings import Settings, TranslateConfig
from infra.store import open_store
from tasks.ingest import STAGE as RAW
from tasks.shards import read_marker
from tasks.translate import plan_translation, shards_to_translate, translate_shard


@task(name="translate-shard", task_run_name="translate-shard-{shard:05d}", persist_result=False, retries=2,
      retry_delay_seconds=5)
def translate_shard_task(store_uri: str, dataset: str, shard: int, config: TranslateConfig,
                         models_dir: str | None) -> dict:
    return translate_shard(store_uri, dataset, shard, config, models_dir)


def _on_gpu(name: str, config: TranslateConfig) -> bool:
    return name == "ctranslate2" and config.profile == "gpu"


@flow(name="translate", log_prints=True)
def translate_flow(dataset: str, store: str | None = None, config: TranslateConfig | None = None,
                   models_dir: str | None = None, progress: bool = False) -> dict:
    """Translate captions (and optionally alt-text) into `<dataset>/translated/`, with QE flags per row."""
    logger = get_run_logger()
    config = config or TranslateConfig()
    models_dir = models_dir or Settings().models_dir
    choice = plan_translation(config, models_dir)  # a backend, model or pair that cannot work fails here
    store_uri = open_store(store or Settings().store).uri
    store = open_store(store_uri)
    todo, done, waiting = shards_to_translate(store, dataset, config)
    if not (todo or done or waiting):
        raise ValueError(f"dataset {dataset!r} has no ingested shards in {store_uri}; run `capfactory ingest` first")
    logger.info("translation (%s, %s -> %s, %s) on %d shards (%d already done)", choice.name,
                config.source_language, ",".join(config.languages), config.allocation, len(todo), len(done))
    samples = {s: read_marker(store, dataset, RAW, s)["samples"] for s in todo}
    placement = dask.annotate(resources={"GPU": 1}) if _on_gpu(choice.name, config) else nullcontext()
    with placement:
        futures = {translate_shard_task.submit(store_uri, dataset, s, config, models_dir): s for s in todo}
    finished, failed = gather_shards(futures, samples, f"translate {dataset}", progress, logger)
    result = {
        "dataset": dataset, "store": store_uri, "config_hash": config.config_hash(),
        "shards_translated": sorted(s["shard"] for s in finished), "shards_failed": sorted(failed),
        "shards_already_done": done, "shards_waiting": waiting,
        "counts": dict(sum((Counter(s["counts"]) for s in finished), Counter())),
        "languages": dict(sum((Counter(s["languages"]) for s in finished), Counter())),
        "qe_reasons": dict(sum((Counter(s["qe_reasons"]) for s in finished), Counter())),
        "translator_calls": sum(s["translator_calls"] for s in finished),
        "cache_hits": sum(s["cache_hits"] for s in finished),
        "provenance": finished[0]["provenance"] if finished else {},
    }
    create_markdown_artifact(
        f"# Translation of `{dataset}`\n\n{choice.name}, {config.source_language} -> {', '.join(config.languages)} "
        f"({config.allocation}); rows {result['counts']}; per language {result['languages']}; QE reasons "
        f"{result['qe_reasons']}; translator calls {result['translator_calls']}, cache hits {result['cache_hits']}.",
        key="translate-summary", description=f"translation of {dataset}")
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed: {failed}; re-run the same command to resume them")
    return result


def run_translate(dataset: str, store: str | None = None, config: TranslateConfig | None = None,
                  models_dir: str | None = None, dask_address: str | None = None, workers: int | None = None,
                  progress: bool = False) -> dict:
    config = config or TranslateConfig()
    models_dir = models_dir or Settings().models_dir
    choice = plan_translation(config, models_dir)
    shards_to_translate(open_store(store or Settings().store), dataset, config)  # never fused: fails before startup
    with flow_runtime(dask_address, workers, gpu=_on_gpu(choice.name, config), warm=("tasks.translate",)) as runner:
        return translate_flow.with_options(task_runner=runner)(dataset=dataset, store=store, config=config,
                                                               models_dir=models_dir, progress=progress)
