"""The suite as the chart runs it with replicas on shared stores, and the checks of issue 14's "replicas
that agree": used by the harness test (tests/deploy/test_scaleout.py) and the benchmark
(bench/scaleout.py), so both measure the same thing.

Writes go through the gateways (the HTTP bridge, with a real API key) where the bridge carries the
call, and to one replica's gRPC port where a per-replica path is the point; what is visible is always
read from every other replica directly, since a read through a load balancer could land on the writer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc
from cbec.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from cbec.sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc
from google.protobuf import timestamp_pb2

from tests.deploy.chart_run import ChartCluster, Pod, prepare_models_dir
from tests.deploy.conftest import helm_template
from tests.deploy.tiny_models import build_all
from tests.stores import PG_PASSWORD, REDIS_PASSWORD, PostgresServer, RedisServer, remove_tree_later

STATEFUL = ("recommender", "chat", "sentiment", "vision", "risk")
# The limited key's bucket: small enough that two gateways with per-replica buckets would allow twice it.
LIMITED_RATE, LIMITED_BURST = 5.0, 10.0


@dataclass
class Keys:
    shop: str
    limited: str

    def document(self) -> str:
        def entry(key_id: str, key: str, rate: float, burst: float) -> dict[str, Any]:
            digest = hashlib.sha256(key.encode()).hexdigest()
            return {"id": key_id, "sha256": digest, "scopes": ["*"], "rate_per_s": rate, "burst": burst}

        return json.dumps(
            {
                "keys": [
                    entry("shop", self.shop, 100_000, 100_000),
                    entry("limited", self.limited, LIMITED_RATE, LIMITED_BURST),
                ]
            }
        )


def scaleout_values(pg: PostgresServer, pg_url: str, redis: RedisServer, replicas: int = 2) -> dict[str, Any]:
    """Test values: `replicas` of every stateful service and of the gateway, external stores (the
    fixture servers), credentials from Secrets, chat without an LLM (answers from articles)."""
    services: dict[str, Any] = {
        name: {"replicas": replicas, "preStopSleepSeconds": 0, "gracePeriodSeconds": 5} for name in STATEFUL
    }
    services["gateway"] = {
        "replicas": replicas,
        "preStopSleepSeconds": 0,
        "gracePeriodSeconds": 5,
        "env": {"CBEC_GATEWAY_ENV": "prod"},
        "secretEnv": [
            {"name": "CBEC_GATEWAY_API_KEYS_SHA256", "secretName": "cbec-gateway-keys", "key": "keys"}
        ],
    }
    # Chat without an LLM; its anger check may take longer than 0.3 s here (every pod on 2 cores).
    services["chat"]["env"] = {"CBEC_CHAT_LLM_BACKEND": "none", "CBEC_CHAT_SENTIMENT_TIMEOUT_S": 2}
    # A training Job for risk (small and fast here), and serving pods that look for new versions often.
    services["risk"]["training"] = {
        "enabled": True,
        "args": ["--limit", "4000", "--trees", "30", "--no-plots"],
    }
    services["risk"]["modelPollSeconds"] = 1
    return {
        "state": {
            "backend": "shared",
            "postgres": {
                "bundled": {"enabled": False},
                "external": {"url": pg_url, "existingSecret": "cbec-db", "passwordKey": "password"},
            },
            "redis": {
                "bundled": {"enabled": False},
                "external": {"url": redis.url, "existingSecret": "cbec-redis", "passwordKey": "password"},
            },
        },
        "services": services,
    }


@contextlib.contextmanager
def running_suite(replicas: int = 2, startup_timeout: float = 300.0) -> Iterator[Suite]:
    """Stores from the distribution's packages, tiny models, the rendered chart started as processes.

    Everything lives in a fresh folder under the system temp dir that the pod user can traverse
    (pytest's own temp root is private to the user running the tests)."""
    work = Path(tempfile.mkdtemp(prefix="cbec-cluster-"))
    work.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(remove_tree_later, work)
        yield cleanup.enter_context(_suite(work, replicas, startup_timeout))


@contextlib.contextmanager
def _suite(work: Path, replicas: int, startup_timeout: float) -> Iterator[Suite]:
    with PostgresServer() as pg, RedisServer() as redis:
        pg_url = pg.create_database("cbec_scaleout")
        models = work / "models"
        build_all(models, work / "model-work")
        prepare_models_dir(models)
        keys = Keys(shop=secrets.token_urlsafe(32), limited=secrets.token_urlsafe(32))
        rendered = helm_template(scaleout_values(pg, pg_url, redis, replicas))
        secret_values = {
            ("cbec-db", "password"): PG_PASSWORD,
            ("cbec-redis", "password"): REDIS_PASSWORD,
            ("cbec-gateway-keys", "keys"): keys.document(),
        }
        cluster = ChartCluster(rendered.docs, secret_values, work / "pods", models)
        with cluster.running(timeout=startup_timeout):
            yield Suite(cluster, keys, pg, pg_url, redis)


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, period: float = 0.02
) -> float:
    """Seconds until ``check()`` first holds; raises TimeoutError after ``timeout``."""
    start = time.perf_counter()
    while True:
        if await check():
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"not true after {timeout}s")
        await asyncio.sleep(period)


@dataclass
class Suite:
    cluster: ChartCluster
    keys: Keys
    pg: PostgresServer
    pg_url: str
    redis: RedisServer
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    # --- plumbing ---------------------------------------------------------------------------------------
    def pods(self, component: str) -> list[Pod]:
        return self.cluster.of(component)

    def channel(self, pod: Pod) -> grpc.aio.Channel:
        """A channel to one pod, per event loop (each test has its own loop), as the gateway calls it:
        mutual TLS with the gateway's certificate and the internal token (ChartCluster.channel)."""
        key = f"{pod.name}/{id(asyncio.get_running_loop())}"
        if key not in self._channels:
            self._channels[key] = self.cluster.channel(pod)
        return self._channels[key]

    def as_user(self, user: str) -> tuple[tuple[str, str], ...]:
        """Call metadata of a trusted caller acting for ``user`` (what the gateway sends for a shopper)."""
        return self.cluster.identity(user)

    async def close(self) -> None:
        """Close this loop's channels."""
        suffix = f"/{id(asyncio.get_running_loop())}"
        for key in [k for k in self._channels if k.endswith(suffix)]:
            await self._channels.pop(key).close()

    def gateway_urls(self) -> list[str]:
        return [f"http://{p.ip}:{p.ports['http']}" for p in self.pods("gateway")]

    @contextlib.asynccontextmanager
    async def http(self) -> AsyncIterator[aiohttp.ClientSession]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield session

    async def post(
        self, session: aiohttp.ClientSession, gateway: int, path: str, body: Any, key: str | None = None
    ) -> tuple[int, Any]:
        url = self.gateway_urls()[gateway] + path
        async with session.post(url, json=body, headers={"x-api-key": key or self.keys.shop}) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except json.JSONDecodeError:
                return resp.status, text

    def stub(self, pod: Pod) -> Any:
        stubs = {
            "recommender": recommender_pb2_grpc.RecommenderServiceStub,
            "chat": chat_pb2_grpc.ChatServiceStub,
            "sentiment": sentiment_pb2_grpc.SentimentServiceStub,
            "vision": vision_pb2_grpc.VisionServiceStub,
            "risk": risk_pb2_grpc.RiskServiceStub,
        }
        return stubs[pod.component](self.channel(pod))

    # --- recommender: an interaction through one gateway changes what every replica serves ------------
    async def catalogue_items(self) -> list[str]:
        reply = await self.stub(self.pods("recommender")[0]).Recommend(
            recommender_pb2.RecommendRequest(user_id=f"probe-{uuid.uuid4().hex[:6]}", k=30), timeout=10
        )
        return [item.item_id for item in reply.items]

    async def recommender_effect(
        self, session: aiohttp.ClientSession, gateway: int, items: list[str]
    ) -> float:
        """Purchases of a new user through one gateway; seconds until every recommender replica stops
        recommending the purchased items (they are seen now) and serves a personal list."""
        user = f"rx-{uuid.uuid4().hex[:10]}"
        bought = items[:3]
        body = {
            "interactions": [
                {"userId": user, "itemId": item, "type": "INTERACTION_TYPE_PURCHASE", "occurredTime": _now()}
                for item in bought
            ]
        }
        status, reply = await self.post(session, gateway, "/v1/recommender/interactions", body)
        assert status == 200 and reply.get("acceptedCount") == len(bought), reply

        async def everywhere() -> bool:
            for pod in self.pods("recommender"):
                got = await self.stub(pod).Recommend(
                    recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=5
                )
                if not got.items or {i.item_id for i in got.items} & set(bought):
                    return False
            return True

        return await eventually(everywhere)

    # --- vision: a product indexed / removed through one replica, searchable / gone on every replica ----
    async def vision_effect(self, image: bytes, writer: int = 0) -> tuple[float, float]:
        pods = self.pods("vision")
        product = f"vx-{uuid.uuid4().hex[:10]}"

        async def requests() -> AsyncIterator[vision_pb2.IndexProductsRequest]:
            yield vision_pb2.IndexProductsRequest(
                product_id=product, image=image, category="shoes", market="DE"
            )

        reply = await self.stub(pods[writer]).IndexProducts(requests(), timeout=30)
        assert reply.indexed_count == 1, reply

        async def found(present: bool) -> bool:
            for pod in pods:
                got = await self.stub(pod).SearchByImage(
                    vision_pb2.SearchByImageRequest(image=image, k=5), timeout=10
                )
                if (product in {m.product_id for m in got.matches}) != present:
                    return False
            return True

        indexed = await eventually(lambda: found(True))
        other = pods[(writer + 1) % len(pods)]
        removed = await self.stub(other).RemoveProducts(
            vision_pb2.RemoveProductsRequest(product_ids=[product]), timeout=10
        )
        assert removed.removed_count == 1, removed
        gone = await eventually(lambda: found(False))
        return indexed, gone

    # --- sentiment: a review ingested through one gateway counts in every replica's report ------------
    async def sentiment_effect(self, session: aiohttp.ClientSession, gateway: int) -> float:
        product = f"sx-{uuid.uuid4().hex[:10]}"
        reviews = [
            {"reviewId": f"{product}-{i}", "productId": product, "category": "dresses", "market": "DE",
             "createdTime": _now(), "text": text, "rating": rating}
            for i, (text, rating) in enumerate([("Love it, fits perfectly", 5), ("Fell apart at once", 1)])
        ]  # fmt: skip
        status, reply = await self.post(session, gateway, "/v1/sentiment/reviews", {"reviews": reviews})
        assert status == 200 and reply.get("acceptedCount") == 2, reply

        async def everywhere() -> bool:
            for pod in self.pods("sentiment"):
                got = await self.stub(pod).GetMarketReport(
                    sentiment_pb2.GetMarketReportRequest(product_id=product), timeout=10
                )
                if got.distribution.total != 2:
                    return False
            return True

        return await eventually(everywhere)

    # --- chat: a turn on one replica is in the session on every other replica --------------------------
    async def chat_effect(self, writer: int = 0) -> float:
        pods = self.pods("chat")
        request = chat_pb2.ConverseRequest(
            user_id=f"ce-{uuid.uuid4().hex[:8]}", message="Do you ship to Spain?"
        )
        result = None
        who = self.as_user(request.user_id)
        async for chunk in self.stub(pods[writer]).Converse(request, timeout=30, metadata=who):
            if chunk.HasField("result"):
                result = chunk.result
        assert result is not None and result.session_id

        async def everywhere() -> bool:
            for pod in pods:
                got = await self.stub(pod).GetSession(
                    chat_pb2.GetSessionRequest(session_id=result.session_id), timeout=5, metadata=who
                )
                if len(got.session.turns) < 2:
                    return False
            return True

        return await eventually(everywhere)

    # --- chat: a session continues on any replica -----------------------------------------------------
    async def chat_continuity(self, turns: int = 4) -> int:
        """A session started through a gateway, continued alternately on each chat replica; returns how
        many turns failed to continue it (NOT_FOUND, a new session id, or a missing earlier turn)."""
        pods = self.pods("chat")
        user = f"cx-{uuid.uuid4().hex[:8]}"
        session_id = ""
        errors = 0
        for turn in range(turns):
            pod = pods[turn % len(pods)]
            request = chat_pb2.ConverseRequest(
                session_id=session_id, user_id=user, message="How long does shipping to Germany take?"
            )
            try:
                result = None
                async for chunk in self.stub(pod).Converse(request, timeout=30, metadata=self.as_user(user)):
                    if chunk.HasField("result"):
                        result = chunk.result
                assert result is not None
                if session_id and result.session_id != session_id:
                    errors += 1
                session_id = result.session_id
                other = pods[(turn + 1) % len(pods)]
                got = await self.stub(other).GetSession(
                    chat_pb2.GetSessionRequest(session_id=session_id), timeout=5, metadata=self.as_user(user)
                )
                customer_turns = [t for t in got.session.turns if t.role == chat_pb2.ROLE_CUSTOMER]
                if len(customer_turns) < min(turn + 1, 10):
                    errors += 1
            except grpc.aio.AioRpcError:
                errors += 1
        return errors

    # --- risk: every earlier transaction of the card, whichever replica scored it -------------------------
    def card_sequence(
        self, start: float, cards: int = 3, per_card: int = 8, isolated: bool = False
    ) -> list[risk_pb2.Transaction]:
        """Purchases of ``cards`` cards, interleaved in time from ``start``; with ``isolated`` every
        transaction has a card, account and device of its own (no history: the negative control)."""
        run = uuid.uuid4().hex[:8]
        txs = []
        for c in range(cards):
            for k in range(per_card):
                who = f"{c}-{k}" if isolated else f"{c}"
                tx = risk_pb2.Transaction(
                    transaction_id=f"rk-{run}-{c}-{k}",
                    user_id=f"ru-{run}-{who}",
                    card_fingerprint=f"rc-{run}-{who}",
                    device_id=f"rd-{run}-{who if isolated else c % 2}",
                    ip_country="BR" if k % 3 == 0 else "DE",
                    billing_country="DE",
                    shipping_country="DE",
                    amount=20.0 + 13 * k,
                    currency="EUR",
                    payment_method="card",
                )
                tx.occurred_time.CopyFrom(ts(start + 60 * (k * cards + c)))
                tx.account_created_time.CopyFrom(ts(start - 86400 * 30))
                txs.append(tx)
        txs.sort(key=lambda t: t.occurred_time.ToNanoseconds())
        return txs

    async def velocity_mismatches(self, cards: int = 3, per_card: int = 6) -> tuple[int, int]:
        """Score card sequences alternating over the risk replicas, and the same sequence (new ids) all
        on one replica; returns (transactions whose scores differ, transactions whose scores differ
        from the isolated negative control). The first must be 0; the second > 0 shows that history
        changes scores at all, so equality means both replicas saw the same history."""
        pods = self.pods("risk")
        start = time.time() - 3600
        alternating = await self.risk_scores(self.card_sequence(start, cards, per_card), pods)
        single = await self.risk_scores(self.card_sequence(start, cards, per_card), pods[:1])
        isolated = await self.risk_scores(self.card_sequence(start, cards, per_card, isolated=True), pods[:1])

        def differ(a: tuple[float, float], b: tuple[float, float]) -> bool:
            return abs(a[0] - b[0]) > 1e-9 or abs(a[1] - b[1]) > 1e-9

        mismatches = sum(differ(a, b) for a, b in zip(alternating, single, strict=True))
        history_effect = sum(differ(a, b) for a, b in zip(single, isolated, strict=True))
        return mismatches, history_effect

    async def risk_scores(
        self, txs: list[risk_pb2.Transaction], pods: list[Pod]
    ) -> list[tuple[float, float]]:
        """Score in order, alternating over ``pods``; (fraud probability, anomaly score) per transaction."""
        out = []
        for i, tx in enumerate(txs):
            reply = await self.stub(pods[i % len(pods)]).ScoreTransaction(
                risk_pb2.ScoreTransactionRequest(transaction=tx), timeout=10
            )
            out.append((reply.assessment.fraud_probability, reply.assessment.anomaly_score))
        return out

    # --- the gateway's global rate limit --------------------------------------------------------------
    async def rate_limit_excess(self, seconds: float = 3.0, concurrency: int = 8) -> tuple[int, float]:
        """Hammer both gateways with the limited key; (allowed, allowed / what the limit permits)."""
        allowed = 0
        stop = time.perf_counter() + seconds
        start = time.perf_counter()

        async def worker(gateway: int, session: aiohttp.ClientSession) -> None:
            nonlocal allowed
            while time.perf_counter() < stop:
                status, _ = await self.post(
                    session, gateway, "/v1/recommender/recommend", {"userId": "rl", "k": 1}, self.keys.limited
                )
                if status == 200:
                    allowed += 1
                elif status != 429:
                    raise AssertionError(f"unexpected HTTP {status}")

        async with self.http() as session:
            await asyncio.gather(
                *(
                    worker(i % len(self.gateway_urls()), session)
                    for i in range(concurrency * len(self.gateway_urls()))
                )
            )
        elapsed = time.perf_counter() - start
        permitted = LIMITED_BURST + LIMITED_RATE * elapsed
        return allowed, allowed / permitted

    # --- kill -9 under load: nothing acknowledged is lost ----------------------------------------------
    async def kill9_under_load(self, seconds: float = 12.0, kill_at: float = 4.0) -> dict[str, Any]:
        """Writers of every durable kind run for ``seconds``; at ``kill_at`` one replica of each stateful
        service is killed with SIGKILL and restarted (what the kubelet does). Returns per kind how many
        writes were acknowledged and how many of those the system of record does not hold."""
        run = uuid.uuid4().hex[:8]
        acked: dict[str, set[str]] = {k: set() for k in STATEFUL}
        attempted: dict[str, int] = dict.fromkeys(STATEFUL, 0)
        image = png(11)
        item = (await self.catalogue_items())[0]
        stop_at = time.perf_counter() + seconds

        async def writer(kind: str, step: Callable[[int], Awaitable[str | None]]) -> None:
            n = 0
            while time.perf_counter() < stop_at:
                n += 1
                attempted[kind] += 1
                try:
                    done = await step(n)
                except (TimeoutError, grpc.aio.AioRpcError, aiohttp.ClientError, AssertionError):
                    done = None
                if done is not None:
                    acked[kind].add(done)
                else:
                    await asyncio.sleep(0.05)

        async with self.http() as session:

            async def interaction(n: int) -> str | None:
                user = f"kl-{run}-{n}"
                event = {"userId": user, "itemId": item, "type": "INTERACTION_TYPE_VIEW"}
                body = {"interactions": [{**event, "occurredTime": _now()}]}
                status, reply = await self.post(session, n % 2, "/v1/recommender/interactions", body)
                return user if status == 200 and reply.get("acceptedCount") == 1 else None

            async def review(n: int) -> str | None:
                rid = f"kl-{run}-{n}"
                text = {"text": "Solid and well made", "rating": 4, "createdTime": _now()}
                body = {"reviews": [{"reviewId": rid, "productId": f"kl-{run}", "market": "DE", **text}]}
                status, reply = await self.post(session, n % 2, "/v1/sentiment/reviews", body)
                return rid if status == 200 and reply.get("acceptedCount") == 1 else None

            async def outcome(n: int) -> str | None:
                tx = f"kl-{run}-{n}"
                body = {"transactionId": tx, "outcome": "OUTCOME_LEGITIMATE", "reportedTime": _now()}
                status, _ = await self.post(session, n % 2, "/v1/risk/outcomes", body)
                return tx if status == 200 else None

            async def product(n: int) -> str | None:
                pid = f"kl-{run}-{n}"

                async def one() -> AsyncIterator[vision_pb2.IndexProductsRequest]:
                    yield vision_pb2.IndexProductsRequest(product_id=pid, image=image, category="shoes")

                pods = self.pods("vision")
                reply = await self.stub(pods[n % len(pods)]).IndexProducts(one(), timeout=10)
                return pid if reply.indexed_count == 1 else None

            async def turn(n: int) -> str | None:
                pods = self.pods("chat")
                request = chat_pb2.ConverseRequest(user_id=f"kl-{run}", message="Where is my parcel?")
                session_id = None
                who = self.as_user(request.user_id)
                async for chunk in self.stub(pods[n % len(pods)]).Converse(request, timeout=10, metadata=who):
                    if chunk.HasField("result"):
                        session_id = chunk.result.session_id
                return session_id

            async def killer() -> None:
                await asyncio.sleep(kill_at)
                victims = [self.pods(kind)[0] for kind in STATEFUL]
                for pod in victims:
                    self.cluster.kill9(pod)
                await asyncio.sleep(0.5)
                for pod in victims:
                    self.cluster.restart(pod)

            steps = {"recommender": interaction, "sentiment": review, "risk": outcome, "vision": product,
                     "chat": turn}  # fmt: skip
            await asyncio.gather(killer(), *(writer(kind, step) for kind, step in steps.items()))
        await asyncio.to_thread(self.cluster.wait_serving, [self.pods(k)[0] for k in STATEFUL])
        stored = await asyncio.to_thread(self._stored, run)
        return {
            kind: {
                "attempted": attempted[kind],
                "acknowledged": len(acked[kind]),
                "lost": len(acked[kind] - stored[kind]),
            }
            for kind in STATEFUL
        }

    def _stored(self, run: str) -> dict[str, set[str]]:
        """What the system of record (PostgreSQL) holds of this run, per kind."""
        import psycopg

        like = f"kl-{run}-%"
        queries = {
            "recommender": ("SELECT DISTINCT user_id FROM recommender_events WHERE user_id LIKE %s", like),
            "sentiment": ("SELECT review_id FROM sentiment_reviews WHERE review_id LIKE %s", like),
            "risk": ("SELECT tx_id FROM risk_outcomes WHERE tx_id LIKE %s", like),
            "vision": ("SELECT product_id FROM vision_products WHERE product_id LIKE %s", like),
            "chat": ("SELECT DISTINCT session_id FROM chat_transcripts WHERE user_id = %s", f"kl-{run}"),
        }
        out: dict[str, set[str]] = {}
        with psycopg.connect(self.pg_url, password=PG_PASSWORD) as conn:
            for kind, (sql, arg) in queries.items():
                out[kind] = {row[0] for row in conn.execute(sql, (arg,))}
        return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def png(seed: int) -> bytes:
    from tests.vision import imagegen

    shape = imagegen.SHAPES[seed % len(imagegen.SHAPES)]
    colour = list(imagegen.COLOURS)[seed % len(imagegen.COLOURS)]
    return imagegen.encode(imagegen.draw(shape, colour, seed=seed))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def running_embedded(startup_timeout: float = 300.0) -> Iterator[Suite]:
    """The chart with ``state.backend=embedded``: one pod per service, SQLite on each pod's volume, no
    database server; for the "keeps its state across a pod restart" check."""
    work = Path(tempfile.mkdtemp(prefix="cbec-embedded-"))
    work.chmod(0o755)
    try:
        models = work / "models"
        build_all(models, work / "model-work")
        prepare_models_dir(models)
        keys = Keys(shop=secrets.token_urlsafe(32), limited=secrets.token_urlsafe(32))
        gateway = {"env": {"CBEC_GATEWAY_ENV": "prod"}, "preStopSleepSeconds": 0, "gracePeriodSeconds": 5}
        gateway["secretEnv"] = [
            {"name": "CBEC_GATEWAY_API_KEYS_SHA256", "secretName": "cbec-gateway-keys", "key": "keys"}
        ]
        values = {
            "state": {"backend": "embedded"},
            "services": {
                **{name: {"preStopSleepSeconds": 0, "gracePeriodSeconds": 5} for name in STATEFUL},
                "chat": {"env": {"CBEC_CHAT_LLM_BACKEND": "none"}, "preStopSleepSeconds": 0},
                "gateway": gateway,
            },
        }
        rendered = helm_template(values)
        cluster = ChartCluster(
            rendered.docs, {("cbec-gateway-keys", "keys"): keys.document()}, work / "pods", models
        )
        with cluster.running(timeout=startup_timeout):
            yield Suite(cluster, keys, None, "", None)  # type: ignore[arg-type]
    finally:
        remove_tree_later(work)
