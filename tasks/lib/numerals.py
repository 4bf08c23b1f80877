"""Numbers written as words, for translation QE: a translation may spell out the source's digits ("3 boys" ->
"drei Jungen"), which is not a missing number.

`spelled(value, lang)` is the set of word forms (lower case, words joined by one space, hyphens as spaces) that
stand for `value` in `lang`: cardinals 0-20, the tens, hundred, thousand, ordinals 1-10, "dozen" and the words
for "pair"/"both" (2), with their inflected forms. Languages: en, de, fr, cs, pt, es; others have none (their
digits must stay digits).
"""

from __future__ import annotations

from functools import cache


def _forms(stems: str, endings: str = "") -> list[str]:
    """'dritt erst' with endings 'e er en em es' -> dritte dritter ... erstes; without endings, the stems."""
    ends = endings.split() or [""]
    return [s + e for s in stems.split() for e in ends]


# value -> its forms, per language. A form may have several words ("dix sept"); matching is on whole words.
_TABLES: dict[str, dict[int, list[str]]] = {
    "en": {
        0: ["zero"], 1: ["one", "first", "single"], 2: ["two", "second", "pair", "couple", "both"],
        3: ["three", "third"], 4: ["four", "fourth"], 5: ["five", "fifth"], 6: ["six", "sixth"],
        7: ["seven", "seventh"], 8: ["eight", "eighth"], 9: ["nine", "ninth"], 10: ["ten", "tenth"],
        11: ["eleven"], 12: ["twelve", "dozen"], 13: ["thirteen"], 14: ["fourteen"], 15: ["fifteen"],
        16: ["sixteen"], 17: ["seventeen"], 18: ["eighteen"], 19: ["nineteen"], 20: ["twenty"], 30: ["thirty"],
        40: ["forty"], 50: ["fifty"], 60: ["sixty"], 70: ["seventy"], 80: ["eighty"], 90: ["ninety"],
        100: ["hundred"], 1000: ["thousand"],
    },
    "de": {
        0: ["null"], 1: ["eins", *_forms("ein", "_ e er em en es"), *_forms("erst", "e er em en es")],
        2: ["zwei", "zweier", "paar", *_forms("zweit", "e er em en es"), *_forms("beid", "e er em en es")],
        3: ["drei", "dreier", "dritt", *_forms("dritt", "e er em en es")],
        4: ["vier", "viert", *_forms("viert", "e er em en es")], 5: ["fünf", *_forms("fünft", "e er em en es")],
        6: ["sechs", *_forms("sechst", "e er em en es")], 7: ["sieben", *_forms("siebt siebent", "e er em en es")],
        8: ["acht", *_forms("acht", "e er em en es")], 9: ["neun", *_forms("neunt", "e er em en es")],
        10: ["zehn", *_forms("zehnt", "e er em en es")], 11: ["elf"], 12: ["zwölf", "dutzend", "dutzende"],
        13: ["dreizehn"], 14: ["vierzehn"], 15: ["fünfzehn"], 16: ["sechzehn"], 17: ["siebzehn"],
        18: ["achtzehn"], 19: ["neunzehn"], 20: ["zwanzig"], 30: ["dreißig"], 40: ["vierzig"], 50: ["fünfzig"],
        60: ["sechzig"], 70: ["siebzig"], 80: ["achtzig"], 90: ["neunzig"], 100: ["hundert"],
        1000: ["tausend"],
    },
    "fr": {
        0: ["zéro"], 1: ["un", "une", "premier", "première", "premiers", "premières", "seul", "seule"],
        2: ["deux", "deuxième", "second", "seconde", "paire", "couple"], 3: ["trois", "troisième"],
        4: ["quatre", "quatrième"], 5: ["cinq", "cinquième"], 6: ["six", "sixième"], 7: ["sept", "septième"],
        8: ["huit", "huitième"], 9: ["neuf", "neuvième"], 10: ["dix", "dixième", "dizaine"], 11: ["onze"],
        12: ["douze", "douzaine"], 13: ["treize"], 14: ["quatorze"], 15: ["quinze"], 16: ["seize"],
        17: ["dix sept"], 18: ["dix huit"], 19: ["dix neuf"], 20: ["vingt", "vingtaine"], 30: ["trente"],
        40: ["quarante"], 50: ["cinquante"], 60: ["soixante"], 70: ["soixante dix", "septante"],
        80: ["quatre vingt", "quatre vingts", "huitante"], 90: ["quatre vingt dix", "nonante"], 100: ["cent"],
        1000: ["mille"],
    },
    "cs": {
        0: ["nula", "nulou"],
        1: [*_forms("jed", "en na no noho nomu nom ním né nu ni ny něch nou"), *_forms("první", "_ ho mu m mi ch")],
        2: ["dva", "dvě", "dvou", "dvěma", "dvojice", "pár", "oba", "obě", "obou", "oběma",
            *_forms("druh", "ý á é ého ému ém ým ou í ých ými")],
        3: ["tři", "tří", "třem", "třemi", "trojice", *_forms("třetí", "_ ho mu m mi ch")],
        4: ["čtyři", "čtyř", "čtyřem", "čtyřmi", *_forms("čtvrt", "ý á é ého ému ém ým ou í ých ými")],
        5: ["pět", "pěti", *_forms("pát", "ý á é ého ému ém ým ou í ých ými")],
        6: ["šest", "šesti", *_forms("šest", "ý á é ého ému ém ým ou í ých ými")],
        7: ["sedm", "sedmi", *_forms("sedm", "ý á é ého ému ém ým ou í ých ými")],
        8: ["osm", "osmi", *_forms("osm", "ý á é ého ému ém ým ou í ých ými")],
        9: ["devět", "devíti", *_forms("devát", "ý á é ého ému ém ým ou í ých ými")],
        10: ["deset", "deseti", *_forms("desát", "ý á é ého ému ém ým ou í ých ými")],
        11: ["jedenáct", "jedenácti"], 12: ["dvanáct", "dvanácti", "tucet", "tuctu"], 13: ["třináct", "třinácti"],
        14: ["čtrnáct", "čtrnácti"], 15: ["patnáct", "patnácti"], 16: ["šestnáct", "šestnácti"],
        17: ["sedmnáct", "sedmnácti"], 18: ["osmnáct", "osmnácti"], 19: ["devatenáct", "devatenácti"],
        20: ["dvacet", "dvaceti"], 30: ["třicet", "třiceti"], 40: ["čtyřicet", "čtyřiceti"],
        50: ["padesát", "padesáti"], 60: ["šedesát", "šedesáti"], 70: ["sedmdesát", "sedmdesáti"],
        80: ["osmdesát", "osmdesáti"], 90: ["devadesát", "devadesáti"], 100: ["sto", "sta", "stu", "stě"],
        1000: ["tisíc", "tisíce", "tisíci"],
    },
    "pt": {
        0: ["zero"], 1: ["um", "uma", *_forms("primeir", "o a os as"), "único", "única"],
        2: ["dois", "duas", *_forms("segund", "o a os as"), "par", "ambos", "ambas"],
        3: ["três", *_forms("terceir", "o a os as")], 4: ["quatro", *_forms("quart", "o a os as")],
        5: ["cinco", *_forms("quint", "o a os as")], 6: ["seis", *_forms("sext", "o a os as")],
        7: ["sete", *_forms("sétim", "o a os as")], 8: ["oito", *_forms("oitav", "o a os as")],
        9: ["nove", *_forms("non", "o a os as")], 10: ["dez", "dezena", *_forms("décim", "o a os as")],
        11: ["onze"], 12: ["doze", "dúzia"], 13: ["treze"], 14: ["catorze", "quatorze"], 15: ["quinze"],
        16: ["dezesseis", "dezasseis"], 17: ["dezessete", "dezassete"], 18: ["dezoito"],
        19: ["dezenove", "dezanove"], 20: ["vinte"], 30: ["trinta"], 40: ["quarenta"], 50: ["cinquenta"],
        60: ["sessenta"], 70: ["setenta"], 80: ["oitenta"], 90: ["noventa"], 100: ["cem", "cento"], 1000: ["mil"],
    },
    "es": {
        0: ["cero"], 1: ["uno", "una", "un", *_forms("primer", "_ o a os as"), "único", "única"],
        2: ["dos", *_forms("segund", "o a os as"), "par", "pareja", "ambos", "ambas"],
        3: ["tres", "tercer", *_forms("tercer", "o a os as")], 4: ["cuatro", *_forms("cuart", "o a os as")],
        5: ["cinco", *_forms("quint", "o a os as")], 6: ["seis", *_forms("sext", "o a os as")],
        7: ["siete", *_forms("séptim", "o a os as")], 8: ["ocho", *_forms("octav", "o a os as")],
        9: ["nueve", *_forms("noven", "o a os as")], 10: ["diez", "decena", *_forms("décim", "o a os as")],
        11: ["once"], 12: ["doce", "docena"], 13: ["trece"], 14: ["catorce"], 15: ["quince"],
        16: ["dieciséis"], 17: ["diecisiete"], 18: ["dieciocho"], 19: ["diecinueve"], 20: ["veinte"],
        30: ["treinta"], 40: ["cuarenta"], 50: ["cincuenta"], 60: ["sesenta"], 70: ["setenta"], 80: ["ochenta"],
        90: ["noventa"], 100: ["cien", "ciento"], 1000: ["mil"],
    },
}


@cache
def spelled(value: int, lang: str) -> tuple[str, ...]:
    """The word forms of `value` in `lang`, the cardinal first (empty when it has none there)."""
    return tuple(dict.fromkeys(f.replace("_", "") for f in _TABLES.get(lang, {}).get(value, ())))
