"""Runtime benchmark: its overhead on an empty RPC, and what the micro-batcher buys.

1. Empty unary RPC, bare ``grpc.aio`` server vs. the same handler behind the runtime (interceptor,
   metrics, request ids, health, reflection). Each server runs in its own process; the load comes
   from this process. Rounds alternate bare/runtime so machine noise hits both alike.
   ``runtime_overhead_ratio`` = runtime throughput / bare throughput (goal >= 0.8). The same rounds
   also run the runtime with tracing on (``--trace-sample-ratio``, default 1%: OpenTelemetry's SDK,
   a span per call, sampled ones exported as OTLP JSON lines to a temporary file), reported as
   ``runtime_overhead_ratio_traced`` (goal >= 0.8 too).
2. A model stub with a fixed per-batch cost (``--batch-cost-ms``, sleeping like a GPU kernel or
   a BLAS call that releases the GIL) behind the runtime at concurrency 64, with the micro-batcher
   (max batch 64) vs. without (max batch 1). ``batcher_speedup`` = batched / unbatched (goal >= 4).

    python -m bench.runtime            # writes bench/results/runtime.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

import grpc
from google.protobuf import empty_pb2, wrappers_pb2
from rich.progress import Progress

from bench.loadgen import LoadResult, closed_loop, write_results
from services.runtime.access import PRINCIPAL_KEY, SCOPES_KEY, TOKEN_ENV, TOKEN_KEY, USER_KEY

SERVICE = "cbec.bench.v1.BenchService"
ROOT = Path(__file__).resolve().parents[1]


def _handlers(predict: Any = None) -> grpc.GenericRpcHandler:
    async def empty(request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    methods = {
        "Empty": grpc.unary_unary_rpc_method_handler(
            empty, empty_pb2.Empty.FromString, empty_pb2.Empty.SerializeToString
        )
    }
    if predict is not None:
        methods["Predict"] = grpc.unary_unary_rpc_method_handler(
            predict, wrappers_pb2.DoubleValue.FromString, wrappers_pb2.DoubleValue.SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class BenchService:
    """The runtime-side service: the empty method and a batched model stub."""

    service_names: Sequence[str] = (SERVICE,)
    slot = None

    def __init__(self, runtime: Any) -> None:
        cost = float(os.environ.get("BENCH_BATCH_COST_MS", "10")) / 1000

        def model(items: list[float]) -> list[float]:
            time.sleep(cost)  # fixed cost per batch, whatever its size
            return [x * 2 for x in items]

        self.batcher = runtime.batcher(model, "stub")

    async def predict(self, request: wrappers_pb2.DoubleValue, context: Any) -> wrappers_pb2.DoubleValue:
        value = await self.batcher.submit(request.value, time_remaining=context.time_remaining())
        return wrappers_pb2.DoubleValue(value=value)

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((_handlers(self.predict),))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def _serve_bare(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(kind: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    full_env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_PORT": "0",
        "CBEC_DEVICE": "cpu",
        "CBEC_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "bench.runtime", "--serve", kind, "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env), port


async def _wait_ready(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)


#: The runtime server runs as in production: the internal token required on every call, and the
#: caller's identity sent with it (``services/runtime/access.py``). Both servers get the same metadata.
TOKEN = secrets.token_urlsafe(32)
CALL_METADATA = ((TOKEN_KEY, TOKEN), (USER_KEY, "u-42"), (PRINCIPAL_KEY, "bench"), (SCOPES_KEY, "gateway"))


def _token_env() -> dict[str, str]:
    path = Path(tempfile.mkdtemp(prefix="bench-runtime-")) / "internal-token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    return {TOKEN_ENV: str(path)}


async def _load(port: int, method: str, concurrency: int, seconds: float) -> LoadResult:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        if method == "Empty":
            stub = ch.unary_unary(
                f"/{SERVICE}/Empty", empty_pb2.Empty.SerializeToString, empty_pb2.Empty.FromString
            )
            request: Any = empty_pb2.Empty()
        else:
            stub = ch.unary_unary(
                f"/{SERVICE}/Predict",
                wrappers_pb2.DoubleValue.SerializeToString,
                wrappers_pb2.DoubleValue.FromString,
            )
            request = wrappers_pb2.DoubleValue(value=1.0)
        return await closed_loop(
            lambda i: stub(request, timeout=10, metadata=CALL_METADATA), concurrency, seconds
        )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc): per-call CPU is far less noisy than rate."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    kind: str, method: str, concurrency: int, seconds: float, env: dict[str, str] | None = None
):
    proc, port = _start(kind, {**_token_env(), **(env or {})} if kind == "runtime" else env)
    try:
        await _wait_ready(port)
        before = _cpu_seconds(proc.pid)
        result = await _load(port, method, concurrency, seconds)
        result.server_cpu_s = _cpu_seconds(proc.pid) - before
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _tracing_env(sample_ratio: float) -> dict[str, str]:
    """Tracing on, exporting to a file (the SDK's whole path, no collector to run)."""
    path = Path(tempfile.mkdtemp(prefix="bench-runtime-traces-")) / "spans.jsonl"
    return {"CBEC_TRACE_FILE": str(path), "CBEC_TRACE_SAMPLE_RATIO": str(sample_ratio)}


def _count_spans(path: Path) -> int:
    """Spans in an OTLP JSON lines file (one ExportTraceServiceRequest per line)."""
    if not path.is_file():
        return 0
    count = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            for resource in json.loads(line).get("resourceSpans", []):
                count += sum(len(scope.get("spans", [])) for scope in resource.get("scopeSpans", []))
    return count


async def run(
    rounds: int, seconds: float, batch_cost_ms: float, trace_sample_ratio: float = 0.01
) -> dict[str, Any]:
    bare: list[LoadResult] = []
    runtime: list[LoadResult] = []
    traced: list[LoadResult] = []
    tracing = _tracing_env(trace_sample_ratio)
    with Progress() as progress:
        task = progress.add_task("empty RPC: bare vs runtime vs traced", total=rounds * 3 + 2)
        for _ in range(rounds):
            bare.append(await _measure("bare", "Empty", 16, seconds))
            progress.advance(task)
            runtime.append(await _measure("runtime", "Empty", 16, seconds))
            progress.advance(task)
            traced.append(await _measure("runtime", "Empty", 16, seconds, tracing))
            progress.advance(task)
        progress.update(task, description="model stub: batched vs unbatched")
        cost = {"BENCH_BATCH_COST_MS": str(batch_cost_ms), "CBEC_BATCH_MAX_DELAY_MS": "2"}
        batched = await _measure("runtime", "Predict", 64, seconds, {**cost, "CBEC_BATCH_MAX_SIZE": "64"})
        progress.advance(task)
        unbatched = await _measure("runtime", "Predict", 64, seconds, {**cost, "CBEC_BATCH_MAX_SIZE": "1"})
        progress.advance(task)

    def med(results: list[LoadResult], f: Any) -> float:
        return round(median(f(r) for r in results), 3)

    def cpu_us(results: list[LoadResult]) -> float:  # server CPU per call, warm-up included in both
        return round(1e6 * sum(r.server_cpu_s for r in results) / sum(r.calls for r in results), 1)

    bare_rps = med(bare, lambda r: r.per_second)
    runtime_rps = med(runtime, lambda r: r.per_second)
    traced_rps = med(traced, lambda r: r.per_second)
    return {
        "protocol": (
            f"{rounds} alternating rounds of {seconds}s each, closed loop at concurrency 16, "
            "server in its own process, medians reported; runtime server with the internal token "
            "required and identity metadata checked on every call (both servers get the same metadata); "
            f"traced: the runtime server with tracing on at sample ratio {trace_sample_ratio}, spans to "
            "a file; "
            f"batcher: concurrency 64, fixed {batch_cost_ms} ms per batch, "
            "max batch 64 vs 1, max delay 2 ms"
        ),
        "bare_calls_per_s": bare_rps,
        "runtime_calls_per_s": runtime_rps,
        "bare_p50_ms": med(bare, lambda r: r.percentile(50)),
        "bare_p99_ms": med(bare, lambda r: r.percentile(99)),
        "runtime_p50_ms": med(runtime, lambda r: r.percentile(50)),
        "runtime_p99_ms": med(runtime, lambda r: r.percentile(99)),
        "runtime_overhead_ratio": round(runtime_rps / bare_rps, 3),
        "runtime_overhead_ratio_goal": 0.8,
        "trace_sample_ratio": trace_sample_ratio,
        "traced_calls_per_s": traced_rps,
        "traced_p50_ms": med(traced, lambda r: r.percentile(50)),
        "traced_p99_ms": med(traced, lambda r: r.percentile(99)),
        "runtime_overhead_ratio_traced": round(traced_rps / bare_rps, 3),
        # Proof the traced server really sampled: spans it wrote against the calls it served.
        "traced_calls": sum(r.calls for r in traced),
        "traced_spans_written": _count_spans(Path(tracing["CBEC_TRACE_FILE"])),
        "traced_server_cpu_us_per_call": cpu_us(traced),
        "bare_server_cpu_us_per_call": cpu_us(bare),
        "runtime_server_cpu_us_per_call": cpu_us(runtime),
        "runtime_cpu_ratio": round(cpu_us(bare) / cpu_us(runtime), 3),
        "batched": batched.summary("batched_"),
        "unbatched": unbatched.summary("unbatched_"),
        "batcher_speedup": round(batched.per_second / unbatched.per_second, 2),
        "batcher_speedup_goal": 4,
        "errors": sum(r.errors for r in bare + runtime + traced) + batched.errors + unbatched.errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch-cost-ms", type=float, default=10.0)
    parser.add_argument("--trace-sample-ratio", type=float, default=0.01)
    parser.add_argument("--serve", choices=["bare", "runtime"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "bare":
        asyncio.run(_serve_bare(args.port))
        return
    if args.serve == "runtime":
        from services.runtime.server import main as serve_main

        serve_main("bench", BenchService)
        return
    results = asyncio.run(run(args.rounds, args.seconds, args.batch_cost_ms, args.trace_sample_ratio))
    path = write_results("runtime", results)
    print(path.read_text())


if __name__ == "__main__":
    main()
