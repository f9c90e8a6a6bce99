"""Fixtures: one tiny model trained once per session on the synthetic stream, real risk servers, and
real PostgreSQL + Redis (``tests/stores.py``) for the shared backend."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from google.protobuf import timestamp_pb2

from services.risk.config import RiskSettings
from services.risk.features import RatesTable, Tx
from services.risk.features import tx_to_proto as to_proto
from services.risk.server import build
from services.risk.state import LabelledTx
from services.risk.train import Dataset, TrainConfig, TrainResult, build_dataset, fit, save_version
from services.runtime.server import Server
from tests.risk.synth import stream
from tests.stores import shared_fields

TINY = TrainConfig(trees=40, forest_trees=25, early_stopping=15, threads=1, progress=False, plots=True)


@dataclass
class Trained:
    models_dir: Path
    version: str
    result: TrainResult
    dataset: Dataset
    labelled: list[LabelledTx]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    models_dir = tmp_path_factory.mktemp("risk-models")
    labelled = stream()
    rates = RatesTable.load()
    dataset = build_dataset(labelled, rates, progress=False)
    result = fit(dataset, rates, TINY)
    version = save_version(models_dir, result, "synthetic-test-stream", {"synthetic": True}, plots=True)
    return Trained(models_dir, version, result, dataset, labelled)


def risk_settings(models_dir: Path, state_dir: Path, **overrides: Any) -> RiskSettings:
    """Settings of a server under test; embedded state in ``state_dir`` unless overridden."""
    base: dict[str, Any] = dict(
        service="risk",
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        models_dir=models_dir,
        device="cpu",
        state_dir=state_dir,
    )
    base.update(overrides)
    return RiskSettings(**base)


def shared_settings(models_dir: Path, state_dir: Path, pg: str, rd: str, **overrides: Any) -> RiskSettings:
    """Settings of a replica on the shared backend (PostgreSQL ``pg`` + Redis ``rd``)."""
    return risk_settings(
        models_dir,
        state_dir,
        **shared_fields(pg, rd),
        state_timeout_s=1.0,
        **overrides,
    )


@pytest.fixture
async def server(trained: Trained, tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(risk_settings(trained.models_dir, tmp_path / "state"), build)
    await srv.start()
    yield srv
    await srv.stop(grace=1)


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[risk_pb2_grpc.RiskServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield risk_pb2_grpc.RiskServiceStub(channel)


def ts(ms: int) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromMilliseconds(ms)
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


def good_transaction(**overrides: Any) -> risk_pb2.Transaction:
    """A valid transaction from a minute ago (42.50 EUR in ``total``); keyword arguments replace
    fields. Overriding the deprecated ``amount`` or ``currency`` sends the amount in those instead
    (still accepted until v2), so that the override is what the server sees."""
    base = Tx(
        transaction_id="tx-1",
        user_id="user-1",
        card="card-1",
        amount=42.5,
        currency="EUR",
        occurred_ms=now_ms() - 60_000,
        device="device-1",
        ip_country="DE",
        billing_country="DE",
        shipping_country="DE",
    )
    t = to_proto(base)
    if "amount" in overrides or "currency" in overrides:
        t.ClearField("total")
        t.amount, t.currency = base.amount, base.currency
    for key, value in overrides.items():
        if isinstance(value, timestamp_pb2.Timestamp):
            getattr(t, key).CopyFrom(value)
        else:
            setattr(t, key, value)
    return t
