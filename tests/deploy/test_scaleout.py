"""Issue 14's cluster on one machine: the chart's rendered pods run as processes (2 replicas of every
stateful service, 2 gateways) on real PostgreSQL and Redis, and the replicas must agree; every call
between pods is mutual TLS with the chart's certificates and carries its internal token.

See tests/deploy/chart_run.py for what is executed as rendered and what a single host substitutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cbec.risk.v1 import risk_pb2_grpc

from tests.deploy.chart_run import ROOT, Pod, writable_by_pod_user
from tests.deploy.scaleout import STATEFUL, Suite, eventually, png, running_embedded, running_suite

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    with running_suite() as running:
        yield running


@pytest.fixture
async def s(suite: Suite) -> AsyncIterator[Suite]:
    yield suite
    await suite.close()


def test_pods_run_as_the_chart_says(suite: Suite) -> None:
    """Every pod: non-root, the code directory not writable, state only on the pod's volumes."""
    assert not writable_by_pod_user(ROOT), "the pod user can write the code directory"
    assert len(suite.pods("gateway")) == 2
    for name in STATEFUL:
        pods = suite.pods(name)
        assert len(pods) == 2, name
        for pod in pods:
            assert pod.alive, pod.log_tail()
            assert pod.env["CBEC_STATE_BACKEND"] == "shared"
            state_dir = Path(pod.env["CBEC_STATE_DIR"])
            assert pod.pod_dir in state_dir.parents, state_dir
            assert "CBEC_DATABASE_PASSWORD" in pod.env and pod.env["CBEC_DATABASE_URL"].startswith(
                "postgresql://"
            )
    chat = suite.pods("chat")[0]
    sentiment = suite.pods("sentiment")
    target = chat.env["CBEC_CHAT_SENTIMENT_ADDR"]  # the Service's name, resolved by the harness's DNS
    assert target == f"dns://{suite.cluster.dns.address}/{sentiment[0].service_host}:50053", target
    assert set(suite.cluster.dns.table[sentiment[0].service_host]) == {p.ip for p in sentiment}
    # Certificates and the token: files of the pod's read-only Secret volumes, as the kubelet writes them.
    for pod in [p for p in suite.cluster.pods if p.component != "gateway"]:
        for var in (
            "CBEC_TLS_CERT_FILE",
            "CBEC_TLS_KEY_FILE",
            "CBEC_TLS_CLIENT_CA_FILE",
            "CBEC_INTERNAL_TOKEN_FILE",
        ):
            path = Path(pod.env[var])
            assert path.is_file() and pod.pod_dir in path.parents, (pod.name, var, path)
            assert not writable_by_pod_user(path.parent), (pod.name, path)
    for pod in suite.pods("gateway") + suite.pods("chat"):
        assert Path(pod.env["CBEC_BACKEND_TLS_CERT_FILE"]).is_file(), pod.name
    assert not list(ROOT.glob("var/**/*.sqlite3*")) or all(
        p.stat().st_uid != 10001 for p in ROOT.glob("var/**/*")
    ), "a pod wrote under the code directory"


async def test_services_demand_the_client_certificate_and_the_internal_token(s: Suite) -> None:
    """Each service's port is mutual TLS with the rendered certificate: a caller needs a client
    certificate of the chart's CA, and then the internal token."""
    from cbec.risk.v1 import risk_pb2

    (risk, *_) = s.pods("risk")
    files = s.cluster.workload_secret("gateway", "tls")
    request = risk_pb2.ScoreTransactionRequest(transaction=s.card_sequence(time.time(), 1, 1)[0])
    options = [("grpc.ssl_target_name_override", risk.service_host)]
    server_only = grpc.ssl_channel_credentials(files["ca.crt"].encode())
    async with grpc.aio.secure_channel(risk.address(), server_only, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # no client certificate: no handshake
            await risk_pb2_grpc.RiskServiceStub(channel).ScoreTransaction(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(risk.address()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # plaintext
            await risk_pb2_grpc.RiskServiceStub(channel).ScoreTransaction(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    mutual = grpc.ssl_channel_credentials(
        files["ca.crt"].encode(), files["tls.key"].encode(), files["tls.crt"].encode()
    )
    async with grpc.aio.secure_channel(risk.address(), mutual, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the gateway's certificate, no token
            await risk_pb2_grpc.RiskServiceStub(channel).ScoreTransaction(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = await s.stub(risk).ScoreTransaction(request, timeout=10)  # certificate and token
    assert 0 <= reply.assessment.fraud_probability <= 1


async def test_chat_asks_sentiment_over_mutual_tls(s: Suite) -> None:
    """Chat's anger check reaches the sentiment pods with its own certificate and the token. Chat falls
    back to a local heuristic when it cannot (and then waits before asking again), so only the
    sentiment pods' counters can tell: calls that passed the handshake, none refused for credentials."""
    from cbec.chat.v1 import chat_pb2
    from prometheus_client.parser import text_string_to_metric_families

    async def analyze_calls(session: aiohttp.ClientSession) -> tuple[float, set[str]]:
        started, codes = 0.0, set()
        for pod in s.pods("sentiment"):
            async with session.get(f"http://{pod.address('metrics')}/metrics") as reply:
                text = await reply.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.labels.get("grpc_method") != "Analyze":
                        continue
                    if sample.name == "grpc_server_started_total":
                        started += sample.value
                    elif sample.name == "grpc_server_handled_total" and sample.value:
                        codes.add(sample.labels["grpc_code"])
        return started, codes

    async with s.http() as session:
        for chat in s.pods("chat"):
            before, _ = await analyze_calls(session)

            async def asked(chat: Pod = chat, before: float = before) -> bool:
                user = f"mood-{uuid.uuid4().hex[:8]}"
                request = chat_pb2.ConverseRequest(
                    user_id=user, message="This is the worst, a terrible scam!"
                )
                async for _ in s.stub(chat).Converse(request, timeout=30, metadata=s.as_user(user)):
                    pass
                return (await analyze_calls(session))[0] > before

            await eventually(asked, timeout=60, period=1.0)  # past chat's back-off after a slow call
        _, codes = await analyze_calls(session)
        assert not codes & {"UNAUTHENTICATED", "PERMISSION_DENIED"}, codes


async def test_an_interaction_changes_every_replicas_recommendations(s: Suite) -> None:
    items = await s.catalogue_items()
    async with s.http() as session:
        for gateway in (0, 1):
            delay = await s.recommender_effect(session, gateway, items)
            assert delay < 10


async def test_a_product_indexed_on_one_replica_is_searchable_on_every_replica(s: Suite) -> None:
    for writer in (0, 1):
        indexed, removed = await s.vision_effect(png(100 + writer), writer)
        assert indexed < 10 and removed < 10


async def test_a_review_counts_in_every_replicas_report(s: Suite) -> None:
    async with s.http() as session:
        for gateway in (0, 1):
            assert await s.sentiment_effect(session, gateway) < 10


async def test_a_chat_session_continues_on_any_replica(s: Suite) -> None:
    assert await s.chat_continuity(turns=4) == 0


async def test_risk_sees_every_earlier_transaction_whichever_replica_scored_it(s: Suite) -> None:
    """Scores alternating over the two replicas equal scores of the same sequence on one replica, and
    differ from the same purchases without history: both replicas saw the card's whole history."""
    mismatches, history_effect = await s.velocity_mismatches(cards=3, per_card=6)
    assert history_effect > 0, "history does not change any score: the check would prove nothing"
    assert mismatches == 0


async def test_the_rate_limit_holds_across_gateways(s: Suite) -> None:
    allowed, ratio = await s.rate_limit_excess(seconds=3.0)
    assert allowed > 0
    assert ratio <= 1.1, f"{allowed} calls allowed across 2 gateways, {ratio:.2f}x the limit"


async def test_nothing_acknowledged_is_lost_when_a_replica_is_killed(s: Suite) -> None:
    report = await s.kill9_under_load(seconds=10.0, kill_at=3.0)
    for kind, counts in report.items():
        assert counts["acknowledged"] > 0, (kind, counts)
        assert counts["lost"] == 0, (kind, counts)
    await asyncio.sleep(0)


async def test_a_training_job_reads_the_shared_store_and_every_replica_picks_up_its_version(s: Suite) -> None:
    """The chart's risk training Job, run as rendered: it reads the outcome labels from the shared
    PostgreSQL, writes a new version to the models volume, and both serving pods load it (model
    polling) without a restart. Last in this module: the other checks need one model on both pods."""
    from cbec.common.v1 import common_pb2, common_pb2_grpc

    (job,) = [d["metadata"]["name"] for d in s.cluster.docs if d["kind"] == "Job"]
    async with s.http() as session:  # a scored transaction and its label, for the Job to read
        (tx,) = s.card_sequence(time.time() - 600, cards=1, per_card=1)
        tx_json = {
            "transactionId": tx.transaction_id,
            "userId": tx.user_id,
            "cardFingerprint": tx.card_fingerprint,
            "amount": tx.amount,
            "currency": tx.currency,
            "occurredTime": tx.occurred_time.ToJsonString(),
            **{key: "DE" for key in ("billingCountry", "shippingCountry", "ipCountry")},
        }
        assert (await s.post(session, 0, "/v1/risk/score", {"transaction": tx_json}))[0] == 200
        body = {"transactionId": tx.transaction_id, "outcome": "OUTCOME_CHARGEBACK"}
        assert (await s.post(session, 1, "/v1/risk/outcomes", body))[0] == 200
    pods = s.pods("risk")
    before = {p.name: p.restarts for p in pods}
    code, log = await asyncio.to_thread(s.cluster.run_job, job)
    assert code == 0, log
    newest = max(v.name for v in (s.cluster.models_dir / "risk").iterdir() if (v / "manifest.json").exists())
    manifest = json.loads((s.cluster.models_dir / "risk" / newest / "manifest.json").read_text())
    assert manifest["metrics"]["outcomes_labelled"] >= 1, manifest["metrics"]

    async def serving_newest() -> bool:
        for pod in pods:
            admin = common_pb2_grpc.ModelAdminServiceStub(s.channel(pod))
            status = await admin.GetModelStatus(common_pb2.GetModelStatusRequest(), timeout=5)
            if status.serving.version != newest:
                return False
        return True

    await eventually(serving_newest, timeout=30)
    assert {p.name: p.restarts for p in pods} == before and all(p.alive for p in pods)


def test_embedded_state_survives_a_pod_restart() -> None:
    """state.backend=embedded: each stateful pod keeps its SQLite state on its own volume across a
    kill -9 and restart, under the chart's security context, with no database server at all."""
    with running_embedded() as suite:
        asyncio.run(_embedded_round_trip(suite))


async def _embedded_round_trip(suite: Suite) -> None:
    from cbec.chat.v1 import chat_pb2
    from cbec.recommender.v1 import recommender_pb2
    from cbec.sentiment.v1 import sentiment_pb2
    from cbec.vision.v1 import vision_pb2

    try:
        for name in STATEFUL:
            (pod,) = suite.pods(name)
            assert pod.env["CBEC_STATE_BACKEND"] == "embedded" and "CBEC_DATABASE_URL" not in pod.env
        items = await suite.catalogue_items()
        async with suite.http() as session:
            user = "restart-user"
            body = {
                "interactions": [{"userId": user, "itemId": items[0], "type": "INTERACTION_TYPE_PURCHASE"}]
            }
            status, reply = await suite.post(session, 0, "/v1/recommender/interactions", body)
            assert status == 200 and reply.get("acceptedCount") == 1, reply
            review = {"reviewId": "restart-r1", "productId": "restart-p", "market": "DE", "text": "Great fit"}
            review["createdTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            status, reply = await suite.post(session, 0, "/v1/sentiment/reviews", {"reviews": [review]})
            assert status == 200 and reply.get("acceptedCount") == 1, reply
            outcome = {"transactionId": "restart-t1", "outcome": "OUTCOME_LEGITIMATE"}
            status, _ = await suite.post(session, 0, "/v1/risk/outcomes", outcome)
            assert status == 200
        image = png(7)

        async def one() -> AsyncIterator[vision_pb2.IndexProductsRequest]:
            yield vision_pb2.IndexProductsRequest(product_id="restart-v1", image=image)

        (vision,) = suite.pods("vision")
        assert (await suite.stub(vision).IndexProducts(one(), timeout=30)).indexed_count == 1
        (chat,) = suite.pods("chat")
        session_id = ""
        who = suite.as_user("restart-user")
        async for chunk in suite.stub(chat).Converse(
            chat_pb2.ConverseRequest(user_id="restart-user", message="Do you ship to Spain?"),
            timeout=30,
            metadata=who,
        ):
            if chunk.HasField("result"):
                session_id = chunk.result.session_id
        (sent,) = suite.pods("sentiment")
        request = sentiment_pb2.GetMarketReportRequest(product_id="restart-p")
        assert (await suite.stub(sent).GetMarketReport(request, timeout=10)).distribution.total == 1
        await suite.close()

        pods = [suite.pods(name)[0] for name in STATEFUL]
        for pod in pods:
            suite.cluster.restart(pod)  # kill -9, then the same command on the same volume
        await asyncio.to_thread(suite.cluster.wait_serving, pods)

        (rec,) = suite.pods("recommender")
        forgotten = await suite.stub(rec).ForgetUser(
            recommender_pb2.ForgetUserRequest(user_id=user), timeout=10
        )
        assert forgotten.events_deleted == 1
        report = await suite.stub(sent).GetMarketReport(request, timeout=10)
        assert report.distribution.total == 1
        found = await suite.stub(vision).SearchByImage(
            vision_pb2.SearchByImageRequest(image=image, k=3), timeout=10
        )
        assert "restart-v1" in {m.product_id for m in found.matches}
        got = await suite.stub(chat).GetSession(
            chat_pb2.GetSessionRequest(session_id=session_id), timeout=10, metadata=who
        )
        assert len(got.session.turns) >= 2
        (risk,) = suite.pods("risk")
        state_files = await asyncio.to_thread(os.listdir, risk.env["CBEC_STATE_DIR"])
        assert "risk.sqlite3" in state_files, state_files
    finally:
        await suite.close()
