"""Budgeted tuning (services/recommender/tuning.py): Optuna with pruning, what it reuses, its chart."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from services.recommender import train, tuning
from services.recommender.models import FitContext, build
from services.recommender.split import random_holdout
from tests.recommender.conftest import Shop


@pytest.fixture(scope="module")
def folds(shop: Shop) -> list[tuning.Fold]:
    enc = shop.prepared.encoding
    out = []
    for seed in (1, 2):
        valid = random_holdout(shop.prepared.interactions, 0.2, seed)
        X, T = enc.matrix(valid.train), enc.matrix(valid.test, binary=True)
        ctx = FitContext(interactions=enc.add_index_columns(valid.train))
        out.append(tuning.Fold(X, T, ctx, np.flatnonzero(np.diff(T.indptr) > 0)))
    return out


def _clock() -> float:
    return time.perf_counter()


def test_the_search_starts_from_the_defaults_and_keeps_the_best_trial(folds: list[tuning.Fold]) -> None:
    study = tuning.search("ease", {}, folds, seconds=60, seed=0, clock=_clock, max_trials=8)
    assert study.trials[0]["params"] == {"l2": build("ease").params["l2"]}  # the defaults, first
    assert len(study.trials) == 8
    complete = [t for t in study.trials if t["state"] == "complete"]
    assert study.best_value == pytest.approx(max(t["ndcg@10"] for t in complete), abs=1e-5)
    # the blend reuses the best trial's scores: they are that setting's scores on each fold
    refit = [build("ease", **study.best_params).fit_scores(f.X, f.ctx, f.users) for f in folds]
    for kept, again in zip(study.best_scores, refit, strict=True):
        np.testing.assert_allclose(kept, again, rtol=1e-4, atol=1e-6)


def test_parameters_set_explicitly_are_not_searched(folds: list[tuning.Fold]) -> None:
    study = tuning.search("als", {"alpha": 3.0, "factors": 4}, folds, 60, 0, _clock, max_trials=3)
    assert all(set(t["params"]) == {"regularization"} for t in study.trials)
    assert study.best_params["alpha"] == 3.0 and study.best_params["factors"] == 4


def test_popularity_is_searched_exhaustively_with_all_time_among_the_choices(
    folds: list[tuning.Fold],
) -> None:
    study = tuning.search("popularity", {}, folds, 60, 0, _clock)
    tried = {(t["params"]["window_days"], t["params"]["half_life_days"]) for t in study.trials}
    assert tried == set(itertools.product([None, 90.0, 30.0, 7.0], [None, 30.0, 7.0]))


def test_als_reports_every_few_epochs_and_slow_settings_are_pruned(folds: list[tuning.Fold]) -> None:
    seen: list[int] = []
    ctx = FitContext(on_epoch=lambda epoch, model: seen.append(epoch))
    build("als", factors=4, iterations=7).fit(folds[0].X, ctx)
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    study = tuning.search("als", {"factors": 4, "iterations": 15}, folds, 120, 0, _clock, max_trials=25)
    states = [t["state"] for t in study.trials]
    assert "pruned" in states and "complete" in states


def test_the_budget_bounds_the_search(folds: list[tuning.Fold]) -> None:
    study = tuning.search("session_ease", {}, folds, 0.0, 0, _clock)
    assert len(study.trials) == 1 and study.trials[0]["state"] == "complete"  # the defaults, then stop
    assert study.best_params["l2"] == build("session_ease").params["l2"]


def test_session_ease_scores_for_tuning_equal_its_serving_scores() -> None:
    rng = np.random.default_rng(0)
    X = sp.csr_matrix((rng.random((80, 40)) < 0.2).astype(np.float32))
    rows = np.arange(0, 80, 3)
    seen = X[rows].toarray() > 0
    for params in ({"dropout": 0.0, "pop_exponent": 0.1}, {"dropout": 0.5, "pop_exponent": 0.2}):
        ctx = FitContext()
        fast = build("session_ease", session_weight=0.0, **params).fit_scores(X, ctx, rows)
        model = build("session_ease", session_weight=0.0, **params)
        model.fit(X, ctx)  # reuses the Gram matrix kept in ctx
        np.testing.assert_allclose(fast[~seen], model.score(rows, X[rows])[~seen], rtol=1e-4, atol=1e-5)
    assert any(key[0] == "gram" for key in ctx.cache)


def test_ease_by_cholesky_equals_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    X = sp.csr_matrix((rng.random((60, 30)) < 0.25).astype(np.float32))
    model = build("ease", l2=10.0)
    model.fit(X, FitContext())
    G = (X.T @ X).toarray().astype(np.float64) + 10.0 * np.eye(30)
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    np.testing.assert_allclose(model.B, B, rtol=1e-4, atol=1e-5)  # float32 Cholesky


def test_the_train_command_tunes_within_its_budget_and_charts_the_curve(shop: Shop, tmp_path: Path) -> None:
    train.main(
        [
            "--interactions", str(shop.interactions_path),
            "--items", str(shop.items_path),
            "--models", "popularity,als,ease,content,hybrid",
            "--param", "als.factors=8",
            "--min-user-interactions", "3",
            "--budget-minutes", "0.05",
            "--splits", "random",
            "--no-save",
            "--out", str(tmp_path / "eval"),
            "--embeddings-cache", str(shop.cache_path),
            "--device", "cpu",
        ]
    )  # fmt: skip
    tuned = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["tuning"]
    assert tuned["search"] == "budget" and tuned["budget_s"] == pytest.approx(3.0)
    assert set(tuned["studies"]) == {"popularity", "als", "ease"}
    for study in tuned["studies"].values():
        assert study["trials"] and study["ndcg@10"] > 0
    assert set(tuned["validation_ndcg@10"]) == {"popularity", "als", "ease", "content", "hybrid"}
    assert (tmp_path / "eval" / "tuning.png").stat().st_size > 10_000


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_a_bad_budget_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--interactions", "ml-100k", "--budget-minutes", value])
    assert exit_info.value.code == 2
    assert "--budget-minutes" in capsys.readouterr().err
