"""Implicit-feedback matrix factorisation with the ``implicit`` library: ALS and BPR.

On a GPU node (the runtime's device setting) both train with implicit's CUDA kernels; the factors
are copied back to the CPU for serving either way.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import FitContext, VectorModel

log = logging.getLogger("cbec.recommender.models")


def _implicit_gpu(ctx: FitContext) -> bool:
    if not ctx.device.implicit_use_gpu:
        return False
    import implicit.gpu

    if not implicit.gpu.HAS_CUDA:
        log.warning("GPU requested but implicit has no CUDA support here; training on the CPU")
        return False
    return True


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.to_numpy() if hasattr(x, "to_numpy") else x, dtype=np.float32)


class ALS(VectorModel):
    """Hu, Koren and Volinsky's weighted matrix factorisation, confidence = alpha * weight."""

    name = "als"
    defaults = {"factors": 64, "regularization": 10.0, "alpha": 2.0, "iterations": 15}

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        import implicit.als

        p = self.params
        model = implicit.als.AlternatingLeastSquares(
            factors=int(p["factors"]),
            regularization=float(p["regularization"]),
            alpha=float(p["alpha"]),
            iterations=int(p["iterations"]),
            use_gpu=_implicit_gpu(ctx),
            random_state=ctx.seed,
        )
        self.n_items = X.shape[1]
        callback = None
        if ctx.on_epoch is not None:
            on_epoch = ctx.on_epoch

            def callback(iteration: int, _elapsed: float, _loss: float) -> None:
                self._take(model)
                on_epoch(iteration + 1, self)

        model.fit(X.tocsr().astype(np.float32), show_progress=ctx.progress, callback=callback)
        self._take(model)

    def _take(self, model: Any) -> None:
        """Copy the factors out of implicit's model (from the GPU when it trained there)."""
        if hasattr(model, "to_cpu") and not isinstance(model.item_factors, np.ndarray):
            model = model.to_cpu()
        self.user_factors = _to_numpy(model.user_factors)
        self.item_factors = _to_numpy(model.item_factors)
        self.item_bias = None
        self._gram_cache = None

    @property
    def fold_alpha(self) -> float:  # type: ignore[override]
        return float(self.params["alpha"])

    @property
    def fold_reg(self) -> float:  # type: ignore[override]
        return float(self.params["regularization"])


class BPR(VectorModel):
    """Bayesian Personalised Ranking (Rendle et al.) with an item bias, by implicit's SGD."""

    name = "bpr"
    defaults = {"factors": 64, "learning_rate": 0.01, "regularization": 0.05, "iterations": 200}

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        import implicit.bpr

        p = self.params
        model = implicit.bpr.BayesianPersonalizedRanking(
            factors=int(p["factors"]),
            learning_rate=float(p["learning_rate"]),
            regularization=float(p["regularization"]),
            iterations=int(p["iterations"]),
            use_gpu=_implicit_gpu(ctx),
            random_state=ctx.seed,
        )
        model.fit((X.tocsr() > 0).astype(np.float32), show_progress=ctx.progress)
        if hasattr(model, "to_cpu") and not isinstance(model.item_factors, np.ndarray):
            model = model.to_cpu()
        # implicit appends the item bias as the last factor (the user's last factor is 1)
        items = _to_numpy(model.item_factors)
        users = _to_numpy(model.user_factors)
        self.item_factors = np.ascontiguousarray(items[:, :-1])
        self.item_bias = np.ascontiguousarray(items[:, -1])
        self.user_factors = np.ascontiguousarray(users[:, :-1])
        self.n_items = X.shape[1]
