"""The one feature module of the risk service: training and serving both call ``FeaturePipeline``.

Why one module: a fraud model is only as good as the agreement between the features it was trained on
and the features it sees at checkout. Training replays its data set, in time order, through
``FeaturePipeline.transform`` with a fresh in-memory ``StateStore``; serving calls the same method with
the durable store. Each transaction's velocity features therefore see exactly the transactions that
happened before it, in both paths.

Features (all float64; NaN = unknown, which LightGBM handles natively):
- amount converted to the reference currency through a versioned rates table (``rates.json``), and the
  amount in its own currency;
- whether the currency is foreign to the billing country; IP / billing / shipping country mismatches;
- account age; hour of day in the buyer's time zone (``zoneinfo``, derived from the billing country when
  the request has none);
- velocity and reuse from the state store: transactions per card / user / device in the previous 10
  minutes, hour and day, the card's 24-hour spend, other cards seen on the device, other accounts and
  devices seen with the card, time since the card's previous use, how long the card has been known, and
  the amount against the card's 30-day average.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np

if TYPE_CHECKING:
    from cbec.risk.v1 import risk_pb2

    from services.runtime.errors import Violation
    from services.runtime.money import Amount

    from .state import History, StateStore

HERE = Path(__file__).resolve().parent
DEFAULT_RATES_PATH = HERE / "rates.json"
COUNTRIES_PATH = HERE / "countries.json"

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
#: Look-back of each key's history; the state store must keep events at least MAX_WINDOW_MS.
CARD_WINDOW_MS = 30 * DAY_MS
USER_WINDOW_MS = DAY_MS
DEVICE_WINDOW_MS = 30 * DAY_MS
MAX_WINDOW_MS = max(CARD_WINDOW_MS, USER_WINDOW_MS, DEVICE_WINDOW_MS)
NAN = float("nan")


# --- reference tables ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Country:
    code: str
    name: str
    timezone: str | None
    currency: str | None


@lru_cache(maxsize=1)
def countries() -> dict[str, Country]:
    """ISO 3166-1 alpha-2 codes (plus XK) with their primary time zone and currency."""
    raw = json.loads(COUNTRIES_PATH.read_text())["countries"]
    return {code: Country(code, v["name"], v.get("timezone"), v.get("currency")) for code, v in raw.items()}


@dataclass(frozen=True)
class RatesTable:
    """Currency conversion to one reference currency, from a dated, versioned file.

    ``units_per_reference[c]`` is how many units of ``c`` buy one unit of the reference currency.
    """

    version: str
    as_of: date
    reference: str
    units_per_reference: dict[str, float]
    path: Path | None = None

    @classmethod
    def load(cls, path: Path = DEFAULT_RATES_PATH) -> RatesTable:
        raw = json.loads(Path(path).read_text())
        rates = {str(k).upper(): float(v) for k, v in raw["units_per_reference"].items()}
        bad = [k for k, v in rates.items() if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"rates table {path}: non-positive or non-finite rate for {bad}")
        reference = str(raw["reference_currency"]).upper()
        if rates.get(reference) != 1.0:
            raise ValueError(f"rates table {path}: the reference currency {reference} must have rate 1")
        return cls(str(raw["version"]), date.fromisoformat(raw["as_of"]), reference, rates, Path(path))

    def __contains__(self, currency: str) -> bool:
        return currency in self.units_per_reference

    def to_reference(self, amount: float, currency: str) -> float:
        """``amount`` of ``currency`` in the reference currency (KeyError for an unknown currency)."""
        return amount / self.units_per_reference[currency]

    def age_seconds(self, now: datetime | None = None) -> float:
        """Seconds since the table's date (midnight UTC)."""
        now = now or datetime.now(UTC)
        as_of = datetime(self.as_of.year, self.as_of.month, self.as_of.day, tzinfo=UTC)
        return max(0.0, (now - as_of).total_seconds())


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """Cached ``ZoneInfo`` (raises ZoneInfoNotFoundError / ValueError for an unknown name)."""
    return ZoneInfo(name)


@lru_cache(maxsize=1)
def known_timezones() -> frozenset[str]:
    """Every IANA key tzdata knows (read once)."""
    return frozenset(available_timezones())


def valid_timezone(name: str) -> bool:
    """A key of the tz database. Checked against the list first: ``ZoneInfo`` turns a folder name
    ("Europe"), an overlong name or a path into IsADirectoryError, OSError or ValueError."""
    if name not in known_timezones():
        return False
    try:
        zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


# --- the transaction record features are computed from ---------------------------------------------
@dataclass(slots=True)
class Tx:
    """One transaction as the feature code sees it: plain values, from a request or a data row.

    Times are epoch milliseconds (UTC); empty strings mean "not given". Treat as immutable (not
    frozen only because frozen dataclasses are several times slower to build, and training builds 100k).
    """

    transaction_id: str
    user_id: str
    card: str
    amount: float
    currency: str
    occurred_ms: int
    device: str = ""
    ip_country: str = ""
    billing_country: str = ""
    shipping_country: str = ""
    account_created_ms: int | None = None
    timezone: str = ""
    payment_method: str = ""
    merchant_category: str = ""

    def to_json(self) -> str:
        return json.dumps({f: getattr(self, f) for f in self.__slots__}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Tx:
        return cls(**json.loads(text))


def timestamp_ms(ts: Any) -> int:
    """A ``google.protobuf.Timestamp`` as epoch milliseconds."""
    return int(ts.seconds) * 1000 + int(ts.nanos) // 1_000_000


def transaction_amount(t: risk_pb2.Transaction, prefix: str = "") -> tuple[Amount | None, list[Violation]]:
    """The transaction's amount: ``total``, or the deprecated ``amount`` and ``currency`` (accepted
    until v2); with violations where both are given and disagree (``services/runtime/money.py``)."""
    from services.runtime.money import reconcile  # the serving path's; training never imports it

    total = t.total if t.HasField("total") else None
    return reconcile(total, f"{prefix}total", t.amount, f"{prefix}amount", t.currency, f"{prefix}currency")


def tx_from_proto(t: risk_pb2.Transaction) -> Tx:
    """The serving path's conversion (validation happens before, in the servicer)."""
    amount, _ = transaction_amount(t)
    return Tx(
        transaction_id=t.transaction_id,
        user_id=t.user_id,
        card=t.card_fingerprint,
        amount=float(amount.value) if amount is not None else 0.0,
        currency=amount.currency.upper() if amount is not None else "",
        occurred_ms=timestamp_ms(t.occurred_time),
        device=t.device_id,
        ip_country=t.ip_country.strip().upper(),
        billing_country=t.billing_country.strip().upper(),
        shipping_country=t.shipping_country.strip().upper(),
        account_created_ms=timestamp_ms(t.account_created_time)
        if t.HasField("account_created_time")
        else None,
        timezone=t.buyer_timezone.strip(),
        payment_method=t.payment_method,
        merchant_category=t.merchant_category,
    )


def tx_to_proto(tx: Tx) -> risk_pb2.Transaction:
    """The inverse of ``tx_from_proto`` (replaying data sets through the API: benchmarks, tests). The
    amount goes in ``total``, rounded to the nano (data sets hold cents)."""
    from cbec.risk.v1 import risk_pb2

    from services.runtime.money import to_money

    t = risk_pb2.Transaction(
        transaction_id=tx.transaction_id,
        user_id=tx.user_id,
        card_fingerprint=tx.card,
        device_id=tx.device,
        ip_country=tx.ip_country,
        billing_country=tx.billing_country,
        shipping_country=tx.shipping_country,
        total=to_money(tx.amount, tx.currency),
        buyer_timezone=tx.timezone,
        payment_method=tx.payment_method,
        merchant_category=tx.merchant_category,
    )
    t.occurred_time.FromMilliseconds(tx.occurred_ms)
    if tx.account_created_ms is not None:
        t.account_created_time.FromMilliseconds(tx.account_created_ms)
    return t


def buyer_timezone(tx: Tx) -> str:
    """The request's time zone, else the billing country's, else the shipping country's, else UTC."""
    if tx.timezone:
        return tx.timezone
    table = countries()
    for code in (tx.billing_country, tx.shipping_country):
        country = table.get(code)
        if country is not None and country.timezone:
            return country.timezone
    return "UTC"


def local_hour(occurred_ms: int, tz_name: str) -> float:
    """Hour of day (with minutes as a fraction) at ``occurred_ms`` in ``tz_name``."""
    local = datetime.fromtimestamp(occurred_ms / 1000, zone(tz_name))
    return local.hour + local.minute / 60


def _mismatch(a: str, b: str) -> float:
    """1 when two known countries differ, 0 when they agree, NaN when either is unknown."""
    if not a or not b:
        return NAN
    return float(a != b)


# --- feature specifications --------------------------------------------------------------------------
Describe = Callable[[float, Tx], str]


@dataclass(frozen=True)
class FeatureSpec:
    """A feature's name (column), stable reason code, and how to say its value to a reviewer."""

    name: str
    code: str
    describe: Describe


def _count(what: str) -> Describe:
    def describe(v: float, tx: Tx) -> str:
        if math.isnan(v):
            return f"{what}: unknown (no device id)"
        return f"{what}: {int(v)}"

    return describe


def _money(v: float) -> float:
    return math.expm1(v) if math.isfinite(v) else v


def _amount_ref(v: float, tx: Tx) -> str:
    return f"Amount is {_money(v):,.2f} in the reference currency"


def _amount_local(v: float, tx: Tx) -> str:
    return f"Amount is {_money(v):,.2f} {tx.currency} in the payment currency"


def _currency_foreign(v: float, tx: Tx) -> str:
    if math.isnan(v):
        return f"Paid in {tx.currency}; billing country or its currency unknown"
    home = countries()[tx.billing_country].currency
    if v:
        return f"Paid in {tx.currency}, not the billing country's currency ({home})"
    return f"Paid in the billing country's currency ({home})"


def _country_pair(label_a: str, attr_a: str, label_b: str, attr_b: str) -> Describe:
    def describe(v: float, tx: Tx) -> str:
        a, b = getattr(tx, attr_a), getattr(tx, attr_b)
        if math.isnan(v):
            return f"{label_a} or {label_b} country unknown"
        if v:
            return f"{label_a} country {a} differs from {label_b} country {b}"
        return f"{label_a} country matches {label_b} country ({a})"

    return describe


def _account_age(v: float, tx: Tx) -> str:
    return "Account age unknown" if math.isnan(v) else f"Account is {v:.1f} days old"


def _local_hour(v: float, tx: Tx) -> str:
    hours, minutes = int(v), round((v - int(v)) * 60)
    return f"Placed at {hours:02d}:{minutes:02d} in the buyer's time zone ({buyer_timezone(tx)})"


def _card_amount_24h(v: float, tx: Tx) -> str:
    return f"Card spent {_money(v):,.2f} (reference currency) in the previous 24 hours"


def _since_last(v: float, tx: Tx) -> str:
    if math.isnan(v):
        return "Card not used in the previous 30 days"
    return f"Card last used {v:.2f} hours earlier"


def _card_known(v: float, tx: Tx) -> str:
    return "Card never seen before" if math.isnan(v) else f"Card first seen {v:.1f} days earlier"


def _vs_avg(v: float, tx: Tx) -> str:
    if math.isnan(v):
        return "No 30-day card history to compare the amount with"
    return f"Amount is {v:.1f}x the card's 30-day average"


FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("amount_ref_log", "AMOUNT_REFERENCE", _amount_ref),
    FeatureSpec("amount_local_log", "AMOUNT_ORIGINAL_CURRENCY", _amount_local),
    FeatureSpec("currency_foreign", "CURRENCY_FOREIGN", _currency_foreign),
    FeatureSpec(
        "ip_billing_mismatch",
        "COUNTRY_MISMATCH_IP_BILLING",
        _country_pair("IP", "ip_country", "billing", "billing_country"),
    ),
    FeatureSpec(
        "ip_shipping_mismatch",
        "COUNTRY_MISMATCH_IP_SHIPPING",
        _country_pair("IP", "ip_country", "shipping", "shipping_country"),
    ),
    FeatureSpec(
        "billing_shipping_mismatch",
        "COUNTRY_MISMATCH_BILLING_SHIPPING",
        _country_pair("Billing", "billing_country", "shipping", "shipping_country"),
    ),
    FeatureSpec("account_age_days", "ACCOUNT_AGE", _account_age),
    FeatureSpec("local_hour", "LOCAL_HOUR", _local_hour),
    FeatureSpec("card_tx_10m", "VELOCITY_CARD_10M", _count("Card transactions in the previous 10 minutes")),
    FeatureSpec("card_tx_1h", "VELOCITY_CARD_1H", _count("Card transactions in the previous hour")),
    FeatureSpec("card_tx_24h", "VELOCITY_CARD_24H", _count("Card transactions in the previous 24 hours")),
    FeatureSpec("card_amount_24h_log", "VELOCITY_CARD_AMOUNT_24H", _card_amount_24h),
    FeatureSpec("user_tx_1h", "VELOCITY_USER_1H", _count("Account transactions in the previous hour")),
    FeatureSpec("user_tx_24h", "VELOCITY_USER_24H", _count("Account transactions in the previous 24 hours")),
    FeatureSpec("device_tx_1h", "VELOCITY_DEVICE_1H", _count("Device transactions in the previous hour")),
    FeatureSpec(
        "device_tx_24h", "VELOCITY_DEVICE_24H", _count("Device transactions in the previous 24 hours")
    ),
    FeatureSpec(
        "device_other_cards_30d", "DEVICE_SHARED_CARDS", _count("Other cards used on this device in 30 days")
    ),
    FeatureSpec(
        "card_other_users_30d",
        "CARD_SHARED_ACCOUNTS",
        _count("Other accounts that used this card in 30 days"),
    ),
    FeatureSpec(
        "card_other_devices_30d",
        "CARD_MANY_DEVICES",
        _count("Other devices this card was used on in 30 days"),
    ),
    FeatureSpec("hours_since_card_last", "CARD_RECENCY", _since_last),
    FeatureSpec("card_known_days", "CARD_NEW", _card_known),
    FeatureSpec("amount_vs_card_avg_30d", "AMOUNT_VS_CARD_HISTORY", _vs_avg),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
#: Changes whenever the feature list changes; stored with models so a stale model is refused.
FEATURE_SCHEMA = "v1:" + ",".join(FEATURE_NAMES)


# --- computing them -----------------------------------------------------------------------------------
def static_features(tx: Tx, amount_ref: float, out: np.ndarray) -> None:
    """Features that need only the transaction itself (and the reference tables)."""
    table = countries()
    out[0] = math.log1p(amount_ref)
    out[1] = math.log1p(tx.amount)
    home = table.get(tx.billing_country)
    out[2] = NAN if home is None or home.currency is None else float(tx.currency != home.currency)
    out[3] = _mismatch(tx.ip_country, tx.billing_country)
    out[4] = _mismatch(tx.ip_country, tx.shipping_country)
    out[5] = _mismatch(tx.billing_country, tx.shipping_country)
    out[6] = (
        NAN if tx.account_created_ms is None else max(0.0, (tx.occurred_ms - tx.account_created_ms) / DAY_MS)
    )
    out[7] = local_hour(tx.occurred_ms, buyer_timezone(tx))


def count_since(times_desc: Sequence[int], start_ms: int) -> int:
    """How many of the newest-first timestamps are after ``start_ms`` (binary search)."""
    lo, hi = 0, len(times_desc)
    while lo < hi:
        mid = (lo + hi) // 2
        if times_desc[mid] > start_ms:
            lo = mid + 1
        else:
            hi = mid
    return lo


def velocity_features(tx: Tx, amount_ref: float, h: History, out: np.ndarray) -> None:
    """Features from the transactions before this one (``h`` excludes the transaction itself;
    windows are half-open, ``(t - window, t]``)."""
    t = tx.occurred_ms
    card_times = [row[0] for row in h.card]
    out[8] = count_since(card_times, t - 10 * MINUTE_MS)
    out[9] = count_since(card_times, t - HOUR_MS)
    day = count_since(card_times, t - DAY_MS)
    out[10] = day
    out[11] = math.log1p(sum(row[1] for row in h.card[:day]))
    out[12] = count_since(h.user, t - HOUR_MS)
    out[13] = count_since(h.user, t - DAY_MS)
    if tx.device:
        device_times = [row[0] for row in h.device]
        out[14] = count_since(device_times, t - HOUR_MS)
        out[15] = count_since(device_times, t - DAY_MS)
        out[16] = len({row[1] for row in h.device} - {tx.card})
    else:
        out[14] = out[15] = out[16] = NAN
    out[17] = len({row[2] for row in h.card} - {tx.user_id})
    out[18] = len({row[3] for row in h.card} - {tx.device, ""})
    out[19] = NAN if not card_times else (t - card_times[0]) / HOUR_MS
    out[20] = NAN if h.card_first_ms is None else max(0.0, (t - h.card_first_ms) / DAY_MS)
    total = sum(row[1] for row in h.card)
    out[21] = NAN if not h.card or total <= 0 else amount_ref / (total / len(h.card))


class FeaturePipeline:
    """Turns transactions into feature rows, reading and then recording velocity state.

    Not thread-safe on its own: callers hold the state store's lock (``StateStore.batch``) around
    ``transform`` so a batch sees and records its transactions in order.
    """

    def __init__(self, rates: RatesTable) -> None:
        self.rates = rates

    def transform(self, txs: Sequence[Tx], store: StateStore) -> tuple[np.ndarray, np.ndarray]:
        """Feature matrix (n x len(FEATURES)) and amounts in the reference currency, in order; each
        transaction is recorded in ``store`` after its features are computed, so the next one sees it."""
        x = np.empty((len(txs), len(FEATURES)), dtype=np.float64)
        amounts = np.empty(len(txs), dtype=np.float64)
        for i, tx in enumerate(txs):
            amount_ref = self.rates.to_reference(tx.amount, tx.currency)
            amounts[i] = amount_ref
            row = x[i]
            static_features(tx, amount_ref, row)
            history = store.history(tx, CARD_WINDOW_MS, USER_WINDOW_MS, DEVICE_WINDOW_MS)
            velocity_features(tx, amount_ref, history, row)
            store.record_event(tx, amount_ref)
        return x, amounts


def describe(feature_index: int, value: float, tx: Tx) -> str:
    return FEATURES[feature_index].describe(value, tx)
