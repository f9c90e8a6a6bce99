"""The risk model code on REAL labels: the credit-risk sets of R's ``modeldata`` package.

Why: the transaction demo data is synthetic, so its scores say little about the modelling code.
``lending_club`` (9,857 loans, 23 columns, 5.2% bad) and ``credit_data`` (4,454 loans, 14 columns,
28% bad) are real. They are not transactions (no cards, devices or times), so they go through the same
model code -- LightGBM with the service's parameters, the logistic-regression baseline, thresholds
chosen on validation for a target false-positive rate, the same metrics -- but not the transaction
features. Having no time column, they are split at random, stratified (the transaction data is split
by time).

Data (Debian package, read without R)::

    apt-get download r-cran-modeldata
    dpkg-deb -x r-cran-modeldata_*.deb data/risk/modeldata && rm r-cran-modeldata_*.deb
    .venv/bin/python -m pip install rdata==1.1.0

    python -m services.risk.credit            # both sets; --json for machine-readable output
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .train import TrainConfig, ranking_metrics, rates_at, recall_at_fpr, threshold_for_fpr

ROOT = Path(__file__).resolve().parents[2]
RDATA_SUBDIR = Path("usr/lib/R/site-library/modeldata/data")
SETS = {"lending_club": ("Class", "bad"), "credit_data": ("Status", "bad")}
INSTALL = "make setup  (unpacks Debian r-cran-modeldata into data/deb; rdata comes with the risk extra)"


class CreditDataUnavailable(RuntimeError):
    """The Debian package's files or the ``rdata`` reader are missing; the message says how to get them."""


def modeldata_dir(configured: Path | None = None) -> Path:
    """Where ``Rdata.rdb`` lies: ``configured``, else the risk settings' ``risk_modeldata_dir``
    (``CBEC_RISK_MODELDATA_DIR``), the copy ``make setup`` unpacks into data/deb, or the R library."""
    if configured is None:
        from services.runtime.config import load_settings

        from .config import RiskSettings

        configured = load_settings(RiskSettings, "risk").risk_modeldata_dir
    candidates = [
        configured,
        ROOT / "data" / "deb" / RDATA_SUBDIR,
        Path("/") / RDATA_SUBDIR,
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "Rdata.rdb").exists():
            return candidate
    raise CreditDataUnavailable(f"R modeldata files not found; get them with:\n    {INSTALL}")


def load_credit(name: str, folder: Path | None = None) -> Any:
    """One data set as a pandas DataFrame, read from R's lazy-load database (``Rdata.rdx`` / ``.rdb``).

    The index is a gzipped serialized R list of (offset, length) per object; each object is a 4-byte
    length, a compression tag ('Z' = raw LZMA2 as R writes it) and the serialized data.
    """
    try:
        import rdata
    except ImportError:
        raise CreditDataUnavailable(f"the rdata reader is not installed:\n    {INSTALL}") from None
    folder = folder or modeldata_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no file header
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
        )
        offset, length = (int(v) for v in index["variables"][name])
        with open(folder / "Rdata.rdb", "rb") as handle:
            handle.seek(offset)
            blob = handle.read(length)
        tag = blob[4:5]
        if tag == b"Z":
            raw = lzma.decompress(
                blob[5:], format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]
            )
        elif tag == b"0":
            raw = blob[5:]
        else:
            raise ValueError(f"unsupported R lazy-load compression {tag!r} for {name}")
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def evaluate(name: str, config: TrainConfig | None = None, folder: Path | None = None) -> dict[str, Any]:
    """Stratified 60/20/20 split; LightGBM vs logistic regression; thresholds on validation."""
    import lightgbm as lgb
    import pandas as pd
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    config = config or TrainConfig()
    frame = load_credit(name, folder)
    target, bad = SETS[name]
    y = (frame[target].astype(str) == bad).astype(int).to_numpy()
    x = frame.drop(columns=[target])
    categorical = [c for c in x.columns if isinstance(x[c].dtype, pd.CategoricalDtype)]
    numeric = [c for c in x.columns if c not in categorical]
    x[numeric] = x[numeric].astype("float64")
    idx = np.arange(len(x))
    train, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=config.seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=config.seed)

    params = config.lightgbm_params()
    train_set = lgb.Dataset(x.iloc[train], y[train], categorical_feature=categorical, free_raw_data=False)
    val_set = lgb.Dataset(x.iloc[val], y[val], reference=train_set)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=config.trees,
        valid_sets=[val_set],
        callbacks=[lgb.early_stopping(config.early_stopping, first_metric_only=True, verbose=False)],
    )
    p_val = booster.predict(x.iloc[val], num_iteration=booster.best_iteration)
    p_test = booster.predict(x.iloc[test], num_iteration=booster.best_iteration)

    baseline = make_pipeline(
        make_column_transformer(
            (make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            (OneHotEncoder(handle_unknown="ignore"), categorical),
        ),
        LogisticRegression(max_iter=2000, class_weight="balanced"),
    ).fit(x.iloc[train], y[train])
    b_test = baseline.predict_proba(x.iloc[test])[:, 1]

    decline = threshold_for_fpr(p_val, y[val], config.review_fpr)
    fpr, recall = rates_at(p_test >= decline, y[test])
    model, base = ranking_metrics(p_test, y[test]), ranking_metrics(b_test, y[test])
    return {
        "dataset": name,
        "rows": len(x),
        "bad_rate": round(float(y.mean()), 4),
        "split": "stratified random 60/20/20 (no time column)",
        **{k: round(v, 4) for k, v in model.items()},
        "recall_at_5pct_fpr": round(recall_at_fpr(p_test, y[test], 0.05), 4),
        **{f"baseline_{k}": round(v, 4) for k, v in base.items()},
        "threshold_target_fpr": config.review_fpr,
        "threshold": round(decline, 6),
        "test_fpr_at_threshold": round(fpr, 4),
        "test_recall_at_threshold": round(recall, 4),
        "lightgbm_trees": int(booster.best_iteration or booster.current_iteration()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=[*SETS, "all"], default="all")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    names = list(SETS) if args.dataset == "all" else [args.dataset]
    try:
        results = [evaluate(name, TrainConfig(progress=False)) for name in names]
    except CreditDataUnavailable as exc:
        print(f"risk credit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(
                f"{r['dataset']}: {r['rows']} rows, {r['bad_rate']:.1%} bad; AUC {r['auc']:.4f} "
                f"(baseline {r['baseline_auc']:.4f}), PR-AUC {r['pr_auc']:.4f}, recall@1%FPR "
                f"{r['recall_at_1pct_fpr']:.4f}, recall@5%FPR {r['recall_at_5pct_fpr']:.4f}; threshold "
                f"from validation for {r['threshold_target_fpr']:.0%} FPR: test FPR "
                f"{r['test_fpr_at_threshold']:.4f}, recall {r['test_recall_at_threshold']:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
