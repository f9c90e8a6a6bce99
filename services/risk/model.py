"""The risk model: LightGBM fraud probability, Isolation Forest anomaly score, decision and reasons.

Why a hand-rolled Isolation Forest scorer: scikit-learn walks its 100 trees one Python call at a time,
several milliseconds for one row, which alone would break a checkout's latency budget. The forest's
arrays are exported at training time and all trees are walked together with numpy (tested equal to
``IsolationForest.score_samples``).

Why path attributions for reason codes rather than LightGBM's TreeSHAP (``pred_contrib``): TreeSHAP
cost 0.5-2 ms per row for the default model on these CPUs (2 s for a batch of 1,000), more than the
rest of the scoring path together. Path attributions (Saabas; ``treeinterpreter``) credit each split on
a row's decision path with the change in the node's expected output, so they are precomputed per leaf at
load time and a row's contributions are a gather over the leaves LightGBM routes it to
(``pred_leaf``). They add up exactly to the log-odds, like SHAP values, but favour features split near
the root; for naming the top few reasons that trade is acceptable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from services.runtime.model_store import Manifest

from .features import FEATURE_NAMES, FEATURE_SCHEMA, FEATURES, Tx

BOOSTER_FILE = "lightgbm.txt"
FOREST_FILE = "isolation_forest.npz"
MODEL_FILE = "risk_model.json"

DECISION_APPROVE = 1
DECISION_REVIEW = 2
DECISION_DECLINE = 3
DECISION_NAMES = {DECISION_APPROVE: "approve", DECISION_REVIEW: "review", DECISION_DECLINE: "decline"}
ANOMALY_CODE = "ANOMALOUS_PATTERN"


# --- isolation forest, vectorised ------------------------------------------------------------------
def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): mean path length of an unsuccessful BST search over n points (Liu et al. 2008)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


@dataclass(frozen=True)
class FastIsolationForest:
    """All trees of a fitted ``IsolationForest`` as padded arrays (trees x nodes)."""

    feature: np.ndarray  # int64, -1 at leaves
    threshold: np.ndarray  # float64
    left: np.ndarray  # int64 global node id (tree * width + node); leaves loop to themselves
    right: np.ndarray  # int64 global node id
    leaf_value: np.ndarray  # float64: depth + c(samples in leaf) - 1
    max_depth: int
    denominator: float  # n_trees * c(max_samples)
    fill: np.ndarray  # per-feature value replacing NaN (training medians)

    @classmethod
    def from_sklearn(cls, forest: Any, fill: np.ndarray) -> FastIsolationForest:
        n_features = int(forest.n_features_in_)
        if int(forest._max_features) != n_features:
            raise ValueError("only forests grown on every feature (max_features=1.0) are supported")
        trees = [est.tree_ for est in forest.estimators_]
        width = max(t.node_count for t in trees)
        shape = (len(trees), width)
        feature = np.full(shape, -1, dtype=np.int64)
        threshold = np.zeros(shape)
        left = np.zeros(shape, dtype=np.int64)
        right = np.zeros(shape, dtype=np.int64)
        leaf_value = np.zeros(shape)
        for i, t in enumerate(trees):
            n = t.node_count
            # Padding nodes are leaves of value 0 that loop to themselves (never reached).
            left[i, n:] = right[i, n:] = i * width + np.arange(n, width)
            is_leaf = t.children_left[:n] == -1
            nodes = np.arange(n, dtype=np.int64)
            feature[i, :n] = np.where(is_leaf, -1, t.feature[:n])
            threshold[i, :n] = t.threshold[:n]
            offset = i * width
            left[i, :n] = offset + np.where(is_leaf, nodes, t.children_left[:n])
            right[i, :n] = offset + np.where(is_leaf, nodes, t.children_right[:n])
            depth = t.compute_node_depths()[:n]
            leaf_value[i, :n] = depth + average_path_length(t.n_node_samples[:n]) - 1.0
        max_depth = max(int(t.max_depth) for t in trees)
        denominator = len(trees) * float(average_path_length(np.array([forest._max_samples]))[0])
        return cls(feature, threshold, left, right, leaf_value, max_depth, denominator, fill)

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        """The paper's anomaly score s(x) = 2^(-E[h(x)]/c(psi)), in (0, 1]; higher is more unusual.

        Equals ``-IsolationForest.score_samples`` (inputs go through float32 as scikit-learn's trees do).
        All trees advance one level per step on flat arrays (``np.take``), ``max_depth`` steps in all.
        """
        x = np.where(np.isnan(x), self.fill, x).astype(np.float32).astype(np.float64)
        n_rows, n_features = x.shape
        n_trees, width = self.feature.shape
        feature, threshold = self.feature.ravel(), self.threshold.ravel()
        left, right = self.left.ravel(), self.right.ravel()
        flat_x = x.ravel()
        row_base = (np.arange(n_rows) * n_features)[:, None]
        # Global node ids (tree offset + local id); children are stored as global ids too.
        node = np.broadcast_to(np.arange(n_trees) * width, (n_rows, n_trees)).copy()
        for _ in range(self.max_depth):
            feat = feature.take(node)
            value = flat_x.take(row_base + np.maximum(feat, 0))
            node = np.where(value <= threshold.take(node), left.take(node), right.take(node))
        depth = self.leaf_value.ravel().take(node).sum(axis=1)
        if self.denominator == 0:
            return np.ones(n_rows)
        return np.power(2.0, -depth / self.denominator)

    def save(self, path: Path, quantiles: np.ndarray) -> None:
        np.savez_compressed(
            path,
            feature=self.feature,
            threshold=self.threshold,
            left=self.left,
            right=self.right,
            leaf_value=self.leaf_value,
            max_depth=np.array(self.max_depth),
            denominator=np.array(self.denominator),
            fill=self.fill,
            quantiles=quantiles,
        )

    @classmethod
    def load(cls, path: Path) -> tuple[FastIsolationForest, np.ndarray]:
        with np.load(path) as z:
            forest = cls(
                z["feature"],
                z["threshold"],
                z["left"],
                z["right"],
                z["leaf_value"],
                int(z["max_depth"]),
                float(z["denominator"]),
                z["fill"],
            )
            return forest, z["quantiles"]


def anomaly_quantiles(raw: np.ndarray, points: int = 1001) -> np.ndarray:
    """Quantiles of the training raw scores; ``percentile`` maps a raw score onto 0..1 with them."""
    return np.quantile(raw, np.linspace(0.0, 1.0, points))


@lru_cache(maxsize=8)
def _grid(points: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, points)


def percentile(raw: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Share of training transactions that look more typical: 0 typical .. 1 more unusual than all."""
    grid = _grid(len(quantiles))
    # Ties in the quantiles (many identical raw scores) make np.interp pick the rightmost; average them.
    low = np.interp(raw, quantiles, grid, left=0.0, right=1.0)
    high = np.interp(-raw, -quantiles[::-1], grid[::-1], left=1.0, right=0.0)
    return np.clip((low + high) / 2, 0.0, 1.0)


# --- path attributions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathAttribution:
    """Per tree and leaf, what each feature's splits on the path to that leaf add to the log-odds."""

    leaf_contrib: np.ndarray  # (trees * max_leaves) x features
    leaf_value: np.ndarray  # (trees * max_leaves,), exact leaf outputs
    bias: float  # sum of the trees' root values: the contribution of no feature
    max_leaves: int

    @classmethod
    def from_booster(cls, booster: lgb.Booster) -> PathAttribution:
        dump = booster.dump_model()
        n_features = booster.num_feature()
        trees = dump["tree_info"]
        width = max(int(t["num_leaves"]) for t in trees)
        contrib = np.zeros((len(trees), width, n_features))
        values = np.zeros((len(trees), width))
        bias = 0.0
        for t, info in enumerate(trees):
            root = info["tree_structure"]
            if "split_feature" not in root:  # a single-leaf tree: a constant, no feature involved
                values[t, 0] = booster.get_leaf_output(t, 0)
                bias += values[t, 0]
                continue
            bias += float(root["internal_value"])
            stack: list[tuple[dict[str, Any], np.ndarray]] = [(root, np.zeros(n_features))]
            while stack:
                node, acc = stack.pop()
                for side in ("left_child", "right_child"):
                    child = node[side]
                    is_leaf = "split_feature" not in child
                    child_value = float(child["leaf_value"] if is_leaf else child["internal_value"])
                    path = acc.copy()
                    path[int(node["split_feature"])] += child_value - float(node["internal_value"])
                    if is_leaf:
                        leaf = int(child["leaf_index"])
                        # Telescoping from the exact leaf output keeps contributions + bias exact.
                        exact = booster.get_leaf_output(t, leaf)
                        path[int(node["split_feature"])] += exact - child_value
                        contrib[t, leaf] = path
                        values[t, leaf] = exact
                    else:
                        stack.append((child, path))
        return cls(contrib.reshape(-1, n_features), values.reshape(-1), bias, width)

    def explain(self, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw log-odds, contributions n x (features + 1) with the bias last) from ``pred_leaf``."""
        flat = leaves.astype(np.int64) + (np.arange(leaves.shape[1]) * self.max_leaves)[None, :]
        raw = self.leaf_value.take(flat).sum(axis=1)
        contrib = self.leaf_contrib.take(flat.ravel(), axis=0).reshape(*flat.shape, -1).sum(axis=1)
        return raw, np.hstack([contrib, np.full((len(raw), 1), self.bias)])


# --- decisions and reasons ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DecisionPolicy:
    """Decline at ``decline`` probability or more; review at ``review`` or an anomaly score of
    ``anomaly`` or more; approve otherwise. Chosen on validation data for target false-positive rates."""

    review: float
    decline: float
    anomaly: float

    def decide(self, probability: np.ndarray, anomaly: np.ndarray) -> np.ndarray:
        return np.where(
            probability >= self.decline,
            DECISION_DECLINE,
            np.where(
                (probability >= self.review) | (anomaly >= self.anomaly), DECISION_REVIEW, DECISION_APPROVE
            ),
        ).astype(np.int32)

    def with_overrides(
        self, review: float | None = None, decline: float | None = None, anomaly: float | None = None
    ) -> DecisionPolicy:
        return replace(
            self,
            review=self.review if review is None else review,
            decline=self.decline if decline is None else decline,
            anomaly=self.anomaly if anomaly is None else anomaly,
        )


@dataclass(frozen=True, slots=True)
class ReasonCode:
    code: str
    description: str
    contribution: float
    feature: str
    value: float


@dataclass(frozen=True)
class Scores:
    probability: np.ndarray
    anomaly: np.ndarray
    contributions: np.ndarray  # n x (features + 1); the last column is the bias


def _reasons(
    x: np.ndarray, contrib: np.ndarray, order: np.ndarray, tx: Tx, anomaly: float, anomaly_threshold: float
) -> list[ReasonCode]:
    chosen = sorted((int(i) for i in order if contrib[i] != 0.0), key=lambda i: -contrib[i])
    out = [
        ReasonCode(
            FEATURES[i].code,
            FEATURES[i].describe(float(x[i]), tx),
            float(contrib[i]),
            FEATURES[i].name,
            float(x[i]),
        )
        for i in chosen
    ]
    if anomaly >= anomaly_threshold:
        out.append(
            ReasonCode(
                ANOMALY_CODE,
                f"Unusual combination of features (anomaly score {anomaly:.3f} >= {anomaly_threshold:.3f})",
                0.0,
                "anomaly_score",
                anomaly,
            )
        )
    return out


def reasons_for(
    x: np.ndarray, contributions: np.ndarray, tx: Tx, k: int, anomaly: float, anomaly_threshold: float
) -> list[ReasonCode]:
    """The ``k`` features that moved this score most (by absolute log-odds contribution), riskiest
    first, plus an anomaly reason when the anomaly score alone reaches the review threshold. Features
    that did not move the score (contribution 0) are left out."""
    contrib = contributions[: len(FEATURES)]
    order = np.argsort(-np.abs(contrib), kind="stable")[:k]
    return _reasons(x, contrib, order, tx, anomaly, anomaly_threshold)


def reasons_for_batch(
    x: np.ndarray,
    contributions: np.ndarray,
    txs: Sequence[Tx],
    k: int,
    anomaly: np.ndarray,
    anomaly_threshold: float,
) -> list[list[ReasonCode]]:
    """``reasons_for`` for every row, with one vectorised sort for the batch."""
    contrib = contributions[:, : len(FEATURES)]
    order = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :k]
    return [
        _reasons(x[i], contrib[i], order[i], tx, float(anomaly[i]), anomaly_threshold)
        for i, tx in enumerate(txs)
    ]


# --- the model ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RiskModel:
    booster: lgb.Booster
    forest: FastIsolationForest
    quantiles: np.ndarray
    policy: DecisionPolicy
    rates_version: str
    attribution: PathAttribution
    predict_threads: int = 1

    @classmethod
    def build(
        cls,
        booster: lgb.Booster,
        forest: FastIsolationForest,
        quantiles: np.ndarray,
        policy: DecisionPolicy,
        rates_version: str,
        predict_threads: int = 1,
    ) -> RiskModel:
        attribution = PathAttribution.from_booster(booster)
        return cls(booster, forest, quantiles, policy, rates_version, attribution, predict_threads)

    def with_policy(self, policy: DecisionPolicy) -> RiskModel:
        return replace(self, policy=policy)

    def score(self, x: np.ndarray) -> Scores:
        """Probability, anomaly score and feature contributions for a feature matrix (one LightGBM
        ``pred_leaf`` call: LightGBM routes the rows, the leaf tables give output and reasons)."""
        leaves = np.asarray(self.booster.predict(x, pred_leaf=True, num_threads=self.predict_threads))
        raw, contributions = self.attribution.explain(leaves.reshape(len(x), -1))
        probability = 1.0 / (1.0 + np.exp(-raw))
        anomaly = percentile(self.forest.raw_scores(x), self.quantiles)
        return Scores(probability, anomaly, contributions)

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        self.booster.save_model(str(path / BOOSTER_FILE))
        self.forest.save(path / FOREST_FILE, self.quantiles)
        meta = {
            "feature_schema": FEATURE_SCHEMA,
            "features": list(FEATURE_NAMES),
            "policy": {
                "review": self.policy.review,
                "decline": self.policy.decline,
                "anomaly": self.policy.anomaly,
            },
            "rates_version": self.rates_version,
            **(extra or {}),
        }
        (path / MODEL_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


class IncompatibleModel(ValueError):
    """A stored model was trained on a different feature list than this code computes."""


def load_model(path: Path, manifest: Manifest | None = None, predict_threads: int = 1) -> RiskModel:
    """Load a stored version (the ``ModelSlot`` loader); refuses a model built for other features."""
    meta = json.loads((path / MODEL_FILE).read_text())
    if meta.get("feature_schema") != FEATURE_SCHEMA:
        raise IncompatibleModel(
            f"model was trained on features {meta.get('feature_schema')!r}; "
            f"this code computes {FEATURE_SCHEMA!r}"
        )
    booster = lgb.Booster(model_file=str(path / BOOSTER_FILE))
    if list(booster.feature_name()) != list(FEATURE_NAMES):
        raise IncompatibleModel(
            f"booster features {booster.feature_name()} differ from {list(FEATURE_NAMES)}"
        )
    forest, quantiles = FastIsolationForest.load(path / FOREST_FILE)
    p = meta["policy"]
    policy = DecisionPolicy(float(p["review"]), float(p["decline"]), float(p["anomaly"]))
    model = RiskModel.build(
        booster, forest, quantiles, policy, str(meta.get("rates_version", "")), predict_threads
    )
    # Warm up: the first predict call allocates; do it here, not inside a checkout.
    model.score(np.zeros((1, len(FEATURE_NAMES))))
    return model
