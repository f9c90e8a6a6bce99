"""EASE (Steck, 2019): the closed-form item-item model B = I - P / diag(P), P = (X'X + lambda I)^-1.

Its item x item matrix is dense, so it is for catalogues up to ``max_items`` (a few tens of
thousands, deploy/CAPACITY.md); bigger catalogues use ``sparse_ease`` or a factor model.

P is inverted by Cholesky (LAPACK potrf + potri) in float32: G + lambda I is symmetric positive
definite with eigenvalues >= lambda, so single precision is ample (on an 8,000-item validation split
the test NDCG@10 was identical to float64's to the last digit), and it is the fast path here: 3 s at
8,000 items against 7-40 s for float64's potri and 22 s for ``np.linalg.inv``'s LU, with half the
memory. One eigendecomposition of G, reused for every lambda, does not pay: ``eigh`` alone takes
about 60 s at 8,000 items, as long as twenty Cholesky inverses, more than the budgeted tuning tries
on a catalogue of that size (services/recommender/tuning.py). The Gram matrix X'X is reused
instead: it is computed once per training matrix and kept in ``FitContext.cache``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .base import FitContext, Recommender


def binarised(m: sp.spmatrix, binary: bool) -> sp.csr_matrix:
    """A float32 CSR copy of ``m``, every stored weight set to 1 when ``binary`` (the EASE family's
    training matrix and scoring input)."""
    m = m.tocsr().astype(np.float32)
    if binary:
        m.data[:] = 1.0
    return m


def top_contributions(items: np.ndarray, contrib: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The ``n`` past items with the largest positive contribution to a score (``explain``)."""
    top = np.argsort(-contrib)[:n]
    return [(int(items[t]), float(contrib[t])) for t in top if contrib[t] > 0]


def gram(X: sp.csr_matrix, ctx: FitContext, binary: bool) -> np.ndarray:
    """Dense X'X of the (binarised) training matrix, computed once per matrix and shared by every
    EASE-family fit on it through ``ctx.cache`` (read-only: callers copy before changing it)."""
    key = ("gram", X.shape, X.nnz, binary)
    cached = ctx.cache.get(key)
    if cached is None:
        X = binarised(X, binary)
        cached = ctx.cache[key] = (X.T @ X).toarray()  # float32: co-occurrence counts are exact
    return cached


def spd_inverse(A: np.ndarray, ctx: FitContext) -> np.ndarray:
    """Inverse of a symmetric positive definite float32 matrix by Cholesky; ``A`` is overwritten."""
    A = A.astype(np.float32, copy=False)
    if ctx.device.is_gpu:
        import torch

        L = torch.linalg.cholesky(torch.from_numpy(A).to(ctx.device.torch))
        return torch.cholesky_inverse(L).cpu().numpy()
    from scipy.linalg import lapack

    c, info = lapack.spotrf(A, lower=True, overwrite_a=True, clean=False)
    if info == 0:
        P, info = lapack.spotri(c, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky inverse failed (LAPACK info {info}); raise l2")
    n, step = len(P), 1024
    for lo in range(0, n, step):  # potri fills the lower triangle: mirror it, a block at a time
        hi = min(lo + step, n)
        P[lo:hi, hi:] = P[hi:, lo:hi].T
        block = P[lo:hi, lo:hi]
        block[np.triu_indices(hi - lo, 1)] = block.T[np.triu_indices(hi - lo, 1)]
    return P


class EASE(Recommender):
    name = "ease"
    defaults = {"l2": 250.0, "max_items": 20000, "binary": True}

    B: np.ndarray

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        n = X.shape[1]
        if n > int(self.params["max_items"]):
            raise ValueError(f"EASE needs a dense {n} x {n} matrix; raise max_items or use a factor model")
        A = gram(X, ctx, bool(self.params["binary"])).copy()
        A[np.diag_indices(n)] += float(self.params["l2"])
        P = spd_inverse(A, ctx)
        P /= -np.diag(P).copy()[None, :]  # B = I - P / diag(P): zero diagonal
        P[np.diag_indices(n)] = 0.0
        self.B = P.astype(np.float32, copy=False)
        self.n_items = n

    def _input(self, history: sp.csr_matrix) -> sp.csr_matrix:
        return binarised(history, bool(self.params["binary"]))

    def score(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        return np.asarray(self._input(history) @ self.B)

    def explain(self, history: sp.csr_matrix, item: int, n: int = 5) -> list[tuple[int, float]]:
        h = self._input(history)
        return top_contributions(h.indices, h.data * self.B[h.indices, item], n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"B": self.B}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.B = arrays["B"]
        self.n_items = self.B.shape[0]
