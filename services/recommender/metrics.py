"""Top-k ranking metrics with binary relevance, defined as RecBole defines them.

For one user with ``n_pos`` held-out items and the top-k list's hit indicators ``h_1..h_k``:

- Precision@k = sum(h) / k
- Recall@k    = sum(h) / n_pos
- HitRate@k   = 1 if any hit
- NDCG@k      = sum_i h_i / log2(i + 1)  /  sum_{i <= min(n_pos, k)} 1 / log2(i + 1)
- MAP@k       = sum_i h_i * Precision@i  /  min(n_pos, k)
- coverage@k  = distinct items in all users' top-k lists / catalogue size (over the whole run)

Averages are over users with at least one held-out item. Per-user arrays are kept so that two
models can be compared by paired differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate")


def top_k(scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first; ``exclude``'s non-zeros never appear."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    if exclude is not None and exclude.nnz:
        rows, cols = exclude.nonzero()
        scores[rows, cols] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def hits(topk: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """Boolean (users x k): whether each recommended item is in that user's ``truth`` row."""
    truth = truth.tocsr()
    out = np.zeros(topk.shape, dtype=bool)
    for row in range(topk.shape[0]):
        positives = truth.indices[truth.indptr[row] : truth.indptr[row + 1]]
        if len(positives):
            out[row] = np.isin(topk[row], positives)
    return out


def per_user(hit: np.ndarray, n_pos: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user metrics at ``k`` from the hit matrix (its first ``k`` columns). A catalogue smaller
    than ``k`` gives fewer columns: the missing ranks are misses (zero-padded)."""
    h = hit[:, :k].astype(np.float64)
    if h.shape[1] < k:
        h = np.pad(h, ((0, 0), (0, k - h.shape[1])))
    n_pos = np.asarray(n_pos, dtype=np.float64)
    n_hits = h.sum(1)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = h @ discounts
    ideal_len = np.minimum(n_pos, k).astype(int)
    ideal = np.r_[0.0, np.cumsum(discounts)][ideal_len]
    precision_at_i = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    safe = np.maximum(n_pos, 1)
    return {
        "precision": n_hits / k,
        "recall": n_hits / safe,
        "ndcg": np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0),
        "map": (precision_at_i * h).sum(1) / np.maximum(ideal_len, 1),
        "hit_rate": (n_hits > 0).astype(np.float64),
    }


def coverage(topk: np.ndarray, n_items: int) -> float:
    return float(len(np.unique(topk)) / n_items) if n_items else 0.0


@dataclass
class Evaluation:
    """Mean metrics (``ndcg@10`` ...) and per-user arrays over ``users`` (row indices)."""

    ks: tuple[int, ...]
    users: np.ndarray
    mean: dict[str, float] = field(default_factory=dict)
    per_user: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate(
    score: Callable[[np.ndarray], np.ndarray],
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 512,
    users: np.ndarray | None = None,
) -> Evaluation:
    """Rank every item not in the user's ``train`` row; judge the top-k against ``test``.

    ``score(rows)`` returns dense scores (len(rows) x items) for those user rows.
    """
    train, test = train.tocsr(), test.tocsr()
    n_pos_all = np.diff(test.indptr)
    if users is None:
        users = np.flatnonzero(n_pos_all > 0)
    ks = tuple(sorted(set(int(k) for k in ks)))
    kmax = max(ks)
    parts: dict[str, list[np.ndarray]] = {}
    all_topk = []
    for start in range(0, len(users), batch_size):
        rows = users[start : start + batch_size]
        top = top_k(score(rows), kmax, train[rows])
        all_topk.append(top)
        hit = hits(top, test[rows])
        for k in ks:
            for name, values in per_user(hit, n_pos_all[rows], k).items():
                parts.setdefault(f"{name}@{k}", []).append(values)
    result = Evaluation(ks, users)
    result.per_user = {name: np.concatenate(v) for name, v in parts.items()}
    result.mean = {name: float(v.mean()) for name, v in result.per_user.items()}
    stacked = np.concatenate(all_topk) if all_topk else np.zeros((0, kmax), dtype=np.int64)
    for k in ks:
        result.mean[f"coverage@{k}"] = coverage(stacked[:, :k], train.shape[1])
    return result


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over the same users and its standard error."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, float("nan")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
