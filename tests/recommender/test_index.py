"""FAISS retrieval: exact for small catalogues, tuned IVF for large ones, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.recommender.index import VectorIndex, exact_top_k, recall_at_k


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, d))
    return (centres[rng.integers(0, 32, n)] + rng.normal(scale=0.5, size=(n, d))).astype(np.float32)


def test_small_catalogue_gets_exact_search(tmp_path: Path) -> None:
    vectors = clustered(500, 16)
    index = VectorIndex.build(vectors, exact_max=1000)
    assert index.info.kind == "flat"
    q = clustered(5, 16, seed=1)
    _, ids = index.search(q, 10)
    _, truth = exact_top_k(vectors, q, 10)
    assert (ids == truth).all()
    index.save(tmp_path / "ix")
    again = VectorIndex.load(tmp_path / "ix")
    assert (again.search(q, 10)[1] == truth).all()


def test_large_catalogue_gets_ivf_tuned_to_the_recall_target(tmp_path: Path) -> None:
    vectors = clustered(20_000, 16)
    queries = clustered(300, 16, seed=2)
    index = VectorIndex.build(
        vectors,
        exact_max=5000,
        target_recall=0.95,
        tune_queries=queries[:200],
        head_min=1000,
        head_fraction=0.05,
    )
    assert index.info.kind == "ivf" and 0 < index.info.nprobe < index.info.nlist
    assert index.info.head == 1000 and index.info.tail_searched_share > 0.5  # similar norms: the tail matters
    held_out = queries[200:]
    _, truth = exact_top_k(vectors, held_out, 10)
    scores, ids = index.search(held_out, 10)
    assert recall_at_k(ids, truth) >= 0.9
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", held_out, vectors[ids]), rtol=1e-4, atol=1e-3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    index.save(tmp_path / "ivf")
    again = VectorIndex.load(tmp_path / "ivf")
    assert again.info == index.info
    assert (again.search(held_out, 10)[1] == ids).all()


def test_skewed_norms_are_answered_exactly_from_the_head() -> None:
    # like matrix-factorisation items: a few long (popular) vectors, a long tail of short ones
    rng = np.random.default_rng(4)
    vectors = clustered(30_000, 16) * rng.pareto(1.2, size=(30_000, 1)).astype(np.float32) * 0.05
    queries = clustered(100, 16, seed=5)
    index = VectorIndex.build(vectors, kind="ivf", head_min=600, head_fraction=0.0, tune_queries=queries)
    _, truth = exact_top_k(vectors, queries, 10)
    assert index.info.tail_searched_share < 0.5
    assert recall_at_k(index.search(queries, 10)[1], truth) >= 0.95


def test_hnsw_on_request() -> None:
    vectors = clustered(3000, 8)
    index = VectorIndex.build(vectors, kind="hnsw", hnsw_m=16, target_recall=0.9)
    q = clustered(50, 8, seed=3)
    assert recall_at_k(index.search(q, 10)[1], exact_top_k(vectors, q, 10)[1]) >= 0.85
