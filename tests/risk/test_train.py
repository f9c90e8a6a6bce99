"""Training: the time split, threshold choice, metrics, the stored version, the anomaly scorer,
reason codes, outcome feedback and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from services.risk.config import RiskSettings
from services.risk.data import DataUnavailable, evalml_csv_path, load_evalml
from services.risk.features import FEATURE_NAMES, FEATURES, RatesTable
from services.risk.model import (
    ANOMALY_CODE,
    MODEL_FILE,
    DecisionPolicy,
    FastIsolationForest,
    IncompatibleModel,
    PathAttribution,
    load_model,
    percentile,
    reasons_for,
)
from services.risk.state import OUTCOME_CONFIRMED_FRAUD, OUTCOME_LEGITIMATE, ScoredRow, StateStore
from services.risk.train import build_dataset, load_outcomes, main, threshold_for_fpr, time_split
from services.runtime.model_store import ModelStore
from tests.risk.conftest import Trained
from tests.risk.synth import stream


def evalml_data() -> Path:
    """The packaged evalml transactions (requirements-data.txt); missing data fails, never skips."""
    try:
        return evalml_csv_path()
    except DataUnavailable as exc:
        pytest.fail(str(exc))


# --- time split -----------------------------------------------------------------------------------
def test_time_split_never_sees_the_future() -> None:
    rng = np.random.default_rng(1)
    times = rng.integers(0, 1000, size=500)  # many ties
    split = time_split(times)
    train, val, test = times[split.train], times[split.val], times[split.test]
    assert train.max() < val.min() and val.max() < test.min()  # ties never straddle a boundary
    assert len(train) + len(val) + len(test) == len(times)
    assert set(split.train) | set(split.val) | set(split.test) == set(range(len(times)))
    assert 0.6 < len(train) / len(times) < 0.8


def test_time_split_needs_distinct_times() -> None:
    with pytest.raises(ValueError):
        time_split(np.array([5, 5, 5, 5, 5]))


def test_features_of_a_row_do_not_depend_on_later_rows(trained: Trained) -> None:
    """Velocity features see only the past: featurising a prefix of the stream gives the same rows."""
    cut = len(trained.labelled) // 2
    prefix = build_dataset(trained.labelled[:cut], RatesTable.load(), progress=False)
    np.testing.assert_array_equal(prefix.x, trained.dataset.x[:cut])


def test_trained_split_is_chronological(trained: Trained) -> None:
    split, times = trained.result.split, trained.dataset.times_ms
    assert times[split.train].max() < split.val_start_ms <= times[split.val].min()
    assert times[split.val].max() < split.test_start_ms <= times[split.test].min()


# --- thresholds -----------------------------------------------------------------------------------
def test_threshold_for_fpr_by_hand() -> None:
    negatives = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    scores = np.concatenate([negatives, [0.85, 0.95]])
    labels = np.array([0] * 10 + [1, 1])
    t = threshold_for_fpr(scores, labels, 0.10)  # one false positive allowed: 0.9
    assert 0.8 < t <= 0.9
    assert (negatives >= t).sum() == 1 and (scores[labels == 1] >= t).sum() == 2
    t = threshold_for_fpr(scores, labels, 0.05)  # none allowed
    assert t > 0.9 and (negatives >= t).sum() == 0 and (scores[labels == 1] >= t).sum() == 1
    # Ties: two legitimate rows at 0.5 cannot be split, so neither is flagged.
    tied = np.array([0.5, 0.5, 0.1, 0.1, 0.9])
    t = threshold_for_fpr(tied, np.array([0, 0, 0, 0, 1]), 0.25)
    assert 0.5 < t <= 0.9


def test_threshold_is_the_lowest_that_meets_the_target() -> None:
    rng = np.random.default_rng(7)
    scores, labels = rng.random(2000), (rng.random(2000) < 0.1).astype(int)
    for target in (0.005, 0.01, 0.05, 0.2):
        t = threshold_for_fpr(scores, labels, target)
        neg = scores[labels == 0]
        assert (neg >= t).mean() <= target
        lower = neg[neg < t].max()  # the next candidate down would break the target
        assert (neg >= lower).mean() > target


def test_operating_point_is_chosen_on_validation_and_stored(trained: Trained) -> None:
    entry = ModelStore(trained.models_dir, "risk").get(trained.version)
    op = entry.manifest.params["operating_point"]
    policy = trained.result.model.policy
    assert op["chosen_on"] == "validation"
    assert (op["review_threshold"], op["decline_threshold"], op["anomaly_threshold"]) == (
        policy.review,
        policy.decline,
        policy.anomaly,
    )
    m = entry.manifest.metrics
    assert m["val_decline_fpr"] <= op["decline_target_fpr"] + 1e-12
    assert m["val_flag_fpr"] <= op["review_target_fpr"] + op["anomaly_target_fpr"] + 1e-12
    stored = json.loads((entry.path / MODEL_FILE).read_text())
    assert stored["policy"] == {"review": policy.review, "decline": policy.decline, "anomaly": policy.anomaly}


def test_policy_decides() -> None:
    policy = DecisionPolicy(review=0.3, decline=0.8, anomaly=0.95)
    p = np.array([0.1, 0.4, 0.9, 0.1, 0.85])
    a = np.array([0.5, 0.5, 0.5, 0.99, 0.99])
    assert policy.decide(p, a).tolist() == [1, 2, 3, 2, 3]
    assert policy.with_overrides(decline=0.05).decide(p, a).tolist() == [3, 3, 3, 3, 3]


# --- the stored version ---------------------------------------------------------------------------
def test_version_has_metrics_charts_and_importance(trained: Trained) -> None:
    entry = ModelStore(trained.models_dir, "risk").get(trained.version)
    m = entry.manifest.metrics
    for key in ("auc", "pr_auc", "recall_at_1pct_fpr", "baseline_auc", "baseline_pr_auc",
                "test_decline_fpr", "test_decline_recall", "anomaly_auc", "n_train"):  # fmt: skip
        assert key in m and math.isfinite(m[key]), key
    assert m["auc"] > 0.9  # the planted patterns are easy; a broken pipeline is not
    for png in ("roc_pr.png", "feature_importance.png"):
        assert (entry.path / png).read_bytes()[:4] == b"\x89PNG"
    importance = json.loads((entry.path / "feature_importance.json").read_text())
    assert set(importance) == set(FEATURE_NAMES)
    assert sum(importance.values()) == pytest.approx(1.0)
    assert entry.manifest.params["split"]["val_start"] < entry.manifest.params["split"]["test_start"]


def test_loaded_model_scores_like_the_trained_one(trained: Trained) -> None:
    entry = ModelStore(trained.models_dir, "risk").get(trained.version)
    loaded = load_model(entry.path, entry.manifest)
    x = trained.dataset.x[:200]
    a, b = loaded.score(x), trained.result.model.score(x)
    np.testing.assert_allclose(a.probability, b.probability, rtol=1e-12)
    np.testing.assert_allclose(a.anomaly, b.anomaly, rtol=1e-12)


def test_model_for_other_features_is_refused(trained: Trained, tmp_path: Path) -> None:
    import shutil

    entry = ModelStore(trained.models_dir, "risk").get(trained.version)
    copy = tmp_path / "copy"
    shutil.copytree(entry.path, copy)
    meta = json.loads((copy / MODEL_FILE).read_text())
    meta["feature_schema"] = "v0:amount"
    (copy / MODEL_FILE).write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModel):
        load_model(copy)


# --- anomaly score --------------------------------------------------------------------------------
def test_fast_isolation_forest_equals_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 6))
    x[::50] *= 8  # some outliers
    forest = IsolationForest(n_estimators=30, max_samples=128, max_features=1.0, random_state=0).fit(x)
    fast = FastIsolationForest.from_sklearn(forest, np.zeros(6))
    probe = np.vstack([x[:100], rng.normal(size=(50, 6)) * 3])
    np.testing.assert_allclose(fast.raw_scores(probe), -forest.score_samples(probe), rtol=1e-12)
    with_nan = probe[:5].copy()
    with_nan[:, 2] = np.nan  # NaN takes the fill value
    filled = with_nan.copy()
    filled[:, 2] = 0.0
    np.testing.assert_allclose(fast.raw_scores(with_nan), -forest.score_samples(filled), rtol=1e-12)


def test_anomaly_percentile_is_0_to_1_and_monotone() -> None:
    quantiles = np.quantile(np.random.default_rng(0).random(1000), np.linspace(0, 1, 101))
    raw = np.linspace(-1, 2, 200)
    out = percentile(raw, quantiles)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out) >= 0)
    tied = percentile(np.array([0.5]), np.array([0.1, 0.5, 0.5, 0.5, 0.9]))
    assert tied[0] == pytest.approx(0.5)  # the middle of the tied range


# --- reason codes ---------------------------------------------------------------------------------
def test_reasons_explain_the_score(trained: Trained) -> None:
    model = trained.result.model
    scores = model.score(trained.dataset.x)
    i = int(np.argmax(scores.probability))  # the riskiest transaction
    tx = next(r.tx for r in trained.labelled if r.tx.transaction_id == trained.dataset.transaction_ids[i])
    contributions = scores.contributions[i]
    # Contributions add up to the model's log-odds.
    p = scores.probability[i]
    assert contributions.sum() == pytest.approx(math.log(p / (1 - p)), rel=1e-9)
    reasons = reasons_for(trained.dataset.x[i], contributions, tx, 3, 0.0, 1.0)
    assert len(reasons) == 3
    top = np.argsort(-np.abs(contributions[: len(FEATURES)]))[:3]
    assert {r.feature for r in reasons} == {FEATURES[j].name for j in top}
    assert [r.contribution for r in reasons] == sorted((r.contribution for r in reasons), reverse=True)
    assert reasons[0].contribution > 0
    for r in reasons:
        spec = next(f for f in FEATURES if f.name == r.feature)
        assert r.code == spec.code and r.description
    with_anomaly = reasons_for(trained.dataset.x[i], contributions, tx, 2, 0.99, 0.9)
    assert with_anomaly[-1].code == ANOMALY_CODE and len(with_anomaly) == 3


def test_path_attribution_by_hand_and_exact() -> None:
    """One stump on feature 0: its split gets all of (leaf - root); the rest of the log-odds is bias."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] > 0.3).astype(int)
    params = {"objective": "binary", "num_leaves": 2, "verbosity": -1, "min_child_samples": 5}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=1)
    attribution = PathAttribution.from_booster(booster)
    leaves = booster.predict(x[:20], pred_leaf=True).reshape(20, -1)
    raw, contrib = attribution.explain(leaves)
    np.testing.assert_allclose(raw, booster.predict(x[:20], raw_score=True), rtol=1e-12)
    assert np.all(contrib[:, 1:3] == 0.0)  # features 1 and 2 are never split on
    root = booster.dump_model()["tree_info"][0]["tree_structure"]["internal_value"]
    np.testing.assert_allclose(contrib[:, 3], root)
    leaf_out = np.array([booster.get_leaf_output(0, int(leaf)) for leaf in leaves[:, 0]])
    np.testing.assert_allclose(contrib[:, 0], leaf_out - root, rtol=1e-12)


def test_path_attribution_adds_up_and_agrees_with_treeshap(trained: Trained) -> None:
    model, x = trained.result.model, trained.dataset.x
    scores = model.score(x)
    raw = model.booster.predict(x, raw_score=True)
    np.testing.assert_allclose(scores.contributions.sum(axis=1), raw, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scores.probability, 1 / (1 + np.exp(-raw)), rtol=1e-9)
    shap = model.booster.predict(x, pred_contrib=True)
    risky = scores.probability > 0.5
    ours = np.argmax(scores.contributions[risky, :-1], axis=1)
    theirs = np.argmax(shap[risky, :-1], axis=1)
    assert (ours == theirs).mean() > 0.6  # the same main reason for most flagged transactions


def test_fraud_bursts_are_explained_by_velocity_or_geography(trained: Trained) -> None:
    model = trained.result.model
    fraud = [
        i
        for i, tid in enumerate(trained.dataset.transaction_ids)
        if tid.startswith("F") and not tid.endswith("-0")
    ]
    scores = model.score(trained.dataset.x[fraud])
    codes = set()
    for k, i in enumerate(fraud[:30]):
        tx = next(r.tx for r in trained.labelled if r.tx.transaction_id == trained.dataset.transaction_ids[i])
        codes |= {r.code for r in reasons_for(trained.dataset.x[i], scores.contributions[k], tx, 3, 0.0, 1.0)}
    assert codes & {"VELOCITY_CARD_10M", "VELOCITY_CARD_1H", "COUNTRY_MISMATCH_IP_BILLING",
                    "COUNTRY_MISMATCH_BILLING_SHIPPING", "CURRENCY_FOREIGN", "CARD_SHARED_ACCOUNTS",
                    "DEVICE_SHARED_CARDS", "ACCOUNT_AGE", "CARD_MANY_DEVICES"}  # fmt: skip


# --- outcome feedback and the command line --------------------------------------------------------
def scored_with_outcomes(path: Path, n: int = 30) -> list[str]:
    """A state store as a serving process leaves it: scored transactions, some with outcomes."""
    rows = [r.tx for r in stream(users=10, legit_per_user=3, fraud_rings=0, seed=5)][:n]
    store = StateStore(path)
    with store.batch():
        store.record_scored([ScoredRow(t, 0.5, 0.5, 2, "v0") for t in rows])
    for k, t in enumerate(rows[:10]):
        store.record_outcome(
            t.transaction_id, OUTCOME_CONFIRMED_FRAUD if k % 2 else OUTCOME_LEGITIMATE, t.occurred_ms
        )
    store.close()
    return [t.transaction_id for t in rows]


def test_outcomes_feed_the_next_training_set(tmp_path: Path) -> None:
    ids = scored_with_outcomes(tmp_path / "state.sqlite3")
    outcomes = load_outcomes(tmp_path / "state.sqlite3", RatesTable.load())
    assert len(outcomes) == len(ids)
    assert sum(r.label is not None for r in outcomes) == 10
    dataset = build_dataset(outcomes, RatesTable.load(), progress=False)
    assert sorted(dataset.transaction_ids) == sorted(ids[:10])  # unlabelled rows only feed history
    assert dataset.y.tolist().count(1) == 5
    assert load_outcomes(tmp_path / "missing.sqlite3", RatesTable.load()) == []


def test_outcomes_come_from_the_configured_store(tmp_path: Path) -> None:
    """Without --state-path, training reads the store the service's settings name: embedded here
    (<CBEC_STATE_DIR>/risk.sqlite3); the shared PostgreSQL in test_shared.py."""
    settings = RiskSettings(service="risk", state_dir=tmp_path / "state", models_dir=tmp_path / "models")
    assert load_outcomes(settings, RatesTable.load()) == []  # nothing served yet
    ids = scored_with_outcomes(tmp_path / "state" / "risk.sqlite3")
    outcomes = load_outcomes(settings, RatesTable.load())
    assert [r.tx.transaction_id for r in outcomes] == ids  # in time order
    assert sum(r.label is not None for r in outcomes) == 10


def test_command_trains_on_evalml_with_outcomes_and_if_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evalml_data()
    state = tmp_path / "state.sqlite3"
    scored_with_outcomes(state)
    models = tmp_path / "models"
    args = ["--models-dir", str(models), "--state-path", str(state), "--limit", "4000", "--trees", "15",
            "--no-plots", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    entry = ModelStore(models, "risk").newest_valid()
    assert entry is not None and entry.manifest is not None
    assert entry.manifest.metrics["outcomes_labelled"] == 10
    assert entry.manifest.params["data"]["evalml"]["synthetic"] is True
    assert entry.manifest.params["data"]["evalml"]["rows"] == 4000  # --limit: the earliest 4000
    assert len(entry.manifest.data_fingerprint) == 64
    assert "test AUC" in capsys.readouterr().out
    assert main([*args, "--if-missing"]) == 0
    assert len([v for v in ModelStore(models, "risk").versions() if v.valid]) == 1


def test_evalml_mapping() -> None:
    path = evalml_data()
    rows, report = load_evalml(path, RatesTable.load())
    assert report.rows == len(rows)
    assert report.dropped_unknown_currency > 0  # the legacy ZWD has no rate
    assert report.rows + report.dropped_unknown_currency == 99_992
    assert 0.14 < report.fraud_rate < 0.16
    assert all(r.tx.currency != "ZWD" for r in rows)
    times = [r.tx.occurred_ms for r in rows]
    assert times == sorted(times)
    first = rows[0].tx  # id 0: card 32261, 24900 CUC at 2019-01-01 00:12:26 in the US
    assert first.transaction_id == "evalml-0" and first.card == "card-32261" and first.user_id == "user-32261"
    assert first.amount == 249.0 and first.currency == "CUC"
    assert first.occurred_ms == 1546301546000
    assert first.billing_country == first.shipping_country == "US"
    assert first.device == "" and first.ip_country == "" and first.account_created_ms is None
    by_card: dict[str, str] = {}
    for r in rows:  # the billing country is where the card was first seen, and never changes
        if r.tx.billing_country:
            assert by_card.setdefault(r.tx.card, r.tx.billing_country) == r.tx.billing_country
