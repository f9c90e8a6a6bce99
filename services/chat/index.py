"""Hybrid retrieval: multilingual dense vectors (e5) and BM25 keywords, merged by reciprocal rank fusion.

Dense search finds an article in any language (a Japanese question reaches the English article); BM25
rewards exact words (product names, "Klarna", "boleto") that embeddings blur. Reciprocal rank fusion
(Cormack et al., 2009) combines ranks, not scores, so the two need no calibration. Documents are
(article, language) pairs; an article's score is its best document's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import bm25s
import numpy as np

from .store import ArticleRecord
from .text import bm25_tokens


@dataclass(frozen=True)
class RetrievalParams:
    rrf_k: float = 60.0
    dense_weight: float = 1.0
    bm25_weight: float = 1.0
    # Only the first ranks of each list vote (a long tail of weak matches is noise).
    depth: int = 20


@dataclass
class Hit:
    article_id: str
    topic: str
    score: float
    # Best dense cosine similarity of any of the article's documents.
    dense: float
    # Documents of this article, by language.
    docs: dict[str, ArticleRecord] = field(default_factory=dict)
    best_language: str = ""


@dataclass
class Retrieval:
    hits: list[Hit]
    # Best dense similarity per topic over every document (evidence for the intent model).
    topic_dense: dict[str, float]


class HybridIndex:
    def __init__(self, articles: Sequence[ArticleRecord]) -> None:
        self.docs = [a for a in articles if a.embedding is not None]
        self.by_article: dict[str, dict[str, ArticleRecord]] = {}
        for d in self.docs:
            self.by_article.setdefault(d.article_id, {})[d.language] = d
        dim = self.docs[0].embedding.shape[0] if self.docs else 384  # type: ignore[union-attr]
        self.matrix = (
            np.stack([d.embedding for d in self.docs]).astype(np.float32)  # type: ignore[misc]
            if self.docs
            else np.zeros((0, dim), np.float32)
        )
        self._bm25: bm25s.BM25 | None = None
        if self.docs:
            self._bm25 = bm25s.BM25()
            self._bm25.index([bm25_tokens(d.passage) for d in self.docs], show_progress=False)

    def __len__(self) -> int:
        return len(self.docs)

    def topics(self) -> set[str]:
        return {d.topic for d in self.docs}

    def search(
        self, query_vec: np.ndarray, query_text: str, params: RetrievalParams, k: int = 5
    ) -> Retrieval:
        if not self.docs:
            return Retrieval([], {})
        p = params
        dense = self.matrix @ query_vec.astype(np.float32)
        fused = np.zeros(len(self.docs), dtype=np.float64)
        for rank, i in enumerate(np.argsort(-dense)[: p.depth]):
            fused[i] += p.dense_weight / (p.rrf_k + rank + 1)
        if self._bm25 is not None and p.bm25_weight > 0:
            scores = np.asarray(self._bm25.get_scores(bm25_tokens(query_text)))
            order = [i for i in np.argsort(-scores)[: p.depth] if scores[i] > 0]
            for rank, i in enumerate(order):
                fused[i] += p.bm25_weight / (p.rrf_k + rank + 1)
        hits: dict[str, Hit] = {}
        for i in np.argsort(-fused):
            d = self.docs[i]
            hit = hits.get(d.article_id)
            if hit is None:
                hits[d.article_id] = Hit(
                    d.article_id,
                    d.topic,
                    float(fused[i]),
                    float(dense[i]),
                    self.by_article[d.article_id],
                    d.language,
                )
            else:
                hit.dense = max(hit.dense, float(dense[i]))
        ranked = sorted(hits.values(), key=lambda h: -h.score)
        topic_dense: dict[str, float] = {}
        for d, s in zip(self.docs, dense, strict=True):
            topic_dense[d.topic] = max(topic_dense.get(d.topic, -1.0), float(s))
        return Retrieval(ranked[:k], topic_dense)
