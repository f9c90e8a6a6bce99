"""Rich gRPC errors (``google.rpc.Status`` with details) that domain code raises as exceptions.

A servicer raises ``InvalidArgument([...])`` or ``ResourceExhausted(...)``; the runtime's interceptor
turns it into a status with ``BadRequest`` field violations or ``RetryInfo`` details via grpcio-status,
so no servicer builds status protos by hand.

Every error is bounded here, whatever the caller put in it: a quoted value is cut at
``QUOTE_CHARS`` (use ``quote`` when a message repeats input), a field path at ``FIELD_CHARS`` and a
description at ``DESCRIPTION_CHARS``, the message at ``MESSAGE_CHARS``, and a status carries at most
``MAX_VIOLATIONS`` violations and ``MAX_STATUS_BYTES`` in all, then one "... and N more". Past gRPC's
16 KB trailer limit the client would see only "received metadata size exceeds hard limit", with no
field named.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from cbec.common.v1 import common_pb2
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

REQUEST_ID_KEY = "x-request-id"
QUOTE_CHARS = 64
FIELD_CHARS = 128
DESCRIPTION_CHARS = 256
MESSAGE_CHARS = 512
MAX_VIOLATIONS = 20
#: The whole serialized google.rpc.Status (message and details) stays under this.
MAX_STATUS_BYTES = 4096
#: Room kept for the "... and N more" violation and the other details (RetryInfo, ErrorInfo).
_RESERVED_BYTES = 512


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of (the start of) an input value, for error messages: at most ``limit`` characters of
    it, with the full length said when it was cut."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}..."


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Violation:
    """One bad field: ``field`` is a path such as ``transactions[3].amount``."""

    field: str
    description: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "field", _cut(self.field, FIELD_CHARS))
        object.__setattr__(self, "description", _cut(self.description, DESCRIPTION_CHARS))

    def to_proto(self) -> error_details_pb2.BadRequest.FieldViolation:
        return error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)


def rejection(index: int, violations: Iterable[Violation]) -> common_pb2.ItemRejection:
    """One rejected item of a batch call (the others in the call are kept), with its reasons."""
    return common_pb2.ItemRejection(index=index, violations=[v.to_proto() for v in bounded(violations)])


def bounded(
    violations: Iterable[Violation], budget: int = MAX_STATUS_BYTES - _RESERVED_BYTES
) -> list[Violation]:
    """The first violations that fit ``MAX_VIOLATIONS`` and ``budget`` serialized bytes, then one
    "... and N more" for the rest."""
    found = violations if isinstance(violations, Sequence) else tuple(violations)
    kept: list[Violation] = []
    used = 0
    for v in found:
        size = v.to_proto().ByteSize() + 4  # + tag and length of the repeated element
        if len(kept) == MAX_VIOLATIONS or used + size > budget:
            break
        kept.append(v)
        used += size
    if len(kept) < len(found):
        kept.append(Violation("...", f"... and {len(found) - len(kept)} more"))
    return kept


@dataclass
class ServiceError(Exception):
    """An error that maps to one gRPC status with optional details."""

    code: grpc.StatusCode
    message: str
    violations: Sequence[Violation] = field(default_factory=tuple)
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        # Bounded at construction: the interceptor sends ``message`` as grpc-message and in the status.
        self.message = _cut(self.message, MESSAGE_CHARS)
        budget = MAX_STATUS_BYTES - _RESERVED_BYTES - len(self.message.encode("utf-8", "replace"))
        self.violations = bounded(self.violations, budget)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        if self.violations:
            bad = error_details_pb2.BadRequest(field_violations=[v.to_proto() for v in self.violations])
            details.append(_pack(bad))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def InvalidArgument(violations: Iterable[Violation], message: str | None = None) -> ServiceError:
    found = tuple(violations)
    text = message or "; ".join(f"{v.field}: {v.description}" for v in found[:3]) or "invalid argument"
    if message is None and len(found) > 3:
        text = f"{_cut(text, MESSAGE_CHARS - 40)} (and {len(found) - 3} more)"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, text, found)


def ResourceExhausted(message: str, retry_after_s: float | None = None) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s=retry_after_s)


def NotFound(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def Unavailable(message: str, retry_after_s: float | None = None) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, retry_after_s=retry_after_s)


def DeadlineExceeded(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def raise_if(violations: Sequence[Violation]) -> None:
    """Raise INVALID_ARGUMENT carrying every violation found, or return when there are none."""
    if violations:
        raise InvalidArgument(violations)


def status_metadata(error: ServiceError) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries the rich status (``grpc-status-details-bin``)."""
    return tuple(rpc_status.to_status(error.to_status()).trailing_metadata)


def status_from_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status | None:
    """Client side: the ``google.rpc.Status`` (with details) carried by a failed call, if any."""
    return rpc_status.from_call(error)  # type: ignore[arg-type]


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """Client side: the (field, description) pairs of a failed call's BadRequest detail."""
    status = status_from_error(error)
    out: list[tuple[str, str]] = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out
