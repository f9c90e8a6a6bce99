"""Each feature against hand-computed values, the reference tables, and train/serve parity."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from services.risk.features import (
    DAY_MS,
    FEATURE_INDEX,
    FEATURE_NAMES,
    FEATURES,
    HOUR_MS,
    MINUTE_MS,
    FeaturePipeline,
    RatesTable,
    Tx,
    buyer_timezone,
    count_since,
    countries,
    describe,
    tx_from_proto,
)
from services.risk.state import StateStore
from tests.risk.conftest import Trained, to_proto

T = int(datetime(2026, 7, 1, 12, 30, tzinfo=UTC).timestamp() * 1000)  # 14:30 in Berlin (CEST)


def features_of(tx: Tx, store: StateStore | None = None) -> dict[str, float]:
    store = store or StateStore(":memory:")
    with store.batch():
        x, _ = FeaturePipeline(RatesTable.load()).transform([tx], store)
    return dict(zip(FEATURE_NAMES, x[0].tolist(), strict=True))


def make(**kw: object) -> Tx:
    base: dict[str, object] = dict(
        transaction_id="now", user_id="U", card="C", amount=100.0, currency="EUR", occurred_ms=T,
        device="D1", ip_country="RU", billing_country="DE", shipping_country="DE",
        account_created_ms=T - 10 * DAY_MS,
    )  # fmt: skip
    base.update(kw)
    return Tx(**base)  # type: ignore[arg-type]


# --- reference tables ---------------------------------------------------------------------------------
def test_rates_table_converts_and_is_dated() -> None:
    rates = RatesTable.load()
    assert rates.reference == "USD"
    assert rates.to_reference(100.0, "EUR") == pytest.approx(100 / 0.965)
    assert rates.to_reference(15_720.0, "JPY") == pytest.approx(100.0)
    assert rates.to_reference(7.0, "USD") == 7.0
    assert "ZWD" not in rates and "EUR" in rates
    with pytest.raises(KeyError):
        rates.to_reference(1.0, "XXX")
    as_of = datetime(rates.as_of.year, rates.as_of.month, rates.as_of.day, tzinfo=UTC)
    assert rates.age_seconds(as_of.replace(day=as_of.day + 1)) == 86_400


def test_rates_table_rejects_bad_files(tmp_path: Path) -> None:
    doc = {"version": "t", "as_of": "2026-01-01", "reference_currency": "USD",
           "units_per_reference": {"USD": 1.0, "EUR": -1.0}}  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="EUR"):
        RatesTable.load(tmp_path / "bad.json")
    doc["units_per_reference"] = {"USD": 2.0}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="reference"):
        RatesTable.load(tmp_path / "bad.json")


def test_countries_have_zones_and_currencies() -> None:
    table = countries()
    assert table["DE"].timezone == "Europe/Berlin" and table["DE"].currency == "EUR"
    assert table["US"].timezone == "America/New_York"
    assert table["XK"].currency == "EUR"
    assert len(table) >= 249


# --- static features ------------------------------------------------------------------------------------
def test_static_features_by_hand() -> None:
    f = features_of(make())
    assert f["amount_ref_log"] == pytest.approx(math.log1p(100 / 0.965))
    assert f["amount_local_log"] == pytest.approx(math.log1p(100.0))
    assert f["currency_foreign"] == 0.0  # EUR is Germany's currency
    assert f["ip_billing_mismatch"] == 1.0  # RU vs DE
    assert f["ip_shipping_mismatch"] == 1.0  # RU vs DE
    assert f["billing_shipping_mismatch"] == 0.0
    assert f["account_age_days"] == pytest.approx(10.0)
    assert f["local_hour"] == pytest.approx(14.5)  # 12:30 UTC is 14:30 in Berlin in July


def test_unknowns_are_nan() -> None:
    f = features_of(make(ip_country="", billing_country="", account_created_ms=None, currency="USD"))
    for name in ("ip_billing_mismatch", "ip_shipping_mismatch", "billing_shipping_mismatch",
                 "currency_foreign", "account_age_days"):  # fmt: skip
        assert math.isnan(f[name]), name


def test_foreign_currency() -> None:
    assert features_of(make(currency="USD"))["currency_foreign"] == 1.0
    assert (
        features_of(make(currency="GBP", billing_country="GB", shipping_country="GB"))["currency_foreign"]
        == 0.0
    )


def test_local_hour_follows_buyer_zone() -> None:
    assert features_of(make(timezone="Asia/Tokyo"))["local_hour"] == pytest.approx(21.5)
    winter = int(datetime(2026, 1, 15, 12, 30, tzinfo=UTC).timestamp() * 1000)
    assert features_of(make(occurred_ms=winter, account_created_ms=None))["local_hour"] == pytest.approx(13.5)
    # No zone and no billing country: the shipping country's zone, then UTC.
    assert buyer_timezone(make(billing_country="", shipping_country="JP")) == "Asia/Tokyo"
    assert buyer_timezone(make(billing_country="", shipping_country="")) == "UTC"


# --- velocity features ------------------------------------------------------------------------------------
def seed_history(store: StateStore) -> None:
    """Card C: 2 days, 50 minutes and 5 minutes ago (USD 10, 20, 30); card C2 on device D1 3 minutes ago."""
    rates = RatesTable.load()
    earlier = [
        Tx("a1", "U", "C", 10.0, "USD", T - 2 * DAY_MS, device="D1"),
        Tx("a2", "U2", "C", 20.0, "USD", T - 50 * MINUTE_MS, device="D2"),
        Tx("a3", "U", "C", 30.0, "USD", T - 5 * MINUTE_MS, device="D1"),
        Tx("b1", "U3", "C2", 99.0, "USD", T - 3 * MINUTE_MS, device="D1"),
        Tx("late", "U", "C", 5.0, "USD", T + MINUTE_MS, device="D1"),  # after "now": never counted
    ]
    with store.batch():
        for tx in earlier:
            store.record_event(tx, rates.to_reference(tx.amount, tx.currency))


def test_velocity_features_by_hand(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    seed_history(store)
    f = features_of(make(amount=60.0, currency="USD"), store)
    assert f["card_tx_10m"] == 1  # a3
    assert f["card_tx_1h"] == 2  # a2, a3
    assert f["card_tx_24h"] == 2
    assert f["card_amount_24h_log"] == pytest.approx(math.log1p(50.0))
    assert f["user_tx_1h"] == 1  # a3 (a1 is 2 days old)
    assert f["user_tx_24h"] == 1
    assert f["device_tx_1h"] == 2  # a3, b1
    assert f["device_tx_24h"] == 2
    assert f["device_other_cards_30d"] == 1  # C2
    assert f["card_other_users_30d"] == 1  # U2
    assert f["card_other_devices_30d"] == 1  # D2
    assert f["hours_since_card_last"] == pytest.approx(5 / 60)
    # First seen 2 days ago; the later "late" event does not move first-seen.
    assert f["card_known_days"] == pytest.approx(2.0)
    assert f["amount_vs_card_avg_30d"] == pytest.approx(60.0 / 20.0)  # (10 + 20 + 30) / 3 = 20


def test_new_card_and_no_device(tmp_path: Path) -> None:
    f = features_of(make(card="fresh", device=""), StateStore(tmp_path / "s.sqlite3"))
    assert math.isnan(f["card_known_days"])
    assert math.isnan(f["hours_since_card_last"])
    assert math.isnan(f["amount_vs_card_avg_30d"])
    assert f["card_tx_24h"] == 0 and f["card_other_users_30d"] == 0
    for name in ("device_tx_1h", "device_tx_24h", "device_other_cards_30d"):
        assert math.isnan(f[name])


def test_rescoring_does_not_count_itself(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    first = features_of(make(card="K"), store)
    again = features_of(make(card="K"), store)  # same transaction id, scored twice
    np.testing.assert_equal(np.array(list(first.values())), np.array(list(again.values())))
    following = features_of(make(card="K", transaction_id="next", occurred_ms=T + MINUTE_MS), store)
    assert following["card_tx_10m"] == 1
    assert following["card_known_days"] == pytest.approx(MINUTE_MS / DAY_MS)


def test_window_edges_are_half_open() -> None:
    times_desc = [T - 1, T - HOUR_MS, T - HOUR_MS - 1]
    assert count_since(times_desc, T - HOUR_MS) == 1  # exactly one hour old is outside (t - 1h, t]
    assert count_since([], T) == 0
    assert count_since([T, T, T - 5], T - 5) == 2


def test_descriptions_name_the_values() -> None:
    tx = make()
    assert (
        describe(FEATURE_INDEX["ip_billing_mismatch"], 1.0, tx)
        == "IP country RU differs from billing country DE"
    )
    assert "EUR" in describe(FEATURE_INDEX["amount_local_log"], math.log1p(100.0), tx)
    assert "100.00" in describe(FEATURE_INDEX["amount_local_log"], math.log1p(100.0), tx)
    assert describe(FEATURE_INDEX["card_tx_1h"], 4.0, tx).endswith(": 4")
    assert "Europe/Berlin" in describe(FEATURE_INDEX["local_hour"], 14.5, tx)
    assert "14:30" in describe(FEATURE_INDEX["local_hour"], 14.5, tx)
    codes = [f.code for f in FEATURES]
    assert len(set(codes)) == len(codes)


def test_proto_round_trip_and_json() -> None:
    tx = make(timezone="Asia/Tokyo", payment_method="card", merchant_category="toys")
    assert tx_from_proto(to_proto(tx)) == tx
    assert Tx.from_json(tx.to_json()) == tx


# --- parity -------------------------------------------------------------------------------------------------
def test_train_serve_parity(trained: Trained, tmp_path: Path) -> None:
    """The training frame path (whole stream, one in-memory store, chunks) and the serving path
    (proto conversion, durable store, one transaction per commit) compute identical features."""
    pipeline = FeaturePipeline(RatesTable.load())
    store = StateStore(tmp_path / "serving.sqlite3")
    rows = []
    n = 1500  # a prefix keeps the test quick; later rows depend only on earlier ones
    for labelled in trained.labelled[:n]:
        tx = tx_from_proto(to_proto(labelled.tx))
        with store.batch():
            x, _ = pipeline.transform([tx], store)
        rows.append(x[0])
    np.testing.assert_array_equal(np.vstack(rows), trained.dataset.x[:n])
