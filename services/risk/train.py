"""Train a risk model version: ``python -m services.risk.train`` (``--if-missing`` for ``make run``).

Steps, each with a progress bar: replay every transaction in time order through the serving feature
pipeline; split by time (train < validation < test, never at random, so no evaluation sees its
future); fit LightGBM (early stopping on validation), an Isolation Forest and a logistic-regression
baseline on the same features; choose the review / decline / anomaly thresholds on validation for
target false-positive rates; report AUC, PR-AUC and recall at 1% FPR and at the chosen operating point
on the test period; write ROC + PR charts, feature importance and a new model version.

Data: the evalml demo transactions (SYNTHETIC, see ``data.py``) plus every transaction this service
scored, with the outcome labels ``ReportOutcome`` stored (unlabelled ones only feed velocity history),
read from the store the service uses, configured by the same ``CBEC_*`` settings: the embedded file
``<CBEC_STATE_DIR>/risk.sqlite3``, or the shared PostgreSQL (so a training Job in the cluster reads
what every replica recorded). ``--state-path FILE`` reads another embedded file instead (a copy).
Outcomes enter the time split at their transaction's time, so recent labels first inform validation
and testing and move into training as newer data arrives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from services.runtime.model_store import ModelStore, fingerprint
from services.runtime.state import StateConfig, StoreUnavailable, open_database

from .config import RiskSettings
from .data import DataUnavailable, evalml_csv_path, load_evalml
from .features import FEATURE_NAMES, FEATURE_SCHEMA, FeaturePipeline, RatesTable
from .model import (
    DECISION_APPROVE,
    DECISION_DECLINE,
    DecisionPolicy,
    FastIsolationForest,
    RiskModel,
    anomaly_quantiles,
)
from .state import STORE, LabelledTx, StateStore

log = logging.getLogger("cbec.risk.train")
SERVICE = "risk"


# --- data -----------------------------------------------------------------------------------------
@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray
    times_ms: np.ndarray
    transaction_ids: list[str]


def build_dataset(labelled: Sequence[LabelledTx], rates: RatesTable, progress: bool = True) -> Dataset:
    """Features for every labelled transaction, computed exactly as serving computes them: a fresh
    state store sees the transactions in time order (ties by id), each after its predecessors."""
    ordered = sorted(labelled, key=lambda r: (r.tx.occurred_ms, r.tx.transaction_id))
    pipeline = FeaturePipeline(rates)
    store = StateStore(":memory:")
    chunks: list[np.ndarray] = []
    step = 5000
    with tqdm(total=len(ordered), desc="features", unit="tx", disable=not progress) as bar:
        for start in range(0, len(ordered), step):
            part = [r.tx for r in ordered[start : start + step]]
            with store.batch():
                x, _ = pipeline.transform(part, store)
            chunks.append(x)
            bar.update(len(part))
    store.close()
    x = np.vstack(chunks) if chunks else np.empty((0, len(FEATURE_NAMES)))
    keep = np.array([r.label is not None for r in ordered], dtype=bool)
    y = np.array([r.label if r.label is not None else -1 for r in ordered], dtype=np.int32)
    times = np.array([r.tx.occurred_ms for r in ordered], dtype=np.int64)
    ids = [r.tx.transaction_id for r, k in zip(ordered, keep, strict=True) if k]
    return Dataset(x[keep], y[keep], times[keep], ids)


@dataclass(frozen=True)
class TimeSplit:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_start_ms: int
    test_start_ms: int


def time_split(times_ms: np.ndarray, val_fraction: float = 0.15, test_fraction: float = 0.15) -> TimeSplit:
    """Split at two points in time: everything in validation happens after everything in training,
    everything in test after validation. Rows sharing a timestamp stay on one side."""
    if len(times_ms) < 3:
        raise ValueError("need at least 3 rows to split")
    ordered = np.sort(times_ms)
    n = len(ordered)
    val_start = int(ordered[int(n * (1 - val_fraction - test_fraction))])
    test_start = int(ordered[int(n * (1 - test_fraction))])
    if test_start <= val_start:
        raise ValueError("too few distinct timestamps for a time split")
    train = np.flatnonzero(times_ms < val_start)
    val = np.flatnonzero((times_ms >= val_start) & (times_ms < test_start))
    test = np.flatnonzero(times_ms >= test_start)
    if not len(train) or not len(val) or not len(test):
        raise ValueError("time split left a part empty")
    return TimeSplit(train, val, test, val_start, test_start)


# --- metrics and thresholds -------------------------------------------------------------------------
def threshold_for_fpr(scores: np.ndarray, labels: np.ndarray, target_fpr: float) -> float:
    """Lowest threshold whose false-positive rate (share of legitimate rows with score >= threshold)
    stays at or under ``target_fpr``: the highest recall that target allows."""
    negatives = np.sort(scores[labels == 0])[::-1]
    if len(negatives) == 0:
        raise ValueError("no legitimate rows to measure a false-positive rate on")
    allowed = int(np.floor(target_fpr * len(negatives) + 1e-9))
    if allowed >= len(negatives):
        return float(negatives[-1])
    # Strictly above the (allowed+1)-th highest legitimate score, so at most `allowed` are flagged.
    return float(np.nextafter(negatives[allowed], np.inf))


def rates_at(flagged: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(false-positive rate, recall) of a boolean flag."""
    neg, pos = labels == 0, labels == 1
    fpr = float(flagged[neg].mean()) if neg.any() else float("nan")
    recall = float(flagged[pos].mean()) if pos.any() else float("nan")
    return fpr, recall


def recall_at_fpr(scores: np.ndarray, labels: np.ndarray, target_fpr: float = 0.01) -> float:
    """Best recall with a false-positive rate of at most ``target_fpr`` (from the ROC curve)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    ok = fpr <= target_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def ranking_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "recall_at_1pct_fpr": recall_at_fpr(scores, labels, 0.01),
    }


def operating_point(
    probability: np.ndarray, anomaly: np.ndarray, labels: np.ndarray, policy: DecisionPolicy
) -> dict[str, float]:
    """How the decision policy does on labelled rows: decline and review-or-decline rates."""
    decision = policy.decide(probability, anomaly)
    decline_fpr, decline_recall = rates_at(decision == DECISION_DECLINE, labels)
    flag_fpr, flag_recall = rates_at(decision != DECISION_APPROVE, labels)
    return {
        "decline_fpr": decline_fpr,
        "decline_recall": decline_recall,
        "flag_fpr": flag_fpr,
        "flag_recall": flag_recall,
        "approve_share": float((decision == DECISION_APPROVE).mean()),
    }


# --- training -----------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    trees: int = 400
    learning_rate: float = 0.05
    num_leaves: int = 31
    # Shallow trees: no test-AUC loss on the demo data against unbounded 31-leaf trees, and at most six
    # splits per tree share each reason-code attribution (see model.PathAttribution).
    max_depth: int = 6
    min_child_samples: int = 40
    early_stopping: int = 40
    forest_trees: int = 100
    forest_samples: int = 256
    review_fpr: float = 0.05
    decline_fpr: float = 0.01
    anomaly_fpr: float = 0.01
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    threads: int = 2
    progress: bool = True
    plots: bool = True

    def lightgbm_params(self) -> dict[str, Any]:
        """LightGBM parameters, shared by the transaction model and the credit-set runs."""
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "max_depth": self.max_depth,
            "min_child_samples": self.min_child_samples,
            "feature_fraction": 0.9,
            "bagging_fraction": 0.9,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            # Early stopping on log loss, not AUC: the service returns probabilities, so they must be
            # calibrated; AUC alone stopped after one tree on the demo data (its ranking saturates).
            "metric": ["binary_logloss", "auc"],
            "seed": self.seed,
            "deterministic": True,
            "num_threads": self.threads,
            "verbosity": -1,
        }


@dataclass
class TrainResult:
    model: RiskModel
    metrics: dict[str, float]
    params: dict[str, Any]
    importance: dict[str, float]
    split: TimeSplit
    test_scores: dict[str, np.ndarray] = field(default_factory=dict)


class _Bar:
    """LightGBM callback that advances a tqdm bar per boosting round."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.order = 100

    def __call__(self, env: Any) -> None:
        self.bar.update(1)


def fit(dataset: Dataset, rates: RatesTable, config: TrainConfig) -> TrainResult:
    """Fit, choose thresholds on validation, evaluate on test; returns the model and its report."""
    import lightgbm as lgb
    from sklearn.ensemble import IsolationForest
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split = time_split(dataset.times_ms, config.val_fraction, config.test_fraction)
    x, y = dataset.x, dataset.y
    for part, name in ((split.train, "training"), (split.val, "validation"), (split.test, "test")):
        if len(np.unique(y[part])) < 2:
            raise ValueError(f"the {name} period has only one class; more data or other split fractions")
    params = config.lightgbm_params()
    train_set = lgb.Dataset(
        x[split.train], y[split.train], feature_name=list(FEATURE_NAMES), free_raw_data=False
    )
    val_set = lgb.Dataset(x[split.val], y[split.val], reference=train_set)
    with tqdm(total=config.trees, desc="lightgbm", unit="tree", disable=not config.progress) as bar:
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=config.trees,
            valid_sets=[val_set],
            valid_names=["validation"],
            callbacks=[
                lgb.early_stopping(config.early_stopping, first_metric_only=True, verbose=False),
                _Bar(bar),
            ],
        )
    best = booster.best_iteration or booster.current_iteration()
    # Keep only the trees up to the best validation round.
    booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))

    steps = tqdm(total=3, desc="anomaly + baseline", disable=not config.progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (e.g. no device ids at all)
        fill = np.nanmedian(x[split.train], axis=0)
    fill = np.where(np.isnan(fill), 0.0, fill)
    x_train_filled = np.where(np.isnan(x[split.train]), fill, x[split.train])
    iforest = IsolationForest(
        n_estimators=config.forest_trees,
        max_samples=min(config.forest_samples, len(split.train)),
        max_features=1.0,
        random_state=config.seed,
        n_jobs=1,
    ).fit(x_train_filled)
    forest = FastIsolationForest.from_sklearn(iforest, fill)
    quantiles = anomaly_quantiles(forest.raw_scores(x[split.train]))
    steps.update(1)

    baseline = make_pipeline(
        SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(max_iter=1000, class_weight="balanced"),
    ).fit(x[split.train], y[split.train])
    steps.update(1)

    # Thresholds of 1 until they are chosen on validation below.
    model = RiskModel.build(
        booster, forest, quantiles, DecisionPolicy(1.0, 1.0, 1.0), rates.version, config.threads
    )
    val_scores = model.score(x[split.val])
    policy = DecisionPolicy(
        review=threshold_for_fpr(val_scores.probability, y[split.val], config.review_fpr),
        decline=threshold_for_fpr(val_scores.probability, y[split.val], config.decline_fpr),
        anomaly=threshold_for_fpr(val_scores.anomaly, y[split.val], config.anomaly_fpr),
    )
    model = replace(model.with_policy(policy), predict_threads=1)
    test_scores = model.score(x[split.test])
    base_test = baseline.predict_proba(x[split.test])[:, 1]
    y_test = y[split.test]
    steps.update(1)
    steps.close()

    metrics: dict[str, float] = dict(ranking_metrics(test_scores.probability, y_test))
    metrics.update({f"baseline_{k}": v for k, v in ranking_metrics(base_test, y_test).items()})
    metrics.update({f"val_{k}": v for k, v in ranking_metrics(val_scores.probability, y[split.val]).items()})
    anomaly_only = ranking_metrics(test_scores.anomaly, y_test)
    metrics["anomaly_auc"] = anomaly_only["auc"]
    metrics.update(
        {
            f"test_{k}": v
            for k, v in operating_point(test_scores.probability, test_scores.anomaly, y_test, policy).items()
        }
    )
    metrics.update(
        {
            f"val_{k}": v
            for k, v in operating_point(
                val_scores.probability, val_scores.anomaly, y[split.val], policy
            ).items()
        }
    )
    metrics.update(
        {
            "n_train": float(len(split.train)),
            "n_val": float(len(split.val)),
            "n_test": float(len(split.test)),
            "fraud_rate_train": float(y[split.train].mean()),
            "fraud_rate_test": float(y_test.mean()),
            "best_iteration": float(best),
        }
    )
    gain = booster.feature_importance(importance_type="gain")
    importance = {
        name: float(g) for name, g in zip(FEATURE_NAMES, gain / max(gain.sum(), 1e-12), strict=True)
    }
    run_params = {
        "lightgbm": {k: v for k, v in params.items() if k not in ("num_threads", "verbosity")},
        "operating_point": {
            "review_threshold": policy.review,
            "decline_threshold": policy.decline,
            "anomaly_threshold": policy.anomaly,
            "review_target_fpr": config.review_fpr,
            "decline_target_fpr": config.decline_fpr,
            "anomaly_target_fpr": config.anomaly_fpr,
            "chosen_on": "validation",
        },
        "split": {
            "val_start": _iso(split.val_start_ms),
            "test_start": _iso(split.test_start_ms),
            "train_start": _iso(int(dataset.times_ms.min())),
            "test_end": _iso(int(dataset.times_ms.max())),
        },
        "isolation_forest": {"trees": config.forest_trees, "max_samples": config.forest_samples},
        "feature_schema": FEATURE_SCHEMA,
        "rates_version": rates.version,
    }
    return TrainResult(
        model,
        metrics,
        run_params,
        importance,
        split,
        {"probability": test_scores.probability, "baseline": base_test, "labels": y_test},
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def write_charts(result: TrainResult, folder: Path) -> list[str]:
    """ROC and PR curves (model and baseline, test period) and feature importance as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = result.test_scores["labels"]
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, label in (("probability", "LightGBM"), ("baseline", "logistic regression")):
        fpr, tpr, _ = roc_curve(y, result.test_scores[key])
        precision, recall, _ = precision_recall_curve(y, result.test_scores[key])
        prefix = "" if key == "probability" else "baseline_"
        roc_ax.plot(fpr, tpr, label=f"{label} (AUC {result.metrics[prefix + 'auc']:.3f})")
        pr_ax.plot(recall, precision, label=f"{label} (AP {result.metrics[prefix + 'pr_auc']:.3f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.axvline(0.01, color="grey", linestyle="--", linewidth=0.8)
    roc_ax.set(xlabel="false-positive rate", ylabel="recall", title="ROC (time-split test period)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall (test period)")
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right" if ax is roc_ax else "lower left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "roc_pr.png", dpi=110)
    plt.close(fig)

    names = sorted(result.importance, key=result.importance.__getitem__)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.barh(names, [result.importance[n] for n in names])
    ax.set(xlabel="share of total gain", title="LightGBM feature importance")
    fig.tight_layout()
    fig.savefig(folder / "feature_importance.png", dpi=110)
    plt.close(fig)
    return ["roc_pr.png", "feature_importance.png"]


@dataclass
class DataReport:
    labelled: list[LabelledTx]
    fingerprint: str
    sources: dict[str, Any]


def load_outcomes(source: RiskSettings | Path, rates: RatesTable) -> list[LabelledTx]:
    """Every transaction the service scored, labelled where an outcome was reported (read-only for
    an embedded file, safe while the service runs). ``source`` is the service's settings (the store
    they configure: embedded file or shared PostgreSQL) or the path of an embedded state file."""
    if isinstance(source, RiskSettings):
        config = StateConfig.from_settings(source)
        if config.shared:
            db = open_database(config, STORE)
            try:
                rows = StateStore(db).labelled_transactions()
            finally:
                db.close()
            return [r for r in rows if r.tx.currency in rates]
        source = embedded_state_path(source)
    if not source.exists():
        return []
    store = StateStore(source, read_only=True)
    try:
        rows = store.labelled_transactions()
    finally:
        store.close()
    return [r for r in rows if r.tx.currency in rates]


def embedded_state_path(settings: RiskSettings) -> Path:
    """Where the embedded backend keeps the service's store (the runtime's ``open_database``)."""
    return Path(settings.state_dir) / f"{STORE}.sqlite3"


def describe_store(settings: RiskSettings, state_path: Path | None) -> str:
    """Where the labels came from, for the model's manifest (no password: it is never in the URL)."""
    if state_path is not None:
        return f"sqlite:{state_path}"
    if settings.state_backend == "shared":
        return settings.database_url
    return f"sqlite:{embedded_state_path(settings)}"


def gather_data(
    settings: RiskSettings,
    rates: RatesTable,
    data_path: Path | None = None,
    limit: int | None = None,
    use_outcomes: bool = True,
    state_path: Path | None = None,
) -> DataReport:
    """evalml rows plus the state store's scored transactions and their outcome labels (from
    ``state_path`` when given, else from the store ``settings`` configure)."""
    path = data_path or evalml_csv_path()
    rows, report = load_evalml(path, rates, limit)
    digest = hashlib.sha256(fingerprint(path).encode())
    sources: dict[str, Any] = {
        "evalml": {
            "path": str(path),
            "rows": report.rows,
            "dropped_unknown_currency": report.dropped_unknown_currency,
            "limit": limit,
            "synthetic": True,
        },
    }
    outcomes = load_outcomes(state_path or settings, rates) if use_outcomes else []
    for r in outcomes:
        digest.update(f"{r.tx.transaction_id}:{r.label}".encode())
    sources["outcomes"] = {
        "store": describe_store(settings, state_path),
        "scored_transactions": len(outcomes),
        "labelled": sum(1 for r in outcomes if r.label is not None),
    }
    return DataReport(rows + outcomes, digest.hexdigest(), sources)


def save_version(
    models_dir: Path,
    result: TrainResult,
    data_fingerprint: str,
    sources: dict[str, Any],
    plots: bool = True,
) -> str:
    """Write the model, its report and charts as a new version in the model store."""
    params = {**result.params, "data": sources}
    store = ModelStore(models_dir, SERVICE)
    with store.new_version(result.metrics, data_fingerprint, params) as (folder, manifest):
        result.model.save(folder, {"operating_point": params["operating_point"]})
        (folder / "metrics.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
        importance = json.dumps(result.importance, indent=2, sort_keys=True)
        (folder / "feature_importance.json").write_text(importance)
        if plots:
            write_charts(result, folder)
    return manifest.version


def train_and_save(
    settings: RiskSettings,
    config: TrainConfig,
    data_path: Path | None = None,
    limit: int | None = None,
    use_outcomes: bool = True,
    state_path: Path | None = None,
) -> tuple[str, TrainResult]:
    """The whole command: gather data, fit, and write a new version; returns (version, result)."""
    rates = RatesTable.load(settings.risk_rates_path)
    data = gather_data(settings, rates, data_path, limit, use_outcomes, state_path)
    dataset = build_dataset(data.labelled, rates, config.progress)
    result = fit(dataset, rates, config)
    result.metrics["outcomes_labelled"] = float(data.sources["outcomes"]["labelled"])
    version = save_version(settings.models_dir, result, data.fingerprint, data.sources, config.plots)
    return version, result


def ensure_default_model(
    settings: RiskSettings | None = None, config: TrainConfig | None = None
) -> str | None:
    """Train the default model on the evalml data when the store has no valid version (``make run``);
    returns the new version, or None when one already exists."""
    settings = settings or RiskSettings(service=SERVICE)
    if ModelStore(settings.models_dir, SERVICE).newest_valid() is not None:
        return None
    version, _ = train_and_save(settings, config or TrainConfig())
    return version


def _summary(version: str, result: TrainResult) -> str:
    m = result.metrics
    op = result.params["operating_point"]
    return (
        f"risk model {version}: test AUC {m['auc']:.4f}, PR-AUC {m['pr_auc']:.4f}, "
        f"recall@1%FPR {m['recall_at_1pct_fpr']:.4f} (baseline AUC {m['baseline_auc']:.4f}); "
        f"thresholds review {op['review_threshold']:.4f} decline {op['decline_threshold']:.4f} "
        f"anomaly {op['anomaly_threshold']:.4f}; test decline FPR {m['test_decline_fpr']:.4f} "
        f"recall {m['test_decline_recall']:.4f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, help="default: CBEC_MODELS_DIR or ./models")
    parser.add_argument(
        "--state-path",
        type=Path,
        help="read labels from this embedded state file (e.g. a copy) instead of the store the CBEC_STATE_* "
        "settings configure (<CBEC_STATE_DIR>/risk.sqlite3, or PostgreSQL when shared)",
    )
    parser.add_argument(
        "--data", type=Path, help="evalml-format CSV (.gz); default: the installed evalml file"
    )
    parser.add_argument("--limit", type=int, help="use only the earliest N evalml transactions")
    parser.add_argument("--no-outcomes", action="store_true", help="ignore the state store's labels")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when a valid version exists")
    parser.add_argument("--trees", type=int, default=TrainConfig.trees)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--num-leaves", type=int, default=TrainConfig.num_leaves)
    parser.add_argument("--max-depth", type=int, default=TrainConfig.max_depth)
    parser.add_argument("--review-fpr", type=float, default=TrainConfig.review_fpr)
    parser.add_argument("--decline-fpr", type=float, default=TrainConfig.decline_fpr)
    parser.add_argument("--anomaly-fpr", type=float, default=TrainConfig.anomaly_fpr)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    overrides: dict[str, Any] = {}
    if args.models_dir:
        overrides["models_dir"] = args.models_dir
    settings = RiskSettings(service=SERVICE, **overrides)
    if args.if_missing and ModelStore(settings.models_dir, SERVICE).newest_valid() is not None:
        print(f"risk: a model already exists in {settings.service_models_dir}; nothing to do")
        return 0
    config = TrainConfig(
        trees=args.trees,
        learning_rate=args.learning_rate,
        num_leaves=args.num_leaves,
        max_depth=args.max_depth,
        review_fpr=args.review_fpr,
        decline_fpr=args.decline_fpr,
        anomaly_fpr=args.anomaly_fpr,
        threads=args.threads,
        seed=args.seed,
        plots=not args.no_plots,
    )
    try:
        version, result = train_and_save(
            settings, config, args.data, args.limit, not args.no_outcomes, args.state_path
        )
    except DataUnavailable as exc:
        print(f"risk: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:  # a Job's retry may find it back
        print(f"risk: cannot read the outcome labels: {exc.message}", file=sys.stderr)
        return 1
    print(_summary(version, result))
    print(f"written to {settings.service_models_dir / version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
