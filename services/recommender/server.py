"""``cbec.recommender.v1.RecommenderService`` on the shared runtime.

Requests are validated field by field (INVALID_ARGUMENT with every violation); in
``RecordInteractions`` and ``UpsertItems`` bad entries are rejected one by one with reasons and the
good ones in the same call are kept. Accepted events are committed to the event store before the
call returns (UNAVAILABLE with RetryInfo when the store is down; nothing acknowledged is lost).

Every replica folds in every write the same way, its own included: the store notifies a change
(LISTEN/NOTIFY on the shared PostgreSQL, in-process for the embedded file), the ``ChangeFeed`` wakes
and the serving engine reads what came after its positions (``Engine.catch_up``, on a worker
thread). A replica's own write also runs that catch-up before the call returns, so the very next
``Recommend`` on it reflects the write; other replicas follow within milliseconds. ``Recommend`` and
``SimilarItems`` read memory only, so they keep serving while the store is down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from cbec.common.v1 import common_pb2
from cbec.recommender.v1 import recommender_pb2 as pb
from cbec.recommender.v1 import recommender_pb2_grpc

from services.runtime.admin import model_info
from services.runtime.errors import (
    InvalidArgument,
    NotFound,
    ServiceError,
    Violation,
    quote,
    raise_if,
    rejection,
)
from services.runtime.model_store import Manifest, ModelSlot
from services.runtime.money import reconcile
from services.runtime.server import Runtime
from services.runtime.state import StoreUnavailable
from services.runtime.validation import item_violations

from .bundle import load_bundle
from .embeddings import Embedder, EmbeddingCache, item_text
from .engine import COLD_START, CONTENT, HYBRID, MARKET_RE, PERSONALISED, Engine, NoSignal, UnknownFilter
from .events import STORE_NAME, Event, EventStore
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
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
FUTURE_SLACK_S = 86400.0


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
        # k (not 0) is REQUIRED; lengths (256), item counts and control characters are limits: the
        # runtime checked them by the contract (recommender.proto) before this runs. user_id is
        # required here, not in the contract: the gateway fills it in from bound credentials.
        violations: list[Violation] = []
        if not request.user_id.strip():
            violations.append(Violation("user_id", "must not be empty"))
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
        violations: list[Violation] = []  # item_id and k (not 0): the runtime, by the contract
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
            raise NotFound(f"item {quote(request.item_id)} is not in the catalogue")
        return pb.SimilarItemsResponse(items=self._items(results), model=model_info(manifest))

    async def RecordInteractions(
        self, request: pb.RecordInteractionsRequest, context: Any
    ) -> pb.RecordInteractionsResponse:
        n = len(request.interactions)  # at least one: the runtime, by the contract
        limit = self.svc.settings.max_interactions_per_call
        if n > limit:  # the contract's 1,000, or a stricter setting
            raise InvalidArgument([Violation("interactions", f"must hold at most {limit} items (got {n})")])
        engine, _ = self._engine()
        now = time.time()
        with engine.lock:
            unknown = any(engine.col_of(it.item_id) < 0 for it in request.interactions if it.item_id)
        if unknown:  # an item upserted through another replica a moment ago: fold in, then judge
            await self.svc.feed.catch_up_async()
            engine, _ = self._engine()
        good: list[Event] = []
        rejected: list[common_pb2.ItemRejection] = []
        with engine.lock:
            checks = [self._check_interaction(it, engine, now) for it in request.interactions]
        for i, (it, problems) in enumerate(zip(request.interactions, checks, strict=True)):
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
            seqs = await asyncio.to_thread(self.svc.store.append, good)  # durable before we answer
            await self.svc.feed.catch_up_async(seqs[-1])  # the path every replica's write takes
        return pb.RecordInteractionsResponse(accepted_count=len(good), rejected=rejected)

    @staticmethod
    def _check_interaction(it: pb.Interaction, engine: Engine, now: float) -> list[tuple[str, str]]:
        # An event is rejected alone: its REQUIRED fields (item_id, type) are checked here, by the
        # contract's rules; an undefined type number was refused by the runtime. user_id is required
        # here, not in the contract: the gateway fills it in from bound credentials.
        problems = [(v.field, v.description) for v in item_violations(it)]
        if not it.user_id.strip():
            problems.insert(0, ("user_id", "must not be empty"))
        ids_given = not {f for f, _ in problems} & {"user_id", "item_id"}
        if ids_given and engine.col_of(it.item_id) < 0:
            problems.append(("item_id", "unknown item; add it with UpsertItems first"))
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
        n = len(request.items)  # at least one: the runtime, by the contract
        limit = self.svc.settings.max_items_per_call
        if n > limit:  # the contract's 256, or a stricter setting
            raise InvalidArgument([Violation("items", f"must hold at most {limit} items (got {n})")])
        self._engine()  # FAILED_PRECONDITION until a model serves
        rejected: list[common_pb2.ItemRejection] = []
        good: list[tuple[pb.Item, tuple[Decimal, str] | None]] = []
        for i, item in enumerate(request.items):
            problems, price = self._check_item(item)
            if problems:
                rejected.append(rejection(i, [Violation(f"items[{i}].{f}", d) for f, d in problems]))
            else:
                good.append((item, price))
        if good:
            texts = [item_text(it.title, it.description, it.category) for it, _ in good]
            vectors = await asyncio.to_thread(self.svc.embedder.embed, texts)
            rows = []
            for (it, price), vec in zip(good, vectors, strict=True):
                body = {
                    "title": it.title,
                    "description": it.description,
                    "category": it.category,
                    "markets": sorted(set(it.markets)),
                    "language": it.language,
                    "attributes": dict(it.attributes),
                }
                if price is not None:  # exact as a decimal string; "amount" as before, for old readers
                    body["price"] = {
                        "currency_code": price[1],
                        "amount": float(price[0]),
                        "value": f"{price[0].normalize():f}",
                    }
                rows.append((it.item_id, body, vec))
            await asyncio.to_thread(self.svc.store.upsert_items, rows)
            await self.svc.feed.catch_up_async()
        return pb.UpsertItemsResponse(upserted_count=len(good), rejected=rejected)

    @staticmethod
    def _check_item(item: pb.Item) -> tuple[list[tuple[str, str]], tuple[Decimal, str] | None]:
        """The item's problems (rejected alone), and its price (amount, currency) when it has one:
        ``list_price``, or the deprecated ``price`` (until v2); both given must agree."""
        # REQUIRED fields (item_id, price.currency_code when price is set), by the contract's rules
        problems = [(v.field, v.description) for v in item_violations(item)]
        if not item.title.strip() and not item.description.strip():
            problems.append(
                ("title", "an item needs a title or a description (the content model reads them)")
            )
        for j, m in enumerate(item.markets):
            if not MARKET_RE.match(m):
                problems.append((f"markets[{j}]", "must be an ISO 3166-1 alpha-2 code such as DE"))
        old = item.price if item.HasField("price") else None
        if old is not None:
            if old.currency_code and not CURRENCY_RE.match(old.currency_code):
                problems.append(("price.currency_code", "must be an ISO 4217 code such as EUR"))
            if not math.isfinite(old.amount) or old.amount < 0:
                problems.append(("price.amount", "must be a finite, non-negative amount"))
        new = item.list_price if item.HasField("list_price") else None  # its form: the runtime
        price, disagreements = reconcile(
            new,
            "list_price",
            old.amount if old is not None else 0.0,
            "price.amount",
            old.currency_code if old is not None else "",
            "price.currency_code",
            old_present=old is not None,
        )
        named = {f for f, _ in problems}
        problems += [(v.field, v.description) for v in disagreements if v.field not in named]
        if new is not None and price is not None and price.value < 0:
            problems.append(("list_price", "must not be negative"))
        if problems or price is None:
            return problems, None
        return problems, (price.value, price.currency)

    async def ForgetUser(self, request: pb.ForgetUserRequest, context: Any) -> pb.ForgetUserResponse:
        # user_id: REQUIRED, checked by the runtime (recommender.proto)
        deleted = await asyncio.to_thread(self.svc.store.forget, request.user_id)
        await self.svc.feed.catch_up_async()  # drops the user's live state, as on every replica
        log.info("user erased", extra={"events_deleted": deleted})
        return pb.ForgetUserResponse(events_deleted=deleted)


class ChangeFeed:
    """Folds every write, from any replica, into the engine that serves.

    The store's change notifications (and this replica's own writes) wake one worker thread, which
    runs ``Engine.catch_up``: reads ``seq > last`` through the logs' indexes, never whole tables.
    Besides, every ``tick_s`` it checks in memory whether the engine is behind what notifications
    announced or was just swapped for a new model version, and every ``check_s`` it re-reads the
    logs anyway in case a notification was lost. A store that is down is retried with a backoff
    while serving goes on from memory.
    """

    def __init__(self, store: EventStore, slot: ModelSlot[Engine], check_s: float, tick_s: float = 0.5):
        self.store = store
        self.slot = slot
        self.check_s = check_s
        self.tick_s = tick_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.store.follow(self._notified)
        self._thread = threading.Thread(target=self._run, name="recommender-fold-in", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _notified(self, channel: str, payload: str | None) -> None:
        self._wake.set()  # runs on the notifying thread: fold in on ours

    def catch_up(self, until: int | None = None) -> None:
        """Fold in now (on the calling thread; raises StoreUnavailable). ``until``: the seq of a write
        that must be folded in (done already when a concurrent catch-up covered it)."""
        current = self.slot.current
        if current is not None:
            current.model.catch_up(until)

    async def catch_up_async(self, until: int | None = None) -> None:
        """Fold in off the event loop; a store that went down meanwhile is left to the worker."""
        try:
            await asyncio.to_thread(self.catch_up, until)
        except StoreUnavailable as exc:
            log.warning("fold-in deferred: store unavailable", extra={"error": str(exc)[:200]})
            self._wake.set()

    def _run(self) -> None:
        folded: Engine | None = None
        last_read = time.monotonic()
        retry = False
        backoff = self.tick_s
        while not self._stop.is_set():
            woke = self._wake.wait(backoff if retry else self.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            current = self.slot.current
            if current is None:
                continue
            engine = current.model
            due = (
                woke
                or retry
                or engine is not folded
                or engine.behind()
                or time.monotonic() - last_read >= self.check_s
            )
            if not due:
                continue
            try:
                engine.catch_up()
                folded, last_read, retry, backoff = engine, time.monotonic(), False, self.tick_s
            except StoreUnavailable as exc:
                if not retry:
                    log.warning("fold-in waiting for the store", extra={"error": str(exc)[:200]})
                retry, backoff = True, min(backoff * 2, 5.0)
            except Exception:
                log.exception("fold-in failed")
                retry, backoff = True, min(backoff * 2, 5.0)


class RecommenderService:
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        if not isinstance(settings, RecommenderSettings):
            settings = RecommenderSettings(**settings.model_dump())
        self.settings: RecommenderSettings = settings
        self.device = runtime.device
        # The system of record: <state dir>/recommender.sqlite3, or the shared PostgreSQL.
        db = runtime.database(STORE_NAME, settings.events_synchronous)
        self.store = EventStore(db, tolerate_outage=True)
        self.embedder = Embedder(EmbeddingCache(settings.embeddings_cache))
        self.slot: ModelSlot[Engine] = runtime.model_slot(self._load)
        self.feed = ChangeFeed(self.store, self.slot, settings.fold_in_check_s)
        import faiss

        faiss.omp_set_num_threads(settings.faiss_threads)

    def _load(self, path: Path, manifest: Manifest) -> Engine:
        bundle = load_bundle(path, self.device)
        return Engine(bundle, self.store, self.settings)

    def register(self, server: grpc.aio.Server) -> None:
        recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(RecommenderServicer(self), server)

    async def start(self) -> None:
        self.feed.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.feed.stop)
        self.store.close()  # the runtime closes the database itself
        self.embedder.cache.close()
