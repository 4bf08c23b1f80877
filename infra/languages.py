"""Reference data on languages: the canonical codes the settings validate against and the stages use, their
ISO 639-3 and NLLB-200 codes and names, other spellings of them, the close pairs language ID confuses, and the mC4
language shares that weight the translation target languages (`PRESETS`)."""

from __future__ import annotations

from typing import NamedTuple


class Language(NamedTuple):
    iso3: str
    nllb: str | None  # NLLB-200 / FLORES-200 code
    name: str


# Canonical code (ISO 639-1 where one exists) -> ISO 639-3, NLLB-200 code, English name.
LANGUAGES: dict[str, Language] = {
    "en": Language("eng", "eng_Latn", "English"), "pt": Language("por", "por_Latn", "Portuguese"),
    "es": Language("spa", "spa_Latn", "Spanish"), "de": Language("deu", "deu_Latn", "German"),
    "fr": Language("fra", "fra_Latn", "French"), "it": Language("ita", "ita_Latn", "Italian"),
    "ru": Language("rus", "rus_Cyrl", "Russian"), "pl": Language("pol", "pol_Latn", "Polish"),
    "nl": Language("nld", "nld_Latn", "Dutch"), "tr": Language("tur", "tur_Latn", "Turkish"),
    "ja": Language("jpn", "jpn_Jpan", "Japanese"), "vi": Language("vie", "vie_Latn", "Vietnamese"),
    "id": Language("ind", "ind_Latn", "Indonesian"), "cs": Language("ces", "ces_Latn", "Czech"),
    "zh": Language("zho", "zho_Hans", "Chinese"), "fa": Language("fas", "pes_Arab", "Persian"),
    "ar": Language("ara", "arb_Arab", "Arabic"), "sv": Language("swe", "swe_Latn", "Swedish"),
    "ro": Language("ron", "ron_Latn", "Romanian"), "el": Language("ell", "ell_Grek", "Greek"),
    "uk": Language("ukr", "ukr_Cyrl", "Ukrainian"), "hu": Language("hun", "hun_Latn", "Hungarian"),
    "da": Language("dan", "dan_Latn", "Danish"), "fi": Language("fin", "fin_Latn", "Finnish"),
    "no": Language("nor", "nob_Latn", "Norwegian"), "bg": Language("bul", "bul_Cyrl", "Bulgarian"),
    "hi": Language("hin", "hin_Deva", "Hindi"), "sk": Language("slk", "slk_Latn", "Slovak"),
    "ko": Language("kor", "kor_Hang", "Korean"), "th": Language("tha", "tha_Thai", "Thai"),
    "ca": Language("cat", "cat_Latn", "Catalan"), "ms": Language("msa", "zsm_Latn", "Malay"),
    "he": Language("heb", "heb_Hebr", "Hebrew"), "lt": Language("lit", "lit_Latn", "Lithuanian"),
    "sl": Language("slv", "slv_Latn", "Slovenian"), "mr": Language("mar", "mar_Deva", "Marathi"),
    "bn": Language("ben", "ben_Beng", "Bengali"), "et": Language("est", "est_Latn", "Estonian"),
    "lv": Language("lav", "lvs_Latn", "Latvian"), "az": Language("aze", "azj_Latn", "Azerbaijani"),
    "gl": Language("glg", "glg_Latn", "Galician"), "cy": Language("cym", "cym_Latn", "Welsh"),
    "sq": Language("sqi", "als_Latn", "Albanian"), "ta": Language("tam", "tam_Taml", "Tamil"),
    "sr": Language("srp", "srp_Cyrl", "Serbian"), "ne": Language("nep", "npi_Deva", "Nepali"),
    "lb": Language("ltz", "ltz_Latn", "Luxembourgish"), "hy": Language("hye", "hye_Armn", "Armenian"),
    "kk": Language("kaz", "kaz_Cyrl", "Kazakh"), "ka": Language("kat", "kat_Geor", "Georgian"),
    "mt": Language("mlt", "mlt_Latn", "Maltese"), "af": Language("afr", "afr_Latn", "Afrikaans"),
    "tl": Language("tgl", "tgl_Latn", "Tagalog"), "is": Language("isl", "isl_Latn", "Icelandic"),
    "mk": Language("mkd", "mkd_Cyrl", "Macedonian"), "ml": Language("mal", "mal_Mlym", "Malayalam"),
    "mn": Language("mon", "khk_Cyrl", "Mongolian"), "ur": Language("urd", "urd_Arab", "Urdu"),
    "be": Language("bel", "bel_Cyrl", "Belarusian"), "eu": Language("eus", "eus_Latn", "Basque"),
    "tg": Language("tgk", "tgk_Cyrl", "Tajik"), "te": Language("tel", "tel_Telu", "Telugu"),
    "kn": Language("kan", "kan_Knda", "Kannada"), "ky": Language("kir", "kir_Cyrl", "Kyrgyz"),
    "sw": Language("swa", "swh_Latn", "Swahili"), "so": Language("som", "som_Latn", "Somali"),
    "my": Language("mya", "mya_Mymr", "Burmese"), "uz": Language("uzb", "uzn_Latn", "Uzbek"),
    "km": Language("khm", "khm_Khmr", "Khmer"), "la": Language("lat", None, "Latin"),
    "fy": Language("fry", None, "Western Frisian"),
}
# Other spellings: ISO 639-2/B codes, deprecated ISO 639-1 codes, individual-language ISO 639-3 codes.
_EXTRA_ALIASES = {
    "ger": "de", "fre": "fr", "cze": "cs", "chi": "zh", "per": "fa", "dut": "nl", "gre": "el", "rum": "ro",
    "slo": "sk", "alb": "sq", "arm": "hy", "geo": "ka", "mac": "mk", "may": "ms", "bur": "my", "baq": "eu",
    "ice": "is", "wel": "cy", "iw": "he", "in": "id", "nb": "no", "nob": "no", "fil": "tl", "zsm": "ms",
    "pes": "fa", "arb": "ar", "lvs": "lv", "azj": "az", "als": "sq", "npi": "ne", "khk": "mn", "swh": "sw",
    "uzn": "uz", "cmn": "zh",
}
_ALIASES: dict[str, str] = {**{c: c for c in LANGUAGES}, **{lang.iso3: c for c, lang in LANGUAGES.items()},
                            **{lang.nllb.lower(): c for c, lang in LANGUAGES.items() if lang.nllb},
                            **_EXTRA_ALIASES}
# py3langid confuses these close languages on short text; a detection of any of them counts for the others.
_CLOSE = [{"cs", "sk"}, {"ms", "id"}, {"no", "nb", "nn"}, {"hr", "sr", "bs"}, {"pt", "gl"}]


def canonical_language(code: str) -> str:
    """'pt', 'por', 'por_Latn', 'pt-BR', 'POR' -> 'pt'. Raises ValueError for an unknown code."""
    raw = str(code).strip()
    key = raw.lower().replace("-", "_")
    if key in _ALIASES:
        return _ALIASES[key]
    base, _, suffix = key.partition("_")  # a region or script suffix: pt_br, zh_hans, sr_latn
    if suffix and base in _ALIASES:
        return _ALIASES[base]
    raise ValueError(f"unknown language code {raw!r} (use ISO 639-1 such as 'pt', ISO 639-3 such as 'por', or an "
                     f"NLLB code such as 'por_Latn'; known: {', '.join(sorted(LANGUAGES))})")


def language_name(code: str) -> str:
    return LANGUAGES[code].name


def same_language(detected: str | None, target: str) -> bool:
    if detected == target:
        return True
    return any(detected in group and target in group for group in _CLOSE)


# mC4 language shares as the mT5 paper reports them: Xue et al., "mT5: A Massively Multilingual Pre-trained
# Text-to-Text Transformer", NAACL 2021, appendix table of mC4 languages (column "mT5 %": the share of each language
# in mT5's pre-training mix, mC4 page counts smoothed with alpha = 0.3). mBLIP (Geigle et al., 2023) drew its
# translation target languages with this mT5/mC4 distribution. Percent; restricted to the requested languages and
# renormalised, so only the ratios matter. Transcribed for the languages above that mC4 covers.
MC4_SHARES: dict[str, float] = {
    "en": 5.67, "ru": 3.71, "es": 3.09, "de": 3.05, "fr": 2.89, "it": 2.43, "pt": 2.36, "pl": 2.15, "nl": 1.98,
    "tr": 1.93, "ja": 1.92, "vi": 1.87, "id": 1.80, "cs": 1.72, "zh": 1.67, "fa": 1.67, "ar": 1.66, "sv": 1.61,
    "ro": 1.58, "el": 1.54, "uk": 1.51, "hu": 1.48, "da": 1.38, "fi": 1.35, "no": 1.33, "bg": 1.29, "hi": 1.21,
    "sk": 1.19, "ko": 1.14, "th": 1.14, "ca": 1.12, "ms": 1.09, "he": 1.06, "lt": 1.04, "sl": 0.95, "mr": 0.93,
    "bn": 0.91, "et": 0.89, "lv": 0.87, "az": 0.82, "gl": 0.79, "cy": 0.78, "sq": 0.78, "ta": 0.73, "sr": 0.72,
    "ne": 0.69, "lb": 0.68, "hy": 0.65, "kk": 0.65, "ka": 0.64, "mt": 0.64, "af": 0.63, "tl": 0.64, "is": 0.62,
    "mk": 0.62, "ml": 0.62, "mn": 0.62, "ur": 0.61, "be": 0.59, "la": 0.58, "eu": 0.57, "tg": 0.54, "te": 0.52,
    "fy": 0.51, "kn": 0.51, "ky": 0.50, "sw": 0.50, "so": 0.48, "my": 0.47, "uz": 0.46, "km": 0.46,
}
PRESETS: dict[str, dict[str, float] | None] = {"mc4": MC4_SHARES, "uniform": None}
