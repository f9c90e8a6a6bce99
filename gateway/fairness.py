"""A fair share of each backend per caller, so one key cannot starve the others of a backend.

Each backend has a cap of in-flight calls from this gateway (``CBEC_GATEWAY_BACKEND_MAX_IN_FLIGHT``), shared
among the principals (API keys, JWT subjects) that have calls in flight to it. While fewer than ``cap``
calls are in flight anyone may start one: the share only matters when the backend is contended. Once
it is full, a principal may start a call only while it holds fewer than its share,
``max(min_share, cap // active principals)`` (``CBEC_GATEWAY_BACKEND_MIN_SHARE``); otherwise the call is
refused at once with RESOURCE_EXHAUSTED, reason ``FAIR_SHARE_EXCEEDED`` and a RetryInfo.

So a key that took the whole backend while it was alone gets no new call until it is back under its
share, while a newcomer always gets in, up to ``min_share``. The total may therefore pass the cap by
the newcomers' shares for a moment: the cap is where sharing starts, not a hard ceiling (each backend
sheds on its own beyond ``CBEC_MAX_CONCURRENT_CALLS``). There is no queue: a refused call costs
nothing and its caller's deadline is better spent on a retry than waiting behind a greedy key.

Own code, not a library: asyncio's semaphores and the rate limiters on PyPI bound a total or a rate,
none a per-key share of concurrency that shrinks as keys arrive; this is a dict of counters per
backend, checked and updated synchronously on the event loop (no lock needed).
"""

from __future__ import annotations

from collections.abc import Callable


class FairShareExceeded(Exception):
    def __init__(self, backend: str, principal: str, held: int, share: int) -> None:
        super().__init__(f"{principal or 'anonymous'} holds {held} calls to {backend}, its share is {share}")
        self.backend = backend
        self.principal = principal
        self.held = held
        self.share = share


class Slot:
    """One admitted call; ``release`` (idempotent) gives the place back."""

    __slots__ = ("_owner", "principal")

    def __init__(self, owner: FairShare, principal: str) -> None:
        self._owner: FairShare | None = owner
        self.principal = principal

    def release(self, *_: object) -> None:
        """Give the place back; safe to call more than once (also usable as a done callback)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self.principal)

    @property
    def released(self) -> bool:
        return self._owner is None


class FairShare:
    """The in-flight calls to one backend, per principal."""

    def __init__(
        self,
        backend: str,
        cap: int,
        min_share: int,
        on_change: Callable[[FairShare], None] | None = None,
    ) -> None:
        self.backend = backend
        self.cap = cap
        self.min_share = min_share
        self.in_flight = 0
        self._held: dict[str, int] = {}
        self._on_change = on_change

    @property
    def active(self) -> int:
        """Principals with at least one call in flight."""
        return len(self._held)

    def held(self, principal: str) -> int:
        return self._held.get(principal, 0)

    def share(self, principal: str) -> int:
        """What ``principal`` may hold while the backend is full (counting itself as active)."""
        active = len(self._held) + (principal not in self._held)
        return max(self.min_share, self.cap // active)

    def acquire(self, principal: str) -> Slot:
        """Admit one call for ``principal`` or raise ``FairShareExceeded``."""
        held = self._held.get(principal, 0)
        if self.in_flight >= self.cap:
            share = self.share(principal)
            if held >= share:
                raise FairShareExceeded(self.backend, principal, held, share)
        self._held[principal] = held + 1
        self.in_flight += 1
        if self._on_change is not None:
            self._on_change(self)
        return Slot(self, principal)

    def _release(self, principal: str) -> None:
        held = self._held.get(principal, 0)
        if held <= 0:  # pragma: no cover - a Slot releases once
            return
        if held == 1:
            del self._held[principal]
        else:
            self._held[principal] = held - 1
        self.in_flight -= 1
        if self._on_change is not None:
            self._on_change(self)
