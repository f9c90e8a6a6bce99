"""Sparse EASE: EASE restricted to each item's top-k co-occurring neighbours, for 100k+ items.

EASE (Steck, 2019) fits every column j of the item-item matrix B by ridge regression of item j's
column of X on all the other items (the zero diagonal): b_j = (G_{-j,-j} + l2 I)^-1 G_{-j,j} with
G = X'X. Its closed form B = I - P / diag(P), P = (G + l2 I)^-1, needs a dense items x items
inverse: 80 GB in float64 at 100k items. Here column j may use only N_j, the ``neighbours`` items
that co-occur with j most often (ties: the lower item index). That is the SLIM / EASE regression
restricted to a top-k support, as fsSLIM (Ning and Karypis, 2011) restricts each column to its
nearest items, with EASE's l2 penalty and zero diagonal:

    b_j = (G[N_j, N_j] + l2 I)^-1 G[N_j, j]   on N_j,   0 elsewhere.

With ``neighbours`` >= the number of items that co-occur with j this is exactly EASE's column
(tests/recommender/test_sparse_ease.py checks it against models/ease.py); an item that co-occurs
with nothing gets an empty column. G stays sparse, and the k x k systems are built and solved a
``batch`` of items at a time, so memory is O(nnz(G) + items * k + batch * k^2), never items^2.
The systems' entries are looked up in G by binary search over its sorted (row, column) keys and
solved by batched Cholesky in torch, on ``ctx.device`` (the same code on CPU and GPU).

Why our own code: the published sparse EASE, SANSA (``sansa`` on PyPI), depends on scikit-sparse,
which ships only as an sdist that must compile against the SuiteSparse / CHOLMOD headers. They are
not installed on this machine or in CI (no root), so it cannot be installed here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .base import FitContext, Recommender
from .ease import binarised, top_contributions


def sparse_gram(X: sp.csr_matrix, ctx: FitContext, binary: bool) -> sp.csr_matrix:
    """Sparse X'X (float32, sorted indices) of the (binarised) training matrix, cached in ``ctx.cache``
    for every fit on the same matrix (the tuner's l2 grid). Binary counts are exact in float32."""
    key = ("sparse_gram", X.shape, X.nnz, binary)
    cached = ctx.cache.get(key)
    if cached is None:
        X = binarised(X, binary)
        G = (X.T @ X).tocsr()
        G.sum_duplicates()  # also sorts the indices within each row
        cached = ctx.cache[key] = G
    return cached


def top_neighbours(G: sp.csr_matrix, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Items lo..hi-1's top-``k`` co-occurring items (not themselves; ties: lower index first), as a
    (hi - lo, k) array sorted by item index and padded with n_items, and their co-occurrence."""
    n = G.shape[0]
    start, stop = G.indptr[lo], G.indptr[hi]
    rows = np.repeat(np.arange(hi - lo), np.diff(G.indptr[lo : hi + 1]))
    cols, vals = G.indices[start:stop], G.data[start:stop]
    keep = (cols != rows + lo) & (vals > 0)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(hi - lo))[rows]
    top = rank < k
    nbr = np.full((hi - lo, k), n, dtype=np.int64)
    val = np.zeros((hi - lo, k), dtype=np.float64)
    nbr[rows[top], rank[top]] = cols[top]
    val[rows[top], rank[top]] = vals[top]
    by_index = np.argsort(nbr, axis=1, kind="stable")  # ascending keys: searchsorted stays cache-local
    return np.take_along_axis(nbr, by_index, 1), np.take_along_axis(val, by_index, 1)


class SparseEASE(Recommender):
    name = "sparse_ease"
    defaults: dict[str, Any] = {"l2": 200.0, "neighbours": 64, "binary": True, "batch": 256}

    B: sp.csr_matrix

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        import torch
        from tqdm.auto import tqdm

        l2, k, batch = float(self.params["l2"]), int(self.params["neighbours"]), int(self.params["batch"])
        if not l2 > 0:
            raise ValueError(f"sparse_ease: l2 must be > 0, got {l2}")
        if k < 1 or batch < 1:
            raise ValueError(f"sparse_ease: neighbours and batch must be >= 1, got {k} and {batch}")
        n = X.shape[1]
        k = min(k, max(n - 1, 1))
        G = sparse_gram(X, ctx, bool(self.params["binary"]))
        device = torch.device(ctx.device.torch)
        # G's entries by key row * (n + 1) + column, ascending (sorted CSR). The stride n + 1 keeps the
        # padding (item n) from colliding with a real key: a pair holding it never matches.
        keys_np = np.repeat(np.arange(n, dtype=np.int64) * (n + 1), np.diff(G.indptr))
        keys_np += G.indices
        keys, values = torch.from_numpy(keys_np).to(device), torch.from_numpy(G.data).to(device)
        del keys_np
        diag = torch.from_numpy(np.append(G.diagonal(), 0.0).astype(np.float64)).to(device) + l2
        diag[n] = 1.0  # the padding's rows and columns are the identity's, its right-hand side 0
        iu, ju = torch.triu_indices(k, k, 1, device=device)
        upper, lower = iu * k + ju, ju * k + iu
        sizes, sources, weights = [], [], []
        with tqdm(total=n, desc="sparse_ease", unit="item", disable=not ctx.progress, leave=False) as bar:
            for lo in range(0, n if G.nnz else 0, batch):
                hi = min(n, lo + batch)
                nbr_np, rhs_np = top_neighbours(G, lo, hi, k)
                valid_np = nbr_np < n
                sizes.append(valid_np.sum(1))
                bar.update(hi - lo)
                if not valid_np.any():  # a batch of items that co-occur with nothing (cold items)
                    continue
                nbr = torch.from_numpy(nbr_np).to(device)
                query = nbr.index_select(1, iu) * (n + 1) + nbr.index_select(1, ju)
                pos = torch.searchsorted(keys, query).clamp_(max=len(keys) - 1)
                off = torch.where(keys.take(pos) == query, values.take(pos), 0.0).to(torch.float64)
                A = torch.zeros((hi - lo, k * k), dtype=torch.float64, device=device)
                A.index_copy_(1, upper, off).index_copy_(1, lower, off)
                A = A.view(hi - lo, k, k)
                A.diagonal(dim1=1, dim2=2).copy_(diag[nbr])
                rhs = torch.from_numpy(rhs_np).to(device)[..., None]
                solved = torch.cholesky_solve(rhs, torch.linalg.cholesky(A))[..., 0].cpu().numpy()
                sources.append(nbr_np[valid_np])
                weights.append(solved[valid_np].astype(np.float32))
        indptr = np.zeros(n + 1, dtype=np.int64)
        if sizes:
            np.cumsum(np.concatenate(sizes), out=indptr[1:])
        # column j holds b_j over N_j: CSC by construction, served as CSR (rows: the past items)
        B = sp.csc_matrix(
            (
                np.concatenate(weights or [np.zeros(0, np.float32)]),
                np.concatenate(sources or [indptr[:0]]),
                indptr,
            ),
            shape=(n, n),
        )
        self.B = B.tocsr()
        self.n_items = n

    def _input(self, history: sp.csr_matrix) -> sp.csr_matrix:
        return binarised(history, bool(self.params["binary"]))

    def score(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        return (self._input(history) @ self.B).toarray()

    def explain(self, history: sp.csr_matrix, item: int, n: int = 5) -> list[tuple[int, float]]:
        h = self._input(history)
        if h.nnz == 0:
            return []
        column = np.asarray(self.B[h.indices, np.full(h.nnz, item)]).ravel()
        return top_contributions(h.indices, h.data * column, n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "B_data": self.B.data,
            "B_indices": self.B.indices,
            "B_indptr": self.B.indptr,
            "B_shape": np.asarray(self.B.shape, dtype=np.int64),
        }

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """``arrays`` may be read-only memory maps: scipy keeps them as they are (no copy)."""
        shape = tuple(int(v) for v in arrays["B_shape"])
        self.B = sp.csr_matrix(
            (arrays["B_data"], arrays["B_indices"], arrays["B_indptr"]), shape=shape, copy=False
        )
        self.n_items = shape[0]
