"""Orchestration helpers shared by the stage flows."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.futures import PrefectFuture, as_completed
from tqdm import tqdm


@contextmanager
def progress_events(topic: str | None, handler) -> Iterator[None]:
    """`handler((time, message))` for each progress event the shard tasks send on `topic` (tasks/stage.py
    ShardProgress), while the block runs; nothing outside a flow running on Dask."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = getattr(getattr(context, "task_runner", None), "client", None) if topic else None
    if client is None:
        yield
        return
    client.subscribe_topic(topic, handler)
    try:
        yield
    finally:
        client.unsubscribe_topic(topic)


def gather_shards(futures: dict[PrefectFuture, int], samples: dict[int, int], desc: str, progress: bool,
                  logger, topic: str | None = None) -> tuple[list[dict], dict[int, str]]:
    """Wait for shard tasks as they finish, with a progress bar in samples that also moves within a shard when
    its task reports progress on `topic`. A shard that failed (after its retries) is logged and listed, and the
    others still finish. Returns (stats of finished shards, {failed shard: its error})."""
    finished: list[dict] = []
    failed: dict[int, str] = {}
    ok = errors = 0
    partial: dict[int, int] = {}  # samples done so far in shards still running
    lock = threading.Lock()

    def moved(event) -> None:  # called on the Dask client's thread
        shard, done, total = event[1]["shard"], event[1]["done"], event[1]["total"]
        with lock:
            if shard in partial:
                now = min(samples[shard], samples[shard] * done // max(total, 1))
                if now > partial[shard]:
                    bar.update(now - partial[shard])
                    partial[shard] = now

    with tqdm(total=sum(samples[s] for s in futures.values()), unit="img", desc=desc, disable=not progress) as bar, \
            progress_events(topic if progress else None, moved):
        partial.update({s: 0 for s in futures.values()})
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
            with lock:
                bar.update(samples[shard] - partial.pop(shard, 0))
                bar.set_postfix(ok=ok, failed=errors)
    return finished, failed


def failure_message(failed: dict[int, str], what: str = "shard") -> str:
    first = min(failed)
    return (f"{len(failed)} {what}(s) failed: {sorted(failed)} (first, {first:05d}: {failed[first]}); re-run the "
            "same command to resume them")
