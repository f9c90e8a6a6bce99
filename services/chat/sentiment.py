# ruff: noqa: RUF001 -- CJK sentence punctuation is intended
"""Is the customer angry? Asks the sentiment service (``cbec.sentiment.v1.SentimentService``) with a
short deadline and falls back to a small multilingual lexicon when it fails, so a sentiment outage
fails no conversation and slows few: after ``CBEC_BREAKER_FAILURE_THRESHOLD`` failures in a row the
runtime's circuit breaker stops asking it for ``CBEC_BREAKER_OPEN_S``, then lets one trial call through.

A negative message is not an angry one: "I forgot my password and can't log in" is a problem, and the
sentiment model scores it 0.76 negative. So the service's score hands off only when the wording agrees
(an anger word or phrase: profanity, a threat, a repeated complaint; repeated exclamation marks,
shouting); wording that is angry enough on its own (two such signals) hands off whatever the score.
With the wording as the gate, the score's bar is 0.6: on the answer development set every angry
message scored 0.62-0.91 negative, and calm problems up to 0.62 are kept out by their wording.

The channel is the one every service-to-service call uses (``services/runtime/channel.py``): TLS or
mTLS per ``CBEC_BACKEND_TLS_*``, round robin over the sentiment pods, retries of what the contract
declares idempotent, the request id and trace context of the conversation; and the internal token
(``CBEC_INTERNAL_TOKEN_FILE``) on every call.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import grpc
from cbec.sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc

from services.runtime.access import caller, identity_metadata, read_token
from services.runtime.breaker import CircuitOpen
from services.runtime.channel import circuit_breaker, client_channel
from services.runtime.config import RuntimeSettings

log = logging.getLogger("cbec.chat.sentiment")

# Words that signal anger or a formal complaint, per language (project-written, small on purpose).
ANGER_WORDS = {
    "en": "worst terrible awful horrible unacceptable ridiculous scam fraud furious angry disgusting "
    "useless outrageous pathetic disgrace complain",
    "es": "peor horrible terrible inaceptable vergüenza estafa harto harta furioso enfadado ridículo "
    "pésimo indignante queja",
    "de": "schlimmste schrecklich unverschämt frechheit betrug wütend ärgerlich inakzeptabel "
    "katastrophe zumutung lächerlich verärgert beschwerde verbraucherzentrale",
    "fr": "pire horrible inadmissible inacceptable arnaque honte furieux scandale nul ridicule "
    "lamentable plainte énervé",
    "pt": "pior horrível absurdo inaceitável vergonha golpe irritado péssimo ridículo palhaçada "
    "raiva revoltado reclamação",
    "zh": "太过分 生气 垃圾 骗子 最差 投诉 愤怒 气死 差劲 太差",
    "ja": "最悪 ひどい ふざけ 怒 詐欺 許せない 苦情 腹が立 ありえない",
}
# Profanity, threats (lawyers, chargebacks, public reviews) and repeated complaints, matched as
# substrings of the lower-cased message: a plain problem ("I forgot my password") has none of them.
ANGER_PHRASES = {
    "en": "fuck|shit|crap|damn|wtf|bullshit|lawyer|sue you|lawsuit|chargeback|charge back|report you|"
    "trading standards|bad review|third time|fourth time|again and again|still nothing|still no answer|"
    "nobody answers|no one answers|sick of|fed up|had enough|never again|rip off|ripoff|rip-off",
    "es": "mierda|joder|carajo|coño|abogado|denunciar|denuncia|demandar|reclamación formal|"
    "mala reseña|tercera vez|cuarta vez|una y otra vez|nadie responde|nadie contesta|"
    "ya estoy harto|estoy harta|nunca más|tomadura de pelo",
    "de": "scheiße|scheisse|verdammt|mist|anwalt|verklagen|anzeige|rückbuchung|schlechte bewertung|"
    "zum dritten mal|zum vierten mal|schon wieder|niemand antwortet|die nase voll|"
    "nie wieder|abzocke|das letzte",
    "fr": "merde|putain|bordel|avocat|porter plainte|poursuivre en justice|rétrofacturation|"
    "mauvais avis|troisième fois|quatrième fois|personne ne répond|j'en ai marre|"
    "ras-le-bol|plus jamais|arnaqué",
    "pt": "merda|porra|caralho|advogado|processar|procon|reclame aqui|estorno|avaliação negativa|"
    "terceira vez|quarta vez|ninguém responde|estou farto|estou farta|cansado de|"
    "cansada de|nunca mais",
    "zh": "他妈|妈的|律师|起诉|曝光|差评|第三次|一次又一次|没人回复|没人理|受够了|再也不",
    "ja": "クソ|くそ|弁護士|訴え|消費者センター|悪い評価|レビューに書|三回目|3回目|何度言|誰も返事|"
    "もう二度と|うんざり|いい加減にし",
}
_WORDS = {w for words in ANGER_WORDS.values() for w in words.split()}
_PHRASES = {x for phrases in ANGER_PHRASES.values() for x in phrases.split("|")}
_CJK_WORDS = [w for w in _WORDS if not w.isascii() and re.search(r"[\u3040-\u9fff]", w)]


@dataclass(frozen=True)
class Mood:
    angry: bool
    negative: float  # 0..1: the service's negative probability, or the wording's score without it
    source: str  # "sentiment-service" | "heuristic"
    wording: float = 0.0  # 0..1: anger signals in the words themselves (heuristic_negativity)


def _phrase_in(phrase: str, lowered: str) -> bool:
    """Latin-script phrases match at word boundaries ("mist" is not "mistake"); CJK ones anywhere."""
    if not phrase.isascii() and re.search(r"[\u3040-\u9fff]", phrase):
        return phrase in lowered
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", lowered) is not None


def heuristic_negativity(text: str) -> float:
    """0..1 from anger words and phrases (profanity, threats, repeated complaints), repeated
    exclamation marks and shouting (capital letters)."""
    lowered = text.lower()
    words = set(re.findall(r"\w+", lowered))
    hits = sum(1 for w in _WORDS if w.isascii() and w in words)
    hits += sum(1 for w in _WORDS if not w.isascii() and not re.search(r"[\u3040-\u9fff]", w) and w in words)
    hits += sum(1 for w in _CJK_WORDS if w in text)
    hits += sum(1 for x in _PHRASES if _phrase_in(x, lowered))
    letters = [c for c in text if c.isalpha() and c.isascii()]
    caps = sum(1 for c in letters if c.isupper()) / len(letters) if len(letters) >= 12 else 0.0
    score = 0.4 * hits + (0.15 if "!!" in text or "！" in text else 0.0) + (0.3 if caps > 0.6 else 0.0)
    return min(score, 1.0)


SERVICE = sentiment_pb2.DESCRIPTOR.services_by_name["SentimentService"].full_name


class SentimentClient:
    def __init__(
        self,
        address: str,
        timeout_s: float,
        angry_threshold: float = 0.6,
        heuristic_threshold: float = 0.4,
        settings: RuntimeSettings | None = None,
        strong_wording: float = 0.8,
    ) -> None:
        """``settings``: the service's own, for the channel (TLS, retries), the breaker and the token;
        None: the runtime's defaults."""
        self.address = address
        self.settings = settings
        token_file = settings.internal_token_file if settings is not None else None
        self._token = read_token(token_file) if token_file is not None else None
        self.timeout_s = timeout_s
        self.angry_threshold = angry_threshold
        self.heuristic_threshold = heuristic_threshold
        self.strong_wording = strong_wording
        self._channel: grpc.aio.Channel | None = None
        self._stub: sentiment_pb2_grpc.SentimentServiceStub | None = None
        self.breaker = circuit_breaker("sentiment", settings)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _stub_now(self) -> sentiment_pb2_grpc.SentimentServiceStub:
        if self._stub is None:
            self._channel = client_channel(self.address, self.settings, (SERVICE,))
            self._stub = sentiment_pb2_grpc.SentimentServiceStub(self._channel)
        return self._stub

    async def mood(self, text: str) -> Mood:
        """The service's judgement when it answers; the wording alone when it fails or its breaker is open."""
        wording = heuristic_negativity(text)
        if self.address:
            who = caller()
            try:
                async with self.breaker.guard(who.principal):
                    response = await self._stub_now().Analyze(
                        sentiment_pb2.AnalyzeRequest(texts=[sentiment_pb2.TextInput(id="m", text=text)]),
                        timeout=self.timeout_s,
                        metadata=identity_metadata(self._token, who.user, "chat"),
                    )
                if response.results:
                    negative = float(response.results[0].probabilities.negative)
                    agree = negative >= self.angry_threshold and wording > 0
                    angry = agree or wording >= self.strong_wording
                    return Mood(angry, negative, "sentiment-service", wording)
            except CircuitOpen:
                pass  # failing lately: not asked until the breaker lets a trial call through
            except grpc.aio.AioRpcError as exc:
                log.info("sentiment service failed (%s); using the local heuristic", exc.code().name)
        return Mood(wording >= self.heuristic_threshold, wording, "heuristic", wording)
