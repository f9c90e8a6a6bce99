"""The training pipeline as one command, retraining from the event log, erasure in the next version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
            "--budget-minutes", "0.1",
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
    assert evaluation["tuning"]["studies"]["ease"]["best"] and "weights" in evaluation["tuning"]["blend"]
    # every model's validation NDCG@10, from which a benchmark picks "ours" without the test split
    assert set(evaluation["tuning"]["validation_ndcg@10"]) == set(by_model)
    assert (tmp_path / "eval" / "evaluation.png").stat().st_size > 10_000
    entry = ModelStore(models, "recommender").newest_valid()
    assert entry is not None and entry.manifest is not None
    assert entry.manifest.params["serving_model"] == "hybrid"
    assert (
        entry.manifest.metrics["ndcg@10"] == evaluation["splits"]["random_holdout_0.2"]["hybrid"]["ndcg@10"]
    )
    assert all((entry.path / name).exists() for name in ("evaluation.json", "evaluation.png", "tuning.png"))
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


# --- the command line on bad input: one line naming the file, exit status 2, no traceback ----------
def _write_bad(path: Path, kind: str) -> None:
    """A bad input file of each ``kind`` (named by the test's parameter)."""
    import pandas as pd

    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank_lines":
        path.write_text("\n\n")
    elif kind == "header_only":
        path.write_text("user_id,item_id,rating\n")
    elif kind == "no_item_column":
        path.write_text("user_id,product,rating\nu1,p1,4\nu2,p2,5\n")
    elif kind == "misnamed_columns":
        path.write_text("who\twhat\nu1\tp1\nu2\tp2\n")
    elif kind == "ratings_not_numeric":
        path.write_text("user_id,item_id,rating\nu1,p1,good\nu2,p2,bad\nu2,p1,great\n")
    elif kind == "parquet_garbage":
        path.write_bytes(b"PAR1 this is not a parquet file")
    elif kind == "parquet_empty_file":
        path.write_bytes(b"")
    elif kind == "parquet_no_rows":
        pd.DataFrame({"user_id": pd.Series([], dtype=str), "item_id": pd.Series([], dtype=str)}).to_parquet(
            path
        )
    elif kind == "one_user":
        path.write_text("user_id,item_id\n" + "".join(f"only,p{i}\n" for i in range(8)))
    elif kind == "not_an_event_store":
        path.write_bytes(b"SQLite format 2 -- not really\n" * 10)
    else:
        raise AssertionError(kind)


BAD_FILES = {
    # kind: (file name, words the message must hold)
    "empty": ("empty.csv", "empty file"),
    "blank_lines": ("blank.csv", "empty file"),
    "header_only": ("header.csv", "no rows"),
    "no_item_column": ("orders.csv", "missing column(s) ['item_id']"),
    "misnamed_columns": ("renamed.tsv", "missing column(s) ['user_id', 'item_id']"),
    "ratings_not_numeric": ("stars.csv", "'rating' is not numeric"),
    "parquet_garbage": ("broken.parquet", "unreadable Parquet"),
    "parquet_empty_file": ("zero.parquet", "unreadable Parquet"),
    "parquet_no_rows": ("norows.parquet", "no rows"),
    "one_user": ("alone.csv", "1 user left after cleaning; training needs at least 2"),
    "not_an_event_store": ("events.db", "not a readable event store"),
}


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The train command as a user runs it, in ``tmp_path`` with no ``CBEC_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBEC_")}
    env.update(OPENBLAS_NUM_THREADS="1", CBEC_DEVICE="cpu")
    argv = [sys.executable, "-m", "services.recommender.train", *args]
    argv += ["--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "eval"), "--no-content"]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_interactions_file_is_one_line_naming_it_and_exit_2(kind: str, tmp_path: Path) -> None:
    name, problem = BAD_FILES[kind]
    path = tmp_path / name
    _write_bad(path, kind)
    done = run_cli(tmp_path, "--interactions", str(path), "--min-user-interactions", "1")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{train.PROG}: error: {path}: ") and problem in lines[0], lines[0]
    assert not (tmp_path / "models").exists()  # it stopped before training


def test_a_bad_items_file_and_too_few_items_for_the_cutoffs_exit_2(tmp_path: Path) -> None:
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id\n" + "".join(f"u{u},p{i}\n" for u in range(3) for i in range(4)))
    items = tmp_path / "items.csv"
    items.write_text("name,title\nx,y\n")
    done = run_cli(
        tmp_path, "--interactions", str(inter), "--items", str(items), "--min-user-interactions", "1"
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{items}: missing column 'item_id'" in done.stderr
    done = run_cli(tmp_path, "--interactions", str(inter), "--min-user-interactions", "1")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{inter}: 4 items, fewer than the largest cut-off --ks 20" in done.stderr
    # with the default --min-user-interactions 5 nobody is left: the line says why
    done = run_cli(tmp_path, "--interactions", str(inter))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{inter}: no user has 5 or more items (--min-user-interactions) after cleaning" in done.stderr
    assert "12 rows read, 12 left" in done.stderr


def test_unknown_models_and_a_serve_model_not_trained_are_usage_errors(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--interactions", "x.csv", "--models", "als,nope")
    assert done.returncode == 2 and "unknown model(s) ['nope']" in done.stderr
    done = run_cli(tmp_path, "--interactions", "x.csv", "--models", "popularity,als")
    assert done.returncode == 2 and "--serve 'hybrid' is not among --models" in done.stderr
    assert "Traceback" not in done.stderr
