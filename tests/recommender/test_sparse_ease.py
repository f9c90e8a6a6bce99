"""sparse_ease: EASE restricted to each item's top-k co-occurring neighbours (models/sparse_ease.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from services.recommender.models import EASE, FitContext, Recommender, SparseEASE, build
from services.runtime.device import Device
from tests.recommender.conftest import Shop, settings_for


def random_binary(n_users: int, n_items: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((n_users, n_items)) < density).astype(np.float32))


def fitted(X: sp.csr_matrix, **params: object) -> SparseEASE:
    model = build("sparse_ease", **params)
    assert isinstance(model, SparseEASE)
    model.fit(X, FitContext())
    return model


def test_with_every_neighbour_it_is_ease() -> None:
    """With each item's full co-occurring support, every column is EASE's closed-form column."""
    X = random_binary(60, 25, 0.4, seed=1)
    G = (X.T @ X).toarray()
    assert (G > 0).all()  # every pair co-occurs: the full support is every other item
    dense = build("ease", l2=10.0)
    assert isinstance(dense, EASE)
    dense.fit(X, FitContext())
    sparse = fitted(X, l2=10.0, neighbours=100, batch=7)  # several batches, the last one short
    assert sparse.B.shape == (25, 25) and sparse.B.nnz == 25 * 24
    np.testing.assert_allclose(sparse.B.toarray(), dense.B, atol=1e-4)
    users = np.arange(10)
    np.testing.assert_allclose(sparse.score(users, X[users]), dense.score(users, X[users]), atol=1e-4)


def test_each_column_is_the_ridge_regression_on_its_top_neighbours() -> None:
    dense = (np.random.default_rng(2).random((80, 31)) < 0.15).astype(np.float32)
    dense[:, 30] = 0.0
    X = sp.csr_matrix(np.vstack([dense, np.eye(1, 31, 30, dtype=np.float32)]))  # item 30: co-occurs with none
    G = (X.T @ X).toarray().astype(np.float64)
    k, l2 = 4, 7.0
    model = fitted(X, l2=l2, neighbours=k, batch=8)
    B = model.B.tocsc()
    for j in range(X.shape[1]):
        others = [i for i in range(X.shape[1]) if i != j and G[j, i] > 0]
        support = sorted(sorted(others, key=lambda i: (-G[j, i], i))[:k])  # ties: lower index
        col = B[:, j]
        assert sorted(col.indices.tolist()) == support, j
        if support:
            expected = np.linalg.solve(G[np.ix_(support, support)] + l2 * np.eye(len(support)), G[support, j])
            np.testing.assert_allclose(col.toarray().ravel()[support], expected, rtol=1e-5, atol=1e-7)
    assert B[:, 30].nnz == 0 and model.B[30].nnz == 0
    assert np.diff(B.indptr).max() == k
    # batching changes nothing
    np.testing.assert_array_equal(fitted(X, l2=l2, neighbours=k, batch=1).B.toarray(), model.B.toarray())


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_and_explanations(tmp_path: Path, mmap: bool) -> None:
    X = random_binary(50, 40, 0.2, seed=3)
    model = fitted(X, l2=5.0, neighbours=8)
    model.save(tmp_path / "m")
    loaded = Recommender.load(tmp_path / "m", mmap=mmap)
    assert isinstance(loaded, SparseEASE) and loaded.n_items == 40
    users = np.arange(8)
    np.testing.assert_array_equal(loaded.score(users, X[users]), model.score(users, X[users]))
    h = X[0]
    scores = loaded.score(users[:1], h)[0]
    scores[h.indices] = -np.inf
    item = int(np.argmax(scores))
    explained = loaded.explain(h, item, n=3)
    B = model.B.toarray()
    expected = sorted(((int(i), float(B[i, item])) for i in h.indices if B[i, item] > 0), key=lambda t: -t[1])
    assert explained == expected[:3] and explained
    assert loaded.explain(sp.csr_matrix((1, 40), dtype=np.float32), item) == []


def test_it_ranks_held_out_items_well_above_popularity() -> None:
    from services.recommender.data import Encoding, clean_interactions, synthetic_catalogue
    from services.recommender.metrics import evaluate
    from services.recommender.split import random_holdout

    data = synthetic_catalogue(n_items=400, n_users=300, texts=False, seed=5)
    df, _ = clean_interactions(data.interactions)
    split = random_holdout(df, 0.2, seed=0)
    enc = Encoding.fit(df, items=data.items.item_id)
    train, test = enc.matrix(split.train, binary=True), enc.matrix(split.test, binary=True)
    ndcg = {}
    for name, params in (
        ("popularity", {}),
        ("ease", {"l2": 50.0}),
        ("sparse_ease", {"l2": 50.0, "neighbours": 16}),
    ):
        model = build(name, **params)
        model.fit(train, FitContext())
        result = evaluate(lambda rows, m=model: m.score(rows, train[rows]), train, test, ks=(10,))
        ndcg[name] = result.mean["ndcg@10"]
    assert ndcg["sparse_ease"] > 1.5 * ndcg["popularity"], ndcg
    assert ndcg["sparse_ease"] > 0.85 * ndcg["ease"], ndcg  # 16 neighbours of 400 items keep most of EASE


def test_bad_parameters_name_themselves() -> None:
    X = random_binary(10, 5, 0.5, seed=4)
    with pytest.raises(ValueError, match="l2"):
        fitted(X, l2=0.0)
    with pytest.raises(ValueError, match="neighbours"):
        fitted(X, neighbours=0)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_fit_matches_the_cpu_fit() -> None:
    X = random_binary(200, 120, 0.1, seed=6)
    cpu = fitted(X, l2=20.0, neighbours=16)
    gpu = build("sparse_ease", l2=20.0, neighbours=16)
    gpu.fit(X, FitContext(device=Device("cuda")))
    assert isinstance(gpu, SparseEASE)
    np.testing.assert_allclose(gpu.B.toarray(), cpu.B.toarray(), rtol=1e-5, atol=1e-6)


def test_a_bundle_serving_it_gives_similar_items_from_b(shop: Shop, tmp_path: Path) -> None:
    """SimilarItems' collaborative source ranks by B[i, j] + B[j, i] from the sparse B."""
    from services.recommender.bundle import load_bundle
    from services.recommender.engine import Engine
    from services.recommender.events import EventStore
    from services.recommender.train import TrainConfig, run
    from services.runtime.model_store import ModelStore

    store = ModelStore(tmp_path / "models", "recommender")
    config = TrainConfig(
        models=("popularity", "sparse_ease"), serve="sparse_ease", tune="none", evaluate=False,
        progress=False, params={"sparse_ease": {"l2": 20.0, "neighbours": 8}},
    )  # fmt: skip
    run(shop.prepared, config, None, Device("cpu"), store, None)
    entry = store.newest_valid()
    assert entry is not None
    bundle = load_bundle(entry.path)
    assert isinstance(bundle.model, SparseEASE) and sp.issparse(bundle.ease_matrix())
    events = EventStore(tmp_path / "events.sqlite3")
    try:
        engine = Engine(bundle, events, settings_for(tmp_path / "models", tmp_path, shop.cache_path))
        item = str(shop.prepared.interactions.item_id.value_counts().index[0])
        col = engine.col_of(item)
        similar = engine.similar(item, 3, "", [], "collaborative")
        assert similar is not None and len(similar) == 3
        B = bundle.model.B.toarray()
        sims = B[col] + B[:, col]
        sims[col] = -np.inf
        ids = bundle.catalogue.item_ids
        assert [r.item_id for r in similar] == [str(ids[i]) for i in np.argsort(-sims, kind="stable")[:3]]
    finally:
        events.close()


def test_a_matrix_without_co_occurrence_gives_an_empty_b() -> None:
    for X in (sp.csr_matrix((4, 6), dtype=np.float32), sp.csr_matrix(np.eye(3, dtype=np.float32))):
        model = fitted(X)
        assert model.B.shape == (X.shape[1],) * 2 and model.B.nnz == 0
        assert not model.score(np.arange(X.shape[0]), X).any()
