"""Retrieval quality: precision@k and mAP@k with relevance = same class, by exact FAISS search."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class Retrieval:
    precision_at_k: float
    map_at_k: float
    k: int
    queries: int
    gallery: int


def top_k(
    queries: np.ndarray, gallery: np.ndarray, k: int, metric: str = "ip", exclude_self: bool = False
) -> np.ndarray:
    """Indices of the k nearest gallery rows per query (exact). ``exclude_self`` drops row i for query
    i (leave-one-out, when queries and gallery are the same set)."""
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index = faiss.IndexFlatIP(gallery.shape[1]) if metric == "ip" else faiss.IndexFlatL2(gallery.shape[1])
    index.add(gallery)
    _, found = index.search(queries, k + 1 if exclude_self else k)
    if not exclude_self:
        return found
    out = np.empty((len(queries), k), dtype=np.int64)
    for i, row in enumerate(found):
        out[i] = [j for j in row if j != i][:k]
    return out


def retrieval(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    k: int = 10,
    metric: str = "ip",
    exclude_self: bool = False,
) -> Retrieval:
    """Precision@k and mAP@k (AP@k normalised by min(k, relevant items in the gallery))."""
    found = top_k(queries, gallery, k, metric, exclude_self)
    relevant = gallery_labels[found] == query_labels[:, None]  # (q, k)
    precision = relevant.mean(axis=1)
    classes, counts = np.unique(gallery_labels, return_counts=True)
    per_class = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    totals = np.array([per_class.get(int(c), 0) for c in query_labels]) - (1 if exclude_self else 0)
    hits = np.cumsum(relevant, axis=1)
    precision_at = hits / np.arange(1, k + 1)
    denominators = np.maximum(np.minimum(totals, k), 1)
    ap = (precision_at * relevant).sum(axis=1) / denominators
    return Retrieval(float(precision.mean()), float(ap.mean()), k, len(queries), len(gallery))
