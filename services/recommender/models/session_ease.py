"""EASE with three changes that each help on implicit data, still one closed-form item x item B:

- dropout regularisation (DLAE / EDLAE, Steck 2020, "Autoencoders that don't overfit towards the
  identity"): the penalty on item j grows with its popularity, Lambda = l2 + p / (1 - p) diag(G),
  so popular items are not over-fitted; ``emphasis`` keeps EASE's zero diagonal (EDLAE) or not (DLAE);
- session co-occurrence: G = X'X + ``session_weight`` * S'S, where S has one row per session (a
  user's events no more than ``session_gap_s`` apart; 0 = events recorded together, e.g. one page
  of ratings). Items chosen in the same sitting are stronger evidence of each other than items
  that merely share a user;
- a popularity discount: column j of B is divided by popularity_j ** ``pop_exponent``, which
  lifts well-matched niche items above generically popular ones.

Only training interactions are used (timestamps from ``FitContext.interactions``); without them
the session term is skipped. Scoring is ``history @ B`` as in EASE, so serving, explanations and
live events work unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .base import FitContext
from .ease import EASE, gram, spd_inverse


def session_matrix(interactions: pd.DataFrame, n_items: int, gap_s: float) -> sp.csr_matrix | None:
    """Sessions x items (binary): a user's time-ordered events split where the gap exceeds ``gap_s``."""
    needed = {"user_idx", "item_idx", "timestamp"}
    if not needed <= set(interactions.columns) or interactions["timestamp"].isna().all():
        return None
    df = interactions[["user_idx", "item_idx", "timestamp"]].dropna()
    df = df.sort_values(["user_idx", "timestamp"], kind="stable")
    users = df["user_idx"].to_numpy()
    ts = df["timestamp"].to_numpy(dtype=float)
    new = np.r_[True, (users[1:] != users[:-1]) | (np.diff(ts) > gap_s)]
    session = np.cumsum(new) - 1
    S = sp.csr_matrix(
        (np.ones(len(df)), (session, df["item_idx"].to_numpy())), shape=(int(session[-1]) + 1, n_items)
    )
    S.data[:] = 1.0  # an item twice in one session counts once
    return S


def session_gram(ctx: FitContext, n_items: int, gap_s: float) -> np.ndarray | None:
    """Dense S'S of the training sessions, once per matrix and gap (``ctx.cache``, read-only)."""
    key = ("session_gram", n_items, gap_s, id(ctx.interactions))
    if key not in ctx.cache:
        S = session_matrix(ctx.interactions, n_items, gap_s) if ctx.interactions is not None else None
        ctx.cache[key] = None if S is None else (S.T @ S).toarray().astype(np.float32)
    return ctx.cache[key]


class SessionEASE(EASE):
    name = "session_ease"
    defaults = {
        **EASE.defaults,
        "l2": 200.0,
        "dropout": 0.67,
        "emphasis": False,
        "session_weight": 1.0,
        "session_gap_s": 0.0,
        "pop_exponent": 0.1,
    }

    def _solve(self, X: sp.csr_matrix, ctx: FitContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P = (G + diag(lam))^-1, the diagonal penalty lam and the popularity discount."""
        n = X.shape[1]
        if n > int(self.params["max_items"]):
            raise ValueError(f"EASE needs a dense {n} x {n} matrix; raise max_items or use sparse_ease")
        p = float(self.params["dropout"])
        if not 0 <= p < 1:
            raise ValueError("dropout must be in [0, 1)")
        binary = bool(self.params["binary"])
        G = gram(X, ctx, binary)
        weight = float(self.params["session_weight"])
        if weight and ctx.interactions is not None:
            SS = session_gram(ctx, n, float(self.params["session_gap_s"]))
            if SS is not None:
                G = G + weight * SS
        lam = float(self.params["l2"]) + p / (1 - p) * np.diag(G).astype(np.float64)
        A = G.copy()
        A[np.diag_indices(n)] += lam.astype(A.dtype)
        del G
        P = spd_inverse(A, ctx)
        popularity = np.asarray((X > 0).sum(axis=0) if binary else X.sum(axis=0)).ravel() + 1.0
        discount = popularity ** -float(self.params["pop_exponent"])
        return P, lam, discount

    def _zero_diagonal(self) -> bool:
        return bool(self.params["emphasis"]) or float(self.params["dropout"]) == 0

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        """B = I - P / diag(P) (EASE's zero diagonal) or, for DLAE, B = P G = I - P diag(lam)
        (since P (G + diag(lam)) = I): either way no n^3 product after the inverse."""
        P, lam, discount = self._solve(X, ctx)
        B = P
        if self._zero_diagonal():
            B /= -np.diag(P).copy()[None, :]
            B[np.diag_indices(len(B))] = 0.0
        else:
            B *= -lam.astype(B.dtype)[None, :]
            B[np.diag_indices(len(B))] += 1.0
        B *= discount.astype(B.dtype)[None, :]
        self.B = B.astype(np.float32, copy=False)
        self.n_items = X.shape[1]

    def fit_scores(self, X: sp.csr_matrix, ctx: FitContext, rows: np.ndarray) -> np.ndarray:
        """``history @ B`` for ``rows`` without forming B (tuning): H - (H P) / diag(P), or
        H - (H P) diag(lam) for DLAE."""
        P, lam, discount = self._solve(X, ctx)
        H = self._input(X[rows])
        HP = np.asarray(H @ P)
        scale = 1.0 / np.diag(P) if self._zero_diagonal() else lam
        S = H.toarray() - HP * scale[None, :]
        return (S * discount[None, :]).astype(np.float32)
