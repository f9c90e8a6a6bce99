"""The training pipeline as one command, retraining from the event log, erasure in the next version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.recommender import train
from services.recommender.bundle import load_bundle
from services.recommender.events import Event, EventStore
from services.runtime.model_store import ModelStore
from tests.recommender.conftest import Shop


def test_cli_cleans_splits_tunes_evaluates_charts_and_saves_a_version(
    shop: Shop, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    train.main(
        [
            "--interactions", str(shop.interactions_path),
            "--items", str(shop.items_path),
            "--models", "popularity,als,ease,session_ease,torch_mf,content,hybrid",
            "--param", "als.factors=8", "--param", "torch_mf.epochs=3", "--param", "torch_mf.factors=8",
            "--min-user-interactions", "3",
            "--models-dir", str(models),
            "--out", str(tmp_path / "eval"),
            "--embeddings-cache", str(shop.cache_path),
            "--device", "cpu",
        ]
    )  # fmt: skip
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert set(evaluation["splits"]) == {"random_holdout_0.2", "leave_last_out"}
    for by_model in evaluation["splits"].values():
        assert set(by_model) == {"popularity", "als", "ease", "session_ease", "torch_mf", "content", "hybrid"}
        for m in by_model.values():
            assert {"precision@10", "recall@10", "ndcg@10", "map@10", "hit_rate@10", "coverage@10"} <= set(m)
    assert evaluation["tuning"]["grid"]["ease"]["best"] and "weights" in evaluation["tuning"]["blend"]
    # every model's validation NDCG@10, from which a benchmark picks "ours" without the test split
    assert set(evaluation["tuning"]["validation_ndcg@10"]) == set(by_model)
    assert (tmp_path / "eval" / "evaluation.png").stat().st_size > 10_000
    entry = ModelStore(models, "recommender").newest_valid()
    assert entry is not None and entry.manifest is not None
    assert entry.manifest.params["serving_model"] == "hybrid"
    assert (
        entry.manifest.metrics["ndcg@10"] == evaluation["splits"]["random_holdout_0.2"]["hybrid"]["ndcg@10"]
    )
    assert (entry.path / "evaluation.json").exists() and (entry.path / "evaluation.png").exists()
    assert "saved model version" in capsys.readouterr().out


def test_retraining_from_the_event_log_applies_events_and_erasure(shop: Shop, tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.sqlite3")
    known = str(shop.prepared.interactions.user_id.iloc[0])
    items = [str(i) for i in shop.prepared.items.item_id[:5]]
    store.append([Event("newcomer", i, 3, None, 1e9) for i in items])
    store.append([Event(known, items[0], 1, None, 1e9)])
    assert store.forget(known) == 1
    store.upsert_items(
        [("FRESH", {"title": "Fjord Kaffeebohnen 1", "category": "coffee", "markets": ["DE"]}, None)]
    )
    store.close()
    prepared = train.prepare(shop.interactions_path, shop.items_path, tmp_path / "events.sqlite3")
    # the newest event read is seq 5 (the erasure deleted seq 6): the engine folds in from there
    assert prepared.report.dropped_forgotten > 0 and prepared.events_seq == 5
    assert known not in set(prepared.interactions.user_id) and "newcomer" in set(
        prepared.interactions.user_id
    )
    assert "FRESH" in set(prepared.items.item_id)
    config = train.TrainConfig(
        models=("popularity", "als"), serve="als", tune="none", evaluate=False, progress=False,
        params={"als": {"factors": 4, "iterations": 3}},
    )  # fmt: skip
    result = train.run(
        prepared, config, None, train.Device("cpu"), ModelStore(tmp_path / "m", "recommender"), None
    )
    bundle = load_bundle(tmp_path / "m" / "recommender" / result.version)
    assert known not in set(bundle.users) and "newcomer" in set(bundle.users)
    assert bundle.events_seq == 5 and bundle.index is not None
    row = int(bundle.user_pos.get_indexer(["newcomer"])[0])
    assert bundle.history[row].nnz == 5 and np.any(bundle.model.user_factors[row])
    # the event store itself is a training input too
    again = train.prepare(tmp_path / "events.sqlite3")
    assert set(again.interactions.user_id) == {"newcomer"}


def test_store_names_the_event_store_of_the_cbec_settings(
    shop: Shop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--events store`` reads the store the server writes: here the embedded one in CBEC_STATE_DIR
    (a training job in the cluster reads the shared PostgreSQL the same way: test_replicas.py)."""
    monkeypatch.setenv("CBEC_STATE_DIR", str(tmp_path / "state"))
    store = EventStore(tmp_path / "state" / "recommender.sqlite3")
    items = [str(i) for i in shop.prepared.items.item_id[:4]]
    store.append([Event("from-the-store", i, 3, None, 1e9) for i in items])
    store.close()
    prepared = train.prepare(shop.interactions_path, shop.items_path, train.STORE)
    assert "from-the-store" in set(prepared.interactions.user_id) and prepared.events_seq == 4
    alone = train.prepare(train.STORE)
    assert set(alone.interactions.user_id) == {"from-the-store"}
    assert alone.fingerprint and alone.fingerprint != prepared.fingerprint
    assert train._cache_path() == tmp_path / "state" / "recommender" / "embeddings.sqlite3"
