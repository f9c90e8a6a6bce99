"""The held-out answer evaluation set (services/chat/evaluation/answers.jsonl) is well formed: its key
facts are exact, distinctive substrings of the article that answers each question in the question's
language, so ``answer_fact_recall`` measures the answer and not the set; every language has enough
answerable questions, angry messages and requests for a person; and no question repeats a dev or eval
question (fast, no servers). The same checks hold, with smaller minimums, for the development answer set
(answers_dev.jsonl) that the answer composer is tuned on, which shares no message with the held-out set."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import pytest
from babel import Locale

from services.chat.knowledge import KNOWLEDGE_DIR, packaged_articles
from services.chat.text import order_ids

EVALUATION = KNOWLEDGE_DIR.parent / "evaluation"
ANSWERS = EVALUATION / "answers.jsonl"
ANSWERS_DEV = EVALUATION / "answers_dev.jsonl"
# Least per language: the held-out set also answers every article in every language; the smaller dev set has
# 5 questions on 5 different articles and asks for a person in every other language.
LEAST = {
    ANSWERS: {"answerable": 15, "return": 2, "problem": 2, "angry": 2, "person": 2},
    ANSWERS_DEV: {"answerable": 7, "return": 1, "problem": 1, "angry": 1, "person": 0},
}
LANGUAGES = ("en", "es", "de", "fr", "pt", "zh", "ja")
ANSWERABLE = ("question", "return", "problem")
HANDOFF = ("angry", "person")
REQUIRED = {"id", "language", "kind", "text", "article", "facts", "handoff"}
OPTIONAL = {"market"}
# Customer messages quoted in issue 17 that the set keeps verbatim on purpose, although the eval set already
# holds the same (or a one-typo) wording: they are the examples that must not reproduce.
ISSUE_EXAMPLES = {"¿Cuánto tarda en llegar un pedido a México?", "i forgot my password and can't log in"}
NEAR_DUPLICATE = 0.9


def _rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


def _iso_countries() -> set[str]:
    """ISO 3166-1 alpha-2 codes from CLDR, less its regions (EU, UN...) and the user-assigned codes."""
    codes = {c for c in Locale("en").territories if len(c) == 2 and c.isalpha()}
    user_assigned = {"AA", "ZZ"} | {f"Q{c}" for c in "MNOPQRSTUVWXYZ"} | {c for c in codes if c[0] == "X"}
    return codes - user_assigned - {"EU", "EZ", "UN"}


@pytest.fixture(scope="module", params=[ANSWERS, ANSWERS_DEV], ids=lambda p: p.stem)
def answer_set(request: pytest.FixtureRequest) -> Path:
    return request.param


@pytest.fixture(scope="module")
def rows(answer_set: Path) -> list[dict[str, Any]]:
    return _rows(answer_set)


@pytest.fixture(scope="module")
def bodies() -> dict[tuple[str, str], str]:
    return {(r.article_id, r.language): r.body for r in packaged_articles()}


def test_ids_unique_and_named_by_language(answer_set: Path, rows: list[dict[str, Any]]) -> None:
    ids = Counter(r["id"] for r in rows)
    assert [i for i, n in ids.items() if n > 1] == []
    letter = "d" if answer_set == ANSWERS_DEV else "a"
    for r in rows:
        assert re.fullmatch(rf"{r['language']}-{letter}\d{{2}}", r["id"]), r["id"]


def test_fields_valid(rows: list[dict[str, Any]]) -> None:
    countries = _iso_countries()
    for r in rows:
        where = r.get("id")
        assert REQUIRED <= r.keys() <= REQUIRED | OPTIONAL, where
        assert r["language"] in LANGUAGES, where
        assert r["kind"] in ANSWERABLE + HANDOFF, where
        assert isinstance(r["text"], str) and r["text"].strip() == r["text"] and r["text"], where
        assert isinstance(r["facts"], list) and all(isinstance(f, str) for f in r["facts"]), where
        if "market" in r:
            assert r["market"] in countries, (where, r["market"])


def test_kind_handoff_article_and_facts_consistent(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        where = r["id"]
        assert r["handoff"] is (r["kind"] in HANDOFF), where
        if r["kind"] in HANDOFF:
            assert r["article"] is None and r["facts"] == [], where
        else:
            assert isinstance(r["article"], str) and 1 <= len(r["facts"]) <= 3, where
            assert len(set(r["facts"])) == len(r["facts"]), where
        if r["kind"] == "return":
            # A return without an order number: the reply must ask for it as well as give the policy.
            assert r["article"] == "returns-refunds" and order_ids(r["text"]) == [], where


def test_each_language_has_enough_of_each_kind(
    answer_set: Path, rows: list[dict[str, Any]], bodies: dict
) -> None:
    articles = {a for a, _ in bodies}
    least = LEAST[answer_set]
    for lang in LANGUAGES:
        mine = [r for r in rows if r["language"] == lang]
        kinds = Counter(r["kind"] for r in mine)
        assert sum(kinds[k] for k in ANSWERABLE) >= least["answerable"], (lang, kinds)
        assert all(kinds[k] >= least[k] for k in ("return", "problem", "angry", "person")), (lang, kinds)
        if answer_set == ANSWERS:
            assert {r["article"] for r in mine if r["article"]} == articles, lang
        else:
            asked = [r["article"] for r in mine if r["kind"] == "question"]
            assert len(asked) >= 5 and len(set(asked)) == len(asked), (lang, asked)
    if answer_set == ANSWERS_DEV:
        assert sum(r["kind"] == "person" for r in rows) >= len(LANGUAGES) // 2


def test_facts_are_distinctive_substrings_of_the_article_in_its_language(
    rows: list[dict[str, Any]], bodies: dict[tuple[str, str], str]
) -> None:
    for r in rows:
        if r["article"] is None:
            continue
        body = bodies.get((r["article"], r["language"]))
        assert body is not None, (r["id"], r["article"], r["language"])
        for fact in r["facts"]:
            assert fact in body, (r["id"], fact)
            # A bare number or range ("6-10", "30") matches anywhere; a fact names its unit or subject.
            assert any(c.isalpha() for c in fact), (r["id"], fact)
            # Echoing the question must not score: the answer has to bring the fact.
            assert fact.casefold() not in r["text"].casefold(), (r["id"], fact)


def test_no_question_repeats_the_dev_or_eval_sets(answer_set: Path, rows: list[dict[str, Any]]) -> None:
    mine = Counter(_norm(r["text"]) for r in rows)
    assert [t for t, n in mine.items() if n > 1] == []
    names = ("dev.jsonl", "eval.jsonl") + (("answers.jsonl",) if answer_set == ANSWERS_DEV else ())
    others = [_norm(o["text"]) for name in names for o in _rows(EVALUATION / name)]
    kept = {r["text"] for r in rows} & ISSUE_EXAMPLES
    assert kept == (ISSUE_EXAMPLES if answer_set == ANSWERS else set())
    for r in rows:
        if r["text"] in ISSUE_EXAMPLES:
            continue
        text = _norm(r["text"])
        close = [o for o in others if SequenceMatcher(None, text, o).ratio() >= NEAR_DUPLICATE]
        assert close == [], (r["id"], close)


def test_dev_answer_set_shares_no_message_with_the_held_out_set() -> None:
    """Tuning on answers_dev.jsonl must never tune on a message of answers.jsonl."""
    held_out = {_norm(r["text"]) for r in _rows(ANSWERS)}
    assert [r["id"] for r in _rows(ANSWERS_DEV) if _norm(r["text"]) in held_out] == []
