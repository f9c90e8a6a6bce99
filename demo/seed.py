"""Load the demo catalogue into running services through their gRPC APIs, as a shop would.

``make run``'s launcher calls this once every service reports SERVING: the product photos go to
vision (``IndexProducts``, an upsert by product id) and the reviews to sentiment (``IngestReviews``,
which scores them with the serving model; known review ids are not stored twice). The recommender
needs nothing here: its default model is trained on the catalogue's items and interactions.

Sentiment scoring is the slow part (the encoder reads 15-40 reviews a second on 2 cores), so reviews
are sent only when the store lacks some: the per-category report over the longest window is compared
with what the catalogue holds. Review dates are the catalogue's (SYNTHETIC, fixed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pandas as pd
from cbec.sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc
from tqdm import tqdm

from services.runtime.access import identity_metadata
from services.runtime.channel import client_channel
from services.runtime.config import RuntimeSettings

BATCH = 100
TIMEOUT_S = 120.0
#: The services the loader calls (their contracts set which calls a channel retries).
SENTIMENT = sentiment_pb2.DESCRIPTOR.services_by_name["SentimentService"].full_name
VISION = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return identity_metadata(token, "", "demo-seed")


async def seed_vision(
    channel: grpc.aio.Channel, catalogue_dir: Path, token: str | None, stopping: Callable[[], bool]
) -> int:
    products = json.loads((catalogue_dir / "products.json").read_text())["products"]
    stub = vision_pb2_grpc.VisionServiceStub(channel)

    async def requests() -> AsyncIterator[vision_pb2.IndexProductsRequest]:
        for p in tqdm(products, desc="demo: product photos -> vision", unit="photo"):
            if stopping():
                raise Stopped
            yield vision_pb2.IndexProductsRequest(
                product_id=p["productId"],
                image=(catalogue_dir / p["image"]).read_bytes(),
                category=p["category"],
            )

    reply = await stub.IndexProducts(requests(), timeout=TIMEOUT_S, metadata=_metadata(token))
    if reply.rejected:
        raise RuntimeError(f"vision rejected demo products: {list(reply.rejected)[:3]}")
    return reply.indexed_count


async def _stored_per_category(
    stub: sentiment_pb2_grpc.SentimentServiceStub, categories: list[str], token: str | None
) -> dict[str, int]:
    out = {}
    for category in categories:
        request = sentiment_pb2.GetMarketReportRequest(category=category)
        request.window.seconds = 3650 * 86400
        try:
            report = await stub.GetMarketReport(request, timeout=10, metadata=_metadata(token))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            request.window.seconds = 365 * 86400  # a deployment with a shorter longest window
            report = await stub.GetMarketReport(request, timeout=10, metadata=_metadata(token))
        out[category] = int(report.distribution.total)
    return out


async def seed_sentiment(
    channel: grpc.aio.Channel, catalogue_dir: Path, token: str | None, stopping: Callable[[], bool]
) -> int:
    reviews = pd.read_parquet(catalogue_dir / "reviews.parquet")
    stub = sentiment_pb2_grpc.SentimentServiceStub(channel)
    expected = reviews.groupby("category").size().to_dict()
    stored = await _stored_per_category(stub, sorted(expected), token)
    if all(stored.get(c, 0) >= n for c, n in expected.items()):
        return 0
    sent = 0
    with tqdm(total=len(reviews), desc="demo: reviews -> sentiment (scored)", unit="review") as bar:
        for start in range(0, len(reviews), BATCH):
            if stopping():
                raise Stopped
            request = sentiment_pb2.IngestReviewsRequest()
            for r in reviews.iloc[start : start + BATCH].itertuples():
                review = request.reviews.add(
                    review_id=r.review_id,
                    product_id=r.product_id,
                    category=r.category,
                    market=r.market,
                    text=r.text,
                    rating=int(r.rating),
                )
                review.created_time.FromSeconds(int(r.created))
            reply = await stub.IngestReviews(request, timeout=TIMEOUT_S, metadata=_metadata(token))
            if reply.rejected:
                raise RuntimeError(f"sentiment rejected demo reviews: {list(reply.rejected)[:3]}")
            sent += reply.accepted_count
            bar.update(len(request.reviews))
    return sent


class Stopped(Exception):
    """The launcher was asked to stop while loading."""


async def seed(
    catalogue_dir: Path,
    addresses: dict[str, str],
    token: str | None,
    channel_for: Callable[[str], grpc.aio.Channel] | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, int | str]:
    """Load the catalogue into whichever of vision and sentiment ``addresses`` names; returns how many
    each took, or the error that stopped it (one failing service does not stop the other).

    ``channel_for(address)`` makes the channels (``run`` passes the runtime's ``client_channel`` with
    the environment's settings: TLS per ``CBEC_BACKEND_TLS_*``); None: the runtime's channel with its
    defaults (plaintext). ``stopping()`` is asked between batches.
    """
    make = channel_for or (lambda a: client_channel(a, None, (SENTIMENT, VISION)))
    done: dict[str, int | str] = {}
    steps = {"vision": seed_vision, "sentiment": seed_sentiment}
    for name, step in steps.items():
        if name not in addresses or stopping():
            continue
        channel = make(addresses[name])
        try:
            done[name] = await step(channel, catalogue_dir, token, stopping)
        except Stopped:
            break
        except (grpc.aio.AioRpcError, RuntimeError, OSError) as exc:
            detail = (
                f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            )
            done[name] = detail
        finally:
            await channel.close()
    return done


def run(
    catalogue_dir: Path,
    addresses: dict[str, str],
    token: str | None,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, int | str]:
    """``seed`` with the runtime's client channels (TLS/mTLS as the environment configures them)."""
    settings = RuntimeSettings(service="gateway")
    services = (SENTIMENT, VISION)
    return asyncio.run(
        seed(catalogue_dir, addresses, token, lambda a: client_channel(a, settings, services), stopping)
    )
