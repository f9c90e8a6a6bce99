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
