"""Training and evaluation pipeline (the seed's steps 1-5) as one command:

1. load ANY interactions file (CSV / TSV / Parquet / the service's event store) and optional items
   file, drop erased users, clean and de-duplicate. ``store`` names the event store the ``CBEC_*``
   settings point at, exactly as the server opens it: the embedded file in ``CBEC_STATE_DIR`` or the
   shared PostgreSQL (``CBEC_STATE_BACKEND=shared``), so a training job in the cluster reads what
   every replica recorded;
2. build the sparse user x item matrix;
3. split: random per-user holdout and temporal leave-last-out (k-fold on request);
4. tune on a validation split carved from the training part (never the test part), train each
   model with a progress bar, evaluate Precision/Recall/NDCG/MAP/HitRate@k and coverage;
5. write the evaluation as JSON and a PNG chart, refit the serving model on all the data and save
   it as a new version in the model store; a running service switches to it without a restart
   (ModelAdminService.LoadModelVersion, or SIGHUP).

    python -m services.recommender.train --interactions ml-100k
    python -m services.recommender.train --interactions my.csv --items items.parquet --serve als
    python -m services.recommender.train --interactions ml-100k --events store
    python -m services.recommender.train --interactions store --items items.parquet

Retraining from the events of RecordInteractions is the same command (``--events store``, or the
event store as ``--interactions``; a path to an embedded store file works as well).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.runtime.device import Device, select_device
from services.runtime.model_store import ModelStore

from . import data as D
from . import tuning
from .bundle import save_bundle
from .embeddings import Embedder, EmbeddingCache, item_text
from .events import EventStore
from .index import VectorIndex
from .metrics import Evaluation, evaluate
from .models import FitContext, Hybrid, Popularity, Recommender, VectorModel, build
from .split import Split, kfold, leave_last_out, random_holdout

if TYPE_CHECKING:
    from .settings import RecommenderSettings

log = logging.getLogger("cbec.recommender.train")
BASE_MODELS = ("popularity", "als", "bpr", "ease", "session_ease", "torch_mf", "content")
ALL_MODELS = (*BASE_MODELS, "hybrid")

# Search spaces for tuning on the validation split ("quick": EASE, ALS, popularity and the blend).
GRIDS: dict[str, list[dict[str, Any]]] = {
    "ease": [{"l2": v} for v in (150.0, 250.0, 400.0, 550.0, 750.0, 1000.0, 1500.0)],
    "als": [{"regularization": r, "alpha": a} for r in (5.0, 10.0, 20.0, 40.0) for a in (1.0, 2.0, 4.0)],
    "bpr": [{"learning_rate": lr, "regularization": r} for lr in (0.005, 0.01) for r in (0.02, 0.05, 0.1)],
    "torch_mf": [{"weight_decay": wd} for wd in (3e-5, 1e-4, 3e-4)],
    "sparse_ease": [{"l2": v} for v in (50.0, 100.0, 200.0, 400.0, 800.0)],
    # EASE's l2 with dropout (DLAE for p > 0, EASE for p = 0), session co-occurrence on or off
    # and the popularity discount: whichever parts help on this data are kept.
    "session_ease": [
        {"l2": l2, "dropout": p, "session_weight": sw, "pop_exponent": g}
        for l2, p in ((750.0, 0.0), (400.0, 0.5), (200.0, 0.5), (200.0, 0.67), (100.0, 0.75))
        for sw in (0.0, 1.0)
        for g in (0.0, 0.1)
    ],
    # What users with no history see: counting window and decay half-life, None = all time / none
    # (first, so that a tie keeps the plainest counts).
    "popularity": [
        {"window_days": w, "half_life_days": h} for w in (None, 90.0, 30.0, 7.0) for h in (None, 30.0, 7.0)
    ],
}
QUICK = ("ease", "als", "session_ease", "sparse_ease", "popularity")
#: The default tuning budget: a 100k-interaction data set trains end to end in about three
#: minutes on two cores with it (bench/recommender.py, train_seconds_*).
DEFAULT_BUDGET_MINUTES = 0.75
BLEND_STEPS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)


@dataclass
class Prepared:
    interactions: pd.DataFrame
    items: pd.DataFrame
    encoding: D.Encoding
    report: D.CleanReport
    events_seq: int = 0
    fingerprint: str = ""
    source: str = ""


STORE = "store"  # --interactions/--events value: the event store the CBEC_* settings name


def configured_settings() -> RecommenderSettings:
    """The service's settings (``CBEC_*`` and ``CBEC_RECOMMENDER_*``), read as the server reads them."""
    from services.runtime.config import load_settings

    from .settings import RecommenderSettings

    return load_settings(RecommenderSettings, "recommender")


def configured_store() -> EventStore:
    """The event store the server uses, opened from the same ``CBEC_*`` settings."""
    from services.runtime.state import StateConfig

    settings = configured_settings()
    return EventStore.open(StateConfig.from_settings(settings), settings.events_synchronous)


def _is_store_file(value: object) -> bool:
    return isinstance(value, str | Path) and str(value).endswith((".sqlite3", ".sqlite", ".db"))


def _source_name(source: EventStore | str | Path) -> str:
    """How messages and the report name an input."""
    return f"event store {source.db.dialect}" if isinstance(source, EventStore) else str(source)


def _read_store(source: EventStore | str | Path) -> tuple[pd.DataFrame, frozenset[str], list[Any], int, str]:
    """Interactions, erasures, upserted items, the highest seq read and a content fingerprint of an
    event store (a path: the embedded file; ``store``: the configured one; or an open store)."""
    if isinstance(source, EventStore):
        return _read_open_store(source, owned=False)
    if str(source) == STORE:
        return _read_open_store(configured_store(), owned=True)
    if not Path(source).is_file():
        raise D.DataError(f"{source}: no such file")
    try:
        return _read_open_store(EventStore(source), owned=True)
    except sqlite3.DatabaseError as exc:  # not SQLite, or not an event store
        raise D.DataError(f"{source}: not a readable event store ({exc})") from None


def _read_open_store(
    store: EventStore, owned: bool
) -> tuple[pd.DataFrame, frozenset[str], list[Any], int, str]:
    try:
        # erasures first: a user erased while we read has no events left to read
        store.refresh_forgotten()
        forgotten = store.forgotten_hashes()
        frame, seq = store.interactions_frame()
        stored = store.items()
    finally:
        if owned:
            store.close()
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    digest.update("\n".join(sorted(forgotten)).encode())
    for item in stored:
        digest.update(f"{item.item_id}\0{json.dumps(item.body, sort_keys=True)}".encode())
    return frame, forgotten, [(i.item_id, i.body) for i in stored], seq, digest.hexdigest()


def prepare(
    interactions: str | Path | pd.DataFrame | EventStore,
    items: str | Path | pd.DataFrame | None = None,
    events: str | Path | EventStore | None = None,
    min_user_interactions: int = 1,
) -> Prepared:
    """Steps 1-2: load, drop erased users, clean, align the catalogue and build the id encoding.

    ``interactions``: a file, ``ml-100k``, an event store (file, ``store`` or an EventStore) or a
    frame; ``events``: an event store whose events are added and whose erasures are applied."""
    source = "dataframe" if isinstance(interactions, pd.DataFrame) else str(interactions)
    if isinstance(interactions, EventStore):
        source = f"event store {interactions.db.dialect}"
    fingerprint_paths: list[Path] = []
    stores: list[EventStore | str | Path] = [events] if events is not None and events != "" else []
    base_raw: pd.DataFrame | None = None
    if isinstance(interactions, pd.DataFrame):
        base_raw = interactions
    elif isinstance(interactions, EventStore) or str(interactions) == STORE or _is_store_file(interactions):
        stores.insert(0, interactions)  # type: ignore[arg-type]
    elif str(interactions) == "ml-100k":
        base_raw, ml_items = D.movielens_100k()
        items = ml_items if items is None else items
        fingerprint_paths.append(D.movielens_100k_dir() / "ml-100k.inter")
    else:
        base_raw = D.load_interactions(interactions)
        fingerprint_paths.append(Path(interactions))
    forgotten: frozenset[str] = frozenset()
    events_seq = 0
    store_items: list[tuple[str, dict[str, Any]]] = []
    store_frames = []
    store_digests: list[str] = []
    for store_source in stores:
        frame, erased, stored_items, seq, digest = _read_store(store_source)
        forgotten = forgotten | erased
        # what the model covers: the engine folds in events after it (rows read, not a later max)
        events_seq = max(events_seq, seq)
        store_items += stored_items
        store_frames.append(frame)
        store_digests.append(digest)
    # Erasure applies to input files; the store already deleted an erased user's events, and what
    # the same id records after the erasure belongs to a new user.
    # Each part is cleaned on its own, then the parts together; the report adds up both passes.
    parts, reports = [], []
    if base_raw is not None:
        base, base_report = D.clean_interactions(base_raw, 1, forgotten, source=source)
        parts.append(base)
        reports.append(base_report)
    for store_source, frame in zip(stores, store_frames, strict=True):
        if len(frame):
            part, part_report = D.clean_interactions(frame, 1, source=_source_name(store_source))
            parts.append(part)
            reports.append(part_report)
    label = " + ".join(dict.fromkeys([source, *(_source_name(s) for s in stores)]))
    if not parts:
        raise D.DataError(f"{label}: no interactions to train on")
    merged = pd.concat(parts, ignore_index=True)
    try:
        cleaned, final_report = D.clean_interactions(merged, min_user_interactions, source=label)
    except D.DataError:  # the parts are clean and not empty: only the sparse-user rule empties this
        raise D.DataError(
            f"{label}: no user has {min_user_interactions} or more items (--min-user-interactions) after "
            f"cleaning; {sum(r.rows_in for r in reports)} rows read, {len(merged)} left after dropping "
            f"bad rows and merging duplicates"
        ) from None
    report = D.combine_reports(reports, final_report)
    if items is None:
        catalogue = pd.DataFrame({"item_id": pd.unique(cleaned["item_id"])})
    elif isinstance(items, pd.DataFrame):
        catalogue = items
    else:
        catalogue = D.load_items(items)
        fingerprint_paths.append(Path(items))
    catalogue = D.normalise_items(catalogue)
    if store_items:
        upserted = pd.DataFrame(
            [
                {
                    "item_id": item_id,
                    "title": body.get("title", ""),
                    "description": body.get("description", ""),
                    "category": body.get("category", ""),
                    "markets": "|".join(body.get("markets", [])),
                    "language": body.get("language", ""),
                }
                for item_id, body in store_items
            ]
        )
        catalogue = D.normalise_items(pd.concat([catalogue, upserted], ignore_index=True))
    missing = pd.Index(pd.unique(cleaned["item_id"])).difference(pd.Index(catalogue["item_id"]))
    if len(missing):
        catalogue = D.normalise_items(
            pd.concat([catalogue, pd.DataFrame({"item_id": missing.astype(str)})], ignore_index=True)
        )
    encoding = D.Encoding(
        np.asarray(pd.unique(cleaned["user_id"])).astype(str), catalogue["item_id"].to_numpy().astype(str)
    )
    from services.runtime.model_store import fingerprint

    data_fingerprint = fingerprint(*fingerprint_paths) if fingerprint_paths else ""
    if store_digests:  # files by their bytes, stores by what was read from them
        data_fingerprint = hashlib.sha256("|".join([data_fingerprint, *store_digests]).encode()).hexdigest()
    return Prepared(
        interactions=cleaned,
        items=catalogue.reset_index(drop=True),
        encoding=encoding,
        report=report,
        events_seq=events_seq,
        fingerprint=data_fingerprint,
        source=source,
    )


def embed_catalogue(
    items: pd.DataFrame, embedder: Embedder | None, progress: bool = False
) -> np.ndarray | None:
    """Item text embeddings aligned with the catalogue, or None when no item has text."""
    if embedder is None:
        return None
    texts = [
        item_text(t, d, c)
        for t, d, c in zip(items["title"], items["description"], items["category"], strict=True)
    ]
    if not any(texts):
        return None
    return embedder.embed(texts, progress=progress)


@dataclass
class TrainConfig:
    models: Sequence[str] = ALL_MODELS
    serve: str = "hybrid"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune: str = "quick"  # none | quick | full
    seed: int = 0
    ks: Sequence[int] = (10, 20)
    test_fraction: float = 0.2
    splits: Sequence[str] = ("random", "temporal")
    kfold: int = 0
    index: str = "auto"
    evaluate: bool = True
    progress: bool = True
    max_eval_users: int = 0
    validation_folds: int = 2
    search: str = "budget"  # budget (Optuna, tuning.py) | grid (every setting of GRIDS)
    budget_minutes: float = DEFAULT_BUDGET_MINUTES


@dataclass
class TrainResult:
    evaluation: dict[str, Any]
    params: dict[str, dict[str, Any]]
    version: str = ""
    per_user: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _context(
    prepared: Prepared,
    train: pd.DataFrame,
    embeddings: np.ndarray | None,
    device: Device,
    seed: int,
    progress: bool,
) -> FitContext:
    return FitContext(
        device=device,
        seed=seed,
        progress=progress,
        interactions=prepared.encoding.add_index_columns(train),
        item_embeddings=embeddings,
    )


def available(models: Sequence[str], embeddings: np.ndarray | None, n_items: int) -> list[str]:
    """The models that can train on this catalogue. The dense EASE family needs items x items
    matrices: past ``EASE.defaults["max_items"]`` it is replaced by ``sparse_ease`` (deploy/CAPACITY.md)."""
    from .models import EASE

    out: list[str] = []
    dense_max = int(EASE.defaults["max_items"])
    for name in models:
        if name == "content" and embeddings is None:
            log.warning("no item text: skipping the content model")
            continue
        if name in ("ease", "session_ease") and n_items > dense_max:
            log.warning("%s needs a dense %d x %d matrix: using sparse_ease instead", name, n_items, n_items)
            name = "sparse_ease"
        if name not in out:
            out.append(name)
    return out


def fit_models(
    names: Sequence[str],
    X: sp.csr_matrix,
    ctx: FitContext,
    params: dict[str, dict[str, Any]],
    bar: Any = None,
) -> dict[str, Recommender]:
    fitted: dict[str, Recommender] = {}
    for name in names:
        if name == "hybrid":
            continue
        if bar is not None:
            bar.set_postfix_str(name)
        model = build(name, **params.get(name, {}))
        t0 = time.perf_counter()
        model.fit(X, ctx)
        log.info("fitted %s in %.1fs", name, time.perf_counter() - t0)
        fitted[name] = model
        if bar is not None:
            bar.update(1)
    return fitted


def _scorer(model: Recommender, X: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
    return lambda rows: model.score(rows, X[rows])


def _eval_users(test: sp.csr_matrix, limit: int, seed: int) -> np.ndarray:
    users = np.flatnonzero(np.diff(test.tocsr().indptr) > 0)
    if limit and len(users) > limit:
        users = np.sort(np.random.default_rng(seed).choice(users, limit, replace=False))
    return users


#: The blend search ranks each user's candidates only: the union of every component's top this many.
BLEND_CANDIDATES = 100


def tune_blend(
    scores: dict[str, np.ndarray], X: sp.csr_matrix, T: sp.csr_matrix, users: np.ndarray, k: int = 10
) -> tuple[dict[str, float], float]:
    """Coordinate ascent on the blend weights, maximising NDCG@k on the validation users.

    Each trial ranks only the union of the components' top ``BLEND_CANDIDATES`` unseen items per
    user (a weighted sum of z-scores rarely lifts an item that no component ranks that high). That
    is about 20x less work than ranking the catalogue, which made the blend search cost more than
    the whole tuning budget at 8,000 items; the value returned is then measured on the catalogue."""
    X, T = X[users].tocsr(), T[users].tocsr()
    seen_rows, seen_cols = X.nonzero()
    z: dict[str, np.ndarray] = {}
    candidates = []
    for name, s in scores.items():
        std = s.std(axis=1, keepdims=True)
        zn = ((s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)).astype(np.float32)
        zn[seen_rows, seen_cols] = -np.inf
        z[name] = zn
        c = min(BLEND_CANDIDATES, zn.shape[1] - 1)
        candidates.append(np.argpartition(-zn, c, axis=1)[:, : c + 1])
    cand = np.sort(np.hstack(candidates), axis=1)
    duplicate = np.zeros(cand.shape, dtype=bool)
    duplicate[:, 1:] = cand[:, 1:] == cand[:, :-1]
    zc = {n: np.take_along_axis(v, cand, axis=1) for n, v in z.items()}
    rel = np.take_along_axis(T.toarray() > 0, cand, axis=1)
    n_pos = np.diff(T.indptr)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.r_[0.0, np.cumsum(discounts)][np.minimum(n_pos, k)]
    rows = np.arange(len(cand))[:, None]

    def ndcg(weights: dict[str, float]) -> float:
        if not any(weights.values()):
            return -1.0
        total = sum(w * zc[n] for n, w in weights.items() if w)
        total = np.where(duplicate, -np.inf, total)
        top = np.argpartition(-total, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-total[rows, top], axis=1, kind="stable"), axis=1)
        dcg = (rel[rows, top] & np.isfinite(total[rows, top])) @ discounts
        return float(np.mean(np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)))

    singles = {n: ndcg({n: 1.0}) for n in z}
    best_name = max(singles, key=singles.__getitem__)
    weights = {n: (1.0 if n == best_name else 0.0) for n in z}
    best = singles[best_name]
    for _round in range(3):
        improved = False
        for name in z:
            if name == best_name:
                continue
            for step in BLEND_STEPS:
                trial = {**weights, name: step}
                value = ndcg(trial)
                if value > best + 1e-5:
                    best, weights, improved = value, trial, True
        if not improved:
            break
    total = sum(w * z[n] for n, w in weights.items() if w)
    exact = evaluate(lambda r: total[r], X, T, (k,), users=np.arange(X.shape[0])).mean[f"ndcg@{k}"]
    return weights, float(exact)


def validation_splits(train: pd.DataFrame, config: TrainConfig) -> list[Split]:
    """Per-user random holdouts of the training part (seeds seed+1 ...), never the test part."""
    folds = range(config.validation_folds)
    return [random_holdout(train, config.test_fraction, seed=config.seed + 1 + f) for f in folds]


def tune(
    prepared: Prepared,
    train: pd.DataFrame,
    names: Sequence[str],
    config: TrainConfig,
    embeddings: np.ndarray | None,
    device: Device,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Tune on ``validation_folds`` validation splits carved from ``train`` (each setting scored by
    its NDCG@10 averaged over the folds): Optuna under ``config.budget_minutes`` (tuning.py), or
    the exhaustive ``GRIDS`` (``search="grid"``, the reference the budgeted search is judged by).
    Then the hybrid's blend weights, on the tuned components' validation scores."""
    from tqdm.auto import tqdm

    params = {n: dict(config.params.get(n, {})) for n in names}
    if config.tune == "none":
        return params, {}
    enc = prepared.encoding
    valids = validation_splits(train, config)
    folds = []
    for valid in valids:
        X, T = enc.matrix(valid.train), enc.matrix(valid.test, binary=True)
        ctx = _context(prepared, valid.train, embeddings, device, config.seed, False)
        folds.append(tuning.Fold(X, T, ctx, _eval_users(T, config.max_eval_users, config.seed)))
    report: dict[str, Any] = {"validation": [v.describe() for v in valids], "search": config.search}
    tunable = [
        n
        for n in names
        if (config.tune == "full" or n in QUICK)
        and (tuning.free_space(n, config.params.get(n, {})) if config.search == "budget" else n in GRIDS)
    ]
    scores: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    if config.search == "grid":
        report["grid"] = _grid_search(tunable, params, folds, config)
        for name, entry in report["grid"].items():
            params[name].update(entry["best"])
    else:
        budget = max(0.0, config.budget_minutes * 60.0)
        report.update({"budget_s": budget, "studies": {}})
        clock = lambda: time.perf_counter() - t0  # noqa: E731

        with tqdm(
            total=round(budget), desc="tuning on validation", unit="s", disable=not config.progress
        ) as bar:

            def progress(study: tuning.Study, trial: dict[str, Any]) -> None:
                bar.n = min(round(clock()), bar.total)
                bar.set_postfix_str(
                    f"{study.name} trial {len(study.trials)} best ndcg@10={study.best_value:.4f}"
                )

            for i, name in enumerate(tunable):
                share = max(0.0, budget - clock()) / (len(tunable) - i)
                study = tuning.search(name, params[name], folds, share, config.seed, clock, progress)
                params[name] = study.best_params
                scores[name] = study.best_scores
                report["studies"][name] = {
                    "best": {
                        k: study.best_params.get(k)
                        for k in tuning.free_space(name, config.params.get(name, {}))
                    },
                    "ndcg@10": round(study.best_value, 5),
                    "trials": study.trials,
                }
            bar.n = min(round(clock()), bar.total)
            bar.refresh()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    validation = {n: e["ndcg@10"] for n, e in (report.get("studies") or report.get("grid") or {}).items()}
    if "hybrid" in names:
        components = [n for n in names if n != "hybrid"]
        for n in components:  # components not tuned: one fit per fold
            if n not in scores:
                scores[n] = [build(n, **params[n]).fit_scores(f.X, f.ctx, f.users) for f in folds]
        stacked = {n: np.vstack(v) for n, v in scores.items() if n in components}
        X_all = sp.vstack([f.X[f.users] for f in folds]).tocsr()
        T_all = sp.vstack([f.T[f.users] for f in folds]).tocsr()
        rows = np.arange(X_all.shape[0])
        weights, value = tune_blend(stacked, X_all, T_all, rows)
        params["hybrid"] = {"weights": weights, "components": {n: params[n] for n in components}}
        report["blend"] = {"weights": weights, "ndcg@10": round(value, 5)}
        for n in components:
            if n not in validation:
                s = stacked[n]
                validation[n] = round(
                    evaluate(lambda r, s=s: s[r], X_all, T_all, (10,), users=rows).mean["ndcg@10"], 5
                )
        validation["hybrid"] = round(value, 5)
    report["validation_ndcg@10"] = validation
    return params, report


def _grid_search(
    tunable: Sequence[str], params: dict[str, dict[str, Any]], folds: list[tuning.Fold], config: TrainConfig
) -> dict[str, Any]:
    """Every setting of ``GRIDS`` on every fold (``--search grid``)."""
    from tqdm.auto import tqdm

    out: dict[str, Any] = {}
    total = sum(len(GRIDS[n]) for n in tunable) * len(folds)
    with tqdm(total=total, desc="tuning on validation (grid)", disable=not config.progress) as bar:
        for name in tunable:
            results = []
            for grid_params in GRIDS[name]:
                if any(k in config.params.get(name, {}) for k in grid_params):
                    continue  # set explicitly: not tuned
                trial = {**params[name], **grid_params}
                values = []
                for f in folds:
                    s = build(name, **trial).fit_scores(f.X, f.ctx, f.users)
                    values.append(tuning._ndcg(s, f))
                    bar.update(1)
                results.append((float(np.mean(values)), grid_params))
                bar.set_postfix_str(f"{name} {grid_params} ndcg@10={results[-1][0]:.4f}")
            if results:
                best_value, best_params = max(results, key=lambda r: r[0])
                out[name] = {
                    "best": best_params,
                    "ndcg@10": round(best_value, 5),
                    "tried": [{"params": p, "ndcg@10": round(v, 5)} for v, p in results],
                }
    return out


def make_hybrid(fitted: dict[str, Recommender], params: dict[str, Any]) -> Hybrid:
    weights = params.get("weights") or Hybrid.defaults["weights"]
    used = {n: m for n, m in fitted.items() if weights.get(n, 0.0) > 0}
    if not used:
        raise ValueError("the hybrid has no component with a positive weight")
    return Hybrid.from_fitted(used, weights)


def evaluate_split(
    prepared: Prepared,
    split: Split,
    names: Sequence[str],
    params: dict[str, dict[str, Any]],
    config: TrainConfig,
    embeddings: np.ndarray | None,
    device: Device,
) -> dict[str, Evaluation]:
    from tqdm.auto import tqdm

    enc = prepared.encoding
    X, T = enc.matrix(split.train), enc.matrix(split.test, binary=True)
    ctx = _context(prepared, split.train, embeddings, device, config.seed, False)
    base = [n for n in names if n != "hybrid"]
    with tqdm(total=len(base), desc=f"training on {split.name}", disable=not config.progress) as bar:
        fitted = fit_models(base, X, ctx, params, bar)
    if "hybrid" in names:
        fitted["hybrid"] = make_hybrid(fitted, params.get("hybrid", {}))
    users = _eval_users(T, config.max_eval_users, config.seed)
    return {
        name: evaluate(_scorer(model, X), X, T, config.ks, users=users)
        for name, model in fitted.items()
        if name in names
    }


def chart(evaluation: dict[str, Any], path: Path, k: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = evaluation["splits"]
    metrics = ["precision", "recall", "ndcg", "map", "hit_rate", "coverage"]
    fig, axes = plt.subplots(len(splits), 1, figsize=(11, 3.6 * len(splits)), squeeze=False)
    for ax, (split_name, by_model) in zip(axes[:, 0], splits.items(), strict=True):
        models = list(by_model)
        width = 0.8 / max(len(models), 1)
        x = np.arange(len(metrics))
        for i, model in enumerate(models):
            values = [by_model[model].get(f"{m}@{k}", 0.0) for m in metrics]
            ax.bar(x + i * width, values, width, label=model)
        ax.set_xticks(x + width * (len(models) - 1) / 2, [f"{m}@{k}" for m in metrics])
        ax.set_title(
            f"{split_name} ({evaluation['data']['users']} users, {evaluation['data']['items']} items)"
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_index(model: Recommender, kind: str, seed: int, device: Device) -> VectorIndex | None:
    if not isinstance(model, VectorModel):
        return None
    queries = None
    if model.user_factors is not None and len(model.user_factors):
        rng = np.random.default_rng(seed)
        take = rng.choice(len(model.user_factors), size=min(500, len(model.user_factors)), replace=False)
        queries = model.query_matrix(np.asarray(model.user_factors[take], dtype=np.float32))
    return VectorIndex.build(model.item_matrix(), kind=kind, tune_queries=queries, seed=seed, device=device)


def train_and_save(
    prepared: Prepared,
    serve: str,
    params: dict[str, dict[str, Any]],
    embeddings: np.ndarray | None,
    device: Device,
    store: ModelStore,
    metrics: dict[str, float],
    extra: dict[str, Any],
    config: TrainConfig,
    files: dict[str, Path] | None = None,
) -> str:
    """Refit the serving model on all data, build its index and write a new model version."""
    from tqdm.auto import tqdm

    enc = prepared.encoding
    X = enc.matrix(prepared.interactions)
    ctx = _context(prepared, prepared.interactions, embeddings, device, config.seed, config.progress)
    if serve == "hybrid":
        weights = (params.get("hybrid") or {}).get("weights") or Hybrid.defaults["weights"]
        params = {**params, "hybrid": {**params.get("hybrid", {}), "weights": weights}}
        components = [n for n, w in weights.items() if w > 0 and (n != "content" or embeddings is not None)]
    else:
        components = [serve]
    with tqdm(
        total=len(components) + 2, desc="training the serving model", disable=not config.progress
    ) as bar:
        fitted = fit_models(components, X, ctx, params, bar)
        model: Recommender = make_hybrid(fitted, params["hybrid"]) if serve == "hybrid" else fitted[serve]
        popularity = fitted.get("popularity")
        if not isinstance(popularity, Popularity):
            popularity = Popularity(**params.get("popularity", {}))
            popularity.fit(X, ctx)
        bar.set_postfix_str("index")
        index = build_index(model, config.index, config.seed, Device("cpu"))
        bar.update(1)
        manifest_params = {
            "serving_model": serve,
            "model_params": params.get(serve, {}),
            "tuned_params": params,
            "events_seq": prepared.events_seq,
            "source": prepared.source,
            "users": enc.n_users,
            "items": enc.n_items,
            "interactions": len(prepared.interactions),
            "index": index.info.__dict__ if index is not None else None,
            **extra,
        }
        with store.new_version(
            metrics=metrics, data_fingerprint=prepared.fingerprint, params=manifest_params
        ) as (path, manifest):
            save_bundle(
                path,
                serve,
                enc.user_ids,
                prepared.items,
                X,
                model,
                popularity,
                content=embeddings,
                index=index,
                events_seq=prepared.events_seq,
                meta={"trained_at": time.time()},
            )
            for name, src in (files or {}).items():
                (path / name).write_bytes(src.read_bytes())
        bar.update(1)
    return manifest.version


def run(
    prepared: Prepared,
    config: TrainConfig,
    embeddings: np.ndarray | None,
    device: Device,
    store: ModelStore | None,
    out_dir: Path | None,
) -> TrainResult:
    """Steps 3-5 on prepared data."""
    names = available(config.models, embeddings, prepared.encoding.n_items)
    if config.serve in ("ease", "session_ease") and config.serve not in names and "sparse_ease" in names:
        config = replace(config, serve="sparse_ease")  # past the dense limit: see available()
    if config.serve not in names:
        raise ValueError(f"the serving model {config.serve!r} is not among the trained models {names}")
    evaluation: dict[str, Any] = {
        "data": {
            "source": prepared.source,
            "users": prepared.encoding.n_users,
            "items": prepared.encoding.n_items,
            "interactions": len(prepared.interactions),
            "cleaning": prepared.report.to_dict(),
            "fingerprint": prepared.fingerprint,
        },
        "protocol": {
            "relevance": "binary: every held-out interaction",
            "candidates": "every catalogue item not in the user's training interactions",
            "tuning": "on a validation split carved from the training part of the random holdout",
            "seed": config.seed,
            "test_fraction": config.test_fraction,
        },
        "splits": {},
    }
    params = {n: dict(config.params.get(n, {})) for n in names}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    metrics: dict[str, float] = {}
    if config.evaluate:
        primary = random_holdout(prepared.interactions, config.test_fraction, config.seed)
        params, tuned = tune(prepared, primary.train, names, config, embeddings, device)
        evaluation["tuning"] = tuned
        splits = []
        if "random" in config.splits:
            splits.append(primary)
        if "temporal" in config.splits and prepared.interactions["timestamp"].notna().any():
            splits.append(leave_last_out(prepared.interactions))
        for split in splits:
            results = evaluate_split(prepared, split, names, params, config, embeddings, device)
            evaluation["splits"][split.name] = {
                name: {k: round(v, 5) for k, v in r.mean.items()} for name, r in results.items()
            }
            per_user[split.name] = {
                name: r.per_user["ndcg@10"] for name, r in results.items() if "ndcg@10" in r.per_user
            }
        if config.kfold:
            folds: dict[str, list[dict[str, float]]] = {}
            for split in kfold(prepared.interactions, config.kfold, config.seed):
                for name, r in evaluate_split(
                    prepared, split, names, params, config, embeddings, device
                ).items():
                    folds.setdefault(name, []).append(r.mean)
            evaluation["kfold"] = {
                name: {
                    key: {
                        "mean": round(float(np.mean([m[key] for m in ms])), 5),
                        "std": round(float(np.std([m[key] for m in ms])), 5),
                    }
                    for key in ms[0]
                }
                for name, ms in folds.items()
            }
        first = next(iter(evaluation["splits"].values()), {})
        metrics = {k: float(v) for k, v in first.get(config.serve, {}).items()}
    evaluation["params"] = params
    files: dict[str, Path] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2, default=str) + "\n")
        files["evaluation.json"] = out_dir / "evaluation.json"
        if evaluation["splits"]:
            chart(evaluation, out_dir / "evaluation.png")
            files["evaluation.png"] = out_dir / "evaluation.png"
        if per_user:  # per-user NDCG@10, for paired comparisons between runs (bench/recommender.py)
            np.savez_compressed(
                out_dir / "per_user_ndcg.npz",
                **{f"{split}/{model}": v for split, by in per_user.items() for model, v in by.items()},
            )
        studies = evaluation.get("tuning", {}).get("studies")
        if studies:
            tuning.chart(studies, out_dir / "tuning.png", evaluation["tuning"]["budget_s"])
            files["tuning.png"] = out_dir / "tuning.png"
    version = ""
    if store is not None:
        version = train_and_save(
            prepared,
            config.serve,
            params,
            embeddings,
            device,
            store,
            metrics,
            {"evaluation": {s: r.get(config.serve, {}) for s, r in evaluation["splits"].items()}},
            config,
            files,
        )
    return TrainResult(evaluation, params, version, per_user)


def _parse_params(values: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``als.factors=128`` -> {"als": {"factors": 128}} (values parsed as JSON when they can be)."""
    out: dict[str, dict[str, Any]] = {}
    for item in values:
        key, _, raw = item.partition("=")
        model, _, name = key.partition(".")
        if not name or not raw:
            raise ValueError(f"--param wants model.name=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(model, {})[name] = value
    return out


def _cache_path() -> Path:
    """Where the server keeps its embeddings cache (never the code directory)."""
    cache = configured_settings().embeddings_cache
    assert cache is not None
    return cache


PROG = "python -m services.recommender.train"


def build_parser() -> argparse.ArgumentParser:
    """The command's options (the README documents each one; tests/recommender/test_readme.py checks)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--interactions",
        required=True,
        help="file, 'ml-100k' (packaged MovieLens-100K) or 'store' (the event store of the CBEC_* settings)",
    )
    parser.add_argument("--items", help="items file with item_id and text (title, description, category)")
    parser.add_argument(
        "--events",
        help="an event store whose events are added and erasures applied: 'store' (the one the CBEC_* "
        "settings name: CBEC_STATE_DIR, or the shared PostgreSQL) or an embedded store file",
    )
    parser.add_argument("--models", default=",".join(ALL_MODELS), help="comma-separated models to train")
    parser.add_argument("--serve", default="hybrid", help="the model saved for serving")
    parser.add_argument("--param", action="append", default=[], help="model.name=value (repeatable)")
    parser.add_argument(
        "--tune",
        choices=["none", "quick", "full"],
        default="quick",
        help="which models are tuned: quick = EASE family, ALS, popularity; full = also BPR, torch_mf",
    )
    parser.add_argument(
        "--search",
        choices=["budget", "grid"],
        default="budget",
        help="budget: Optuna within --budget-minutes; grid: every setting of the fixed grids",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=DEFAULT_BUDGET_MINUTES,
        help="time for the hyperparameter search (--search budget)",
    )
    parser.add_argument("--splits", default="random,temporal")
    parser.add_argument("--kfold", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--min-user-interactions", type=int, default=5)
    parser.add_argument("--ks", default="10,20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto")
    parser.add_argument("--no-eval", action="store_true", help="skip steps 3-4 (just train and save)")
    parser.add_argument("--no-save", action="store_true", help="evaluate only, write no model version")
    parser.add_argument("--no-content", action="store_true", help="do not embed item texts")
    parser.add_argument("--max-eval-users", type=int, default=0)
    parser.add_argument(
        "--validation-folds", type=int, default=2, help="validation splits averaged in tuning"
    )
    parser.add_argument("--models-dir", type=Path, help="default: the settings' CBEC_MODELS_DIR (models)")
    parser.add_argument("--out", type=Path, default=Path("var/recommender/eval"))
    parser.add_argument(
        "--embeddings-cache",
        type=Path,
        help="local cache of item text embeddings (default: CBEC_RECOMMENDER_EMBEDDINGS_CACHE, or in "
        "CBEC_STATE_DIR)",
    )
    parser.add_argument("--device", help="auto | cpu | cuda[:N]; default: the settings' CBEC_DEVICE (auto)")
    return parser


def _check_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], dict[str, dict[str, Any]], list[int]]:
    """Models, parameters and cut-offs, or exit 2 with argparse's usage error before any data is read."""
    from .models import MODELS

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        parser.error(f"--models: unknown model(s) {unknown}; choose from {', '.join(sorted(MODELS))}")
    if args.serve not in models:
        parser.error(f"--serve {args.serve!r} is not among --models {models}")
    try:
        params = _parse_params(args.param)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        parser.error(f"--ks wants comma-separated whole numbers, got {args.ks!r}")
    if not ks or min(ks) < 1:
        parser.error(f"--ks wants positive cut-offs, got {args.ks!r}")
    if not (args.budget_minutes >= 0 and np.isfinite(args.budget_minutes)):
        parser.error(f"--budget-minutes wants a number of minutes >= 0, got {args.budget_minutes!r}")
    return models, params, ks


def main(argv: Sequence[str] | None = None) -> None:
    """The command line. Unusable input (a DataError: the file and the problem) is one line on stderr
    and exit status 2, like argparse's own usage errors; anything else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    models, params, ks = _check_arguments(parser, args)
    if args.models_dir is None or args.device is None:
        settings = configured_settings()
        args.models_dir = args.models_dir or settings.models_dir
        args.device = args.device or settings.device
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _main(args, models, params, ks)
    except D.DataError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(
    args: argparse.Namespace, models: list[str], params: dict[str, dict[str, Any]], ks: list[int]
) -> None:
    device = select_device(args.device)
    t0 = time.perf_counter()
    prepared = prepare(args.interactions, args.items, args.events, args.min_user_interactions)
    if prepared.encoding.n_users < 2:
        inputs = " + ".join(x for x in (args.interactions, args.events) if x)
        raise D.DataError(
            f"{inputs}: {prepared.encoding.n_users} user left after cleaning; training needs at least 2 "
            f"(--min-user-interactions {args.min_user_interactions})"
        )
    if not args.no_eval and prepared.encoding.n_items < max(ks):
        inputs = " + ".join(x for x in (args.interactions, args.items, args.events) if x)
        raise D.DataError(
            f"{inputs}: {prepared.encoding.n_items} items, fewer than the largest cut-off --ks {max(ks)}"
        )
    print(f"data: {prepared.report.to_dict()}")
    embedder = None if args.no_content else Embedder(EmbeddingCache(args.embeddings_cache or _cache_path()))
    embeddings = embed_catalogue(prepared.items, embedder, progress=True)
    config = TrainConfig(
        models=models,
        serve=args.serve,
        params=params,
        tune=args.tune,
        seed=args.seed,
        ks=ks,
        test_fraction=args.test_fraction,
        splits=[s.strip() for s in args.splits.split(",") if s.strip()],
        kfold=args.kfold,
        index=args.index,
        evaluate=not args.no_eval,
        max_eval_users=args.max_eval_users,
        validation_folds=args.validation_folds,
        search=args.search,
        budget_minutes=args.budget_minutes,
    )
    store = None if args.no_save else ModelStore(args.models_dir, "recommender")
    result = run(prepared, config, embeddings, device, store, args.out)
    for split_name, by_model in result.evaluation["splits"].items():
        print(f"\n{split_name}")
        for name, m in by_model.items():
            print(
                f"  {name:<11} ndcg@10={m.get('ndcg@10', 0):.4f} recall@10={m.get('recall@10', 0):.4f} "
                f"coverage@10={m.get('coverage@10', 0):.3f}"
            )
    if result.version:
        print(f"\nsaved model version {result.version} in {store.dir if store else ''}")
    chart_note = " and evaluation.png" if result.evaluation["splits"] else ""
    chart_note += ", tuning.png" if result.evaluation.get("tuning", {}).get("studies") else ""
    print(f"evaluation: {args.out / 'evaluation.json'}{chart_note}; {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
