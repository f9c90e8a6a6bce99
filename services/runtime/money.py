"""``google.type.Money`` (exact units and nanos) and the deprecated ``double`` amounts beside it.

The contract moves every amount to ``google.type.Money``; for one version (until v2) the old fields
(a ``double`` with a currency string, or ``cbec.common.v1.Money``) are still accepted. The rule every
service applies, with ``reconcile``: only the old fields set, use them; the new one set, use it; both
set and disagreeing, INVALID_ARGUMENT naming the old field. Responses fill both.

A ``double`` is compared with the exact amount through its shortest decimal form (``repr``: 129.9 is
"129.9", not 129.900000000000005684...), which is what the client wrote. The form of a
``google.type.Money`` (a three-letter code, nanos within range and of the sign of units) is checked by
the runtime from the contract (``validation.py``) before a servicer runs.

Own code, not a library: it is a few lines of the standard ``decimal`` module, and a money library
would bring its own money type to convert to and from again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal

from google.type import money_pb2

from .errors import Violation, quote

NANO = Decimal("1e-9")
NANOS_PER_UNIT = 1_000_000_000
#: Room for any int64 of units with nine decimals (the default context keeps 28 digits).
#: Enough digits for any double to the nano (1.8e308 has 309 integer digits), so no rounding step fails.
_EXACT = Context(prec=400)
#: google.type.Money's units are an int64.
_MAX_UNITS = 2**63 - 1


def to_decimal(money: money_pb2.Money) -> Decimal:
    """The exact amount of a ``google.type.Money``."""
    return _EXACT.add(Decimal(money.units), Decimal(money.nanos).scaleb(-9))


def float_decimal(value: float) -> Decimal:
    """The decimal a client meant by a ``double`` (its shortest round-trip form); NaN and infinities
    stay what they are."""
    return Decimal(repr(float(value)))


def to_money(value: Decimal | float, currency_code: str) -> money_pb2.Money:
    """A ``google.type.Money`` of ``value`` rounded to the nano (half to even)."""
    exact = value if isinstance(value, Decimal) else float_decimal(value)
    if not exact.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    nanos_total = int(exact.quantize(NANO, rounding=ROUND_HALF_EVEN, context=_EXACT).scaleb(9, _EXACT))
    units = abs(nanos_total) // NANOS_PER_UNIT
    if units > _MAX_UNITS:
        raise ValueError(f"beyond google.type.Money's range: {value!r}")
    nanos = abs(nanos_total) % NANOS_PER_UNIT
    sign = -1 if nanos_total < 0 else 1
    return money_pb2.Money(currency_code=currency_code, units=sign * units, nanos=sign * nanos)


@dataclass(frozen=True)
class Amount:
    """An amount as a request gave it, and where: ``value_path`` and ``currency_path`` name the
    fields to blame for a bad value or currency. ``currency`` is as sent (stripped): whether case
    matters is the service's to say."""

    value: Decimal
    currency: str
    value_path: str
    currency_path: str


def reconcile(
    new: money_pb2.Money | None,
    new_path: str,
    old_value: float,
    old_value_path: str,
    old_currency: str,
    old_currency_path: str,
    old_present: bool | None = None,
) -> tuple[Amount | None, list[Violation]]:
    """The one amount a request means, from the new field (``new``: None when unset) and the
    deprecated ones; None when neither is given. The violations say where the two disagree (naming
    the old field); the amount is then the new one's.

    ``old_present``: whether the old amount was sent (a ``cbec.common.v1.Money`` that is set: its 0
    is an amount). None for plain proto3 fields, where 0 and "" mean "not sent"."""
    value_given = old_value != 0 or math.isnan(old_value)
    old_given = (value_given or bool(old_currency.strip())) if old_present is None else old_present
    if old_present:
        value_given = True
    if new is None:
        if not old_given:
            return None, []
        value = float_decimal(old_value)
        return Amount(value, old_currency.strip(), old_value_path, old_currency_path), []
    exact = to_decimal(new)
    amount = Amount(exact, new.currency_code, new_path, f"{new_path}.currency_code")
    out = []
    if old_given and value_given:
        old = float_decimal(old_value)
        if (
            not old.is_finite()
            or abs(old) > _MAX_UNITS + 1
            or old.quantize(NANO, ROUND_HALF_EVEN, _EXACT) != exact
        ):
            out.append(
                Violation(
                    old_value_path,
                    f"{old_value!r} disagrees with {new_path} ({exact.normalize():f} {new.currency_code}): "
                    f"send {new_path} alone ({old_value_path} is deprecated)",
                )
            )
    if old_currency.strip() and old_currency.strip().upper() != new.currency_code:
        out.append(
            Violation(
                old_currency_path,
                f"{quote(old_currency)} disagrees with {new_path}.currency_code "
                f"({new.currency_code}): send {new_path} alone ({old_currency_path} is deprecated)",
            )
        )
    return amount, out
