"""Crawl ingest, as plain functions: plan shards from inputs, ingest one shard, flag duplicates dataset-wide.

The reader -> downloader -> image processor -> writer path of img2dataset, one shard per call. A shard's
samples are downloaded concurrently on one event loop while a worker thread decodes/resizes them (Pillow
releases the GIL), so both overlap inside one process; Dask runs one such call per worker process.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pyarrow as pa

from infra.settings import IngestConfig, InputSpec
from infra.store import ArtifactStore, open_store
from tasks.dedup import find_duplicates
from tasks.download import Downloader, FetchResult
from tasks.images import ImageError, ProcessedImage, process_image
from tasks.inputs import InputReport, check_inputs, drop_keys, first_occurrences, read_inputs
from tasks.prefetch import worker_spool
from tasks.shards import (
    INGEST_SCHEMA,
    TarWriter,
    input_key,
    member_key,
    planned_shards,
    read_marker,
    read_shard_members,
    stage_key,
    write_marker,
)
from tasks.stage import ShardStage, StagePlan, counts_line

STAGE = "ingest"
MANIFEST_BASE = ("key", "url", "alt_text", "source", "input_warning")


@dataclass
class IngestPlan:
    dataset: str
    config_hash: str
    todo: list[int]  # shards to ingest (new, unfinished, or made with another config)
    retry: list[int]  # finished shards whose failed samples are downloaded again (--retry-failed)
    done: list[int]  # finished shards left as they are
    new_samples: int = 0
    known_samples: int = 0  # input rows already in the dataset
    duplicate_urls: int = 0  # input rows whose normalised URL repeats an earlier row
    reports: list[InputReport] = field(default_factory=list)
    samples_per_shard: dict[int, int] = field(default_factory=dict)


def plan_ingest(store: ArtifactStore, dataset: str, inputs: list[InputSpec], cfg: IngestConfig,
                retry_failed: bool = False) -> IngestPlan:
    """Write input manifests for unseen samples and decide which shards need work. Idempotent: a re-run with
    the same inputs plans nothing new, so a killed run resumes where it stopped."""
    table, reports = read_inputs(inputs)
    total = table.num_rows
    table = first_occurrences(table)
    existing = planned_shards(store, dataset)
    known: set[str] = set()
    sizes: dict[int, int] = {}
    for shard in existing:
        keys = store.get_parquet(input_key(dataset, shard), columns=["key"]).column("key").to_pylist()
        known.update(keys)
        sizes[shard] = len(keys)
    fresh = drop_keys(table, known)
    next_id = existing[-1] + 1 if existing else 0
    new = []
    for offset in range(0, fresh.num_rows, cfg.shard_size):
        chunk = fresh.slice(offset, cfg.shard_size)
        store.put_parquet(input_key(dataset, next_id), chunk)
        sizes[next_id] = chunk.num_rows
        new.append(next_id)
        next_id += 1
    todo, retry, done = ingest_status(store, dataset, cfg, retry_failed)
    return IngestPlan(dataset, cfg.config_hash(), todo, retry, done, new_samples=fresh.num_rows,
                      known_samples=table.num_rows - fresh.num_rows, duplicate_urls=total - table.num_rows,
                      reports=reports, samples_per_shard=sizes)


def ingest_status(store: ArtifactStore, dataset: str, cfg: IngestConfig, retry_failed: bool = False
                  ) -> tuple[list[int], list[int], list[int]]:
    """(to ingest: new, unfinished or made with another config; to retry: finished with failed samples, when
    `retry_failed`; done)."""
    todo, retry, done = [], [], []
    for shard in planned_shards(store, dataset):
        marker = read_marker(store, dataset, STAGE, shard)
        if marker is None or marker.get("config_hash") != cfg.config_hash():
            todo.append(shard)
        elif retry_failed and marker.get("counts", {}).get("error", 0) > 0:
            retry.append(shard)
        else:
            done.append(shard)
    return todo, retry, done


@dataclass(slots=True)
class SampleResult:
    fetch: FetchResult
    image: ProcessedImage | None = None


def _read_local(url: str, max_bytes: int) -> FetchResult:
    path = Path(url2pathname(urlsplit(url).path))
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return FetchResult("error", error=f"file is {size} bytes, over the {max_bytes}-byte cap",
                               error_class="too_large")
        return FetchResult("ok", data=path.read_bytes(), final_url=url)
    except OSError as e:
        return FetchResult("error", error=f"cannot read {path}: {e.strerror}", error_class="file_error")


def _internal_error(e: Exception, fetched: FetchResult | None = None) -> FetchResult:
    """An unexpected exception as the sample's recorded error: one bad sample never fails its shard."""
    fetched = fetched or FetchResult("error")
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    fetched.status, fetched.error_class, fetched.error = "error", "internal", text[:500]
    return fetched


def _process(fetched: FetchResult, cfg: IngestConfig) -> SampleResult:
    if fetched.status != "ok":
        return SampleResult(fetched)
    try:
        image = process_image(fetched.data, cfg.images)
    except ImageError as e:
        fetched.status, fetched.error_class, fetched.error = e.status, e.error_class, str(e)
        return SampleResult(fetched)
    except Exception as e:
        return SampleResult(_internal_error(e, fetched))
    return SampleResult(fetched, image)


async def fetch_and_process(samples: list[dict], cfg: IngestConfig) -> list[SampleResult]:
    """Download (or read) and process every sample; the result list is in input order."""
    loop = asyncio.get_running_loop()
    results: list[SampleResult | None] = [None] * len(samples)
    gate = asyncio.Semaphore(cfg.download.concurrency)
    spool = worker_spool()  # the command's head start, if it had one
    if spool is not None:
        await loop.run_in_executor(None, spool.request_stop)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="images") as images:
        async with Downloader(cfg.download) as downloader:

            async def one(i: int, sample: dict) -> None:
                async with gate:
                    try:
                        if sample["source"] == "file":
                            fetched = await loop.run_in_executor(images, _read_local, sample["url"],
                                                                 cfg.download.max_bytes)
                        else:
                            fetched = (spool and spool.take(sample["url"])) or await downloader.fetch(sample["url"])
                    except Exception as e:
                        fetched = _internal_error(e)
                results[i] = await loop.run_in_executor(images, _process, fetched, cfg)
                fetched.data = None  # free the original bytes early

            await asyncio.gather(*(one(i, s) for i, s in enumerate(samples)))
    return results  # type: ignore[return-value]


def _result_row(sample: dict, result: SampleResult) -> dict:
    f, img = result.fetch, result.image
    row = {name: sample.get(name) for name in MANIFEST_BASE}
    row.update(status=f.status, error_class=f.error_class, error=f.error, http_status=f.http_status,
               attempts=f.attempts, duplicate_of=None)
    if img is not None:
        row.update(bytes=img.original_bytes, mime=img.source_format, width=img.width, height=img.height,
                   original_width=img.original_width, original_height=img.original_height, sha256=img.sha256,
                   phash=img.phash)
    return row


def _sample_meta(row: dict, extras: dict) -> dict:
    keys = ("key", "url", "alt_text", "width", "height", "original_width", "original_height", "sha256", "phash")
    return {**{k: row[k] for k in keys}, **extras}


def _analysis_setting(cfg: IngestConfig) -> str | None:
    size = cfg.images.analysis_size
    return None if size is None else "original" if size == 0 else f"{size}px"


def ingest_shard(store_uri: str, dataset: str, shard: int, cfg: IngestConfig, retry_failed: bool = False) -> dict:
    """Ingest one planned shard (or, with retry_failed, only its failed samples) and write its tar, Parquet
    and done marker. Returns the shard's stats."""
    started = time.time()
    store = open_store(store_uri)
    manifest = store.get_parquet(input_key(dataset, shard))
    samples = manifest.to_pylist()
    extra_names = [n for n in manifest.column_names if n not in MANIFEST_BASE]
    previous: dict[str, dict] = {}
    if retry_failed:
        previous = {r["key"]: r for r in store.get_parquet(stage_key(dataset, STAGE, shard, "parquet")).to_pylist()}
    todo = [i for i, s in enumerate(samples) if not previous or previous[s["key"]]["status"] == "error"]
    results = dict(zip(todo, asyncio.run(fetch_and_process([samples[i] for i in todo], cfg)), strict=True))

    old_members: dict[str, list[str]] = {}  # key -> its members in the previous tar (kept on a retry)
    members = read_shard_members(store, dataset, shard) if previous else {}
    for name in sorted(members):
        old_members.setdefault(member_key(name), []).append(name)
    analysis_copies: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="capfactory-") as tmp:
        writer = TarWriter(Path(tmp))
        rows = []
        for i, sample in enumerate(samples):
            extras = {n: sample[n] for n in extra_names}
            if i in results:
                row = _result_row(sample, results[i])
                image = results[i].image
                if image is not None:
                    analysis = (image.analysis_ext, image.analysis) if image.analysis is not None else None
                    writer.add_sample(row["key"], image.ext, image.data, row["alt_text"], _sample_meta(row, extras),
                                      analysis)
                    if image.analysis_kind:
                        analysis_copies[image.analysis_kind] += 1
            else:
                row = {k: v for k, v in previous[sample["key"]].items() if k in INGEST_SCHEMA.names}
                for name in old_members.get(row["key"], ()):
                    writer.add_raw(name, members[name])
            rows.append(row)
        table = pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)
        for name in extra_names:
            if name not in table.column_names:
                table = table.append_column(name, manifest.column(name))
        counts = Counter(r["status"] for r in rows)
        stats = {
            "shard": shard,
            "config_hash": cfg.config_hash(),
            "samples": len(rows),
            "attempted": len(todo),
            "counts": dict(counts),
            "error_classes": dict(Counter(r["error_class"] for r in rows if r["error_class"])),
            "bytes_downloaded": sum(r.get("bytes") or 0 for r in (rows[i] for i in todo)),
            # Readers (extract) tell shards made with analysis copies from older ones by this field.
            "analysis": _analysis_setting(cfg),
            "analysis_copies": dict(analysis_copies),
            "seconds": round(time.time() - started, 3),
        }
        # A retry replaces a finished shard: drop the marker first so a crash midway leaves it "not done".
        store.delete(stage_key(dataset, STAGE, shard, "stats.json"))
        store.put_file(stage_key(dataset, STAGE, shard, "tar"), writer.finish())
        store.put_parquet(stage_key(dataset, STAGE, shard, "parquet"), table)
        return write_marker(store, dataset, STAGE, shard, stats)


def dedup_dataset(store: ArtifactStore, dataset: str, threshold: int) -> dict:
    """Flag exact and near duplicates across every finished shard, earliest (shard, row) first, and rewrite the
    `duplicate_of` column of the shards where it changed. Deterministic, so running it again changes nothing."""
    shards = [s for s in planned_shards(store, dataset) if read_marker(store, dataset, STAGE, s) is not None]
    cols = ["key", "status", "sha256", "phash", "duplicate_of"]
    tables = {s: store.get_parquet(stage_key(dataset, STAGE, s, "parquet"), columns=cols) for s in shards}
    keys, sha, ph, owner = [], [], [], []
    for s, t in tables.items():
        ok = [st == "ok" for st in t.column("status").to_pylist()]
        keys += t.column("key").to_pylist()
        sha += [h if good else None for h, good in zip(t.column("sha256").to_pylist(), ok, strict=True)]
        ph += [h if good else None for h, good in zip(t.column("phash").to_pylist(), ok, strict=True)]
        owner += [s] * t.num_rows
    dup = find_duplicates(sha, ph, threshold)
    exact = sum(1 for i, j in enumerate(dup) if j is not None and sha[i] == sha[j])
    changed, offset = [], 0
    for s, t in tables.items():
        wanted = [None if j is None else keys[j] for j in dup[offset:offset + t.num_rows]]
        offset += t.num_rows
        if wanted != t.column("duplicate_of").to_pylist():
            full = store.get_parquet(stage_key(dataset, STAGE, s, "parquet"))
            idx = full.column_names.index("duplicate_of")
            full = full.set_column(idx, "duplicate_of", pa.array(wanted, pa.string()))
            store.put_parquet(stage_key(dataset, STAGE, s, "parquet"), full)
            changed.append(s)
    summary = {"shards": len(shards), "exact_duplicates": exact,
               "near_duplicates": sum(j is not None for j in dup) - exact, "rewritten_shards": changed,
               "phash_threshold": threshold}
    store.put_json(f"{dataset}/{STAGE}/_dedup.json", summary)
    return summary


class IngestStage(ShardStage):
    """Crawl ingest as a stage: `prepare` plans the inputs into shard manifests, each shard is downloaded by one
    task, `finish` flags duplicates across the dataset. Run options: `inputs`, `retry_failed`."""

    name = "ingest"
    description = "Crawl, validate, resize, hash and dedup the spec's inputs into raw shards."
    schema = INGEST_SCHEMA
    reads = requires = ()
    has_prepare = True
    warm = ("tasks.ingest",)

    @classmethod
    def from_spec(cls, spec, models_dir: str | None = None, **options) -> IngestStage:
        return cls(spec.ingest, models_dir, **{"inputs": list(spec.inputs), **options})

    @property
    def retry_failed(self) -> bool:
        return bool(self.options.get("retry_failed"))

    def plan(self) -> StagePlan:
        check_inputs([InputSpec.model_validate(i) for i in self.options.get("inputs", ())])  # before anything starts
        return StagePlan()

    def prepare(self, store_uri: str, dataset: str) -> dict:
        inputs = [InputSpec.model_validate(i) for i in self.options.get("inputs", ())]
        plan = plan_ingest(open_store(store_uri), dataset, inputs, self.config, self.retry_failed)
        return {"new_samples": plan.new_samples, "known_samples": plan.known_samples,
                "duplicate_urls": plan.duplicate_urls, "rejected_input_rows": sum(r.rejected for r in plan.reports),
                "warnings": [f"{r.path}: {r.rejected} rows rejected, e.g. {r.examples[:3]}" for r in plan.reports
                             if r.rejected]}

    def status(self, store: ArtifactStore, dataset: str) -> tuple[list[int], list[int], list[int]]:
        todo, retry, done = ingest_status(store, dataset, self.config, self.retry_failed)
        return sorted(todo + retry), done, []

    def shard_samples(self, store: ArtifactStore, dataset: str, shard: int) -> int:
        return store.get_parquet(input_key(dataset, shard), columns=["key"]).num_rows

    def run_shard(self, store_uri: str, dataset: str, shard: int) -> dict:
        # A finished shard (made with this config) is only run again to retry its failed samples; without
        # retry_failed it is returned as it is (a task run again after its worker died).
        marker = read_marker(open_store(store_uri), dataset, STAGE, shard)
        finished = marker is not None and marker.get("config_hash") == self.config_hash
        if finished and not self.retry_failed:
            return marker
        return ingest_shard(store_uri, dataset, shard, self.config, retry_failed=finished)

    def finish(self, store_uri: str, dataset: str, stats: list[dict], done: list[int], failed: list[int]) -> dict:
        return {"dedup": dedup_dataset(open_store(store_uri), dataset, self.config.phash_threshold)}

    def summary(self, result: dict) -> list[str]:
        lines = [f"  new samples: {result.get('new_samples', 0)}, already known: {result.get('known_samples', 0)}, "
                 f"repeated URLs skipped: {result.get('duplicate_urls', 0)}",
                 counts_line("status", result.get("counts", {}))]
        if result.get("error_classes"):
            top = sorted(result["error_classes"].items(), key=lambda kv: -kv[1])
            lines.append("  errors: " + ", ".join(f"{k}={v}" for k, v in top))
        blocked = result.get("error_classes", {}).get("blocked", 0)
        if blocked:
            lines.append(f"  {blocked} URL{'s were' if blocked != 1 else ' was'} refused by the SSRF guard (private, "
                         "loopback or link-local addresses); to crawl such a range on purpose, open it with "
                         "--allow-cidr (e.g. --allow-cidr 127.0.0.0/8)")
        copies = result.get("analysis_copies") or {}
        if copies:
            lines.append("  analysis copies (what the experts read): "
                         + ", ".join(f"{k}={v}" for k, v in sorted(copies.items())))
        d = result.get("dedup") or {}
        if d:
            lines.append(f"  duplicates: exact={d['exact_duplicates']} near={d['near_duplicates']} "
                         f"(phash distance <= {d['phash_threshold']})")
        return lines
