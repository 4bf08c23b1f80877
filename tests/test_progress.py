"""Progress within a shard (issue 13.10): a stage's loop calls `ctx.progress(done, total)`; the task logs it every
few seconds (the Prefect UI) and sends it as a Dask event to the flow, whose progress bar moves within the shard."""

from __future__ import annotations

import logging
import re
import time

import pytest
from distributed import LocalCluster
from prefect import flow, get_run_logger, task

from flows.common import gather_shards, progress_events
from infra.runtime import flow_runtime
from tasks.stage import ShardContext, ShardProgress, progress_topic

STEPS = 10


def test_progress_is_logged_every_few_seconds_outside_a_worker(caplog):
    report = ShardProgress("fuse", "ds", 3, log_every=0.0)
    with caplog.at_level(logging.INFO, logger="capfactory"):
        report(4, 10)
    assert "fuse shard 00003: 4 of 10 done (40%)" in caplog.text
    quiet = ShardProgress("fuse", "ds", 3)  # the default: one line per 10 s, not one per call
    with caplog.at_level(logging.INFO, logger="capfactory"):
        caplog.clear()
        for i in range(100):
            quiet(i, 100)
    assert caplog.text == ""
    assert ShardContext(None, "ds", 0).progress(1, 2) is None  # a context made without a reporter accepts calls


@task(task_run_name="slow-shard-{shard}")
def slow_shard(shard: int) -> dict:
    report = ShardProgress("toy", "progress-ds", shard, log_every=0.0, send_every=0.0)
    for i in range(1, STEPS + 1):
        time.sleep(0.3)
        report(i, STEPS)
    return {"shard": shard, "counts": {"ok": STEPS}}


@flow
def toy_flow() -> tuple[list, list[dict]]:
    events: list = []
    topic = progress_topic("toy", "progress-ds")
    with progress_events(topic, events.append):
        future = slow_shard.submit(0)
        future.result()
        time.sleep(1)  # the last events are on their way through the scheduler
    finished, failed = gather_shards({slow_shard.submit(1): 1}, {1: STEPS}, "toy", True, get_run_logger(),
                                     topic=topic)
    assert not failed
    return [e[1] for e in events], finished


@pytest.mark.slow
def test_progress_reaches_the_flow_and_moves_the_bar_within_a_shard(capfd):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            flow_runtime(cluster.scheduler_address) as runner:
        events, finished = toy_flow.with_options(task_runner=runner)()
    # The events arrive while the shard runs, in order, for that shard.
    assert [e["done"] for e in events] == list(range(1, STEPS + 1)) and {e["shard"] for e in events} == {0}
    assert finished[0]["shard"] == 1
    # The bar of the second shard showed values between 0 and 10 of its 10 samples (before: only 0/10 and 10/10).
    err = capfd.readouterr().err
    shown = {int(n) for n in re.findall(r"(\d+)/10 ", err)}
    assert shown & set(range(1, STEPS)), err[-2000:]
