"""The stage contract: a shard stage implements what it computes; this base owns everything around it.

A stage (in the spirit of NeMo Curator's ProcessingStage and datatrove's pipeline steps) is one class with
- `name`: the command, the store folder, the spec's config section and the deployment, all the same word;
- `reads` / `requires`: the stage outputs it reads (their done markers fingerprint its shards) and the ones that
  must have finished a shard before it can run;
- `schema`: its output table; `plan()`: backends and GPU need, raising every error a user can fix before any task
  runs; `setup()`: models, once per worker process (the backends' per-process cache); `process()`: one shard.
The base owns shard status (config hash + upstream fingerprint), the upstream guard, writing the table and then the
done marker (last), the transient-error rule (a shard whose backend went away keeps what it made and is retried),
progress, the totals and the summary lines the CLI and the Prefect artifact print.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from infra.store import ArtifactStore, StoreError, open_store
from tasks.shards import planned_shards, read_marker, stage_key, upstream_fingerprint, write_marker

# Error labels (as the backends write them) that mean "try again later", not "this input fails".
TRANSIENT_ERRORS = frozenset({"timeout", "connection", "http_408", "http_429", "http_500", "http_502", "http_503",
                              "http_504"})
# Stats keys that describe one shard, not the run: never summed into the totals.
_PER_SHARD = frozenset({"shard", "config_hash", "input_marker", "seconds", "flow_run_id", "finished_at"})


class StageError(RuntimeError):
    """A stage cannot run on a dataset as asked (never ingested, an input stage missing); says what to run."""


class BackendError(RuntimeError):
    """The stage's backend failed for some samples (not because of the samples): the shard keeps what it made and
    is not marked done, so a re-run asks only for the rest. `transient`: worth retrying the task at once."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):
        return type(self), (str(self), self.transient)


def is_transient(error: str | None) -> bool:
    return bool(error) and error.split(":", 1)[0].strip() in TRANSIENT_ERRORS


@dataclass(frozen=True)
class StagePlan:
    """What a stage will run with, resolved before any task: backends per role and whether it needs a GPU."""

    backends: dict[str, str] = field(default_factory=dict)
    gpu: bool = False
    detail: Any = None  # the stage's own resolved choice (an ExpertPlan, an LLMChoice, ...)


@dataclass
class ShardOutput:
    """What `process()` returns: the rows of the stage's table, the stage's own stats, and the backend's errors
    (calls that failed because of the model or server, not the sample): with any, the table is kept and the marker
    is not written."""

    rows: list[dict]
    stats: dict = field(default_factory=dict)
    backend_errors: list[str] = field(default_factory=list)


def progress_topic(stage: str, dataset: str) -> str:
    """The Dask event topic a stage's shards report their progress on (one writer per dataset: no two runs share
    it)."""
    return f"capfactory-progress/{stage}/{dataset}"


class ShardProgress:
    """Progress within one shard, reported by a stage's per-sample or per-batch loop as `ctx.progress(done,
    total)` (from any thread; any unit, the fraction done is what counts). It goes to the task's logger every
    `log_every` seconds (the Prefect UI), and as a Dask event (`Worker.log_event`: a small message on the worker's
    existing stream to the scheduler, at most every `send_every` seconds) to the flow, whose progress bar moves
    with it (flows/common.py `gather_shards`). Outside a Dask worker or a Prefect task it only logs."""

    def __init__(self, stage: str, dataset: str, shard: int, log_every: float = 10.0, send_every: float = 0.5):
        self.topic, self.label, self.shard = progress_topic(stage, dataset), f"{stage} shard {shard:05d}", shard
        self.log_every, self.send_every = log_every, send_every
        self._logger, self._worker = _task_logger(), _dask_worker()  # both thread-bound: taken in the task's thread
        self._lock = threading.Lock()
        self._logged = self._sent = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            send = self._worker is not None and (done >= total or now - self._sent >= self.send_every)
            log = now - self._logged >= self.log_every
            self._sent = now if send else self._sent
            self._logged = now if log else self._logged
        if send:
            self._worker.log_event(self.topic, {"shard": self.shard, "done": done, "total": total})
        if log:
            self._logger.info("%s: %d of %d done (%.0f%%)", self.label, done, total, 100 * done / max(total, 1))


# Neither is imported here: a process that has not imported them is not running a Prefect task or a Dask worker.
def _task_logger():
    prefect = sys.modules.get("prefect")
    try:
        return prefect.get_run_logger()
    except Exception:  # not in a Prefect task run
        return logging.getLogger("capfactory")


def _dask_worker():
    distributed = sys.modules.get("distributed")
    try:
        return distributed.get_worker()
    except (AttributeError, ValueError):  # not in a Dask task
        return None


def _no_progress(done: int, total: int) -> None:
    pass


class ShardContext:
    """One shard of one dataset, as a stage's `process()` sees it: reading other stages' outputs, and reporting
    progress within the shard with `progress(done, total)` (see ShardProgress)."""

    def __init__(self, store: ArtifactStore, dataset: str, shard: int, progress=_no_progress):
        self.store, self.dataset, self.shard, self.progress = store, dataset, shard, progress

    def key(self, stage: str, ext: str = "parquet") -> str:
        return stage_key(self.dataset, stage, self.shard, ext)

    def read(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        return self.store.get_parquet(self.key(stage), columns=columns)

    def read_rows(self, stage: str, columns: list[str] | None = None, missing_ok: bool = False) -> list[dict]:
        """The rows of another stage's table for this shard; [] when `missing_ok` and it was never written (or
        was written by an older version without these columns)."""
        try:
            return self.read(stage, columns).to_pylist()
        except (StoreError, KeyError, pa.ArrowInvalid):
            if missing_ok:
                return []
            raise

    def images(self) -> dict[str, bytes]:
        from tasks.shards import read_shard_images

        return read_shard_images(self.store, self.dataset, self.shard)


def take_by_key(keys: pa.Array, table: pa.Table, columns: list[str]) -> dict[str, pa.Array]:
    """`columns` of `table` aligned to `keys` (null where a key has no row); works for nested types too."""
    import pyarrow.compute as pc

    idx = pc.index_in(keys, value_set=table.column("key").combine_chunks())
    return {c: table.column(c).combine_chunks().take(idx) for c in columns}


def backend_failure(stage: str, errors: list[str], samples: int) -> BackendError:
    """One clear error for a shard whose backend failed: how many calls, of which kinds, the first message."""
    kinds = Counter(e.split(":", 1)[0].strip() for e in errors)
    transient = all(is_transient(e) for e in errors)
    then = "transient: the shard is retried" if transient else "the task is not retried"
    return BackendError(f"{len(errors)} {stage} calls failed ({', '.join(f'{k}={v}' for k, v in kinds.items())}) in "
                        f"a shard of {samples} samples, e.g. {errors[0]}; the shard is not marked done ({then}): what "
                        "was made is kept, and a re-run asks only for the rest", transient=transient)


def merge_totals(stats: list[dict]) -> dict:
    """Totals of shard stats: numbers are summed, count maps are summed per key, anything else (provenance)
    is taken from the first shard."""
    totals: dict[str, Any] = {}
    for s in stats:
        for k, v in s.items():
            if k in _PER_SHARD:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float | dict):
                totals.setdefault(k, v)
            elif isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) for x in v.values()):
                totals[k] = dict(Counter(totals.get(k, {})) + Counter(v)) if k in totals else dict(v)
            elif isinstance(v, dict):
                totals.setdefault(k, v)
            else:
                totals[k] = totals.get(k, 0) + v
    return totals


def counts_line(label: str, counts: dict) -> str:
    return f"  {label}: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing to do")


class Stage:
    """Any stage of the registry (infra/stages.py). Dataset-wide stages (validate, publish, report) are only
    this: their flows live in flows/<name>.py and read the whole spec."""

    name: ClassVar[str]
    description: ClassVar[str]
    warm: ClassVar[tuple[str, ...]] = ()  # modules a local worker imports while the Prefect server boots

    def summary(self, result: dict) -> list[str]:
        """Lines for the console (and the Prefect artifact) from the stage flow's result."""
        return []


class ShardStage(Stage):
    """A stage that maps one task over the dataset's shards. Subclasses set the class attributes and implement
    `plan()` and `process()`; the hooks below have defaults. Its config is the spec section of its name."""

    schema: ClassVar[pa.Schema]
    reads: ClassVar[tuple[str, ...]] = ("ingest",)
    requires: ClassVar[tuple[str, ...]] = ("ingest",)
    retries: ClassVar[int] = 1  # task retries, for what the stage itself does not absorb
    published: ClassVar[tuple[str, ...]] = ()  # columns of its table that reach the release (publish joins them)
    has_prepare: ClassVar[bool] = False  # whether `prepare()` does anything (it then runs as a task)

    def __init__(self, config: Any = None, models_dir: str | None = None, **options: Any):
        self.config = config if config is not None else self.config_type()()
        self.models_dir = models_dir
        self.options = options  # run options that are not config (not hashed), e.g. ingest's retry_failed

    @classmethod
    def config_type(cls) -> type:
        from infra.settings import DatasetSpec

        return DatasetSpec.model_fields[cls.name].annotation

    @classmethod
    def from_spec(cls, spec, models_dir: str | None = None, **options: Any) -> ShardStage:
        return cls(spec.section(cls.name), models_dir, **options)

    @classmethod
    def from_config(cls, config: dict, models_dir: str | None = None, **options: Any) -> ShardStage:
        return cls(cls.config_type().model_validate(config), models_dir, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(config_hash={self.config_hash})"

    @property
    def config_hash(self) -> str:
        return self.config.config_hash()

    # ---- what a stage implements -----------------------------------------------------------------------------

    def plan(self) -> StagePlan:
        """Resolve backends; raise ModelUnavailable (or ValueError) for anything that cannot run."""
        return StagePlan()

    def process(self, ctx: ShardContext) -> ShardOutput:
        raise NotImplementedError

    def check_backends(self) -> None:
        """Ask each remote model server for one tiny answer (raise ModelUnavailable with what to do), once per run
        before any shard; in-process models are checked by `plan()` and loaded by `process()`."""

    def upstream(self) -> tuple[str, ...]:
        """The stage outputs this config reads (some stages read more or less depending on their config)."""
        return self.reads

    def required(self) -> tuple[str, ...]:
        return self.requires

    def prepare(self, store_uri: str, dataset: str) -> dict:
        """Dataset-wide work before the shard status is read (ingest writes its manifests); its result joins the
        summary. Set `has_prepare` when a stage implements it."""
        return {}

    def shard_samples(self, store: ArtifactStore, dataset: str, shard: int) -> int:
        """The samples of a shard, for the progress bar."""
        return read_marker(store, dataset, "ingest", shard)["samples"]

    def check_dataset(self, store: ArtifactStore, dataset: str, shards: list[int]) -> None:
        """Dataset-level preconditions beyond the per-shard ones (raise StageError with what to run)."""

    def finish(self, store_uri: str, dataset: str, stats: list[dict], done: list[int], failed: list[int]) -> dict:
        """Dataset-wide work after the shards (dedup, ...), run as its own task; its result joins the summary."""
        return {}

    def release_columns(self, keys: pa.Array, table: pa.Table, **options: Any) -> dict[str, pa.Array]:
        """What this stage's shard table adds to the published table, aligned to the raw shard's `keys`."""
        return take_by_key(keys, table, [c for c in self.published if c in table.column_names])

    def summary(self, result: dict) -> list[str]:
        lines = [counts_line("status", result.get("counts", {}))]
        lines += [f"  {k}: {v}" for k, v in result.get("provenance", {}).items()]
        return lines

    # ---- what the base owns ----------------------------------------------------------------------------------

    def status(self, store: ArtifactStore, dataset: str) -> tuple[list[int], list[int], list[int]]:
        """(to run, already done, waiting): a shard waits until the required stages finished it, and is done when
        its marker carries the config hash and the current fingerprint of the upstream stages' markers."""
        todo, done, waiting = [], [], []
        required = self.required()
        for shard in planned_shards(store, dataset):
            if any(read_marker(store, dataset, s, shard) is None for s in required):
                waiting.append(shard)
                continue
            (done if self.is_current(store, dataset, shard) else todo).append(shard)
        return todo, done, waiting

    def is_current(self, store: ArtifactStore, dataset: str, shard: int) -> dict | None:
        """The shard's done marker when it carries this config and the current inputs, else None."""
        marker = read_marker(store, dataset, self.name, shard)
        fresh = (marker is not None and marker.get("config_hash") == self.config_hash
                 and marker.get("input_marker") in self.input_markers(store, dataset, shard))
        return marker if fresh else None

    def input_markers(self, store: ArtifactStore, dataset: str, shard: int) -> set[str]:
        """The input fingerprints that make a shard's marker current: the upstream markers as they are now."""
        return {upstream_fingerprint(store, dataset, shard, self.upstream())}

    def preflight(self, store: ArtifactStore, dataset: str) -> tuple[list[int], list[int], list[int]]:
        """The shard status, after the dataset-level checks: cheap, so it also runs before any runtime starts."""
        todo, done, waiting = self.status(store, dataset)
        if not (todo or done or waiting):
            raise StageError(f"dataset {dataset!r} has no ingested shards in {store.uri}; run `capfactory ingest` "
                             "first")
        self.check_dataset(store, dataset, sorted([*todo, *done, *waiting]))
        return todo, done, waiting

    def guard(self, store: ArtifactStore, dataset: str, shard: int) -> None:
        for stage in self.required():
            if read_marker(store, dataset, stage, shard) is None:
                raise StageError(f"{stage} shard {shard:05d} of {dataset} is not finished; run "
                                 f"`capfactory {stage}` first")

    def run_shard(self, store_uri: str, dataset: str, shard: int) -> dict:
        """The shard task: guard, compute, write the table, then (unless the backend failed) the done marker with
        the stats. Returns the stats; a shard already done (a task run again after its worker died) is not redone."""
        started = time.time()
        store = open_store(store_uri)
        done = self.is_current(store, dataset, shard)
        if done is not None:
            return done
        self.guard(store, dataset, shard)
        out = self.process(ShardContext(store, dataset, shard, ShardProgress(self.name, dataset, shard)))
        store.put_parquet(stage_key(dataset, self.name, shard, "parquet"), pa.Table.from_pylist(out.rows, self.schema))
        if out.backend_errors:
            raise backend_failure(self.name, out.backend_errors, len(out.rows))
        stats = {"shard": shard, "config_hash": self.config_hash,
                 "input_marker": upstream_fingerprint(store, dataset, shard, self.upstream()),
                 "samples": len(out.rows), "counts": dict(Counter(r["status"] for r in out.rows)), **out.stats,
                 "seconds": round(time.time() - started, 3)}
        return write_marker(store, dataset, self.name, shard, stats)
