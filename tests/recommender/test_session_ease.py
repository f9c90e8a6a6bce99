"""SessionEASE: EASE with dropout regularisation, session co-occurrence and a popularity discount."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from services.recommender.models import EASE, FitContext, Recommender, SessionEASE, build
from services.recommender.models.session_ease import session_matrix
from tests.recommender.conftest import Shop, settings_for

DAY = 86400.0


def _data(rows: list[tuple[int, int, float]], n_items: int) -> tuple[sp.csr_matrix, FitContext]:
    df = pd.DataFrame(rows, columns=["user_idx", "item_idx", "timestamp"])
    X = sp.csr_matrix(
        (np.ones(len(df), np.float32), (df["user_idx"], df["item_idx"])),
        shape=(int(df["user_idx"].max()) + 1, n_items),
    )
    return X, FitContext(interactions=df)


@pytest.fixture
def sessions() -> tuple[sp.csr_matrix, FitContext]:
    """Items 1 and 2 are each bought by the same users as item 0, but item 1 in the same sitting as
    item 0 and item 2 weeks later; item 3 is background."""
    rows = []
    for u in range(12):
        rows += [(u, 0, 0.0), (u, 1, 0.0), (u, 2, 30 * DAY + u), (u, 3 + u % 2, 60 * DAY)]
    rows += [(12, 0, 5 * DAY)]  # the user to recommend for
    return _data(rows, 5)


def test_plain_settings_are_ease(sessions: tuple) -> None:
    X, ctx = sessions
    plain = build("session_ease", l2=3.0, dropout=0.0, session_weight=0.0, pop_exponent=0.0)
    plain.fit(X, ctx)
    ease = build("ease", l2=3.0)
    ease.fit(X, ctx)
    np.testing.assert_allclose(plain.B, ease.B, rtol=1e-5, atol=1e-6)  # type: ignore[attr-defined]


def test_items_from_the_same_session_score_higher(sessions: tuple) -> None:
    X, ctx = sessions
    user = np.array([12])
    without = build("session_ease", l2=3.0, session_weight=0.0)
    without.fit(X, ctx)
    s0 = without.score(user, X[user])[0]
    assert s0[1] == pytest.approx(s0[2], rel=1e-5)  # same users, no time: indistinguishable
    with_sessions = build("session_ease", l2=3.0, session_weight=1.0)
    with_sessions.fit(X, ctx)
    s1 = with_sessions.score(user, X[user])[0]
    assert s1[1] > s1[2]


def test_without_timestamps_the_session_term_is_skipped(sessions: tuple) -> None:
    X, ctx = sessions
    no_time = FitContext(interactions=ctx.interactions.drop(columns="timestamp"))
    for fit_ctx in (no_time, FitContext()):
        model = build("session_ease", l2=3.0, session_weight=1.0)
        model.fit(X, fit_ctx)
        reference = build("session_ease", l2=3.0, session_weight=0.0)
        reference.fit(X, ctx)
        np.testing.assert_allclose(model.B, reference.B, rtol=1e-5)  # type: ignore[attr-defined]


def test_session_matrix_splits_on_gaps() -> None:
    df = pd.DataFrame(
        {"user_idx": [0, 0, 0, 1], "item_idx": [0, 1, 2, 0], "timestamp": [0.0, 10.0, 5000.0, 10.0]}
    )
    S = session_matrix(df, 3, gap_s=60.0)
    assert S is not None
    assert S.toarray().tolist() == [[1, 1, 0], [0, 0, 1], [1, 0, 0]]
    same_second = session_matrix(df, 3, gap_s=0.0)
    assert same_second is not None and same_second.shape[0] == 4


def test_popularity_discount_lifts_niche_items() -> None:
    """Item 1 co-occurs with item 0 for everybody (popular); item 2 for a few users only."""
    rows = [(u, 0, 0.0) for u in range(20)] + [(u, 1, 0.0) for u in range(20)]
    rows += [(u, 2, 0.0) for u in range(4)] + [(u, 3, 0.0) for u in range(4, 20)]
    rows += [(20, 0, 0.0)]
    X, ctx = _data(rows, 4)
    user = np.array([20])
    scores = {}
    for g in (0.0, 1.0):
        model = build("session_ease", l2=1.0, dropout=0.0, session_weight=0.0, pop_exponent=g)
        model.fit(X, ctx)
        s = model.score(user, X[user])[0]
        scores[g] = s[2] / s[1]
    assert scores[1.0] > scores[0.0]


def test_round_trip_explain_and_bad_dropout(sessions: tuple, tmp_path: Path) -> None:
    X, ctx = sessions
    model = build("session_ease", l2=3.0)
    model.fit(X, ctx)
    assert isinstance(model, SessionEASE) and isinstance(model, EASE)
    model.save(tmp_path / "m")
    loaded = Recommender.load(tmp_path / "m")
    users = np.arange(3)
    np.testing.assert_allclose(loaded.score(users, X[users]), model.score(users, X[users]), rtol=1e-6)
    assert [i for i, _ in model.explain(X[12], 1)] == [0]
    with pytest.raises(ValueError, match="dropout"):
        build("session_ease", dropout=1.0).fit(X, ctx)


def test_a_bundle_serving_it_loads_and_recommends(shop: Shop, tmp_path: Path) -> None:
    """The service's engine serves it as it serves EASE (dense scores from the history row)."""
    from services.recommender.bundle import load_bundle
    from services.recommender.engine import Engine
    from services.recommender.events import EventStore
    from services.recommender.train import TrainConfig, run
    from services.runtime.device import Device
    from services.runtime.model_store import ModelStore

    store = ModelStore(tmp_path / "models", "recommender")
    config = TrainConfig(
        models=("popularity", "session_ease"), serve="session_ease", tune="none", evaluate=False,
        progress=False, params={"session_ease": {"l2": 20.0}},
    )  # fmt: skip
    result = run(shop.prepared, config, None, Device("cpu"), store, None)
    entry = store.newest_valid()
    assert entry is not None and entry.manifest is not None and entry.manifest.version == result.version
    bundle = load_bundle(entry.path)
    assert isinstance(bundle.model, SessionEASE)
    events = EventStore(tmp_path / "events.sqlite3")
    engine = Engine(bundle, events, settings_for(tmp_path / "models", tmp_path, shop.cache_path))
    user = str(shop.prepared.interactions.user_id.iloc[0])
    seen = set(shop.prepared.interactions.query("user_id == @user").item_id)
    items, _strategy = engine.recommend(user, 5, "", [], [], False, True)
    assert len(items) == 5 and not {i.item_id for i in items} & seen
    events.close()
