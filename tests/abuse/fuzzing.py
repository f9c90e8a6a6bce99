"""Fuzz every gRPC method of every running process with ``protofuzz`` strategies; shared by the fuzz test
and ``make bench-abuse`` so both count the same thing.

A method is called the way its real callers call it: a backend with the internal token and an identity
holding every scope (as the gateway does for an admin), so that validation of admin RPCs is reached
too; the gateway's own gRPC API with the admin API key. Besides well-formed messages, one draw in six
is bytes that are not a valid message at all (a cut or corrupted serialization, or garbage), which
covers invalid UTF-8 in string fields and broken varints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from cbec.chat.v1 import chat_pb2
from cbec.common.v1 import common_pb2
from cbec.gateway.v1 import gateway_pb2
from cbec.recommender.v1 import recommender_pb2
from cbec.risk.v1 import risk_pb2
from cbec.sentiment.v1 import sentiment_pb2
from cbec.vision.v1 import vision_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.abuse.protofuzz import SERVER_FAULTS, call_verdict, strategy_for
from tests.abuse.suite import Suite

SERVICES: dict[str, ServiceDescriptor] = {
    "recommender": recommender_pb2.DESCRIPTOR.services_by_name["RecommenderService"],
    "chat": chat_pb2.DESCRIPTOR.services_by_name["ChatService"],
    "sentiment": sentiment_pb2.DESCRIPTOR.services_by_name["SentimentService"],
    "vision": vision_pb2.DESCRIPTOR.services_by_name["VisionService"],
    "risk": risk_pb2.DESCRIPTOR.services_by_name["RiskService"],
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
}
ADMIN = common_pb2.DESCRIPTOR.services_by_name["ModelAdminService"]
CALL_TIMEOUT_S = 60.0  # liveness, not speed: a bounded fuzz input must be answered well within it


@dataclass(frozen=True)
class Target:
    process: str
    service: ServiceDescriptor
    method: MethodDescriptor

    @property
    def id(self) -> str:
        return f"{self.process}:{self.service.name}.{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"


def targets() -> list[Target]:
    """Every method of every service, and the model-admin API on each model service."""
    out = [Target(name, service, m) for name, service in SERVICES.items() for m in service.methods]
    out += [Target(name, ADMIN, m) for name in SERVICES if name != "gateway" for m in ADMIN.methods]
    return out


def wire(descriptor: Any) -> st.SearchStrategy[bytes]:
    """Serialized requests: mostly valid messages, sometimes cut, corrupted or plain garbage bytes."""
    valid = strategy_for(descriptor).map(lambda m: m.SerializeToString())

    def corrupt(data: bytes, at: int, byte: int) -> bytes:
        if not data:
            return bytes([byte])
        i = at % len(data)
        return data[:i] + bytes([byte]) + data[i + 1 :]

    broken = st.one_of(
        st.builds(lambda d, n: d[: n % (len(d) + 1)], valid, st.integers(0, 2**16)),
        st.builds(corrupt, valid, st.integers(0, 2**16), st.integers(0, 255)),
        st.binary(min_size=1, max_size=64),
        st.sampled_from((b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x02\xc3\x28", b"\xff" * 11, b"\x0b")),
    )

    @st.composite
    def draw(d: st.DrawFn) -> bytes:
        return d(broken) if d(st.integers(0, 5)) == 5 else d(valid)

    return draw()


def requests_for(target: Target) -> st.SearchStrategy[Any]:
    """One serialized request, or a short list of them for a client-streaming method."""
    one = wire(target.method.input_type)
    return st.lists(one, max_size=3) if target.method.client_streaming else one


@dataclass
class Stats:
    requests: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    server_faults: int = 0  # INTERNAL / UNKNOWN / DATA_LOSS
    problems: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # a process died or stopped answering health

    def merge(self, other: Stats) -> None:
        self.requests += other.requests
        for code, n in other.codes.items():
            self.codes[code] = self.codes.get(code, 0) + n
        self.server_faults += other.server_faults
        self.problems += other.problems
        self.crashes += other.crashes


class Caller:
    """Channels to every process of a suite (kept open), and one generic call per target."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.channels = {n: grpc.insecure_channel(suite.address(n), options=options) for n in suite.processes}
        self._admin = (("x-api-key", suite.keys["admin"]),)
        self._trusted = suite.trusted_metadata(user="fuzz-user")

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def metadata(self, target: Target) -> tuple[tuple[str, str], ...]:
        return self._admin if target.process == "gateway" else self._trusted

    def invoke(self, target: Target, request: Any) -> grpc.RpcError | None:
        """Send ``request`` (bytes, or a list of bytes for client streaming); the error, or None."""
        channel = self.channels[target.process]
        m = target.method
        kind = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(m.client_streaming, m.server_streaming)]
        fn = kind(target.path, request_serializer=_raw, response_deserializer=_raw)
        md = self.metadata(target)
        try:
            if m.client_streaming:
                result = fn(iter(request), timeout=CALL_TIMEOUT_S, metadata=md)
            else:
                result = fn(request, timeout=CALL_TIMEOUT_S, metadata=md)
            if m.server_streaming:
                for _ in result:
                    pass
        except grpc.RpcError as exc:
            return exc
        return None

    def healthy(self, process: str) -> str | None:
        """None when the process is alive and SERVING, else what is wrong."""
        p = self.suite.processes[process]
        if not p.alive:
            return f"{process} exited with status {p.proc.returncode if p.proc else '?'}"
        try:
            reply = health_pb2_grpc.HealthStub(self.channels[process]).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            return f"{process} health check failed: {exc.code().name}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"{process} reports {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None


def _raw(data: bytes) -> bytes:
    return data


def verdict(error: grpc.RpcError | None) -> list[str]:
    """``call_verdict``, plus what a fuzz run of one sequential caller must never see: a backend that
    sheds load (there is none) or calls a size limit a quota, and a call with no answer at all."""
    problems = call_verdict(error)
    if error is None:
        return problems
    code, details = error.code(), (error.details() or "")  # type: ignore[attr-defined]
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" not in details:
        problems.append(
            f"RESOURCE_EXHAUSTED for one request of one caller (a size limit is a 400): {details}"
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        problems.append(f"no answer within {CALL_TIMEOUT_S:.0f}s")
    return problems


def fuzz(
    caller: Caller,
    target: Target,
    examples: int,
    strict: bool,
    on_call: Callable[[], None] | None = None,
) -> Stats:
    """``examples`` hypothesis draws sent to ``target`` (derandomized: the same inputs every run).

    ``strict``: the first problem fails (hypothesis then shrinks it to a minimal request and raises);
    otherwise every problem is counted in the returned ``Stats`` (the benchmark).
    """
    stats = Stats()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(requests_for(target))
    def run(request: Any) -> None:
        error = caller.invoke(target, request)
        stats.requests += 1
        code = "OK" if error is None else error.code().name  # type: ignore[attr-defined]
        stats.codes[code] = stats.codes.get(code, 0) + 1
        if error is not None and error.code() in SERVER_FAULTS:  # type: ignore[attr-defined]
            stats.server_faults += 1
        problems = verdict(error)
        sick = caller.healthy(target.process)
        if sick is not None:
            stats.crashes.append(f"{target.id}: {sick}")
        if on_call is not None:
            on_call()
        if problems:
            stats.problems.extend(f"{target.id}: {p}" for p in problems)
        if strict:
            assert sick is None, sick
            assert not problems, f"{target.id} ({_describe(target, request)}): " + "; ".join(problems)

    run()
    return stats


def _describe(target: Target, request: Any) -> str:
    """A short, readable account of the request that failed (hypothesis prints the full one)."""
    items: Iterator[bytes] = iter(request) if isinstance(request, list) else iter([request])
    parts = []
    for data in items:
        try:
            cls: type[Message] = _message_class(target)
            text = str(cls.FromString(data)).replace("\n", " ")
        except Exception:  # not a valid message: show the bytes
            text = f"invalid bytes {data[:40]!r}"
        parts.append(text[:300] + ("..." if len(text) > 300 else ""))
    return " | ".join(parts)


def _message_class(target: Target) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(target.method.input_type)
