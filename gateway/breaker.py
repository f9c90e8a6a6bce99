"""A circuit breaker per backend: after N consecutive failures, calls fail at once for a while.

closed -> (``failure_threshold`` consecutive backend failures) -> open -> (``open_s`` later) ->
half-open: one trial call goes through while the others still fail fast; its success closes the
breaker, its failure opens it again. Client errors (INVALID_ARGUMENT, NOT_FOUND, ...) and calls the
caller cancelled count as neither. With gRPC's retry throttling this keeps a dead backend from being
hammered by retries (no retry storms) and gives callers an immediate UNAVAILABLE with a retry hint.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


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
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._on_change = on_change
        self.state = CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self.name, state)

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
        if trial:
            self._trial_in_flight = False
        self.failures = 0
        if self.state != CLOSED:
            self._set(CLOSED)

    def on_failure(self, trial: bool = False) -> None:
        if trial:
            self._trial_in_flight = False
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.failure_threshold):
            self._opened_at = self._clock()
            self._set(OPEN)

    def on_neutral(self, trial: bool = False) -> None:
        """A call that says nothing about the backend's health (client error, caller cancelled)."""
        if trial:
            self._trial_in_flight = False
