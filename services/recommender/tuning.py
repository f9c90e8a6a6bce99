"""Hyperparameter search under a time budget: Optuna's TPE sampler with pruning.

Each tuned model gets a study. A trial is one setting, scored by NDCG@10 on the validation folds
carved from the training part (never the test part). The score is reported after every fold, and
for ALS also every few epochs of one continuing fit (the later epochs warm-start from the earlier
ones). Optuna's median pruner stops a trial that is behind earlier trials at the same step.

The budget (``--budget-minutes``) is shared by the models still to tune. What one model leaves
unused (it reached ``MAX_TRIALS``, or its space is a small grid) goes to the next. Each study first
tries the model's defaults, so even a tiny budget ends with a known setting. Popularity's space is
twelve window x decay pairs, all tried in the declared order (a tie keeps the plainest counts).

Reused between trials:
- per fold, the training matrix, the evaluation users and the EASE family's Gram matrix
  (``FitContext.cache``);
- the blend's component scores, which come from each model's best trial instead of a refit.

The best-so-far curve (validation NDCG@10 against seconds since tuning began) is kept per model
and charted by ``chart``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .metrics import evaluate
from .models import FitContext, build

log = logging.getLogger("cbec.recommender.tuning")

#: Search spaces: ("float", low, high, log) or ("choice", [values]); None in a choice means
#: "all time" / "no decay" for popularity.
SPACES: dict[str, dict[str, tuple[Any, ...]]] = {
    "popularity": {
        "window_days": ("choice", [None, 90.0, 30.0, 7.0]),
        "half_life_days": ("choice", [None, 30.0, 7.0]),
    },
    "ease": {"l2": ("float", 50.0, 5000.0, True)},
    "session_ease": {
        "l2": ("float", 20.0, 3000.0, True),
        "dropout": ("float", 0.0, 0.85, False),
        "session_weight": ("choice", [0.0, 1.0]),
        "pop_exponent": ("float", 0.0, 0.3, False),
    },
    "sparse_ease": {"l2": ("float", 20.0, 3000.0, True)},
    "als": {
        "regularization": ("float", 1.0, 100.0, True),
        "alpha": ("float", 0.5, 16.0, True),
    },
    "bpr": {
        "learning_rate": ("float", 0.001, 0.05, True),
        "regularization": ("float", 0.005, 0.2, True),
    },
    "torch_mf": {"weight_decay": ("float", 1e-5, 1e-3, True)},
}
MAX_TRIALS = 40
#: Epochs after which ALS reports to the pruner (its fit continues from there).
REPORT_EVERY = 5


@dataclass
class Fold:
    """One validation split: what every trial on it reuses."""

    X: sp.csr_matrix
    T: sp.csr_matrix
    ctx: FitContext
    users: np.ndarray


@dataclass
class Study:
    """What the search found for one model."""

    name: str
    best_params: dict[str, Any]
    best_value: float
    #: One score matrix (fold users x items) per fold, from the best trial: the blend uses them.
    best_scores: list[np.ndarray]
    trials: list[dict[str, Any]] = field(default_factory=list)


def _ndcg(scores: np.ndarray, fold: Fold) -> float:
    pos = {int(u): i for i, u in enumerate(fold.users)}
    return float(
        evaluate(
            lambda rows: scores[[pos[int(r)] for r in rows]], fold.X, fold.T, (10,), users=fold.users
        ).mean["ndcg@10"]
    )


def free_space(name: str, fixed: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """The model's search space without the parameters set explicitly (``--param``)."""
    return {k: v for k, v in SPACES.get(name, {}).items() if k not in fixed}


def _suggest(trial: Any, space: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if spec[0] == "float":
            out[key] = trial.suggest_float(key, spec[1], spec[2], log=spec[3])
        else:
            out[key] = trial.suggest_categorical(key, spec[1])
    return out


def search(
    name: str,
    base_params: dict[str, Any],
    folds: Sequence[Fold],
    seconds: float,
    seed: int,
    clock: Callable[[], float],
    on_trial: Callable[[Study, dict[str, Any]], None] | None = None,
    max_trials: int = MAX_TRIALS,
) -> Study:
    """Search ``name``'s free space for up to ``seconds`` and ``max_trials`` trials (at least one:
    its defaults). ``clock`` gives the seconds the trials are stamped with."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = free_space(name, base_params)
    model_cls = build(name).__class__
    start = {k: base_params.get(k, model_cls.defaults.get(k)) for k in space}
    grid = all(spec[0] == "choice" for spec in space.values())
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )
    if grid:  # every combination, in the declared order: a tie keeps the first (the plainest)
        keys = list(space)
        combos = list(itertools.product(*(space[k][1] for k in keys)))
        for combo in combos:
            study.enqueue_trial(dict(zip(keys, combo, strict=True)))
        n_trials = len(combos)
    else:
        study.enqueue_trial(start)
        n_trials = max_trials
    result = Study(name, dict(base_params), -1.0, [])

    def objective(trial: Any) -> float:
        params = {**base_params, **_suggest(trial, space)}
        t0 = clock()
        values: list[float] = []
        scores: list[np.ndarray] = []
        for index, fold in enumerate(folds):
            model = build(name, **params)
            step0, epochs = index * 1000, int(model.params.get("iterations", 0))

            def on_epoch(
                epoch: int, fitted: Any, fold: Fold = fold, step0: int = step0, epochs: int = epochs
            ) -> None:
                if epoch % REPORT_EVERY or epoch >= epochs:
                    return
                value = _ndcg(fitted.score(fold.users, fold.X[fold.users]), fold)
                trial.report((sum(values) + value) / (len(values) + 1), step0 + epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            ctx = fold.ctx
            ctx.on_epoch = on_epoch if name == "als" else None
            try:
                s = model.fit_scores(fold.X, ctx, fold.users)
            finally:
                ctx.on_epoch = None
            values.append(_ndcg(s, fold))
            scores.append(s)
            trial.report(float(np.mean(values)), step0 + 999)
            if index + 1 < len(folds) and trial.should_prune():
                raise optuna.TrialPruned()
        value = float(np.mean(values))
        trial.set_user_attr("seconds", clock() - t0)
        if value > result.best_value:
            result.best_value, result.best_params, result.best_scores = value, params, scores
        return value

    def record(study_: Any, trial: Any) -> None:
        entry = {
            "params": {k: trial.params.get(k) for k in space},
            "state": trial.state.name.lower(),
            "ndcg@10": None if trial.value is None else round(float(trial.value), 5),
            "at_seconds": round(clock(), 2),
        }
        result.trials.append(entry)
        if on_trial is not None:
            on_trial(result, entry)

    study.optimize(objective, n_trials=n_trials, timeout=max(seconds, 1e-3), callbacks=[record])
    return result


def chart(studies: dict[str, dict[str, Any]], path: Path, budget_s: float) -> None:
    """Best-so-far validation NDCG@10 against seconds since tuning began, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, entry in studies.items():
        best, xs, ys, pruned = -1.0, [], [], []
        for t in entry.get("trials", []):
            if t["state"] == "pruned":
                pruned.append(t["at_seconds"])
            if t["ndcg@10"] is not None and t["state"] == "complete" and t["ndcg@10"] > best:
                best = t["ndcg@10"]
                xs.append(t["at_seconds"])
                ys.append(best)
        if not xs:
            continue
        last = max(t["at_seconds"] for t in entry["trials"])  # the line runs to the model's last trial
        line = ax.step(
            [*xs, last], [*ys, ys[-1]], where="post", label=f"{name} ({len(entry['trials'])} trials)"
        )[0]
        ax.plot(xs, ys, "o", ms=4, color=line.get_color())  # each improvement
        if pruned:
            ax.plot(pruned, [ys[0]] * len(pruned), "x", color=line.get_color(), alpha=0.6)
    if budget_s > 0:
        ax.axvline(budget_s, color="grey", ls="--", lw=1, label=f"budget {budget_s:.0f} s")
    ax.set_xlabel("seconds since tuning began")
    ax.set_ylabel("best validation NDCG@10 so far")
    ax.set_title("budgeted tuning (x: pruned trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
