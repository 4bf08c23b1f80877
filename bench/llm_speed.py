"""llama.cpp speed on this machine: prompt-eval and generation tokens/s per thread count and OpenMP wait policy, and
what reusing the KV cache across prompts that share a prefix saves.

Each configuration runs in a fresh process (libgomp reads OMP_WAIT_POLICY once, when llama.cpp's library loads):
one fusion-sized prompt (a fixed system + few-shot prefix of ~`--prefix-tokens` tokens, then a per-sample data
block) is evaluated and `--gen` tokens are generated greedily (time to first token = prompt eval). Then the same
prefix with another data block is run on the same `Llama` (llama-cpp-python evaluates only the tokens after the
longest common prefix) and once more after `Llama.reset()` (no reuse). The machines are shared: each number is the
best of `--repeats`, and the load average is printed beside it.

Run:  OMP_WAIT_POLICY is set per configuration by this script; do not set it outside.
      .venv/bin/python bench/llm_speed.py [--model qwen2.5-1.5b] [--threads 1 2] [--gen 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIX = (
    "You write one factual image caption from the data block. Use only facts in the data. "
    "Example data:\nalt: a dog on a beach\nobjects: dog, frisbee\ntext: none\n"
    "Example caption: A dog plays with a frisbee on a sandy beach.\n"
)


def _prompt(llm, data: str, prefix_tokens: int) -> list[int]:
    prefix = PREFIX
    while len(llm.tokenize(prefix.encode())) < prefix_tokens:
        prefix += PREFIX
    return llm.tokenize((prefix + data + "\nCaption:").encode())


def _timed(llm, tokens: list[int], gen: int, reset: bool) -> tuple[float, float, int]:
    """(prompt-eval seconds, generation seconds, generated tokens): greedy, stream, first chunk = prompt done."""
    if reset:
        llm.reset()
    start = time.perf_counter()
    first, n = None, 0
    for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n >= gen:
            break
    end = time.perf_counter()
    return first - start, end - first, n - 1


def child(model: str, threads: int, gen: int, prefix_tokens: int, repeats: int) -> dict:
    import llama_cpp

    from infra.model_assets import resolve_llm
    from infra.settings import Settings

    path = resolve_llm(model, Settings().models_dir).path
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    datas = [f"alt: photo number {i} of a street\nobjects: car, person x{i}\ntext: none" for i in range(repeats + 1)]
    cold = [_timed(llm, _prompt(llm, d, prefix_tokens), gen, reset=True) for d in datas[:repeats]]
    prompt_len = len(_prompt(llm, datas[0], prefix_tokens))
    # Warm: the previous call left the same prefix in the KV cache; only the data block is evaluated.
    warm = []
    for d in datas[1:]:
        _timed(llm, _prompt(llm, datas[0], prefix_tokens), 1, reset=True)
        warm.append(_timed(llm, _prompt(llm, d, prefix_tokens), gen, reset=False))
    best_cold = min(cold, key=lambda r: r[0])
    best_gen = min((r for r in cold + warm), key=lambda r: r[1] / max(r[2], 1))
    best_warm = min(warm, key=lambda r: r[0])
    return {
        "model": path.name, "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_s": round(load_s, 2), "prompt_tokens": prompt_len,
        "prompt_eval_s": round(best_cold[0], 2), "prompt_tokens_per_s": round(prompt_len / best_cold[0], 1),
        "prompt_eval_s_prefix_reused": round(best_warm[0], 2),
        "gen_tokens_per_s": round(best_gen[2] / best_gen[1], 2),
        "load_avg": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", help="a name from infra.model_assets.LLM_MODELS or a file")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--policies", nargs="+", default=["PASSIVE", "unset"], help="OMP_WAIT_POLICY values")
    parser.add_argument("--gen", type=int, default=48, help="tokens generated per prompt")
    parser.add_argument("--prefix-tokens", type=int, default=300, help="shared prefix length (system + few-shot)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llm_speed.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.threads[0], args.gen, args.prefix_tokens, args.repeats)))
        return
    rows = []
    for policy in args.policies:
        for threads in args.threads:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--threads", str(threads),
                   "--gen", str(args.gen), "--prefix-tokens", str(args.prefix_tokens), "--repeats", str(args.repeats)]
            try:
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                                     timeout=args.timeout).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                rows.append({"threads": threads, "omp_wait_policy": policy, "timed_out_after_s": args.timeout,
                             "load_avg": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
