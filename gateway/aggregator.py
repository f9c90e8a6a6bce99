"""``GatewayService``: page-level aggregations that fan out to the services concurrently.

Deadlines: the caller's remaining deadline (or ``CBEC_GATEWAY_DEFAULT_DEADLINE_S`` when it set none),
less a small reserve for assembling the answer, bounds every backend call; each backend also has its own
cap (``CBEC_GATEWAY_BACKEND_TIMEOUT_S`` / ``CBEC_GATEWAY_BACKEND_TIMEOUTS``). A part that fails or runs out
of time is left out and listed in ``missing_parts`` with its gRPC code: the page still renders.
``AssessOrder`` is the exception: without a risk decision it fails closed with UNAVAILABLE and never
approves.

The same methods serve the gRPC port (``GatewayServicer``) and the HTTP bridge (called in-process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from cbec.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from cbec.recommender.v1 import recommender_pb2
from cbec.risk.v1 import risk_pb2
from cbec.sentiment.v1 import sentiment_pb2
from cbec.vision.v1 import vision_pb2
from google.rpc import error_details_pb2

from services.runtime.errors import InvalidArgument, ServiceError, Violation

from .auth import bind_user
from .backends import BackendPool
from .config import GatewaySettings
from .descriptors import RouteTable
from .errors import BackendError, GatewayError
from .files import SAFE_ID, FileCache
from .metrics import GatewayMetrics

log = logging.getLogger("cbec.gateway.aggregator")
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
_CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
    }
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class Deadline:
    """An absolute deadline; hands each backend call its share."""

    def __init__(self, remaining_s: float | None, settings: GatewaySettings) -> None:
        budget = (
            settings.default_deadline_s if remaining_s is None else min(remaining_s, settings.max_deadline_s)
        )
        self.settings = settings
        self.at = time.monotonic() + budget
        self.reserve = settings.deadline_reserve_ms / 1000

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def for_backend(self, backend: str) -> float:
        return min(self.settings.backend_timeout(backend), self.remaining() - self.reserve)


class ProductImages:
    """Catalogue images on a mounted volume: ``<dir>/<product_id>.{jpg,jpeg,png,webp}``, cached by mtime."""

    def __init__(self, directory: Path | None, max_cached: int = 256) -> None:
        self.directory = directory
        self._files = FileCache(max_cached)

    async def get(self, product_id: str) -> bytes | None:
        if self.directory is None or not SAFE_ID.match(product_id):
            return None
        for suffix in _IMAGE_SUFFIXES:
            found = await self._files.get(self.directory / f"{product_id}{suffix}")
            if found is not None:
                return found[0]
        return None


def _missing(part: str, error: BaseException) -> gateway_pb2.MissingPart:
    if isinstance(error, BackendError):
        return gateway_pb2.MissingPart(part=part, code=error.code.name, message=error.message)
    if isinstance(error, ServiceError):
        return gateway_pb2.MissingPart(part=part, code=error.code.name, message=error.message)
    log.error("part %s failed unexpectedly", part, exc_info=error)
    return gateway_pb2.MissingPart(part=part, code="INTERNAL", message=f"{part} could not be produced")


def _total(report: sentiment_pb2.GetMarketReportResponse) -> int:
    d = report.distribution
    return d.total or (d.negative + d.neutral + d.positive)


def _summary(
    report: sentiment_pb2.GetMarketReportResponse, market: str
) -> gateway_pb2.SentimentSummary | None:
    d = report.distribution
    total = _total(report)
    if total <= 0:
        return None
    return gateway_pb2.SentimentSummary(
        review_count=total,
        positive_share=d.positive / total,
        negative_share=d.negative / total,
        average_estimated_stars=report.average_estimated_stars,
        market=market,
    )


class Aggregator:
    def __init__(
        self,
        settings: GatewaySettings,
        routes: RouteTable,
        backends: BackendPool,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.backends = backends
        self.metrics = metrics
        self.images = ProductImages(settings.product_images_dir)
        m = routes.methods
        self._recommend = m["cbec.recommender.v1.RecommenderService/Recommend"]
        self._similar = m["cbec.recommender.v1.RecommenderService/SimilarItems"]
        self._report_method = m["cbec.sentiment.v1.SentimentService/GetMarketReport"]
        self._search = m["cbec.vision.v1.VisionService/SearchByImage"]
        self._score = m["cbec.risk.v1.RiskService/ScoreTransaction"]
        self._own = {
            name: m[f"{GATEWAY_SERVICE}/{name}"] for name in ("GetHomeFeed", "GetProductPage", "AssessOrder")
        }

    def handlers(self) -> dict[str, Callable[[Any, float | None], Awaitable[Any]]]:
        """In-process handlers by ``pkg.Service/Method`` for the HTTP bridge: (request, remaining_s)."""
        return {
            f"{GATEWAY_SERVICE}/GetHomeFeed": self.get_home_feed,
            f"{GATEWAY_SERVICE}/GetProductPage": self.get_product_page,
            f"{GATEWAY_SERVICE}/AssessOrder": self.assess_order,
        }

    async def _call(self, backend: str, info: Any, request: Any, deadline: Deadline) -> Any:
        b = self.backends.get(backend)
        if b is None:
            raise BackendError.make(
                backend, grpc.StatusCode.UNAVAILABLE, f"no {backend} backend is configured"
            )
        return await b.unary(info, request, deadline.for_backend(backend))

    def _k(self, k: int, default: int) -> int:
        if k < 0 or k > self.settings.max_k:
            raise InvalidArgument(
                [Violation("k", f"must be between 0 and {self.settings.max_k} (0 = default)")]
            )
        return k or default

    async def _report(
        self, product_id: str, market: str, window_s: int, deadline: Deadline
    ) -> tuple[sentiment_pb2.GetMarketReportResponse, str]:
        """The product's market report, and the market it covers: a market without reviews of the
        product in the window gets every market's (as shops show reviews from other countries)."""
        request = sentiment_pb2.GetMarketReportRequest(product_id=product_id, market=market)
        request.window.seconds = window_s
        report = await self._call("sentiment", self._report_method, request, deadline)
        if market and _total(report) == 0:
            request.market = ""
            return await self._call("sentiment", self._report_method, request, deadline), ""
        return report, market

    def _count_missing(self, rpc: str, missing: list[gateway_pb2.MissingPart]) -> None:
        for part in missing:
            self.metrics.partial_responses.labels(rpc, part.part).inc()

    # --- GetHomeFeed ------------------------------------------------------------------------------
    async def get_home_feed(
        self, request: gateway_pb2.GetHomeFeedRequest, remaining_s: float | None
    ) -> gateway_pb2.GetHomeFeedResponse:
        # The user comes from the credentials (auth.bind_user): a feed is always somebody's.
        if not (bind_user(self._own["GetHomeFeed"], request) or request.user_id):
            raise InvalidArgument(
                [Violation("user_id", "userId is required: these credentials are not bound to a user")]
            )
        k = self._k(request.k, self.settings.feed_default_k)
        deadline = Deadline(remaining_s, self.settings)
        response = gateway_pb2.GetHomeFeedResponse()
        missing: list[gateway_pb2.MissingPart] = []
        try:
            recs = await self._call(
                "recommender",
                self._recommend,
                recommender_pb2.RecommendRequest(user_id=request.user_id, k=k, market=request.market),
                deadline,
            )
        except (BackendError, ServiceError) as exc:
            missing.append(_missing("recommendations", exc))
            response.missing_parts.extend(missing)
            self._count_missing("GetHomeFeed", missing)
            return response
        response.strategy = recs.strategy
        limit = asyncio.Semaphore(self.settings.fanout_concurrency)
        window_s = self.settings.feed_sentiment_window_days * 86400

        async def summary(item_id: str) -> gateway_pb2.SentimentSummary | None:
            async with limit:
                return _summary(*await self._report(item_id, request.market, window_s, deadline))

        results = await asyncio.gather(
            *(summary(item.item_id) for item in recs.items), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for item, result in zip(recs.items, results, strict=True):
            feed_item = response.items.add()
            feed_item.item.CopyFrom(item)
            if isinstance(result, gateway_pb2.SentimentSummary):
                feed_item.sentiment.CopyFrom(result)
        if failures:
            part = _missing("sentiment", failures[0])
            if len(failures) < len(results):
                part.message = f"{len(failures)} of {len(results)} items: {part.message}"
            missing.append(part)
        response.missing_parts.extend(missing)
        self._count_missing("GetHomeFeed", missing)
        return response

    # --- GetProductPage ---------------------------------------------------------------------------
    async def get_product_page(
        self, request: gateway_pb2.GetProductPageRequest, remaining_s: float | None
    ) -> gateway_pb2.GetProductPageResponse:
        bind_user(self._own["GetProductPage"], request)
        if not request.product_id:
            raise InvalidArgument([Violation("product_id", "must not be empty")])
        k = self._k(request.k, 10)
        deadline = Deadline(remaining_s, self.settings)
        market = request.market

        async def similar() -> Any:
            r = recommender_pb2.SimilarItemsRequest(
                item_id=request.product_id,
                k=k,
                market=market,
                source=recommender_pb2.SIMILARITY_SOURCE_BLENDED,
            )
            return (await self._call("recommender", self._similar, r, deadline)).items

        async def visual() -> Any:
            image = await self.images.get(request.product_id)
            if image is None:  # the product has no image: nothing to search, nothing missing
                return []
            r = vision_pb2.SearchByImageRequest(image=image, k=k + 1, market=market)
            matches = (await self._call("vision", self._search, r, deadline)).matches
            return [m for m in matches if m.product_id != request.product_id][:k]

        async def sentiment() -> Any:
            window_s = self.settings.product_sentiment_window_days * 86400
            return await self._report(request.product_id, market, window_s, deadline)

        async def also_for_you() -> Any:
            r = recommender_pb2.RecommendRequest(user_id=request.user_id, k=k, market=market)
            r.filters.exclude_item_ids.append(request.product_id)
            return (await self._call("recommender", self._recommend, r, deadline)).items

        parts: dict[str, Callable[[], Awaitable[Any]]] = {
            "similar_items": similar,
            "visually_similar": visual,
            "sentiment": sentiment,
            "also_for_you": also_for_you,
        }
        results = await asyncio.gather(*(fn() for fn in parts.values()), return_exceptions=True)
        response = gateway_pb2.GetProductPageResponse()
        missing = []
        for name, result in zip(parts, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                missing.append(_missing(name, result))
            elif name == "sentiment":
                report, response.sentiment_market = result
                response.sentiment.CopyFrom(report)
            else:
                getattr(response, name).extend(result)
        response.missing_parts.extend(missing)
        self._count_missing("GetProductPage", missing)
        return response

    # --- AssessOrder ------------------------------------------------------------------------------
    async def assess_order(
        self, request: gateway_pb2.AssessOrderRequest, remaining_s: float | None
    ) -> gateway_pb2.AssessOrderResponse:
        if not request.HasField("order"):
            raise InvalidArgument([Violation("order", "is required")])
        bind_user(self._own["AssessOrder"], request)
        deadline = Deadline(remaining_s, self.settings)
        try:
            scored = await self._call(
                "risk", self._score, risk_pb2.ScoreTransactionRequest(transaction=request.order), deadline
            )
        except BackendError as exc:
            if exc.code in _CLIENT_ERRORS:  # the order itself is wrong: say which field
                raise _renamed_client_error(exc) from None
            raise _fail_closed(f"{exc.code.name}: {exc.message}", exc) from None
        if not scored.HasField("assessment") or scored.assessment.decision == risk_pb2.DECISION_UNSPECIFIED:
            raise _fail_closed("the risk service returned no decision", None)
        return gateway_pb2.AssessOrderResponse(assessment=scored.assessment)


def _fail_closed(why: str, exc: BackendError | None) -> GatewayError:
    from .errors import retry_after_s

    retry = retry_after_s(exc.status) if exc is not None else None
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        f"order not assessed, so it must not be approved: risk assessment unavailable ({why})",
        retry_after_s=retry,
        reason="RISK_UNAVAILABLE",
        metadata={"decision": "NONE"},
    )


def _renamed_client_error(exc: BackendError) -> GatewayError:
    """The risk service's violations name ``transaction.*``; the caller sent ``order.*``."""
    violations = []
    for detail in exc.status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                path = v.field
                if path == "transaction" or path.startswith("transaction."):
                    path = "order" + path[len("transaction") :]
                violations.append(Violation(path, v.description))
    return GatewayError(exc.code, exc.message, violations=tuple(violations))


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The gRPC face of the aggregator; the caller's deadline flows into every backend call."""

    def __init__(self, aggregator: Aggregator) -> None:
        self._a = aggregator

    async def GetHomeFeed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._a.get_home_feed(request, context.time_remaining())

    async def GetProductPage(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._a.get_product_page(request, context.time_remaining())

    async def AssessOrder(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._a.assess_order(request, context.time_remaining())
