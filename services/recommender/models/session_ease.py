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
from .ease import EASE


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

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        n = X.shape[1]
        if n > int(self.params["max_items"]):
            raise ValueError(f"EASE needs a dense {n} x {n} matrix; raise max_items or use a factor model")
        X = X.tocsr().astype(np.float64)
        if self.params["binary"]:
            X.data[:] = 1.0
        G = (X.T @ X).toarray()
        weight = float(self.params["session_weight"])
        if weight and ctx.interactions is not None:
            S = session_matrix(ctx.interactions, n, float(self.params["session_gap_s"]))
            if S is not None:
                G += weight * (S.T @ S).toarray()
        p = float(self.params["dropout"])
        if not 0 <= p < 1:
            raise ValueError("dropout must be in [0, 1)")
        A = G.copy()
        A[np.diag_indices(n)] += float(self.params["l2"]) + p / (1 - p) * np.diag(G)
        if ctx.device.is_gpu:
            import torch

            P = torch.linalg.inv(torch.tensor(A, device=ctx.device.torch)).cpu().numpy()
        else:
            P = np.linalg.inv(A)
        if self.params["emphasis"] or p == 0:
            B = -P / np.diag(P)[None, :]
            B[np.diag_indices(n)] = 0.0
        else:
            B = P @ G
        popularity = np.asarray(X.sum(axis=0)).ravel() + 1.0
        B /= popularity[None, :] ** float(self.params["pop_exponent"])
        self.B = B.astype(np.float32)
        self.n_items = n
