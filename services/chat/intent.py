"""Intent of a message: an article topic ("shipping") or an action ("order_status", "start_return",
"human_agent", "complaint"), with a confidence.

A nearest-example classifier on the same e5 query vector retrieval uses (no second model): each intent
scores the mean similarity of its closest labelled examples (``intents/examples.jsonl``, written by the
project); a topic also scores its closest knowledge article, and the top retrieved article's topic gets
a bonus. A softmax with a temperature tuned on the development set turns scores into probabilities.
A topic added at run time (no examples) wins when its article is retrieved first and no action
is detected. An order id in the message turns a tracking question into ``order_status`` and a
returns question into ``start_return``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .index import Retrieval

EXAMPLES_FILE = Path(__file__).resolve().parent / "intents" / "examples.jsonl"
ACTIONS = ("order_status", "start_return", "human_agent", "complaint")
ORDER_INTENTS = {"tracking": "order_status", "shipping": "order_status", "order_status": "order_status"}
RETURN_INTENTS = {"returns": "start_return", "start_return": "start_return"}


@dataclass(frozen=True)
class IntentParams:
    temperature: float = 0.03
    top_examples: int = 2
    article_bias: float = 0.0
    rank_bonus: float = 0.02


@dataclass(frozen=True)
class IntentResult:
    intent: str
    confidence: float
    scores: dict[str, float]


def load_examples(path: Path = EXAMPLES_FILE) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["text"], r["intent"]) for r in rows]


class IntentModel:
    def __init__(self, vectors: np.ndarray, labels: list[str], params: IntentParams | None = None) -> None:
        self.vectors = vectors.astype(np.float32)
        self.labels = np.asarray(labels)
        self.intents = sorted(set(labels))
        self.params = params or IntentParams()
        self._masks = {i: self.labels == i for i in self.intents}

    def save(self, path: Path) -> None:
        np.savez(path / "intent.npz", vectors=self.vectors, labels=self.labels)
        (path / "intent_params.json").write_text(json.dumps(asdict(self.params), indent=2))

    @classmethod
    def load(cls, path: Path) -> IntentModel:
        raw = np.load(path / "intent.npz", allow_pickle=False)
        params = IntentParams(**json.loads((path / "intent_params.json").read_text()))
        return cls(raw["vectors"], [str(x) for x in raw["labels"]], params)

    def with_params(self, params: IntentParams) -> IntentModel:
        return IntentModel(self.vectors, list(self.labels), params)

    def predict(self, query_vec: np.ndarray, retrieval: Retrieval, has_order_id: bool) -> IntentResult:
        p = self.params
        sims = self.vectors @ query_vec.astype(np.float32)
        intents = sorted(set(self.intents) | set(retrieval.topic_dense))
        scores = {}
        for intent in intents:
            mask = self._masks.get(intent)
            ex = (
                float(np.sort(sims[mask])[-p.top_examples :].mean())
                if mask is not None and mask.any()
                else -1.0
            )
            doc = retrieval.topic_dense.get(intent)
            scores[intent] = max(ex, doc + p.article_bias) if doc is not None else ex
        if retrieval.hits:
            top = retrieval.hits[0].topic
            if top in scores:
                scores[top] += p.rank_bonus
        names = list(scores)
        logits = np.array([scores[n] for n in names]) / p.temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(np.argmax(probs))
        intent, confidence = names[best], float(probs[best])
        top_topic = retrieval.hits[0].topic if retrieval.hits else None
        if top_topic is not None and top_topic not in self._masks and intent not in ACTIONS:
            # A topic added at run time (UpsertKnowledge) has no labelled examples: the retrieved
            # article is the only evidence for it, so it takes the topic vote from the classifier.
            confidence = float(probs[names.index(top_topic)]) + confidence
            intent = top_topic
        if has_order_id:
            if intent in ORDER_INTENTS:
                intent = ORDER_INTENTS[intent]
                confidence = float(sum(probs[names.index(n)] for n in ORDER_INTENTS if n in names))
            elif intent in RETURN_INTENTS:
                intent = RETURN_INTENTS[intent]
                confidence = float(sum(probs[names.index(n)] for n in RETURN_INTENTS if n in names))
        return IntentResult(intent, min(confidence, 1.0), dict(zip(names, probs.tolist(), strict=True)))
