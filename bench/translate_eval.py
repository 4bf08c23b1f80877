"""Translation QE on real data: Multi30K test 2016 (../shared/data/mt, English captions with human de/fr/cs
translations), and the Bergamot en->pt->en round trip.

1. QE pass rate of the human references (de, fr, cs) with the default thresholds: the false-flag rate.
2. Catch rates on corrupted "translations": the English source itself (copy), another language's reference
   (wrong language), the reference cut after half of its words (truncated).
3. Bergamot (the cpu default) on the English captions: QE pass rate of its en->pt output, then pt->en back and
   chrF (sacrebleu) of the back translation against the English source: corpus chrF, mean and 10th percentile of
   sentence chrF, and the share under the default `min_chrf`. No Portuguese reference exists for Multi30K, so this
   is a round-trip proxy for quality, not a reference-based score.

Run:  .venv/bin/python bench/translate_eval.py [--n 1000] [--out bench/results/translate_eval.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MT = ROOT.parent / "shared" / "data" / "mt"

import sacrebleu  # noqa: E402

from bench.common import machine_info  # noqa: E402
from infra.settings import TranslateConfig  # noqa: E402
from tasks.translate import check_translation  # noqa: E402
from tasks.translators import BergamotTranslator  # noqa: E402


def lines(lang: str, n: int) -> list[str]:
    return [s.strip() for s in (MT / f"test_2016_flickr.{lang}").read_text(encoding="utf-8").splitlines()][:n]


def kinds(results) -> dict[str, int]:
    return dict(Counter(r.split(":", 1)[0] for q in results for r in q.reasons))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "translate_eval.json"))
    args = ap.parse_args()
    cfg = TranslateConfig()
    en = lines("en", args.n)
    refs = {lang: lines(lang, args.n) for lang in ("de", "fr", "cs")}
    wrong_for = {"de": "fr", "fr": "de", "cs": "de"}
    qe = {}
    for lang, ref in refs.items():
        real = [check_translation(s, r, lang) for s, r in zip(en, ref, strict=True)]
        copy = [check_translation(s, s, lang) for s in en]
        wrong = [check_translation(s, r, lang) for s, r in zip(en, refs[wrong_for[lang]], strict=True)]
        half = [" ".join(r.split()[:max(1, len(r.split()) // 2)]) for r in ref]
        cut = [check_translation(s, h, lang) for s, h in zip(en, half, strict=True)]
        qe[lang] = {"references_passed": sum(q.passed for q in real) / len(en), "reference_flags": kinds(real),
                    "copy_caught": sum(not q.passed for q in copy) / len(en),
                    "wrong_language_caught": sum(not q.passed for q in wrong) / len(en),
                    "truncated_caught": sum(not q.passed for q in cut) / len(en), "truncated_flags": kinds(cut)}
    bergamot = BergamotTranslator(concurrency=2)
    start = time.perf_counter()
    pt = bergamot.translate(en, "en", "pt")
    back = bergamot.translate([t.text for t in pt], "pt", "en")
    seconds = time.perf_counter() - start
    sentence = [sacrebleu.sentence_chrf(b.text, [s]).score for b, s in zip(back, en, strict=True)]
    forward_qe = [check_translation(s, t.text, "pt") for s, t in zip(en, pt, strict=True)]
    round_trip = {
        "sentences": len(en), "seconds_both_ways": round(seconds, 2),
        "forward_qe_passed": sum(q.passed for q in forward_qe) / len(en), "forward_flags": kinds(forward_qe),
        "corpus_chrf": round(sacrebleu.corpus_chrf([b.text for b in back], [en]).score, 2),
        "mean_sentence_chrf": round(statistics.mean(sentence), 2),
        "p10_sentence_chrf": round(sorted(sentence)[len(sentence) // 10], 2),
        "below_min_chrf": sum(c < cfg.min_chrf for c in sentence) / len(en), "min_chrf": cfg.min_chrf,
        "model": bergamot.model_id,
    }
    print(f"{'lang':5} {'refs pass':>10} {'copy caught':>12} {'wrong lang':>11} {'truncated':>10}")
    for lang, r in qe.items():
        print(f"{lang:5} {r['references_passed']:>10.3f} {r['copy_caught']:>12.3f} {r['wrong_language_caught']:>11.3f} "
              f"{r['truncated_caught']:>10.3f}   flags on refs: {r['reference_flags']}")
    print(f"\nbergamot en->pt->en on {len(en)} Multi30K captions ({seconds:.1f} s both ways): forward QE pass "
          f"{round_trip['forward_qe_passed']:.3f}; round-trip chrF corpus {round_trip['corpus_chrf']}, sentence mean "
          f"{round_trip['mean_sentence_chrf']}, p10 {round_trip['p10_sentence_chrf']}; below {cfg.min_chrf}: "
          f"{round_trip['below_min_chrf']:.3f}")
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "args": vars(args), "qe": qe,
                                          "round_trip": round_trip}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
