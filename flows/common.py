"""Orchestration helpers shared by the stage flows."""

from __future__ import annotations

from prefect.futures import PrefectFuture, as_completed
from tqdm import tqdm


def gather_shards(futures: dict[PrefectFuture, int], samples: dict[int, int], desc: str, progress: bool,
                  logger) -> tuple[list[dict], dict[int, str]]:
    """Wait for shard tasks as they finish, with a progress bar in samples. A shard that failed (after its
    retries) is logged and listed, and the others still finish. Returns (stats of finished shards,
    {failed shard: its error})."""
    finished: list[dict] = []
    failed: dict[int, str] = {}
    ok = errors = 0
    with tqdm(total=sum(samples[s] for s in futures.values()), unit="img", desc=desc, disable=not progress) as bar:
        for future in as_completed(list(futures)):
            shard = futures[future]
            try:
                stats = future.result()
            except Exception as e:
                logger.error("shard %05d failed: %s", shard, e)
                failed[shard] = f"{type(e).__name__}: {e}"
                continue
            finished.append(stats)
            ok += stats["counts"].get("ok", 0)
            errors += stats["counts"].get("error", 0)
            bar.update(samples[shard])
            bar.set_postfix(ok=ok, failed=errors)
    return finished, failed


def failure_message(failed: dict[int, str], what: str = "shard") -> str:
    first = min(failed)
    return (f"{len(failed)} {what}(s) failed: {sorted(failed)} (first, {first:05d}: {failed[first]}); re-run the "
            "same command to resume them")
