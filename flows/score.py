"""The `score` flow: CLIP / NSFW / language scores over every finished raw shard, then semantic dedup over the
whole dataset's image embeddings (filters are views applied at publish time, see tasks/filters.py)."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import gather_shards
from infra.runtime import flow_runtime
from infra.settings import QualityConfig, Settings
from infra.store import open_store
from tasks.ingest import STAGE as RAW
from tasks.score import STAGE, plan_scores, score_shard, shards_to_score
from tasks.semdedup import semdedup_dataset
from tasks.shards import read_marker


@task(name="score-shard", task_run_name="score-shard-{shard:05d}", persist_result=False, retries=1,
      retry_delay_seconds=2)
def score_shard_task(store_uri: str, dataset: str, shard: int, config: QualityConfig, models_dir: str) -> dict:
    return score_shard(store_uri, dataset, shard, config, models_dir)


@task(name="semdedup", persist_result=False, retries=1, retry_delay_seconds=2)
def semdedup_task(store_uri: str, dataset: str, model_id: str, shards: list[int], config: QualityConfig) -> dict:
    s = config.semdedup
    return semdedup_dataset(open_store(store_uri), dataset, model_id, shards, s.clusters, s.eps, s.seed, s.iterations)


@flow(name="score", log_prints=True)
def score_flow(dataset: str, store: str | None = None, config: QualityConfig | None = None,
               models_dir: str | None = None, progress: bool = False) -> dict:
    """Score the dataset's shards into `<dataset>/scores/` (+ `<dataset>/embeddings/`), then SemDeDup."""
    logger = get_run_logger()
    config = config or QualityConfig()
    models_dir = str(Path(models_dir or Settings().models_dir).resolve())
    plan = plan_scores(config, models_dir)  # a model that cannot be provided fails here, before any task runs
    store_uri = open_store(store or Settings().store).uri
    store = open_store(store_uri)
    todo, done, waiting = shards_to_score(store, dataset, config)
    if not (todo or done or waiting):
        raise ValueError(f"dataset {dataset!r} has no ingested shards in {store_uri}; run `capfactory ingest` first")
    if waiting:
        logger.warning("%d raw shards are not finished and are left for a later run: %s", len(waiting), waiting)
    logger.info("scores on %d shards (%d already done); models: %s", len(todo), len(done), plan.summary)
    samples = {s: read_marker(store, dataset, RAW, s)["samples"] for s in todo}
    # CLIP of the gpu profile only lands on workers that advertise a GPU.
    placement = dask.annotate(resources={"GPU": 1}) if config.profile == "gpu" and plan.clip else nullcontext()
    with placement:
        futures = {score_shard_task.submit(store_uri, dataset, s, config, models_dir): s for s in todo}
    finished, failed = gather_shards(futures, samples, f"score {dataset}", progress, logger)
    scored = sorted([*done, *(s["shard"] for s in finished)])
    provenance = (finished[0] if finished else read_marker(store, dataset, STAGE, done[0]) if done else {}) \
        .get("provenance", {})
    dedup = {"run": False, "reason": "semdedup is disabled"}
    if config.semdedup.enabled and "clip" in provenance and not failed:
        dedup = {"run": True, **semdedup_task.submit(store_uri, dataset, provenance["clip"], scored, config).result()}
    elif config.semdedup.enabled:
        dedup["reason"] = "shards failed" if failed else "no image embeddings (CLIP is off)"
    result = {
        "dataset": dataset, "store": store_uri, "config_hash": config.config_hash(),
        "shards_scored": sorted(s["shard"] for s in finished), "shards_failed": sorted(failed),
        "shards_already_done": done, "shards_waiting_for_ingest": waiting,
        "counts": dict(sum((Counter(s["counts"]) for s in finished), Counter())),
        "images_embedded": sum(s["images_embedded"] for s in finished),
        "embeddings_reused": sum(s["embeddings_reused"] for s in finished),
        "models": plan.summary, "semdedup": dedup, "provenance": provenance,
    }
    create_markdown_artifact(
        f"# Scores of `{dataset}`\n\n{result['counts']}; models: {plan.summary}; images embedded "
        f"{result['images_embedded']}, embeddings reused {result['embeddings_reused']}; semantic dedup: {dedup}.",
        key="score-summary", description=f"scores of {dataset}")
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed: {failed}; re-run the same command to resume them")
    return result


def run_score(dataset: str, store: str | None = None, config: QualityConfig | None = None,
              models_dir: str | None = None, dask_address: str | None = None, workers: int | None = None,
              progress: bool = False) -> dict:
    config = config or QualityConfig()
    plan = plan_scores(config, str(Path(models_dir or Settings().models_dir).resolve()))  # fail before starting
    with flow_runtime(dask_address, workers, gpu=config.profile == "gpu" and plan.clip is not None,
                      warm=("tasks.score",)) as runner:
        return score_flow.with_options(task_runner=runner)(
            dataset=dataset, store=store, config=config, models_dir=models_dir, progress=progress)
