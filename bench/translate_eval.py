"""Translation QE and translators on real data: Multi30K test 2016 (../shared/data/mt, English captions with human
de/fr/cs translations).

1. QE pass rate of the human references (de, fr, cs) with the default thresholds (the false-flag rate), also with
   every final stop removed and with the source's digits (0-20) spelled out in the reference ("3" -> "drei"), as
   human translators write them.
2. Catch rates on corrupted "translations": the English source itself (copy), another language's reference
   (wrong language), the reference cut after half of its words (truncated).
3. Bergamot (the cpu translator for en<->pt) on the English captions: QE pass rate of its en->pt output (and how
   often language ID says Galician), then pt->en back and chrF (sacrebleu) of the back translation against the
   English source. No Portuguese reference exists for Multi30K: a round-trip proxy, not a reference-based score.
4. The in-process LLM (the llamacpp translator, the cpu profile's route for every language but pt) on a sample of
   `--n-llm` captions spread over the file, into de, fr, cs: forward QE pass rate and flags, chrF against the human
   reference, the back translation en by the same LLM and its round-trip chrF, the share QE flags with the round
   trip on (`min_chrf`), seconds per translation. `--llm-model`: a model name or GGUF file (default: qwen2.5-1.5b
   when installed in the models folder, else smollm2-135m).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/translate_eval.py [--n 1000] [--n-llm 40] [--llm-model NAME]
          [--llm-langs de,fr,cs] [--no-bergamot] [--out bench/results/translate_eval.json]
"""

from __future__ import annotations

import argparse
import json
import re
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
from infra.models import ModelUnavailable, load_backend  # noqa: E402
from infra.settings import Settings, TranslateConfig  # noqa: E402
from tasks.lib import langid  # noqa: E402
from tasks.lib.numerals import spelled  # noqa: E402
from tasks.translation_qe import check_translation  # noqa: E402
from tasks.translators import BergamotTranslator  # noqa: E402

WRONG_FOR = {"de": "fr", "fr": "de", "cs": "de"}


def lines(lang: str, n: int) -> list[str]:
    return [s.strip() for s in (MT / f"test_2016_flickr.{lang}").read_text(encoding="utf-8").splitlines()][:n]


def kinds(results) -> dict[str, int]:
    return dict(Counter(r.split(":", 1)[0] for q in results for r in q.reasons))


def share(flags: list[bool]) -> float:
    return round(sum(flags) / max(1, len(flags)), 4)


def spell_out(source: str, ref: str, lang: str) -> str | None:
    """The reference with each digit group of the source that it repeats (0-20) written as a word; None if none."""
    out = ref
    for number in set(re.findall(r"\b\d+\b", source)):
        forms = spelled(int(number), lang) if int(number) <= 20 else ()
        if forms and re.search(rf"\b{number}\b", out):
            out = re.sub(rf"\b{number}\b", forms[0].replace(" ", "-"), out)
    return out if out != ref else None


def qe_on_references(en: list[str]) -> dict:
    refs = {lang: lines(lang, len(en)) for lang in ("de", "fr", "cs")}
    qe = {}
    for lang, ref in refs.items():
        real = [check_translation(s, r, lang) for s, r in zip(en, ref, strict=True)]
        unstopped = [check_translation(s, r.rstrip(" ."), lang) for s, r in zip(en, ref, strict=True)]
        spelled_refs = [(s, w) for s, r in zip(en, ref, strict=True) if (w := spell_out(s, r, lang))]
        spelled_qe = [check_translation(s, w, lang) for s, w in spelled_refs]
        copy = [check_translation(s, s, lang) for s in en]
        wrong = [check_translation(s, r, lang) for s, r in zip(en, refs[WRONG_FOR[lang]], strict=True)]
        half = [" ".join(r.split()[:max(1, len(r.split()) // 2)]) for r in ref]
        cut = [check_translation(s, h, lang) for s, h in zip(en, half, strict=True)]
        qe[lang] = {"references_passed": share([q.passed for q in real]), "reference_flags": kinds(real),
                    "no_final_stop_passed": share([q.passed for q in unstopped]),
                    "no_final_stop_flags": kinds(unstopped),
                    "spelled_numbers": len(spelled_refs),
                    "spelled_numbers_passed": share([q.passed for q in spelled_qe]),
                    "copy_caught": share([not q.passed for q in copy]),
                    "wrong_language_caught": share([not q.passed for q in wrong]),
                    "truncated_caught": share([not q.passed for q in cut]), "truncated_flags": kinds(cut)}
    return qe


def bergamot_round_trip(en: list[str], min_chrf: float) -> dict:
    bergamot = BergamotTranslator(concurrency=2)
    start = time.perf_counter()
    pt = bergamot.translate(en, "en", "pt")
    back = bergamot.translate([t.text for t in pt], "pt", "en")
    seconds = time.perf_counter() - start
    sentence = [sacrebleu.sentence_chrf(b.text, [s]).score for b, s in zip(back, en, strict=True)]
    forward_qe = [check_translation(s, t.text, "pt") for s, t in zip(en, pt, strict=True)]
    return {
        "sentences": len(en), "seconds_both_ways": round(seconds, 2),
        "forward_qe_passed": share([q.passed for q in forward_qe]), "forward_flags": kinds(forward_qe),
        "detected_galician": sum(langid.detect(t.text) == "gl" for t in pt),
        "corpus_chrf": round(sacrebleu.corpus_chrf([b.text for b in back], [en]).score, 2),
        "mean_sentence_chrf": round(statistics.mean(sentence), 2),
        "p10_sentence_chrf": round(sorted(sentence)[len(sentence) // 10], 2),
        "below_min_chrf": share([c < min_chrf for c in sentence]), "min_chrf": min_chrf,
        "model": bergamot.model_id,
    }


def kept_chrf(texts: list[str], refs: list[str], verdicts) -> float | None:
    """Corpus chrF against the references of the translations QE passed (None when it passed none)."""
    kept = [(t, r) for t, r, q in zip(texts, refs, verdicts, strict=True) if q.passed]
    return round(sacrebleu.corpus_chrf([t for t, _ in kept], [[r for _, r in kept]]).score, 2) if kept else None


def default_llm(models_dir: str) -> str:
    from infra.model_assets import resolve_llm

    try:
        resolve_llm("qwen2.5-1.5b", models_dir)
        return "qwen2.5-1.5b"
    except ModelUnavailable:
        return "smollm2-135m"


def llm_translation(model: str, models_dir: str, n: int, langs: list[str], min_chrf: float) -> dict:
    """The llamacpp translator (as the translate stage loads it) on n captions spread over the file."""
    en_all = lines("en", 1000)
    picks = [round(i * len(en_all) / n) for i in range(n)]
    en = [en_all[i] for i in picks]
    translator = load_backend("translator", "llamacpp", model_path=model, models_dir=models_dir)
    out = {"model": translator.model_id, "sentences": n, "languages": {}}
    for lang in langs:
        ref_all = lines(lang, 1000)
        ref = [ref_all[i] for i in picks]
        start = time.perf_counter()
        forward = translator.translate(en, "en", lang)
        forward_s = time.perf_counter() - start
        texts = [t.text or "" for t in forward]
        back = translator.translate([t or "-" for t in texts], lang, "en")
        backs = [b.text or "" for b in back]
        seconds = time.perf_counter() - start
        round_trip = [sacrebleu.sentence_chrf(b, [s]).score for b, s in zip(backs, en, strict=True)]
        qe = [check_translation(s, t, lang) for s, t in zip(en, texts, strict=True)]
        qe_rt = [check_translation(s, t, lang, chrf_roundtrip=c, min_chrf=min_chrf)
                 for s, t, c in zip(en, texts, round_trip, strict=True)]
        out["languages"][lang] = {
            "errors": sum(t.text is None for t in forward),
            "qe_passed": share([q.passed for q in qe]), "qe_flags": kinds(qe),
            "qe_passed_with_round_trip": share([q.passed for q in qe_rt]),
            "chrf_vs_reference": round(sacrebleu.corpus_chrf(texts, [ref]).score, 2),
            "chrf_vs_reference_qe_passed": kept_chrf(texts, ref, qe),
            "chrf_vs_reference_qe_passed_with_round_trip": kept_chrf(texts, ref, qe_rt),
            "round_trip_chrf": round(sacrebleu.corpus_chrf(backs, [en]).score, 2),
            "mean_sentence_round_trip_chrf": round(statistics.mean(round_trip), 2),
            "seconds_per_translation": round(forward_s / n, 2), "seconds_both_ways": round(seconds, 1),
            "rows": [{"en": s, "out": t, "ref": r, "back": b, "qe": q.reasons, "round_trip_chrf": round(c, 1)}
                     for s, t, r, b, q, c in zip(en, texts, ref, backs, qe, round_trip, strict=True)],
        }
        row = out["languages"][lang]
        print(f"  {lang}: QE pass {row['qe_passed']:.3f} (with round trip {row['qe_passed_with_round_trip']:.3f}), "
              f"chrF vs reference {row['chrf_vs_reference']} (QE-passed {row['chrf_vs_reference_qe_passed']}, with "
              f"round trip {row['chrf_vs_reference_qe_passed_with_round_trip']}), "
              f"round-trip chrF {row['round_trip_chrf']}, {row['seconds_per_translation']} s/translation; "
              f"flags {row['qe_flags']}", flush=True)
    out["usage"] = translator.usage.as_dict()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-llm", type=int, default=40, help="captions per language for the LLM (0: skip it)")
    ap.add_argument("--llm-model", default=None, help="model name or GGUF file (default: qwen2.5-1.5b if installed)")
    ap.add_argument("--llm-langs", default="de,fr,cs")
    ap.add_argument("--models-dir", default=Settings().models_dir)
    ap.add_argument("--no-bergamot", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "translate_eval.json"))
    args = ap.parse_args()
    cfg = TranslateConfig()
    en = lines("en", args.n)
    result: dict = {"machine": machine_info(), "args": vars(args), "qe": qe_on_references(en)}
    print(f"{'lang':5} {'refs pass':>10} {'no stop':>8} {'spelled':>12} {'copy caught':>12} {'wrong lang':>11} "
          f"{'truncated':>10}")
    for lang, r in result["qe"].items():
        print(f"{lang:5} {r['references_passed']:>10.3f} {r['no_final_stop_passed']:>8.3f} "
              f"{r['spelled_numbers_passed']:>6.3f} ({r['spelled_numbers']:>3}) {r['copy_caught']:>12.3f} "
              f"{r['wrong_language_caught']:>11.3f} {r['truncated_caught']:>10.3f}   flags on refs: "
              f"{r['reference_flags']}")
    if not args.no_bergamot:
        rt = result["round_trip"] = bergamot_round_trip(en, cfg.min_chrf)
        print(f"\nbergamot en->pt->en on {len(en)} Multi30K captions ({rt['seconds_both_ways']} s both ways): forward "
              f"QE pass {rt['forward_qe_passed']:.3f} (Galician by language ID: {rt['detected_galician']}); "
              f"round-trip chrF corpus {rt['corpus_chrf']}, sentence mean {rt['mean_sentence_chrf']}, p10 "
              f"{rt['p10_sentence_chrf']}; below {cfg.min_chrf}: {rt['below_min_chrf']:.3f}")
    if args.n_llm:
        model = args.llm_model or default_llm(args.models_dir)
        print(f"\nllamacpp translator ({model}) on {args.n_llm} captions per language:", flush=True)
        result["llm"] = llm_translation(model, args.models_dir, args.n_llm, args.llm_langs.split(","), cfg.min_chrf)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
