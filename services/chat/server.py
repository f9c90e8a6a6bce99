"""``cbec.chat.v1.ChatService`` on the shared runtime.

Converse streams the answer as it is produced (LLM tokens, or the lines of an article or action reply)
and ends with one result chunk. When the client goes away mid-stream, gRPC cancels the handler; the
generator's ``finally`` sets the cancel event the LLM backend checks between tokens, so generation
stops and its slot is freed. Query embeddings go through the runtime's micro-batcher.

Identity: a session belongs to the user who started it, and order lookups are that user's. The user
is the trusted caller's (``x-cbec-user`` from the gateway, believed only with the internal token:
``services/runtime/access.py``); ``user_id`` in the request counts only where no trusted identity
exists (no token configured). Another user's session reads as NOT_FOUND; ending it needs the
``admin`` scope. Logs carry a hash of the session id, never the id, which is the session's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Histogram

from services.runtime.access import caller
from services.runtime.admin import model_info
from services.runtime.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Violation,
    raise_if,
    rejection,
)
from services.runtime.model_store import Manifest, ModelSlot
from services.runtime.money import reconcile
from services.runtime.server import Runtime
from services.runtime.validation import item_violations, merged

from .answer import Composer
from .config import ChatSettings
from .engine import ACTION, ARTICLE, HANDOFF, LLM, Plan, chunks, plan, understand
from .faithfulness import Evidence, SentenceSplitter, check
from .index import HybridIndex
from .knowledge import Embedder, embed_missing, validate_article
from .llm import GenerationError, GenerationStats, LLMBackend
from .model import ChatModel, llm_from_settings, load_chat_model
from .product_copy import (
    COPY_SYSTEM_PROMPT,
    ProductFacts,
    build_template,
    clean_copy,
    validate_copy_request,
)
from .sentiment import SentimentClient
from .store import (
    ARTICLES_CHANNEL,
    ArticleRecord,
    ChatStore,
    SessionRecord,
    TurnRecord,
    session_hash,
    valid_session_id,
)
from .text import LanguageDetector, mask_pii, order_ids

log = logging.getLogger("cbec.chat")
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
ANSWER_SOURCES = {
    LLM: chat_pb2.ANSWER_SOURCE_LLM,
    ARTICLE: chat_pb2.ANSWER_SOURCE_ARTICLE,
    ACTION: chat_pb2.ANSWER_SOURCE_ACTION,
    HANDOFF: chat_pb2.ANSWER_SOURCE_HANDOFF,
}
_DONE = object()
#: Safety re-check of the knowledge revision (notifications make changes visible within milliseconds).
INDEX_RECHECK_S = 30.0
INDEX_RETRY_S = 2.0


class MaskingFilter(logging.Filter):
    """Last line of defence: card numbers, e-mails and phone numbers never reach a log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = mask_pii(record.msg)
        if record.args:
            record.args = tuple(mask_pii(a) if isinstance(a, str) else a for a in record.args)  # type: ignore[assignment]
        for key, value in list(vars(record).items()):
            if key.startswith("chat_") and isinstance(value, str):
                setattr(record, key, mask_pii(value))
        return True


for _name in ("cbec.chat", "cbec.chat.llm", "cbec.chat.sentiment"):
    logging.getLogger(_name).addFilter(MaskingFilter())


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class ChatService:
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        if not isinstance(settings, ChatSettings):
            settings = ChatSettings(**settings.model_dump())
        self.settings: ChatSettings = settings
        self.device = runtime.device
        # Embedded: sessions in the SQLite file; shared: sessions in Redis, the rest in PostgreSQL.
        redis = runtime.redis() if runtime.state.shared else None
        self.store = ChatStore(runtime.database("chat"), redis)
        self.embedder = Embedder(settings.embed_threads)
        self.detector = LanguageDetector()
        self.composer = Composer(self.embedder)
        self._index_lock = threading.Lock()
        self._index_rev = -1
        self._index_wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.index = HybridIndex([])
        self._refresh_index()
        self.store.db.listen(ARTICLES_CHANNEL, self._on_articles_changed)
        self.slot: ModelSlot[ChatModel] = runtime.model_slot(self._load)
        self.embed_batcher = runtime.batcher(self._embed_batch, "chat-embed")
        self.sentiment = SentimentClient(
            settings.sentiment_addr,
            settings.sentiment_timeout_s,
            settings=settings,
        )
        self._llm_pool = ThreadPoolExecutor(max_workers=settings.llm_parallel, thread_name_prefix="llm")
        self._llm_in_use = 0
        self._upsert_lock = asyncio.Lock()
        self._purge_task: asyncio.Task[None] | None = None
        self._index_task: asyncio.Task[None] | None = None
        self._late_writes: set[asyncio.Future[None]] = set()
        self.generations: deque[GenerationStats] = deque(maxlen=256)
        r = runtime.metrics.registry
        self.m_answers = Counter(
            "chat_answers", "Converse answers by how they were produced.", ("source",), registry=r
        )
        self.m_handoffs = Counter("chat_handoffs", "Conversations handed to a person.", registry=r)
        self.m_rewrites = Counter(
            "chat_llm_rewrites",
            "LLM rewrites by outcome: accepted, rejected by the faithfulness check, incomplete, llm_failed.",
            ("outcome",),
            registry=r,
        )
        self.m_tokens = Counter("chat_llm_tokens", "Tokens generated by the LLM.", registry=r)
        self.m_overflow = Counter(
            "chat_llm_overflow", "Answers given from the article because every LLM slot was busy.", registry=r
        )
        self.m_cancelled = Counter(
            "chat_llm_cancelled",
            "Generations stopped before their end: the client left, or a sentence failed the check.",
            registry=r,
        )
        self.m_first = Histogram(
            "chat_first_chunk_seconds",
            "Time from request to the first streamed chunk.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    # --- lifecycle ------------------------------------------------------------------------------
    def _load(self, path: Path, manifest: Manifest) -> ChatModel:
        llm: LLMBackend | None = llm_from_settings(self.settings, self.device.torch)
        return load_chat_model(path, manifest, llm)

    def _embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.embedder.query(texts))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._index_wake = asyncio.Event()
        self._index_wake.set()  # catch up on anything upserted since __init__ built the index
        self._loop = loop
        self._purge_task = loop.create_task(self._purge_loop())
        self._index_task = loop.create_task(self._index_loop())

    async def stop(self) -> None:
        self._loop = None
        for task in (self._purge_task, self._index_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._late_writes:
            await asyncio.gather(*list(self._late_writes), return_exceptions=True)
        await self.sentiment.close()
        self._llm_pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    # --- knowledge index ------------------------------------------------------------------------
    def _refresh_index(self) -> bool:
        """Rebuild the retrieval index from the store if its revision moved; the one path for this
        replica's upserts and every other replica's. Returns whether it rebuilt."""
        with self._index_lock:
            rev = self.store.articles_revision()  # read before the articles: never older than them
            if rev == self._index_rev:
                return False
            self.index = HybridIndex(self.store.articles())
            self._index_rev = rev
        log.info("knowledge index rebuilt", extra={"chat_revision": str(rev)})
        return True

    def _on_articles_changed(self, payload: str | None) -> None:
        """An upsert committed somewhere (or the listener reconnected: None): wake the index loop.
        Called from the listener's thread, so it only schedules."""
        loop, wake = self._loop, self._index_wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    async def _index_loop(self) -> None:
        """Coalesces bursts of notifications into one rebuild; re-checks the revision now and then
        in case a notification was lost, and soon after a failure (store down)."""
        assert self._index_wake is not None
        delay = INDEX_RECHECK_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._index_wake.wait(), delay)
            self._index_wake.clear()
            try:
                await asyncio.to_thread(self._refresh_index)
                delay = INDEX_RECHECK_S
            except Exception as exc:
                log.warning("knowledge index refresh failed: %s", exc)
                delay = INDEX_RETRY_S

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(60)
            try:
                await asyncio.to_thread(self.store.purge_expired)
            except Exception:
                log.exception("session purge failed")

    def register(self, server: grpc.aio.Server) -> None:
        chat_pb2_grpc.add_ChatServiceServicer_to_server(_Servicer(self), server)

    # --- Converse -------------------------------------------------------------------------------
    def _validate_converse(self, request: chat_pb2.ConverseRequest) -> str:
        """The runtime has checked the contract's limits (chat.proto: a message is required, at most
        4,000 characters); ``max_message_chars`` may be stricter, and is a client error too."""
        s = self.settings
        if len(request.message) > s.max_message_chars:
            raise InvalidArgument(
                [
                    Violation(
                        "message",
                        f"must be at most {s.max_message_chars} characters (got {len(request.message)})",
                    )
                ]
            )
        violations = []
        if request.session_id and not valid_session_id(request.session_id):
            violations.append(
                Violation("session_id", "must be empty (new session) or a 32-hex-digit session id")
            )
        market = request.market.strip().upper()
        if market and (len(market) != 2 or not market.isalpha() or not market.isascii()):
            violations.append(Violation("market", "must be an ISO 3166-1 alpha-2 code such as 'DE'"))
        raise_if(violations)
        return market

    def _session(self, request: chat_pb2.ConverseRequest, user_id: str) -> SessionRecord:
        """Blocking (store I/O): run it in a thread."""
        if not request.session_id:
            return self.store.create_session(user_id, self.settings.session_ttl_s)
        session = self.store.get_session(request.session_id)
        if session is None or session.user_id != user_id:  # never confirm another user's session
            raise NotFound(f"session {request.session_id} does not exist or has expired")
        return session

    async def converse(
        self, request: chat_pb2.ConverseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ConverseResponse]:
        started = time.perf_counter()
        market = self._validate_converse(request)
        loaded = self.slot.require()
        model = loaded.model
        user_id = _user_of(request.user_id)
        session = await asyncio.to_thread(self._session, request, user_id)
        masked = mask_pii(request.message)
        vec, mood = await asyncio.gather(
            self.embed_batcher.submit(masked, time_remaining=context.time_remaining()),
            self.sentiment.mood(masked),
        )
        u = understand(request.message, vec, self.detector, self.index, model)
        history_ids = [
            oid for t in session.turns if t.role == chat_pb2.ROLE_CUSTOMER for oid in order_ids(t.text)
        ]
        # plan() may read orders or open a return: store I/O, so off the event loop.
        p = await asyncio.to_thread(
            plan, u, model, mood, self.store, user_id, self.composer, market, history_ids
        )
        log.info(
            "converse",
            extra={
                "chat_session": session_hash(session.session_id),
                "chat_language": p.language,
                "chat_intent": p.intent,
                "chat_source": p.answer_source,
                "chat_handoff": p.handoff,
                "chat_message": masked[:200],
            },
        )
        if p.answer_source == LLM and self.llm_saturated:
            self.m_overflow.inc()  # every slot busy: the extractive answer now beats a queued LLM answer
            p.answer_source, p.fallback_reason = ARTICLE, "every LLM slot was busy"
        parts: list[str] = []
        first = True
        recorded = False
        try:
            if p.answer_source == LLM and model.llm is not None:
                async with contextlib.aclosing(self._rewrite(model, p, context)) as sentences:
                    async for sentence in sentences:
                        if first:
                            self.m_first.observe(time.perf_counter() - started)
                            first = False
                        parts.append(sentence)
                        yield chat_pb2.ConverseResponse(delta=sentence)
                if not parts:
                    p.answer_source = ARTICLE  # nothing passed the check: the extractive answer
            if p.answer_source != LLM:
                for piece in chunks(p.text):
                    if first:
                        self.m_first.observe(time.perf_counter() - started)
                        first = False
                    parts.append(piece)
                    yield chat_pb2.ConverseResponse(delta=piece)
            answer = "".join(parts)
            now = time.time()
            recorded = True  # from here a failure is the store's: the client gets UNAVAILABLE, no result
            # Durable (transcript committed) before the result chunk acknowledges the turn.
            expires = await asyncio.to_thread(
                self.store.append_turns,
                session.session_id,
                [
                    TurnRecord(chat_pb2.ROLE_CUSTOMER, masked, p.intent, now),
                    TurnRecord(chat_pb2.ROLE_ASSISTANT, mask_pii(answer), p.intent, now),
                ],
                self.settings.session_max_turns,
                self.settings.session_ttl_s,
                user_id=session.user_id,
            )
            self.m_answers.labels(p.answer_source).inc()
            if p.handoff:
                self.m_handoffs.inc()
            yield chat_pb2.ConverseResponse(result=self._result(session, p, answer, loaded.manifest, expires))
        finally:
            if not recorded:  # client left or generation failed: keep the question, not a half answer
                self._record_late(
                    session.session_id,
                    TurnRecord(chat_pb2.ROLE_CUSTOMER, masked, p.intent, time.time()),
                    session.user_id,
                )

    async def _rewrite(
        self, model: ChatModel, p: Plan, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[str]:
        """The LLM's rewrite of the evidence, one checked sentence at a time: a sentence is streamed only
        once it has passed the faithfulness check, and the first that fails ends the rewrite (and stops
        generation). An unfinished last sentence is never sent. ``p.fallback_reason`` says why it ended
        early; with nothing sent, the caller streams the extractive answer instead."""
        assert p.evidence is not None and model.llm is not None
        evidence = Evidence.build(
            list(p.evidence.units),
            p.language,
            p.evidence.vectors,
            p.context,
            markets=[p.market] if p.market else [],
        )
        splitter = SentenceSplitter()
        sent = 0

        async def passes(sentence: str) -> bool:
            vec = await self.embed_batcher.submit(sentence, time_remaining=context.time_remaining())
            verdict = check(sentence, vec, evidence, model.policy.support_threshold)
            if not verdict.ok:
                self.m_rewrites.labels("rejected").inc()
                p.fallback_reason = f"rewrite failed the faithfulness check ({verdict.reason})"
                log.info(
                    "rewrite rejected", extra={"chat_reason": verdict.reason, "chat_sentence": sentence[:200]}
                )
            return verdict.ok

        try:
            async with contextlib.aclosing(self._generate(model.llm, p.llm_messages)) as deltas:
                async for delta in deltas:
                    for sentence in splitter.feed(delta):
                        if not await passes(sentence):
                            return
                        yield (" " if sent else "") + sentence
                        sent += 1
        except GenerationError as exc:
            log.warning("LLM failed (%s); the answer ends with what passed the check", exc)
            self.m_rewrites.labels("llm_failed").inc()
            p.fallback_reason = f"the LLM failed: {exc}"
            return
        rest, complete = splitter.finish()
        if rest.strip():
            if not complete:
                self.m_rewrites.labels("incomplete").inc()
                p.fallback_reason = "the rewrite ended mid-sentence"
                return
            if not await passes(rest):
                return
            yield (" " if sent else "") + rest
            sent += 1
        if sent:
            self.m_rewrites.labels("accepted").inc()
        elif not p.fallback_reason:
            p.fallback_reason = "the LLM wrote nothing"

    def _record_late(self, session_id: str, turn: TurnRecord, user_id: str) -> None:
        """Best effort, in a thread (a cancelled handler must not block the loop or await)."""

        def write() -> None:
            try:
                self.store.append_turns(
                    session_id,
                    [turn],
                    self.settings.session_max_turns,
                    self.settings.session_ttl_s,
                    user_id=user_id,
                )
            except Exception as exc:
                log.warning("could not record an unanswered question: %s", exc)

        future = asyncio.get_running_loop().run_in_executor(None, write)
        self._late_writes.add(future)
        future.add_done_callback(self._late_writes.discard)

    def _result(
        self, session: SessionRecord, p: Plan, answer: str, manifest: Manifest, expires: float
    ) -> chat_pb2.ConverseResult:
        return chat_pb2.ConverseResult(
            session_id=session.session_id,
            intent=p.intent,
            intent_confidence=p.intent_confidence,
            language=p.language,
            sources=[
                chat_pb2.Source(article_id=s.article_id, title=s.title, language=s.language, score=s.score)
                for s in p.sources
            ],
            confidence=p.confidence,
            handoff=p.handoff,
            handoff_reason=p.handoff_reason,
            answer_source=ANSWER_SOURCES[p.answer_source],
            answer=answer,
            model=model_info(manifest),
            fallback_reason=p.fallback_reason,
        )

    @property
    def llm_saturated(self) -> bool:
        return self._llm_in_use >= self.settings.llm_parallel + self.settings.llm_max_waiting

    async def _generate(self, llm: LLMBackend, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        """Run one generation in the LLM pool, yielding its text as it comes; stop it on exit."""
        s = self.settings
        if self.llm_saturated:
            raise ResourceExhausted("too many answers are being generated; retry shortly", retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> GenerationStats:
            try:
                if cancel.is_set():  # the client left while this waited for a slot
                    return GenerationStats(cancelled=True, finish_reason="cancelled")
                return llm.generate(messages, s.llm_max_tokens, put, cancel, s.llm_ignore_eos)
            finally:
                put(_DONE)

        self._llm_in_use += 1
        future = loop.run_in_executor(self._llm_pool, run)
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
            stats = await future
            self.generations.append(stats)
            self.m_tokens.inc(stats.tokens)
        finally:
            if not future.done():
                cancel.set()
                self.m_cancelled.inc()
                future.add_done_callback(self._record_cancelled)
            self._llm_in_use -= 1

    def _record_cancelled(self, future: asyncio.Future[GenerationStats]) -> None:
        if not future.cancelled() and future.exception() is None:
            stats = future.result()
            self.generations.append(stats)
            self.m_tokens.inc(stats.tokens)

    # --- sessions -------------------------------------------------------------------------------
    @staticmethod
    def _check_session_id(session_id: str) -> None:
        if not valid_session_id(session_id):
            raise InvalidArgument([Violation("session_id", "must be a 32-hex-digit session id")])

    async def get_session(
        self, request: chat_pb2.GetSessionRequest, context: Any
    ) -> chat_pb2.GetSessionResponse:
        self._check_session_id(request.session_id)
        session = await asyncio.to_thread(self.store.get_session, request.session_id)
        if session is None or not _visible(session, admin_ok=False):
            raise NotFound(f"session {request.session_id} does not exist or has expired")
        return chat_pb2.GetSessionResponse(
            session=chat_pb2.Session(
                session_id=session.session_id,
                user_id=session.user_id,
                turns=[
                    chat_pb2.Turn(role=t.role, text=t.text, created_time=_ts(t.created), intent=t.intent)
                    for t in session.turns
                ],
                created_time=_ts(session.created),
                expire_time=_ts(session.expires),
            )
        )

    async def end_session(
        self, request: chat_pb2.EndSessionRequest, context: Any
    ) -> chat_pb2.EndSessionResponse:
        self._check_session_id(request.session_id)
        session = await asyncio.to_thread(self.store.get_session, request.session_id)
        if session is not None and not _visible(session, admin_ok=True):
            raise NotFound(f"session {request.session_id} does not exist or has expired")
        ended = await asyncio.to_thread(self.store.end_session, request.session_id)
        return chat_pb2.EndSessionResponse(ended=ended)

    # --- knowledge ------------------------------------------------------------------------------
    async def upsert_knowledge(
        self, request: chat_pb2.UpsertKnowledgeRequest, context: Any
    ) -> chat_pb2.UpsertKnowledgeResponse:
        s = self.settings  # at least one article: the runtime, by the contract (chat.proto)
        if len(request.articles) > s.max_articles_per_upsert:  # the contract's 500, or stricter
            raise InvalidArgument(
                [
                    Violation(
                        "articles",
                        f"must hold at most {s.max_articles_per_upsert} items (got {len(request.articles)})",
                    )
                ]
            )
        accepted: list[ArticleRecord] = []
        rejected = []
        seen: set[tuple[str, str]] = set()
        for i, a in enumerate(request.articles):
            # An article is rejected alone: its REQUIRED fields (chat.proto) first, then the rest.
            violations = merged(
                item_violations(a),
                validate_article(
                    a.article_id, a.topic, a.language, a.title, a.body, list(a.tags), s.max_article_chars
                ),
            )
            if (a.article_id, a.language) in seen:
                violations.append(Violation("article_id", "duplicate (article_id, language) in this request"))
            if violations:
                rejected.append(rejection(i, violations))
                continue
            seen.add((a.article_id, a.language))
            accepted.append(
                ArticleRecord(
                    a.article_id, a.language, a.topic, a.title.strip(), a.body.strip(), list(a.tags)
                )
            )
        if accepted:
            async with self._upsert_lock:
                await asyncio.to_thread(embed_missing, accepted, self.embedder)
                await asyncio.to_thread(self.store.upsert_articles, accepted)  # persisted before it is served
                # The same rebuild every other replica does on the notification, here before replying.
                await asyncio.to_thread(self._refresh_index)
            log.info("knowledge upserted", extra={"chat_upserted": str(len(accepted))})
        return chat_pb2.UpsertKnowledgeResponse(upserted_count=len(accepted), rejected=rejected)

    # --- product copy ---------------------------------------------------------------------------
    async def generate_product_copy(
        self, request: chat_pb2.GenerateProductCopyRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GenerateProductCopyResponse:
        pr = request.product
        # The price: list_price, or the deprecated price (until v2); both given must agree.
        old = pr.price if pr.HasField("price") else None
        price, disagreements = reconcile(
            pr.list_price if pr.HasField("list_price") else None,
            "product.list_price",
            old.amount if old is not None else 0.0,
            "product.price.amount",
            old.currency_code if old is not None else "",
            "product.price.currency_code",
            old_present=old is not None,
        )
        facts = ProductFacts(
            name=pr.name.strip(),
            category=pr.category.strip(),
            attributes=dict(pr.attributes),
            price=(price.currency, float(price.value)) if price is not None else None,
            length_cm=pr.length_cm,
            width_cm=pr.width_cm,
            height_cm=pr.height_cm,
            weight_kg=pr.weight_kg,
        )
        language = request.target_language.strip().lower()
        market = request.target_market.strip().upper()
        paths = (price.currency_path, price.value_path) if price is not None else ("", "")
        raise_if(merged(disagreements, validate_copy_request(facts, language, market, paths)))
        loaded = self.slot.require()
        copy = build_template(facts, language, market)
        generator = chat_pb2.COPY_GENERATOR_TEMPLATE
        llm = loaded.model.llm
        if llm is not None and language in llm.languages and not self.llm_saturated:
            messages = [
                {"role": "system", "content": COPY_SYSTEM_PROMPT},
                {"role": "user", "content": "Facts:\n- " + "\n- ".join(copy.facts)},
            ]
            parts = []
            try:
                async for delta in self._generate(llm, messages):
                    parts.append(delta)
            except GenerationError as exc:
                log.warning("LLM copy failed (%s); using the template", exc)
                parts = []
            text = clean_copy("".join(parts)).strip()
            if text:
                copy.description = text
                generator = chat_pb2.COPY_GENERATOR_LLM
        return chat_pb2.GenerateProductCopyResponse(
            title=copy.title,
            bullets=copy.bullets,
            description=copy.description,
            language=language,
            generator=generator,
            model=model_info(loaded.manifest),
        )


def _user_of(request_user_id: str) -> str:
    """The user a call is for: the trusted caller's; the request's only without a trusted identity."""
    who = caller()
    return who.user if who.trusted else request_user_id


def _visible(session: SessionRecord, admin_ok: bool) -> bool:
    """Whether the caller may see (or, ``admin_ok``, end) the session: its owner, or an admin. Without
    a trusted identity (no token configured) the session id, a 128-bit random key, is the credential."""
    who = caller()
    if not who.trusted:
        return True
    return session.user_id == who.user or (admin_ok and who.has_scope("admin"))


class _Servicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, service: ChatService) -> None:
        self._s = service

    def Converse(self, request: Any, context: Any) -> Any:
        return self._s.converse(request, context)

    async def GetSession(self, request: Any, context: Any) -> Any:
        return await self._s.get_session(request, context)

    async def EndSession(self, request: Any, context: Any) -> Any:
        return await self._s.end_session(request, context)

    async def UpsertKnowledge(self, request: Any, context: Any) -> Any:
        return await self._s.upsert_knowledge(request, context)

    async def GenerateProductCopy(self, request: Any, context: Any) -> Any:
        return await self._s.generate_product_copy(request, context)
