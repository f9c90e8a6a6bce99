"""One trace per request, end to end: the gateway and the real recommender, vision, sentiment and chat
services (small real model versions, ``tests/deploy/tiny_models.py``), each with tracing on at sample
ratio 1 and exporting with its real OTLP exporter to a real OTLP/gRPC receiver (``tests/otlp.py``).

An HTTP request through the bridge with a ``traceparent`` header yields one trace: the bridge's SERVER
span (child of the caller's span), the gateway's CLIENT span per backend call, and each backend's SERVER
span under it; a chat message adds chat's anger check, chat -> sentiment.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cbec.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from PIL import Image

from gateway.service import Gateway
from services.runtime.server import Server
from tests.gateway.conftest import FULL_KEY, gateway_settings
from tests.otlp import CLIENT, SERVER, Received, Receiver, otlp_receiver
from tests.support import local_settings, with_token

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
SERVICES = ("recommender", "vision", "sentiment", "chat")
USER = "U000001"  # a shopper of the tiny recommender's synthetic shop
ANGRY = "This is a scam, the worst shop ever!! Where is my refund??"


@dataclass(frozen=True)
class Built:
    models_dir: Path
    work: Path
    chat_state: Path
    item_ids: list[str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Small real model versions of the four services, and chat's knowledge (three English articles)."""
    import pandas as pd

    from services.chat.knowledge import Embedder, embed_missing, packaged_articles
    from services.chat.store import ChatStore
    from services.runtime.state import StateConfig
    from tests.deploy.tiny_models import build_all

    root = tmp_path_factory.mktemp("traced-suite")
    models, work = root / "models", root / "work"
    build_all(models, work, skip=frozenset({"risk"}))
    wanted = ("shipping-times", "returns-refunds", "order-tracking")
    articles = [a for a in packaged_articles() if a.article_id in wanted and a.language == "en"]
    embed_missing(articles, Embedder())
    store = ChatStore.open(StateConfig(state_dir=root / "chat-state"))
    try:
        store.upsert_articles(articles)
    finally:
        store.close()
    items = pd.read_parquet(work / "items.parquet")["item_id"].tolist()
    return Built(models, work, root / "chat-state", items)


@dataclass
class Suite:
    receiver: Receiver
    servers: dict[str, Server]
    http: aiohttp.ClientSession

    async def flush(self) -> None:
        """Export every service's finished spans now, off the loop (the receiver answers on it)."""
        for server in self.servers.values():
            await asyncio.to_thread(server.tracing.force_flush)


@pytest.fixture
async def suite(built: Built, tmp_path: Path, keys_file: Path, jwt_secret_file: Path) -> AsyncIterator[Suite]:
    from services.chat.config import ChatSettings
    from services.chat.server import ChatService
    from services.recommender.server import RecommenderService
    from services.recommender.settings import RecommenderSettings
    from services.sentiment.config import SentimentSettings
    from services.sentiment.server import SentimentService
    from services.vision.config import VisionSettings
    from services.vision.server import VisionService

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / f"{built.item_ids[0]}.png")
    async with otlp_receiver() as receiver:
        tracing = {"trace_otlp_endpoint": receiver.endpoint, "trace_sample_ratio": 1.0}

        def settings(cls: Any, service: str, **fields: Any) -> Any:
            return with_token(
                local_settings(
                    cls,
                    built.models_dir,
                    service=service,
                    state_dir=tmp_path / service,
                    batch_max_delay_ms=1,
                    **tracing,
                    **fields,
                )
            )

        servers: dict[str, Server] = {}
        try:
            servers["sentiment"] = Server(settings(SentimentSettings, "sentiment"), SentimentService)
            servers["recommender"] = Server(
                settings(
                    RecommenderSettings, "recommender", embeddings_cache=built.work / "embeddings.sqlite3"
                ),
                RecommenderService,
            )
            servers["vision"] = Server(
                settings(VisionSettings, "vision", vision_data_dir=tmp_path / "vision-data"), VisionService
            )
            for name in ("sentiment", "recommender", "vision"):
                await servers[name].start()
            address = f"127.0.0.1:{servers['sentiment'].grpc_port}"
            chat = settings(ChatSettings, "chat", llm_backend="none", sentiment_addr=address)
            servers["chat"] = Server(chat.model_copy(update={"state_dir": built.chat_state}), ChatService)
            await servers["chat"].start()
            gateway = gateway_settings(
                {name: servers[name] for name in SERVICES},
                built.models_dir,
                keys_file,
                jwt_secret_file,
                product_images_dir=images,
                **tracing,
            )
            servers["gateway"] = Server(gateway, Gateway)
            await servers["gateway"].start()
            url = f"http://127.0.0.1:{servers['gateway'].service.http_port}"  # type: ignore[attr-defined]
            async with aiohttp.ClientSession(base_url=url, headers={"x-api-key": FULL_KEY}) as http:
                yield Suite(receiver, servers, http)
        finally:
            for server in reversed(servers.values()):
                await server.stop(grace=0.5)


def by_name(spans: list[Received], service: str, name: str, kind: int) -> Received:
    found = [s for s in spans if s.service == service and s.name == name and s.kind == kind]
    assert len(found) == 1, (service, name, sorted((s.service, s.name) for s in spans))
    return found[0]


async def test_a_product_page_is_one_trace_across_the_gateway_and_every_backend_it_called(
    suite: Suite, built: Built
) -> None:
    traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    body = {"productId": built.item_ids[0], "userId": USER, "k": 3}
    async with suite.http.post(
        "/v1/gateway/product-page", json=body, headers={"traceparent": traceparent}
    ) as r:
        assert r.status == 200, await r.text()
        page = await r.json()
        returned = r.headers["traceparent"]
    assert not page.get("missingParts"), page["missingParts"]
    calls = {
        "recommender": (
            "cbec.recommender.v1.RecommenderService/SimilarItems",
            "cbec.recommender.v1.RecommenderService/Recommend",
        ),
        "vision": ("cbec.vision.v1.VisionService/SearchByImage",),
        "sentiment": ("cbec.sentiment.v1.SentimentService/GetMarketReport",),
    }
    expected = {(svc, name) for svc, names in calls.items() for name in names}
    await suite.flush()
    spans = await suite.receiver.wait_for(
        lambda got: expected <= {(s.service, s.name) for s in got if s.kind == SERVER}
    )

    # One trace, the caller's: nothing any service exported is outside it.
    assert {s.trace_id for s in spans} == {TRACE_ID}
    request = by_name(spans, "gateway", "POST /v1/gateway/product-page", SERVER)
    assert request.parent_id == CALLER_SPAN
    assert request.attribute("http.response.status_code") == 200
    assert returned == f"00-{TRACE_ID}-{request.span_id}-01"  # the response names the request's span
    assert {s.service for s in spans} == {"gateway", "recommender", "vision", "sentiment"}
    for service, name in expected:
        client = by_name(spans, "gateway", name, CLIENT)
        server = by_name(spans, service, name, SERVER)
        assert client.parent_id == request.span_id  # the bridge's request span
        assert server.parent_id == client.span_id  # the backend continues the gateway's call
        assert server.attribute("rpc.grpc.status_code") == 0
    assert len([s for s in spans if s.service == "gateway" and s.kind == CLIENT]) == len(expected)
    # A backend's own work hangs under its call: the recommender's model batch, say.
    ids = {s.span_id: s for s in spans}
    for span in spans:
        if span.parent_id != CALLER_SPAN:
            assert span.parent_id in ids, (span.service, span.name)  # no orphan: every parent was exported


async def test_a_call_to_the_grpc_gateway_continues_the_callers_trace(suite: Suite, built: Built) -> None:
    trace_id = "7c2d5e1f9a8b4c3d2e1f0a9b8c7d6e5f"
    request = gateway_pb2.GetProductPageRequest(product_id=built.item_ids[0], user_id=USER, k=2)
    metadata = (("x-api-key", FULL_KEY), ("traceparent", f"00-{trace_id}-{CALLER_SPAN}-01"))
    address = f"127.0.0.1:{suite.servers['gateway'].grpc_port}"
    async with grpc.aio.insecure_channel(address) as channel:
        page = await gateway_pb2_grpc.GatewayServiceStub(channel).GetProductPage(request, metadata=metadata)
    assert not page.missing_parts, page.missing_parts
    name = "cbec.gateway.v1.GatewayService/GetProductPage"
    await suite.flush()
    spans = await suite.receiver.wait_for(
        lambda got: {"recommender", "vision", "sentiment"} <= {s.service for s in got if s.kind == SERVER}
    )
    assert {s.trace_id for s in spans} == {trace_id}
    call = by_name(spans, "gateway", name, SERVER)
    assert call.parent_id == CALLER_SPAN
    search = by_name(spans, "gateway", "cbec.vision.v1.VisionService/SearchByImage", CLIENT)
    assert search.parent_id == call.span_id
    vision = by_name(spans, "vision", "cbec.vision.v1.VisionService/SearchByImage", SERVER)
    assert vision.parent_id == search.span_id


async def test_a_malformed_traceparent_at_the_bridge_starts_a_new_trace(suite: Suite, built: Built) -> None:
    body = {"productId": built.item_ids[0], "userId": USER, "k": 2}
    async with suite.http.post(
        "/v1/gateway/product-page", json=body, headers={"traceparent": f"00-{TRACE_ID}-zz-01"}
    ) as r:
        assert r.status == 200, await r.text()
        returned = r.headers["traceparent"]
    new_trace = returned.split("-")[1]
    assert new_trace != TRACE_ID
    await suite.flush()
    spans = await suite.receiver.wait_for(
        lambda got: any(s.service == "vision" and s.trace_id == new_trace for s in got)
    )
    request = by_name(spans, "gateway", "POST /v1/gateway/product-page", SERVER)
    assert request.trace_id == new_trace and request.parent_id == ""  # a root
    assert {s.trace_id for s in spans} == {new_trace}


async def test_a_chat_message_traces_chat_and_its_anger_check_on_sentiment(suite: Suite) -> None:
    trace_id = "5b8efff798038103d269b633813fc60c"
    traceparent = f"00-{trace_id}-{CALLER_SPAN}-01"
    async with suite.http.post(
        "/v1/chat/converse", json={"message": ANGRY}, headers={"traceparent": traceparent}
    ) as r:
        assert r.status == 200, await r.text()
        lines = [json.loads(line) for line in (await r.text()).splitlines() if line.strip()]
    result = next(line["result"]["result"] for line in lines if "result" in line.get("result", {}))
    # The anger check asked the sentiment service (not the local fallback) and handed off.
    assert result["handoff"] and "sentiment-service" in result["handoffReason"], result
    converse = "cbec.chat.v1.ChatService/Converse"
    analyze = "cbec.sentiment.v1.SentimentService/Analyze"
    await suite.flush()
    spans = await suite.receiver.wait_for(
        lambda got: any(s.service == "sentiment" and s.name == analyze for s in got)
    )
    assert {s.trace_id for s in spans} == {trace_id}
    request = by_name(spans, "gateway", "POST /v1/chat/converse", SERVER)
    assert request.parent_id == CALLER_SPAN
    gateway_call = by_name(spans, "gateway", converse, CLIENT)
    chat = by_name(spans, "chat", converse, SERVER)
    chat_call = by_name(spans, "chat", analyze, CLIENT)
    sentiment = by_name(spans, "sentiment", analyze, SERVER)
    assert gateway_call.parent_id == request.span_id
    assert chat.parent_id == gateway_call.span_id
    assert chat_call.parent_id == chat.span_id  # chat -> sentiment, inside chat's handling of the call
    assert sentiment.parent_id == chat_call.span_id
    # Chat's own work is in the trace too: its embedding batch and its store round-trips.
    chat_spans = [s for s in spans if s.service == "chat"]
    assert any(s.name.startswith("model ") for s in chat_spans), [s.name for s in chat_spans]
    assert any(s.attribute("db.system.name") == "sqlite" for s in chat_spans), [s.name for s in chat_spans]
