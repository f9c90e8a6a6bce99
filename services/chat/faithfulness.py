# ruff: noqa: RUF001, RUF002, SIM905, E501 -- CJK punctuation, word lists as strings and long lexicon lines
# are intended
"""Is a sentence an LLM wrote supported by the evidence it was given? The gate between a rewritten
answer and the customer: a sentence is sent only when ``check`` passes, otherwise the extractive answer
is.

The rules, in order (a failing ``Verdict.reason`` starts with the rule's code):

1. ``number``: every number in the sentence is among the evidence's numbers (the question's are not
   enough: an order id or a date the customer typed is not a fact the shop stated).
2. ``duration``: every (number, unit) pair is in the evidence: "2-month" where it says "2-year" fails.
3. ``country`` / ``category``: every country, region and product category is named in the evidence or
   in the context (the question and the market name).
4. ``name``: every proper name the sentence adds (a capitalised word inside an English, Spanish, French
   or Portuguese sentence, an acronym or CamelCase word in any language, a Latin word in Chinese or
   Japanese) appears in the evidence or the context: "Australian Customs and Border Protection" fails
   on "Border".
5. ``binding``: a number said of a country or category must be stated for it: "Delivery to Mexico
   takes 2-3 business days" fails against the whole shipping table (2-3 is Europe's express time).
6. ``unsupported``: the best cosine similarity to an evidence sentence is at least the calibrated
   threshold (or, with ``entails``, the best entailment probability over the three most similar
   evidence sentences is at least 0.5).
7. ``contradiction``: a clause of the sentence says the opposite of the evidence about the same thing:
   a keyword (or an antonym concept: free/paid, included/excluded, before/after) that the evidence
   clauses about the same countries or categories (or, when there are none, the general clauses) only
   use with the other polarity ("you pay nothing more on delivery" vs "you must pay ... when the
   parcel arrives in the UK"; "you can return most items" vs "no, you cannot return items").
   Polarity is per clause, not per sentence: "the price already includes VAT: you pay nothing more"
   holds both a positive and a negated clause.

An entailment (NLI) model would judge support and contradiction better than similarity and lexicons;
none is available offline in this project's packages, so ``check`` keeps a hook (``entails``) and the
lexicon rule stays on either way. The lexicons and the clause splitting are written here (no package
has them for these 7 languages); they are best effort and tested against the packaged articles.

Which embedding for the checked sentence: e5 ``passage`` (the same side as the evidence vectors),
because the paraphrase pairs are symmetric (a rewritten sentence is a passage, not a question);
``calibrate(..., claim_embedding="query")`` measures the other choice (see the report numbers in the
test module's docstring).
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import facts
from .facts import CJK, fold, normalize

if TYPE_CHECKING:
    from .knowledge import Embedder
    from .store import ArticleRecord

CLAIM_EMBEDDING = "query"

# ----------------------------------------------------------------------------------------------------
# Sentence splitting (streaming)

_LATIN_END = ".!?…"
_CJK_END = "。！？"
_CLOSERS = "\"'”’)]}」』）】»"
_ABBREVIATIONS = frozenset(
    "e.g i.e vs approx mr mrs ms dr st nr z.b d.h u.a bzw ca usw vgl p.ej ej sr sra srta dra núm aprox "
    "p.ex ex cf env mme art incl min max".split()
)
_COMPLETE = re.compile(rf"[{re.escape(_LATIN_END + _CJK_END)}][{re.escape(_CLOSERS)}]*$")


class SentenceSplitter:
    """Splits streamed text into sentences as they complete: after . ! ? … (followed by a space and
    not by a lower-case word), after 。！？, or at a newline. Not split: "1.5", "e.g.", "U.K.", "z. B."
    followed by lower case, a list marker "1." at the start of a sentence; "Account > Orders." ends a
    sentence like any other word. A "." at the very end of the buffer waits for the next delta."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, delta: str) -> list[str]:
        """The sentences completed by this delta (stripped, in order)."""
        self._buf += delta
        out: list[str] = []
        while True:
            cut = self._find(final=False)
            if cut is None:
                return out
            sentence, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            if sentence:
                out.append(sentence)

    def finish(self) -> tuple[str, bool]:
        """The text left at the end of the stream and whether it is a complete sentence (ends in
        terminal punctuation); an answer cut off mid-sentence gives ``("Orders leave ... within", False)``."""
        rest, self._buf = self._buf.strip(), ""
        return rest, (not rest) or _COMPLETE.search(rest) is not None

    def _find(self, final: bool) -> int | None:
        buf, n, i = self._buf, len(self._buf), 0
        while i < n:
            ch = buf[i]
            if ch == "\n":
                return i + 1
            if ch not in _LATIN_END and ch not in _CJK_END:
                i += 1
                continue
            j = i + 1
            while j < n and (buf[j] in _CLOSERS or buf[j] in _LATIN_END or buf[j] in _CJK_END):
                j += 1
            if j == n:
                return n if final else None
            if ch in _CJK_END:
                return j
            if not buf[j].isspace():
                i = j  # "1.5", "U.K.", "e.g.x"
                continue
            k = j
            while k < n and buf[k].isspace() and buf[k] != "\n":
                k += 1
            if k == n:
                return n if final else None  # the next word decides
            if buf[k] == "\n" or not self._joined(buf, i, buf[k]):
                return j
            i = k
        return None

    @staticmethod
    def _joined(buf: str, i: int, nxt: str) -> bool:
        """Whether the terminal at ``i`` does not end the sentence, given the next visible char."""
        if nxt.islower():
            return True  # "e.g. headphones", "¿Olvidaste tu contraseña? en la página"
        if buf[i] != ".":
            return False
        m = re.search(r"(\S+)$", buf[:i])
        word = m.group(1).lstrip("([{\"'«“") if m else ""
        if word.lower() in _ABBREVIATIONS or re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word):
            return True
        return re.fullmatch(r"\s*[-*•]?\s*\d{1,2}", buf[:i]) is not None  # list marker "1."


def split_sentences(text: str) -> list[str]:
    """All sentences of a text (the last one even when it lacks terminal punctuation)."""
    sp = SentenceSplitter()
    out = sp.feed(text)
    rest, _ = sp.finish()
    return [*out, rest] if rest else out


# ----------------------------------------------------------------------------------------------------
# Clauses, keywords and polarity

# fmt: off
_CLAUSE_CONJ = {
    "en": r"and|but|so|or|because|since|as|while|which|whereas|we|you|it|they|this|then|otherwise|if|unless",
    "es": r"y|pero|así que|porque|ya que|o|mientras|lo que|entonces|si|tú|usted|nosotros|se",
    "de": r"und|aber|also|oder|weil|denn|da|sodass|wir|sie|es|dann|sonst|wenn|falls",
    "fr": r"et|mais|donc|ou|car|puisque|nous|vous|il|ils|elle|alors|sinon|si",
    "pt": r"e|mas|então|ou|porque|pois|já que|nós|você|vocês|ele|eles|se|senão|caso",
}
# Conjunctions that start a new clause even without a comma ("... on delivery because the price ...").
_STRONG_CONJ = {
    "en": r"because|but|although|whereas|so that",
    "es": r"porque|pero|aunque|ya que",
    "de": r"weil|aber|obwohl|denn",
    "fr": r"parce que|mais|car|puisque|bien que",
    "pt": r"porque|mas|embora|pois|já que",
}
_STOPWORDS = {
    "en": "the a an and or but if of to in on at for from by with without as is are was were be been being it "
    "its this that these those there here you your yours we our us they their them he she his her i me my do "
    "does did done have has had will would can could may might must shall should also only just more most "
    "other all any some each every such than then so very not which who whom what when where how why into "
    "onto over under up down out about per via within same get gets take takes make made please",
    "es": "el la los las un una unos unas y o u e pero si de del al a en por para con sin sobre entre desde "
    "hasta que se su sus tu tus te le les lo me mi mis nos nuestro nuestra nuestros nuestras es son era esta "
    "estan ser estar ha han hay puede puedes pueden podemos como mas muy ya tambien todo todos toda todas "
    "otro otros otra otras cada este estos estas ese esa esos esas usted ustedes",
    "de": "der die das den dem des ein eine einen einem einer eines und oder aber wenn von zu im in am an auf "
    "fur mit ohne bei aus nach vor uber unter als ist sind war waren sein wird werden kann konnen konnen muss "
    "mussen sie ihr ihre ihren ihrem ihres wir uns unser unsere es er sich auch nur noch schon mehr alle "
    "allen andere anderen jede jeden dieser diese dieses so sehr um bis zum zur vom beim",
    "fr": "le la les l un une des du de d et ou mais si a au aux en dans par pour avec sans sur sous entre que "
    "qui qu se s ce cet cette ces son sa ses vous votre vos nous notre nos il ils elle elles est sont etre "
    "ont peut pouvez pouvons plus tres aussi tout tous toute toutes autre autres chaque y ne n",
    "pt": "o a os as um uma uns umas e ou mas se de do da dos das ao aos em no na nos nas por pelo pela para "
    "com sem sobre entre que e sao ser estar esta estao foi pode podem podemos seu sua seus suas voce voces "
    "nos nosso nossa ele ela eles elas lhe mais muito tambem todo todos toda todas outro outros outra outras "
    "cada este esta esse essa isso",
}
_STOP = {lang: frozenset(fold(w) for w in words.split()) for lang, words in _STOPWORDS.items()}
_NEGATION_WORDS = frozenset(
    fold(w)
    for w in "not no never cannot nothing none nobody neither nor unable nunca nada ningun ninguno ninguna "
    "nadie tampoco ni jamas nicht kein keine keinen keinem keiner keines nie niemals nichts niemand weder "
    "pas jamais rien aucun aucune non nul nulle nao nenhum nenhuma ninguem nem".split()
)
# Antonym concepts: (concept, sign) where sign "-" is the negative member ("free" is "not paid").
_CONCEPTS: dict[str, list[tuple[str, str, str]]] = {
    "en": [
        ("@cost", "-", r"free of charge|at no (?:extra )?cost|no charge|free|complimentary"),
        ("@cost", "+", r"pay|pays|paying|paid|charged?|charges|fees?|costs?"),
        ("@incl", "+", r"includ(?:e|es|ed|ing)"),
        ("@incl", "-", r"exclud(?:e|es|ed|ing)"),
        ("@order", "-", r"before"),
        ("@order", "+", r"after"),
    ],
    "es": [
        ("@cost", "-", r"gratis|gratuit[oa]s?|sin (?:coste|costo|cargo)s?"),
        ("@cost", "+", r"pag(?:ar|as|a|an|ado|ada|ados|adas|amos|ue|ues)|cobr(?:ar|a|an|as|ado|ada|amos)|costes?|costos?"),
        ("@incl", "+", r"incluy(?:e|en)|incluid[oa]s?|incluir"),
        ("@incl", "-", r"excluid[oa]s?|excluy(?:e|en)"),
        ("@order", "-", r"antes"),
        ("@order", "+", r"despues|tras"),
    ],
    "de": [
        ("@cost", "-", r"kostenlos|kostenfrei|gratis|gebuhrenfrei|umsonst"),
        ("@cost", "+", r"(?:be)?zahl(?:en|t|st|te|ten)|gebuhr(?:en)?|tragt|tragen"),
        ("@incl", "+", r"enthalt(?:en)?|inklusive|inbegriffen|einschliesslich"),
        ("@incl", "-", r"ausgeschlossen|exklusive|zuzuglich"),
        ("@order", "-", r"bevor|vorher|vor (?:der|dem)"),
        ("@order", "+", r"nachdem|danach|nach (?:der|dem)"),
    ],
    "fr": [
        ("@cost", "-", r"gratuit(?:e|s|es|ement)?|offert(?:e|s|es)?|sans frais"),
        ("@cost", "+", r"pa[yi](?:er|ez|e|ent|ons|ee|es|ees)|payant(?:e|s|es)?|frais|facture(?:e|s|es)?|a la charge"),
        ("@incl", "+", r"inclu(?:s|t|e|es|ent)?|compris(?:e|es)?"),
        ("@incl", "-", r"exclu(?:s|e|es|t)?"),
        ("@order", "-", r"avant"),
        ("@order", "+", r"apres"),
    ],
    "pt": [
        ("@cost", "-", r"gratis|gratuit[oa]s?|sem custo|de graca"),
        ("@cost", "+", r"pag(?:ar|a|am|as|o|ou|amos|ue)|cobr(?:ar|a|am|ado|ados|ada|adas)|custos?"),
        ("@incl", "+", r"inclu(?:i|em|ido|ida|idos|idas|ir)"),
        ("@incl", "-", r"exclu(?:i|em|ido|ida|idos|idas)"),
        ("@order", "-", r"antes"),
        ("@order", "+", r"depois|apos"),
    ],
    "zh": [
        ("@cost", "-", r"免费|包邮|免[^，。；,;]{0,4}?运?费"),
        ("@cost", "+", r"付款|支付(?!方式)|付|收取|收费|承担|费用|运费"),
        ("@incl", "+", r"包含|包括|含有|已含|含"),
        ("@order", "-", r"之前|以前|提前"),
        ("@order", "+", r"之后|以后"),
    ],
    "ja": [
        ("@cost", "-", r"無料"),
        ("@cost", "+", r"(?:お)?支払(?!い?(?:時|方法|画面))(?:い|う|って)?|(?<!支)払(?!い?(?:時|方法|画面))(?:う|い|って)?|負担|請求|有料|料金|送料"),
        ("@incl", "+", r"含ま|含む|含み|込み"),
        ("@order", "-", r"前に|以前|までに"),
        ("@order", "+", r"後に|以降|のあと"),
    ],
}
_ZH_STOP_CHARS = set("的了是在和或与及会将把被从由向对为您我你他们请可以能要这那其此该等也都就还再更已并且时中上下内外个些每各")
_NEG_CHARS = set("不没无未非别勿")
# fmt: on
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


@dataclass(frozen=True)
class Clause:
    text: str
    entities: frozenset[str]  # countries, regions and categories named in the clause itself
    scope: frozenset[str]  # its own, else those of its sentence part (up to ";")
    negated: bool
    keys: dict[str, frozenset[bool]]  # keyword or concept -> polarities (True: negative)
    numbers: frozenset[str]


def _split_units(sentence: str) -> list[str]:
    """Parts of a sentence between semicolons: "2-year warranty; all other products 1-year"."""
    return [u for u in re.split(r"\s*[;；]\s*", sentence) if u.strip()]


def _split_clauses(unit: str, language: str) -> list[str]:
    if language in CJK:
        seps = r"[，,：:、]|(?<=ので)|(?<=から)" if language == "ja" else r"[，,：:]|(?=因为|但是|所以|因此)"
        parts = re.split(seps, unit)
        min_len = 6
    else:
        conj = _CLAUSE_CONJ.get(language, _CLAUSE_CONJ["en"])
        strong = _STRONG_CONJ.get(language, _STRONG_CONJ["en"])
        parts = re.split(rf"\s*:\s+|,\s+(?=(?:{conj})\b)|\s+(?=(?:{strong})\b)", unit, flags=re.IGNORECASE)
        min_len = 12
    if language == "ja":  # "ほとんどの商品は、…": a topic or object before "、" belongs to what follows
        joined: list[str] = []
        for p in parts:
            if joined and re.search(r"[はがをにもでとへや]$", joined[-1]):
                joined[-1] += "、" + p
            else:
                joined.append(p)
        parts = joined
    merged: list[str] = []
    carry = ""
    for p in parts:
        p = (carry + ("" if language in CJK or not carry else ", ") + p.strip()) if carry else p.strip()
        if len(p) < min_len:
            carry = p  # a list item or "No": read it with the next part
            continue
        carry = ""
        merged.append(p)
    if carry:
        if merged:
            merged[-1] = merged[-1] + ("" if language in CJK else ", ") + carry
        else:
            merged.append(carry)
    return merged


def _entities(text: str, language: str) -> frozenset[str]:
    return facts.countries(text, language) | facts.categories(text, language)


def _keys(text: str, language: str, neg: bool) -> dict[str, frozenset[bool]]:
    t = fold(facts.strip_conditions(text, language))
    found: dict[str, set[bool]] = {}
    for concept, sign, pat in _CONCEPTS.get(language, _CONCEPTS["en"]):
        rx = re.compile(pat if language in CJK else rf"(?<!\w)(?:{pat})(?!\w)")
        if rx.search(t):
            found.setdefault(concept, set()).add(neg != (sign == "-"))
        t = rx.sub(" ", t)
    if language in CJK:
        if language == "zh":
            runs = re.findall(r"[\u4e00-\u9fff]+", t)
            skip = _ZH_STOP_CHARS | _NEG_CHARS
        else:
            runs = re.findall(r"[\u4e00-\u9fff]+|[ァ-ヺー]+", t)
            skip = _NEG_CHARS
        for run in runs:
            for a, b in itertools.pairwise(run):
                if a not in skip and b not in skip:
                    found.setdefault(a + b, set()).add(neg)
    else:
        stop = _STOP.get(language, _STOP["en"])
        numberish = set(facts._WORDS.get(language, {})) | set(facts._AMBIGUOUS.get(language, {}))
        for w in _WORD.findall(t):
            w = w.split("'")[-1] if "'" in w and language == "fr" else w.split("'")[0]
            if len(w) < 3 or w in stop or w in _NEGATION_WORDS or w in numberish or w.endswith("n't"):
                continue
            found.setdefault(w[:5], set()).add(neg)
    return {k: frozenset(v) for k, v in found.items()}


def clauses(sentence: str, language: str) -> list[Clause]:
    """The clauses of a sentence with their entities, polarity and keywords."""
    out: list[Clause] = []
    for unit in _split_units(sentence):
        unit_entities = _entities(unit, language)
        for text in _split_clauses(unit, language):
            own = _entities(text, language)
            neg = facts.negated(text, language)
            out.append(
                Clause(
                    text,
                    own,
                    own or unit_entities,
                    neg,
                    _keys(text, language, neg),
                    facts.numbers(text, language),
                )
            )
    return out


# ----------------------------------------------------------------------------------------------------
# Evidence and the check


@dataclass(frozen=True)
class SentenceFacts:
    numbers: frozenset[str]
    durations: frozenset[tuple[str, str]]
    countries: frozenset[str]
    categories: frozenset[str]
    units: tuple[tuple[frozenset[str], frozenset[str]], ...]  # (entities, numbers) per ";" part
    clauses: tuple[Clause, ...]


def sentence_facts(sentence: str, language: str) -> SentenceFacts:
    units = tuple((_entities(u, language), facts.numbers(u, language)) for u in _split_units(sentence))
    return SentenceFacts(
        facts.numbers(sentence, language),
        facts.durations(sentence, language),
        facts.countries(sentence, language),
        facts.categories(sentence, language),
        units,
        tuple(clauses(sentence, language)),
    )


def _vocabulary(texts: Iterable[str]) -> frozenset[str]:
    words: set[str] = set()
    for t in texts:
        words.update(w for w in re.findall(r"[^\W_]+", fold(normalize(t))))
    return frozenset(words)


@dataclass(frozen=True, eq=False)
class Evidence:
    """The passage an LLM was given to rephrase, with its facts computed once."""

    sentences: tuple[str, ...]
    language: str
    vectors: np.ndarray
    facts: tuple[SentenceFacts, ...]
    numbers: frozenset[str]
    durations: frozenset[tuple[str, str]]
    countries: frozenset[str]  # evidence and context
    categories: frozenset[str]  # evidence and context
    evidence_entities: frozenset[str]  # countries and categories of the evidence alone
    vocabulary: frozenset[str]
    context: str = ""
    clauses: tuple[tuple[int, Clause], ...] = field(default=())

    @classmethod
    def build(
        cls,
        sentences: Sequence[str],
        language: str,
        vectors: np.ndarray,
        context: str = "",
        markets: Iterable[str] = (),
    ) -> Evidence:
        """``sentences``: the evidence sentences; ``vectors``: their e5 passage vectors (normalised);
        ``context``: the customer's question and market name, whose countries, categories and names
        are allowed in the answer (its numbers are not); ``markets``: ISO codes allowed as well (the
        request's market, which a bare code in ``context`` would not reliably name)."""
        vectors = (
            np.asarray(vectors, dtype=np.float32).reshape(len(sentences), -1)
            if len(sentences)
            else np.zeros((0, 1), dtype=np.float32)
        )
        per = tuple(sentence_facts(s, language) for s in sentences)
        ctx_countries = facts.countries(context, language) if context else frozenset()
        ctx_countries |= {m.upper() for m in markets if m}
        ctx_categories = facts.categories(context, language) if context else frozenset()
        ev_countries = frozenset().union(*(f.countries for f in per)) if per else frozenset()
        ev_categories = frozenset().union(*(f.categories for f in per)) if per else frozenset()
        return cls(
            sentences=tuple(sentences),
            language=language,
            vectors=vectors,
            facts=per,
            numbers=frozenset().union(*(f.numbers for f in per)) if per else frozenset(),
            durations=frozenset().union(*(f.durations for f in per)) if per else frozenset(),
            countries=ev_countries | ctx_countries,
            categories=ev_categories | ctx_categories,
            evidence_entities=ev_countries | ev_categories,
            vocabulary=_vocabulary([*sentences, context]),
            context=context,
            clauses=tuple((i, c) for i, f in enumerate(per) for c in f.clauses),
        )


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # "ok" or "<rule>: <detail>"
    support: float  # best similarity (or entailment probability) to an evidence sentence
    evidence_index: int  # that sentence, -1 when none

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


_MONTH_DAY_NAMES = frozenset(
    "january february march april may june july august september october november december monday tuesday "
    "wednesday thursday friday saturday sunday i ok".split()
)


def _names(sentence: str, language: str) -> list[str]:
    """Words that name something: see rule 4 in the module docstring."""
    text = unicodedata.normalize("NFKC", sentence)
    out = []
    first = True
    for m in re.finditer(r"[^\W\d_][\w'&-]*", text):
        w = m.group()
        latin = all(ord(c) < 0x250 for c in w if c.isalpha())
        if not latin:
            first = False
            continue
        before = text[: m.start()].rstrip()
        initial = first or before.endswith((".", "!", "?", ":", "-", "•", "*", '"', "“", "«", "¿", "¡"))
        first = False
        caps_inside = any(c.isupper() for c in w[1:])
        if language in CJK:
            out.append(w)
        elif caps_inside and sum(c.isupper() for c in w) >= 2:
            out.append(w)  # acronym or CamelCase: "CBP", "PayPal"
        elif language != "de" and w[0].isupper() and not initial:
            out.append(w)
    return out


def _fmt(values: Iterable[object]) -> str:
    return ", ".join(sorted(str(v) for v in values))


def _snippet(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def check(
    sentence: str,
    vector: np.ndarray,
    evidence: Evidence,
    threshold: float,
    entails: Callable[[str, str], float] | None = None,
    complete: bool = True,
) -> Verdict:
    """Whether one generated sentence may be sent. ``vector``: its e5 ``CLAIM_EMBEDDING`` vector;
    ``threshold``: from ``calibrate``; ``entails(premise, hypothesis) -> probability``: an optional
    entailment model used for rule 6; ``complete=False`` (from ``SentenceSplitter.finish``) rejects a
    sentence the stream left unfinished."""
    lang = evidence.language
    if not complete:
        return Verdict(False, f"incomplete: the sentence was cut off: {_snippet(sentence)!r}", 0.0, -1)
    if not re.search(r"[^\W_]", sentence):
        return Verdict(True, "ok", 1.0, -1)
    sims = (
        evidence.vectors @ np.asarray(vector, dtype=np.float32).reshape(-1)
        if evidence.sentences
        else np.zeros(0)
    )
    best = int(np.argmax(sims)) if len(sims) else -1
    best_sim = float(sims[best]) if best >= 0 else 0.0

    def fail(reason: str, index: int = best, support: float = best_sim) -> Verdict:
        return Verdict(False, reason, support, index)

    sf = sentence_facts(sentence, lang)
    missing = sf.numbers - evidence.numbers
    if missing:
        return fail(f"number: {_fmt(missing)} not in the evidence")
    missing_d = sf.durations - evidence.durations
    if missing_d:
        said = _fmt(f"{n} {u}" for n, u in missing_d)
        return fail(f"duration: {said} not in the evidence")
    missing = sf.countries - evidence.countries
    if missing:
        return fail(f"country: {_fmt(missing)} named neither in the evidence nor in the question")
    missing = sf.categories - evidence.categories
    if missing:
        return fail(f"category: {_fmt(missing)} named neither in the evidence nor in the question")
    for name in _names(sentence, lang):
        if facts.countries(name, lang):
            continue  # "UK" for "United Kingdom": the country rule has checked it
        parts = [p for p in re.findall(r"[^\W_]+", fold(normalize(name))) if p]
        if not all(p in evidence.vocabulary or p in _MONTH_DAY_NAMES for p in parts):
            return fail(f"name: {name!r} appears neither in the evidence nor in the question")
    binding = _binding(sentence, lang, evidence)
    if binding:
        return fail(binding)
    if entails is not None and evidence.sentences:
        top = [int(i) for i in np.argsort(-sims)[:3]]
        probs = [(float(entails(evidence.sentences[i], sentence)), i) for i in top]
        p, idx = max(probs)
        if p < 0.5:
            return fail(f"unsupported: no evidence sentence entails it (best {p:.2f})", idx, p)
        best, best_sim = idx, p
    elif best_sim < threshold:
        near = _snippet(evidence.sentences[best]) if best >= 0 else ""
        return fail(f"unsupported: best similarity {best_sim:.3f} < {threshold:.3f} ({near!r})")
    conflict = _contradiction(sf.clauses, evidence)
    if conflict:
        reason, index = conflict
        return fail(reason, index)
    return Verdict(True, "ok", best_sim, best)


def _binding(sentence: str, language: str, evidence: Evidence) -> str | None:
    for c in clauses(sentence, language):
        named = c.entities & evidence.evidence_entities
        if not named or not c.numbers:
            continue
        stated: set[str] = set()
        found = False
        for f in evidence.facts:
            for ents, nums in f.units:
                if ents & named:
                    found = True
                    stated |= nums
        missing = c.numbers - stated
        if found and missing:
            return f"binding: {_fmt(missing)} not stated for {_fmt(named)} in the evidence"
    return None


def _contradiction(claim: Sequence[Clause], evidence: Evidence) -> tuple[str, int] | None:
    general = [(i, e) for i, e in evidence.clauses if not e.scope]
    for c in claim:
        if not c.keys:
            continue
        cands = [(i, e) for i, e in evidence.clauses if e.scope & c.scope] if c.scope else []
        if not cands:
            cands = general
        for key, pols in c.keys.items():
            seen = [(i, e) for i, e in cands if key in e.keys]
            ev_pols = frozenset().union(*(e.keys[key] for _, e in seen)) if seen else frozenset()
            if ev_pols and not (ev_pols & pols):
                i, e = seen[0]
                said = "negative" if True in pols else "positive"
                return (
                    f"contradiction: {key!r} is {said} in {_snippet(c.text, 50)!r} but not in evidence "
                    f"{_snippet(e.text, 60)!r}",
                    i,
                )
    return None


# ----------------------------------------------------------------------------------------------------
# Calibration


def _paraphrases(sentence: str, language: str) -> list[str]:
    """Cheap same-language paraphrases that keep the meaning of (part of) a sentence: list marker and
    parentheses removed, a lead-in phrase dropped, each half of a sentence cut at ; or :."""
    out: list[str] = []
    s = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", sentence).strip()
    no_paren = re.sub(r"\s*[(（][^)）]*[)）]", "", s).strip()
    if no_paren != s:
        out.append(no_paren)
    comma = "，" if language in CJK else ", "
    head, sep, tail = s.partition(comma)
    if sep and len(head) <= 0.4 * len(s) and len(tail) >= 12:
        out.append(tail[0].upper() + tail[1:] if language not in CJK else tail)
    for part in re.split(r"\s*[;；:：]\s*", s):
        if part != s and len(part) >= (8 if language in CJK else 20):
            out.append(part)
    min_len = 6 if language in CJK else 15
    return [p for p in dict.fromkeys(out) if p != sentence and len(p) >= min_len]


def calibrate(
    articles: Sequence[ArticleRecord],
    embedder: Embedder,
    claim_embedding: str = CLAIM_EMBEDDING,
    min_recall: float | None = None,
) -> dict[str, object]:
    """The support threshold from the knowledge base itself (runs at training time).

    Positives (pairs that must pass): aligned translations of one article's sentences (an article's
    translation is aligned with the English one only when both split into the same number of
    sentences, and a pair only when both sentences give the same numbers), each direction; and cheap
    same-language paraphrases (``_paraphrases``) against their sentence. Hard negatives: other
    sentences of the same article (same language, and across the aligned translations); easy
    negatives: sentences of other articles in the same language. The threshold maximises balanced
    accuracy between positives and hard negatives (or is the highest with ``min_recall`` of the
    positives passing); accuracy on easy negatives is reported too."""
    by_article: dict[str, dict[str, list[str]]] = {}
    for a in articles:
        by_article.setdefault(a.article_id, {})[a.language] = split_sentences(a.body)
    keys = [
        (aid, lang, i)
        for aid, langs in by_article.items()
        for lang, ss in langs.items()
        for i in range(len(ss))
    ]
    texts = [by_article[aid][lang][i] for aid, lang, i in keys]
    index = {k: n for n, k in enumerate(keys)}
    ev = np.asarray(embedder.passage(texts), dtype=np.float32)
    embed = embedder.passage if claim_embedding == "passage" else embedder.query
    claims = ev if claim_embedding == "passage" else np.asarray(embed(texts), dtype=np.float32)

    para_src: list[int] = []
    para_texts: list[str] = []
    for n, (_, lang, _) in enumerate(keys):
        for p in _paraphrases(texts[n], lang):
            para_src.append(n)
            para_texts.append(p)
    para = np.asarray(embed(para_texts), dtype=np.float32) if para_texts else np.zeros((0, ev.shape[1]))

    pos_cross: list[float] = []
    pos_para: list[float] = []
    hard: list[float] = []
    easy: list[float] = []
    for k, src in enumerate(para_src):
        aid, lang, i = keys[src]
        pos_para.append(float(para[k] @ ev[src]))
        for j in range(len(by_article[aid][lang])):
            if j != i:
                hard.append(float(para[k] @ ev[index[(aid, lang, j)]]))
    for aid, langs in by_article.items():
        en = langs.get("en")
        for lang, ss in langs.items():
            for i in range(len(ss)):
                a = index[(aid, lang, i)]
                for j in range(len(ss)):
                    if j != i:
                        hard.append(float(claims[a] @ ev[index[(aid, lang, j)]]))
                for other, olangs in by_article.items():
                    if other != aid and lang in olangs:
                        for j in range(len(olangs[lang])):
                            easy.append(float(claims[a] @ ev[index[(other, lang, j)]]))
            if lang == "en" or en is None or len(en) != len(ss):
                continue
            for i in range(len(ss)):
                x, e = index[(aid, lang, i)], index[(aid, "en", i)]
                if facts.numbers(ss[i], lang) == facts.numbers(en[i], "en"):
                    pos_cross += [float(claims[x] @ ev[e]), float(claims[e] @ ev[x])]
                for j in range(len(ss)):
                    if j != i:
                        ej = index[(aid, "en", j)]
                        hard += [float(claims[x] @ ev[ej]), float(claims[ej] @ ev[x])]
    pos = np.asarray(pos_cross + pos_para)
    hard_a, easy_a = np.asarray(hard), np.asarray(easy)
    candidates = np.unique(np.concatenate([pos, hard_a]))
    best_t, best_ba = float(candidates[0]), -1.0
    for t in candidates:
        tpr = float(np.mean(pos >= t))
        tnr = float(np.mean(hard_a < t))
        if min_recall is not None:
            if tpr >= min_recall:
                best_t, best_ba = float(t), (tpr + tnr) / 2
            continue
        if (tpr + tnr) / 2 > best_ba:
            best_t, best_ba = float(t), (tpr + tnr) / 2
    t = best_t
    tpr = float(np.mean(pos >= t))
    tnr_hard = float(np.mean(hard_a < t))
    tnr_easy = float(np.mean(easy_a < t)) if len(easy_a) else 1.0
    negatives = np.concatenate([hard_a, easy_a])
    return {
        "threshold": round(t, 4),
        "claim_embedding": claim_embedding,
        "positives": len(pos),
        "positives_cross_language": len(pos_cross),
        "positives_paraphrase": len(pos_para),
        "hard_negatives": len(hard_a),
        "easy_negatives": len(easy_a),
        "true_positive_rate": round(tpr, 4),
        "true_positive_rate_cross_language": round(float(np.mean(np.asarray(pos_cross) >= t)), 4),
        "true_positive_rate_paraphrase": round(float(np.mean(np.asarray(pos_para) >= t)), 4),
        "true_negative_rate_hard": round(tnr_hard, 4),
        "true_negative_rate_easy": round(tnr_easy, 4),
        "balanced_accuracy": round((tpr + tnr_hard) / 2, 4),
        "balanced_accuracy_all_negatives": round((tpr + float(np.mean(negatives < t))) / 2, 4),
    }
