"""Fixtures: tiny model versions built by the tests (real backbone, small input), real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc

from services.runtime.model_store import ModelStore
from services.runtime.server import Server
from services.vision import features, model, train
from services.vision.config import VisionSettings
from services.vision.images import ImageLimits, decode
from services.vision.server import VisionService
from tests.support import local_settings, trusted_channel, with_token
from tests.vision import imagegen

IMAGE_SIZE = 32  # the real CNN at 32 px: a few ms per image, enough to tell shapes and colours apart


def write_pretrained(models_dir: Path, duplicates: model.DuplicateProjector, threshold: float) -> str:
    spec = model.pretrained_spec(IMAGE_SIZE, threshold)
    result = train.FitResult(spec, None, duplicates, {"val_precision_at_10": 0.0}, {"kind": "pretrained"})
    return train.write_version(ModelStore(models_dir, "vision"), result)


def write_finetuned(
    models_dir: Path, head: model.ProjectionHead, duplicates: model.DuplicateProjector, threshold: float
) -> str:
    spec = model.ModelSpec("finetuned", IMAGE_SIZE, head.out_dim, threshold)
    result = train.FitResult(spec, head, duplicates, {"val_precision_at_10": 0.0}, {"kind": "finetuned"})
    return train.write_version(ModelStore(models_dir, "vision"), result)


@pytest.fixture(scope="session")
def shape_data() -> dict[str, Any]:
    """Labelled synthetic product photos (label = shape) and their backbone features, computed once."""
    pngs, labels, colours = [], [], []
    for s, shape in enumerate(imagegen.SHAPES):
        for c, colour in enumerate(imagegen.COLOURS):
            for v in range(4):
                pngs.append(
                    imagegen.encode(imagegen.draw(shape, colour, seed=7000 + 97 * s + 13 * v + len(pngs)))
                )
                labels.append(s)
                colours.append(c)
    pixels = np.stack([decode(p, IMAGE_SIZE, ImageLimits()) for p in pngs])
    feats = features.extract(pixels, progress=False)
    return {
        "pngs": pngs,
        "labels": np.array(labels),
        "colours": np.array(colours),
        "pixels": pixels,
        "features": feats,
    }


@pytest.fixture(scope="session")
def tiny_head(shape_data: dict[str, Any]) -> model.ProjectionHead:
    config = train.TrainConfig(image_size=IMAGE_SIZE, epochs=15, batch_size=32, hidden=64, dim=16)
    return train.train_head(shape_data["features"], shape_data["labels"], config, progress=False)


@pytest.fixture(scope="session")
def projector(shape_data: dict[str, Any]) -> model.DuplicateProjector:
    return model.DuplicateProjector.fit(shape_data["features"], dim=32)


@pytest.fixture(scope="session")
def threshold(shape_data: dict[str, Any], projector: model.DuplicateProjector) -> float:
    """Near-duplicate threshold calibrated by the training code on the synthetic photos."""
    embedder = model.Embedder(model.pretrained_spec(IMAGE_SIZE, 1.0), None, projector)
    calibration = train.calibrate_near_duplicates(
        embedder, shape_data["pngs"], projector(shape_data["features"])
    )
    return calibration["near_duplicate_threshold"]


@pytest.fixture
def models_dir(tmp_path: Path, projector: model.DuplicateProjector, threshold: float) -> Path:
    d = tmp_path / "models"
    write_pretrained(d, projector, threshold)
    return d


def make_settings(tmp_path: Path, models_dir: Path, **overrides: Any) -> VisionSettings:
    fields: dict[str, Any] = dict(
        service="vision",
        state_dir=tmp_path / "state",
        vision_data_dir=tmp_path / "data",
        vision_max_image_bytes=200_000,
        vision_max_image_pixels=4_000_000,
        vision_decode_threads=1,
        batch_max_delay_ms=2.0,
    )
    return local_settings(VisionSettings, models_dir, **{**fields, **overrides})


@pytest.fixture
async def server(tmp_path: Path, models_dir: Path) -> AsyncIterator[Server]:
    # With the internal token, as deployed; the stub sends it with the admin scope (RemoveProducts).
    srv = Server(with_token(make_settings(tmp_path, models_dir)), VisionService)
    await srv.start()
    yield srv
    await srv.stop(grace=1)


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[vision_pb2_grpc.VisionServiceStub]:
    async with trusted_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield vision_pb2_grpc.VisionServiceStub(channel)


def index_requests(items: list[tuple[str, str, str, bytes]]) -> list[vision_pb2.IndexProductsRequest]:
    return [
        vision_pb2.IndexProductsRequest(product_id=pid, category=cat, market=market, image=image)
        for pid, cat, market, image in items
    ]


async def stream(
    requests: list[vision_pb2.IndexProductsRequest],
) -> AsyncIterator[vision_pb2.IndexProductsRequest]:
    for request in requests:
        yield request
