"""The rules of the circuit breaker (what opens it, per principal), of the fair share, and how a backend
call's end counts for the breaker (``Backend.outcome``): unit tests, without servers."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from gateway.backends import (
    APPLICATION_FAILURE,
    NEUTRAL,
    SUCCESS,
    TRANSPORT_FAILURE,
    Backend,
)
from gateway.config import GatewaySettings
from gateway.descriptors import RouteTable
from gateway.errors import CLIENT_ERRORS, is_load_shedding
from gateway.fairness import FairShare, FairShareExceeded
from gateway.metrics import GatewayMetrics
from services.runtime.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen
from services.runtime.channel import service_config

Code = grpc.StatusCode


def breaker(threshold: int = 5, min_principals: int = 2) -> tuple[CircuitBreaker, list[float]]:
    now = [0.0]
    return CircuitBreaker("x", threshold, 1.0, clock=lambda: now[0], min_principals=min_principals), now


def app(b: CircuitBreaker, principal: str, times: int = 1, trial: bool = False) -> None:
    for _ in range(times):
        b.on_failure(trial, principal=principal, application=True)


# --- the breaker ------------------------------------------------------------------------------------
def test_transport_failures_count_whoever_sends_them() -> None:
    b, _ = breaker(3)
    for _ in range(2):
        b.on_failure(principal="one-key")
    assert b.state == CLOSED
    b.on_failure(principal="one-key")
    assert b.state == OPEN


def test_application_failures_from_one_principal_never_open_it() -> None:
    b, _ = breaker(5)
    app(b, "hostile", 1000)
    assert b.state == CLOSED and b.failures == 0
    assert b.before_call() is False


def test_application_failures_from_two_principals_open_it() -> None:
    b, _ = breaker(5)  # each principal adds at most ceil(5 / 2) = 3
    app(b, "a", 3)
    app(b, "b")
    assert b.state == CLOSED and b.failures == 4
    app(b, "b")
    assert b.state == OPEN


def test_one_loud_principal_and_one_incidental_failure_do_not_open_it() -> None:
    b, _ = breaker(5)
    app(b, "hostile", 100)
    app(b, "someone-else")
    assert b.state == CLOSED and b.failures == 4


def test_one_principals_application_failures_do_not_help_transport_failures() -> None:
    b, _ = breaker(5)
    app(b, "hostile", 10)
    for _ in range(4):
        b.on_failure(principal="hostile")
    assert b.state == CLOSED and b.failures == 4
    b.on_failure()
    assert b.state == OPEN


def test_transport_and_application_failures_add_up() -> None:
    b, _ = breaker(5)
    app(b, "a", 3)
    app(b, "b")
    b.on_failure(principal="c")
    assert b.state == OPEN


def test_a_success_ends_the_run() -> None:
    b, _ = breaker(3)  # 2 per principal
    app(b, "a", 2)
    b.on_success()
    app(b, "b")
    assert b.state == CLOSED and b.failures == 0  # "a" is no longer part of the run


def test_neutral_outcomes_neither_count_nor_end_the_run() -> None:
    b, _ = breaker(3)
    b.on_failure()
    b.on_failure()
    for _ in range(10):
        b.on_neutral()
    assert b.state == CLOSED and b.failures == 2
    b.on_failure()
    assert b.state == OPEN


def test_half_open_trial_reopens_only_on_a_failure_that_counts() -> None:
    b, now = breaker(3)  # 2 per principal
    app(b, "a", 2)
    app(b, "b")
    assert b.state == OPEN
    with pytest.raises(CircuitOpen):
        b.before_call()
    now[0] = 1.5
    assert b.before_call() is True and b.state == HALF_OPEN
    app(b, "a", trial=True)  # "a" already used up its share of this run: says nothing new
    assert b.state == HALF_OPEN
    assert b.before_call() is True  # the trial slot is free again: the next call is tried
    app(b, "c", trial=True)  # a third principal fails too: open again
    assert b.state == OPEN
    now[0] = 3.0
    assert b.before_call() is True
    b.on_failure(trial=True)  # transport failures always count
    assert b.state == OPEN
    now[0] = 4.5
    assert b.before_call() is True
    b.on_success(trial=True)
    assert b.state == CLOSED and b.failures == 0


def test_a_neutral_trial_leaves_it_half_open() -> None:
    b, now = breaker(1)
    b.on_failure()
    now[0] = 2.0
    assert b.before_call() is True
    b.on_neutral(trial=True)
    assert b.state == HALF_OPEN and b.before_call() is True


def test_one_min_principal_is_the_classic_breaker() -> None:
    b, _ = breaker(3, min_principals=1)
    app(b, "a", 3)
    assert b.state == OPEN


def test_a_threshold_of_one_still_needs_two_principals_for_application_failures() -> None:
    b, _ = breaker(1)
    app(b, "a", 5)
    assert b.state == CLOSED
    app(b, "b")
    assert b.state == OPEN


def test_principals_remembered_in_a_run_are_bounded() -> None:
    b, _ = breaker(1_000_000)
    for i in range(5000):
        app(b, f"p{i}")
    assert b.state == CLOSED and b.failures == 5000
    assert len(b._application) <= 1025


# --- the fair share ---------------------------------------------------------------------------------
def test_anyone_may_use_a_backend_with_room_then_shares_apply() -> None:
    fair = FairShare("recommender", cap=4, min_share=1)
    slots = [fair.acquire("greedy") for _ in range(4)]  # alone: the whole backend
    with pytest.raises(FairShareExceeded) as refused:
        fair.acquire("greedy")
    assert (refused.value.held, refused.value.share, refused.value.backend) == (4, 4, "recommender")
    other = [fair.acquire("other"), fair.acquire("other")]  # its share is 4 // 2 = 2, over the cap
    with pytest.raises(FairShareExceeded):
        fair.acquire("other")
    assert fair.in_flight == 6 and fair.active == 2
    slots.pop().release()  # greedy holds 3, over its share of 2 while the backend is full
    with pytest.raises(FairShareExceeded):
        fair.acquire("greedy")
    for slot in other + slots[:2]:
        slot.release()  # 1 in flight: room again, for anyone
    assert fair.in_flight == 1
    fair.acquire("greedy")


def test_min_share_is_always_granted() -> None:
    fair = FairShare("risk", cap=2, min_share=3)
    for _ in range(3):
        fair.acquire("a")
    with pytest.raises(FairShareExceeded):
        fair.acquire("a")
    for _ in range(3):
        fair.acquire("b")
    assert fair.in_flight == 6


def test_a_slot_is_released_once() -> None:
    changes: list[int] = []
    fair = FairShare("risk", cap=1, min_share=1, on_change=lambda f: changes.append(f.in_flight))
    slot = fair.acquire("a")
    slot.release()
    slot.release(object())  # e.g. also a call's done callback
    assert slot.released and fair.in_flight == 0 and fair.active == 0
    assert changes == [1, 0]


# --- how a call's end counts ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def risk() -> Any:
    settings = GatewaySettings(env="dev", metrics_enabled=False, backend_timeouts={"risk": 0.5})
    routes = RouteTable.load()
    methods = [m for m in routes.methods.values() if m.package_backend == "risk"]
    return Backend("risk", "127.0.0.1:1", settings, methods, GatewayMetrics(CollectorRegistry())), routes


def shed(retry: bool) -> status_pb2.Status:
    status = status_pb2.Status(code=Code.RESOURCE_EXHAUSTED.value[0], message="busy")
    if retry:
        status.details.add().Pack(error_details_pb2.RetryInfo())
    return status


def test_outcome_of_each_code(risk: Any) -> None:
    backend, routes = risk
    score = routes.methods["cbec.risk.v1.RiskService/ScoreTransaction"]
    assert backend.outcome(score, Code.OK) == SUCCESS
    for code in CLIENT_ERRORS:
        assert backend.outcome(score, code) == SUCCESS, code
    assert backend.outcome(score, Code.CANCELLED) == NEUTRAL
    assert backend.outcome(score, Code.UNAVAILABLE) == TRANSPORT_FAILURE
    for code in (Code.INTERNAL, Code.UNKNOWN, Code.DATA_LOSS):
        assert backend.outcome(score, code) == APPLICATION_FAILURE
    # deadlines: the gateway's own timeout for risk is 0.5 s
    assert backend.outcome(score, Code.DEADLINE_EXCEEDED, timeout=0.5) == TRANSPORT_FAILURE
    assert backend.outcome(score, Code.DEADLINE_EXCEEDED, timeout=5.0) == TRANSPORT_FAILURE
    assert backend.outcome(score, Code.DEADLINE_EXCEEDED, timeout=0.2) == NEUTRAL  # the caller's
    assert backend.outcome(score, Code.DEADLINE_EXCEEDED) == NEUTRAL
    # shedding says when to come back; a size limit or gRPC's own message limit does not
    assert backend.outcome(score, Code.RESOURCE_EXHAUSTED, shed(True)) == TRANSPORT_FAILURE
    assert backend.outcome(score, Code.RESOURCE_EXHAUSTED, shed(False)) == NEUTRAL
    assert backend.outcome(score, Code.RESOURCE_EXHAUSTED) == NEUTRAL
    assert is_load_shedding(shed(True)) and not is_load_shedding(None)


def test_a_streams_deadline_is_its_clients(risk: Any) -> None:
    _, routes = risk
    stream = next(m for m in routes.methods.values() if m.kind != "unary")
    backend = Backend(
        stream.package_backend,
        "127.0.0.1:1",
        GatewaySettings(env="dev", metrics_enabled=False),
        [stream],
        GatewayMetrics(CollectorRegistry()),
    )
    assert backend.outcome(stream, Code.DEADLINE_EXCEEDED, timeout=300.0) == NEUTRAL


def test_shed_calls_are_retried_within_the_budget() -> None:
    settings = GatewaySettings(env="dev", metrics_enabled=False)
    routes = RouteTable.load()
    config = service_config(settings, {m.service.full_name for m in routes.methods.values() if not m.local})
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert config["retryThrottling"]["maxTokens"] == settings.retry_throttle_max_tokens
