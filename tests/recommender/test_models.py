"""Each model on small data with planted structure: two taste groups of users and items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from services.recommender.models import FitContext, Hybrid, Recommender, VectorModel, build
from services.recommender.models.base import row_normalise

N_USERS, N_ITEMS, GROUP_ITEMS = 40, 30, 15


@pytest.fixture(scope="module")
def planted() -> tuple[sp.csr_matrix, np.ndarray, FitContext]:
    rng = np.random.default_rng(0)
    rows, cols = [], []
    group = np.repeat([0, 1], N_USERS // 2)
    for u in range(N_USERS):
        items = rng.choice(GROUP_ITEMS, size=8, replace=False) + group[u] * GROUP_ITEMS
        rows += [u] * len(items)
        cols += items.tolist()
    X = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))
    # "text" embeddings: the item's group direction plus noise
    emb = np.zeros((N_ITEMS, 8), np.float32)
    emb[:GROUP_ITEMS, 0] = 1.0
    emb[GROUP_ITEMS:, 1] = 1.0
    emb += rng.normal(scale=0.2, size=emb.shape).astype(np.float32)
    ts = rng.uniform(0, 30 * 86400, len(rows))
    markets = np.where(np.asarray(rows) < N_USERS // 2, "DE", "FR")
    df = pd.DataFrame({"user_idx": rows, "item_idx": cols, "timestamp": ts, "market": markets})
    ctx = FitContext(seed=0, interactions=df, item_embeddings=row_normalise(emb))
    return X, group, ctx


def in_group_share(model: Recommender, X: sp.csr_matrix, group: np.ndarray, k: int = 5) -> float:
    users = np.arange(X.shape[0])
    scores = model.score(users, X).astype(np.float64)
    scores[X.toarray() > 0] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(((top >= GROUP_ITEMS).astype(int) == group[:, None]).mean())


MODELS = [
    ("als", {"factors": 4, "regularization": 1.0, "iterations": 10}),
    ("bpr", {"factors": 8, "learning_rate": 0.05, "iterations": 200}),
    ("ease", {"l2": 5.0}),
    ("session_ease", {"l2": 5.0}),
    ("torch_mf", {"factors": 8, "epochs": 60, "lr": 0.05}),
    ("torch_mf", {"factors": 4, "epochs": 100, "lr": 0.05, "loss": "mse", "weight_decay": 1e-3}),
    ("torch_mf", {"factors": 8, "epochs": 60, "lr": 0.05, "full_softmax_max_items": 10, "negatives": 16}),
    ("content", {}),
]


@pytest.mark.parametrize(("name", "params"), MODELS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MODELS)])
def test_model_learns_planted_tastes_and_round_trips(
    name: str, params: dict, planted: tuple, tmp_path: Path
) -> None:
    X, group, ctx = planted
    model = build(name, **params)
    model.fit(X, ctx)
    assert in_group_share(model, X, group) >= 0.9
    model.save(tmp_path / "m")
    loaded = Recommender.load(tmp_path / "m")
    users = np.arange(5)
    np.testing.assert_allclose(
        loaded.score(users, X[users]), model.score(users, X[users]), rtol=1e-5, atol=1e-6
    )
    # explanations name the user's own past items
    explained = model.explain(X[0], int(np.argmax(model.score(users[:1], X[:1])[0])), n=3)
    assert all(X[0, i] > 0 for i, _ in explained)


def test_biased_factor_model_is_the_seeds_formula(planted: tuple) -> None:
    X, _, ctx = planted
    model = build("torch_mf", factors=4, epochs=2)
    model.fit(X, ctx)
    u, i = 3, 7
    expected = model.user_factors[u] @ model.item_factors[i] + model.item_bias[i]  # + b_u (constant per user)
    assert model.score(np.array([u]), X[u])[0, i] == pytest.approx(expected, rel=1e-5)
    assert model.user_bias is not None and model.user_bias.shape == (N_USERS,)


def test_als_fold_in_matches_implicit_recalculate_user(planted: tuple) -> None:
    import implicit.cpu.als

    X, _, ctx = planted
    ours = build("als", factors=8, regularization=0.5, alpha=3.0, iterations=5)
    ours.fit(X, ctx)
    ref = implicit.cpu.als.AlternatingLeastSquares(factors=8, regularization=0.5, alpha=3.0, iterations=1)
    ref.user_factors = np.array(ours.user_factors)
    ref.item_factors = np.array(ours.item_factors)
    expected = ref.recalculate_user(0, X[0])
    np.testing.assert_allclose(ours.fold_in(X[0])[0], np.ravel(expected), rtol=1e-3, atol=1e-4)
    # explanation (Hu, Koren and Volinsky, section 5): c_j * y_i' A^-1 y_j over the past items j
    # adds up to the folded-in score, and explain() returns the largest positive terms
    item = 20
    A, _ = ours._system(X[0].indices, X[0].data)
    Y = ours.item_factors[X[0].indices].astype(np.float64)
    terms = 3.0 * X[0].data * (Y @ np.linalg.solve(A, ours.item_factors[item].astype(np.float64)))
    assert terms.sum() == pytest.approx(float(ours.fold_in(X[0])[0] @ ours.item_factors[item]), rel=1e-3)
    top = sorted(
        ((int(j), float(t)) for j, t in zip(X[0].indices, terms, strict=True) if t > 0), key=lambda x: -x[1]
    )
    assert [j for j, _ in ours.explain(X[0], item, n=3)] == [j for j, _ in top[:3]]


def test_vector_user_moves_only_by_new_events(planted: tuple) -> None:
    X, _, ctx = planted
    model = build("als", factors=8, regularization=0.1, iterations=10)
    model.fit(X, ctx)
    assert isinstance(model, VectorModel)
    same = model.user_vectors(np.array([2]), X[2], X[2])
    np.testing.assert_allclose(same[0], model.user_factors[2])
    richer = X[2].tolil()
    richer[0, 29] = 5.0
    moved = model.user_vectors(np.array([2]), richer.tocsr(), X[2])[0]
    assert moved @ model.item_factors[29] > model.user_factors[2] @ model.item_factors[29]
    unknown = model.user_vectors(np.array([-1]), X[2], None)[0]
    np.testing.assert_allclose(unknown, model.fold_in(X[2])[0])


def test_ease_is_the_closed_form_and_explanations_add_up(planted: tuple) -> None:
    X, _, ctx = planted
    model = build("ease", l2=3.0)
    model.fit(X, ctx)
    G = (X.T @ X).toarray() + 3.0 * np.eye(N_ITEMS)
    P = np.linalg.inv(G)
    B = np.eye(N_ITEMS) - P / np.diag(P)
    np.testing.assert_allclose(model.B, B, atol=1e-5)
    assert np.allclose(np.diag(model.B), 0)
    score = model.score(np.array([0]), X[0])[0]
    item = int(np.argmax(np.where(X[0].toarray()[0] > 0, -np.inf, score)))
    terms = {int(j): float(model.B[j, item]) for j in X[0].indices}
    assert sum(terms.values()) == pytest.approx(float(score[item]), rel=1e-4)
    explained = model.explain(X[0], item, n=3)
    assert explained == [
        (j, pytest.approx(w, rel=1e-5)) for j, w in sorted(terms.items(), key=lambda x: -x[1])[:3]
    ]


def test_market_aware_popularity(planted: tuple) -> None:
    X, _, ctx = planted
    model = build("popularity", window_days=60, min_market_events=1)
    model.fit(X, ctx)
    de, fr = model.for_market("DE"), model.for_market("FR")
    assert de[:GROUP_ITEMS].sum() > de[GROUP_ITEMS:].sum()  # German users bought group-0 items
    assert fr[GROUP_ITEMS:].sum() > fr[:GROUP_ITEMS].sum()
    np.testing.assert_allclose(model.for_market("JP"), model.global_pop)
    assert model.global_pop.max() == pytest.approx(1.0)


def test_hybrid_blends_standardised_scores(planted: tuple, tmp_path: Path) -> None:
    X, group, ctx = planted
    parts = {
        "ease": build("ease", l2=5.0),
        "content": build("content"),
        "popularity": build("popularity"),
    }
    for m in parts.values():
        m.fit(X, ctx)
    hybrid = Hybrid.from_fitted(parts, {"ease": 1.0, "content": 0.5, "popularity": 0.0})
    users = np.arange(4)
    expected = sum(
        w
        * (lambda s: (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True))(
            parts[n].score(users, X[users])
        )
        for n, w in (("ease", 1.0), ("content", 0.5))
    )
    np.testing.assert_allclose(hybrid.score(users, X[users]), expected, rtol=1e-4, atol=1e-5)
    assert in_group_share(hybrid, X, group) >= 0.9
    hybrid.save(tmp_path / "h")
    again = Recommender.load(tmp_path / "h")
    np.testing.assert_allclose(again.score(users, X[users]), hybrid.score(users, X[users]), rtol=1e-5)
    assert hybrid.explain(X[0], 3)  # blends the components' explanations
    fitted = build("hybrid", components={"ease": {"l2": 5.0}, "popularity": {}}, weights={"ease": 1.0})
    fitted.fit(X, ctx)
    assert set(fitted.components) == {"ease", "popularity"}


def test_unknown_parameters_and_models_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        build("als", factorz=3)
    with pytest.raises(ValueError, match="unknown model"):
        build("svd++")
    with pytest.raises(ValueError, match="EASE needs"):
        build("ease", max_items=10).fit(sp.csr_matrix((2, 11), dtype=np.float32), FitContext())


def test_popularity_all_time_counts_every_event_undecayed(planted: tuple) -> None:
    X, _, ctx = planted
    df = ctx.interactions.copy()
    df["timestamp"] = np.where(df["item_idx"] == 0, 0.0, 400 * 86400.0)  # item 0: only long ago
    recent = build("popularity", window_days=30, half_life_days=7)
    recent.fit(X, FitContext(interactions=df))
    assert recent.global_pop[0] == 0.0  # outside the window
    all_time = build("popularity", window_days=None, half_life_days=None)
    all_time.fit(X, FitContext(interactions=df))
    counts = np.bincount(df["item_idx"], minlength=N_ITEMS).astype(np.float32)
    np.testing.assert_allclose(all_time.global_pop, counts / counts.max(), rtol=1e-6)
    window_only = build("popularity", window_days=None, half_life_days=30)
    window_only.fit(X, FitContext(interactions=df))
    assert 0 < window_only.global_pop[0] < all_time.global_pop[0]  # counted, but decayed


def test_popularity_grid_is_tuned_with_all_time_among_the_choices() -> None:
    """Item "old" was bought by everyone long ago, "new" by a few lately: a random holdout finds
    "old" in most test sets, so tuning must pick undecayed all-time counts (a tie keeps all time)."""
    from services.recommender import train
    from services.runtime.device import Device

    grid = train.GRIDS["popularity"]
    assert {"window_days": None, "half_life_days": None} in grid
    assert "popularity" in train.QUICK
    rng = np.random.default_rng(1)
    rows = []
    day = 86400.0
    for u in range(60):
        rows += [(f"u{u}", "old", 1.0, rng.uniform(0, 200) * day) for _ in range(1)]
        rows += [
            (f"u{u}", f"filler{j}", 1.0, rng.uniform(0, 400) * day) for j in rng.choice(30, 4, replace=False)
        ]
        if u < 8:
            rows.append((f"u{u}", "new", 1.0, 399 * day))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    prepared = train.prepare(df)
    config = train.TrainConfig(
        models=("popularity",), serve="popularity", tune="quick", seed=0, progress=False
    )
    params, report = train.tune(prepared, prepared.interactions, ["popularity"], config, None, Device("cpu"))
    assert len(report["studies"]["popularity"]["trials"]) == len(grid)  # exhaustive: a small grid
    tried = report["studies"]["popularity"]["trials"]
    best = report["studies"]["popularity"]["ndcg@10"]
    assert all(t["ndcg@10"] < best for t in tried if t["params"]["half_life_days"] is not None)
    assert params["popularity"]["window_days"] is None and params["popularity"]["half_life_days"] is None
    explicit = train.TrainConfig(
        models=("popularity",),
        serve="popularity",
        seed=0,
        progress=False,
        params={"popularity": {"window_days": 7.0}},
    )
    params, report = train.tune(
        prepared, prepared.interactions, ["popularity"], explicit, None, Device("cpu")
    )
    studies = report["studies"]["popularity"]["trials"]  # only the half-life is left to tune
    assert params["popularity"]["window_days"] == 7.0 and all(
        set(t["params"]) == {"half_life_days"} for t in studies
    )


def test_cold_start_protocol_keeps_the_first_events_and_judges_the_rest() -> None:
    from bench.recommender import cold_start_ndcg, cold_start_split
    from services.recommender.data import Encoding

    rng = np.random.default_rng(2)
    rows = [
        (f"u{u}", f"i{j}", float(t))
        for u in range(50)
        for t, j in enumerate(rng.choice(40, 10, replace=False))
    ]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    df["weight"] = 1.0
    for n in (0, 1, 3):
        tr, te, cold = cold_start_split(df, n, cold_share=0.2, seed=0)
        assert len(cold) == 10
        kept = tr[tr["user_id"].isin(cold)].groupby("user_id")["timestamp"]
        assert (kept.size().reindex(cold, fill_value=0) == n).all()
        if n:
            assert (kept.max() < te.groupby("user_id")["timestamp"].min().reindex(kept.max().index)).all()
        assert set(te["user_id"]) == set(cold)
        assert len(tr) + len(te) == len(df)
    enc = Encoding.fit(df)
    tr, te, cold = cold_start_split(df, 1, seed=0)
    truth = enc.matrix(te, binary=True).toarray()

    def oracle(rows: np.ndarray, X: sp.csr_matrix) -> np.ndarray:
        return truth[rows]

    def anti(rows: np.ndarray, X: sp.csr_matrix) -> np.ndarray:
        return -truth[rows]

    assert cold_start_ndcg(enc, tr, te, cold, oracle) == pytest.approx(1.0)
    assert cold_start_ndcg(enc, tr, te, cold, anti) < 0.5


def test_content_path_blends_popularity_and_new_items_get_their_neighbours_prior() -> None:
    from services.recommender.engine import cold_content_scores, content_profile, new_item_prior

    content = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]]  # items 0,1 alike; 2,3 alike
    hist = sp.csr_matrix(([1.0], ([0], [2])), shape=(1, 4))
    q = content_profile(content, hist)
    assert q is not None
    pop = np.array([1.0, 0.0, 0.1, 0.0], np.float32)
    assert np.argmax(cold_content_scores(content, q, pop, weight=0.0)) in (2, 3)
    assert np.argmax(cold_content_scores(content, q, pop, weight=2.0)) == 0
    prior = new_item_prior(pop, content, np.eye(4, dtype=np.float32)[[0]], k=2)
    assert prior[0] == pytest.approx(0.75)  # upper quartile of items 0 and 1 (1.0 and 0.0)
    assert new_item_prior(pop, None, content[:1]).tolist() == [0.0]
    assert content_profile(content, sp.csr_matrix((1, 4))) is None


def test_fresh_items_take_every_tenth_place_after_the_first_page() -> None:
    from services.recommender.engine import with_fresh_places

    ranked = list(range(100, 150))
    placed = with_fresh_places(ranked, [7, 101, 8, 9, 10, 11], 50)
    assert placed[:19] == ranked[:19]  # the first pages by merit
    assert [placed[i] for i in (19, 29, 39, 49)] == [7, 8, 9, 10]  # 101 is already listed on merit
    assert len(placed) == 50 and len(set(placed)) == 50
    assert with_fresh_places(ranked, [7], 10) == ranked[:10]  # one page: untouched
    assert with_fresh_places(ranked[:25], [], 25) == ranked[:25]
