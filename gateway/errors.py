"""Gateway errors: ``google.rpc.Status`` with details, and gRPC codes to HTTP statuses.

The HTTP mapping is the one ``google/rpc/code.proto`` specifies. A backend's own rich status (what the
runtime sends for every domain error) is passed through with its details; a transport-level failure
(connection refused, deadline, reset) gets a short message naming the backend instead of the raw
channel text, which would leak internal addresses.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.runtime.errors import ServiceError

log = logging.getLogger("cbec.gateway")
DOMAIN = "gateway.cbec.ai"

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

#: The backend could not serve the call, whatever was asked: these count against its breaker, whoever
#: sent the call. DEADLINE_EXCEEDED only when the deadline was the gateway's own and RESOURCE_EXHAUSTED
#: only when it is load shedding (``is_load_shedding``); ``backends.Backend.outcome`` decides.
TRANSPORT_FAILURES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
#: The backend failed on this request: a bug, or an input that crashes it. They count against its
#: breaker only when several principals see them (``breaker.CircuitBreaker``), so one key cannot trip it.
APPLICATION_FAILURES = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
#: Codes that may say the backend (not the request) is in trouble.
BACKEND_FAILURES = TRANSPORT_FAILURES | APPLICATION_FAILURES
#: The backend answered, and the request was wrong: never a backend failure (they reset the breaker's
#: count like a success does, since the backend is plainly up).
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def is_load_shedding(status: status_pb2.Status | None) -> bool:
    """A RESOURCE_EXHAUSTED that says "busy, come back later": the runtime sheds (a full queue, too many
    concurrent calls) with a ``RetryInfo``. Without one it is a per-request size limit or gRPC's own
    message/metadata limit, which the request caused."""
    if status is None or status.code != grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
        return False
    return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


_TRANSPORT_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "is unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer in time",
    grpc.StatusCode.CANCELLED: "call was cancelled",
    grpc.StatusCode.UNKNOWN: "failed",
    grpc.StatusCode.INTERNAL: "failed",
    grpc.StatusCode.DATA_LOSS: "failed",
}


@dataclass
class GatewayError(ServiceError):
    """A ``ServiceError`` that also carries an ``ErrorInfo`` reason (and HTTP headers for the bridge)."""

    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    #: The HTTP status when it is not the code's usual one (413 for a body over the limit).
    http_status: int | None = None

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        if self.reason:
            info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
            status.details.add().Pack(info)
        return status


@dataclass
class BackendError(Exception):
    """A failed backend call: its code, a safe message and the status to show (details included)."""

    backend: str
    code: grpc.StatusCode
    message: str
    status: status_pb2.Status

    def __str__(self) -> str:
        return f"{self.backend}: {self.code.name}: {self.message}"

    @classmethod
    def make(
        cls, backend: str, code: grpc.StatusCode, message: str, retry_after_s: float | None = None
    ) -> BackendError:
        status = ServiceError(code, message, retry_after_s=retry_after_s).to_status()
        return cls(backend, code, message, status)

    @classmethod
    def from_rpc(cls, backend: str, exc: grpc.RpcError) -> BackendError:
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        rich = None
        try:
            rich = rpc_status.from_call(exc)  # type: ignore[arg-type]
        except (ValueError, AttributeError, TypeError):
            rich = None
        if rich is not None:
            return cls(backend, code, rich.message, rich)
        raw = exc.details() if callable(getattr(exc, "details", None)) else ""
        if code in _TRANSPORT_MESSAGES:
            message = f"{backend} backend {_TRANSPORT_MESSAGES[code]}"
            log.debug("backend %s failed: %s: %s", backend, code.name, raw)
        else:
            message = raw or code.name
        return cls(backend, code, message, status_pb2.Status(code=code.value[0], message=message))


def status_of(exc: BaseException) -> status_pb2.Status:
    """The ``google.rpc.Status`` to show for an exception (INTERNAL, without details, for the unknown)."""
    if isinstance(exc, BackendError):
        return exc.status
    if isinstance(exc, ServiceError):
        return exc.to_status()
    return status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    return CODE_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)


def with_request_id(status: status_pb2.Status, request_id: str) -> status_pb2.Status:
    """A copy with a ``RequestInfo`` detail, so a caller can quote the id to support."""
    out = status_pb2.Status()
    out.CopyFrom(status)
    if request_id and not any(d.Is(error_details_pb2.RequestInfo.DESCRIPTOR) for d in out.details):
        out.details.add().Pack(error_details_pb2.RequestInfo(request_id=request_id))
    return out


def status_json(status: status_pb2.Status) -> dict[str, object]:
    """The proto3 JSON form of a status (``{"code", "message", "details": [{"@type", ...}]}``)."""
    try:
        return json_format.MessageToDict(status, always_print_fields_with_no_presence=True)
    except (json_format.Error, TypeError, KeyError):  # a detail type this process does not know
        return {"code": status.code, "message": status.message, "details": []}


def retry_after_s(status: status_pb2.Status) -> float | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
