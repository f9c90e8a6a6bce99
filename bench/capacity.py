"""Capacity benchmark: training time and peak memory of every service against data size.

Each training runs as its own child process (``nice -n 10``), so its figures are that process's:
- ``wall_s``: elapsed seconds; ``cpu_s``: user + system CPU seconds of the child and everything it
  waited for (``os.wait4`` rusage), less sensitive than wall time to other work on the 2 shared cores;
- ``peak_rss_mb``: the child's kernel RSS high-water mark (``VmHWM``, read from ``/proc`` every 0.1 s
  until it exits), and ``tree_peak_rss_mb``: the largest sum of RSS over the child and its
  descendants, sampled at the same times;
- ``loadavg_before`` / ``loadavg_after`` and ``other_cpu_share``: the share of the machine's CPU time
  during the run that was NOT the child's (other engineers' tests run on this machine too).
A ``startup`` run per series (importing the training module, nothing else) is subtracted for the
``net`` exponents: at small sizes the interpreter and library imports dominate.

Series (the training commands the services already have; sizes picked to fit ~25 minutes on 2 cores):
1. recommender, MovieLens-100K (packaged): ``services.recommender.train`` with its evaluation and quick
   tuning (every model but ``content``), on 25/50/100% of the ratings (seeded row sample);
2. recommender, SYNTHETIC catalogue (``data.synthetic_catalogue``, written to Parquet first, not timed):
   ``services.recommender.train --no-eval --models popularity,als --serve als`` (ALS with the CLI's
   defaults: 64 factors, 15 iterations, then the FAISS index and the model-store write), users and
   items growing together, 20 interactions per user;
3. sentiment: ``services.sentiment.train --sample N`` twice per size on a fresh embedding cache: cold
   (every review and the multilingual set embedded in the run: the honest end-to-end cost) then warm
   (every vector from the cache: the head's cross-validated training alone). cold - warm is the
   embedding; ``embedding`` reports the encoder's rate from the cold runs' own evaluation.json;
4. vision: ``services.vision.train --finetune-size N`` on a fresh feature cache (CNN features computed
   in the run), validation set at its default 1,000 images;
5. risk: ``services.risk.train --limit N --no-outcomes --no-plots`` (LightGBM + Isolation Forest +
   baseline, thresholds) on the earliest N evalml transactions;
6. chat: no size knob on its CLI, so ``services.chat.train.train`` in a child of this module on a
   fraction of the packaged knowledge base (whole articles, all languages) and of the intent examples
   (per intent), the articles embedded in the run as ``services.chat.defaults`` does; 2x is the
   packaged data replicated with distinct ids/texts, for the slope only.
Models go to a temporary directory, never to ``models/``.

    python -m bench.capacity                    # writes bench/results/capacity.json and capacity_*.png
    python -m bench.capacity --only risk,vision --quick
    python -m bench.capacity --replot             # charts again from bench/results/capacity.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import RESULTS, write_results

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CHILD_ENV = {"OPENBLAS_CORETYPE": "Haswell", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT_S = 900.0


# --- measuring one child process --------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out += [int(p) for p in text.split()]
    except OSError:
        pass
    return out


def _status_kb(pid: int, key: str = "VmRSS:") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> int:
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _status_kb(p)
        todo += _children(p)
    return total


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat minus idle + iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Measured:
    rc: int
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    tree_peak_rss_mb: float
    loadavg_before: list[float]
    loadavg_after: list[float]
    other_cpu_share: float
    log: str

    def summary(self) -> dict[str, Any]:
        return {
            "rc": self.rc,
            "wall_s": round(self.wall_s, 2),
            "cpu_s": round(self.cpu_s, 2),
            "user_s": round(self.user_s, 2),
            "sys_s": round(self.sys_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "tree_peak_rss_mb": round(self.tree_peak_rss_mb, 1),
            "loadavg_before": self.loadavg_before,
            "loadavg_after": self.loadavg_after,
            "other_cpu_share": round(self.other_cpu_share, 3),
        }


def measure(
    argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float = RUN_TIMEOUT_S
) -> Measured:
    """Run ``nice -n 10 argv`` in the repository root; rusage of exactly that child via wait4."""
    full_env = {**os.environ, **CHILD_ENV, **env}
    la_before, busy0, t0 = loadavg(), machine_cpu_s(), time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["nice", "-n", "10", *argv],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        peak_tree = hwm = 0
        done = threading.Event()

        def poll() -> None:
            # VmHWM: the kernel's RSS high-water mark of the child's own address space (reset by exec,
            # so unlike wait4's ru_maxrss it does not inherit this process's RSS through fork); read
            # until the child exits, it misses at most the growth of its last 0.1 s.
            nonlocal peak_tree, hwm
            while not done.is_set():
                hwm = max(hwm, _status_kb(proc.pid, "VmHWM:"))
                peak_tree = max(peak_tree, tree_rss_kb(proc.pid))
                done.wait(0.1)

        def kill() -> None:
            if not done.wait(timeout_s):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)  # the session this run started, nothing else

        threads = [threading.Thread(target=poll, daemon=True), threading.Thread(target=kill, daemon=True)]
        for t in threads:
            t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy = machine_cpu_s() - busy0
        done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
        for t in threads:
            t.join()
    cpu = usage.ru_utime + usage.ru_stime
    cores = os.cpu_count() or 1
    other = max(0.0, busy - cpu) / max(wall * cores, 1e-9)
    text = log_path.read_text(errors="replace")
    return Measured(
        proc.returncode,
        wall,
        cpu,
        usage.ru_utime,
        usage.ru_stime,
        hwm / 1024,
        peak_tree / 1024,
        la_before,
        loadavg(),
        min(other, 1.0),
        text,
    )


# --- the plan ----------------------------------------------------------------------------------------
@dataclass
class Run:
    size: str
    rows: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], dict[str, Any]] | None = None  # data written before the run (not timed)
    after: Callable[[Measured], dict[str, Any]] | None = None  # facts read from the run's output
    label: str = ""  # sentiment: cold / warm


@dataclass
class Series:
    name: str
    service: str
    what: str
    rows_unit: str
    full_rows: int | None
    startup_module: str
    runs: list[Run]
    results: list[dict[str, Any]] = field(default_factory=list)
    startup: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def recommender_ml100k(work: Path, quick: bool) -> Series:
    from services.recommender import data as D

    fractions = (0.25, 0.5) if quick else (0.25, 0.5, 1.0)
    folder = work / "rec-ml100k"
    runs = []
    for f in fractions:
        inter_path, items_path = folder / f"inter_{f}.parquet", folder / "items.parquet"

        def prepare(f: float = f, inter_path: Path = inter_path, items_path: Path = items_path) -> dict:
            inter, items = D.movielens_100k()
            folder.mkdir(parents=True, exist_ok=True)
            sample = inter.sample(frac=f, random_state=0) if f < 1 else inter
            sample.to_parquet(inter_path, index=False)
            items.to_parquet(items_path, index=False)
            return {
                "interactions": len(sample),
                "users": int(sample["user_id"].nunique()),
                "items": int(sample["item_id"].nunique()),
            }

        models = work / "models" / f"rec-ml100k-{f}"
        argv = [PY, "-m", "services.recommender.train", "--interactions", str(inter_path)]
        argv += ["--items", str(items_path), "--no-content", "--models-dir", str(models)]
        argv += ["--out", str(models / "eval"), "--embeddings-cache", str(models / "emb.sqlite3")]
        runs.append(Run(f"{f:.0%}", round(100_000 * f), argv, prepare=prepare))
    return Series(
        "recommender_ml100k",
        "recommender",
        "services.recommender.train on MovieLens-100K (packaged): clean, quick tuning on a validation "
        "split, random + temporal evaluation of 7 models (content off: no item-text embedding), refit "
        "of the EASE + ALS + popularity hybrid, FAISS index, model-store write",
        "interactions",
        100_000,
        "services.recommender.train",
        runs,
    )


def recommender_synthetic(work: Path, quick: bool) -> Series:
    from services.recommender.data import synthetic_catalogue

    sizes = ((25_000, 10_000), (50_000, 20_000)) if quick else ((50_000, 20_000), (100_000, 40_000))
    if not quick:
        sizes += ((200_000, 80_000), (400_000, 160_000))
    per_user = 20.0
    folder = work / "rec-synth"
    runs = []
    for n_items, n_users in sizes:
        inter_path, items_path = folder / f"inter_{n_items}.parquet", folder / f"items_{n_items}.parquet"

        def prepare(
            n_items: int = n_items,
            n_users: int = n_users,
            inter_path: Path = inter_path,
            items_path: Path = items_path,
        ) -> dict:
            folder.mkdir(parents=True, exist_ok=True)
            data = synthetic_catalogue(
                n_items=n_items, n_users=n_users, interactions_per_user=per_user, seed=7, texts=False
            )
            data.interactions.to_parquet(inter_path, index=False)
            data.items.to_parquet(items_path, index=False)
            return {"interactions": len(data.interactions), "users": n_users, "items": n_items}

        models = work / "models" / f"rec-synth-{n_items}"
        argv = [PY, "-m", "services.recommender.train", "--interactions", str(inter_path)]
        argv += ["--items", str(items_path), "--no-eval", "--no-content", "--models", "popularity,als"]
        argv += ["--serve", "als", "--min-user-interactions", "1", "--models-dir", str(models)]
        argv += ["--out", str(models / "eval"), "--embeddings-cache", str(models / "emb.sqlite3")]
        runs.append(Run(f"{n_items // 1000}k items", round(n_users * per_user), argv, prepare=prepare))
    return Series(
        "recommender_synthetic_als",
        "recommender",
        "services.recommender.train --no-eval on the SYNTHETIC cross-border catalogue: ALS (CLI defaults: "
        "64 factors, 15 iterations, implicit on CPU) + popularity refit, FAISS index build (auto), "
        "model-store write; users and items grow together (items = 2.5 x users), 20 interactions/user",
        "interactions",
        None,
        "services.recommender.train",
        runs,
    )


def _sentiment_eval(models: Path) -> Callable[[Measured], dict[str, Any]]:
    def read(_: Measured) -> dict[str, Any]:
        found = sorted(models.glob("sentiment/*/evaluation.json"))
        if not found:
            return {}
        ev = json.loads(found[-1].read_text())
        return {
            "reviews_used": ev.get("reviews_used"),
            "embedded_now": ev.get("embedded_now"),
            "from_cache": ev.get("from_cache"),
            "embedding_seconds": ev.get("embedding_seconds"),
            "train_seconds_reported": ev.get("seconds"),
            "test_macro_f1": ev.get("test", {}).get("macro_f1"),
        }

    return read


def sentiment(work: Path, quick: bool) -> Series:
    sizes = (300, 600) if quick else (300, 600, 1200)
    runs = []
    for n in sizes:
        cache = work / "sentiment-cache" / str(n)  # fresh per size: the cold run embeds everything
        for label in ("cold", "warm"):
            models = work / "models" / f"sentiment-{n}-{label}"
            argv = [PY, "-m", "services.sentiment.train", "--sample", str(n), "--models-dir", str(models)]
            env = {"CBEC_SENTIMENT_CACHE_DIR": str(cache)}
            runs.append(Run(str(n), n, argv, env, after=_sentiment_eval(models), label=label))
    return Series(
        "sentiment",
        "sentiment",
        "services.sentiment.train --sample N (e5-small fp32 frozen encoder + 5-fold head ensemble x 2 "
        "candidate configs, calibration, test + 96-text multilingual evaluation, model-store write); "
        "cold = empty embedding cache (every text embedded in the run), warm = same cache again",
        "reviews",
        22_641,
        "services.sentiment.train",
        runs,
    )


def vision(work: Path, quick: bool) -> Series:
    sizes = (1000, 2000) if quick else (2000, 4000, 8000)
    runs = []
    for n in sizes:
        models, data_dir = work / "models" / f"vision-{n}", work / f"vision-data-{n}"
        argv = [PY, "-m", "services.vision.train", "--finetune-size", str(n)]
        env = {"CBEC_MODELS_DIR": str(models), "CBEC_VISION_DATA_DIR": str(data_dir)}
        runs.append(Run(str(n), n, argv, env))
    return Series(
        "vision",
        "vision",
        "services.vision.train --finetune-size N (Fashion-MNIST, 64 px: CNN backbone features on a cold "
        "cache for N + 1,000 validation images, 40-epoch projection head, leave-one-out retrieval check, "
        "near-duplicate calibration on 300 re-encoded images, model-store write)",
        "training images",
        50_000,
        "services.vision.train",
        runs,
    )


def risk(work: Path, quick: bool) -> Series:
    sizes = (10_000, 20_000) if quick else (12_500, 25_000, 50_000, 100_000)
    runs = []
    for n in sizes:
        models = work / "models" / f"risk-{n}"
        argv = [PY, "-m", "services.risk.train", "--limit", str(n), "--no-outcomes", "--no-plots"]
        argv += ["--models-dir", str(models), "--state-path", str(models / "state.sqlite")]
        runs.append(Run(f"{n // 1000}k" if n < 99_000 else "all", n, argv))
    return Series(
        "risk",
        "risk",
        "services.risk.train --limit N --no-outcomes --no-plots (evalml SYNTHETIC card transactions: "
        "velocity features in time order, LightGBM with early stopping, Isolation Forest, "
        "logistic-regression baseline, thresholds on the validation period, model-store write)",
        "transactions",
        99_992,
        "services.risk.train",
        runs,
    )


def chat(work: Path, quick: bool) -> Series:
    fractions = (0.25, 1.0) if quick else (0.25, 0.5, 1.0, 2.0)
    runs = []
    for f in fractions:
        articles, examples = chat_data(f)
        argv = [PY, "-m", "bench.capacity", "--child-chat", str(f), "--work", str(work / f"chat-{f}")]
        report = lambda m: json.loads(m.log.strip().splitlines()[-1])  # noqa: E731
        runs.append(Run(f"{f:g}x", len(articles) + len(examples), argv, after=report))
    return Series(
        "chat",
        "chat",
        "services.chat.train.train in a child process: embed the knowledge-base articles (as "
        "services.chat.defaults does) and the intent examples with multilingual-e5-small, tune retrieval "
        "fusion, intent classifier and hand-off threshold on the 52-question dev set, model-store write",
        "texts embedded (articles + intent examples)",
        None,
        "services.chat.train",
        runs,
    )


SERIES = {
    "recommender": (recommender_ml100k, recommender_synthetic),
    "sentiment": (sentiment,),
    "vision": (vision,),
    "risk": (risk,),
    "chat": (chat,),
}


# --- the chat child ---------------------------------------------------------------------------------
def chat_data(fraction: float) -> tuple[list[Any], list[tuple[str, str]]]:
    """``fraction`` of the packaged knowledge base (whole articles, every language) and of the intent
    examples (per intent); above 1, the packaged data replicated with distinct ids and texts."""
    from collections import defaultdict
    from dataclasses import replace

    from services.chat.intent import load_examples
    from services.chat.knowledge import packaged_articles

    records = packaged_articles()
    ids = sorted({r.article_id for r in records})
    if fraction <= 1:
        keep = set(ids[: max(1, round(len(ids) * fraction))])
        articles = [r for r in records if r.article_id in keep]
    else:
        articles = [
            replace(r, article_id=f"{r.article_id}-copy{k}", body=f"({k}) {r.body}") if k else r
            for k in range(math.ceil(fraction))
            for r in records
        ]
    by_intent: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for text, intent in load_examples():
        by_intent[intent].append((text, intent))
    examples: list[tuple[str, str]] = []
    for rows in by_intent.values():
        if fraction <= 1:
            examples += rows[: max(1, math.ceil(len(rows) * fraction))]
        else:
            examples += [(f"{t} ({k})" if k else t, i) for k in range(math.ceil(fraction)) for t, i in rows]
    return articles, examples


def chat_child(fraction: float, work: Path) -> None:
    """Train a chat model version on ``fraction`` of the packaged knowledge and intent examples."""
    from services.chat import train as chat_train
    from services.chat.knowledge import Embedder, embed_missing

    articles, examples = chat_data(fraction)
    t0 = time.perf_counter()
    embedder = Embedder()
    embed_missing(articles, embedder)  # what services.chat.defaults does before it stores them

    class KnowledgeBase:
        """Stands in for the chat store, whichever way train() opens it (``ChatStore(path)`` or
        ``ChatStore.open(state)``): train() only reads the embedded articles from it."""

        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        @classmethod
        def open(cls, *_: Any, **__: Any) -> KnowledgeBase:
            return cls()

        def articles(self) -> list[Any]:
            return articles

        def close(self) -> None:
            pass

    chat_train.ChatStore = KnowledgeBase  # type: ignore[assignment,misc]
    chat_train.load_examples = lambda: examples  # type: ignore[assignment]
    # The second argument (a data folder, or a state config) only locates the store replaced above.
    version = chat_train.train(work / "models", work / "data", embedder)  # type: ignore[arg-type]
    report = {
        "articles": len(articles),
        "intent_examples": len(examples),
        "rows": len(articles) + len(examples),
        "version": version,
        "seconds_in_child": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(report))


# --- fits and charts ---------------------------------------------------------------------------------
def loglog_slope(x: list[float], y: list[float]) -> dict[str, float] | None:
    pts = [(a, b) for a, b in zip(x, y, strict=True) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = slope * lx + intercept
    ss = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1 - float(((ly - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    last = float((ly[-1] - ly[-2]) / (lx[-1] - lx[-2])) if lx[-1] != lx[-2] else float("nan")
    return {"exponent": round(float(slope), 3), "r2": round(r2, 3), "last_pair_exponent": round(last, 3)}


def fit_series(s: Series, label: str = "") -> dict[str, Any]:
    runs = [r for r in s.results if r["rc"] == 0 and r.get("label", "") == label]
    x = [float(r["rows"]) for r in runs]
    base_cpu, base_rss = s.startup.get("cpu_s", 0.0), s.startup.get("peak_rss_mb", 0.0)
    base_wall = s.startup.get("wall_s", 0.0)
    out: dict[str, Any] = {"points": len(runs)}
    for key, base in (("wall_s", base_wall), ("cpu_s", base_cpu), ("peak_rss_mb", base_rss)):
        out[key] = loglog_slope(x, [r[key] for r in runs])
        out[f"net_{key}"] = loglog_slope(x, [r[key] - base for r in runs])
    return out


def chart(
    series: dict[str, dict[str, Any]], exponents: dict[str, Any], path_time: Path, path_mem: Path
) -> None:
    """One panel per service (log-log, the fitted exponent k in the legend) and a panel of the net
    exponents; drawn from the results JSON's ``series``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    services = list(dict.fromkeys(s["service"] for s in series.values()))
    for path, keys, ylabel in (
        (path_time, ("wall_s", "cpu_s"), "seconds (log)"),
        (path_mem, ("peak_rss_mb",), "peak RSS MB (log)"),
    ):
        cols = 3
        rows = -(-(len(services) + 1) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
        flat = list(axes.flat)
        for ax, service in zip(flat, services, strict=False):
            for name, s in series.items():
                if s["service"] != service:
                    continue
                startup = s.get("startup_import_only") or {}
                for label in sorted({r.get("label", "") for r in s["runs"]}):
                    runs = [r for r in s["runs"] if r["rc"] == 0 and r.get("label", "") == label]
                    if not runs:
                        continue
                    x = np.array([r["rows"] for r in runs], dtype=float)
                    for key in keys:
                        y = np.array([r[key] for r in runs], dtype=float)
                        fit = loglog_slope(list(x), list(y))
                        short = name.replace(f"{service}_", "") if name != service else ""
                        what = {"wall_s": "wall", "cpu_s": "CPU", "peak_rss_mb": "RSS"}[key]
                        tag = " ".join(t for t in (short, label, what) if t)
                        k = f" (k={fit['exponent']:.2f})" if fit else ""
                        ax.loglog(x, y, marker="o", linestyle="--" if key == "cpu_s" else "-", label=tag + k)
                if startup and "peak_rss_mb" in keys:
                    ax.axhline(startup["peak_rss_mb"], color="grey", linestyle=":", linewidth=0.8)
                if startup and "cpu_s" in keys:
                    ax.axhline(startup["cpu_s"], color="grey", linestyle=":", linewidth=0.8)
            unit = next(s["rows_unit"] for s in series.values() if s["service"] == service)
            ax.set_title(service, fontsize=10)
            ax.set_xlabel(f"{unit} (log)", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        table = flat[len(services)]
        table.axis("off")
        metric = "net_peak_rss_mb" if "peak_rss_mb" in keys else "net_cpu_s"
        lines = [f"{'series':<30}k ({metric})"] + [
            f"{name:<30}{e.get(metric)}" for name, e in exponents.items() if e.get(metric) is not None
        ]
        table.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
        table.set_title("fitted log-log exponents, net of the import-only startup", fontsize=9)
        for ax in flat[len(services) + 1 :]:
            ax.axis("off")
        note = "dotted: import-only startup" + ("" if "peak_rss_mb" in keys else "; solid wall, dashed CPU")
        fig.suptitle(
            f"training {' / '.join(keys)} vs data size; 2 shared cores, no GPU ({note})", fontsize=10
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# --- the whole run -----------------------------------------------------------------------------------
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    return float("nan")


def gpu() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:
        return "none"


def predicted_wall(s: Series, run: Run) -> float:
    """Extrapolate this run's wall time from the series' earlier runs (log-log), for the time budget."""
    done = [r for r in s.results if r["rc"] == 0 and r.get("label", "") == run.label and r["rows"] > 0]
    if not done or run.rows <= 0:
        return 0.0
    if len(done) == 1:
        return done[-1]["wall_s"] * run.rows / done[-1]["rows"]
    fit = loglog_slope([r["rows"] for r in done], [r["wall_s"] for r in done])
    k = max(1.0, fit["last_pair_exponent"]) if fit else 1.0
    return done[-1]["wall_s"] * (run.rows / done[-1]["rows"]) ** k


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SERIES), help="services to measure (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="two small sizes per series (a smoke test)")
    parser.add_argument("--budget-min", type=float, default=25.0, help="skip runs predicted to overrun")
    parser.add_argument("--out", default="capacity", help="results name: bench/results/<out>.json")
    parser.add_argument("--replot", action="store_true", help="redraw the charts from the results JSON")
    parser.add_argument("--child-chat", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_chat is not None:
        chat_child(args.child_chat, args.work)
        return
    if args.replot:
        saved = json.loads((RESULTS / f"{args.out}.json").read_text())
        chart(saved["series"], saved["exponents"], *(RESULTS / name for name in saved["charts"]))
        print(f"redrew {', '.join(saved['charts'])} from {args.out}.json")
        return
    from tqdm import tqdm

    started = time.perf_counter()
    models_before = (
        sorted(p.name for p in (ROOT / "models").glob("*/*")) if (ROOT / "models").exists() else []
    )
    conditions: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib(),
        "gpu": gpu(),
        "loadavg_start": loadavg(),
        "note": "2 cores shared with other engineers' test runs; children run under nice -n 10; CPU "
        "seconds are the steadier figure, wall seconds include waiting for the cores",
    }
    work = Path(tempfile.mkdtemp(prefix="cbec-capacity-"))
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    series = [make(work, args.quick) for w in wanted for make in SERIES[w]]
    total = sum(len(s.runs) + 1 for s in series)
    budget_s = args.budget_min * 60
    try:
        # Every series' startup first, then the runs round-robin (each series' smallest sizes before
        # anyone's largest), so that a busy machine costs the largest sizes, not whole services.
        schedule = [
            (s, r) for r in range(max(len(s.runs) for s in series)) for s in series if r < len(s.runs)
        ]
        with tqdm(total=total, desc="capacity", unit="run") as bar:
            for s in series:
                bar.set_postfix_str(f"{s.name} startup")
                m = measure([PY, "-c", f"import {s.startup_module}"], {}, work / f"{s.name}-startup.log")
                s.startup = m.summary()
                bar.update(1)
            for s, i in schedule:
                run = s.runs[i]
                tag = f"{s.name} {run.size} {run.label}".strip()
                bar.set_postfix_str(tag)
                elapsed = time.perf_counter() - started
                guess = predicted_wall(s, run)
                cold_ok = any(
                    r["size"] == run.size and r.get("label") == "cold" and r["rc"] == 0 for r in s.results
                )
                if elapsed + guess > budget_s or (run.label == "warm" and not cold_ok):
                    why = (
                        f"predicted {guess:.0f}s past the budget"
                        if elapsed + guess > budget_s
                        else "no cold run"
                    )
                    s.notes.append(f"skipped {run.size} {run.label}: {why}")
                    tqdm.write(f"skip {tag}: predicted {guess:.0f}s, {elapsed:.0f}s used")
                    bar.update(1)
                    continue
                facts = run.prepare() if run.prepare else {}
                m = measure(run.argv, run.env, work / f"{s.name}-{i}.log")
                row: dict[str, Any] = {"size": run.size, "rows": run.rows, **m.summary()}
                if run.label:
                    row["label"] = run.label
                if facts:
                    row["data"] = facts
                    row["rows"] = facts.get("interactions", run.rows)
                if m.rc == 0 and run.after is not None:
                    try:
                        extra = run.after(m)
                    except (ValueError, IndexError, OSError) as exc:
                        extra = {"error": f"could not read the run's output: {exc}"}
                    row["output"] = extra
                    if "rows" in extra:
                        row["rows"] = extra["rows"]
                if m.rc != 0:
                    row["log_tail"] = m.log[-1500:]
                s.results.append(row)
                tqdm.write(
                    f"{tag:<34} rows={row['rows']:>9,} rc={m.rc} wall={m.wall_s:7.1f}s "
                    f"cpu={m.cpu_s:7.1f}s rss={m.peak_rss_mb:7.0f}MB load={m.loadavg_after[0]:.2f} "
                    f"other_cpu={m.other_cpu_share:.0%}"
                )
                bar.update(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    models_after = sorted(p.name for p in (ROOT / "models").glob("*/*")) if (ROOT / "models").exists() else []
    conditions["loadavg_end"] = loadavg()
    conditions["repo_models_dir_untouched"] = models_before == models_after

    out: dict[str, Any] = {
        "protocol": __doc__.split("\n\n    python -m")[0],
        "conditions": conditions,
        "series": {},
        "exponents": {},
    }
    for s in series:
        labels = sorted({r.get("label", "") for r in s.results})
        fits = {label or "all": fit_series(s, label) for label in labels}
        out["series"][s.name] = {
            "service": s.service,
            "what": s.what,
            "rows_unit": s.rows_unit,
            "full_dataset_rows": s.full_rows,
            "startup_import_only": s.startup,
            "runs": s.results,
            "fits": fits,
            "notes": s.notes,
        }
        for label, fit in fits.items():
            key = s.name if label == "all" else f"{s.name}_{label}"
            out["exponents"][key] = {
                k: (fit[k] or {}).get("exponent")
                for k in ("cpu_s", "net_cpu_s", "peak_rss_mb", "net_peak_rss_mb")
            } | {"net_cpu_s_last_pair": (fit["net_cpu_s"] or {}).get("last_pair_exponent")}
    if "sentiment" in out["series"]:
        out["sentiment_embedding"] = sentiment_embedding(out["series"]["sentiment"]["runs"])
    charts = [RESULTS / f"{args.out}_time.png", RESULTS / f"{args.out}_memory.png"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    chart(out["series"], out["exponents"], *charts)
    out["charts"] = [c.name for c in charts]
    out["failed_runs"] = [
        f"{name} {r['size']} {r.get('label', '')}".strip()
        for name, s in out["series"].items()
        for r in s["runs"]
        if r["rc"] != 0
    ]
    out["seconds_total"] = round(time.perf_counter() - started, 1)
    path = write_results(args.out, out)
    print(f"wrote {path} and {', '.join(c.name for c in charts)} in {out['seconds_total']:.0f}s")
    for key, e in out["exponents"].items():
        print(f"  {key:<32} cpu k={e['cpu_s']} (net {e['net_cpu_s']}), rss k={e['peak_rss_mb']}")


def sentiment_embedding(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The encoder's cost per 1,000 texts: from the cold runs' own timer, and cold minus warm CPU."""
    cold = {r["size"]: r for r in runs if r.get("label") == "cold" and r["rc"] == 0}
    warm = {r["size"]: r for r in runs if r.get("label") == "warm" and r["rc"] == 0}
    rows = []
    for size, c in cold.items():
        o = c.get("output", {})
        texts = (o.get("embedded_now") or 0) + 96  # + the multilingual evaluation set, cold too
        entry: dict[str, Any] = {"reviews": c["rows"], "embedded_reviews": o.get("embedded_now")}
        if o.get("embedding_seconds"):
            entry["review_texts_per_s_wall"] = round(o["embedded_now"] / o["embedding_seconds"], 2)
        if size in warm:
            entry["cold_minus_warm_cpu_s"] = round(c["cpu_s"] - warm[size]["cpu_s"], 1)
            entry["cold_minus_warm_wall_s"] = round(c["wall_s"] - warm[size]["wall_s"], 1)
            entry["cpu_s_per_1k_texts"] = round(1000 * entry["cold_minus_warm_cpu_s"] / texts, 1)
            entry["wall_s_per_1k_texts"] = round(1000 * entry["cold_minus_warm_wall_s"] / texts, 1)
        rows.append(entry)
    rates = [r["review_texts_per_s_wall"] for r in rows if "review_texts_per_s_wall" in r]
    per_1k = [r["cpu_s_per_1k_texts"] for r in rows if "cpu_s_per_1k_texts" in r]
    return {
        "by_size": rows,
        "texts_per_s_wall_median": float(np.median(rates)) if rates else None,
        "cpu_s_per_1k_texts_median": float(np.median(per_1k)) if per_1k else None,
        "note": "cold runs start from an empty cache; texts are reviews in the training priority order "
        "(a random sample) plus the 96 multilingual evaluation texts",
    }


if __name__ == "__main__":
    main()
