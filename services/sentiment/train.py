"""Train the sentiment head on real reviews, evaluate it, and write a new model-store version.

    python -m services.sentiment.train --sample 3000          # first 3,000 reviews in priority order
    python -m services.sentiment.train                        # every review (slow: ~1 h of embedding)
    python -m services.sentiment.train --sample 3000 --finetune-layers 2   # fine-tune the top 2 layers too
    python -m services.sentiment.train --import-hf DIR        # serve a fine-tuned HF directory instead

Reviews are split by product (train/val/test ~70/10/20). Embeddings come from the on-disk cache when
an earlier run computed them. Train + validation reviews form a cross-validation pool (5 folds grouped
by product): the head configuration is chosen on out-of-fold macro-F1, the calibration (temperature +
class bias on the 3-class log-probabilities) and the decision rule (class offsets for macro-F1) are
fitted on the out-of-fold predictions, and the served head averages the 5 fold models. The test split
is touched once, for the evaluation written next to the model (``evaluation.json``,
``confusion.png``, ``calibration.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from services.runtime.model_store import ModelStore, fingerprint

from .data import LABELS, MULTILINGUAL_FILE, data_path, load_multilingual, load_reviews, priority_order
from .embed import EmbeddingCache, embed_cached
from .encoder import DEFAULT_INT8, POOL_LAYERS, Encoder
from .finetune import FinetuneParams
from .model import (
    DEFAULT_CLASS_STARS,
    Calibration,
    Head,
    HeadEnsemble,
    HeadModel,
    Scores,
    star_logits_to_scores,
)

if TYPE_CHECKING:
    from .config import SentimentSettings

log = logging.getLogger("cbec.sentiment.train")
SERVICE = "sentiment"


# --- metrics -----------------------------------------------------------------------------------
def confusion(y: np.ndarray, pred: np.ndarray, k: int = 3) -> np.ndarray:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def classification_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    m = confusion(y, pred)
    tp = np.diag(m).astype(float)
    precision = np.divide(tp, m.sum(axis=0), out=np.zeros(3), where=m.sum(axis=0) > 0)
    recall = np.divide(tp, m.sum(axis=1), out=np.zeros(3), where=m.sum(axis=1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(3), where=(precision + recall) > 0
    )
    return {
        "n": len(y),
        "accuracy": round(float(tp.sum() / max(len(y), 1)), 4),
        "macro_f1": round(float(f1.mean()), 4),
        "per_class": {
            name: {
                "precision": round(float(p), 4),
                "recall": round(float(r), 4),
                "f1": round(float(f), 4),
                "support": int(s),
            }
            for name, p, r, f, s in zip(LABELS, precision, recall, f1, m.sum(axis=1), strict=True)
        },
        "confusion": m.tolist(),
    }


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    return float(classification_metrics(y, pred)["macro_f1"])


def calibration_metrics(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the top class, Brier score, NLL, and the reliability table."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
            table.append([float(conf[mask].mean()), float(correct[mask].mean()), int(mask.sum())])
    onehot = np.eye(3)[y]
    return {
        "ece": round(float(ece), 4),
        "brier": round(float(((probs - onehot) ** 2).sum(axis=1).mean()), 4),
        "nll": round(float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean()), 4),
        "reliability": table,
    }


# --- fitting -----------------------------------------------------------------------------------
@dataclass
class HeadParams:
    hidden: int = 256
    dropout: float = 0.2
    weight_decay: float = 1e-3
    lr: float = 2e-3
    epochs: int = 60
    batch_size: int = 128
    class_weight_power: float = 0.5  # 0 = unweighted, 1 = inverse frequency of the 3 classes
    aux_weight: float = 0.3  # "recommended" flag as an auxiliary target
    seed: int = 0


def fit_head(
    x: np.ndarray,
    stars: np.ndarray,
    recommended: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    p: HeadParams,
) -> tuple[Head, dict[str, Any]]:
    """Train on stars (5 classes); keep the epoch with the best validation 3-class log-loss."""
    torch.manual_seed(p.seed)
    head = Head(x.shape[1], p.hidden, p.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    y3 = np.where(stars <= 2, 0, np.where(stars == 3, 1, 2))
    freq = np.bincount(y3, minlength=3) / len(y3)
    w3 = (1 / np.clip(freq, 1e-6, None)) ** p.class_weight_power
    w3 = w3 / (w3 * freq).sum()
    sample_w = torch.as_tensor(w3[y3], dtype=torch.float32)
    xt = torch.as_tensor(np.array(x, dtype=np.float32))
    st = torch.as_tensor(np.array(stars, dtype=np.int64) - 1)
    rt = torch.as_tensor(np.array(recommended, dtype=np.float32))
    xv = torch.as_tensor(np.array(x_val, dtype=np.float32))
    batch_size = max(p.batch_size, len(x) // 40)  # about 40 steps an epoch, whatever the data size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=p.lr, total_steps=p.epochs * ((len(x) + batch_size - 1) // batch_size)
    )
    gen = torch.Generator().manual_seed(p.seed)
    best: tuple[float, dict[str, torch.Tensor], int] = (float("inf"), {}, -1)
    history = []
    for epoch in range(p.epochs):
        head.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            out = head(xt[idx])
            loss = (
                torch.nn.functional.cross_entropy(out[:, :5], st[idx], reduction="none") * sample_w[idx]
            ).mean()
            loss = loss + p.aux_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                out[:, 5], rt[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            logits = head(xv)[:, :5].numpy().astype(np.float64)
        scores = star_logits_to_scores(logits, Calibration())
        nll = float(-np.log(np.clip(scores.probs[np.arange(len(y_val)), y_val], 1e-12, 1)).mean())
        history.append(round(nll, 4))
        if nll < best[0]:
            best = (nll, {k: v.clone() for k, v in head.state_dict().items()}, epoch)
    head.load_state_dict(best[1])
    head.eval()
    return head, {"best_epoch": best[2], "val_nll_by_epoch": history}


def head_logits(head: Head, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.as_tensor(x, dtype=torch.float32))[:, :5].numpy().astype(np.float64)


def fit_calibration(star_logits: np.ndarray, y: np.ndarray, class_stars: list[float]) -> Calibration:
    """Temperature + class bias by minimising validation log-loss, then decision offsets for macro-F1."""
    raw = star_logits_to_scores(star_logits, Calibration())
    log_p = torch.as_tensor(np.log(np.clip(raw.probs, 1e-12, 1)))
    yt = torch.as_tensor(np.array(y, dtype=np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p / log_t.exp() + bias, yt) + 1e-3 * (bias**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    b = bias.detach().numpy()
    cal = Calibration(
        float(log_t.detach().exp()), [float(x) for x in b - b.mean()], [0.0, 0.0, 0.0], class_stars
    )
    probs = star_logits_to_scores(star_logits, cal).probs
    lp = np.log(np.clip(probs, 1e-12, 1))
    best = (macro_f1(y, lp.argmax(axis=1)), 0.0, 0.0)
    grid = np.linspace(-1.0, 3.0, 41)
    for d_neg in grid:
        for d_neu in grid:
            pred = (lp + np.array([d_neg, d_neu, 0.0])).argmax(axis=1)
            f = macro_f1(y, pred)
            if f > best[0] + 1e-9:
                best = (f, float(d_neg), float(d_neu))
    cal.decision = [best[1], best[2], 0.0]
    return cal


# --- charts ------------------------------------------------------------------------------------
def plot_confusion(matrix: list[list[int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(m / np.clip(m.sum(axis=1, keepdims=True), 1, None), cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=10)
    ax.set_xticks(range(3), LABELS)
    ax.set_yticks(range(3), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (stars 1-2 / 3 / 4-5)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(tables: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    for name, table in tables.items():
        if table:
            t = np.asarray(table)
            ax.plot(t[:, 0], t[:, 1], marker="o", label=name)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_title("calibration on the test split", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the whole run -----------------------------------------------------------------------------
@dataclass
class Embedded:
    df: pd.DataFrame  # reviews that have a vector, in priority order
    x: np.ndarray
    from_cache: int
    embedded: int
    seconds: float
    requested: int


def embed_reviews(
    encoder: Encoder, cache: EmbeddingCache | None, sample: int | None, budget_s: float | None
) -> Embedded:
    df = load_reviews()
    order = priority_order(df)[:sample]
    picked = df.iloc[order].reset_index(drop=True)
    result = embed_cached(
        encoder, picked["text"].tolist(), cache, budget_s=budget_s, desc="embedding reviews"
    )
    keep = result.done
    return Embedded(
        picked[keep].reset_index(drop=True),
        result.vectors[keep],
        result.from_cache,
        result.embedded,
        result.seconds,
        len(order),
    )


CANDIDATES = (
    HeadParams(hidden=256, dropout=0.3, weight_decay=1e-2, epochs=40, class_weight_power=1.0),
    HeadParams(hidden=256, dropout=0.3, weight_decay=1e-2, epochs=40, class_weight_power=0.5),
)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """The head is tiny: on 2 busy cores one torch thread trains it ~10x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def select_and_fit(
    data: Embedded, candidates: tuple[HeadParams, ...] = CANDIDATES, folds: int = 5
) -> tuple[HeadEnsemble, Calibration, dict[str, Any]]:
    with torch_threads(1):
        return _select_and_fit(data, candidates, folds)


def _select_and_fit(
    data: Embedded, candidates: tuple[HeadParams, ...], folds: int
) -> tuple[HeadEnsemble, Calibration, dict[str, Any]]:
    """Cross-validation over the train + validation reviews, folds grouped by product.

    Each candidate is trained once per fold (early-stopped on the held-out fold); the out-of-fold
    predictions of all pool reviews fit the calibration and the decision rule, which is steadier than
    tuning them on the small validation split alone. The served model is the fold models' average.
    """
    from sklearn.model_selection import GroupKFold

    df, x = data.df, data.x
    pool = df["split"].isin(["train", "val"]).to_numpy()
    xp, dp = x[pool], df[pool].reset_index(drop=True)
    y, stars, rec = dp["label"].to_numpy(), dp["stars"].to_numpy(), dp["recommended"].to_numpy()
    groups = dp["product_id"].to_numpy()
    folds = min(folds, len(np.unique(groups)))
    if len(dp) < 50 or folds < 2 or np.bincount(y, minlength=3).min() < folds:
        raise ValueError(f"too few reviews to train ({len(dp)} in train + val): raise --sample")
    class_stars = [float(stars[y == c].mean()) for c in range(3)]
    splits = list(GroupKFold(n_splits=folds).split(xp, y, groups))
    tried = []
    best: tuple[float, list[Head], Calibration | None, HeadParams | None, dict[str, Any]] = (
        -1,
        [],
        None,
        None,
        {},
    )
    total = len(candidates) * folds
    with tqdm(total=total, desc=f"training heads ({folds}-fold, grouped by product)", unit="fit") as bar:
        for params in candidates:
            oof = np.zeros((len(dp), 5))
            heads, epochs = [], []
            for k, (fit_rows, held) in enumerate(splits):
                p = HeadParams(**{**asdict(params), "seed": params.seed + k})
                head, info = fit_head(xp[fit_rows], stars[fit_rows], rec[fit_rows], xp[held], y[held], p)
                oof[held] = head_logits(head, xp[held])
                heads.append(head)
                epochs.append(info["best_epoch"])
                bar.update(1)
            cal = fit_calibration(oof, y, class_stars)
            f1 = macro_f1(y, star_logits_to_scores(oof, cal).labels)
            tried.append({"params": asdict(params), "oof_macro_f1": round(f1, 4), "best_epochs": epochs})
            if f1 > best[0]:
                best = (f1, heads, cal, params, {"oof_macro_f1": round(f1, 4)})
    _, heads, cal, params, info = best
    assert cal is not None and params is not None
    selection = {
        "chosen": asdict(params),
        "candidates": tried,
        "folds": folds,
        "pool_reviews": len(dp),
        **info,
    }
    return HeadEnsemble.of(heads), cal, selection


def evaluate_model(model: HeadModel, data: Embedded, multilingual: dict[str, Any] | None) -> dict[str, Any]:
    df, x = data.df, data.x
    te = (df["split"] == "test").to_numpy()
    y = df.loc[te, "label"].to_numpy()
    scores = model.score_embeddings(x[te])
    raw = star_logits_to_scores(head_logits(model.head, x[te]), Calibration())
    stars = df.loc[te, "stars"].to_numpy()
    out = {
        "test": classification_metrics(y, scores.labels),
        "test_argmax": classification_metrics(y, scores.probs.argmax(axis=1)),
        "calibration": calibration_metrics(y, scores.probs),
        "calibration_uncalibrated": calibration_metrics(y, raw.probs),
        "stars_mae": round(float(np.abs(scores.stars - stars).mean()), 4),
        "test_products": int(df.loc[te, "product_id"].nunique()),
    }
    if multilingual is not None:
        out["multilingual"] = multilingual
    return out


def evaluate_multilingual(
    model: Any, cache: EmbeddingCache | None = None, path: Path = MULTILINGUAL_FILE
) -> dict[str, Any]:
    """Accuracy on the hand-written non-English reviews, overall and per language."""
    examples = load_multilingual(path)
    texts = [e.text for e in examples]
    if isinstance(model, HeadModel):
        vectors = embed_cached(model.encoder, texts, cache, desc="embedding multilingual set").vectors
        scores: Scores = model.score_embeddings(vectors)
    else:
        scores = model.score([model.prepare(t).text for t in texts])
    y = np.asarray([e.label for e in examples])
    langs = np.asarray([e.language for e in examples])
    per_lang = {
        lang: {
            "n": int((langs == lang).sum()),
            "accuracy": round(float((scores.labels[langs == lang] == y[langs == lang]).mean()), 4),
        }
        for lang in sorted(set(langs))
    }
    metrics = classification_metrics(y, scores.labels)
    return {
        "n": len(y),
        "languages": len(per_lang),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class": metrics["per_class"],
        "per_language": per_lang,
        "polarity_accuracy": round(float((scores.labels[y != 1] == y[y != 1]).mean()), 4),
    }


def default_cache_dir(models_dir: Path) -> Path:
    """The server's embedding cache for ``models_dir``: the settings' ``sentiment_cache_dir``
    (``CBEC_SENTIMENT_CACHE_DIR``) when set, else under the models."""
    return configured_settings(models_dir).cache_dir


def configured_settings(models_dir: Path | None = None) -> SentimentSettings:
    """The service's settings, read as the server reads them (``models_dir`` overrides CBEC_MODELS_DIR)."""
    from services.runtime.config import load_settings

    from .config import SentimentSettings

    overrides = {} if models_dir is None else {"models_dir": models_dir}
    return load_settings(SentimentSettings, SERVICE, **overrides)


def train(
    models_dir: Path,
    sample: int | None = None,
    budget_s: float | None = None,
    encoder: Encoder | None = None,
    candidates: tuple[HeadParams, ...] = CANDIDATES,
    multilingual_path: Path | None = MULTILINGUAL_FILE,
    data: Embedded | None = None,
    folds: int = 5,
    cache_dir: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """Embed, fit, evaluate and write a version; returns (version, evaluation)."""
    started = time.monotonic()
    encoder = encoder or Encoder()
    cache = EmbeddingCache.in_dir(cache_dir or default_cache_dir(models_dir), encoder.name)
    data = data or embed_reviews(encoder, cache, sample, budget_s)
    head, cal, selection = select_and_fit(data, candidates, folds)
    model = HeadModel(encoder, head, cal)
    ml = evaluate_multilingual(model, cache, multilingual_path) if multilingual_path else None
    evaluation = evaluate_model(model, data, ml)
    counts = data.df.groupby("split").size().to_dict()
    evaluation.update(
        {
            "reviews_used": len(data.df),
            "reviews_requested": data.requested,
            "split_sizes": {k: int(v) for k, v in counts.items()},
            "embedded_now": data.embedded,
            "from_cache": data.from_cache,
            "embedding_seconds": round(data.seconds, 1),
            "selection": selection,
            "calibration_params": asdict(cal),
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    params = {"kind": "head", "encoder": encoder.name, "reviews": len(data.df), "head": selection["chosen"]}
    version = write_version(models_dir, model.save, evaluation, params, multilingual_path)
    return version, evaluation


def write_version(
    models_dir: Path,
    save: Callable[[Path], None],
    evaluation: dict[str, Any],
    params: dict[str, Any],
    multilingual_path: Path | None,
) -> str:
    """A new model-store version: the model's files, ``evaluation.json`` and its two charts."""
    counts = evaluation["split_sizes"]
    metrics = {
        "test_accuracy": evaluation["test"]["accuracy"],
        "test_macro_f1": evaluation["test"]["macro_f1"],
        "test_ece": evaluation["calibration"]["ece"],
        "train_reviews": float(counts.get("train", 0)),
    }
    if "multilingual" in evaluation:
        metrics["multilingual_accuracy"] = evaluation["multilingual"]["accuracy"]
    store = ModelStore(models_dir, SERVICE)
    files = [data_path()] + ([multilingual_path] if multilingual_path else [])
    with store.new_version(metrics=metrics, data_fingerprint=fingerprint(*files), params=params) as (
        folder,
        manifest,
    ):
        save(folder)
        (folder / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
        plot_confusion(
            evaluation["test"]["confusion"],
            folder / "confusion.png",
            f"test split, {evaluation['test']['n']} reviews: macro-F1 {evaluation['test']['macro_f1']:.3f}",
        )
        plot_reliability(
            {
                "calibrated": evaluation["calibration"]["reliability"],
                "uncalibrated": evaluation["calibration_uncalibrated"]["reliability"],
            },
            folder / "calibration.png",
        )
    return manifest.version


def states_by_split(
    encoder: Encoder,
    reviews: pd.DataFrame,
    cut: int,
    cache: EmbeddingCache | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Bottom-layer states of the reviews by split (test in fp32: its evaluation is then exactly what
    the served model computes). With a cache, the frozen encoder's vectors of the same reviews are
    written to it in the same pass, so a run that needs both (the benchmark) pays for one."""
    from .finetune import bottom_states

    texts = [encoder.prepare(t).text for t in reviews["text"]]
    split = reviews["split"].to_numpy()
    states, vectors = bottom_states(
        encoder, texts, cut, f"states after {cut} layers", split == "test", cache is not None
    )
    if cache is not None and vectors is not None:
        cache.put_many(texts, vectors)
    return {name: [states[i] for i in np.flatnonzero(split == name)] for name in ("train", "val", "test")}


def train_finetuned(
    models_dir: Path,
    sample: int | None = None,
    params: FinetuneParams | None = None,
    encoder: Encoder | None = None,
    multilingual_path: Path | None = MULTILINGUAL_FILE,
    reviews: pd.DataFrame | None = None,
    states: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Fine-tune the top layers + a head (see ``finetune.py``), evaluate, write a version.

    The bottom layers' states of every review are computed once (no budget: this path needs them
    all), unless ``states`` (``states_by_split`` of the same reviews) come with the call; validation
    picks the checkpoint and fits the calibration; test is scored once.
    """
    from .finetune import FinetunedModel, fit_top, top_logits

    started = time.monotonic()
    p = params or FinetuneParams()
    encoder = encoder or Encoder()
    if reviews is None:
        df = load_reviews()
        reviews = df.iloc[priority_order(df)[:sample]].reset_index(drop=True)
    df = reviews
    cut = encoder.layers - p.layers
    split = df["split"].to_numpy()
    rows = {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}
    sizes = {k: len(v) for k, v in rows.items()}
    if min(sizes.values()) < 3:
        raise ValueError(f"too few reviews to fine-tune: {sizes}")
    y, stars, rec = df["label"].to_numpy(), df["stars"].to_numpy(), df["recommended"].to_numpy()
    t0 = time.monotonic()
    if states is None:
        states = states_by_split(encoder, df, cut)
    if {k: len(v) for k, v in states.items()} != sizes:
        raise ValueError("states do not belong to these reviews")
    states_s = time.monotonic() - t0

    def pick(name: str) -> list[torch.Tensor]:
        return states[name]

    tr, va, te = rows["train"], rows["val"], rows["test"]
    top, info = fit_top(encoder, p, pick("train"), stars[tr], rec[tr], pick("val"), y[va])
    class_stars = [
        float(stars[tr][y[tr] == c].mean()) if (y[tr] == c).any() else default
        for c, default in enumerate(DEFAULT_CLASS_STARS)
    ]
    val_logits = top_logits(top, pick("val"), encoder.device)
    cal = fit_calibration(val_logits, y[va], class_stars)
    model = FinetunedModel(encoder, top, cal, encoder.device)
    test_logits = top_logits(top, pick("test"), encoder.device)
    scores = star_logits_to_scores(test_logits, cal)
    raw = star_logits_to_scores(test_logits, Calibration())
    evaluation: dict[str, Any] = {
        "test": classification_metrics(y[te], scores.labels),
        "test_argmax": classification_metrics(y[te], scores.probs.argmax(axis=1)),
        "calibration": calibration_metrics(y[te], scores.probs),
        "calibration_uncalibrated": calibration_metrics(y[te], raw.probs),
        "stars_mae": round(float(np.abs(scores.stars - stars[te]).mean()), 4),
        "test_products": int(df.loc[te, "product_id"].nunique()),
    }
    if multilingual_path:
        evaluation["multilingual"] = evaluate_multilingual(model, None, multilingual_path)
    val_scores = star_logits_to_scores(val_logits, cal)
    evaluation.update(
        {
            "reviews_used": len(df),
            "reviews_requested": len(df),
            "split_sizes": sizes,
            "selection": {
                "chosen": asdict(p),
                "val_macro_f1": macro_f1(y[va], val_scores.labels),
                "cut": cut,
                **info,
            },
            "states_seconds": round(states_s, 1),
            "calibration_params": asdict(cal),
            "encoder": encoder.name,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    params_out = {"kind": "finetuned", "encoder": encoder.name, "reviews": len(df), "finetune": asdict(p)}
    version = write_version(models_dir, model.save, evaluation, params_out, multilingual_path)
    return version, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, help="default: the settings' CBEC_MODELS_DIR (models)")
    parser.add_argument(
        "--sample", type=int, default=None, help="reviews to use, in priority order (default all)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop embedding new reviews after this long"
    )
    parser.add_argument("--import-hf", type=Path, help="a fine-tuned HF sequence-classification directory")
    parser.add_argument(
        "--finetune-layers",
        type=int,
        default=0,
        help="fine-tune the encoder's top N layers with the head (0: a head on frozen embeddings)",
    )
    parser.add_argument("--finetune-epochs", type=int, default=FinetuneParams.epochs)
    parser.add_argument(
        "--pool-layers",
        type=int,
        default=POOL_LAYERS,
        help="top encoder layers averaged into the frozen head's sentence vector (1: e5's last layer)",
    )
    parser.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_INT8,
        help="train on the int8 encoder's vectors (CPU; default: the exact fp32 ones)",
    )
    args = parser.parse_args()
    args.models_dir = args.models_dir or configured_settings().models_dir
    logging.basicConfig(level=logging.INFO)
    if args.import_hf:
        from .model import import_hf_directory

        version = import_hf_directory(ModelStore(args.models_dir, SERVICE), args.import_hf)
        print(f"imported {args.import_hf} as {SERVICE} version {version}")
        return
    try:
        encoder = Encoder(quantize=args.int8, pool_layers=args.pool_layers)
    except ValueError as exc:
        parser.error(str(exc))
    if args.finetune_layers:
        params = FinetuneParams(layers=args.finetune_layers, epochs=args.finetune_epochs)
        version, ev = train_finetuned(args.models_dir, args.sample, params, encoder)
    else:
        version, ev = train(args.models_dir, args.sample, args.budget_s, encoder)
    t = ev["test"]
    print(
        f"version {version}: {ev['reviews_used']} reviews, test accuracy {t['accuracy']:.3f}, "
        f"macro-F1 {t['macro_f1']:.3f} (neutral F1 {t['per_class']['neutral']['f1']:.3f}), "
        f"multilingual accuracy {ev.get('multilingual', {}).get('accuracy', float('nan'))}"
    )
    print(f"evaluation: {args.models_dir / SERVICE / version / 'evaluation.json'}")


if __name__ == "__main__":
    main()
