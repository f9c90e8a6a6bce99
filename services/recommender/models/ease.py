"""EASE (Steck, 2019): the closed-form item-item model B = I - P / diag(P), P = (X'X + lambda I)^-1.

Its item x item matrix is dense, so it is for catalogues up to ``max_items`` (a few tens of
thousands); bigger catalogues serve a factor model.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .base import FitContext, Recommender


class EASE(Recommender):
    name = "ease"
    defaults = {"l2": 250.0, "max_items": 20000, "binary": True}

    B: np.ndarray

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        n = X.shape[1]
        if n > int(self.params["max_items"]):
            raise ValueError(f"EASE needs a dense {n} x {n} matrix; raise max_items or use a factor model")
        X = X.tocsr().astype(np.float64)
        if self.params["binary"]:
            X.data[:] = 1.0
        if ctx.device.is_gpu:
            import torch

            G = torch.tensor((X.T @ X).toarray(), device=ctx.device.torch, dtype=torch.float64)
            G += float(self.params["l2"]) * torch.eye(n, device=G.device, dtype=G.dtype)
            P = torch.linalg.inv(G).cpu().numpy()
        else:
            G = (X.T @ X).toarray()
            G[np.diag_indices(n)] += float(self.params["l2"])
            P = np.linalg.inv(G)
        B = -P / np.diag(P)[None, :]
        B[np.diag_indices(n)] = 0.0
        self.B = B.astype(np.float32)
        self.n_items = n

    def _input(self, history: sp.csr_matrix) -> sp.csr_matrix:
        h = history.tocsr().astype(np.float32)
        if self.params["binary"]:
            h = h.copy()
            h.data[:] = 1.0
        return h

    def score(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        return np.asarray(self._input(history) @ self.B)

    def explain(self, history: sp.csr_matrix, item: int, n: int = 5) -> list[tuple[int, float]]:
        h = self._input(history)
        contrib = h.data * self.B[h.indices, item]
        top = np.argsort(-contrib)[:n]
        return [(int(h.indices[t]), float(contrib[t])) for t in top if contrib[t] > 0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"B": self.B}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.B = arrays["B"]
        self.n_items = self.B.shape[0]
