"""Train/test splits of cleaned interactions (one row per user and item).

- ``random_holdout``: per user, a seeded random ``test_fraction`` of their items is held out
  (``int(test_fraction * n)`` items, at least one when the user has two or more; RecBole's rule).
- ``leave_last_out``: per user, the latest interaction is held out (users with one item stay in train).
- ``kfold``: per user, items are dealt round-robin into ``k`` folds after a seeded shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Split:
    name: str
    train: pd.DataFrame
    test: pd.DataFrame

    def describe(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "train_rows": len(self.train),
            "test_rows": len(self.test),
            "test_users": int(self.test["user_id"].nunique()),
        }


def _rank_within_user(users: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its 0-based rank among its user's rows ordered by ``keys``, and the user's row count."""
    order = np.lexsort((keys, users))
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(users)])
    rank_sorted = np.arange(len(users)) - np.repeat(starts, sizes)
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = rank_sorted
    count = np.empty(len(users), dtype=np.int64)
    count[order] = np.repeat(sizes, sizes)
    return rank, count


def _codes(df: pd.DataFrame) -> np.ndarray:
    return pd.factorize(df["user_id"], sort=False)[0]


def holdout_sizes(counts: np.ndarray, test_fraction: float) -> np.ndarray:
    """How many of a user's ``counts`` items go to test (RecBole's ``_calcu_split_ids`` rule)."""
    n_test = np.array([int(test_fraction * int(n)) for n in counts], dtype=np.int64)
    tiny = (n_test == 0) & (counts >= 2) & (test_fraction * counts > 0)
    n_test[tiny] = 1
    return n_test


def random_holdout(df: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> Split:
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    users = _codes(df)
    rank, count = _rank_within_user(users, rng.random(len(df)))
    n_test = holdout_sizes(count, test_fraction)
    test = rank < n_test
    return Split(
        f"random_holdout_{test_fraction:g}",
        df[~test].reset_index(drop=True),
        df[test].reset_index(drop=True),
    )


def leave_last_out(df: pd.DataFrame) -> Split:
    if "timestamp" not in df.columns or df["timestamp"].isna().all():
        raise ValueError("leave-last-out needs timestamps")
    users = _codes(df)
    ts = df["timestamp"].fillna(-np.inf).to_numpy(dtype=float)
    # latest first; among equal timestamps the row that comes last in the file counts as latest
    rank, count = _rank_within_user(users, np.lexsort((-np.arange(len(df)), -ts)).argsort())
    test = (rank == 0) & (count >= 2)
    return Split("leave_last_out", df[~test].reset_index(drop=True), df[test].reset_index(drop=True))


def kfold(df: pd.DataFrame, k: int = 5, seed: int = 0) -> Iterator[Split]:
    if k < 2:
        raise ValueError("k must be >= 2")
    rng = np.random.default_rng(seed)
    rank, _ = _rank_within_user(_codes(df), rng.random(len(df)))
    fold = rank % k
    for f in range(k):
        test = fold == f
        yield Split(f"fold_{f + 1}_of_{k}", df[~test].reset_index(drop=True), df[test].reset_index(drop=True))
