"""The gRPC surface on a real server: scoring, batches, outcomes, bad input, rates, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from cbec.common.v1 import common_pb2, common_pb2_grpc
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.risk.features import FEATURES, RatesTable, Tx
from services.risk.server import RATES_HEALTH, build
from services.runtime.errors import field_violations
from services.runtime.server import Server
from tests.risk.conftest import Trained, good_transaction, now_ms, risk_settings, to_proto, ts

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CODES = {f.code for f in FEATURES} | {"ANOMALOUS_PATTERN"}


async def health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await health_pb2_grpc.HealthStub(ch).Check(request)
        return response.status


def metrics_text(server: Server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()


async def score(stub: risk_pb2_grpc.RiskServiceStub, t: risk_pb2.Transaction) -> risk_pb2.RiskAssessment:
    return (await stub.ScoreTransaction(risk_pb2.ScoreTransactionRequest(transaction=t))).assessment


async def invalid(stub: risk_pb2_grpc.RiskServiceStub, t: risk_pb2.Transaction) -> list[tuple[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await score(stub, t)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return field_violations(err.value)


# --- scoring ---------------------------------------------------------------------------------------
async def test_score_one(server: Server, stub: risk_pb2_grpc.RiskServiceStub, trained: Trained) -> None:
    assert await health(server.grpc_port) == SERVING
    a = await score(stub, good_transaction())
    assert a.transaction_id == "tx-1"
    assert 0.0 <= a.fraud_probability <= 1.0 and 0.0 <= a.anomaly_score <= 1.0
    assert a.decision in (risk_pb2.DECISION_APPROVE, risk_pb2.DECISION_REVIEW, risk_pb2.DECISION_DECLINE)
    assert a.amount_reference == pytest.approx(42.5 / 0.965)
    assert a.reference_currency == "USD" and a.rates_version == RatesTable.load().version
    assert a.model.name == "risk" and a.model.version == trained.version
    assert 1 <= len(a.reasons) <= 4
    for reason in a.reasons:
        assert reason.code in CODES and reason.description and reason.feature


async def test_served_scores_equal_the_training_path(
    server: Server, stub: risk_pb2_grpc.RiskServiceStub, trained: Trained
) -> None:
    """End-to-end parity: the stream scored through gRPC (one call at a time, then in a batch) gets
    the probabilities the trained model gives the training-path features."""
    n_single, n_batch = 120, 120
    rows = [r.tx for r in trained.labelled[: n_single + n_batch]]
    got = [(await score(stub, to_proto(tx))).fraud_probability for tx in rows[:n_single]]
    batch = await stub.ScoreTransactions(
        risk_pb2.ScoreTransactionsRequest(transactions=[to_proto(tx) for tx in rows[n_single:]])
    )
    assert [a.transaction_id for a in batch.assessments] == [tx.transaction_id for tx in rows[n_single:]]
    got += [a.fraud_probability for a in batch.assessments]
    expected = trained.result.model.score(trained.dataset.x[: n_single + n_batch]).probability
    np.testing.assert_allclose(got, expected, rtol=1e-9)


async def test_velocity_state_is_recorded_per_call(
    stub: risk_pb2_grpc.RiskServiceStub, server: Server
) -> None:
    base = now_ms() - 10 * 60_000
    for i in range(4):
        t = good_transaction(
            transaction_id=f"burst-{i}", card_fingerprint="hot", occurred_time=ts(base + i * 60_000)
        )
        await score(stub, t)
    await score(
        stub, good_transaction(transaction_id="burst-0", card_fingerprint="hot", occurred_time=ts(base))
    )
    probe = Tx("probe", "user-1", "hot", 1.0, "EUR", base + 5 * 60_000)
    history = server.service.state.history(probe, 3_600_000, 3_600_000, 3_600_000)
    assert len(history.card) == 4  # the re-scored burst-0 is not counted twice
    assert server.service.state.counts()["scored"] == 4


async def test_thresholds_from_configuration(trained: Trained, tmp_path: Path) -> None:
    srv = Server(risk_settings(trained.models_dir, tmp_path / "state", risk_decline_threshold=0.0), build)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            a = await score(risk_pb2_grpc.RiskServiceStub(ch), good_transaction())
            assert a.decision == risk_pb2.DECISION_DECLINE
    finally:
        await srv.stop(grace=1)


async def test_model_status_reports_metrics(stub: risk_pb2_grpc.RiskServiceStub, server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        status = await common_pb2_grpc.ModelAdminServiceStub(ch).GetModelStatus(
            common_pb2.GetModelStatusRequest(service="risk")
        )
    assert {"auc", "pr_auc", "recall_at_1pct_fpr", "baseline_auc"} <= set(status.metrics)


async def test_not_serving_without_a_model(tmp_path: Path) -> None:
    srv = Server(risk_settings(tmp_path / "empty", tmp_path / "state"), build)
    await srv.start()
    try:
        assert await health(srv.grpc_port) == NOT_SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await score(risk_pb2_grpc.RiskServiceStub(ch), good_transaction())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(grace=1)


# --- outcomes ----------------------------------------------------------------------------------------------
async def test_report_outcome(stub: risk_pb2_grpc.RiskServiceStub, server: Server) -> None:
    await score(stub, good_transaction(transaction_id="paid"))
    known = await stub.ReportOutcome(
        risk_pb2.ReportOutcomeRequest(transaction_id="paid", outcome=risk_pb2.OUTCOME_CHARGEBACK, note="bank")
    )
    assert known.transaction_known is True
    unknown = await stub.ReportOutcome(
        risk_pb2.ReportOutcomeRequest(transaction_id="elsewhere", outcome=risk_pb2.OUTCOME_LEGITIMATE)
    )
    assert unknown.transaction_known is False
    assert server.service.state.outcome("elsewhere") == risk_pb2.OUTCOME_LEGITIMATE  # stored anyway
    assert 'risk_outcomes_total{outcome="OUTCOME_CHARGEBACK"} 1.0' in metrics_text(server)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (risk_pb2.ReportOutcomeRequest(transaction_id="x"), "outcome"),
        (risk_pb2.ReportOutcomeRequest(transaction_id="x", outcome=9), "outcome"),
        (risk_pb2.ReportOutcomeRequest(outcome=risk_pb2.OUTCOME_CHARGEBACK), "transaction_id"),
        (
            risk_pb2.ReportOutcomeRequest(
                transaction_id="x",
                outcome=risk_pb2.OUTCOME_CHARGEBACK,
                reported_time=ts(now_ms() + 86_400_000),
            ),
            "reported_time",
        ),
    ],
)
async def test_bad_outcome_reports(
    stub: risk_pb2_grpc.RiskServiceStub, request_: risk_pb2.ReportOutcomeRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportOutcome(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in field_violations(err.value)]


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"amount": -5.0}, "transaction.amount", "greater than 0"),
        ({"amount": 0.0}, "transaction.amount", "greater than 0"),
        ({"amount": float("nan")}, "transaction.amount", "NaN"),
        ({"amount": float("inf")}, "transaction.amount", "at most"),
        ({"currency": "XXX"}, "transaction.currency", "unknown currency"),
        ({"currency": ""}, "transaction.currency", "required"),
        ({"ip_country": "ZZ"}, "transaction.ip_country", "unknown country"),
        ({"billing_country": "Germany"}, "transaction.billing_country", "unknown country"),
        ({"occurred_time": ts(now_ms() + 86_400_000)}, "transaction.occurred_time", "future"),
        ({"occurred_time": ts(1000)}, "transaction.occurred_time", "2000"),
        ({"transaction_id": ""}, "transaction.transaction_id", "required"),
        ({"user_id": " "}, "transaction.user_id", "required"),
        ({"card_fingerprint": ""}, "transaction.card_fingerprint", "required"),
        ({"buyer_timezone": "Mars/Olympus"}, "transaction.buyer_timezone", "time zone"),
        (
            {"occurred_time": ts(now_ms() - 7_200_000), "account_created_time": ts(now_ms() - 3_600_000)},
            "transaction.account_created_time",
            "after occurred_time",
        ),
    ],
)
async def test_bad_transactions(
    stub: risk_pb2_grpc.RiskServiceStub, overrides: dict[str, object], field: str, words: str
) -> None:
    violations = await invalid(stub, good_transaction(**overrides))
    assert [f for f, _ in violations] == [field]
    assert words in violations[0][1]


async def test_missing_occurred_time_and_several_violations(stub: risk_pb2_grpc.RiskServiceStub) -> None:
    t = good_transaction(amount=-1.0, currency="ABC")
    fields = {f for f, _ in await invalid(stub, t)}
    assert fields == {"transaction.amount", "transaction.currency"}
    # A missing REQUIRED field (risk.proto) is the runtime's: it answers before the servicer runs.
    t.ClearField("occurred_time")
    assert await invalid(stub, t) == [("transaction.occurred_time", "is required")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ScoreTransaction(risk_pb2.ScoreTransactionRequest())
    assert field_violations(err.value) == [("transaction", "is required")]


# --- money: google.type.Money in ``total``, the deprecated double ``amount`` + ``currency`` until v2 -------
def money(currency: str, units: int, nanos: int = 0) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def legacy(amount: float, currency: str, **overrides: object) -> risk_pb2.Transaction:
    """A transaction whose amount is only in the deprecated fields."""
    t = good_transaction(amount=amount, currency=currency, **overrides)
    assert not t.HasField("total")
    return t


def with_total(total: money_pb2.Money, **overrides: object) -> risk_pb2.Transaction:
    t = good_transaction(**overrides)
    t.ClearField("amount")
    t.ClearField("currency")
    t.total.CopyFrom(total)
    return t


async def test_old_new_and_both_agreeing_score_the_same(stub: risk_pb2_grpc.RiskServiceStub) -> None:
    def fresh(i: int) -> dict[str, object]:  # no shared card, user or device: no velocity history
        return {"transaction_id": f"m-{i}", "card_fingerprint": f"card-m{i}", "user_id": f"user-m{i}",
                "device_id": f"device-m{i}"}  # fmt: skip

    old = await score(stub, legacy(129.9, "eur", **fresh(1)))
    new = await score(stub, with_total(money("EUR", 129, 900_000_000), **fresh(2)))
    both = with_total(money("EUR", 129, 900_000_000), **fresh(3))
    both.amount, both.currency = 129.9, "EUR"
    agreeing = await score(stub, both)
    for a in (old, new, agreeing):
        assert a.amount_reference == pytest.approx(129.9 / 0.965)
        assert a.reference_currency == "USD"  # the deprecated response fields are still filled
        assert a.reference_total.currency_code == "USD"
        exact = a.reference_total.units + a.reference_total.nanos / 1e9
        assert exact == pytest.approx(a.amount_reference, abs=1e-9)
    assert old.fraud_probability == pytest.approx(new.fraud_probability)
    assert new.fraud_probability == pytest.approx(agreeing.fraud_probability)


@pytest.mark.parametrize(
    ("old_amount", "old_currency", "fields"),
    [
        (129.91, "", {"transaction.amount"}),
        (0.0, "USD", {"transaction.currency"}),
        (12.99, "GBP", {"transaction.amount", "transaction.currency"}),
        (float("nan"), "EUR", {"transaction.amount"}),
    ],
)
async def test_both_disagreeing_is_refused_naming_the_old_field(
    stub: risk_pb2_grpc.RiskServiceStub, old_amount: float, old_currency: str, fields: set[str]
) -> None:
    t = with_total(money("EUR", 129, 900_000_000))
    t.amount, t.currency = old_amount, old_currency
    violations = await invalid(stub, t)
    assert {f for f, _ in violations} == fields
    assert all("disagrees with transaction.total" in d for _, d in violations)


@pytest.mark.parametrize(
    ("total", "field", "words"),
    [
        (money("euro", 10), "transaction.total.currency_code", "ISO 4217"),
        (money("eur", 10), "transaction.total.currency_code", "three capital letters"),
        (money("", 10), "transaction.total.currency_code", "ISO 4217"),
        (money("EUR", 10, 1_000_000_000), "transaction.total.nanos", "999999999"),
        (money("EUR", 10, -5), "transaction.total.nanos", "sign of units"),
        (money("EUR", -10, 5), "transaction.total.nanos", "sign of units"),
        (money("XXX", 10), "transaction.total.currency_code", "unknown currency"),
        (money("EUR", 0), "transaction.total", "greater than 0"),
        (money("EUR", -1, -500_000_000), "transaction.total", "greater than 0"),
        (money("EUR", 10**13), "transaction.total", "at most"),
    ],
)
async def test_invalid_totals(
    stub: risk_pb2_grpc.RiskServiceStub, total: money_pb2.Money, field: str, words: str
) -> None:
    violations = await invalid(stub, with_total(total))
    assert [f for f, _ in violations] == [field]
    assert words in violations[0][1]


async def test_no_amount_at_all_names_total(stub: risk_pb2_grpc.RiskServiceStub) -> None:
    t = with_total(money("EUR", 1))
    t.ClearField("total")
    ((field, description),) = await invalid(stub, t)
    assert field == "transaction.total" and "required" in description


async def test_a_tiny_exact_amount_is_kept_exactly(stub: risk_pb2_grpc.RiskServiceStub) -> None:
    """One nano of a currency: a double could not carry the difference between these two."""
    a = await score(stub, with_total(money("USD", 1, 1), transaction_id="m-nano"))
    assert (a.reference_total.units, a.reference_total.nanos) == (1, 1)


async def test_batch_violations_name_the_item(stub: risk_pb2_grpc.RiskServiceStub) -> None:
    items = [good_transaction(transaction_id="a"), good_transaction(transaction_id="b", amount=float("nan")),
             good_transaction(transaction_id="a")]  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ScoreTransactions(risk_pb2.ScoreTransactionsRequest(transactions=items))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in field_violations(err.value)]
    assert fields == ["transactions[1].amount", "transactions[2].transaction_id"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ScoreTransactions(risk_pb2.ScoreTransactionsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_too_many_transactions(stub: risk_pb2_grpc.RiskServiceStub, server: Server) -> None:
    """100k transactions in one call: a per-request size limit, so INVALID_ARGUMENT (not the
    RESOURCE_EXHAUSTED of load) naming the field and the limit; nothing scored."""
    one = good_transaction()
    request = risk_pb2.ScoreTransactionsRequest(transactions=[one] * 100_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ScoreTransactions(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = field_violations(err.value)
    assert violation[0] == "transactions" and "10000" in violation[1] and "100000" in violation[1]
    assert server.service.state.counts()["events"] == 0


# --- client errors are never INTERNAL (issue 15) ---------------------------------------------------------
@pytest.mark.parametrize(
    "zone",
    [
        "Europe",
        "America",
        "x" * 256,
        "Europe/",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/Berlin\x00",
        ".",
    ],
)
async def test_bad_time_zones_are_invalid_argument(stub: risk_pb2_grpc.RiskServiceStub, zone: str) -> None:
    """A tzdata folder, an overlong name or a path made ``ZoneInfo`` raise (INTERNAL before)."""
    violations = await invalid(stub, good_transaction(buyer_timezone=zone))
    assert [f for f, _ in violations] == ["transaction.buyer_timezone"]
    assert len(violations[0][1]) <= 256


async def test_oversized_and_out_of_range_fields(stub: risk_pb2_grpc.RiskServiceStub) -> None:
    violations = await invalid(stub, good_transaction(merchant_category="m" * 10_000_000))
    assert violations[0][0] == "transaction.merchant_category" and "128" in violations[0][1]
    for nanos in (-1, 1_000_000_000):
        t = good_transaction()
        t.occurred_time.nanos = nanos
        violations = await invalid(stub, t)
        assert [f for f, _ in violations] == ["transaction.occurred_time"] and "nanos" in violations[0][1]


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(-(2**62), 0), (-62_135_596_800, 0), (4_200_000_000, 0), (1_700_000_000, -1), (1_700_000_000, 10**9)],
    ids=["minus-2^62", "year-1", "year-2103", "negative-nanos", "nanos-overflow"],
)
async def test_outcome_times_out_of_range(
    stub: risk_pb2_grpc.RiskServiceStub, server: Server, seconds: int, nanos: int
) -> None:
    """-2^62 s overflowed SQLite (INTERNAL) and year 1 was stored; both are refused now."""
    request = risk_pb2.ReportOutcomeRequest(transaction_id="t-range", outcome=risk_pb2.OUTCOME_CHARGEBACK)
    request.reported_time.seconds, request.reported_time.nanos = seconds, nanos
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportOutcome(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["reported_time"]
    assert server.service.state.outcome("t-range") is None


# --- rates ------------------------------------------------------------------------------------------------
def write_rates(path: Path, version: str, as_of: str, eur: float = 0.5) -> Path:
    doc = {"version": version, "as_of": as_of, "reference_currency": "USD", "source": "test",
           "units_per_reference": {"USD": 1.0, "EUR": eur}}  # fmt: skip
    path.write_text(json.dumps(doc))
    return path


async def test_stale_rates_reported_in_health_metrics_and_logs(
    trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rates = write_rates(tmp_path / "rates.json", "old", "2020-01-01")
    settings = risk_settings(trained.models_dir, tmp_path / "state", risk_rates_path=rates,
                             risk_rates_max_age_days=30)  # fmt: skip
    srv = Server(settings, build)
    with caplog.at_level(logging.WARNING, logger="cbec.risk"):
        await srv.start()
    try:
        assert await health(srv.grpc_port) == SERVING  # stale rates still serve
        assert await health(srv.grpc_port, RATES_HEALTH) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert any("older than" in r.getMessage() for r in caplog.records)
        text = await asyncio.to_thread(metrics_text, srv)
        assert "risk_rates_stale 1.0" in text
        age = float(
            next(line.split()[1] for line in text.splitlines() if line.startswith("risk_rates_age_seconds"))
        )
        expected = (datetime.now(UTC) - datetime(2020, 1, 1, tzinfo=UTC)).total_seconds()
        assert age == pytest.approx(expected, abs=60)
        assert 'risk_rates_info{as_of="2020-01-01",version="old"} 1.0' in text
    finally:
        await srv.stop(grace=1)


async def test_rates_reload_when_the_file_changes(trained: Trained, tmp_path: Path) -> None:
    today = datetime.now(UTC).date().isoformat()
    rates = write_rates(tmp_path / "rates.json", "first", today, eur=0.5)
    settings = risk_settings(trained.models_dir, tmp_path / "state", risk_rates_path=rates,
                             risk_rates_check_s=0.05)  # fmt: skip
    srv = Server(settings, build)
    await srv.start()
    try:
        assert "risk_rates_stale 0.0" in await asyncio.to_thread(metrics_text, srv)
        assert await health(srv.grpc_port, RATES_HEALTH) == SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = risk_pb2_grpc.RiskServiceStub(ch)
            a = await score(stub, good_transaction(amount=10.0))
            assert (a.rates_version, a.amount_reference) == ("first", 20.0)
            write_rates(rates, "second", today, eur=0.25)
            os.utime(rates, (1, 1))  # a different mtime even within the clock's resolution
            for _ in range(100):
                await asyncio.sleep(0.05)
                if srv.service.rates.version == "second":
                    break
            a = await score(stub, good_transaction(transaction_id="tx-2", amount=10.0))
            assert (a.rates_version, a.amount_reference) == ("second", 40.0)
    finally:
        await srv.stop(grace=1)


async def test_decision_metrics(stub: risk_pb2_grpc.RiskServiceStub, server: Server) -> None:
    a = await score(stub, good_transaction())
    name = {1: "approve", 2: "review", 3: "decline"}[a.decision]
    text = await asyncio.to_thread(metrics_text, server)
    assert f'risk_decisions_total{{decision="{name}"}} 1.0' in text
    assert "risk_fraud_probability_count 1.0" in text
