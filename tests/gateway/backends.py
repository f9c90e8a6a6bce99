"""Small real backends for the gateway tests: the generated servicers of every service, on the runtime.

These are test doubles of the model services (deterministic answers from hashes of the input, no
models), but real gRPC servers: the runtime's ``Server`` with health, reflection, the interceptor,
a real model slot (so ``ModelAdminService`` is served) and the real generated servicer base classes.
They validate their input like the real services (INVALID_ARGUMENT with field violations), so the
bridge's fuzz test sees 4xx, never 5xx, for bad input.

A ``Recorder`` sees every call (method, request id, remaining deadline, retry attempt, caller) and
injects faults (a code for the next N calls, a delay, a hang). Run as a script, one process serves
the given backends until SIGTERM (for chaos tests and the benchmark)::

    python -m tests.gateway.backends --models-dir DIR recommender=50051 sentiment=50053
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc
from cbec.common.v1 import common_pb2
from cbec.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from cbec.sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc

from services.runtime.access import caller
from services.runtime.admin import model_info
from services.runtime.config import RuntimeSettings
from services.runtime.errors import InvalidArgument, NotFound, ServiceError, Violation
from services.runtime.model_store import Manifest, ModelSlot, ModelStore
from services.runtime.server import Runtime, Server
from tests.support import local_settings, token_file

NAMES = ("recommender", "chat", "sentiment", "vision", "risk")
CATALOGUE = [f"sku-{i:03d}" for i in range(1, 41)]
CATEGORIES = ("dresses", "tops", "knits", "pants")
MAX_K = 500
MAX_BATCH = 256
MAX_TIMESTAMP_S = 253402300799  # 9999-12-31T23:59:59Z
MAX_WINDOW_S = 3650 * 86400


def h(text: str | bytes) -> int:
    return zlib.crc32(text.encode() if isinstance(text, str) else text)


# --- recording and faults -----------------------------------------------------------------------
@dataclass
class Call:
    method: str
    request_id: str
    time_remaining: float | None
    attempt: int
    caller: str
    #: The user the runtime believed the call is for (``access.caller()``: trusted metadata only).
    user: str = ""
    trusted: bool = False


@dataclass
class Fault:
    code: grpc.StatusCode | None = None
    times: int = -1  # -1: every call
    delay_s: float = 0.0


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    faults: dict[str, Fault] = field(default_factory=dict)

    def fail(self, method: str, code: grpc.StatusCode, times: int = -1) -> None:
        self.faults[method] = Fault(code=code, times=times)

    def delay(self, method: str, seconds: float) -> None:
        self.faults[method] = Fault(delay_s=seconds)

    def clear(self) -> None:
        self.calls.clear()
        self.faults.clear()

    def of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    async def enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        md = dict(context.invocation_metadata() or ())
        self.calls.append(
            Call(
                method,
                str(md.get("x-request-id", "")),
                context.time_remaining(),
                int(md.get("grpc-previous-rpc-attempts", 0)),
                str(md.get("x-cbec-caller", "")),
                caller().user,
                caller().trusted,
            )
        )
        if len(self.calls) > 100_000:
            del self.calls[:50_000]
        fault = self.faults.get(method)
        if fault is None:
            return
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.code is not None and fault.times != 0:
            if fault.times > 0:
                fault.times -= 1
            raise ServiceError(fault.code, f"injected {fault.code.name} in {method}")


def _k(k: int, field_name: str = "k") -> int:
    if k < 0 or k > MAX_K:
        raise InvalidArgument([Violation(field_name, f"must be between 0 and {MAX_K}")])
    return k or 10


def _batch(n: int, field_name: str) -> None:
    if n > MAX_BATCH:
        raise InvalidArgument([Violation(field_name, f"at most {MAX_BATCH} elements")])


class _Base:
    def __init__(self, recorder: Recorder, slot: ModelSlot[Any]) -> None:
        self.recorder = recorder
        self.slot = slot

    def model(self) -> common_pb2.ModelInfo:
        return model_info(self.slot.require().manifest)


# --- recommender ----------------------------------------------------------------------------------
class Recommender(_Base, recommender_pb2_grpc.RecommenderServiceServicer):
    def __init__(self, recorder: Recorder, slot: ModelSlot[Any]) -> None:
        super().__init__(recorder, slot)
        self.items: dict[str, tuple[str, str]] = {
            item: (f"Item {item[-3:]}", CATEGORIES[i % len(CATEGORIES)]) for i, item in enumerate(CATALOGUE)
        }
        self.events: dict[str, int] = {}

    def _item(self, item_id: str, score: float) -> recommender_pb2.RecommendedItem:
        title, category = self.items[item_id]
        return recommender_pb2.RecommendedItem(
            item_id=item_id, score=round(score, 6), title=title, category=category
        )

    def _ranked(self, seed: str, exclude: set[str], categories: Sequence[str], k: int) -> list[Any]:
        ids = sorted(self.items, key=lambda i: h(seed + i))
        out = []
        for rank, item_id in enumerate(ids):
            if item_id in exclude or (categories and self.items[item_id][1] not in categories):
                continue
            out.append(self._item(item_id, 1.0 / (rank + 1)))
            if len(out) == k:
                break
        return out

    async def Recommend(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("Recommend", context)
        k = _k(request.k)
        model = self.model()
        known = request.user_id.startswith("u-") and request.user_id not in ("u-", "u-new")
        strategy = recommender_pb2.STRATEGY_PERSONALISED if known else recommender_pb2.STRATEGY_COLD_START
        exclude = set(request.filters.exclude_item_ids)
        items = self._ranked(request.user_id + request.market, exclude, request.filters.categories, k)
        return recommender_pb2.RecommendResponse(items=items, strategy=strategy, model=model)

    async def SimilarItems(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("SimilarItems", context)
        k = _k(request.k)
        if not request.item_id:
            raise InvalidArgument([Violation("item_id", "must not be empty")])
        if request.item_id not in self.items:
            raise NotFound(f"unknown item {request.item_id!r}")
        items = self._ranked(request.item_id, {request.item_id}, request.categories, k)
        return recommender_pb2.SimilarItemsResponse(items=items, model=self.model())

    async def RecordInteractions(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("RecordInteractions", context)
        _batch(len(request.interactions), "interactions")
        response = recommender_pb2.RecordInteractionsResponse()
        for i, event in enumerate(request.interactions):
            problems = []
            if not event.user_id:
                problems.append(Violation("user_id", "must not be empty"))
            if not event.item_id:
                problems.append(Violation("item_id", "must not be empty"))
            if problems:
                response.rejected.add(index=i, violations=[p.to_proto() for p in problems])
                continue
            self.events[event.user_id] = self.events.get(event.user_id, 0) + 1
            response.accepted_count += 1
        return response

    async def UpsertItems(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("UpsertItems", context)
        _batch(len(request.items), "items")
        response = recommender_pb2.UpsertItemsResponse()
        for i, item in enumerate(request.items):
            if not item.item_id or len(self.items) > 10_000:
                response.rejected.add(
                    index=i, violations=[Violation("item_id", "must not be empty").to_proto()]
                )
                continue
            self.items[item.item_id] = (item.title, item.category)
            response.upserted_count += 1
        return response

    async def ForgetUser(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("ForgetUser", context)
        if not request.user_id:
            raise InvalidArgument([Violation("user_id", "must not be empty")])
        return recommender_pb2.ForgetUserResponse(events_deleted=self.events.pop(request.user_id, 0))


# --- sentiment ------------------------------------------------------------------------------------
def _score(text: str) -> sentiment_pb2.TextSentiment:
    lowered = text.lower()
    positive = sum(lowered.count(w) for w in ("good", "great", "love", "gut", "bien"))
    negative = sum(lowered.count(w) for w in ("bad", "broken", "hate", "schlecht", "mal"))
    if positive > negative:
        label, probs = sentiment_pb2.SENTIMENT_POSITIVE, (0.1, 0.1, 0.8)
    elif negative > positive:
        label, probs = sentiment_pb2.SENTIMENT_NEGATIVE, (0.8, 0.1, 0.1)
    else:
        label, probs = sentiment_pb2.SENTIMENT_NEUTRAL, (0.2, 0.6, 0.2)
    return sentiment_pb2.TextSentiment(
        label=label,
        probabilities=sentiment_pb2.SentimentProbabilities(
            negative=probs[0], neutral=probs[1], positive=probs[2]
        ),
        estimated_stars=1 + 4 * probs[2] + 2 * probs[1] * 0.5,
        language="de" if "gut" in lowered or "schlecht" in lowered else "en",
        language_confidence=0.9,
        token_count=len(text.split()),
    )


def _text_of(item: sentiment_pb2.TextInput, where: str) -> str:
    if item.WhichOneof("content") == "utf8_bytes":
        try:
            return item.utf8_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument([Violation(f"{where}.utf8_bytes", "is not UTF-8")]) from None
    return item.text


class Sentiment(_Base, sentiment_pb2_grpc.SentimentServiceServicer):
    async def Analyze(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("Analyze", context)
        _batch(len(request.texts), "texts")
        results = []
        for i, item in enumerate(request.texts):
            result = _score(_text_of(item, f"texts[{i}]"))
            result.id = item.id
            results.append(result)
        return sentiment_pb2.AnalyzeResponse(results=results, model=self.model())

    async def AnalyzeStream(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        await self.recorder.enter("AnalyzeStream", context)
        version = self.slot.require().manifest.version
        async for request in request_iterator:
            result = _score(_text_of(request.text, "text"))
            result.id = request.text.id
            yield sentiment_pb2.AnalyzeStreamResponse(result=result, model_version=version)

    async def IngestReviews(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("IngestReviews", context)
        _batch(len(request.reviews), "reviews")
        response = sentiment_pb2.IngestReviewsResponse(model=self.model())
        for i, review in enumerate(request.reviews):
            if not review.review_id or not review.text or not 0 <= review.rating <= 5:
                response.rejected.add(
                    index=i,
                    violations=[Violation("review", "needs review_id, text and rating 0..5").to_proto()],
                )
                continue
            response.accepted_count += 1
        return response

    async def GetMarketReport(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("GetMarketReport", context)
        scope = request.WhichOneof("scope")
        key = getattr(request, scope) if scope else ""
        if not key:
            raise InvalidArgument([Violation("scope", "set product_id or category")])
        window = request.window.seconds if request.HasField("window") else 30 * 86400
        if window <= 0 or window > MAX_WINDOW_S:
            raise InvalidArgument([Violation("window", "must be between 1s and 3650 days")])
        end = request.end_time.seconds if request.HasField("end_time") else 1_790_000_000
        if end < 2 * MAX_WINDOW_S or end > MAX_TIMESTAMP_S:
            raise InvalidArgument([Violation("end_time", "out of range")])
        seed = h(key + request.market)
        total = 0 if key.endswith("0") else seed % 50 + 1
        negative = total * (seed % 3) // 10
        positive = (total - negative) * 2 // 3
        neutral = total - negative - positive
        response = sentiment_pb2.GetMarketReportResponse(
            distribution=sentiment_pb2.SentimentDistribution(
                negative=negative, neutral=neutral, positive=positive, total=total
            ),
            average_estimated_stars=round(1 + 4 * positive / total, 4) if total else 0.0,
            model=self.model(),
        )
        response.languages["en"] = total
        response.window_end.seconds = end
        response.window_start.seconds = end - window
        return response


# --- vision ---------------------------------------------------------------------------------------
class Vision(_Base, vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, recorder: Recorder, slot: ModelSlot[Any]) -> None:
        super().__init__(recorder, slot)
        self.index: dict[str, tuple[str, str]] = {
            item: (CATEGORIES[i % 4], "DE") for i, item in enumerate(CATALOGUE)
        }

    def _stats(self) -> vision_pb2.GetIndexStatsResponse:
        return vision_pb2.GetIndexStatsResponse(
            size=len(self.index),
            model_version=self.slot.require().manifest.version,
            index_type="Flat",
            dimension=1280,
        )

    async def IndexProducts(self, request_iterator: Any, context: Any) -> Any:
        await self.recorder.enter("IndexProducts", context)
        response = vision_pb2.IndexProductsResponse()
        i = 0
        async for request in request_iterator:
            if not request.product_id or not request.image:
                response.rejected.add(
                    index=i, violations=[Violation("image", "product_id and image needed").to_proto()]
                )
            elif len(self.index) < 10_000:
                self.index[request.product_id] = (request.category, request.market)
                response.indexed_count += 1
            i += 1
        response.stats.CopyFrom(self._stats())
        return response

    async def SearchByImage(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("SearchByImage", context)
        k = _k(request.k)
        if not request.image:
            raise InvalidArgument([Violation("image", "must not be empty")])
        seed = h(request.image)
        ranked = sorted(self.index, key=lambda p: h(p.encode() + request.image[:64]))
        matches = []
        for rank, product_id in enumerate(ranked):
            category, market = self.index[product_id]
            if (request.category and category != request.category) or (
                request.market and market != request.market
            ):
                continue
            score = 1.0 - rank / (len(ranked) + 1) - (seed % 7) / 100
            matches.append(
                vision_pb2.VisualMatch(
                    product_id=product_id,
                    score=round(score, 6),
                    category=category,
                    market=market,
                    near_duplicate=score > 0.99,
                )
            )
            if len(matches) == k:
                break
        return vision_pb2.SearchByImageResponse(matches=matches, model=self.model())

    async def RemoveProducts(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("RemoveProducts", context)
        _batch(len(request.product_ids), "product_ids")
        response = vision_pb2.RemoveProductsResponse()
        for product_id in request.product_ids:
            if self.index.pop(product_id, None) is None:
                response.not_found_ids.append(product_id)
            else:
                response.removed_count += 1
        return response

    async def GetIndexStats(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("GetIndexStats", context)
        return self._stats()


# --- risk -----------------------------------------------------------------------------------------
def _check_transaction(tx: risk_pb2.Transaction, where: str) -> list[Violation]:
    problems = []
    if not math.isfinite(tx.amount) or tx.amount <= 0 or tx.amount > 1e9:
        problems.append(Violation(f"{where}.amount", "must be a positive amount"))
    if len(tx.currency) != 3 or not tx.currency.isascii() or not tx.currency.isupper():
        problems.append(Violation(f"{where}.currency", "must be an ISO 4217 code such as EUR"))
    return problems


def _assess(tx: risk_pb2.Transaction, model: common_pb2.ModelInfo) -> risk_pb2.RiskAssessment:
    reasons = []
    logit = -3.0
    if tx.ip_country and tx.billing_country and tx.ip_country != tx.billing_country:
        logit += 1.5
        reasons.append(
            risk_pb2.Reason(
                code="COUNTRY_MISMATCH_IP_BILLING",
                description="IP country differs from billing country",
                contribution=1.5,
                feature="ip_billing_mismatch",
                value=1.0,
            )
        )
    if tx.amount > 1000:
        logit += 2.0
        reasons.append(
            risk_pb2.Reason(
                code="HIGH_AMOUNT",
                description="amount far above typical",
                contribution=2.0,
                feature="amount",
                value=tx.amount,
            )
        )
    p = 1 / (1 + math.exp(-logit))
    decision = (
        risk_pb2.DECISION_DECLINE
        if p > 0.6
        else risk_pb2.DECISION_REVIEW
        if p > 0.15
        else risk_pb2.DECISION_APPROVE
    )
    return risk_pb2.RiskAssessment(
        transaction_id=tx.transaction_id,
        fraud_probability=round(p, 6),
        anomaly_score=round(min(1.0, tx.amount / 10_000), 6),
        decision=decision,
        reasons=reasons,
        amount_reference=round(tx.amount, 2),
        reference_currency="USD",
        rates_version="test",
        model=model,
    )


class Risk(_Base, risk_pb2_grpc.RiskServiceServicer):
    def __init__(self, recorder: Recorder, slot: ModelSlot[Any]) -> None:
        super().__init__(recorder, slot)
        self.scored: set[str] = set()

    async def ScoreTransaction(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("ScoreTransaction", context)
        if not request.HasField("transaction"):
            raise InvalidArgument([Violation("transaction", "is required")])
        problems = _check_transaction(request.transaction, "transaction")
        if problems:
            raise InvalidArgument(problems)
        if len(self.scored) < 100_000:
            self.scored.add(request.transaction.transaction_id)
        return risk_pb2.ScoreTransactionResponse(assessment=_assess(request.transaction, self.model()))

    async def ScoreTransactions(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("ScoreTransactions", context)
        _batch(len(request.transactions), "transactions")
        problems = []
        for i, tx in enumerate(request.transactions):
            problems += _check_transaction(tx, f"transactions[{i}]")
        if problems:
            raise InvalidArgument(problems)
        model = self.model()
        return risk_pb2.ScoreTransactionsResponse(
            assessments=[_assess(tx, model) for tx in request.transactions]
        )

    async def ReportOutcome(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("ReportOutcome", context)
        if not request.transaction_id:
            raise InvalidArgument([Violation("transaction_id", "must not be empty")])
        if request.outcome == risk_pb2.OUTCOME_UNSPECIFIED:
            raise InvalidArgument([Violation("outcome", "must be set")])
        return risk_pb2.ReportOutcomeResponse(transaction_known=request.transaction_id in self.scored)


# --- chat -----------------------------------------------------------------------------------------
class Chat(_Base, chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, recorder: Recorder, slot: ModelSlot[Any]) -> None:
        super().__init__(recorder, slot)
        self.sessions: dict[str, chat_pb2.Session] = {}

    async def Converse(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.recorder.enter("Converse", context)
        if not request.message.strip():
            raise InvalidArgument([Violation("message", "must not be empty")])
        session_id = request.session_id or f"s-{h(request.user_id + request.message):08x}"
        answer = f"You said: {request.message[:200]}"
        for word in answer.split(" "):
            yield chat_pb2.ConverseResponse(delta=word + " ")
            if request.message.startswith("!abort"):  # a stream that fails after its first message
                raise ServiceError(grpc.StatusCode.ABORTED, "conversation aborted")
        session = self.sessions.setdefault(
            session_id, chat_pb2.Session(session_id=session_id, user_id=request.user_id)
        )
        if len(session.turns) < 100:
            session.turns.add(role=chat_pb2.ROLE_CUSTOMER, text=request.message[:200], intent="echo")
        if len(self.sessions) > 10_000:
            self.sessions.pop(next(iter(self.sessions)))
        yield chat_pb2.ConverseResponse(
            result=chat_pb2.ConverseResult(
                session_id=session_id,
                intent="echo",
                intent_confidence=0.5,
                language="en",
                confidence=0.5,
                answer_source=chat_pb2.ANSWER_SOURCE_ARTICLE,
                answer=answer,
                model=self.model(),
            )
        )

    async def GetSession(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("GetSession", context)
        session = self.sessions.get(request.session_id)
        if session is None:
            raise NotFound(f"no session {request.session_id!r}")
        return chat_pb2.GetSessionResponse(session=session)

    async def EndSession(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("EndSession", context)
        return chat_pb2.EndSessionResponse(ended=self.sessions.pop(request.session_id, None) is not None)

    async def UpsertKnowledge(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("UpsertKnowledge", context)
        _batch(len(request.articles), "articles")
        response = chat_pb2.UpsertKnowledgeResponse()
        for i, article in enumerate(request.articles):
            if not article.article_id:
                response.rejected.add(
                    index=i, violations=[Violation("article_id", "must not be empty").to_proto()]
                )
            else:
                response.upserted_count += 1
        return response

    async def GenerateProductCopy(self, request: Any, context: Any) -> Any:
        await self.recorder.enter("GenerateProductCopy", context)
        if not request.HasField("product") or not request.product.name:
            raise InvalidArgument([Violation("product.name", "must not be empty")])
        p = request.product
        return chat_pb2.GenerateProductCopyResponse(
            title=p.name[:120],
            bullets=[f"{k}: {v}"[:200] for k, v in sorted(p.attributes.items())][:10],
            description=f"{p.name[:120]} ({p.category[:60]})",
            language=request.target_language or "en",
            generator=chat_pb2.COPY_GENERATOR_TEMPLATE,
            model=self.model(),
        )


# --- services on the runtime --------------------------------------------------------------------
SERVICERS: dict[str, tuple[type[_Base], Any, str]] = {
    "recommender": (
        Recommender,
        recommender_pb2_grpc.add_RecommenderServiceServicer_to_server,
        "cbec.recommender.v1.RecommenderService",
    ),
    "sentiment": (
        Sentiment,
        sentiment_pb2_grpc.add_SentimentServiceServicer_to_server,
        "cbec.sentiment.v1.SentimentService",
    ),
    "vision": (Vision, vision_pb2_grpc.add_VisionServiceServicer_to_server, "cbec.vision.v1.VisionService"),
    "risk": (Risk, risk_pb2_grpc.add_RiskServiceServicer_to_server, "cbec.risk.v1.RiskService"),
    "chat": (Chat, chat_pb2_grpc.add_ChatServiceServicer_to_server, "cbec.chat.v1.ChatService"),
}


def load_model(path: Path, manifest: Manifest) -> dict[str, Any]:
    return json.loads((path / "model.json").read_text())


def write_model(models_dir: Path, name: str) -> str:
    with ModelStore(models_dir, name).new_version(metrics={"auc": 0.9}) as (path, manifest):
        (path / "model.json").write_text(json.dumps({"service": name}))
    return manifest.version


class TestBackend:
    def __init__(self, runtime: Runtime, name: str, recorder: Recorder) -> None:
        cls, self._add, full_name = SERVICERS[name]
        self.service_names: Sequence[str] = (full_name,)
        self.slot: ModelSlot[Any] = runtime.model_slot(load_model)
        self.servicer = cls(recorder, self.slot)

    def register(self, server: grpc.aio.Server) -> None:
        self._add(self.servicer, server)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def backend_settings(name: str, models_dir: Path, port: int = 0, **overrides: Any) -> RuntimeSettings:
    fields: dict[str, Any] = dict(service=name, grpc_port=port, grace_period_s=1.0)
    return local_settings(RuntimeSettings, models_dir, **{**fields, **overrides})


def make_server(
    name: str, models_dir: Path, recorder: Recorder, port: int = 0, token: bool = True, **overrides: Any
) -> Server:
    """``token``: require the tests' internal token (the gateway fixtures send it), as deployed;
    otherwise ``CBEC_INTERNAL_TOKEN_FILE`` decides, if set."""
    if not ModelStore(models_dir, name).newest_valid():
        write_model(models_dir, name)
    if token:
        overrides.setdefault("internal_token_file", token_file())
    return Server(
        backend_settings(name, models_dir, port, **overrides), lambda rt: TestBackend(rt, name, recorder)
    )


async def _serve(specs: list[tuple[str, int]], models_dir: Path) -> None:
    recorder = Recorder()
    servers = [make_server(name, models_dir, recorder, port, token=False) for name, port in specs]
    for server in servers:
        await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        "ready " + " ".join(f"{n}={s.grpc_port}" for (n, _), s in zip(specs, servers, strict=True)),
        flush=True,
    )
    await stop.wait()
    for server in servers:
        await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("backends", nargs="+", help="NAME=PORT")
    args = parser.parse_args()
    specs = []
    for spec in args.backends:
        name, _, port = spec.partition("=")
        if name not in SERVICERS:
            parser.error(f"unknown backend {name!r}")
        specs.append((name, int(port or 0)))
    asyncio.run(_serve(specs, args.models_dir))


if __name__ == "__main__":
    main()
