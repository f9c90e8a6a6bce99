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
