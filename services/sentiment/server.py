"""``cbec.sentiment.v1.SentimentService`` on the shared runtime.

Every text goes through the runtime's micro-batcher, one item per text, so a call with many texts and
many calls with one text share the same batches. Inputs are checked before any compute: a bad field
is an INVALID_ARGUMENT naming it (too many texts too: a per-request limit, not load; lengths and
counts are the contract's, checked by the runtime, the settings may be stricter), and a text longer
than the model's token limit is scored on its start with ``truncated`` set (never cut silently).

Reviews live in the runtime's state store (``runtime.database("sentiment")``: an SQLite file under
``CBEC_STATE_DIR``, or the PostgreSQL every replica shares), so a review ingested through any replica
counts in every replica's market report. While the store is down, ``IngestReviews`` and
``GetMarketReport`` are UNAVAILABLE with a retry delay and ``Analyze`` (the model alone) keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cbec.sentiment.v1 import sentiment_pb2 as pb
from cbec.sentiment.v1 import sentiment_pb2_grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram

from services.runtime.admin import model_info
from services.runtime.errors import InvalidArgument, Violation, quote, raise_if, rejection
from services.runtime.model_store import Loaded, Manifest
from services.runtime.server import Runtime

from .config import SentimentSettings
from .encoder import Encoder
from .language import LanguageDetector
from .model import SentimentModel, load_version
from .store import ALL_MARKETS, ReviewStore, StoredReview, two_proportion_test

log = logging.getLogger("cbec.sentiment")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SentimentService"].full_name
MARKETS_FILE = Path(__file__).resolve().parent / "markets.tab"
LABEL_ENUM = (pb.SENTIMENT_NEGATIVE, pb.SENTIMENT_NEUTRAL, pb.SENTIMENT_POSITIVE)
DEFAULT_WINDOW_S = 30 * 86400
MIN_ALERT_REVIEWS = 10


def load_markets(path: Path = MARKETS_FILE) -> frozenset[str]:
    codes = [line.split("\t", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()]
    return frozenset(c for c in codes if len(c) == 2 and not c.startswith("#"))


@dataclass(frozen=True)
class TextResult:
    label: int
    probs: tuple[float, float, float]
    stars: float
    language: str
    language_confidence: float
    truncated: bool
    token_count: int

    def to_proto(self, id_: str) -> pb.TextSentiment:
        return pb.TextSentiment(
            id=id_,
            label=LABEL_ENUM[self.label],
            probabilities=pb.SentimentProbabilities(
                negative=self.probs[0], neutral=self.probs[1], positive=self.probs[2]
            ),
            estimated_stars=self.stars,
            language=self.language,
            language_confidence=self.language_confidence,
            truncated=self.truncated,
            token_count=self.token_count,
        )


def _ms(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


async def _gather_or_cancel(aws: Sequence[Awaitable[Any]]) -> list[Any]:
    """Like gather, but the other items are cancelled as soon as one fails."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


class SentimentService:
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        if not isinstance(settings, SentimentSettings):
            settings = SentimentSettings(**settings.model_dump())
        self.settings = settings
        self.runtime = runtime
        self._encoder: Encoder | None = None
        self.slot = runtime.model_slot(self._load)
        self.batcher = runtime.batcher(self._score_batch, "sentiment")
        self.languages = LanguageDetector()
        self.markets = load_markets()
        # synchronous=NORMAL (WAL): a committed batch survives a killed process, without an fsync per batch.
        self.store = ReviewStore(runtime.database("sentiment", synchronous="NORMAL"))
        r = runtime.metrics.registry
        self.m_truncated = PromCounter(
            "sentiment_texts_truncated",
            "Texts longer than the token limit, scored on their start.",
            registry=r,
        )
        self.m_ingested = PromCounter(
            "sentiment_reviews_ingested", "Reviews stored (duplicates of stored ids excluded).", registry=r
        )
        self.m_rejected = PromCounter(
            "sentiment_reviews_rejected", "Reviews refused for bad fields.", registry=r
        )
        self.m_report = Histogram(
            "sentiment_report_seconds",
            "Time to compute a market report.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

    # --- model -----------------------------------------------------------------------------------
    def _encoder_factory(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder(
                self.settings.sentiment_max_tokens,
                self.settings.sentiment_embed_threads,
                self.runtime.device.torch,
                self.settings.sentiment_int8,
            )
        return self._encoder

    def _load(self, path: Path, manifest: Manifest) -> SentimentModel:
        return load_version(
            path,
            manifest,
            self._encoder_factory,
            self.runtime.device.torch,
            self.settings.sentiment_max_tokens,
        )

    def _score_batch(self, items: list[tuple[SentimentModel, str]]) -> list[TextResult]:
        """Runs in the batcher's worker thread: token limit, language, one model call per model."""
        out: list[TextResult | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (model, _) in enumerate(items):
            groups.setdefault(id(model), []).append(i)
        for rows in groups.values():
            model = items[rows[0]][0]
            prepared = [model.prepare(items[i][1]) for i in rows]
            scores = model.score([p.text for p in prepared])
            for j, i in enumerate(rows):
                lang = self.languages.detect(items[i][1])
                p = scores.probs[j]
                out[i] = TextResult(
                    int(scores.labels[j]),
                    (float(p[0]), float(p[1]), float(p[2])),
                    float(scores.stars[j]),
                    lang.code,
                    lang.confidence,
                    prepared[j].truncated,
                    prepared[j].token_count,
                )
        if any(r is None for r in out):
            raise RuntimeError("a text was not scored")
        return out  # type: ignore[return-value]

    async def _score(
        self, loaded: Loaded[SentimentModel], texts: Sequence[str], context: Any
    ) -> list[TextResult]:
        remaining = context.time_remaining() if context is not None else None
        results = await _gather_or_cancel(
            [self.batcher.submit((loaded.model, t), time_remaining=remaining) for t in texts]
        )
        truncated = sum(r.truncated for r in results)
        if truncated:
            self.m_truncated.inc(truncated)
        return results

    # --- validation ------------------------------------------------------------------------------
    def _text_violation(self, text: str, path: str) -> Violation | None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.settings.sentiment_max_text_bytes:
            return Violation(
                path, f"text is {size} bytes; the limit is {self.settings.sentiment_max_text_bytes} bytes"
            )
        if not text.strip():
            return Violation(path, "must not be empty")
        return None

    def _text_of(self, item: pb.TextInput, path: str) -> tuple[str, list[Violation]]:
        violations: list[Violation] = []
        which = item.WhichOneof("content")
        if which is None:
            return "", [*violations, Violation(f"{path}.content", "set text or utf8_bytes")]
        if which == "utf8_bytes":
            raw = item.utf8_bytes
            if len(raw) > self.settings.sentiment_max_text_bytes:
                return "", [
                    *violations,
                    Violation(
                        f"{path}.utf8_bytes",
                        f"text is {len(raw)} bytes; "
                        f"the limit is {self.settings.sentiment_max_text_bytes} bytes",
                    ),
                ]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return "", [
                    *violations,
                    Violation(f"{path}.utf8_bytes", f"not valid UTF-8: byte {exc.start} ({exc.reason})"),
                ]
        else:
            text = item.text
        bad = self._text_violation(text, f"{path}.{which}")
        if bad:
            violations.append(bad)
        return text, violations

    def _check_count(self, n: int, field: str, limit: int) -> None:
        if n == 0:
            raise InvalidArgument([Violation(field, "at least one item is required")])
        if n > limit:
            raise InvalidArgument(
                [Violation(field, f"must hold at most {limit} items (got {n}): split the call or stream")]
            )

    # --- Analyze ---------------------------------------------------------------------------------
    async def Analyze(self, request: pb.AnalyzeRequest, context: Any) -> pb.AnalyzeResponse:
        self._check_count(len(request.texts), "texts", self.settings.sentiment_max_texts_per_call)
        texts, violations = [], []
        for i, item in enumerate(request.texts):
            text, bad = self._text_of(item, f"texts[{i}]")
            texts.append(text)
            violations.extend(bad)
        raise_if(violations)
        loaded = self.slot.require()
        results = await self._score(loaded, texts, context)
        return pb.AnalyzeResponse(
            results=[r.to_proto(item.id) for r, item in zip(results, request.texts, strict=True)],
            model=model_info(loaded.manifest),
        )

    # --- AnalyzeStream ---------------------------------------------------------------------------
    async def AnalyzeStream(
        self, requests: AsyncIterator[pb.AnalyzeStreamRequest], context: Any
    ) -> AsyncIterator[pb.AnalyzeStreamResponse]:
        """At most ``sentiment_stream_window`` texts in flight: while they are, no more requests are
        read, so gRPC flow control pushes back on a client that sends faster than the model scores."""
        window: asyncio.Queue[tuple[str, asyncio.Future[TextResult], str] | None] = asyncio.Queue(
            maxsize=self.settings.sentiment_stream_window
        )
        failure: list[BaseException] = []

        async def read() -> None:
            try:
                index = 0
                async for request in requests:
                    text, bad = self._text_of(request.text, f"requests[{index}].text")
                    raise_if(bad)
                    loaded = self.slot.require()
                    future = asyncio.ensure_future(
                        self.batcher.submit((loaded.model, text), time_remaining=context.time_remaining())
                    )
                    await window.put((request.text.id, future, loaded.manifest.version))
                    index += 1
            except asyncio.CancelledError:
                raise  # the call is over: nobody reads the window any more
            except Exception as exc:
                failure.append(exc)
            await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                entry = await window.get()
                if entry is None:
                    break
                id_, future, version = entry
                result = await future
                if result.truncated:
                    self.m_truncated.inc()
                yield pb.AnalyzeStreamResponse(result=result.to_proto(id_), model_version=version)
            if failure:
                raise failure[0]
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            while not window.empty():
                entry = window.get_nowait()
                if entry is not None:
                    entry[1].cancel()

    # --- IngestReviews ---------------------------------------------------------------------------
    def _review_violations(self, r: pb.Review, now_ms: int) -> tuple[str, str, int, list[Violation]]:
        v = []
        for name in ("review_id", "product_id"):
            if not getattr(r, name).strip():
                v.append(Violation(name, "must not be empty"))
        market = r.market.strip().upper()
        if market not in self.markets:
            v.append(
                Violation(
                    "market", f"unknown market {quote(r.market)}: use an ISO 3166-1 alpha-2 code such as 'DE'"
                )
            )
        created = now_ms
        if r.HasField("created_time"):  # nanos and 1970..2100: the runtime, by the contract
            created = _ms(r.created_time)
            if created > now_ms + 86_400_000:
                v.append(Violation("created_time", "more than a day in the future"))
        if not 0 <= r.rating <= 5:
            v.append(Violation("rating", "must be 1..5, or 0 for none"))
        bad = self._text_violation(r.text, "text")
        if bad:
            v.append(bad)
        return market, r.review_id.strip(), created, v

    async def IngestReviews(self, request: pb.IngestReviewsRequest, context: Any) -> pb.IngestReviewsResponse:
        self._check_count(len(request.reviews), "reviews", self.settings.sentiment_max_reviews_per_call)
        now_ms = int(time.time() * 1000)
        accepted: list[tuple[pb.Review, str, str, int]] = []
        rejected = []
        seen: dict[str, int] = {}
        for i, review in enumerate(request.reviews):
            market, review_id, created, violations = self._review_violations(review, now_ms)
            if review_id and review_id in seen:
                violations.append(Violation("review_id", f"repeats reviews[{seen[review_id]}] in this call"))
            if violations:
                rejected.append(rejection(i, violations))
                continue
            seen[review_id] = i
            accepted.append((review, market, review_id, created))
        if rejected:
            self.m_rejected.inc(len(rejected))
        loaded = self.slot.require()
        if accepted:
            results = await self._score(loaded, [a[0].text for a in accepted], context)
            rows = [
                StoredReview(
                    review_id=review_id,
                    product_id=review.product_id.strip(),
                    category=review.category.strip(),
                    market=market,
                    created_ms=created,
                    text=review.text,
                    rating=review.rating,
                    label=res.label,
                    probs=res.probs,
                    stars=res.stars,
                    lang=res.language,
                    lang_confidence=res.language_confidence,
                    truncated=res.truncated,
                    model_version=loaded.manifest.version,
                    ingested_ms=now_ms,
                )
                for (review, market, review_id, created), res in zip(accepted, results, strict=True)
            ]
            new, _ = await asyncio.to_thread(self.store.add, rows)
            self.m_ingested.inc(new)
        return pb.IngestReviewsResponse(
            accepted_count=len(accepted), rejected=rejected, model=model_info(loaded.manifest)
        )

    # --- GetMarketReport -------------------------------------------------------------------------
    def _report_args(self, request: pb.GetMarketReportRequest) -> tuple[str, str, str, int, int]:
        v = []
        which = request.WhichOneof("scope")
        scope = getattr(request, which).strip() if which else ""
        if which is None:
            v.append(Violation("scope", "set product_id or category"))
        elif not scope:
            v.append(Violation(which, "must not be empty"))
        market = request.market.strip().upper()
        if market and market not in self.markets:
            v.append(
                Violation(
                    "market",
                    f"unknown market {quote(request.market)}: an ISO 3166-1 alpha-2 code, or empty for all",
                )
            )
        window_s = DEFAULT_WINDOW_S
        if request.HasField("window"):  # a well-formed Duration: the runtime, by the contract
            w = request.window
            window_s = w.seconds + w.nanos / 1e9
            if window_s < 60:
                v.append(Violation("window", "must be at least one minute"))
            elif window_s > self.settings.sentiment_max_window_days * 86400:
                v.append(Violation("window", f"longer than {self.settings.sentiment_max_window_days} days"))
        end_ms = int(time.time() * 1000)
        if request.HasField("end_time"):  # nanos and 1970..2100: the runtime, by the contract
            end_ms = _ms(request.end_time)
            if end_ms <= 0:
                v.append(Violation("end_time", "must be after 1970-01-01"))
        raise_if(v)
        return ("p" if which == "product_id" else "c"), scope, market, end_ms - int(window_s * 1000), end_ms

    def report(
        self, kind: str, scope: str, market: str, start_ms: int, end_ms: int
    ) -> pb.GetMarketReportResponse:
        """The report itself (blocking; runs in a worker thread)."""
        s = self.settings
        length = end_ms - start_ms
        now = self.store.window(kind, scope, market or ALL_MARKETS, start_ms, end_ms)
        before = self.store.window(kind, scope, market or ALL_MARKETS, start_ms - length, start_ms)
        negative, positive = self.store.themes(
            kind, scope, market, start_ms, end_ms, min_count=s.sentiment_min_theme_count
        )
        delta = now.negative_share - before.negative_share if now.total and before.total else 0.0
        p_value = two_proportion_test(now.negative, now.total, before.negative, before.total)
        significant = p_value < s.sentiment_significance
        alerts = []
        if now.total >= MIN_ALERT_REVIEWS and now.negative_share > s.sentiment_alert_negative_share:
            alerts.append(
                pb.Alert(
                    kind="negative_share_high",
                    message=f"{now.negative_share:.0%} of {now.total} reviews are negative",
                    value=now.negative_share,
                    threshold=s.sentiment_alert_negative_share,
                )
            )
        if significant and delta >= s.sentiment_alert_negative_rise:
            alerts.append(
                pb.Alert(
                    kind="negative_share_rising",
                    message=(
                        f"negative share rose from {before.negative_share:.0%} to {now.negative_share:.0%} "
                        f"(p = {p_value:.3g})"
                    ),
                    value=delta,
                    threshold=s.sentiment_alert_negative_rise,
                )
            )
        return pb.GetMarketReportResponse(
            distribution=_distribution(now),
            average_estimated_stars=now.average_stars,
            trend=pb.Trend(
                previous=_distribution(before),
                negative_share_delta=delta,
                p_value=p_value,
                significant=significant,
            ),
            negative_drivers=[
                pb.Theme(term=t.term, language=t.language, score=t.score, count=t.count) for t in negative
            ],
            positive_drivers=[
                pb.Theme(term=t.term, language=t.language, score=t.score, count=t.count) for t in positive
            ],
            alerts=alerts,
            languages=dict(now.languages),
            window_start=_timestamp(start_ms),
            window_end=_timestamp(end_ms),
        )

    async def GetMarketReport(
        self, request: pb.GetMarketReportRequest, context: Any
    ) -> pb.GetMarketReportResponse:
        args = self._report_args(request)
        started = time.perf_counter()
        response = await asyncio.to_thread(self.report, *args)
        self.m_report.observe(time.perf_counter() - started)
        current = self.slot.current
        if current is not None:
            response.model.CopyFrom(model_info(current.manifest))
        return response

    # --- plumbing --------------------------------------------------------------------------------
    def register(self, server: grpc.aio.Server) -> None:
        sentiment_pb2_grpc.add_SentimentServiceServicer_to_server(self, server)  # type: ignore[arg-type]

    async def start(self) -> None:
        self.batcher.start()
        await self._import_legacy()

    async def _import_legacy(self) -> None:
        """Reviews from a ``reviews.db`` of an earlier version into an empty store (never fails start)."""
        path = self.settings.legacy_db_path
        try:
            if not await asyncio.to_thread(path.is_file) or await asyncio.to_thread(self.store.count):
                return
            imported = await asyncio.to_thread(self.store.import_legacy, path)
            log.info("imported reviews from an earlier review file", extra={"path": str(path), "n": imported})
        except Exception as exc:
            log.warning(
                "earlier review file not imported", extra={"path": str(path), "error": str(exc)[:200]}
            )

    async def stop(self) -> None:
        """The runtime closes the store's database after the last call."""


def _distribution(c: Any) -> pb.SentimentDistribution:
    return pb.SentimentDistribution(
        negative=c.negative, neutral=c.neutral, positive=c.positive, total=c.total
    )
