"""Scale-out benchmark (issue 14): the chart's pods as processes, 2 replicas of every stateful service and
2 gateways on real PostgreSQL + Redis (tests/deploy/scaleout.py), measured in one run:

- ``cross_replica_effect_p99_ms``: a write through one replica -> visible on every replica, for the four
  kinds of shared write (interactions, product index/removal, reviews, chat turns); p99 per kind, the
  worst of them is the headline (goal <= 1000 ms). The probe polls every 20 ms, so figures include up
  to one polling period;
- ``acknowledged_writes`` / ``lost_after_kill9`` (goal 0), ``session_continuity_errors`` (goal 0),
  ``velocity_mismatches`` (goal 0), ``global_rate_limit_excess_ratio`` (goal <= 1.1);
- risk ``ScoreTransaction`` at concurrency 4 on the shared backend and on the embedded one (a second
  rendering of the chart with ``state.backend=embedded``, the risk pod alone), p99 read from the
  server's own ``grpc_server_handling_seconds`` histogram (goal <= 5 ms each). The p99 is interpolated
  inside the runtime's buckets (5-10-25 ms apart), so it is an estimate; ``within_5ms_share`` is exact,
  and the goal holds exactly when it is >= 0.99. The client's view on the same 2 cores is reported
  beside it, not judged.

Run: ``make bench-scaleout`` -> bench/results/scaleout.json and scaleout.png.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from bench.loadgen import RESULTS, closed_loop, handling_buckets, server_side, write_results

console = Console(stderr=True)
GOALS = {
    "cross_replica_effect_p99_ms": 1000,
    "lost_after_kill9": 0,
    "session_continuity_errors": 0,
    "velocity_mismatches": 0,
    "global_rate_limit_excess_ratio": 1.1,
    "score_server_p99_ms": 5.0,
}


def p99(values: list[float]) -> float:
    return round(float(np.percentile(values, 99)) * 1000, 1)


async def risk_load(suite: Any, pod: Any, seconds: float, concurrency: int = 4) -> dict[str, Any]:
    """ScoreTransaction on one risk pod from ``concurrency`` callers; server-side and client figures."""
    from cbec.risk.v1 import risk_pb2

    stub = suite.stub(pod)
    run = uuid.uuid4().hex[:6]
    start = time.time() - 1800

    async def call(i: int) -> None:
        tx = risk_pb2.Transaction(
            transaction_id=f"ld-{run}-{i}-{time.perf_counter_ns()}",
            user_id=f"ldu-{i % 500}",
            card_fingerprint=f"ldc-{i % 300}",
            device_id=f"ldd-{i % 200}",
            ip_country="DE",
            billing_country="DE",
            shipping_country="DE",
            amount=10.0 + i % 90,
            currency="EUR",
            payment_method="card",
        )
        tx.occurred_time.FromSeconds(int(start + i % 1800))
        await stub.ScoreTransaction(risk_pb2.ScoreTransactionRequest(transaction=tx), timeout=5)

    metrics = f"{pod.ip}:{pod.ports['metrics']}"
    await closed_loop(call, concurrency, 2.0)  # warm-up: connections, caches, LightGBM threads
    before = await asyncio.to_thread(handling_buckets, metrics, "ScoreTransaction")
    load = await closed_loop(call, concurrency, seconds)
    after = await asyncio.to_thread(handling_buckets, metrics, "ScoreTransaction")
    return {
        "server": server_side(before, after),
        "client": load.summary("client_"),
        "concurrency": concurrency,
    }


async def measure(suite: Any, rounds: int, load_s: float) -> dict[str, Any]:
    from tests.deploy.scaleout import png

    out: dict[str, Any] = {}
    effects: dict[str, list[float]] = {
        "interactions": [],
        "products": [],
        "products_removed": [],
        "reviews": [],
    }
    effects["chat_turns"] = []
    items = await suite.catalogue_items()
    async with suite.http() as session:
        with console.status("cross-replica effects") as status:
            for r in range(rounds):
                status.update(f"cross-replica effects: round {r + 1}/{rounds}")
                effects["interactions"].append(await suite.recommender_effect(session, r % 2, items))
                indexed, removed = await suite.vision_effect(png(200 + r), r % 2)
                effects["products"].append(indexed)
                effects["products_removed"].append(removed)
                effects["reviews"].append(await suite.sentiment_effect(session, r % 2))
                effects["chat_turns"].append(await suite.chat_effect(r % 2))
    per_kind = {k: {"p50_ms": round(float(np.median(v)) * 1000, 1), "p99_ms": p99(v), "n": len(v)}
                for k, v in effects.items()}  # fmt: skip
    out["cross_replica_effect_ms"] = per_kind
    out["cross_replica_effect_p99_ms"] = max(v["p99_ms"] for v in per_kind.values())

    with console.status("chat session continuity"):
        out["session_continuity_errors"] = sum([await suite.chat_continuity(turns=4) for _ in range(rounds)])
        out["session_continuity_turns"] = 4 * rounds
    with console.status("risk velocity across replicas"):
        mismatches, effect = await suite.velocity_mismatches(cards=8, per_card=8)
        out["velocity_mismatches"] = mismatches
        out["velocity_transactions"] = 64
        out["velocity_history_changes_scores"] = effect
    with console.status("global rate limit across 2 gateways"):
        allowed, ratio = await suite.rate_limit_excess(seconds=5.0)
        out["global_rate_limit_allowed"] = allowed
        out["global_rate_limit_excess_ratio"] = round(ratio, 3)
    with console.status("risk score load, shared backend"):
        out["risk_shared"] = await risk_load(suite, suite.pods("risk")[0], load_s)
    with console.status("kill -9 under load"):
        kill = await suite.kill9_under_load(seconds=15.0, kill_at=5.0)
    out["kill9"] = kill
    out["acknowledged_writes"] = sum(v["acknowledged"] for v in kill.values())
    out["lost_after_kill9"] = sum(v["lost"] for v in kill.values())
    await suite.close()
    return out


def embedded_risk(work: Path, load_s: float) -> dict[str, Any]:
    """The chart rendered with the embedded backend, only its risk pod started, the same load."""
    from tests.deploy.chart_run import ChartCluster, prepare_models_dir
    from tests.deploy.conftest import helm_template
    from tests.deploy.scaleout import Keys, Suite
    from tests.deploy.tiny_models import risk

    models = work / "models"
    risk(models)
    prepare_models_dir(models)
    values = {"state": {"backend": "embedded"}, "services": {"risk": {"replicas": 1}}}
    cluster = ChartCluster(helm_template(values).docs, {}, work / "pods", models, only={"risk"})
    with cluster.running(timeout=180):
        suite = Suite(cluster, Keys("", ""), None, "", None)  # type: ignore[arg-type]

        async def go() -> dict[str, Any]:
            try:
                return await risk_load(suite, cluster.of("risk")[0], load_s)
            finally:
                await suite.close()

        return asyncio.run(go())


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = results["cross_replica_effect_ms"]
    names = list(kinds)
    a.bar(names, [kinds[k]["p99_ms"] for k in names], label="p99")
    a.bar(names, [kinds[k]["p50_ms"] for k in names], label="p50")
    a.axhline(GOALS["cross_replica_effect_p99_ms"], color="red", linestyle="--", label="goal (p99)")
    a.set_ylabel("write on one replica -> visible on all (ms)")
    a.set_title("cross-replica effect, 2 replicas")
    a.tick_params(axis="x", rotation=20)
    a.legend()
    backends = ["shared", "embedded"]
    server = [results[f"score_server_p99_ms_{k}"] for k in backends]
    client = [results[f"score_client_p99_ms_{k}"] for k in backends]
    x = np.arange(2)
    b.bar(x - 0.2, server, 0.4, label="server histogram p99")
    b.bar(x + 0.2, client, 0.4, label="client p99 (same 2 cores)")
    b.axhline(GOALS["score_server_p99_ms"], color="red", linestyle="--", label="goal (server)")
    b.set_xticks(x, backends)
    b.set_ylabel("ms")
    b.set_title("risk ScoreTransaction, concurrency 4")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="writes per kind for the effect p99")
    parser.add_argument("--load-seconds", type=float, default=15.0)
    args = parser.parse_args()
    from tests.deploy.scaleout import running_suite

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cbec-scaleout-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # the pod user must reach the models and volumes below
        console.rule("shared backend: 2 replicas of every stateful service, 2 gateways")
        with running_suite() as suite:
            results = asyncio.run(measure(suite, args.rounds, args.load_seconds))
        console.rule("embedded backend: one risk pod")
        results["risk_embedded"] = embedded_risk(work / "embedded", args.load_seconds)
    for backend in ("shared", "embedded"):
        figures = results[f"risk_{backend}"]
        results[f"score_server_p99_ms_{backend}"] = figures["server"].get("p99_ms_estimate")
        # Exact (5 ms is a bucket edge of the runtime's histogram): the goal holds iff this is >= 0.99.
        results[f"score_server_within_5ms_share_{backend}"] = figures["server"].get("within_5ms_share")
        results[f"score_client_p99_ms_{backend}"] = figures["client"]["client_p99_ms"]
    results["replicas"] = {"recommender": 2, "chat": 2, "sentiment": 2, "vision": 2, "risk": 2, "gateway": 2}
    results["goals"] = GOALS
    results["seconds"] = round(time.time() - started, 1)
    chart(results, RESULTS / "scaleout.png")
    path = write_results("scaleout", results)
    console.print(f"wrote {path}")
    for key in (
        *GOALS,
        "acknowledged_writes",
        "score_server_p99_ms_shared",
        "score_server_p99_ms_embedded",
        "score_server_within_5ms_share_shared",
        "score_server_within_5ms_share_embedded",
    ):
        if key not in results:
            continue
        console.print(f"{key}: {results[key]}")


if __name__ == "__main__":
    main()
