# ruff: noqa: RUF001, RUF002, E501, SIM905 -- localized lexicons: full-width punctuation, long alternations and
# word lists written as strings are intended
"""Checkable facts in a text: numbers, durations, countries and regions, product categories, negation.

Used by the extractive composer (to find the row for a customer's country or product) and by the
faithfulness check (every number, duration, country and category in a rewritten answer must be in its
evidence). Country names come from CLDR through babel (``Locale(l).territories`` in the 7 supported
languages) and region membership from CLDR's time-zone territories (``territory_zones``: a country
whose zones are ``America/...`` is in the Americas), plus short tables where CLDR has no answer: the
aliases customers write ("UK", "EEUU", "米国"), the EU member list, and the shop's own commercial
regions (the shipping article's "North America" is the US, Canada and Mexico; "Middle East").

Written here because no packaged library does this in these 7 languages: number words and CJK
numerals, durations with per-language units ("5-10 business days", "30日以内", "7个工作日"), a product
category lexicon for a shop (no package has one), and negation cues. All of it is best effort,
lexicon-based and tested; what it does not know it does not report, so the faithfulness check that
uses it is strict only where it can be.

Region pseudo codes (alongside ISO 3166-1 alpha-2 country codes): ``EU`` (European Union),
``R:europe``, ``R:north_america``, ``R:latin_america``, ``R:south_america``, ``R:asia_pacific``,
``R:asia``, ``R:oceania``, ``R:middle_east``, ``R:africa``.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from functools import lru_cache

LANGUAGES = ("en", "es", "de", "fr", "pt", "zh", "ja")
CJK = frozenset({"zh", "ja"})

# ----------------------------------------------------------------------------------------------------
# Normalisation

_DASHES = dict.fromkeys(map(ord, "‐‑‒–—―−﹘﹣－~〜～"), "-")
_APOSTROPHES = dict.fromkeys(map(ord, "’‘ʼ`´"), "'")
_KATAKANA = "ァ-ヺー"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RANGE = f"\u3040-\u30ff{_HAN}"


def normalize(text: str) -> str:
    """NFKC (full-width digits, letters and ～ become ASCII), casefolded, dashes and tildes unified to
    "-" (in CJK text ～ writes a range), apostrophes unified to "'"; a no-break space between digit
    groups ("1 000") is dropped first so the number survives."""
    text = re.sub(r"(?<=\d)[\u00a0\u202f](?=\d{3}\b)", "", text)
    return unicodedata.normalize("NFKC", text).casefold().translate(_DASHES).translate(_APOSTROPHES)


def fold(text: str) -> str:
    """Accents removed from Latin letters only (kana voicing marks are kept: カ and ガ differ);
    one character in, one out, so positions survive."""
    out = []
    for ch in text:
        if "\u00c0" <= ch <= "\u024f":
            ch = unicodedata.normalize("NFD", ch)[0]
        out.append(ch)
    return "".join(out)


def _canonical(raw: str) -> str:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return raw
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


# ----------------------------------------------------------------------------------------------------
# Numbers

# fmt: off
_WORDS: dict[str, dict[str, int]] = {
    "en": {
        "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
        "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
        "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
        "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
        "ninety": 90,
    },
    "es": {
        "cero": 0, "dos": 2, "tres": 3, "cuatro": 4, "cinco": 5, "seis": 6, "siete": 7, "ocho": 8,
        "nueve": 9, "diez": 10, "once": 11, "doce": 12, "trece": 13, "catorce": 14, "quince": 15,
        "dieciseis": 16, "diecisiete": 17, "dieciocho": 18, "diecinueve": 19, "veinte": 20,
        "veintiuno": 21, "veintidos": 22, "veintitres": 23, "veinticuatro": 24, "veinticinco": 25,
        "veintiseis": 26, "veintisiete": 27, "veintiocho": 28, "veintinueve": 29, "treinta": 30,
        "cuarenta": 40, "cincuenta": 50, "sesenta": 60, "setenta": 70, "ochenta": 80,
        "noventa": 90, "cien": 100,
    },
    "de": {
        "null": 0, "eins": 1, "zwei": 2, "zwo": 2, "drei": 3, "vier": 4, "funf": 5, "sechs": 6,
        "sieben": 7, "acht": 8, "neun": 9, "zehn": 10, "elf": 11, "zwolf": 12, "dreizehn": 13,
        "vierzehn": 14, "funfzehn": 15, "sechzehn": 16, "siebzehn": 17, "achtzehn": 18,
        "neunzehn": 19, "zwanzig": 20, "dreissig": 30, "vierzig": 40, "funfzig": 50, "sechzig": 60,
        "siebzig": 70, "achtzig": 80, "neunzig": 90, "hundert": 100,
    },
    "fr": {
        "zero": 0, "deux": 2, "trois": 3, "quatre": 4, "cinq": 5, "six": 6, "sept": 7, "huit": 8,
        "dix": 10, "onze": 11, "douze": 12, "treize": 13, "quatorze": 14, "quinze": 15,
        "seize": 16, "dix-sept": 17, "dix-huit": 18, "dix-neuf": 19, "vingt": 20, "trente": 30, "quarante": 40, "cinquante": 50, "soixante": 60,
        "soixante-dix": 70, "quatre-vingt": 80, "quatre-vingts": 80, "quatre-vingt-dix": 90, "cent": 100,
    },
    "pt": {
        "zero": 0, "dois": 2, "duas": 2, "tres": 3, "quatro": 4, "cinco": 5, "seis": 6, "sete": 7,
        "oito": 8, "nove": 9, "dez": 10, "onze": 11, "doze": 12, "treze": 13, "catorze": 14,
        "quatorze": 14, "quinze": 15, "dezesseis": 16, "dezasseis": 16, "dezessete": 17,
        "dezassete": 17, "dezoito": 18, "dezenove": 19, "dezanove": 19, "vinte": 20, "trinta": 30,
        "quarenta": 40, "cinquenta": 50, "sessenta": 60, "setenta": 70, "oitenta": 80,
        "noventa": 90, "cem": 100,
    },
}
# Words that are also articles or other words ("one" the pronoun, "un"/"ein" the article, "neuf" =
# new): a number only before a time unit ("un año", "a week") or inside a range ("one to two days").
_AMBIGUOUS: dict[str, dict[str, int]] = {
    "en": {"one": 1, "a": 1, "an": 1},
    "es": {"un": 1, "una": 1, "uno": 1},
    "de": {"ein": 1, "eine": 1, "einen": 1, "einem": 1, "einer": 1, "eines": 1},
    "fr": {"un": 1, "une": 1, "neuf": 9},
    "pt": {"um": 1, "uma": 1},
}
# A compound of tens and units: "twenty-four", "vingt-quatre", "treinta y cinco", "vinte e quatro".
_COMPOUND_JOIN = {"en": r"-", "fr": r"-|-et-| et ", "es": r" y ", "pt": r" e "}
_RANGE_JOIN = {
    "en": r"-|to|or|and",
    "es": r"-|a|y|o|al",
    "de": r"-|bis|und|oder",
    "fr": r"-|a|et|ou",
    "pt": r"-|a|e|ou|ate",
    "zh": r"-|到|至|或",
    "ja": r"-|から|~|または",
}
_HAN_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "两": 2, "兩": 2, "三": 3, "四": 4, "五": 5,
               "六": 6, "七": 7, "八": 8, "九": 9}
_HAN_NUMERAL = re.compile(r"[〇零一二两兩三四五六七八九十百]+")
# Counters after which a Chinese or Japanese numeral is a number ("两年", "三天", "二つ"); "一" before a
# counter that is not a unit is usually the article ("一个链接" = "a link") and is not counted.
_CJK_COUNTERS = "个|個|件|次|种|種|位|名|人|点|倍|岁|歳|元|円|つ|回|箇所|台|步|段階"

_MONTHS: dict[str, dict[str, int]] = {
    "en": {m: i + 1 for i, m in enumerate(
        "january february march april may june july august september october november december".split())},
    "es": {m: i + 1 for i, m in enumerate(
        "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre".split())},
    "de": {m: i + 1 for i, m in enumerate(
        "januar februar marz april mai juni juli august september oktober november dezember".split())},
    "fr": {m: i + 1 for i, m in enumerate(
        "janvier fevrier mars avril mai juin juillet aout septembre octobre novembre decembre".split())},
    "pt": {m: i + 1 for i, m in enumerate(
        "janeiro fevereiro marco abril maio junho julho agosto setembro outubro novembro dezembro".split())},
}

# Time units per language, matched on normalised, accent-folded text right after a number or range.
_UNITS: dict[str, list[tuple[str, str]]] = {
    "en": [
        (r"business[- ]?days?|working[- ]?days?|workdays?", "business_day"),
        (r"days?", "day"), (r"weeks?", "week"), (r"months?", "month"), (r"years?", "year"),
        (r"hours?|hrs?\b|h\b", "hour"), (r"minutes?|mins?\b", "minute"),
    ],
    "es": [
        (r"dias? (?:habiles|laborables)|dia (?:habil|laborable)", "business_day"),
        (r"dias?", "day"), (r"semanas?", "week"), (r"mes(?:es)?", "month"), (r"anos?", "year"),
        (r"horas?", "hour"), (r"minutos?", "minute"),
    ],
    "de": [
        (r"werktag(?:e|en|es)?|arbeitstag(?:e|en|es)?|geschaftstag(?:e|en|es)?", "business_day"),
        (r"tag(?:e|en|es)?|-?tagig\w*", "day"), (r"wochen?|-?wochig\w*", "week"),
        (r"monat(?:e|en|s)?|-?monatig\w*", "month"), (r"jahr(?:e|en|es)?|-?jahrig\w*", "year"),
        (r"stunden?|-?stundig\w*", "hour"), (r"minuten?", "minute"),
    ],
    "fr": [
        (r"jours? ouvr(?:e|es|able|ables)", "business_day"),
        (r"jours?", "day"), (r"semaines?", "week"), (r"mois", "month"),
        (r"ans?|annees?", "year"), (r"heures?|h\b", "hour"), (r"minutes?|min\b", "minute"),
    ],
    "pt": [
        (r"dias? uteis|dia util", "business_day"),
        (r"dias?", "day"), (r"semanas?", "week"), (r"mes(?:es)?", "month"), (r"anos?", "year"),
        (r"horas?", "hour"), (r"minutos?", "minute"),
    ],
    "zh": [
        (r"个?工作日|个?营业日", "business_day"), (r"天|日", "day"), (r"个?星期|周", "week"),
        (r"个月", "month"), (r"年", "year"), (r"个?小时|个?钟头", "hour"), (r"分钟", "minute"),
    ],
    "ja": [
        (r"営業日", "business_day"), (r"日間|日", "day"), (r"週間|週", "week"),
        (r"[かヶカヵケ箇]月間?", "month"), (r"年間|年", "year"), (r"時間", "hour"),
        (r"分間|分", "minute"),
    ],
}
_DATE_SPANS = re.compile(
    r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}/\d{1,2}/\d{2,4}|(?:\d{4}\s*年\s*)?\d{1,2}\s*月\s*\d{1,2}\s*日|\d{4}\s*年\s*\d{1,2}\s*月"
)

# fmt: on


@lru_cache(maxsize=16)
def _unit_regex(language: str) -> re.Pattern[str]:
    units = _UNITS.get(language, _UNITS["en"])
    alts = "|".join(f"(?P<u{i}>{pat})" for i, (pat, _) in enumerate(units))
    if language in CJK:
        return re.compile(rf"\s*(?:{alts})")
    return re.compile(rf"[\s-]?(?:{alts})(?!\w)")


@lru_cache(maxsize=16)
def _word_regex(language: str) -> re.Pattern[str] | None:
    words = {**_WORDS.get(language, {}), **_AMBIGUOUS.get(language, {})}
    if not words:
        return None
    alts = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)")


def _parse_han(s: str) -> int | None:
    """A Chinese/Japanese numeral up to 999: 十 = 10, 十五 = 15, 二十 = 20, 三十五 = 35, 一百 = 100."""
    if not s:
        return None
    if all(c in _HAN_DIGITS for c in s):
        return int("".join(str(_HAN_DIGITS[c]) for c in s)) if len(s) <= 4 else None
    total, current = 0, 0
    for c in s:
        if c in _HAN_DIGITS:
            current = _HAN_DIGITS[c]
        elif c == "十":
            total += (current or 1) * 10
            current = 0
        elif c == "百":
            total += (current or 1) * 100
            current = 0
        else:
            return None
    return total + current


def _digits_value(token: str, language: str) -> list[str]:
    """A digit token with separators, read the way the language writes numbers ("1,5" is 1.5 in
    German, "1,500" is 1500 in English, "1.500" is 1500 in Spanish)."""
    parts = re.split(r"([.,])", token)
    if len(parts) == 1:
        return [_canonical(token)]
    nums, seps = parts[0::2], parts[1::2]
    decimal_comma = language in ("es", "de", "fr", "pt")
    if len(seps) == 1:
        sep, after = seps[0], nums[1]
        if sep == ",":
            if decimal_comma:
                return [_canonical(f"{nums[0]}.{after}")]
            if len(after) == 3:
                return [_canonical(nums[0] + after)]
            return [_canonical(nums[0]), _canonical(after)]
        if decimal_comma and len(after) == 3:
            return [_canonical(nums[0] + after)]
        return [_canonical(f"{nums[0]}.{after}")]
    # Several separators: the last one is decimal when it differs from the others.
    if len(set(seps)) == 2 and seps[-1] != seps[0]:
        return [_canonical("".join(nums[:-1]) + "." + nums[-1])]
    if len(set(seps)) == 1 and all(len(n) == 3 for n in nums[1:]):
        return [_canonical("".join(nums))]
    return [_canonical(n) for n in nums if n]


class _Num:
    __slots__ = ("end", "start", "strong", "values")

    def __init__(self, start: int, end: int, values: list[str], strong: bool) -> None:
        self.start, self.end, self.values, self.strong = start, end, values, strong


def _scan(text: str, language: str) -> tuple[str, list[_Num], list[tuple[int, int]]]:
    """Numbers of a text in order (normalised text, tokens, date spans). ``strong`` is False for a
    word that is a number only in the right place (an article, "one", "neuf")."""
    t = fold(normalize(text))
    found: list[_Num] = []
    for m in re.finditer(r"\d+(?:[.,]\d+)*", t):
        found.append(_Num(m.start(), m.end(), _digits_value(m.group(), language), True))
    wr = _word_regex(language)
    if wr is not None:
        words = _WORDS.get(language, {})
        amb = _AMBIGUOUS.get(language, {})
        for m in wr.finditer(t):
            w = m.group()
            found.append(_Num(m.start(), m.end(), [str(words.get(w, amb.get(w)))], w in words))
        if language == "de":  # "zweijährige", "dreißigtägige": a number word glued to a unit
            alts = "|".join(sorted(words, key=len, reverse=True))
            for m in re.finditer(rf"(?<!\w)({alts})(?=jahrig|tagig|wochig|monatig|stundig)", t):
                found.append(_Num(m.start(), m.end(), [str(words[m.group(1)])], True))
    if language in CJK or re.search(f"[{_HAN}]", t):
        for m in _HAN_NUMERAL.finditer(t):
            s = m.group()
            if s == "十" and t.startswith("分", m.end()) and not t.startswith(("分钟", "分間"), m.end()):
                continue  # 十分: "very" (zh) / "enough" (ja), not ten minutes
            if t.startswith("第", max(0, m.start() - 1)) and m.start() > 0:
                continue  # ordinal
            value = _parse_han(s)
            if value is None:
                continue
            rest = t[m.end() :]
            unit = _unit_regex("zh" if language != "ja" else "ja").match(rest)
            counter = re.match(rf"\s*(?:{_CJK_COUNTERS})", rest)
            ranged = re.match(r"\s*(?:到|至|-|或|から)\s*[〇零一二两兩三四五六七八九十百\d]", rest)
            if unit is None and ranged is None and (counter is None or s == "一"):
                continue
            found.append(_Num(m.start(), m.end(), [str(value)], True))
    found.sort(key=lambda n: n.start)
    # Drop word matches inside digit matches or overlapping earlier ones.
    kept: list[_Num] = []
    for n in found:
        if kept and n.start < kept[-1].end:
            continue
        kept.append(n)
    # Compounds: "twenty-four", "treinta y cinco".
    join = _COMPOUND_JOIN.get(language)
    if join:
        merged: list[_Num] = []
        for n in kept:
            prev = merged[-1] if merged else None
            if (
                prev is not None
                and prev.strong
                and n.strong
                and not t[prev.start : prev.end][0].isdigit()
                and not t[n.start : n.end][0].isdigit()
                and re.fullmatch(join, t[prev.end : n.start])
                and int(prev.values[0]) % 10 == 0
                and 20 <= int(prev.values[0]) <= 90
                and int(n.values[0]) < 10
            ):
                merged[-1] = _Num(prev.start, n.end, [str(int(prev.values[0]) + int(n.values[0]))], True)
                continue
            merged.append(n)
        kept = merged
    dates = [(m.start(), m.end()) for m in _DATE_SPANS.finditer(t)]
    return t, kept, dates


def _ranges(t: str, nums: list[_Num], language: str) -> list[list[_Num]]:
    """Consecutive numbers joined by a range word ("6-10", "6 à 10", "one to two") as groups."""
    join = re.compile(rf"\s*(?:{_RANGE_JOIN.get(language, '-')})\s*")
    groups: list[list[_Num]] = []
    for n in nums:
        if groups and join.fullmatch(t[groups[-1][-1].end : n.start]) and groups[-1][-1].end < n.start:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _month_numbers(t: str, language: str) -> set[str]:
    months = _MONTHS.get(language)
    if not months:
        return set()
    alts = "|".join(sorted(months, key=len, reverse=True))
    out = set()
    pat = rf"(?<!\w)(?:\d{{1,2}}(?:st|nd|rd|th|er|º|ª|\.)?\s+(?:de\s+)?({alts})|({alts})\s+\d{{1,4}})(?!\w)"
    for m in re.finditer(pat, t):
        out.add(str(months[m.group(1) or m.group(2)]))
    return out


def _analyse(text: str, language: str) -> tuple[set[str], set[tuple[str, str]]]:
    t, nums, dates = _scan(text, language)
    unit_re = _unit_regex(language)
    units = _UNITS.get(language, _UNITS["en"])
    numbers: set[str] = set()
    durations: set[tuple[str, str]] = set()
    last_unit: str | None = None
    last_end = 0
    for group in _ranges(t, nums, language):
        end = group[-1].end
        if re.search(r"[.!?;。！？；\n]", t[last_end : group[0].start]):
            last_unit = None  # a bare range takes the unit of a duration in the same sentence only
        last_end = end
        m = unit_re.match(t, end)
        unit = None
        if m is not None:
            unit = next(units[int(k[1:])][1] for k, v in m.groupdict().items() if v is not None)
        in_date = any(a <= group[0].start and group[-1].end <= b for a, b in dates)
        strong = any(n.strong for n in group) or len(group) > 1
        if not strong and unit is None:
            continue  # "a", "un", "one" that is not a number here
        for n in group:
            numbers.update(n.values)
        if in_date:
            continue
        if unit is None and last_unit is not None and all(n.strong for n in group):
            # "standard 6-10 business days, express 3-5": a bare range after a duration in the same
            # sentence has its unit. Identifiers (CB-100231, 3-D) are not durations.
            prev = t[max(0, group[0].start - 1) : group[0].start]
            values = [v for n in group for v in n.values]
            if (
                not prev.isalpha()
                and all(float(v) < 1000 for v in values)
                and not t.startswith("-", group[-1].end)
            ):
                unit = last_unit
        if unit is not None:
            for n in group:
                for v in n.values:
                    durations.add((v, unit))
            last_unit = unit
    numbers |= _month_numbers(t, language)
    return numbers, durations


def numbers(text: str, language: str) -> frozenset[str]:
    """Every number in the text as a canonical string ("6", "1.5", "100231"): digits (full-width,
    decimal commas, thousands separators as the language writes them), ranges ("6-10", "6 à 10",
    "6～10", "4-7个工作日"), number words ("two", "dos", "zwei", "deux", "duas", "两") and a month named
    next to a day or year ("December 1" gives 12 and 1, like "2025-12-01")."""
    return frozenset(_analyse(text, language)[0])


def durations(text: str, language: str) -> frozenset[tuple[str, str]]:
    """(number, unit) pairs, unit one of day, week, month, year, hour, minute, business_day:
    "5-10 business days" gives ("5", "business_day") and ("10", "business_day"), "2-year warranty"
    ("2", "year"), "30日以内" ("30", "day"). A bare range after a duration in the same sentence takes
    its unit ("standard 6-10 business days, express 3-5"). Dates are not durations."""
    return frozenset(_analyse(text, language)[1])


# ----------------------------------------------------------------------------------------------------
# Countries and regions

# fmt: off
EU_MEMBERS = frozenset(
    "AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE".split()
)
_NORTH_AMERICA = frozenset({"US", "CA", "MX", "GL", "BM", "PM"})
_SOUTH_AMERICA = frozenset("AR BO BR CL CO EC FK GF GY PE PY SR UY VE".split())
_MIDDLE_EAST = frozenset("AE BH IL IQ IR JO KW LB OM PS QA SA SY YE".split())
# Countries whose first CLDR zone is on another continent's list (Ceuta, Madeira, Easter Island...).
_CONTINENT_FIX = {"ES": "Europe", "PT": "Europe", "CY": "Europe", "IS": "Europe", "FO": "Europe",
                  "SJ": "Europe", "CL": "America", "EC": "America", "FK": "America", "GS": "America",
                  "BM": "America", "CV": "Africa", "SH": "Africa", "KM": "Africa", "MG": "Africa",
                  "MU": "Africa", "RE": "Africa", "SC": "Africa", "YT": "Africa", "CC": "Asia",
                  "CX": "Asia", "IO": "Asia", "MV": "Asia", "AU": "Pacific"}

REGIONS = (
    "EU", "R:europe", "R:north_america", "R:latin_america", "R:south_america", "R:asia_pacific",
    "R:asia", "R:oceania", "R:middle_east", "R:africa",
)
_REGION_NAMES: dict[str, dict[str, list[str]]] = {
    "EU": {"en": ["European Union"], "es": ["Unión Europea"], "de": ["Europäische Union"],
           "fr": ["Union européenne"], "pt": ["União Europeia"], "zh": ["欧盟", "欧洲联盟"],
           "ja": ["欧州連合"]},
    "R:europe": {"en": ["Europe"], "es": ["Europa"], "de": ["Europa"], "fr": ["Europe"],
                 "pt": ["Europa"], "zh": ["欧洲"], "ja": ["ヨーロッパ", "欧州"]},
    "R:north_america": {"en": ["North America"], "es": ["Norteamérica", "América del Norte"],
                        "de": ["Nordamerika"], "fr": ["Amérique du Nord"],
                        "pt": ["América do Norte"], "zh": ["北美", "北美洲"],
                        "ja": ["北米", "北アメリカ"]},
    "R:latin_america": {"en": ["Latin America"], "es": ["Latinoamérica", "América Latina"],
                        "de": ["Lateinamerika"], "fr": ["Amérique latine"],
                        "pt": ["América Latina"], "zh": ["拉丁美洲", "拉美"],
                        "ja": ["中南米", "ラテンアメリカ"]},
    "R:south_america": {"en": ["South America"], "es": ["Sudamérica", "América del Sur"],
                        "de": ["Südamerika"], "fr": ["Amérique du Sud"], "pt": ["América do Sul"],
                        "zh": ["南美", "南美洲"], "ja": ["南米", "南アメリカ"]},
    "R:asia_pacific": {"en": ["Asia-Pacific", "Asia Pacific"], "es": ["Asia-Pacífico", "Asia Pacífico"],
                       "de": ["Asien-Pazifik", "asiatisch-pazifischen Raum"],
                       "fr": ["Asie-Pacifique"], "pt": ["Ásia-Pacífico"],
                       "zh": ["亚太地区", "亚太"], "ja": ["アジア太平洋"]},
    "R:asia": {"en": ["Asia"], "es": ["Asia"], "de": ["Asien"], "fr": ["Asie"], "pt": ["Ásia"],
               "zh": ["亚洲"], "ja": ["アジア"]},
    "R:oceania": {"en": ["Oceania"], "es": ["Oceanía"], "de": ["Ozeanien"], "fr": ["Océanie"],
                  "pt": ["Oceania"], "zh": ["大洋洲"], "ja": ["オセアニア"]},
    "R:middle_east": {"en": ["Middle East"], "es": ["Oriente Medio", "Oriente Próximo", "Medio Oriente"],
                      "de": ["Naher Osten", "Nahen Osten", "Nahost", "Mittlerer Osten", "Mittleren Osten"],
                      "fr": ["Moyen-Orient", "Proche-Orient"], "pt": ["Oriente Médio"],
                      "zh": ["中东"], "ja": ["中東"]},
    "R:africa": {"en": ["Africa"], "es": ["África"], "de": ["Afrika"], "fr": ["Afrique"],
                 "pt": ["África"], "zh": ["非洲"], "ja": ["アフリカ"]},
}
# Names customers write that CLDR's territory list lacks (it has one display name per code).
_ALIASES: dict[str, dict[str, list[str]]] = {
    "GB": {"en": ["Britain", "Great Britain", "England", "Scotland", "Wales"],
           "es": ["Gran Bretaña", "Inglaterra"], "de": ["Großbritannien", "England", "Schottland"],
           "fr": ["Grande-Bretagne", "Angleterre"], "pt": ["Grã-Bretanha", "Inglaterra"],
           "zh": ["英格兰", "大不列颠"], "ja": ["英国", "イングランド"]},
    "US": {"en": ["America", "United States of America"], "es": ["EEUU", "Estados Unidos de América"],
           "de": ["Amerika", "Vereinigte Staaten von Amerika"], "fr": ["États-Unis d'Amérique"],
           "pt": ["Estados Unidos da América"], "zh": ["美利坚"], "ja": ["アメリカ", "米国"]},
    "KR": {"en": ["Korea"], "es": ["Corea"], "de": ["Korea"], "fr": ["Corée"], "pt": ["Coreia"],
           "zh": ["南韩"], "ja": []},
    "NL": {"en": ["Holland"], "es": ["Holanda"], "de": ["Holland"], "fr": ["Hollande"],
           "pt": ["Holanda"], "zh": [], "ja": []},
    "CZ": {"en": ["Czech Republic"], "es": ["República Checa"], "de": ["Tschechische Republik"],
           "fr": ["République tchèque"], "pt": ["República Tcheca"], "zh": ["捷克共和国"], "ja": []},
    "AE": {"en": ["Emirates"], "es": [], "de": ["Emirate"], "fr": [], "pt": [], "zh": ["阿联酋"], "ja": []},
    "HK": {"en": ["Hong Kong"], "es": ["Hong Kong"], "de": ["Hongkong"], "fr": ["Hong Kong"],
           "pt": ["Hong Kong"], "zh": ["香港"], "ja": ["香港"]},
    "MO": {"en": ["Macao", "Macau"], "es": ["Macao"], "de": ["Macau"], "fr": ["Macao"], "pt": ["Macau"],
           "zh": ["澳门"], "ja": ["マカオ"]},
    "MM": {"en": ["Myanmar", "Burma"], "es": ["Myanmar"], "de": [], "fr": ["Myanmar"], "pt": ["Mianmar"],
           "zh": [], "ja": ["ミャンマー"]},
    "TR": {"en": ["Turkey"], "es": [], "de": [], "fr": [], "pt": [], "zh": [], "ja": []},
    "CN": {"en": ["Mainland China"], "es": [], "de": [], "fr": [], "pt": [], "zh": ["中国大陆"], "ja": []},
}
# Acronyms, matched case-sensitively ("us" and "eu" are words in English and Portuguese).
_ACRONYMS = {"UK": "GB", "U.K.": "GB", "US": "US", "U.S.": "US", "USA": "US",
             "U.S.A.": "US", "EE. UU.": "US", "EE.UU.": "US", "EUA": "US", "UAE": "AE", "EAU": "AE",
             "EU": "EU", "UE": "EU", "APAC": "R:asia_pacific"}
# CLDR names that are mostly something else here ("Jersey" the garment, "Georgia" the state, "Chad"
# and "Jordan" the names, "Granada"/"Grenade" the city/fruit, "Reunión" a meeting, "Maurice" a name).
_SKIP_NAMES = {
    "jersey", "georgia", "chad", "jordan", "guinea", "granada", "grenade", "reunion", "reuniao",
    "maurice", "mauricio", "dominique", "turkey", "geórgia", "ジョージア", "ジャージー",
    "マリ", "马里", "chade", "georgie",
}
_NOT_COUNTRIES = {"EZ", "UN", "QO", "XA", "XB", "ZZ", "EU"}

# fmt: on


def _cldr_names(language: str) -> dict[str, list[str]]:
    from babel import Locale

    out: dict[str, list[str]] = {}
    for code, name in Locale(language).territories.items():
        if len(code) != 2 or not code.isalpha() or code in _NOT_COUNTRIES:
            continue
        names = [name]
        if code in ("HK", "MO", "CD", "CG"):
            names = [name]  # "RAE de Hong Kong (China)": no part of it is a name of its own
        elif "(" in name or "（" in name:
            names = [name, re.split(r"\s*[(（]", name)[0]]
        out[code] = names
    return out


@lru_cache(maxsize=16)
def _name_table(language: str) -> dict[str, list[str]]:
    """Code -> names in one language: CLDR, aliases, region names (not acronyms)."""
    table: dict[str, list[str]] = {c: list(n) for c, n in _cldr_names(language).items()}
    for code, per in _ALIASES.items():
        table.setdefault(code, []).extend(per.get(language, []))
    for code, per in _REGION_NAMES.items():
        table.setdefault(code, []).extend(per.get(language, []))
    from babel import Locale

    terr = Locale(language).territories
    for code, m49 in (
        ("R:europe", "150"),
        ("R:north_america", "003"),
        ("R:north_america", "021"),
        ("R:latin_america", "419"),
        ("R:south_america", "005"),
        ("R:africa", "002"),
        ("R:asia", "142"),
        ("R:oceania", "009"),
        ("EU", "EU"),
    ):
        if m49 in terr and terr[m49] not in table[code]:
            table[code].append(terr[m49])
    return table


def _name_pattern(name: str, language: str) -> str | None:
    n = fold(normalize(name)).strip()
    if not n or n in _SKIP_NAMES or fold(n) in _SKIP_NAMES:
        return None
    if re.search(f"[{_CJK_RANGE}]", n):
        if len(n) < 2:
            return None
        pat = re.escape(n)
        if re.match(f"[{_KATAKANA}]", n):
            pat = f"(?<![{_KATAKANA}])" + pat
        if re.search(f"[{_KATAKANA}]$", n):
            pat += f"(?![{_KATAKANA}])"
        return pat
    if len(n) < 4:
        return None
    if language == "de":
        # Inflected German: "im Vereinigten Königreich", "den Niederlanden", "Deutschlands".
        words = []
        for w in n.split(" "):
            stem = re.sub(r"(?:es|e)$", "", w) if len(w) > 4 and re.search(r"(?:es|e)$", w) else None
            words.append(re.escape(stem) + "(?:e|en|er|es|em)" if stem else re.escape(w))
        pat = " ".join(words) + "s?"
    else:
        pat = re.escape(n)
    if n == "america":
        pat += "(?!n)"
    return rf"(?<!\w){pat}(?!\w)"


@lru_cache(maxsize=16)
def _country_matcher(languages: tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """One alternation over every name of the given languages, longest first (so "Papua New Guinea"
    wins over "Guinea" and "北美" over "美国" in "北美国家"), and a group name -> code map."""
    entries: dict[str, str] = {}
    for language in languages:
        for code, names in _name_table(language).items():
            for name in names:
                pat = _name_pattern(name, language)
                if pat and pat not in entries:
                    entries[pat] = code
    ordered = sorted(entries, key=lambda p: len(re.sub(r"\(\?[<!=]+[^)]*\)|\\", "", p)), reverse=True)
    groups: dict[str, str] = {}
    alts = []
    for i, pat in enumerate(ordered):
        groups[f"c{i}"] = entries[pat]
        alts.append(f"(?P<c{i}>{pat})")
    return re.compile("|".join(alts)), groups


_ACRONYM_RE = re.compile(
    r"(?<![A-Za-z0-9.])("
    + "|".join(re.escape(a) for a in sorted(_ACRONYMS, key=len, reverse=True))
    + r")(?![A-Za-z0-9])"
)


def _matcher_languages(language: str | None) -> tuple[str, ...]:
    if language is None or language not in LANGUAGES:
        return LANGUAGES
    return (language,) if language == "en" else (language, "en")


def countries(text: str, language: str | None = None) -> frozenset[str]:
    """ISO 3166-1 alpha-2 codes of the countries named in the text, plus region pseudo codes (see
    the module docstring). Names come from CLDR in ``language`` and English (all 7 languages when
    None), case- and accent-insensitive on word boundaries for Latin scripts, substrings for CJK
    (katakana names on katakana boundaries: アメリカ is not アメリカン); acronyms (UK, U.S., EU, UE)
    are matched case-sensitively."""
    out: set[str] = set()
    nfkc = unicodedata.normalize("NFKC", text).translate(_DASHES)
    for m in _ACRONYM_RE.finditer(nfkc):
        out.add(_ACRONYMS[m.group(1)])
    pattern, groups = _country_matcher(_matcher_languages(language))
    for m in pattern.finditer(fold(normalize(text))):
        out.add(groups[m.lastgroup or ""])
    return frozenset(out)


def country_names(code: str, language: str) -> list[str]:
    """The names of a code (country or region pseudo code) in a language: CLDR's first, then the
    aliases; for the composer to find a country's row in an article."""
    names = list(dict.fromkeys(_name_table(language).get(code, [])))
    names += [a for a, c in _ACRONYMS.items() if c == code and a not in names]
    return names


def is_region(code: str) -> bool:
    return code == "EU" or code.startswith("R:")


@lru_cache(maxsize=512)
def regions_of(code: str) -> frozenset[str]:
    """The region pseudo codes a country belongs to, from its CLDR time zones (continent) and the
    shop's region tables: MX -> {R:north_america}, DE -> {EU, R:europe}, JP -> {R:asia, R:asia_pacific}."""
    from babel.core import get_global

    if is_region(code):
        return frozenset()
    zones = get_global("territory_zones").get(code, [])
    continent = _CONTINENT_FIX.get(code) or (zones[0].split("/")[0] if zones else "")
    out: set[str] = set()
    if code in EU_MEMBERS:
        out.add("EU")
    if continent in ("Europe", "Atlantic", "Arctic") and code not in ("CV", "SH", "FK", "GS"):
        out.add("R:europe")
    elif continent == "America":
        out.add("R:north_america" if code in _NORTH_AMERICA else "R:latin_america")
        if code in _SOUTH_AMERICA:
            out.add("R:south_america")
    elif continent == "Africa":
        out.add("R:africa")
    elif continent == "Asia":
        out.add("R:asia")
        out.add("R:middle_east" if code in _MIDDLE_EAST else "R:asia_pacific")
    elif continent in ("Pacific", "Australia"):
        out |= {"R:oceania", "R:asia_pacific"}
    elif continent == "Indian":
        out.add("R:asia_pacific")
    return frozenset(out)


# ----------------------------------------------------------------------------------------------------
# Product categories

CATEGORIES = ("electronics", "home_appliance", "clothing", "shoes", "underwear", "jewellery", "final_sale")
# Patterns on normalised, accent-folded text. A German entry may start with \w* (compound heads are
# at the end: "Winterjacke", "Laufschuhe"); entries are tried longest first so "ropa interior" is
# underwear before "ropa" is clothing and "Handschuhe" clothing before "Schuhe" shoes.
# fmt: off
_CATEGORY_LEXICON: dict[str, dict[str, list[str]]] = {
    "en": {
        "electronics": [r"electronics?", r"electronic (?:devices?|products?|items?|goods|gadgets?)",
                        r"head ?phones?", r"earphones?", r"earbuds?", r"smart ?phones?",
                        r"(?<!by )(?<!the )(?:mobile |cell ?)?phones?(?! ?(?:numbers?|calls?|support|lines?))",
                        r"laptops?", r"tablets?", r"cameras?", r"tvs?", r"televisions?", r"speakers?",
                        r"smart ?watch(?:es)?", r"chargers?", r"game consoles?", r"computers?", r"gadgets?"],
        "home_appliance": [r"(?:home|household|kitchen) appliances?", r"appliances?",
                           r"vacuum cleaners?", r"vacuums?", r"blenders?", r"kettles?", r"microwaves?",
                           r"toasters?", r"air fryers?", r"coffee (?:machines?|makers?)", r"washing machines?",
                           r"dishwashers?", r"fridges?", r"refrigerators?", r"hair ?dryers?"],
        "clothing": [r"clothing", r"clothes", r"garments?", r"apparel", r"jackets?", r"coats?",
                     r"dress(?:es)?", r"t-shirts?", r"shirts?", r"trousers", r"jeans", r"skirts?",
                     r"sweaters?", r"jumpers?", r"hoodies?", r"blouses?", r"shorts", r"socks?",
                     r"gloves?", r"scarf|scarves"],
        "shoes": [r"shoes?", r"footwear", r"sneakers?", r"trainers", r"boots", r"sandals?", r"heels"],
        "underwear": [r"underwear", r"lingerie", r"bras?", r"briefs", r"boxers", r"panties", r"underpants"],
        "jewellery": [r"jewell?ery", r"jewelry", r"earrings?", r"necklaces?", r"bracelets?",
                      r"pendants?", r"piercings?"],
        "final_sale": [r"final[- ]sale", r"marked as final", r"clearance items?"],
    },
    "es": {
        "electronics": [r"(?<!correo )(?<!factura )(?:productos |aparatos |dispositivos |articulos )?electronic[oa]s?",
                        r"auriculares", r"cascos", r"(?<!por )(?<!al )(?<!de )telefonos?(?! de contacto)", r"moviles?",
                        r"celulares?", r"smartphones?", r"portatiles?", r"ordenador(?:es)?",
                        r"computador(?:a|as|es)?", r"laptops?", r"tabletas?", r"tablets?", r"camaras?",
                        r"televisor(?:es)?", r"altavoz|altavoces", r"consolas?", r"relojes inteligentes",
                        r"reloj inteligente"],
        "home_appliance": [r"electrodomesticos?", r"aspiradoras?", r"cafeteras?", r"microondas",
                           r"lavadoras?", r"lavavajillas", r"neveras?", r"frigorificos?",
                           r"secador(?:es)?(?: de pelo)?", r"licuadoras?", r"batidoras?", r"freidoras?", r"hervidor(?:es)?"],
        "clothing": [r"ropa(?! interior)", r"prendas?(?: de vestir)?", r"chaquetas?", r"chamarras?",
                     r"abrigos?", r"vestidos?", r"camisas?", r"camisetas?", r"pantalon(?:es)?",
                     r"faldas?", r"jerseys?", r"sueter(?:es)?", r"sudaderas?", r"vaqueros", r"jeans",
                     r"blusas?", r"calcetines", r"guantes", r"bufandas?"],
        "shoes": [r"zapatos?", r"zapatillas?", r"tenis", r"calzado", r"botas", r"sandalias?"],
        "underwear": [r"ropa interior", r"lenceria", r"sujetador(?:es)?", r"calzoncillos?", r"bragas?"],
        "jewellery": [r"joyas?", r"joyeria", r"bisuteria", r"(?:los|unos|tus|sus|estos|esos|mis) pendientes",
                      r"aretes?", r"collares", r"pulseras?", r"anillos?"],
        "final_sale": [r"(?:oferta|venta|rebaja)s? finale?s?"],
    },
    "de": {
        "electronics": [r"elektronik\w*", r"elektronische(?:n|s)? (?:gerate?n?|artikel|produkte?n?)",
                        r"\w*kopfhorer", r"\w*ohrhorer", r"handys?", r"smartphones?", r"(?<!per )(?<!am )telefone?",
                        r"\w*laptops?", r"notebooks?", r"tablets?", r"\w*kameras?", r"fernseher",
                        r"lautsprecher", r"spielkonsolen?", r"computer", r"smartwatch(?:es)?"],
        "home_appliance": [r"\w*haushaltsgerat(?:e|en)?", r"elektrogerat(?:e|en)?", r"staubsauger",
                           r"kaffeemaschinen?", r"waschmaschinen?", r"mikrowellen?", r"wasserkocher",
                           r"kuhlschranke?", r"haartrockner", r"fohn", r"mixer", r"\w*fritteusen?"],
        "clothing": [r"\w*kleidung", r"kleidungsstuck(?:e|en)?", r"\w*jacken?", r"\w*mantel",
                     r"kleid(?:er|ern)?", r"\w*hemd(?:en)?", r"t-shirts?", r"\w*hosen?", r"pullover",
                     r"pullis?", r"jeans", r"blusen?", r"socken", r"\w*handschuhe?", r"schals?"],
        "shoes": [r"\w*schuhe?n?", r"\w*stiefel", r"sandalen", r"sneakers?"],
        "underwear": [r"unterwasche", r"dessous", r"\w*unterhosen?", r"slips?", r"boxershorts?", r"bhs?"],
        "jewellery": [r"schmuck\w*", r"\w*ohrringe?n?", r"\w*halsketten?", r"armband|armbander", r"anhanger"],
        "final_sale": [r"endverkauf\w*", r"final sale"],
    },
    "fr": {
        "electronics": [r"(?:produits?|appareils?|articles?) electroniques?",
                        r"(?<!courrier )(?<!adresse )(?<!messagerie )(?<!paiement )electroniques?",
                        r"ecouteurs", r"casques?(?: audio)?", r"(?<!au )(?<!par )(?<!de )telephones?(?: portables?)?",
                        r"smartphones?", r"ordinateurs?(?: portables?)?", r"portables?", r"tablettes?",
                        r"appareils? photo", r"cameras?", r"televiseurs?", r"televisions?", r"consoles?",
                        r"montres? connectees?"],
        "home_appliance": [r"(?:appareils? )?electromenagers?", r"aspirateurs?", r"cafetieres?",
                           r"machines? a cafe", r"micro-ondes", r"lave-linge", r"lave-vaisselle",
                           r"refrigerateurs?", r"frigos?", r"bouilloires?", r"seche-cheveux"],
        "clothing": [r"vetements?", r"habits?", r"vestes?", r"manteaux?", r"robes?", r"chemises?",
                     r"chemisiers?", r"t-shirts?", r"pantalons?", r"jupes?", r"pulls?", r"sweats?",
                     r"jeans?", r"blousons?", r"chaussettes", r"echarpes?"],
        "shoes": [r"chaussures?", r"pointures?", r"baskets?", r"bottes", r"sandales?", r"souliers?", r"escarpins?"],
        "underwear": [r"sous-vetements?", r"lingerie", r"soutiens?-gorge", r"culottes?", r"calecons?",
                      r"slips?"],
        "jewellery": [r"bijoux?", r"bijouterie", r"boucles? d'oreilles?", r"colliers?", r"bracelets?",
                      r"bagues?", r"pendentifs?"],
        "final_sale": [r"ventes? finales?", r"soldes? (?:definitifs?|finales?)"],
    },
    "pt": {
        "electronics": [r"(?<!correio )(?<!endereco )(?:produtos |aparelhos |dispositivos |itens )?ele(?:c)?tronic[oa]s?",
                        r"fones?(?: de ouvido)?", r"headphones?", r"celular(?:es)?", r"telemove(?:l|is)",
                        r"(?<!por )(?<!de )telefones?(?! de contato)", r"smartphones?", r"notebooks?", r"laptops?",
                        r"computador(?:es)?", r"tablets?", r"cameras?", r"camaras?",
                        r"televis(?:ao|oes|or|ores)", r"caixas? de som", r"consoles?"],
        "home_appliance": [r"ele(?:c)?trodomesticos?", r"aspirador(?:es)?(?: de po)?", r"cafeteiras?",
                           r"micro-ondas", r"maquinas? de lavar", r"geladeiras?", r"frigorificos?",
                           r"secador(?:es)?(?: de cabelo)?", r"liquidificador(?:es)?", r"chaleiras?"],
        "clothing": [r"roupas?(?! intimas?)(?! interiores?)", r"vestuario", r"jaquetas?", r"casacos?",
                     r"vestidos?", r"camisas?", r"camisetas?", r"calcas?", r"saias?", r"sueter(?:es)?",
                     r"moletons?|moletom", r"blusas?", r"jeans", r"meias", r"luvas", r"cachecois|cachecol"],
        "shoes": [r"sapatos?", r"sapatilhas?", r"tenis", r"calcados?", r"botas", r"sandalias?", r"chinelos?"],
        "underwear": [r"roupas? intimas?", r"roupas? interiores?", r"lingerie", r"cuecas?", r"calcinhas?",
                      r"sutias?"],
        "jewellery": [r"joias?", r"bijuterias?", r"brincos?", r"colares", r"pulseiras?", r"aneis|anel",
                      r"pingentes?"],
        "final_sale": [r"venda final", r"promocao final", r"liquidacao final"],
    },
    "zh": {
        "electronics": ["电子产品", "电子设备", "电子商品", "电子类", "数码产品", "耳机", "手机", "笔记本电脑",
                        "电脑", "平板", "相机", "摄像机", "电视", "音箱", "游戏机", "智能手表", "充电器"],
        "home_appliance": ["家用电器", "家电", "电器", "吸尘器", "咖啡机", "洗衣机", "微波炉", "冰箱",
                           "电水壶", "吹风机", "榨汁机"],
        "clothing": ["服装", "衣服", "衣物", "服饰", "外套", "夹克", "连衣裙", "裙子", "衬衫", "t恤", "裤子",
                     "牛仔裤", "毛衣", "卫衣", "上衣", "袜子", "手套", "围巾"],
        "shoes": ["鞋子", "鞋", "运动鞋", "靴子", "凉鞋", "拖鞋"],
        "underwear": ["内衣", "内裤", "文胸", "胸罩", "贴身衣物"],
        "jewellery": ["首饰", "珠宝", "饰品", "耳环", "耳钉", "耳饰", "项链", "手链", "手镯", "戒指"],
        "final_sale": ["最终销售", "最终特卖", "最终折扣"],
    },
    "ja": {
        "electronics": ["電子機器", "電子製品", "デジタル機器", "ヘッドホン", "ヘッドフォン", "イヤホン",
                        "イヤフォン", "スマートフォン", "スマホ", "携帯電話", "ノートパソコン", "パソコン",
                        "タブレット", "カメラ", "テレビ", "スピーカー", "ゲーム機", "スマートウォッチ", "充電器"],
        "home_appliance": ["家電製品", "家電", "電化製品", "掃除機", "電子レンジ", "洗濯機", "冷蔵庫",
                           "コーヒーメーカー", "ドライヤー", "電気ケトル"],
        "clothing": ["衣料品", "衣類", "洋服", "衣服", "服装", "ジャケット", "コート", "ワンピース", "ドレス",
                     "tシャツ", "シャツ", "ズボン", "スカート", "セーター", "パーカー", "ジーンズ", "ブラウス",
                     "靴下", "手袋", "マフラー"],
        "shoes": ["靴", "シューズ", "スニーカー", "ブーツ", "サンダル", "履物"],
        "underwear": ["下着", "ランジェリー", "ブラジャー", "インナーウェア"],
        "jewellery": ["アクセサリー", "ジュエリー", "宝飾品", "ピアス", "イヤリング", "ネックレス",
                      "ブレスレット", "指輪"],
        "final_sale": ["最終セール品", "最終セール", "ファイナルセール"],
    },
}


# fmt: on
@lru_cache(maxsize=16)
def _category_matcher(language: str) -> tuple[re.Pattern[str], dict[str, str]]:
    lex = _CATEGORY_LEXICON.get(language, _CATEGORY_LEXICON["en"])
    entries: list[tuple[str, str]] = []
    for cat, pats in lex.items():
        for p in pats:
            if language in CJK:
                pat = re.escape(p)
                if re.match(f"[{_KATAKANA}]", p):
                    pat = f"(?<![{_KATAKANA}])" + pat
                if re.search(f"[{_KATAKANA}]$", p):
                    pat += f"(?![{_KATAKANA}])"
            else:
                pat = rf"(?<!\w)(?:{p})(?!\w)"
            entries.append((pat, cat))
    entries.sort(key=lambda e: len(re.sub(r"\\w\*|\(\?<?[!=][^)]*\)", "", e[0])), reverse=True)
    groups = {f"k{i}": cat for i, (_, cat) in enumerate(entries)}
    return re.compile("|".join(f"(?P<k{i}>{p})" for i, (p, _) in enumerate(entries))), groups


def categories(text: str, language: str) -> frozenset[str]:
    """Product categories named in the text, as canonical ids (``CATEGORIES``)."""
    pattern, groups = _category_matcher(language)
    return frozenset(groups[m.lastgroup or ""] for m in pattern.finditer(fold(normalize(text))))


# ----------------------------------------------------------------------------------------------------
# Negation

# fmt: off
_NEGATION: dict[str, str] = {
    "en": r"\bnot\b|\bno\b|\bnever\b|\bcannot\b|n't\b|\bnothing\b|\bnone\b|\bnobody\b|\bneither\b|\bnor\b|\bunable\b",
    "es": r"\bno\b|\bnunca\b|\bnada\b|\bningun[oa]?\b|\bningún\b|\bnadie\b|\btampoco\b|\bni\b|\bjamás\b",
    "de": r"\bnicht\b|\bkein(?:e|en|em|er|es)?\b|\bnie\b|\bniemals\b|\bnichts\b|\bniemand\b|\bweder\b|\bnirgends\b",
    "fr": r"\bpas\b|\bjamais\b|\brien\b|\baucune?\b|\bni\b|\bnon\b(?=\s*[,.!?]|$)|\bnulle?\b|\bn(?:e\b|')[^.;:]*?\bplus\b",
    "pt": r"\bnão\b|\bnunca\b|\bnada\b|\bnenhuma?\b|\bninguém\b|\bnem\b|\bjamais\b",
    "zh": r"不(?![仅但同久过断少错管论锈好意])|没|(?<!毫)无(?![论线])|毫无|未(?![来使开拆满])|(?<![南中除])非(?![常洲])|别(?![的人])|勿",
    "ja": r"(?<![少危])ない|ません|不可|不要|対象外|できず|無し|(?<![以])未(?![使開来満])",
}
_NEGATION_EXCEPTIONS: dict[str, str] = {
    "en": r"\bnot only\b|\bno later than\b|\bno matter\b|\bno sooner\b|\bno more than\b|\bno less than\b|\bnot (?:used|worn|opened|washed)\b",
    "es": r"\bno solo\b|\bno sólo\b|\bno solamente\b|\bno más de\b|\bno menos de\b|\bno (?:usad|utilizad|abiert|estrenad|lavad)[oa]s?\b",
    "de": r"\bnicht nur\b|\bnicht mehr als\b|\bnicht weniger als\b|\bnicht (?:benutzt|getragen|geöffnet|gewaschen)\w*",
    "fr": r"\bnon seulement\b|\bpas seulement\b|\bpas plus de\b|\bpas moins de\b|\bnon (?:utilisé|porté|ouvert|lavé|déballé)e?s?\b",
    "pt": r"\bnão só\b|\bnão apenas\b|\bnão somente\b|\bnão mais de\b|\bnão menos de\b|\bnão (?:usad|utilizad|abert|lavad)[oa]s?\b",
    "zh": r"不仅|不但|不超过|不少于|不好意思",
    "ja": r"だけでなく|のみならず",
}
# Conditions are not the main claim: "You can return items if they are not used" is positive.
_CONDITIONAL: dict[str, str] = {
    "en": r"\b(?:if|unless|provided that)\b[^,;:]*",
    "es": r"\b(?:si|salvo que|a menos que|siempre que)\b[^,;:]*",
    "de": r"\b(?:wenn|falls|sofern|sobald)\b[^,;:]*",
    "fr": r"(?:\bsi\b|\bs'ils?\b|\bsauf si\b|\bà moins que\b|\bpourvu que\b)[^,;:]*",
    "pt": r"(?:(?:^|[,;:]\s*)se\b|\bcaso\b|\bdesde que\b|\ba menos que\b)[^,;:]*",
    "zh": r"(?:如果|假如|要是|若|除非)[^，,；;：:。]*",
    "ja": r"^[^、。]*?(?:場合(?:には|は|、)?|ならば|なら|れば)",
}
# fmt: on


def strip_conditions(text: str, language: str) -> str:
    """The text without its conditional clauses ("if ...", "si ...", "...場合は")."""
    t = normalize(text)
    pat = _CONDITIONAL.get(language)
    return re.sub(pat, " ", t) if pat else t


def negated(text: str, language: str) -> bool:
    """Whether the sentence's main claim is negated: a negation cue (not/no/never/cannot/n't,
    no/nunca/nada, nicht/kein/nie, pas/jamais/rien/aucun, não/nunca/nenhum, 不/没/无/未/非,
    ない/ません/不可/対象外) outside conditional clauses and fixed phrases ("not only", "不仅",
    "非洲"). "without"/"sin"/"ohne"/"sans"/"sem" negate a phrase ("unused"), not the claim."""
    t = strip_conditions(text, language)
    exc = _NEGATION_EXCEPTIONS.get(language)
    if exc:
        t = re.sub(exc, " ", t)
    pat = _NEGATION.get(language, _NEGATION["en"])
    return re.search(pat, t) is not None
