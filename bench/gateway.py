"""Gateway benchmark: fan-out overhead, HTTP bridge vs gRPC, and one backend killed mid-run.

Every process is real and local: the backends are the runtime-served test backends of
``tests/gateway/backends.py`` (real gRPC servers with the generated servicers and deterministic
answers; the model services are not in the repository yet, and a stub with no model cost isolates
the gateway's own overhead), the gateway is ``python -m gateway``, the load comes from this process.

1. ``GetProductPage`` through the gateway (gRPC) vs. the same four backend calls (SimilarItems,
   SearchByImage, GetMarketReport, Recommend) made directly and concurrently by this client, closed
   loop at concurrency 1, alternating rounds; ``fanout_overhead_p50_ms`` = gateway p50 - direct p50
   (goal <= 2 ms).
2. The same ``GetProductPage`` over the HTTP bridge vs. over gRPC at concurrency 16:
   ``http_bridge_overhead_ratio`` = HTTP calls/s / gRPC calls/s (1.0 = no overhead), with both p99s.
3. ``GetProductPage`` at concurrency 8 while the sentiment backend is SIGKILLed and later restarted:
   ``error_rate_healthy_parts`` = share of responses missing a part whose backend was healthy
   (goal 0), ``partial_responses`` counted, failed calls counted, time to recover after the restart.

    python -m bench.gateway            # writes bench/results/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp
import grpc
from cbec.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from cbec.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from cbec.sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc
from rich.progress import Progress

from bench.loadgen import LoadResult, closed_loop, write_results

ROOT = Path(__file__).resolve().parents[1]
KEY = "cbec-dev-key"
PRODUCT = "sku-004"
IMAGE = b"\xff\xd8\xff\xe0 benchmark product image " * 40
HEALTHY_PARTS = {"similar_items", "visually_similar", "also_for_you"}  # sentiment is the one killed
MD = (("x-api-key", KEY),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The backends (sentiment alone in its own process, so it can be killed) and the gateway."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.models = work / "models"
        self.images = work / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        (self.images / f"{PRODUCT}.jpg").write_bytes(IMAGE)
        self.ports = {name: free_port() for name in ("recommender", "vision", "risk", "chat", "sentiment")}
        self.grpc_port, self.http_port = free_port(), free_port()
        self.others: subprocess.Popen[str] | None = None
        self.sentiment: subprocess.Popen[str] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    def _backends(self, names: list[str]) -> subprocess.Popen[str]:
        from tests.gateway.backends import write_model

        for name in names:
            if not (self.models / name).exists():
                write_model(self.models, name)
        args = [f"{n}={self.ports[n]}" for n in names]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gateway.backends", "--models-dir", str(self.models), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"backends {names} did not start")
        return proc

    def start_sentiment(self) -> None:
        self.sentiment = self._backends(["sentiment"])

    def start(self) -> None:
        self.others = self._backends(["recommender", "vision", "risk", "chat"])
        self.start_sentiment()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CBEC_")},
            "CBEC_GATEWAY_ENV": "dev",
            "CBEC_HOST": "127.0.0.1",
            "CBEC_GRPC_PORT": str(self.grpc_port),
            "CBEC_GATEWAY_HTTP_PORT": str(self.http_port),
            "CBEC_METRICS_PORT": "0",
            "CBEC_LOG_LEVEL": "ERROR",
            "CBEC_GATEWAY_PRODUCT_IMAGES_DIR": str(self.images),
            "CBEC_GATEWAY_RATE_LIMIT_PER_S": "1000000",
            "CBEC_GATEWAY_RATE_LIMIT_BURST": "1000000",
            "CBEC_MAX_CONCURRENT_CALLS": "10000",
            "CBEC_BREAKER_OPEN_S": "0.5",
            "CBEC_RECONNECT_MAX_BACKOFF_S": "0.5",
            **{f"CBEC_GATEWAY_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in self.ports.items()},
        }
        self.gateway = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env)

    def stop(self) -> None:
        for proc in (self.gateway, self.sentiment, self.others):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.gateway, self.sentiment, self.others):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def wait_ready(address: str, timeout: float = 60) -> None:
    from services.runtime.probe import wait_serving

    if not await wait_serving(address, timeout):
        raise RuntimeError(f"{address} never reported SERVING")


def page_request(i: int) -> gateway_pb2.GetProductPageRequest:
    return gateway_pb2.GetProductPageRequest(user_id=f"u-{i % 97}", product_id=PRODUCT, market="DE", k=10)


async def fanout(p: Processes, rounds: int, seconds: float) -> dict[str, Any]:
    """Gateway GetProductPage vs. the same backend calls made concurrently from here."""
    addr = {n: f"127.0.0.1:{port}" for n, port in p.ports.items()}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") as gw_channel,
        grpc.aio.insecure_channel(addr["recommender"]) as rec_channel,
        grpc.aio.insecure_channel(addr["vision"]) as vis_channel,
        grpc.aio.insecure_channel(addr["sentiment"]) as sen_channel,
    ):
        gateway = gateway_pb2_grpc.GatewayServiceStub(gw_channel)
        rec = recommender_pb2_grpc.RecommenderServiceStub(rec_channel)
        vis = vision_pb2_grpc.VisionServiceStub(vis_channel)
        sen = sentiment_pb2_grpc.SentimentServiceStub(sen_channel)

        async def through_gateway(i: int) -> None:
            reply = await gateway.GetProductPage(page_request(i), metadata=MD, timeout=5)
            if reply.missing_parts:
                raise RuntimeError(f"partial page: {reply.missing_parts}")

        async def direct(i: int) -> None:
            req = page_request(i)
            similar = recommender_pb2.SimilarItemsRequest(
                item_id=req.product_id,
                k=req.k,
                market=req.market,
                source=recommender_pb2.SIMILARITY_SOURCE_BLENDED,
            )
            recommend = recommender_pb2.RecommendRequest(user_id=req.user_id, k=req.k, market=req.market)
            recommend.filters.exclude_item_ids.append(req.product_id)
            await asyncio.gather(
                rec.SimilarItems(similar, timeout=5),
                vis.SearchByImage(
                    vision_pb2.SearchByImageRequest(image=IMAGE, k=req.k + 1, market="DE"), timeout=5
                ),
                sen.GetMarketReport(
                    sentiment_pb2.GetMarketReportRequest(product_id=req.product_id, market=req.market),
                    timeout=5,
                ),
                rec.Recommend(recommend, timeout=5),
            )

        gw_results: list[LoadResult] = []
        direct_results: list[LoadResult] = []
        for _ in range(rounds):
            direct_results.append(await closed_loop(direct, 1, seconds))
            gw_results.append(await closed_loop(through_gateway, 1, seconds))

    def med(results: list[LoadResult], q: float) -> float:
        return round(median(r.percentile(q) for r in results), 3)

    return {
        "gateway_p50_ms": med(gw_results, 50),
        "gateway_p99_ms": med(gw_results, 99),
        "direct_p50_ms": med(direct_results, 50),
        "direct_p99_ms": med(direct_results, 99),
        "fanout_overhead_p50_ms": round(med(gw_results, 50) - med(direct_results, 50), 3),
        "fanout_overhead_p99_ms": round(med(gw_results, 99) - med(direct_results, 99), 3),
        "fanout_errors": sum(r.errors for r in gw_results + direct_results),
    }


async def bridge(p: Processes, rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """GetProductPage over HTTP/JSON vs. over gRPC, both through the gateway."""
    body = {"userId": "u-1", "productId": PRODUCT, "market": "DE", "k": 10}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with (
        aiohttp.ClientSession(
            f"http://127.0.0.1:{p.http_port}", connector=connector, headers={"x-api-key": KEY}
        ) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") as channel,
    ):
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def over_http(i: int) -> None:
            async with http.post("/v1/gateway/product-page", json={**body, "userId": f"u-{i % 97}"}) as resp:
                payload = await resp.json()
                if resp.status != 200 or payload["missingParts"]:
                    raise RuntimeError(f"HTTP {resp.status}")

        async def over_grpc(i: int) -> None:
            reply = await stub.GetProductPage(page_request(i), metadata=MD, timeout=5)
            if reply.missing_parts:
                raise RuntimeError("partial")

        http_results: list[LoadResult] = []
        grpc_results: list[LoadResult] = []
        for _ in range(rounds):
            grpc_results.append(await closed_loop(over_grpc, concurrency, seconds))
            http_results.append(await closed_loop(over_http, concurrency, seconds))

    http_rps = median(r.per_second for r in http_results)
    grpc_rps = median(r.per_second for r in grpc_results)
    return {
        "http_calls_per_s": round(http_rps, 1),
        "grpc_calls_per_s": round(grpc_rps, 1),
        "http_p50_ms": round(median(r.percentile(50) for r in http_results), 3),
        "http_p99_ms": round(median(r.percentile(99) for r in http_results), 3),
        "grpc_p50_ms": round(median(r.percentile(50) for r in grpc_results), 3),
        "grpc_p99_ms": round(median(r.percentile(99) for r in grpc_results), 3),
        "http_bridge_overhead_ratio": round(http_rps / grpc_rps, 3),
        "bridge_errors": sum(r.errors for r in http_results + grpc_results),
    }


async def chaos(p: Processes, seconds: float, concurrency: int) -> dict[str, Any]:
    """Kill the sentiment backend a third of the way in, restart it at two thirds."""
    counts = {"calls": 0, "complete": 0, "partial": 0, "failed": 0, "healthy_part_missing": 0}
    last_partial = [0.0]
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < stop_at:
                i += concurrency
                counts["calls"] += 1
                try:
                    reply = await stub.GetProductPage(page_request(i), metadata=MD, timeout=2)
                except grpc.aio.AioRpcError:
                    counts["failed"] += 1
                    continue
                missing = {m.part for m in reply.missing_parts}
                if missing:
                    counts["partial"] += 1
                    last_partial[0] = time.monotonic()
                else:
                    counts["complete"] += 1
                if missing & HEALTHY_PARTS:
                    counts["healthy_part_missing"] += 1

        async def kill_and_restart() -> float:
            await asyncio.sleep(seconds / 3)
            assert p.sentiment is not None
            p.sentiment.kill()
            p.sentiment.wait()
            await asyncio.sleep(seconds / 3)
            restarted = time.monotonic()
            await asyncio.to_thread(p.start_sentiment)
            return restarted

        results = await asyncio.gather(kill_and_restart(), *(worker(w) for w in range(concurrency)))
    restarted = results[0]
    return {
        "chaos_calls": counts["calls"],
        "chaos_failed_calls": counts["failed"],
        "partial_responses": counts["partial"],
        "complete_responses": counts["complete"],
        "error_rate_healthy_parts": round(counts["healthy_part_missing"] / max(counts["calls"], 1), 6),
        "recovered_after_restart_s": round(max(0.0, last_partial[0] - restarted), 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        p = Processes(Path(tmp))
        try:
            p.start()
            await wait_ready(f"127.0.0.1:{p.grpc_port}")
            for port in p.ports.values():
                await wait_ready(f"127.0.0.1:{port}")
            with Progress() as progress:
                task = progress.add_task("fan-out: gateway vs direct", total=3)
                fan = await fanout(p, args.rounds, args.seconds)
                progress.update(task, advance=1, description="HTTP bridge vs gRPC")
                http = await bridge(p, args.rounds, args.seconds, args.concurrency)
                progress.update(task, advance=1, description="sentiment killed mid-run")
                broken = await chaos(p, args.chaos_seconds, 8)
                progress.advance(task)
        finally:
            p.stop()
    return {
        "protocol": (
            f"all local processes (runtime-served test backends without model cost, python -m gateway, load "
            f"from this process); fan-out: closed loop at concurrency 1, {args.rounds} alternating rounds of "
            f"{args.seconds}s, medians; bridge: concurrency {args.concurrency}, {args.rounds} rounds of "
            f"{args.seconds}s, medians; chaos: concurrency 8 for {args.chaos_seconds}s, sentiment SIGKILLed "
            "at 1/3 and restarted at 2/3"
        ),
        **fan,
        "fanout_overhead_p50_ms_goal": 2.0,
        **http,
        **broken,
        "error_rate_healthy_parts_goal": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--chaos-seconds", type=float, default=9.0)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    path = write_results("gateway", results)
    print(path.read_text())


if __name__ == "__main__":
    main()
