"""Split and metric code against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from services.recommender import metrics
from services.recommender.split import holdout_sizes, kfold, leave_last_out, random_holdout


def frame(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(weight=1.0)


# --- metrics -----------------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values() -> None:
    # user 0: 3 relevant items, hits at ranks 1 and 3 of the top-5; user 1: 1 relevant, hit at rank 2
    hit = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=bool)
    n_pos = np.array([3, 1])
    m = metrics.per_user(hit, n_pos, 5)
    assert m["precision"] == pytest.approx([2 / 5, 1 / 5])
    assert m["recall"] == pytest.approx([2 / 3, 1.0])
    assert m["hit_rate"] == pytest.approx([1.0, 1.0])
    dcg0 = 1 / math.log2(2) + 1 / math.log2(4)
    idcg0 = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg"] == pytest.approx([dcg0 / idcg0, (1 / math.log2(3)) / 1.0])
    # MAP@5 (RecBole): sum of precision at each hit / min(n_pos, k)
    assert m["map"] == pytest.approx([(1 / 1 + 2 / 3) / 3, (1 / 2) / 1])


def test_ndcg_ideal_is_capped_at_k() -> None:
    hit = np.array([[1, 1]], dtype=bool)
    assert metrics.per_user(hit, np.array([10]), 2)["ndcg"] == pytest.approx([1.0])
    assert metrics.per_user(hit, np.array([10]), 2)["recall"] == pytest.approx([0.2])
    assert metrics.per_user(np.zeros((1, 3), bool), np.array([2]), 3)["ndcg"] == pytest.approx([0.0])


def test_a_catalogue_smaller_than_k_counts_the_missing_ranks_as_misses() -> None:
    # 3 items in all, metrics at 10: the same as a 10-wide hit row with 7 misses
    short = metrics.per_user(np.array([[0, 1, 1]], dtype=bool), np.array([2]), 10)
    padded = metrics.per_user(np.array([[0, 1, 1] + [0] * 7], dtype=bool), np.array([2]), 10)
    assert {k: list(v) for k, v in short.items()} == {k: list(v) for k, v in padded.items()}
    assert short["precision"] == pytest.approx([0.2])


def test_top_k_excludes_training_items_and_orders_best_first() -> None:
    scores = np.array([[0.9, 0.1, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4]])
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))
    assert metrics.top_k(scores, 2, exclude).tolist() == [[2, 3], [3, 2]]


def test_evaluate_end_to_end_and_coverage() -> None:
    train = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=np.float32))
    scores = np.array([[5, 4, 3, 2], [4, 5, 1, 3], [1, 1, 1, 1]], dtype=np.float32)
    result = metrics.evaluate(lambda rows: scores[rows], train, test, ks=(1, 2))
    assert result.users.tolist() == [0, 1]  # user 2 has nothing held out
    # user 0: item 0 is excluded, item 1 comes first: a hit. user 1: item 0 first (miss), item 3 second
    assert result.per_user["precision@1"].tolist() == [1.0, 0.0]
    assert result.mean["hit_rate@1"] == pytest.approx(0.5)
    assert result.mean["hit_rate@2"] == pytest.approx(1.0)
    assert result.per_user["ndcg@2"] == pytest.approx([1.0, 1 / math.log2(3)])
    assert result.mean["coverage@1"] == pytest.approx(2 / 4)  # items 1 and 0
    assert result.mean["coverage@2"] == pytest.approx(4 / 4)


def test_paired_difference_and_standard_error() -> None:
    diff, se = metrics.paired_difference(np.array([0.5, 0.7, 0.9]), np.array([0.4, 0.5, 0.9]))
    assert diff == pytest.approx(0.1)
    assert se == pytest.approx(np.std([0.1, 0.2, 0.0], ddof=1) / math.sqrt(3))


# --- splits ------------------------------------------------------------------------------------------
def test_holdout_sizes_follow_recbole_rule() -> None:
    # int(0.2 n), at least one when the user has two or more items
    assert holdout_sizes(np.array([1, 2, 4, 5, 9, 10, 20]), 0.2).tolist() == [0, 1, 1, 1, 1, 2, 4]


def test_random_holdout_partitions_each_user_and_is_seeded() -> None:
    rows = [(f"u{u}", f"i{i}", float(i)) for u in range(5) for i in range(10)] + [("solo", "i0", 0.0)]
    df = frame(rows)
    a, b = random_holdout(df, 0.2, seed=1), random_holdout(df, 0.2, seed=1)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert a.test.groupby("user_id").size().to_dict() == {f"u{u}": 2 for u in range(5)}
    assert "solo" not in set(a.test["user_id"]) and "solo" in set(a.train["user_id"])
    both = pd.concat([a.train, a.test]).sort_values(["user_id", "item_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(both, df.sort_values(["user_id", "item_id"]).reset_index(drop=True))
    assert not set(map(tuple, a.test[["user_id", "item_id"]].values)) & set(
        map(tuple, a.train[["user_id", "item_id"]].values)
    )
    assert not random_holdout(df, 0.2, seed=2).test.equals(a.test)


def test_leave_last_out_holds_out_the_latest_item() -> None:
    df = frame(
        [
            ("a", "x", 1.0), ("a", "y", 3.0), ("a", "z", 2.0),
            ("b", "x", 5.0), ("b", "y", 5.0),  # tie: the later row counts as latest
            ("c", "x", 1.0),  # one item: stays in train
        ]
    )  # fmt: skip
    split = leave_last_out(df)
    assert sorted(map(tuple, split.test[["user_id", "item_id"]].values)) == [("a", "y"), ("b", "y")]
    assert len(split.train) == 4


def test_kfold_puts_every_row_in_exactly_one_test_fold() -> None:
    df = frame([(f"u{u}", f"i{i}", 0.0) for u in range(4) for i in range(7)])
    seen = []
    for split in kfold(df, k=3, seed=0):
        assert len(split.train) + len(split.test) == len(df)
        seen += list(map(tuple, split.test[["user_id", "item_id"]].values))
    assert len(seen) == len(set(seen)) == len(df)
