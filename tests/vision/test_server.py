"""The gRPC surface on a real server (ephemeral port): index, search, filters, near-duplicates, removal,
stats, bad input, restart, model switch, corrupt files at start."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from cbec.common.v1 import common_pb2, common_pb2_grpc
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.runtime.errors import field_violations
from services.runtime.server import Server
from services.vision.server import VisionService
from tests.support import trusted_channel, with_token
from tests.vision import imagegen
from tests.vision.conftest import index_requests, make_settings, stream, write_finetuned

ITEMS = imagegen.catalogue(n_per=1)  # 20 products: 4 shapes x 5 colours, markets DE/FR


async def index_all(stub: vision_pb2_grpc.VisionServiceStub) -> vision_pb2.IndexProductsResponse:
    return await stub.IndexProducts(stream(index_requests(ITEMS)), timeout=60)


async def test_index_then_search_finds_the_product(stub: vision_pb2_grpc.VisionServiceStub) -> None:
    reply = await index_all(stub)
    assert reply.indexed_count == 20 and not reply.rejected
    assert reply.stats.size == 20 and reply.stats.index_type == "Flat"
    pid, category, market, png = ITEMS[7]
    found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=png, k=5), timeout=30)
    assert len(found.matches) == 5
    top = found.matches[0]
    assert (top.product_id, top.category, top.market) == (pid, category, market)
    assert top.near_duplicate and top.score == pytest.approx(1.0, abs=1e-4)
    assert all(-1.0 <= m.score <= 1.0 for m in found.matches)
    assert [m.score for m in found.matches] == sorted((m.score for m in found.matches), reverse=True)
    assert found.model.name == "vision" and found.model.version


async def test_rephotographed_query_is_flagged_distinct_products_are_not(
    stub: vision_pb2_grpc.VisionServiceStub,
) -> None:
    await index_all(stub)
    pid, *_, png = ITEMS[3]
    copy = imagegen.encode(Image.open(io.BytesIO(png)).resize((150, 150)), "WEBP", quality=85)
    found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=copy, k=5), timeout=30)
    assert found.matches[0].product_id == pid
    assert found.matches[0].near_duplicate
    assert not any(m.near_duplicate for m in found.matches[1:])
    # A new photo of a similar product (same shape and colour, other seed) is a match, not a duplicate.
    other = imagegen.encode(imagegen.draw("circle", "red", seed=424242))
    found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=other, k=3), timeout=30)
    assert not any(m.near_duplicate for m in found.matches)


async def test_filters_by_category_and_market(stub: vision_pb2_grpc.VisionServiceStub) -> None:
    await index_all(stub)
    png = ITEMS[0][3]
    only = await stub.SearchByImage(
        vision_pb2.SearchByImageRequest(image=png, k=20, category="triangle"), timeout=30
    )
    assert len(only.matches) == 5 and {m.category for m in only.matches} == {"triangle"}
    both = await stub.SearchByImage(
        vision_pb2.SearchByImageRequest(image=png, k=20, category="triangle", market="DE"), timeout=30
    )
    expected = {pid for pid, cat, market, _ in ITEMS if cat == "triangle" and market == "DE"}
    assert {m.product_id for m in both.matches} == expected
    none = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=png, market="JP"), timeout=30)
    assert list(none.matches) == []


async def test_remove_and_reindex(stub: vision_pb2_grpc.VisionServiceStub) -> None:
    await index_all(stub)
    pid, *_, png = ITEMS[5]
    reply = await stub.RemoveProducts(
        vision_pb2.RemoveProductsRequest(product_ids=[pid, pid, "no-such-product"]), timeout=30
    )
    assert reply.removed_count == 1 and list(reply.not_found_ids) == ["no-such-product"]
    found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=png, k=20), timeout=30)
    assert pid not in {m.product_id for m in found.matches}
    stats = await stub.GetIndexStats(vision_pb2.GetIndexStatsRequest(), timeout=30)
    assert stats.size == 19
    # Re-indexing an id replaces its picture.
    new_png = imagegen.encode(imagegen.draw("stripes", "black", seed=77))
    reply = await stub.IndexProducts(
        stream([vision_pb2.IndexProductsRequest(product_id=ITEMS[6][0], image=new_png, category="x")]),
        timeout=30,
    )
    assert reply.indexed_count == 1 and reply.stats.size == 19
    found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=new_png, k=1), timeout=30)
    assert found.matches[0].product_id == ITEMS[6][0] and found.matches[0].category == "x"


async def test_stats(stub: vision_pb2_grpc.VisionServiceStub, server: Server) -> None:
    empty = await stub.GetIndexStats(vision_pb2.GetIndexStatsRequest(), timeout=30)
    assert empty.size == 0
    await index_all(stub)
    stats = await stub.GetIndexStats(vision_pb2.GetIndexStatsRequest(), timeout=30)
    assert stats.size == 20
    assert stats.model_version == server.service.slot.current.manifest.version
    assert stats.index_type == "Flat" and stats.dimension == 2024 and not stats.on_gpu
    assert stats.built_time.seconds > 0


async def test_bad_items_in_a_stream_are_rejected_the_rest_indexed(
    stub: vision_pb2_grpc.VisionServiceStub,
) -> None:
    good = index_requests(ITEMS[:3])
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    big = imagegen.encode(Image.fromarray(noise), "PNG")
    assert len(big) > 200_000
    bad = [
        vision_pb2.IndexProductsRequest(product_id="", image=ITEMS[0][3]),
        vision_pb2.IndexProductsRequest(product_id="not-image", image=b"GIF89a not really"),
        vision_pb2.IndexProductsRequest(product_id="bomb", image=imagegen.png_header_bomb(60_000, 60_000)),
        vision_pb2.IndexProductsRequest(product_id="empty", image=b""),
        vision_pb2.IndexProductsRequest(product_id="truncated", image=ITEMS[1][3][:100]),
        vision_pb2.IndexProductsRequest(product_id="huge", image=big),
        vision_pb2.IndexProductsRequest(product_id="x" * 300, image=ITEMS[2][3]),
    ]
    reply = await stub.IndexProducts(stream([good[0], *bad, good[1], good[2]]), timeout=60)
    assert reply.indexed_count == 3 and reply.stats.size == 3
    rejected = {r.index: [(v.field, v.description) for v in r.violations] for r in reply.rejected}
    assert sorted(rejected) == list(range(1, 8))
    assert rejected[1][0][0] == "product_id"
    assert all(fields[0][0] == "image" for i, fields in rejected.items() if i in (2, 3, 4, 5, 6))
    assert "bomb" in rejected[3][0][1]
    assert "bytes" in rejected[6][0][1]
    assert rejected[7][0][0] == "product_id"


async def test_empty_stream_is_invalid(stub: vision_pb2_grpc.VisionServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IndexProducts(stream([]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value)[0][0] == "requests"


@pytest.mark.parametrize(
    ("image", "code", "needle"),
    [
        (b"", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (b"<html>not an image</html>", grpc.StatusCode.INVALID_ARGUMENT, "not a JPEG"),
        (imagegen.png_header_bomb(100_000, 100_000), grpc.StatusCode.INVALID_ARGUMENT, "bomb"),
        (imagegen.png_header_bomb(0, 10), grpc.StatusCode.INVALID_ARGUMENT, ""),
        (ITEMS[0][3][: len(ITEMS[0][3]) // 2], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        # over vision_max_image_bytes (200 kB here): a per-request limit, so INVALID_ARGUMENT, not 429
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 300_000, grpc.StatusCode.INVALID_ARGUMENT, "200000"),
    ],
)
async def test_bad_search_images(
    stub: vision_pb2_grpc.VisionServiceStub, image: bytes, code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=image), timeout=30)
    assert err.value.code() == code
    assert needle in err.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert field_violations(err.value)[0][0] == "image"


async def test_bad_search_arguments(stub: vision_pb2_grpc.VisionServiceStub) -> None:
    png = ITEMS[0][3]
    for request, field in (
        (vision_pb2.SearchByImageRequest(image=png, k=-1), "k"),
        (vision_pb2.SearchByImageRequest(image=png, k=100_000), "k"),
        (vision_pb2.SearchByImageRequest(image=png, category="c" * 500), "category"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SearchByImage(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(err.value)[0][0] == field
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RemoveProducts(vision_pb2.RemoveProductsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("ids", "field", "words"),
    [
        ([""] * 100_000, "product_ids", "at most 1000 items (got 100000)"),
        (["ok", ""], "product_ids[1]", "empty"),
        (["p" * 257], "product_ids[0]", "256"),
    ],
    ids=["100k-empty-ids", "one-empty-id", "long-id"],
)
async def test_bad_removals_are_a_bounded_invalid_argument(
    stub: vision_pb2_grpc.VisionServiceStub, ids: list[str], field: str, words: str
) -> None:
    """100,000 empty ids once gave 100,000 violations: past gRPC's 16 KB trailer limit the client saw
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" with no field named."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RemoveProducts(vision_pb2.RemoveProductsRequest(product_ids=ids), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = field_violations(err.value)
    assert violation[0] == field and words in violation[1]


async def test_a_stream_message_breaking_the_contract_names_its_position(
    stub: vision_pb2_grpc.VisionServiceStub,
) -> None:
    """Each message of a client stream is checked too; the path says which one."""
    requests = [*index_requests(ITEMS[:1]), vision_pb2.IndexProductsRequest(product_id="bad\x00id")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IndexProducts(stream(requests), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["requests[1].product_id"]


async def test_restart_loads_the_snapshot_and_switching_models_reindexes(
    tmp_path: Path, models_dir: Path, tiny_head, projector, threshold
) -> None:
    settings = with_token(make_settings(tmp_path, models_dir))  # LoadModelVersion needs it
    first = Server(settings, VisionService)
    await first.start()
    async with trusted_channel(f"127.0.0.1:{first.grpc_port}") as channel:
        await index_all(vision_pb2_grpc.VisionServiceStub(channel))
    old_version = first.service.slot.current.manifest.version
    await first.stop(grace=1)

    second = Server(settings, VisionService)
    await second.start()
    try:
        assert second.service.slot.current.model.rebuild_reason == ""  # loaded, not rebuilt
        async with trusted_channel(f"127.0.0.1:{second.grpc_port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            stats = await stub.GetIndexStats(vision_pb2.GetIndexStatsRequest(), timeout=30)
            assert stats.size == 20 and stats.model_version == old_version
            # A new model version: LoadModelVersion re-indexes the catalogue with it before it serves.
            new_version = write_finetuned(models_dir, tiny_head, projector, threshold)
            admin = common_pb2_grpc.ModelAdminServiceStub(channel)
            switched = await admin.LoadModelVersion(
                common_pb2.LoadModelVersionRequest(version=new_version), timeout=60
            )
            assert switched.serving.version == new_version and switched.previous.version == old_version
            stats = await stub.GetIndexStats(vision_pb2.GetIndexStatsRequest(), timeout=30)
            assert (stats.size, stats.model_version, stats.dimension) == (20, new_version, 16)
            pid, *_, png = ITEMS[11]
            found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=png, k=3), timeout=30)
            assert found.model.version == new_version
            assert found.matches[0].product_id == pid
    finally:
        await second.stop(grace=1)


async def test_corrupt_catalogue_at_start_refuses_to_serve(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, models_dir)
    settings.state_dir.mkdir(parents=True)
    (settings.state_dir / "vision.sqlite3").write_bytes(b"\x00garbage, not SQLite" * 500)
    srv = Server(settings, VisionService)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await vision_pb2_grpc.VisionServiceStub(channel).SearchByImage(
                    vision_pb2.SearchByImageRequest(image=ITEMS[0][3]), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(grace=1)


async def test_corrupt_index_file_at_start_is_rebuilt(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, models_dir)
    first = Server(settings, VisionService)
    await first.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.grpc_port}") as channel:
        await index_all(vision_pb2_grpc.VisionServiceStub(channel))
    await first.stop(grace=1)
    for path in settings.index_cache_dir.glob("index-*.faiss"):
        payload = bytearray(path.read_bytes())
        payload[len(payload) // 3 : len(payload) // 3 + 64] = b"\xff" * 64
        path.write_bytes(bytes(payload))
    second = Server(settings, VisionService)
    await second.start()
    try:
        assert "corrupt" in second.service.slot.current.model.rebuild_reason
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.grpc_port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            for pid, *_, png in ITEMS[::5]:
                found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=png, k=1), timeout=30)
                assert found.matches[0].product_id == pid
    finally:
        await second.stop(grace=1)


@pytest.mark.parametrize(("spec", "raises"), [("auto", False), ("cuda", True)])
def test_service_takes_the_index_device_from_the_runtime(
    tmp_path: Path, models_dir: Path, spec: str, raises: bool
) -> None:
    """On a GPU node (the runtime's Device says cuda) with this CPU-only faiss build: ``auto`` keeps the
    index on the CPU, an explicit ``cuda`` refuses to start rather than quietly search on the CPU."""
    from services.runtime.device import Device
    from services.runtime.metrics import RuntimeMetrics
    from services.runtime.model_store import ModelStore
    from services.runtime.server import Runtime
    from services.vision.index import IndexDeviceError

    settings = make_settings(tmp_path, models_dir, device=spec)
    runtime = Runtime(settings, RuntimeMetrics("vision"), Device("cuda", 0), ModelStore(models_dir, "vision"))
    if raises:
        with pytest.raises(IndexDeviceError):
            VisionService(runtime)
    else:
        assert VisionService(runtime).gpu is None
