"""A weighted blend of other models: score = sum_c w_c * z_c(u, i), where z_c standardises model
c's scores over the catalogue for each user (so scales do not matter). The weights are tuned by
the training pipeline on a validation split carved from the training data, never on the test split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .base import FitContext, Recommender

log = logging.getLogger("cbec.recommender.models")


class Hybrid(Recommender):
    name = "hybrid"
    defaults = {
        "components": {"ease": {}, "als": {}, "content": {}, "popularity": {}},
        "weights": {"ease": 1.0, "als": 0.5, "content": 0.1, "popularity": 0.1},
    }

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.components: dict[str, Recommender] = {}

    @classmethod
    def from_fitted(cls, components: dict[str, Recommender], weights: dict[str, float]) -> Hybrid:
        model = cls(
            components={name: dict(m.params) for name, m in components.items()},
            weights={name: float(weights.get(name, 0.0)) for name in components},
        )
        model.components = dict(components)
        model.n_items = next(iter(components.values())).n_items
        return model

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        from . import MODELS

        self.components = {}
        for name, params in self.params["components"].items():
            model = MODELS[name](**params)
            model.fit(X, ctx)
            self.components[name] = model
        self.n_items = X.shape[1]

    @property
    def weights(self) -> dict[str, float]:
        return {name: float(self.params["weights"].get(name, 0.0)) for name in self.components}

    def component_scores(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> dict[str, np.ndarray]:
        return {
            name: model.score(users, history, base)
            for name, model in self.components.items()
            if self.weights[name] != 0.0
        }

    @staticmethod
    def blend(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
        total: np.ndarray | None = None
        for name, s in scores.items():
            w = weights.get(name, 0.0)
            if w == 0.0:
                continue
            std = s.std(axis=1, keepdims=True)
            z = (s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
            total = w * z if total is None else total + w * z
        if total is None:
            raise ValueError("every hybrid weight is zero")
        return total.astype(np.float32)

    def score(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        return self.blend(self.component_scores(users, history, base), self.weights)

    def explain(self, history: sp.csr_matrix, item: int, n: int = 5) -> list[tuple[int, float]]:
        """Each component's contributions, scaled as the blend scales that component."""
        totals: dict[int, float] = {}
        users = np.array([-1])
        for name, model in self.components.items():
            w = self.weights[name]
            if w == 0.0:
                continue
            std = float(model.score(users, history).std()) or 1.0
            for past, value in model.explain(history, item, n=50):
                totals[past] = totals.get(past, 0.0) + w * value / std
        ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
        return [(i, v) for i, v in ranked if v > 0]

    def _save_extra(self, path: Path) -> None:
        for name, model in self.components.items():
            model.save(path / "components" / name)

    def _load_extra(self, path: Path, mmap: bool) -> None:
        self.components = {
            name: Recommender.load(path / "components" / name, mmap) for name in self.params["components"]
        }
