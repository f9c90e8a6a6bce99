"""Chat test fixtures: a small real knowledge base (3 packaged articles x 3 languages, embedded once per
session with the packaged e5 model), the demo orders, a model version built from a subset of the
labelled intent examples, and real gRPC servers on ephemeral ports. The store is embedded (an SQLite file
in the state dir) unless a test asks for the shared backend (``seed_shared``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc

from services.chat.config import ChatSettings
from services.chat.defaults import DEMO_ORDERS
from services.chat.index import RetrievalParams
from services.chat.intent import IntentParams, load_examples
from services.chat.knowledge import Embedder, embed_missing, packaged_articles
from services.chat.model import Policy
from services.chat.server import ChatService
from services.chat.store import ArticleRecord, ChatStore
from services.chat.train import build_intent_model, write_version
from services.runtime.server import Server
from services.runtime.state import StateConfig
from tests import stores
from tests.support import local_settings, serving

# Real PostgreSQL and Redis for the shared-backend tests (started on first use).
postgres_server = stores.postgres_server
redis_server = stores.redis_server
pg_url = stores.pg_url
redis_db = stores.redis_db

ARTICLES = ("shipping-times", "returns-refunds", "order-tracking")
LANGUAGES = ("en", "es", "ja")
INTENTS = {"shipping", "returns", "tracking", "order_status", "start_return", "human_agent", "complaint"}


@dataclass(frozen=True)
class Prepared:
    state_dir: Path  # holds chat.sqlite3: the articles (embedded) and the demo orders
    models_dir: Path
    articles: tuple[ArticleRecord, ...]  # embedded once: seeding a store needs no model


def open_store(state_dir: Path) -> ChatStore:
    """The embedded store in ``state_dir`` (a second connection beside a running server's)."""
    return ChatStore.open(StateConfig(state_dir=state_dir))


def seed(store: ChatStore, prepared: Prepared) -> None:
    store.upsert_articles(prepared.articles)
    store.put_orders(DEMO_ORDERS)


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Prepared:
    root = tmp_path_factory.mktemp("chat")
    articles = [a for a in packaged_articles() if a.article_id in ARTICLES and a.language in LANGUAGES]
    embed_missing(articles, embedder)
    prepared = Prepared(root / "state", root / "models", tuple(articles))
    store = open_store(prepared.state_dir)
    seed(store, prepared)
    store.close()
    examples = [e for e in load_examples() if e[1] in INTENTS]
    intent = build_intent_model(examples, embedder).with_params(IntentParams(temperature=0.02))
    write_version(
        root / "models",
        intent,
        RetrievalParams(rrf_k=30, bm25_weight=0.5),
        Policy(handoff_threshold=0.3),
        {"dev_intent_accuracy": 0.0},
        "test",
        {},
    )
    return prepared


@pytest.fixture
def state_dir(tmp_path: Path, prepared: Prepared) -> Path:
    """A private embedded store seeded with the prepared articles and orders, so tests never see each
    other's sessions or upserts (seeded, not copied: a copy could miss what is still in the WAL)."""
    d = tmp_path / "state"
    store = open_store(d)
    seed(store, prepared)
    store.close()
    return d


def chat_settings(prepared: Prepared, state_dir: Path, **overrides: Any) -> ChatSettings:
    fields: dict[str, Any] = dict(
        state_dir=state_dir,
        llm_backend="none",
        sentiment_addr="127.0.0.1:9",  # nothing listens there: the local heuristic is used
    )
    return local_settings(ChatSettings, prepared.models_dir, **{**fields, **overrides})


def running(
    settings: ChatSettings, admin: bool = False
) -> AbstractAsyncContextManager[tuple[Server, chat_pb2_grpc.ChatServiceStub]]:
    """``admin``: with the internal token, the stub calling as an admin for the request's ``user_id``
    (UpsertKnowledge needs it); otherwise no token, and the request's ``user_id`` is the caller's."""
    return serving(settings, ChatService, chat_pb2_grpc.ChatServiceStub, admin=admin)


async def converse(
    stub: chat_pb2_grpc.ChatServiceStub, message: str, **fields: Any
) -> tuple[list[str], chat_pb2.ConverseResult]:
    deltas: list[str] = []
    result = None
    async for chunk in stub.Converse(chat_pb2.ConverseRequest(message=message, **fields), timeout=120):
        if chunk.WhichOneof("chunk") == "delta":
            assert result is None, "a delta arrived after the result"
            deltas.append(chunk.delta)
        else:
            result = chunk.result
    assert result is not None, "the stream ended without a result chunk"
    return deltas, result


@pytest.fixture
def settings(prepared: Prepared, state_dir: Path) -> ChatSettings:
    return chat_settings(prepared, state_dir)


@pytest.fixture
async def stub(settings: ChatSettings) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with running(settings) as (_, s):
        yield s


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
