"""Content model for cold start: items are embedded from their text (title, description, category)
with the multilingual E5 model (see ``embeddings.py``); a user is the weighted mean of the items they
touched, so an item with no interactions is recommendable the moment it has text."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .base import FitContext, VectorModel, row_normalise


class ContentModel(VectorModel):
    name = "content"
    defaults = {"dim": 384}

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        if ctx.item_embeddings is None:
            raise ValueError("the content model needs item embeddings (an items file with text)")
        if ctx.item_embeddings.shape[0] != X.shape[1]:
            raise ValueError("item embeddings do not match the item index")
        self.item_factors = row_normalise(np.asarray(ctx.item_embeddings, dtype=np.float32))
        self.user_factors = None
        self.item_bias = None
        self.n_items = X.shape[1]

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        h = history.tocsr().astype(np.float32)
        return row_normalise(np.asarray(h @ self.item_factors, dtype=np.float32))

    def explain(self, history: sp.csr_matrix, item: int, n: int = 5) -> list[tuple[int, float]]:
        h = history.tocsr()
        if h.nnz == 0:
            return []
        contrib = h.data * (self.item_factors[h.indices] @ self.item_factors[item])
        top = np.argsort(-contrib)[:n]
        return [(int(h.indices[t]), float(contrib[t])) for t in top if contrib[t] > 0]
