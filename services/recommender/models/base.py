"""The one interface every recommender model implements, and saving/loading it.

A model is fitted on a users x items matrix of implicit weights (CSR) and scores users from their
current history rows. ``users`` holds each row's training-user index, or -1 for a user the model
was not trained on. Vector models (matrix factorisation, content) expose item vectors and user
vectors so retrieval can go through a FAISS index; the others (EASE, popularity, the hybrid)
score densely.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.runtime.device import Device


@dataclass
class FitContext:
    """What fitting may use besides the matrix."""

    device: Device = field(default_factory=lambda: Device("cpu"))
    seed: int = 0
    progress: bool = False
    #: Cleaned training interactions with integer ``user_idx`` / ``item_idx`` columns (popularity).
    interactions: pd.DataFrame | None = None
    #: L2-normalised item embeddings aligned with the item index (zero rows: no text).
    item_embeddings: np.ndarray | None = None
    #: What does not change between fits on the same matrix (the EASE family's Gram matrix): the
    #: tuner fits many configurations on one validation matrix with one context.
    cache: dict[Any, Any] = field(default_factory=dict)
    #: Called as on_epoch(epoch, model) after each epoch of an iterative fit (ALS) with the model
    #: as it stands; the tuner scores it there and may stop the fit by raising optuna.TrialPruned.
    on_epoch: Callable[[int, Recommender], None] | None = None


class Recommender:
    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}")
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.n_items = 0

    # --- fitting and scoring ---
    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        raise NotImplementedError

    def score(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        """Dense scores (rows x items). ``base``: the rows' training history, when ``history``
        may hold more (real-time events) -- vector models then apply only the difference."""
        raise NotImplementedError

    def fit_scores(self, X: sp.csr_matrix, ctx: FitContext, rows: np.ndarray) -> np.ndarray:
        """Fit on ``X`` and return the dense scores of ``rows`` (tuning). Models that can score a
        few rows without building their whole serving state override it."""
        self.fit(X, ctx)
        return self.score(rows, X[rows])

    def explain(self, history: sp.csr_matrix, item: int, n: int = 5) -> list[tuple[int, float]]:
        """The user's past items (from a 1 x items history row) that drove ``item``'s score."""
        return []

    # --- persistence ---
    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        return None

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "params": self.params, "n_items": self.n_items}
        for key, value in self.arrays().items():
            np.save(path / f"{key}.npy", np.ascontiguousarray(value), allow_pickle=False)
        self._save_extra(path)
        (path / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    def _save_extra(self, path: Path) -> None:
        return None

    def _load_extra(self, path: Path, mmap: bool) -> None:
        return None

    @classmethod
    def load(cls, path: Path, mmap: bool = False) -> Recommender:
        meta = json.loads((path / "model.json").read_text())
        from . import MODELS

        model_cls = MODELS[meta["name"]]
        model = model_cls(**meta["params"])
        model.n_items = int(meta["n_items"])
        arrays = {
            p.stem: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            for p in path.glob("*.npy")
        }
        model.set_arrays(arrays)
        model._load_extra(path, mmap)
        return model


def row_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class VectorModel(Recommender):
    """score(u, i) = user_vector(u) . item_vector(i) (+ item_bias(i)).

    Users get their trained vector; a history that differs from training (new events, or a user
    the model never saw) is folded in by least squares against the fixed item vectors, as
    implicit's ALS ``recalculate_user`` does: x = (Y'Y + lambda I + Y'(C - I)Y)^-1 Y'C p with
    confidence ``alpha * weight``. A trained user's vector moves by fold_in(history) -
    fold_in(training history), so models trained with other losses (BPR, softmax) keep their scale.
    """

    user_factors: np.ndarray | None = None
    item_factors: np.ndarray
    item_bias: np.ndarray | None = None
    fold_alpha: float = 1.0
    fold_reg: float = 0.1

    def item_matrix(self) -> np.ndarray:
        """Item vectors for inner-product search (bias appended as one more dimension)."""
        if self.item_bias is None:
            return np.asarray(self.item_factors, dtype=np.float32)
        return np.hstack([self.item_factors, self.item_bias[:, None]]).astype(np.float32)

    def query_matrix(self, user_vectors: np.ndarray) -> np.ndarray:
        if self.item_bias is None:
            return user_vectors.astype(np.float32, copy=False)
        return np.hstack([user_vectors, np.ones((len(user_vectors), 1), np.float32)])

    def _gram(self) -> np.ndarray:
        gram = getattr(self, "_gram_cache", None)
        if gram is None:
            Y = np.asarray(self.item_factors, dtype=np.float32)
            gram = (Y.T @ Y).astype(np.float64)
            self._gram_cache = gram
        return gram

    def _system(self, items: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Y = np.asarray(self.item_factors[items], dtype=np.float64)
        c = self.fold_alpha * weights.astype(np.float64)
        A = self._gram() + self.fold_reg * np.eye(Y.shape[1]) + (Y * (c - 1)[:, None]).T @ Y
        b = (Y * c[:, None]).sum(0)
        return A, b

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        history = history.tocsr()
        d = self.item_factors.shape[1]
        out = np.zeros((history.shape[0], d), dtype=np.float32)
        for row in range(history.shape[0]):
            lo, hi = history.indptr[row], history.indptr[row + 1]
            if hi == lo:
                continue
            A, b = self._system(history.indices[lo:hi], history.data[lo:hi])
            out[row] = np.linalg.solve(A, b)
        return out

    def user_vectors(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        users = np.asarray(users)
        known = (users >= 0) & (self.user_factors is not None)
        out = np.zeros((len(users), self.item_factors.shape[1]), dtype=np.float32)
        if self.user_factors is not None and known.any():
            out[known] = self.user_factors[users[known]]
        history = history.tocsr()
        fold = ~known
        if base is not None and known.any():
            base = base.tocsr()
            changed = np.flatnonzero(known & (np.diff(history.indptr) != np.diff(base.indptr)))
            if len(changed):
                out[changed] += self.fold_in(history[changed]) - self.fold_in(base[changed])
        if fold.any():
            out[fold] = self.fold_in(history[np.flatnonzero(fold)])
        return out

    def score(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        U = self.user_vectors(users, history, base)
        scores = U @ np.asarray(self.item_factors, dtype=np.float32).T
        if self.item_bias is not None:
            scores += self.item_bias[None, :]
        return scores

    def explain(self, history: sp.csr_matrix, item: int, n: int = 5) -> list[tuple[int, float]]:
        """Contribution of past item j: c_j * y_i' A^-1 y_j (Hu, Koren and Volinsky, section 5)."""
        history = history.tocsr()
        items, weights = history.indices, history.data
        if len(items) == 0:
            return []
        A, _ = self._system(items, weights)
        Y = np.asarray(self.item_factors[items], dtype=np.float64)
        solved = np.linalg.solve(A, np.asarray(self.item_factors[item], dtype=np.float64))
        contrib = self.fold_alpha * weights * (Y @ solved)
        top = np.argsort(-contrib)[:n]
        return [(int(items[t]), float(contrib[t])) for t in top if contrib[t] > 0]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"item_factors": np.asarray(self.item_factors, dtype=np.float32)}
        if self.user_factors is not None:
            out["user_factors"] = np.asarray(self.user_factors, dtype=np.float32)
        if self.item_bias is not None:
            out["item_bias"] = np.asarray(self.item_bias, dtype=np.float32)
        return out

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.item_factors = arrays["item_factors"]
        self.user_factors = arrays.get("user_factors")
        self.item_bias = arrays.get("item_bias")
        self.n_items = self.item_factors.shape[0]


def zscore_rows(scores: np.ndarray) -> np.ndarray:
    mean = scores.mean(axis=1, keepdims=True)
    std = scores.std(axis=1, keepdims=True)
    return (scores - mean) / np.where(std > 0, std, 1.0)
