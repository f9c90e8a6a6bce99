"""A circuit breaker per called service: after enough failures in a row, calls fail at once for a while.

Every client of another service has one (``channel.circuit_breaker``): the gateway one per backend,
chat one for sentiment. Our own code: the per-principal rules below are what no breaker library has.

closed -> (``failure_threshold`` counted failures in a row) -> open -> (``open_s`` later) ->
half-open: one trial call goes through while the others still fail fast; its success closes the
breaker, a counted failure opens it again. With gRPC's retry throttling this keeps a dead backend from
being hammered by retries (no retry storms) and gives callers an immediate UNAVAILABLE with a retry hint.

What counts (the gateway's ``gateway.backends.Backend.outcome`` sorts each call's end into one of
these; other callers use ``CircuitBreaker.guard``, whose ``outcome`` applies the same rules to a call
whose deadline the caller itself chose):

- success: the backend answered, OK or a client error (INVALID_ARGUMENT, NOT_FOUND, ...). It ends the
  run of failures.
- neutral: says nothing about the backend (the caller cancelled, the caller's own short deadline ran
  out, a per-request size limit). It neither counts nor ends the run.
- transport failure: the backend is down, hangs past the caller's own timeout, or sheds load
  (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED with a RetryInfo). It counts whoever sent it: no
  caller can make a healthy backend refuse connections or shed.
- application failure: INTERNAL, UNKNOWN, DATA_LOSS. A bug, or an input that crashes the backend, which
  one hostile key can send over and over. So each failure is attributed to its principal, and within
  the current run of failures
    * application failures count only once they come from at least ``min_principals`` distinct
      principals (one key alone never opens the breaker), and
    * each principal adds at most ``ceil(failure_threshold / min_principals)`` of them (one loud key and
      one incidental failure from another do not open it either).
  Transport and application failures add up. In half-open, a trial failure reopens the breaker only if
  it counts under these rules; one that does not (an application failure from a key that has already
  used up its share of the run) releases the trial and the next call is tried.

A run of failures ends with a success; it is not reset when the breaker opens, so a key's share stays
used up across open and half-open. ``min_principals=1`` is the classic breaker (every failure counts).
Two colluding keys can still trip it; the per-key rate limits and fair share bound how fast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType

import grpc
from google.rpc import error_details_pb2, status_pb2

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
#: Distinct principals remembered in a run of application failures; further ones share one entry.
_MAX_PRINCIPALS = 1024
_OTHERS = "\x00others"
#: How a call's end counts (``outcome``).
OUTCOMES = SUCCESS, NEUTRAL, TRANSPORT_FAILURE, APPLICATION_FAILURE = (
    "success",
    "neutral",
    "transport_failure",
    "application_failure",
)
#: The service failed on this request (a bug, or an input that crashes it): counted per principal.
APPLICATION_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class CircuitOpen(Exception):
    def __init__(self, name: str, retry_after_s: float) -> None:
        super().__init__(f"circuit open for {name}")
        self.name = name
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_threshold: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] | None = None,
        min_principals: int = 2,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.min_principals = max(1, min_principals)
        #: The most application failures one principal adds to a run.
        self.per_principal = math.ceil(failure_threshold / self.min_principals)
        self._clock = clock
        self._on_change = on_change
        self.state = CLOSED
        self._transport = 0
        self._application: dict[str, int] = {}
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def failures(self) -> int:
        """The failures of the current run that count towards opening (see the module docstring)."""
        if len(self._application) < self.min_principals:
            return self._transport
        capped = sum(min(n, self.per_principal) for n in self._application.values())
        return self._transport + capped

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self.name, state)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(OPEN)

    def before_call(self) -> bool:
        """Admit a call or raise ``CircuitOpen``; returns True when the call is the half-open trial."""
        if self.state == CLOSED:
            return False
        now = self._clock()
        remaining = self._opened_at + self.open_s - now
        if self.state == OPEN and remaining <= 0:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        raise CircuitOpen(self.name, max(remaining, 0.0) or self.open_s)

    def on_success(self, trial: bool = False) -> None:
        """The backend answered (OK or a client error): the run of failures ends."""
        if trial:
            self._trial_in_flight = False
        self._transport = 0
        self._application.clear()
        if self.state != CLOSED:
            self._set(CLOSED)

    def on_failure(self, trial: bool = False, *, principal: str = "", application: bool = False) -> None:
        """A backend failure: a transport failure, or (``application=True``) an INTERNAL/UNKNOWN/DATA_LOSS
        from a call made for ``principal``."""
        if trial:
            self._trial_in_flight = False
        before = self.failures
        if application:
            key = principal
            if key not in self._application and len(self._application) >= _MAX_PRINCIPALS:
                key = _OTHERS
            self._application[key] = self._application.get(key, 0) + 1
        else:
            self._transport += 1
        counted = self.failures
        if self.state == HALF_OPEN:
            if counted > before:
                self._open()
        elif self.state == CLOSED and counted >= self.failure_threshold:
            self._open()

    def on_neutral(self, trial: bool = False) -> None:
        """A call that says nothing about the backend's health (caller cancelled, caller's deadline)."""
        if trial:
            self._trial_in_flight = False

    def guard(self, principal: str = "") -> Guard:
        """``async with breaker.guard(principal): await stub.Method(...)``: admits the call (raises
        ``CircuitOpen`` when open) and counts how it ends (``outcome``); exceptions pass through."""
        return Guard(self, principal)


def is_load_shedding(error: grpc.RpcError) -> bool:
    """A RESOURCE_EXHAUSTED that says "busy, come back later": the runtime sheds with a ``RetryInfo``
    in the rich status; without one it is a per-request limit the request caused."""
    if _code(error) is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    return False


def outcome(error: BaseException | None) -> str:
    """How a call's end counts, for a caller that chose the call's deadline as its own timeout for the
    service (so DEADLINE_EXCEEDED is the service hanging): ``None`` is success."""
    if error is None:
        return SUCCESS
    if not isinstance(error, grpc.RpcError):  # cancelled, or the call never happened (bad request object)
        return NEUTRAL
    code = _code(error)
    if code in APPLICATION_CODES:
        return APPLICATION_FAILURE
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return TRANSPORT_FAILURE
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TRANSPORT_FAILURE if is_load_shedding(error) else NEUTRAL
    if code is grpc.StatusCode.CANCELLED:
        return NEUTRAL
    return SUCCESS  # OK or a client error: the service answered


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


class Guard:
    """One call under a breaker (``CircuitBreaker.guard``)."""

    __slots__ = ("_breaker", "_principal", "_trial")

    def __init__(self, breaker: CircuitBreaker, principal: str) -> None:
        self._breaker = breaker
        self._principal = principal
        self._trial = False

    async def __aenter__(self) -> Guard:
        self._trial = self._breaker.before_call()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        result = outcome(exc)  # a cancelled call (CancelledError) is neutral
        if result == SUCCESS:
            self._breaker.on_success(self._trial)
        elif result == NEUTRAL:
            self._breaker.on_neutral(self._trial)
        else:
            self._breaker.on_failure(
                self._trial, principal=self._principal, application=result == APPLICATION_FAILURE
            )
