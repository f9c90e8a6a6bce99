"""A small, deterministic transaction stream with planted fraud patterns, for fast tests.

Why not the evalml data: it has no devices, IP countries or account ages, so the features the risk
service exists for would be constant there. Here legitimate buyers mostly shop from home (some travel,
some pay in USD, some accounts are new, households share a device); fraud is stolen cards used in
bursts from shared devices, half through new accounts and half through taken-over ones, often from
abroad. No single feature separates the classes, so the model has to combine several.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from services.risk.features import DAY_MS, HOUR_MS, MINUTE_MS, Tx
from services.risk.state import LabelledTx

START_MS = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)
SPAN_MS = 40 * DAY_MS
HOMES = (("DE", "EUR", 1.0), ("FR", "EUR", 1.0), ("GB", "GBP", 0.8), ("US", "USD", 1.0), ("JP", "JPY", 150.0))
ABROAD = ("RU", "NG", "VN", "BR")


def stream(
    users: int = 300, legit_per_user: int = 8, fraud_rings: int = 40, seed: int = 0
) -> list[LabelledTx]:
    """Legitimate purchases plus fraud bursts, in time order (ties broken by id)."""
    rng = np.random.default_rng(seed)
    out: list[LabelledTx] = []
    people = []  # (user, card, home, currency, scale, account created)
    for u in range(users):
        home, currency, scale = HOMES[u % len(HOMES)]
        new_account = rng.random() < 0.1
        created = START_MS - int(rng.integers(0, 3 if new_account else 900)) * DAY_MS
        people.append((f"u{u}", f"card{u}", home, currency, scale, created))
        for k in range(legit_per_user):
            ts = START_MS + int(rng.integers(0, SPAN_MS))
            ship = home if rng.random() < 0.9 else HOMES[int(rng.integers(0, len(HOMES)))][0]
            ip = home if rng.random() < 0.9 else ABROAD[int(rng.integers(0, len(ABROAD)))]  # travelling
            pay = currency if rng.random() < 0.9 else "USD"  # cross-border shops price in USD
            amount = round(float(rng.lognormal(3.8, 0.8)) * (scale if pay == currency else 1.0), 2)
            tx = Tx(f"L{u}-{k}", f"u{u}", f"card{u}", amount, pay, ts, device=f"dev{u // 2}", ip_country=ip,
                    billing_country=home, shipping_country=ship, account_created_ms=created,
                    payment_method="card")  # fmt: skip
            out.append(LabelledTx(tx, 0))
    for r in range(fraud_rings):
        user, card, home, currency, scale, created = people[int(rng.integers(0, len(people)))]
        start = START_MS + int(rng.integers(0, SPAN_MS - HOUR_MS))
        if rng.random() < 0.5:  # a new account made for the stolen card
            user, created = f"fraud-u{r}", start - int(rng.integers(0, 2)) * DAY_MS
        ip = home if rng.random() < 0.35 else ABROAD[r % len(ABROAD)]  # a proxy in the victim's country
        pay = "USD" if rng.random() < 0.6 else currency
        for k in range(int(rng.integers(1, 6))):
            ts = start + k * int(rng.integers(1, 20)) * MINUTE_MS
            amount = round(float(rng.lognormal(4.3, 0.8)) * (1.0 if pay == "USD" else scale), 2)
            ship = ip if rng.random() < 0.6 else home
            tx = Tx(f"F{r}-{k}", user, card, amount, pay, ts, device=f"fraud-dev{r % 25}", ip_country=ip,
                    billing_country=home, shipping_country=ship, account_created_ms=created,
                    payment_method="card")  # fmt: skip
            out.append(LabelledTx(tx, 1))
    out.sort(key=lambda r: (r.tx.occurred_ms, r.tx.transaction_id))
    return out
