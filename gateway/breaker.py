"""A circuit breaker per backend: after enough failures in a row, calls fail at once for a while.

closed -> (``failure_threshold`` counted failures in a row) -> open -> (``open_s`` later) ->
half-open: one trial call goes through while the others still fail fast; its success closes the
breaker, a counted failure opens it again. With gRPC's retry throttling this keeps a dead backend from
being hammered by retries (no retry storms) and gives callers an immediate UNAVAILABLE with a retry hint.

What counts (``backends.Backend.outcome`` sorts each call's end into one of these):

- success: the backend answered, OK or a client error (INVALID_ARGUMENT, NOT_FOUND, ...). It ends the
  run of failures.
- neutral: says nothing about the backend (the caller cancelled, the caller's own short deadline ran
  out, a per-request size limit). It neither counts nor ends the run.
- transport failure: the backend is down, hangs past the gateway's own timeout, or sheds load
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

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
#: Distinct principals remembered in a run of application failures; further ones share one entry.
_MAX_PRINCIPALS = 1024
_OTHERS = "\x00others"


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
