"""The fuzzer's own checks: its strategies reach the abuse they claim to, and its oracle tells a clear
client error from a server fault. Without these, a fuzz run that passes could be a fuzzer that never
sends anything hostile, or an oracle that accepts everything."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cbec.chat.v1 import chat_pb2
from cbec.recommender.v1 import recommender_pb2
from cbec.risk.v1 import risk_pb2
from cbec.vision.v1 import vision_pb2
from google.protobuf.message import Message
from grpc.aio import AioRpcError, Metadata
from hypothesis import HealthCheck, find, settings

from services.runtime.errors import InvalidArgument, ServiceError, Violation, status_metadata
from tests.abuse.fuzzing import targets
from tests.abuse.protofuzz import MAX_ERROR_BYTES, call_verdict, strategy_for

FIND = settings(max_examples=2000, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _strings(message: Message) -> list[str]:
    out: list[str] = []
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for v in values:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, Message):
                out += _strings(v)
    return out


REACHES: list[tuple[str, type[Message], Callable[[Any], bool]]] = [
    ("an undefined enum number", risk_pb2.ReportOutcomeRequest, lambda m: m.outcome not in (0, 1, 2, 3)),
    ("a timestamp before 1970", risk_pb2.ReportOutcomeRequest, lambda m: m.reported_time.seconds < 0),
    ("nanos past a second", risk_pb2.ReportOutcomeRequest, lambda m: m.reported_time.nanos >= 10**9),
    ("a NaN amount", risk_pb2.ScoreTransactionRequest, lambda m: math.isnan(m.transaction.amount)),
    ("a string of 10,000+ characters", recommender_pb2.RecommendRequest,
     lambda m: any(len(s) >= 10_000 for s in _strings(m))),
    ("a control character", chat_pb2.ConverseRequest, lambda m: any(c < " " for s in _strings(m) for c in s)),
    ("10,000+ repeated elements", vision_pb2.RemoveProductsRequest, lambda m: len(m.product_ids) >= 10_000),
    ("an int32 at its edge", recommender_pb2.RecommendRequest, lambda m: m.k in (2**31 - 1, -(2**31))),
    ("a map of 1,000+ entries", chat_pb2.ProductAttributes, lambda m: len(m.attributes) > 1000),
    ("a plausible request", risk_pb2.ScoreTransactionRequest,
     lambda m: m.transaction.currency == "EUR" and m.transaction.amount > 0 and bool(m.transaction.user_id)),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # the huge draws are the point
@pytest.mark.parametrize(("what", "cls", "predicate"), REACHES, ids=[r[0] for r in REACHES])
def test_the_strategies_reach(what: str, cls: type[Message], predicate: Callable[[Any], bool]) -> None:
    found = find(strategy_for(cls.DESCRIPTOR), predicate, settings=FIND)
    assert predicate(found), what


def test_every_method_of_every_service_is_a_target() -> None:
    ids = {t.id for t in targets()}
    assert "risk:RiskService.ScoreTransaction" in ids and "gateway:GatewayService.AssessOrder" in ids
    assert "vision:ModelAdminService.LoadModelVersion" in ids and "vision:VisionService.IndexProducts" in ids
    assert len(ids) == 34  # 24 service methods + 2 admin methods on each of 5 model services


def _error(code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(*trailing), details=details)


def test_the_oracle_refuses_server_faults_and_unnamed_client_errors() -> None:
    assert call_verdict(None) == []
    assert call_verdict(_error(grpc.StatusCode.INTERNAL, "boom"))
    assert call_verdict(_error(grpc.StatusCode.UNKNOWN, "Unexpected <class 'KeyError'>"))
    assert call_verdict(_error(grpc.StatusCode.INVALID_ARGUMENT, "bad input"))  # no field named
    named = InvalidArgument([Violation("transaction.amount", "must be > 0")])
    assert call_verdict(_error(grpc.StatusCode.INVALID_ARGUMENT, named.message, status_metadata(named))) == []
    assert call_verdict(_error(grpc.StatusCode.NOT_FOUND, "no such session")) == []
    over = _error(grpc.StatusCode.RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit")
    assert call_verdict(over)


def test_the_oracle_refuses_an_error_over_4_kb() -> None:
    big = ServiceError(grpc.StatusCode.NOT_FOUND, "x")
    trailing = (*status_metadata(big), ("x-echo", "v" * MAX_ERROR_BYTES))
    assert call_verdict(_error(grpc.StatusCode.NOT_FOUND, "x", trailing))
