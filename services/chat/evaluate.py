"""Retrieval and intent quality on a labelled question set (the development set while tuning, the
evaluation set only in the benchmark)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import facts
from .index import HybridIndex, RetrievalParams
from .intent import IntentModel
from .knowledge import Embedder
from .text import LanguageDetector, mask_pii, order_ids

EVALUATION_DIR = Path(__file__).resolve().parent / "evaluation"
DEV_FILE = EVALUATION_DIR / "dev.jsonl"
EVAL_FILE = EVALUATION_DIR / "eval.jsonl"


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    language: str
    intent: str
    article: str | None


def load_questions(path: Path) -> list[Question]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(Question(r["id"], r["text"], r["language"], r["intent"], r.get("article")))
    return out


def embed_questions(embedder: Embedder, questions: Sequence[Question], batch: int = 16) -> np.ndarray:
    texts = [mask_pii(q.text) for q in questions]
    parts = [embedder.query(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)


def evaluate(
    questions: Sequence[Question],
    vectors: np.ndarray,
    index: HybridIndex,
    retrieval: RetrievalParams,
    intent_model: IntentModel,
    detector: LanguageDetector | None = None,
) -> dict[str, Any]:
    """retrieval_top1/top3 (over questions labelled with an article), intent_accuracy, language-id
    accuracy, each overall and per language, plus every prediction."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    predictions = []
    for q, vec in zip(questions, vectors, strict=True):
        masked = mask_pii(q.text)
        found = index.search(vec, masked, retrieval, k=3)
        ranked = [h.article_id for h in found.hits]
        result = intent_model.predict(vec, found, bool(order_ids(q.text)))
        row: dict[str, Any] = {
            "id": q.id,
            "language": q.language,
            "intent": q.intent,
            "predicted_intent": result.intent,
            "intent_confidence": round(result.confidence, 4),
            "true_intent_probability": round(result.scores.get(q.intent, 0.0), 6),
            "article": q.article,
            "retrieved": ranked,
        }
        for key in ("all", q.language):
            groups[key]["intent_accuracy"].append(float(result.intent == q.intent))
            if q.article is not None:
                groups[key]["retrieval_top1"].append(float(ranked[:1] == [q.article]))
                groups[key]["retrieval_top3"].append(float(q.article in ranked[:3]))
        if detector is not None:
            detected = detector.detect(masked).code
            row["detected_language"] = detected
            for key in ("all", q.language):
                groups[key]["language_id_accuracy"].append(float(detected == q.language))
        predictions.append(row)
    summary: dict[str, Any] = {
        name: round(float(np.mean(vals)), 4) for name, vals in groups["all"].items() if vals
    }
    summary["questions"] = len(questions)
    summary["per_language"] = {
        lang: {name: round(float(np.mean(vals)), 4) for name, vals in metrics.items() if vals}
        | {"questions": len(metrics["intent_accuracy"])}
        for lang, metrics in sorted(groups.items())
        if lang != "all"
    }
    summary["predictions"] = predictions
    return summary


# --- answers ------------------------------------------------------------------------------------
ANSWERS_FILE = EVALUATION_DIR / "answers.jsonl"  # held out: never tuned on
ANSWERS_DEV_FILE = EVALUATION_DIR / "answers_dev.jsonl"  # tuning the composer
CALM_KINDS = ("question", "return", "problem")
HANDOFF_KINDS = ("angry", "person")


@dataclass(frozen=True)
class AnswerItem:
    id: str
    language: str
    kind: str
    text: str
    market: str
    article: str | None
    facts: tuple[str, ...]
    handoff: bool


@dataclass(frozen=True)
class Answered:
    """What the service did with one item."""

    item: AnswerItem
    answer: str
    path: str  # llm | article | action | handoff
    handoff: bool
    evidence: str  # the texts the answer may draw facts from: source article, reply templates
    article_chars: int  # characters of the expected article in the item's language
    fallback_reason: str = ""


def load_answer_items(path: Path = ANSWERS_FILE) -> list[AnswerItem]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(
                AnswerItem(
                    r["id"],
                    r["language"],
                    r["kind"],
                    r["text"],
                    r.get("market") or "",
                    r.get("article"),
                    tuple(r.get("facts") or ()),
                    bool(r["handoff"]),
                )
            )
    return out


def fact_present(fact: str, answer: str) -> bool:
    """A key fact counts when it is in the answer as written (after Unicode, case and dash
    normalisation): a rephrased fact is not credited, so the figure is a floor for rewrites."""
    return facts.normalize(fact) in facts.normalize(answer)


def unsupported_facts(answer: str, evidence: str, item: AnswerItem) -> list[str]:
    """Numbers, durations and countries of the answer found in neither the evidence nor (countries
    only) the question and market."""
    language, context = item.language, item.text
    out = [f"number {n}" for n in sorted(facts.numbers(answer, language) - facts.numbers(evidence, language))]
    known = facts.durations(evidence, language)
    out += [f"duration {n} {u}" for n, u in sorted(facts.durations(answer, language) - known)]
    allowed = facts.countries(evidence, language) | facts.countries(context, language) | {item.market}
    out += [f"country {c}" for c in sorted(facts.countries(answer, language) - allowed)]
    return out


def answer_metrics(rows: Sequence[Answered]) -> dict[str, Any]:
    """The answer figures overall, per language and per answer path, and every miss."""
    # Once per row (country matching is the slow part), shared by every grouping below.
    unsupported = {
        id(r): unsupported_facts(r.answer, r.evidence, r.item) if not r.handoff else [] for r in rows
    }

    def summarise(group: Sequence[Answered]) -> dict[str, Any]:
        calm = [r for r in group if r.item.kind in CALM_KINDS]
        want = [r for r in group if r.item.kind in HANDOFF_KINDS]
        answered = [r for r in calm if not r.handoff]
        fact_hits = [fact_present(f, r.answer) for r in answered for f in r.item.facts]
        # Hand-offs count as missing every fact: a question handed off unneeded was not answered.
        fact_total = sum(len(r.item.facts) for r in calm)
        flagged = [r for r in answered if unsupported[id(r)]]
        ratios = [len(r.answer) / r.article_chars for r in answered if r.article_chars]
        out: dict[str, Any] = {
            "items": len(group),
            "answered": len(answered),
            "answer_fact_recall": round(sum(fact_hits) / fact_total, 4) if fact_total else None,
            "unsupported_fact_rate": round(len(flagged) / len(answered), 4) if answered else None,
            "answer_length_ratio": round(float(np.median(ratios)), 4) if ratios else None,
            "false_handoff_rate": round(sum(r.handoff for r in calm) / len(calm), 4) if calm else None,
            "handoff_recall": round(sum(r.handoff for r in want) / len(want), 4) if want else None,
        }
        return out

    summary = summarise(rows)
    summary["per_language"] = {
        lang: summarise([r for r in rows if r.item.language == lang])
        for lang in sorted({r.item.language for r in rows})
    }
    summary["per_path"] = {
        path: summarise([r for r in rows if r.path == path]) for path in sorted({r.path for r in rows})
    }
    summary["misses"] = [
        {
            "id": r.item.id,
            "kind": r.item.kind,
            "text": r.item.text,
            "path": r.path,
            "handoff": r.handoff,
            "answer": r.answer,
            "missing_facts": [f for f in r.item.facts if not fact_present(f, r.answer)]
            if not r.handoff
            else [],
            "unsupported": unsupported[id(r)],
            "fallback_reason": r.fallback_reason,
        }
        for r in rows
        if (
            r.item.kind in CALM_KINDS
            and (r.handoff or not all(fact_present(f, r.answer) for f in r.item.facts))
        )
        or (r.item.kind in HANDOFF_KINDS and not r.handoff)
        or unsupported[id(r)]
    ]
    return summary
