"""Closed-loop gRPC load generator (there is no ghz here): N concurrent callers for a fixed time."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class LoadResult:
    calls: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray
    server_cpu_s: float = 0.0  # filled in by benchmarks that watch the server process

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    def summary(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}calls_per_s": round(self.per_second, 1),
            f"{prefix}p50_ms": round(self.percentile(50), 3),
            f"{prefix}p99_ms": round(self.percentile(99), 3),
            f"{prefix}errors": self.errors,
        }


async def closed_loop(
    call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float, warmup_s: float = 0.5
) -> LoadResult:
    """Run ``call(i)`` from ``concurrency`` workers; latencies are recorded after the warm-up only."""
    latencies: list[float] = []
    errors = 0
    counting = False
    stop_at = time.monotonic() + warmup_s + seconds

    async def worker(worker_id: int) -> None:
        nonlocal errors
        i = worker_id
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                await call(i)
            except Exception:
                if counting:
                    errors += 1
                continue
            if counting:
                latencies.append((time.perf_counter() - t0) * 1000)
            i += concurrency

    async def flip() -> float:
        nonlocal counting
        await asyncio.sleep(warmup_s)
        counting = True
        return time.monotonic()

    flip_task = asyncio.ensure_future(flip())
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    measured = time.monotonic() - await flip_task
    return LoadResult(len(latencies), errors, measured, np.asarray(latencies))


def machine() -> dict[str, Any]:
    import os

    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    results = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **results,
    }
    results["machine"] = machine()
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def handling_buckets(metrics_address: str, method: str) -> dict[float, float]:
    """Cumulative ``grpc_server_handling_seconds`` bucket counts of one method, scraped from the server."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "grpc_server_handling_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("grpc_method") == method:
                out[float(sample.labels["le"])] = out.get(float(sample.labels["le"]), 0.0) + sample.value
    return out


def server_side(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Time inside the handler (the server's own histogram), apart from transport and queueing.

    Quantiles are interpolated within the runtime's buckets (as PromQL's histogram_quantile does), so
    they are estimates; the shares of calls handled within 5 and 10 ms are exact (bucket edges): a p99
    goal of 5 ms is met exactly when ``within_5ms_share >= 0.99``.
    """
    edges = sorted(after)
    counts = np.array([after[e] - before.get(e, 0.0) for e in edges])
    total = counts[-1] if len(counts) else 0.0
    if not total:
        return {"calls": 0}

    def quantile(q: float) -> float:
        rank = q * total
        i = int(np.searchsorted(counts, rank))
        if edges[i] == float("inf"):
            return float("inf") if i == 0 else edges[i - 1] * 1000
        lo_edge, lo_count = (edges[i - 1], counts[i - 1]) if i else (0.0, 0.0)
        share = (rank - lo_count) / max(counts[i] - lo_count, 1e-9)
        return (lo_edge + (edges[i] - lo_edge) * share) * 1000

    def within(edge: float) -> float:
        return round(float(counts[edges.index(edge)] / total), 4) if edge in edges else float("nan")

    return {
        "calls": int(total),
        "p50_ms_estimate": round(float(quantile(0.5)), 3),
        "p99_ms_estimate": round(float(quantile(0.99)), 3),
        "within_5ms_share": within(0.005),
        "within_10ms_share": within(0.01),
    }
