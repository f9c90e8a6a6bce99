"""Recommender capacity: the largest catalogue each model fits within 16 GiB of peak memory here.

Every (model, size) is fitted in its own child process (``python -m bench.recommender_capacity
--child MODEL N --data DIR``), run and watched by ``bench.capacity.measure`` (``nice -n 10``, kernel
RSS high-water mark ``VmHWM``, wall and CPU seconds from ``wait4``). The child loads the prepared
matrix, builds ``FitContext`` as the train command does (the indexed interactions; for ``content``
random unit vectors of the encoder's 384 dimensions as item embeddings: the model's memory does not
depend on their values), imports every model library (torch, implicit, scipy's LAPACK), then resets
its high-water mark (``/proc/self/clear_refs`` = 5) and fits ``models.build(name).fit(X, ctx)``:

- ``fit_peak_mb``: the child's peak RSS during the fit (data, libraries and the fit together);
- ``fit_own_mb``: ``fit_peak_mb`` less the same figure of a baseline child that does everything
  but the fit (same size, same data): the fit's own memory;
- ``total_peak_mb``: the child's whole-life ``VmHWM`` (includes loading the data).
MB are MiB (kB / 1024). Resetting the mark before the fit keeps a transient peak of loading the data
from hiding the fit's own memory.

Data: SYNTHETIC (``data.synthetic_catalogue``, texts off), as many users as items, 20 interactions
per user on average (about 23 per item, lognormal), event weights as the train command gives them,
duplicate (user, item) pairs merged. The child holds the CSR matrix and an integer-indexed
interactions frame; the train command also keeps string-id frames (deploy/CAPACITY.md).

Iterative fits are shortened where their memory is the same at every iteration: ALS and BPR run 2
iterations (the defaults 15 and 200 allocate everything before the first), and ``torch_mf`` stops
after 5 Adam steps of its first epoch (one epoch at 100k items took 221 s here; parameters,
gradients and both Adam moments exist from the first step and each batch's graph is freed). A check
run at the smallest size repeats each with more iterations / steps (``iteration_checks``). The end of
a ``torch_mf`` fit copies its factors while the optimiser state is alive; that copy (users + items)
x 65 x 4 bytes is added to its law, an upper bound.

Laws, per model, on the measured points: dense EASE ``fit_own = a + b n^2``; the others a power law
``fit_own = c n^k`` (log-log least squares), and also the straight line through the two largest
sizes: a power law fitted through a fixed offset bends below k = 1 and extrapolates optimistically,
so the smaller of the two answers is kept (``law_used``). The baseline (data and libraries) is
``a + b n``. The largest n with baseline(n) + fit_own(n) <= 16 GiB is ``max_items_fitted``; where
it is past the largest size run, it is extrapolated and labelled so.

Why own code: the child measurement is bench/capacity.py's (imported); what is new is the plan,
the baseline subtraction and the two small least-squares laws (numpy).

    python -m bench.recommender_capacity          # ~10 min: bench/results/recommender_capacity.json/.png
    python -m bench.recommender_capacity --quick  # small sizes, a smoke test (writes nothing)
    python -m bench.recommender_capacity --replot # the laws and chart again from the JSON
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.capacity import PY, ROOT, cpu_model, loadavg, measure, mem_gib
from bench.loadgen import RESULTS, write_results

NAME = "recommender_capacity"
LIMIT_MB = 16 * 1024  # 16 GiB in MiB
USERS_PER_ITEM = 1.0
INTERACTIONS_PER_USER = 20.0
SEED = 7
TORCH_MF_STEPS = 5
DENSE = ("ease", "session_ease")


@dataclass
class Plan:
    """Sizes and the fit's parameters for one model; ``check``: a longer fit at the smallest size."""

    sizes: tuple[int, ...]
    quick: tuple[int, ...]
    law: str = "power"  # power | quadratic
    params: dict[str, Any] = field(default_factory=dict)
    steps: int = 0  # torch_mf: Adam steps before the bench stops the fit
    check: dict[str, Any] = field(default_factory=dict)  # params / steps of the iteration check
    limit: str = ""


FACTOR_SIZES, FACTOR_QUICK = (100_000, 200_000, 400_000), (20_000, 40_000)
PLANS: dict[str, Plan] = {
    # max_items lifted: the cap is what is being measured
    "ease": Plan(
        (2_000, 4_000, 8_000),
        (1_000, 2_000),
        "quadratic",
        {"max_items": 10**9},
        limit="dense n x n: the Gram matrix, its copy and the Cholesky inverse (= B)",
    ),
    "session_ease": Plan(
        (2_000, 4_000, 8_000),
        (1_000, 2_000),
        "quadratic",
        {"max_items": 10**9},
        limit="dense n x n: as ease, plus the session Gram S'S",
    ),
    "sparse_ease": Plan(
        (25_000, 50_000, 100_000),
        (5_000, 10_000),
        limit="sparse Gram X'X (int64 keys + float32 values) and the top-k neighbour weights",
    ),
    "als": Plan(
        FACTOR_SIZES,
        FACTOR_QUICK,
        params={"iterations": 2},
        check={"params": {"iterations": 15}},
        limit="user and item factors (64 float32 each), implicit's CSR copies",
    ),
    "bpr": Plan(
        FACTOR_SIZES,
        FACTOR_QUICK,
        params={"iterations": 2},
        check={"params": {"iterations": 20}},
        limit="binarised CSR copy, factors (65 float32 each)",
    ),
    "torch_mf": Plan(
        FACTOR_SIZES,
        FACTOR_QUICK,
        steps=TORCH_MF_STEPS,
        check={"steps": 4 * TORCH_MF_STEPS},
        limit="float32 factors x 4 (weights, gradients, two Adam moments) + the end copy",
    ),
    "popularity": Plan(
        FACTOR_SIZES, FACTOR_QUICK, limit="per-interaction float64 / object arrays (time decay, markets)"
    ),
    "content": Plan(FACTOR_SIZES, FACTOR_QUICK, limit="a normalised copy of the n x 384 float32 embeddings"),
}


# --- the child ----------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


class _StepCap(Exception):
    """Raised by the optimiser hook to end a torch_mf fit after its first few Adam steps."""


def _cap_steps(steps: int) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = [0]

    def hook(*_: Any) -> None:
        count[0] += 1
        if count[0] >= steps:
            raise _StepCap

    register_optimizer_step_post_hook(hook)


def child(model: str, n: int, data: Path, baseline: bool, params: dict[str, Any], steps: int) -> None:
    """Load size ``n``'s data, build the context, reset the RSS high-water mark, fit (unless
    ``baseline``) and print one JSON line with the figures read from /proc/self."""
    import importlib

    import pandas as pd
    import scipy.sparse as sp

    for library in ("implicit.als", "implicit.bpr", "scipy.linalg", "torch"):
        importlib.import_module(library)  # every child imports every library: one baseline per size

    from services.recommender.embeddings import DIM
    from services.recommender.models import FitContext, build

    X = sp.load_npz(data / f"X_{n}.npz").tocsr()
    interactions = pd.read_parquet(data / f"inter_{n}.parquet")
    interactions["market"] = interactions["market"].astype(str)
    embeddings = None
    if model == "content":  # random unit vectors: the model's memory does not depend on their values
        rng = np.random.default_rng(SEED)
        embeddings = rng.standard_normal((n, DIM), dtype=np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ctx = FitContext(seed=0, interactions=interactions, item_embeddings=embeddings)
    recommender = build(model, **params)
    if steps:
        _cap_steps(steps)
    gc.collect()
    report: dict[str, Any] = {
        "hwm_before_reset_mb": _status_mb("VmHWM:"),
        "rss_before_fit_mb": _status_mb("VmRSS:"),
    }
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    report["hwm_after_reset_mb"] = _status_mb("VmHWM:")
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    stopped = False
    if not baseline:
        try:
            recommender.fit(X, ctx)
        except _StepCap:
            stopped = True
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    report |= {
        "fit_peak_mb": _status_mb("VmHWM:"),
        "rss_after_fit_mb": _status_mb("VmRSS:"),
        "fit_wall_s": time.perf_counter() - t0,
        "fit_cpu_s": usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime,
        "stopped_after_steps": steps if stopped else 0,
        "users": X.shape[0],
        "items": X.shape[1],
        "nnz": X.nnz,
        "interactions": len(interactions),
    }
    B = getattr(recommender, "B", None)
    if isinstance(B, np.ndarray):
        report["B_dtype"] = str(B.dtype)
    print(json.dumps(report))


# --- data ---------------------------------------------------------------------------------------------
def prepare(n: int, folder: Path) -> dict[str, Any]:
    """SYNTHETIC catalogue of ``n`` items (and users), written as the CSR matrix and the indexed
    interactions the child loads (not timed)."""
    import pandas as pd
    import scipy.sparse as sp

    from services.recommender.data import EVENT_WEIGHTS, synthetic_catalogue

    t0 = time.perf_counter()
    users = round(n * USERS_PER_ITEM)
    d = synthetic_catalogue(
        n_items=n, n_users=users, interactions_per_user=INTERACTIONS_PER_USER, seed=SEED, texts=False
    )
    raw = d.interactions
    # the generator's ids are P<position> / U<position>: their integer part is the index
    frame = pd.DataFrame(
        {
            "user_idx": raw["user_id"].str[1:].astype(np.int64),
            "item_idx": raw["item_id"].str[1:].astype(np.int64),
            "weight": raw["type"].map(EVENT_WEIGHTS).astype(np.float64),
            "timestamp": raw["timestamp"].astype(np.float64),
            "market": raw["market"].astype(str),
        }
    )
    del d, raw
    # duplicate (user, item) pairs merged as clean_interactions does: weights add, latest time wins
    frame = frame.groupby(["user_idx", "item_idx"], sort=True, as_index=False).agg(
        weight=("weight", "sum"), timestamp=("timestamp", "max"), market=("market", "last")
    )
    X = sp.csr_matrix(
        (frame["weight"].to_numpy(np.float32), (frame["user_idx"].to_numpy(), frame["item_idx"].to_numpy())),
        shape=(users, n),
        dtype=np.float32,
    )
    folder.mkdir(parents=True, exist_ok=True)
    sp.save_npz(folder / f"X_{n}.npz", X, compressed=False)
    frame.to_parquet(folder / f"inter_{n}.parquet", index=False)
    return {
        "items": n,
        "users": users,
        "interactions": len(frame),
        "interactions_per_item": round(len(frame) / n, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --- laws ---------------------------------------------------------------------------------------------
def fit_law(kind: str, n: list[float], mb: list[float]) -> dict[str, Any] | None:
    """``quadratic``: mb = a + b n^2; ``power``: mb = c n^k; ``linear``: mb = a + b n (least squares)."""
    x, y = np.asarray(n, dtype=float), np.asarray(mb, dtype=float)
    if kind == "power":
        keep = y > 0
        if keep.sum() < 2:
            return None
        k, logc = np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)
        pred = np.exp(logc) * x**k
        law = {"kind": "power", "c": float(np.exp(logc)), "k": round(float(k), 3)}
        law["formula"] = f"{law['c']:.3g} * n^{k:.2f} MB"
    else:
        if len(x) < 2:
            return None
        b, a = np.polyfit(x**2 if kind == "quadratic" else x, y, 1)
        pred = a + b * (x**2 if kind == "quadratic" else x)
        law = {"kind": kind, "a": round(float(a), 2), "b": float(b)}
        term = "n^2" if kind == "quadratic" else "n"
        law["formula"] = f"{a:.0f} + {b:.4g} * {term} MB"
    ss = float(((y - y.mean()) ** 2).sum())
    law["r2"] = round(1 - float(((y - pred) ** 2).sum()) / ss, 4) if ss > 0 else 1.0
    return law


def law_mb(law: dict[str, Any], n: float) -> float:
    if law["kind"] == "power":
        return law["c"] * n ** law["k"]
    return law["a"] + law["b"] * (n**2 if law["kind"] == "quadratic" else n)


def torch_mf_end_copy_mb(n: float) -> float:
    """The factors and biases torch_mf copies out at the end of its fit (float32)."""
    return (n * USERS_PER_ITEM + n) * (64 + 1) * 4 / 2**20


def largest_n(model: str, own: dict[str, Any], base: dict[str, Any]) -> int:
    """The largest n with baseline(n) + fit_own(n) <= 16 GiB (bisection on a growing function)."""

    def total(n: float) -> float:
        extra = torch_mf_end_copy_mb(n) if model == "torch_mf" else 0.0
        return law_mb(base, n) + max(law_mb(own, n), 0.0) + extra

    lo, hi = 1.0, 2.0
    while total(hi) <= LIMIT_MB and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= LIMIT_MB else (lo, mid)
    return int(lo)


# --- the run ------------------------------------------------------------------------------------------
def _child_argv(
    model: str, n: int, data: Path, baseline: bool, params: dict[str, Any], steps: int
) -> list[str]:
    argv = [PY, "-m", "bench.recommender_capacity", "--child", model, str(n), "--data", str(data)]
    argv += ["--params", json.dumps(params), "--steps", str(steps)]
    return argv + (["--baseline"] if baseline else [])


def _run_child(argv: list[str], log: Path) -> dict[str, Any]:
    m = measure(argv, {}, log)
    row: dict[str, Any] = {"rc": m.rc, **{k: v for k, v in m.summary().items() if k != "rc"}}
    if m.rc != 0:
        row["log_tail"] = m.log[-1500:]
        return row
    report = json.loads(m.log.strip().splitlines()[-1])
    row |= {k: round(v, 2) if isinstance(v, float) else v for k, v in report.items()}
    row["total_peak_mb"] = round(max(m.peak_rss_mb, report["hwm_before_reset_mb"], report["fit_peak_mb"]), 1)
    return row


def _predicted_s(model: str, runs: list[dict[str, Any]], n: int) -> float:
    done = [r for r in runs if r["rc"] == 0]
    if not done:
        return 0.0
    last = done[-1]
    power = 3.0 if model in DENSE else 1.3
    return float(last["wall_s"]) * (n / last["items"]) ** power


def capacity(quick: bool = False, *, budget_min: float = 12.0) -> dict[str, Any]:
    """Measure every model's fit memory at a few sizes, fit the growth laws and solve for the
    largest catalogue within 16 GiB. A full run writes bench/results/recommender_capacity.json and
    .png; ``quick`` (small sizes, a smoke test) writes nothing. Returns the results, with
    ``max_items_fitted`` = {model: n}."""
    from tqdm import tqdm

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cbec-rec-capacity-"))
    plans = dict(PLANS)
    sizes = {m: (p.quick if quick else p.sizes) for m, p in plans.items()}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in plans}
    baselines: dict[str, dict[str, Any]] = {}  # "<n>" or "<n>+embeddings"
    prepared: dict[int, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    conditions: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib(),
        "gpu": "none used (fits on the CPU, FitContext's default device)",
        "loadavg_start": loadavg(),
        "note": "2 cores shared with other engineers' work; children under nice -n 10; memory figures "
        "do not depend on the load, seconds do",
    }
    conditions["code_sha256"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted((ROOT / "services" / "recommender" / "models").glob("*.py"))
    }
    schedule = [
        (m, i) for i in range(max(len(s) for s in sizes.values())) for m in plans if i < len(sizes[m])
    ]
    n_checks = 0 if quick else sum(1 for p in plans.values() if p.check)
    budget_s = budget_min * 60
    try:
        with tqdm(total=len(schedule) + n_checks, desc="recommender capacity", unit="fit") as bar:
            for model, i in schedule:
                n, plan = sizes[model][i], plans[model]
                bar.set_postfix_str(f"{model} {n:,}")
                guess = _predicted_s(model, runs[model], n)
                if time.perf_counter() - started + guess > budget_s:
                    notes.append(f"skipped {model} at {n:,} items: predicted {guess:.0f} s past the budget")
                    tqdm.write(f"skip {model} {n:,}: predicted {guess:.0f} s")
                    bar.update(1)
                    continue
                if n not in prepared:
                    bar.set_postfix_str(f"data {n:,}")
                    prepared[n] = prepare(n, work)
                key = f"{n}+embeddings" if model == "content" else str(n)
                if key not in baselines:
                    bar.set_postfix_str(f"baseline {key}")
                    argv = _child_argv(model, n, work, True, {}, 0)
                    baselines[key] = _run_child(argv, work / f"baseline-{key}.log")
                bar.set_postfix_str(f"{model} {n:,}")
                row = _run_child(
                    _child_argv(model, n, work, False, plan.params, plan.steps), work / f"{model}-{n}.log"
                )
                row |= {"params": plan.params, "baseline": key}
                if row["rc"] == 0 and baselines[key]["rc"] == 0:
                    row["fit_own_mb"] = round(row["fit_peak_mb"] - baselines[key]["fit_peak_mb"], 1)
                    if model in DENSE:
                        row["fit_own_bytes_per_n2"] = round(row["fit_own_mb"] * 2**20 / (n * n), 2)
                runs[model].append(row)
                own, peak = row.get("fit_own_mb", float("nan")), row.get("fit_peak_mb", float("nan"))
                tqdm.write(
                    f"{model:<13}{n:>9,} items rc={row['rc']} fit_own={own:9.1f} MB fit_peak={peak:9.1f} MB "
                    f"fit {row.get('fit_wall_s', 0):6.1f}s wall, child {row['wall_s']:6.1f}s"
                )
                bar.update(1)
            for model, plan in plans.items():
                if quick or not plan.check:
                    continue
                n = sizes[model][0]
                first = (
                    next((r for r in runs[model] if r["rc"] == 0 and r["items"] == n), None)
                    if runs[model]
                    else None
                )
                params = {**plan.params, **plan.check.get("params", {})}
                steps = int(plan.check.get("steps", plan.steps))
                ratio = steps / plan.steps if plan.steps else 1.0
                for k, v in plan.check.get("params", {}).items():
                    ratio = max(ratio, v / plan.params.get(k, v))
                guess = first["wall_s"] + first["fit_wall_s"] * (ratio - 1) if first else 0.0
                if first is None or time.perf_counter() - started + guess > budget_s:
                    notes.append(f"skipped the iteration check of {model}")
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"check {model}")
                row = _run_child(
                    _child_argv(model, n, work, False, params, steps), work / f"check-{model}.log"
                )
                if row["rc"] == 0:
                    base = baselines[first["baseline"]]["fit_peak_mb"]
                    checks[model] = {
                        "items": n,
                        "params": params,
                        "steps": steps,
                        "fit_own_mb": round(row["fit_peak_mb"] - base, 1),
                        "fit_own_mb_short": first["fit_own_mb"],
                        "short": {"params": plan.params, "steps": plan.steps},
                        "fit_wall_s": row["fit_wall_s"],
                    }
                else:
                    checks[model] = {"rc": row["rc"], "log_tail": row.get("log_tail", "")}
                tqdm.write(f"check {model}: {checks[model]}")
                bar.update(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    conditions["loadavg_end"] = loadavg()

    out: dict[str, Any] = {
        "protocol": __doc__.split("\n\n    python -m")[0],
        "quick": quick,
        "limit_mb": LIMIT_MB,
        "conditions": conditions,
        "data": {str(n): facts for n, facts in sorted(prepared.items())},
        "baselines": baselines,
        "models": {},
        "iteration_checks": checks,
        "notes": notes,
    }
    for model, plan in plans.items():
        out["models"][model] = {"limit": plan.limit, "runs": runs[model]}
    summarise(out)
    out["seconds_total"] = round(time.perf_counter() - started, 1)
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        chart(out, RESULTS / f"{NAME}.png")
        out["chart"] = f"{NAME}.png"
        out["results_file"] = str(write_results(NAME, out).relative_to(RESULTS.parent.parent))
    return out


def summarise(out: dict[str, Any]) -> None:
    """Fit each model's laws on its measured runs (``out["models"][m]["runs"]``) and solve for
    ``max_items_fitted``, in place. For the power-law models the largest-pair linear marginal is
    solved too, and the smaller n is kept: a power law fitted through a fixed offset (torch's
    allocations, implicit's buffers) bends below k = 1 and extrapolates optimistically."""
    max_items: dict[str, int] = {}
    for model, entry in out["models"].items():
        plan = PLANS[model]
        ok = [r for r in entry["runs"] if r["rc"] == 0 and "fit_own_mb" in r]
        own = fit_law(plan.law, [r["items"] for r in ok], [r["fit_own_mb"] for r in ok])
        keys = sorted({r["baseline"] for r in ok}, key=lambda k: int(k.split("+")[0]))
        base = fit_law(
            "linear",
            [int(k.split("+")[0]) for k in keys],
            [out["baselines"][k]["fit_peak_mb"] for k in keys],
        )
        entry |= {"fit_own_law": own, "baseline_law": base}
        if not (own and base):
            continue
        if own.get("k", own.get("b", 0)) <= 0:  # no growth above the noise: nothing to extrapolate
            entry["note"] = "the fit's own memory did not grow over the measured sizes: no law solved"
            continue
        n_max = largest_n(model, own, base)
        entry["max_items_law"] = n_max
        entry["law_used"] = own["formula"]
        if len(ok) >= 2 and plan.law == "power":
            (n1, o1), (n2, o2) = [(r["items"], r["fit_own_mb"]) for r in ok[-2:]]
            slope = max((o2 - o1) / (n2 - n1), 0.0)
            marginal = {"kind": "linear", "a": o2 - slope * n2, "b": slope}
            marginal["formula"] = f"{marginal['a']:.0f} + {slope * 1024:.3g} KB * n (largest pair)"
            entry["fit_own_marginal_law"] = marginal
            entry["fit_own_marginal_kb_per_item"] = round(slope * 1024, 3)
            entry["max_items_linear_marginal"] = largest_n(model, marginal, base)
            if slope > 0 and entry["max_items_linear_marginal"] < n_max:
                n_max, entry["law_used"] = entry["max_items_linear_marginal"], marginal["formula"]
        largest = max(r["items"] for r in ok)
        max_items[model] = n_max
        entry |= {
            "max_items_fitted": n_max,
            "measured_up_to": largest,
            "extrapolated": n_max > largest,
            "label": (
                f"extrapolated from measured points up to {largest:,} items"
                if n_max > largest
                else f"within the measured range (up to {largest:,} items)"
            ),
        }
        if model == "torch_mf":
            entry["end_copy_law"] = "(users + items) x 65 x 4 bytes, users = items, added (an upper bound)"
        if model in DENSE:
            entry["analytic_dense_matrices_at_peak"] = analytic_dense(model)
    out["max_items_fitted"] = max_items


def analytic_dense(model: str) -> dict[str, Any]:
    """n x n matrices alive at the fit's peak, counted from the code as measured (float32 since the
    Cholesky inverse moved to single precision: models/ease.py), in bytes per n^2."""
    if model == "ease":
        return {
            "float32_matrices": 3,
            "bytes_per_n2": 12,
            "which": "G = X'X (dense, kept in ctx.cache), A = G + l2 I (a C-ordered copy), and the "
            "Cholesky factor / inverse P: LAPACK spotrf copies the C-ordered A into Fortran order, "
            "spotri works in place; B is P itself (scaled in place, astype without a copy)",
        }
    return {
        "float32_matrices": 4,
        "bytes_per_n2": 16,
        "which": "G (cached), S'S (cached), then A = G + S'S + diag(lambda) (the sum is freed once A is "
        "made) and P during the Cholesky inverse; A is freed on return, and B = I - P diag(lambda) "
        "(DLAE) or I - P / diag(P) is P scaled in place",
    }


def used_law(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The law ``max_items_fitted`` was solved with: the power law or the largest-pair marginal."""
    marginal = entry.get("fit_own_marginal_law")
    if marginal and entry.get("law_used") == marginal["formula"]:
        return marginal
    return entry.get("fit_own_law")


# --- chart --------------------------------------------------------------------------------------------
def chart(out: dict[str, Any], path: Path) -> None:
    """Memory against items per model (log-log): measured points, fitted laws out to the 16 GiB line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (model, entry) in enumerate(out["models"].items()):
        colour = colours[c % len(colours)]
        ok = [r for r in entry["runs"] if r["rc"] == 0 and "fit_own_mb" in r]
        if not ok:
            continue
        n = np.array([r["items"] for r in ok], dtype=float)
        peak = np.array([r["fit_peak_mb"] for r in ok]) / 1024
        own = np.array([r["fit_own_mb"] for r in ok]) / 1024
        axes[0].loglog(n, peak, "o", color=colour)
        axes[1].loglog(n, np.maximum(own, 1e-3), "o", color=colour)
        law, base, n_max = used_law(entry), entry.get("baseline_law"), entry.get("max_items_fitted")
        if law and base and n_max:
            grid = np.geomspace(n.min(), max(n_max, n.max()), 100)
            extra = torch_mf_end_copy_mb(grid) if model == "torch_mf" else 0.0
            own_fit = np.maximum([law_mb(law, g) for g in grid], 0) + extra
            total = np.array([law_mb(base, g) for g in grid]) + own_fit
            label = f"{model}: own = {law['formula']}; max {n_max:,.0f}"
            axes[0].loglog(grid, total / 1024, "-", color=colour, label=label)
            axes[0].plot([n_max], [LIMIT_MB / 1024], "x", color=colour, markersize=9)
            axes[1].loglog(grid, np.maximum(own_fit, 1) / 1024, "-", color=colour, label=model)
    for ax, title in (
        (axes[0], "peak RSS during the fit (data + libraries + fit), GiB"),
        (axes[1], "the fit's own memory (peak less the baseline child), GiB"),
    ):
        ax.axhline(LIMIT_MB / 1024, color="red", linestyle="--", linewidth=1)
        ax.set_xlabel("items in the catalogue (users = items, ~23 interactions per item; log)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "recommender fit memory against catalogue size: dots measured, lines fitted (extrapolated past "
        "the dots), red: 16 GiB, x: the largest catalogue within it; 2 shared cores, CPU",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test (writes nothing)")
    parser.add_argument("--budget-min", type=float, default=12.0, help="skip runs predicted to overrun")
    parser.add_argument("--replot", action="store_true", help="fit the laws again and redraw from the JSON")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(
            args.child[0], int(args.child[1]), args.data, args.baseline, json.loads(args.params), args.steps
        )
        return
    if args.replot:  # the laws again from the measured runs (no new measurement), JSON and chart
        path = RESULTS / f"{NAME}.json"
        saved = json.loads(path.read_text())
        summarise(saved)
        saved["protocol"] = __doc__.split("\n\n    python -m")[0]
        saved["reanalysed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path.write_text(json.dumps(saved, indent=2) + "\n")
        chart(saved, RESULTS / f"{NAME}.png")
        print(f"fitted the laws again and redrew {NAME}.png: {saved['max_items_fitted']}")
        return
    out = capacity(args.quick, budget_min=args.budget_min)
    print(f"{'model':<14}{'measured up to':>15}{'fit own MB':>12}{'law used':>40}{'max items':>14}")
    for model, e in out["models"].items():
        ok = [r for r in e["runs"] if "fit_own_mb" in r]
        if not ok:
            print(f"{model:<14} no successful run")
            continue
        law = e.get("law_used", "")
        print(
            f"{model:<14}{ok[-1]['items']:>15,}{ok[-1]['fit_own_mb']:>12,.0f}{law:>40}"
            f"{e.get('max_items_fitted', 0):>14,}{'  (extrapolated)' if e.get('extrapolated') else ''}"
        )
    print(
        f"{out['seconds_total']:.0f} s" + (f"; wrote {out['results_file']}" if "results_file" in out else "")
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
