"""``google.type.Money`` and the deprecated double amounts beside it (``services/runtime/money.py``):
which amount a request means when it sends the old fields, the new one, or both; and the same rule in
the running chat and recommender (the risk service's is in ``tests/risk/test_server.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from decimal import Decimal

import grpc
import pytest
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc
from cbec.common.v1 import common_pb2
from cbec.recommender.v1 import recommender_pb2 as rec
from cbec.recommender.v1 import recommender_pb2_grpc as rec_grpc
from google.type import money_pb2

from services.runtime.errors import field_violations
from services.runtime.money import Amount, float_decimal, reconcile, to_decimal, to_money
from tests.abuse.suite import USERS, Suite, running_suite


def money(currency: str, units: int, nanos: int = 0) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def resolve(
    new: money_pb2.Money | None, amount: float, currency: str, old_present: bool | None = None
) -> tuple[Amount | None, list[str]]:
    found, violations = reconcile(new, "total", amount, "amount", currency, "currency", old_present)
    return found, [v.field for v in violations]


@pytest.mark.parametrize(
    ("value", "units", "nanos"),
    [(129.9, 129, 900_000_000), (-1.75, -1, -750_000_000), (0.1 + 0.2, 0, 300_000_000), (1e12, 10**12, 0)],
)
def test_a_double_becomes_the_decimal_the_client_wrote(value: float, units: int, nanos: int) -> None:
    m = to_money(value, "EUR")
    assert (m.currency_code, m.units, m.nanos) == ("EUR", units, nanos)


def test_exact_amounts_survive_where_a_double_would_not() -> None:
    big = money("JPY", 9_007_199_254_740_993)  # 2**53 + 1: no double holds it
    assert to_decimal(big) == Decimal(9_007_199_254_740_993)
    assert to_money(to_decimal(big), "JPY") == big
    nano = money("USD", 0, -1)
    assert to_decimal(nano) == Decimal("-1e-9") and to_money(to_decimal(nano), "USD") == nano
    with pytest.raises(ValueError):
        to_money(math.inf, "EUR")


def test_old_only_new_only_and_neither() -> None:
    found, bad = resolve(None, 129.9, " eur ")
    assert found is not None
    assert bad == [] and found.value == Decimal("129.9") and found.currency == "eur"
    assert (found.value_path, found.currency_path) == ("amount", "currency")
    found, bad = resolve(money("EUR", 129, 900_000_000), 0.0, "")
    assert found is not None
    assert bad == [] and found.value == Decimal("129.9") and found.currency == "EUR"
    assert (found.value_path, found.currency_path) == ("total", "total.currency_code")
    assert resolve(None, 0.0, "") == (None, [])
    found, _ = resolve(None, math.nan, "EUR")  # a NaN is given (and the service refuses it)
    assert found is not None and found.value.is_nan()


def test_both_agreeing_and_disagreeing() -> None:
    assert resolve(money("EUR", 129, 900_000_000), 129.9, "eur")[1] == []
    assert resolve(money("EUR", 129, 900_000_000), 129.91, "EUR")[1] == ["amount"]
    assert resolve(money("EUR", 129, 900_000_000), 129.9, "USD")[1] == ["currency"]
    assert resolve(money("EUR", 129, 900_000_000), math.inf, "GBP")[1] == ["amount", "currency"]
    assert resolve(money("EUR", 0, 1), 1e-9, "")[1] == []  # exact to the nano
    assert resolve(money("EUR", 0, 1), 2e-9, "")[1] == ["amount"]


def test_a_set_old_money_message_means_its_zero() -> None:
    """``cbec.common.v1.Money`` is a message: when it is set, amount 0 is an amount, not "unset"."""
    assert resolve(money("EUR", 5), 0.0, "EUR")[1] == []  # plain proto3 fields: 0 is "not sent"
    assert resolve(money("EUR", 5), 0.0, "EUR", old_present=True)[1] == ["amount"]
    assert resolve(money("EUR", 0), 0.0, "EUR", old_present=True)[1] == []
    found, _ = resolve(None, 0.0, "EUR", old_present=True)
    assert found is not None and found.value == 0
    assert resolve(None, 5.0, "EUR", old_present=False) == (None, [])


def test_float_decimal_is_the_shortest_form() -> None:
    assert str(float_decimal(129.9)) == "129.9" and str(float_decimal(0.1 + 0.2)) == "0.30000000000000004"


# --- through the running services: chat's product copy and the recommender's catalogue -----------------
@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    with running_suite(tmp_path_factory.mktemp("money")) as running:
        yield running


def _metadata(suite: Suite) -> tuple[tuple[str, str], ...]:
    return suite.trusted_metadata(user=USERS["healthy"], scopes=("*",))


def _copy(suite: Suite, product: chat_pb2.ProductAttributes) -> chat_pb2.GenerateProductCopyResponse:
    request = chat_pb2.GenerateProductCopyRequest(product=product, target_language="en", target_market="DE")
    with grpc.insecure_channel(suite.address("chat")) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        return stub.GenerateProductCopy(request, metadata=_metadata(suite), timeout=60)


def _refused(call: Callable[[], object]) -> list[str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return [f for f, _ in field_violations(err.value)]


def test_product_copy_takes_either_price_and_refuses_two_that_disagree(suite: Suite) -> None:
    old = common_pb2.Money(currency_code="EUR", amount=89.9)
    new = money("EUR", 89, 900_000_000)
    shown = []
    for product in (
        chat_pb2.ProductAttributes(name="Trail shoe", price=old),
        chat_pb2.ProductAttributes(name="Trail shoe", list_price=new),
        chat_pb2.ProductAttributes(name="Trail shoe", price=old, list_price=new),
    ):
        bullets = _copy(suite, product).bullets
        shown.append([b for b in bullets if "89" in b])
    assert shown[0] and shown[0] == shown[1] == shown[2]  # the same price, whichever field carried it
    disagreeing = chat_pb2.ProductAttributes(name="Trail shoe", price=old, list_price=money("EUR", 90))
    assert _refused(lambda: _copy(suite, disagreeing)) == ["product.price.amount"]
    other_currency = chat_pb2.ProductAttributes(
        name="Trail shoe", price=old, list_price=money("USD", 89, 900_000_000)
    )
    assert _refused(lambda: _copy(suite, other_currency)) == ["product.price.currency_code"]
    for bad, field in (
        (money("eur", 1), "product.list_price.currency_code"),
        (money("EUR", 1, -1), "product.list_price.nanos"),
        (money("EUR", -1), "product.list_price"),
    ):
        product = chat_pb2.ProductAttributes(name="Trail shoe", list_price=bad)
        assert _refused(lambda product=product: _copy(suite, product)) == [field]


def test_catalogue_items_take_either_price_and_reject_two_that_disagree(suite: Suite) -> None:
    def item(i: int, **price: object) -> rec.Item:
        return rec.Item(item_id=f"MONEY-{i}", title=f"Money test jacket {i}", category="tops", **price)  # type: ignore[arg-type]

    old = common_pb2.Money(currency_code="EUR", amount=19.9)
    new = money("EUR", 19, 900_000_000)
    items = [
        item(0, price=old),
        item(1, list_price=new),
        item(2, price=old, list_price=new),
        item(3, price=old, list_price=money("EUR", 20)),
        item(4, list_price=money("EUR", -1)),
        item(
            5, price=common_pb2.Money(currency_code="EUR", amount=0.0), list_price=new
        ),  # a set 0 is an amount
    ]
    with grpc.insecure_channel(suite.address("recommender")) as channel:
        stub = rec_grpc.RecommenderServiceStub(channel)
        reply = stub.UpsertItems(rec.UpsertItemsRequest(items=items), metadata=_metadata(suite), timeout=60)
        assert reply.upserted_count == 3
        rejected = {r.index: [v.field for v in r.violations] for r in reply.rejected}
        assert rejected == {
            3: ["items[3].price.amount"],
            4: ["items[4].list_price"],
            5: ["items[5].price.amount"],
        }
        malformed = rec.UpsertItemsRequest(items=[item(6, list_price=money("EUR", 1, 1_000_000_000))])
        fields = _refused(lambda: stub.UpsertItems(malformed, metadata=_metadata(suite), timeout=60))
        assert fields == ["items[0].list_price.nanos"]  # its form: the runtime refuses the call


def test_a_huge_deprecated_amount_beside_the_new_field_disagrees_instead_of_failing() -> None:
    """1e35 cannot be compared at the nano with a 40-digit context; it must be a violation, not INTERNAL."""
    from google.type import money_pb2

    from services.runtime.money import reconcile, to_money

    amount, violations = reconcile(
        money_pb2.Money(currency_code="EUR", units=10), "total", 1e35, "amount", "", "currency"
    )
    assert amount is not None and [v.field for v in violations] == ["amount"]
    with pytest.raises(ValueError, match="range"):
        to_money(1e35, "EUR")
