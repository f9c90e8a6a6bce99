"""``cbec.recommender.v1.RecommenderService`` on the shared runtime.

Requests are validated field by field (INVALID_ARGUMENT with every violation); in
``RecordInteractions`` and ``UpsertItems`` bad entries are rejected one by one with reasons and the
good ones in the same call are kept. Accepted events are committed to the event store before the
call returns, then mirrored into the serving engine, so the very next ``Recommend`` reflects them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from cbec.common.v1 import common_pb2
from cbec.recommender.v1 import recommender_pb2 as pb
from cbec.recommender.v1 import recommender_pb2_grpc

from services.runtime.admin import model_info
from services.runtime.errors import InvalidArgument, NotFound, ServiceError, Violation, raise_if, rejection
from services.runtime.model_store import Manifest, ModelSlot
from services.runtime.server import Runtime

from .bundle import load_bundle
from .embeddings import Embedder, EmbeddingCache, item_text
from .engine import COLD_START, CONTENT, HYBRID, MARKET_RE, PERSONALISED, Engine, NoSignal, UnknownFilter
from .events import Event, EventStore
from .settings import RecommenderSettings

log = logging.getLogger("cbec.recommender")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommenderService"].full_name
STRATEGY = {
    PERSONALISED: pb.STRATEGY_PERSONALISED,
    COLD_START: pb.STRATEGY_COLD_START,
    CONTENT: pb.STRATEGY_CONTENT,
    HYBRID: pb.STRATEGY_HYBRID,
}
SOURCES = {
    pb.SIMILARITY_SOURCE_UNSPECIFIED: "blended",
    pb.SIMILARITY_SOURCE_BLENDED: "blended",
    pb.SIMILARITY_SOURCE_COLLABORATIVE: "collaborative",
    pb.SIMILARITY_SOURCE_CONTENT: "content",
}
MAX_ID = 256
MAX_TEXT = 4000
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
FUTURE_SLACK_S = 86400.0


def _id_violation(value: str, name: str) -> Violation | None:
    if not value or not value.strip():
        return Violation(name, "must not be empty")
    if len(value) > MAX_ID:
        return Violation(name, f"must be at most {MAX_ID} characters")
    return None


class RecommenderServicer(recommender_pb2_grpc.RecommenderServiceServicer):
    def __init__(self, service: RecommenderService) -> None:
        self.svc = service

    # --- helpers ---
    def _engine(self) -> tuple[Engine, Manifest]:
        loaded = self.svc.slot.require()
        return loaded.model, loaded.manifest

    def _k(self, k: int, violations: list[Violation]) -> None:
        limit = self.svc.settings.max_k
        if k <= 0 or k > limit:
            violations.append(Violation("k", f"must be between 1 and {limit}"))

    @staticmethod
    def _items(results: Sequence[Any]) -> list[pb.RecommendedItem]:
        return [
            pb.RecommendedItem(
                item_id=r.item_id,
                score=r.score,
                title=r.title,
                category=r.category,
                explanation=[pb.ExplanationItem(item_id=i, weight=w) for i, w in r.explanation],
            )
            for r in results
        ]

    # --- RPCs ---
    async def Recommend(self, request: pb.RecommendRequest, context: Any) -> pb.RecommendResponse:
        violations: list[Violation] = []
        if v := _id_violation(request.user_id, "user_id"):
            violations.append(v)
        self._k(request.k, violations)
        if request.market and not MARKET_RE.match(request.market):
            violations.append(Violation("market", "must be an ISO 3166-1 alpha-2 code such as DE"))
        for i, c in enumerate(request.filters.categories):
            if not c.strip():
                violations.append(Violation(f"filters.categories[{i}]", "must not be empty"))
        for i, item in enumerate(request.filters.exclude_item_ids):
            if not item.strip():
                violations.append(Violation(f"filters.exclude_item_ids[{i}]", "must not be empty"))
        raise_if(violations)
        engine, manifest = self._engine()
        try:
            results, strategy = engine.recommend(
                request.user_id,
                request.k,
                request.market,
                list(request.filters.categories),
                list(request.filters.exclude_item_ids),
                request.filters.include_seen,
                request.explain,
            )
        except UnknownFilter as exc:
            raise InvalidArgument([Violation(exc.field, exc.reason)]) from None
        return pb.RecommendResponse(
            items=self._items(results), strategy=STRATEGY[strategy], model=model_info(manifest)
        )

    async def SimilarItems(self, request: pb.SimilarItemsRequest, context: Any) -> pb.SimilarItemsResponse:
        violations: list[Violation] = []
        if v := _id_violation(request.item_id, "item_id"):
            violations.append(v)
        self._k(request.k, violations)
        if request.market and not MARKET_RE.match(request.market):
            violations.append(Violation("market", "must be an ISO 3166-1 alpha-2 code such as DE"))
        for i, c in enumerate(request.categories):
            if not c.strip():
                violations.append(Violation(f"categories[{i}]", "must not be empty"))
        if request.source not in SOURCES:
            violations.append(Violation("source", f"unknown similarity source {request.source}"))
        raise_if(violations)
        engine, manifest = self._engine()
        try:
            results = engine.similar(
                request.item_id, request.k, request.market, list(request.categories), SOURCES[request.source]
            )
        except UnknownFilter as exc:
            raise InvalidArgument([Violation(exc.field, exc.reason)]) from None
        except NoSignal as exc:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        if results is None:
            raise NotFound(f"item {request.item_id!r} is not in the catalogue")
        return pb.SimilarItemsResponse(items=self._items(results), model=model_info(manifest))

    async def RecordInteractions(
        self, request: pb.RecordInteractionsRequest, context: Any
    ) -> pb.RecordInteractionsResponse:
        n = len(request.interactions)
        limit = self.svc.settings.max_interactions_per_call
        if n == 0:
            raise InvalidArgument([Violation("interactions", "must not be empty")])
        if n > limit:
            raise InvalidArgument([Violation("interactions", f"at most {limit} per call")])
        engine, _ = self._engine()
        engine.sync()
        now = time.time()
        good: list[Event] = []
        rejected: list[common_pb2.ItemRejection] = []
        for i, it in enumerate(request.interactions):
            problems = self._check_interaction(it, engine, now)
            if problems:
                rejected.append(
                    rejection(i, [Violation(f"interactions[{i}].{name}", text) for name, text in problems])
                )
                continue
            occurred = (
                it.occurred_time.seconds + it.occurred_time.nanos / 1e9
                if it.HasField("occurred_time")
                else now
            )
            rating = float(it.rating) if it.type == pb.INTERACTION_TYPE_RATING else None
            good.append(Event(it.user_id, it.item_id, int(it.type), rating, occurred, it.market))
        if good:
            await asyncio.to_thread(self.svc.store.append, good)  # durable before we answer
            current = self.svc.slot.current
            if current is not None:
                current.model.sync()
        return pb.RecordInteractionsResponse(accepted_count=len(good), rejected=rejected)

    @staticmethod
    def _check_interaction(it: pb.Interaction, engine: Engine, now: float) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name in ("user_id", "item_id"):
            if v := _id_violation(getattr(it, name), name):
                problems.append((v.field, v.description))
        if it.item_id and not problems and engine.col_of(it.item_id) < 0:
            problems.append(("item_id", "unknown item; add it with UpsertItems first"))
        if it.type not in (1, 2, 3, 4):
            problems.append(("type", "must be VIEW, CART, PURCHASE or RATING"))
        if math.isnan(it.rating) or math.isinf(it.rating):
            problems.append(("rating", "must be a finite number"))
        elif it.rating < 0:
            problems.append(("rating", "must not be negative"))
        elif it.type == pb.INTERACTION_TYPE_RATING and not 1.0 <= it.rating <= 5.0:
            problems.append(("rating", "a RATING must be between 1 and 5"))
        if it.market:
            if not MARKET_RE.match(it.market):
                problems.append(("market", "must be an ISO 3166-1 alpha-2 code such as DE"))
            elif engine.markets and it.market not in engine.market_bit:
                problems.append(("market", f"unknown market; known: {', '.join(engine.markets)}"))
        if it.HasField("occurred_time"):
            ts = it.occurred_time.seconds + it.occurred_time.nanos / 1e9
            if ts > now + FUTURE_SLACK_S:
                problems.append(("occurred_time", "must not be in the future"))
            elif ts <= 0:
                problems.append(("occurred_time", "must be after 1970"))
        return problems

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: Any) -> pb.UpsertItemsResponse:
        n = len(request.items)
        limit = self.svc.settings.max_items_per_call
        if n == 0:
            raise InvalidArgument([Violation("items", "must not be empty")])
        if n > limit:
            raise InvalidArgument([Violation("items", f"at most {limit} per call")])
        engine, _ = self._engine()
        rejected: list[common_pb2.ItemRejection] = []
        good: list[pb.Item] = []
        for i, item in enumerate(request.items):
            problems = self._check_item(item)
            if problems:
                rejected.append(rejection(i, [Violation(f"items[{i}].{f}", d) for f, d in problems]))
            else:
                good.append(item)
        if good:
            texts = [item_text(it.title, it.description, it.category) for it in good]
            vectors = await asyncio.to_thread(self.svc.embedder.embed, texts)
            rows = []
            for it, vec in zip(good, vectors, strict=True):
                body = {
                    "title": it.title,
                    "description": it.description,
                    "category": it.category,
                    "markets": sorted(set(it.markets)),
                    "language": it.language,
                    "attributes": dict(it.attributes),
                }
                if it.HasField("price"):
                    body["price"] = {"currency_code": it.price.currency_code, "amount": it.price.amount}
                rows.append((it.item_id, body, vec))
            await asyncio.to_thread(self.svc.store.upsert_items, rows)
            engine.sync()
        return pb.UpsertItemsResponse(upserted_count=len(good), rejected=rejected)

    @staticmethod
    def _check_item(item: pb.Item) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if v := _id_violation(item.item_id, "item_id"):
            problems.append((v.field, v.description))
        if not item.title.strip() and not item.description.strip():
            problems.append(
                ("title", "an item needs a title or a description (the content model reads them)")
            )
        for name in ("title", "description"):
            if len(getattr(item, name)) > MAX_TEXT:
                problems.append((name, f"must be at most {MAX_TEXT} characters"))
        for j, m in enumerate(item.markets):
            if not MARKET_RE.match(m):
                problems.append((f"markets[{j}]", "must be an ISO 3166-1 alpha-2 code such as DE"))
        if item.HasField("price"):
            if not CURRENCY_RE.match(item.price.currency_code):
                problems.append(("price.currency_code", "must be an ISO 4217 code such as EUR"))
            if not math.isfinite(item.price.amount) or item.price.amount < 0:
                problems.append(("price.amount", "must be a finite, non-negative amount"))
        return problems

    async def ForgetUser(self, request: pb.ForgetUserRequest, context: Any) -> pb.ForgetUserResponse:
        if v := _id_violation(request.user_id, "user_id"):
            raise InvalidArgument([v])
        deleted = await asyncio.to_thread(self.svc.store.forget, request.user_id)
        current = self.svc.slot.current
        if current is not None:
            current.model.forget(request.user_id)
        log.info("user erased", extra={"events_deleted": deleted})
        return pb.ForgetUserResponse(events_deleted=deleted)


class RecommenderService:
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        if not isinstance(settings, RecommenderSettings):
            settings = RecommenderSettings(**settings.model_dump())
        self.settings: RecommenderSettings = settings
        self.device = runtime.device
        self.store = EventStore(settings.events_path, settings.events_synchronous)
        self.embedder = Embedder(EmbeddingCache(settings.embeddings_cache))
        self.slot: ModelSlot[Engine] = runtime.model_slot(self._load)
        import faiss

        faiss.omp_set_num_threads(settings.faiss_threads)

    def _load(self, path: Path, manifest: Manifest) -> Engine:
        bundle = load_bundle(path, self.device)
        return Engine(bundle, self.store, self.settings)

    def register(self, server: grpc.aio.Server) -> None:
        recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(RecommenderServicer(self), server)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.store.close()
        self.embedder.cache.close()
