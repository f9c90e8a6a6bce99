"""The contract's limits, checked by the runtime on every request (``services/runtime/validation.py``),
and errors that stay bounded however much input fails (``services/runtime/errors.py``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from cbec.chat.v1 import chat_pb2
from cbec.common.v1 import common_pb2, options_pb2
from cbec.recommender.v1 import recommender_pb2
from cbec.risk.v1 import risk_pb2
from cbec.sentiment.v1 import sentiment_pb2
from cbec.vision.v1 import vision_pb2
from google.protobuf import struct_pb2, wrappers_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.runtime.errors import (
    DESCRIPTION_CHARS,
    FIELD_CHARS,
    MAX_STATUS_BYTES,
    MAX_VIOLATIONS,
    MESSAGE_CHARS,
    InvalidArgument,
    ServiceError,
    Violation,
    field_violations,
    quote,
    rejection,
    status_metadata,
)
from services.runtime.server import Runtime, Server
from services.runtime.validation import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_CHARS,
    is_required,
    item_violations,
    merged,
    rules_for,
    validate,
    violations,
)
from tests.runtime.conftest import EchoClient, make_settings
from tests.runtime.echo_service import EchoService


def fields(message: Any) -> list[str]:
    return [v.field for v in violations(message)]


def described(message: Any) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in violations(message)]


# --- strings ------------------------------------------------------------------------------------------
def test_strings_have_a_default_bound_and_declared_ones() -> None:
    assert violations(wrappers_pb2.StringValue(value="x" * DEFAULT_MAX_CHARS)) == []
    ((field, description),) = described(wrappers_pb2.StringValue(value="x" * (DEFAULT_MAX_CHARS + 1)))
    assert field == "value" and "1024" in description and "1025" in description
    assert violations(wrappers_pb2.StringValue(value="é" * DEFAULT_MAX_CHARS)) == []  # characters, not bytes
    tx = risk_pb2.Transaction(buyer_timezone="Z" * 65, merchant_category="m" * 10_000_000)
    tx.MergeFrom(risk_pb2.Transaction(transaction_id="t", card_fingerprint="c", occurred_time={"seconds": 1}))
    assert described(risk_pb2.ScoreTransactionRequest(transaction=tx)) == [
        ("transaction.buyer_timezone", "must be at most 64 characters (got 65)"),
        ("transaction.merchant_category", "must be at most 128 characters (got 10000000)"),
    ]
    assert fields(chat_pb2.ConverseRequest(message="m" * 4001)) == ["message"]
    assert fields(chat_pb2.ConverseRequest(message="m" * 4000)) == []


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b"])
def test_control_characters_are_refused(char: str) -> None:
    ((field, description),) = described(wrappers_pb2.StringValue(value=f"ab{char}c"))
    assert field == "value" and f"U+{ord(char):04X}" in description and "position 2" in description


def test_tab_newline_return_and_ordinary_unicode_pass() -> None:
    text = "line one\r\n\tline two — ünïcödé 日本語 🙂 \u202e"
    assert violations(wrappers_pb2.StringValue(value=text)) == []


def test_required_strings_and_required_elements() -> None:
    assert fields(chat_pb2.ConverseRequest()) == ["message"]
    assert fields(chat_pb2.ConverseRequest(message=" \t ")) == ["message"]
    assert fields(chat_pb2.ConverseRequest(message="hi")) == []
    assert fields(vision_pb2.RemoveProductsRequest(product_ids=["a", " ", "b"])) == ["product_ids[1]"]
    assert described(vision_pb2.RemoveProductsRequest()) == [
        ("product_ids", "is required (must hold at least one item)")
    ]


# --- REQUIRED (google.api.field_behavior) -----------------------------------------------------------------
def test_required_messages_numbers_and_enums() -> None:
    assert described(risk_pb2.ScoreTransactionRequest()) == [("transaction", "is required")]
    assert described(recommender_pb2.RecommendRequest(user_id="u")) == [("k", "is required (must not be 0)")]
    assert described(risk_pb2.ReportOutcomeRequest(transaction_id="t")) == [
        ("outcome", "is required (must not be OUTCOME_UNSPECIFIED)")
    ]
    assert fields(vision_pb2.SearchByImageRequest()) == ["image"]  # bytes: not empty


def test_required_fields_of_set_messages_and_of_elements_are_named_by_path() -> None:
    tx = risk_pb2.Transaction(transaction_id="t", card_fingerprint="c", occurred_time={"seconds": 1})
    incomplete = risk_pb2.Transaction(transaction_id="u", card_fingerprint=" ")
    request = risk_pb2.ScoreTransactionsRequest(transactions=[tx, tx, tx, incomplete])
    assert fields(request) == ["transactions[3].card_fingerprint", "transactions[3].occurred_time"]
    assert fields(risk_pb2.ScoreTransactionRequest(transaction=incomplete)) == [
        "transaction.card_fingerprint",
        "transaction.occurred_time",
    ]
    # a message that is not set is not walked: its required fields are moot (the message's own
    # REQUIRED says whether it must be there)
    assert fields(chat_pb2.GenerateProductCopyRequest(product={"name": "n"}, target_language="de")) == []
    deprecated_price = chat_pb2.ProductAttributes(name="n", price={"amount": 1.0})
    request_ = chat_pb2.GenerateProductCopyRequest(product=deprecated_price, target_language="de")
    assert fields(request_) == ["product.price.currency_code"]


def test_elements_rejected_alone_leave_their_required_fields_to_the_servicer() -> None:
    """``(cbec.common.v1.item).rejected_alone``: the runtime keeps the call; ``item_violations`` (what
    the servicer runs per element) names the missing fields with the same rules."""
    item = recommender_pb2.Item(price={"amount": 2.0})  # no item_id, no price currency
    request = recommender_pb2.UpsertItemsRequest(items=[item])
    assert violations(request) == []
    assert [v.field for v in item_violations(item)] == ["item_id", "price.currency_code"]
    assert [v.field for v in item_violations(item, "items[0].")] == [
        "items[0].item_id",
        "items[0].price.currency_code",
    ]
    # its limits still reject the whole call
    request.items[0].item_id = "x" * 257
    assert fields(request) == ["items[0].item_id"]
    # one message of a client stream whose products are rejected alone
    assert violations(vision_pb2.IndexProductsRequest()) == []
    assert [v.field for v in item_violations(vision_pb2.IndexProductsRequest())] == ["product_id", "image"]


def test_merged_keeps_one_reason_per_field() -> None:
    first = [Violation("title", "is required (must not be empty)")]
    then = [Violation("title", "must not be empty"), Violation("topic", "bad")]
    assert merged(first, then) == [first[0], then[1]]


def test_the_deprecated_required_limit_is_not_used_by_the_contract() -> None:
    """REQUIRED is the one way to say it; a field that still set the old option would be unchecked."""
    from cbec.gateway.v1 import gateway_pb2

    required = 0
    modules = (chat_pb2, common_pb2, gateway_pb2, recommender_pb2, risk_pb2, sentiment_pb2, vision_pb2)
    for module in modules:
        for message in _all_messages(module.DESCRIPTOR.message_types_by_name.values()):
            for fd in message.fields:
                options = fd.GetOptions()
                if options.HasExtension(options_pb2.limits):
                    assert not options.Extensions[options_pb2.limits].required, fd.full_name
                required += is_required(fd)
    assert required >= 40  # the contract does mark its required fields


def _all_messages(messages: Any) -> Iterator[Any]:
    for m in messages:
        yield m
        yield from _all_messages(
            m.nested_types.values() if isinstance(m.nested_types, dict) else m.nested_types
        )


# --- google.type.Money -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("money", "bad"),
    [
        ({"currency_code": "EUR", "units": 12, "nanos": 500_000_000}, []),
        ({"currency_code": "EUR", "units": -1, "nanos": -750_000_000}, []),
        ({"currency_code": "EUR", "units": 0, "nanos": -5}, []),
        ({"currency_code": "eur", "units": 1}, ["total.currency_code"]),
        ({"currency_code": "EURO", "units": 1}, ["total.currency_code"]),
        ({"currency_code": "", "units": 1}, ["total.currency_code"]),
        ({"currency_code": "EUR", "units": 1, "nanos": -1}, ["total.nanos"]),
        ({"currency_code": "EUR", "units": -1, "nanos": 1}, ["total.nanos"]),
        ({"currency_code": "EUR", "nanos": 1_000_000_000}, ["total.nanos"]),
    ],
)
def test_money_has_its_documented_form(money: dict[str, Any], bad: list[str]) -> None:
    tx = risk_pb2.Transaction(
        transaction_id="t", card_fingerprint="c", occurred_time={"seconds": 1}, total=money
    )
    assert fields(risk_pb2.ScoreTransactionRequest(transaction=tx)) == [f"transaction.{f}" for f in bad]


# --- bytes, repeated, maps --------------------------------------------------------------------------------
def test_bytes_have_a_default_bound_and_declared_ones() -> None:
    assert violations(wrappers_pb2.BytesValue(value=b"\x00" * DEFAULT_MAX_BYTES)) == []
    assert fields(wrappers_pb2.BytesValue(value=b"\x00" * (DEFAULT_MAX_BYTES + 1))) == ["value"]
    big = sentiment_pb2.TextInput(utf8_bytes=b"a" * (256 * 1024 + 1))
    ((field, description),) = described(sentiment_pb2.AnalyzeRequest(texts=[big]))
    assert field == "texts[0].utf8_bytes" and "262144 bytes" in description


def test_too_many_items_is_one_violation_without_walking_them() -> None:
    fine = risk_pb2.Transaction(transaction_id="t", card_fingerprint="c", occurred_time={"seconds": 1})
    bad = risk_pb2.Transaction(transaction_id="\x00", card_fingerprint="c", occurred_time={"seconds": 1})
    request = risk_pb2.ScoreTransactionsRequest(transactions=[bad] * 10_001)
    assert described(request) == [("transactions", "must hold at most 10000 items (got 10001)")]
    request = risk_pb2.ScoreTransactionsRequest(transactions=[fine] * 4 + [bad])
    assert fields(request) == ["transactions[4].transaction_id"]
    many = struct_pb2.ListValue(values=[struct_pb2.Value(number_value=1)] * 1001)  # default bound
    assert fields(many) == ["values"]


def test_maps_bound_entries_keys_and_values() -> None:
    def copy_request(attributes: dict[str, str]) -> chat_pb2.GenerateProductCopyRequest:
        product = chat_pb2.ProductAttributes(name="n", attributes=attributes)
        return chat_pb2.GenerateProductCopyRequest(product=product, target_language="de")

    assert fields(copy_request({f"k{i}": "v" for i in range(50)})) == []
    assert fields(copy_request({f"k{i}": "v" for i in range(51)})) == ["product.attributes"]
    ((field, description),) = described(copy_request({"colour": "r" * 201}))
    assert field == "product.attributes['colour']" and "200" in description
    ((field, description),) = described(copy_request({"k" * 1000: "v"}))
    assert len(field) < 100 and description.startswith("key ")


def test_recursive_types_compile_and_nest() -> None:
    inner = struct_pb2.Struct()
    inner.update({"deep": {"deeper": "ok", "bad": "nul\x00"}})
    ((field, _),) = described(inner)
    assert field == "fields['deep'].struct_value.fields['bad'].string_value"


# --- timestamps, durations, enums -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "nanos", "ok"),
    [
        (0, 0, True),
        (4_102_444_800, 0, True),  # 2100-01-01
        (4_102_444_801, 0, False),
        (-1, 999_999_999, False),
        (-(2**62), 0, False),
        (-62_135_596_800, 0, False),  # year 1
        (1_700_000_000, -1, False),
        (1_700_000_000, 1_000_000_000, False),
    ],
)
def test_timestamps_default_range_and_nanos(seconds: int, nanos: int, ok: bool) -> None:
    review = sentiment_pb2.Review()
    review.created_time.seconds, review.created_time.nanos = seconds, nanos
    request = sentiment_pb2.IngestReviewsRequest(reviews=[sentiment_pb2.Review(), review])
    assert fields(request) == ([] if ok else ["reviews[1].created_time"])


def test_declared_timestamp_bound() -> None:
    request = risk_pb2.ReportOutcomeRequest(transaction_id="t", outcome=risk_pb2.OUTCOME_CHARGEBACK)
    request.reported_time.seconds = 946_684_799  # a second before the declared 2000-01-01
    ((field, description),) = described(request)
    assert field == "reported_time" and "2000-01-01T00:00:00Z" in description
    request.reported_time.seconds = 946_684_800
    assert violations(request) == []


@pytest.mark.parametrize(
    ("seconds", "nanos", "ok"),
    [
        (86_400, 0, True),
        (-5, -3, True),
        (1, -1, False),
        (-1, 1, False),
        (0, 1_000_000_000, False),
        (315_576_000_001, 0, False),
    ],
)
def test_durations_follow_protobufs_rules(seconds: int, nanos: int, ok: bool) -> None:
    request = sentiment_pb2.GetMarketReportRequest(category="c")
    request.window.seconds, request.window.nanos = seconds, nanos
    assert fields(request) == ([] if ok else ["window"])


def test_enums_must_hold_a_defined_value() -> None:
    good = risk_pb2.ReportOutcomeRequest(transaction_id="t", outcome=risk_pb2.OUTCOME_LEGITIMATE)
    assert violations(good) == []
    ((field, description),) = described(risk_pb2.ReportOutcomeRequest(transaction_id="t", outcome=42))
    assert field == "outcome" and "42" in description and "Outcome" in description


# --- the compiled rules -------------------------------------------------------------------------------------
def test_rules_are_compiled_once_per_type_and_unset_fields_are_free() -> None:
    assert rules_for(risk_pb2.Transaction.DESCRIPTOR) is rules_for(risk_pb2.Transaction.DESCRIPTOR)
    assert violations(vision_pb2.GetIndexStatsRequest()) == []
    validate(b"raw bytes, not a message")  # a method without a deserializer: nothing to check


def test_validate_raises_invalid_argument_with_every_violation_and_a_prefix() -> None:
    request = risk_pb2.ReportOutcomeRequest(transaction_id="x" * 300, outcome=9, note="\x00")
    with pytest.raises(ServiceError) as err:
        validate(request, "requests[2].")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.value.violations] == [
        "requests[2].transaction_id",
        "requests[2].outcome",
        "requests[2].note",
    ]


# --- errors stay bounded ------------------------------------------------------------------------------------
def test_quote_truncates_and_says_how_long() -> None:
    assert quote("Europe") == "'Europe'"
    long = quote("m" * 20_000)
    assert long.startswith("'" + "m" * 64 + "'") and "20000 characters" in long and len(long) < 100
    assert "1000000 bytes" in quote(b"v" * 1_000_000)
    assert len(quote(list(range(10_000)))) <= 70


def test_violations_are_capped() -> None:
    v = Violation("f" * 10_000, "d" * 10_000)
    assert len(v.field) == FIELD_CHARS and len(v.description) == DESCRIPTION_CHARS


def _status_size(error: ServiceError) -> int:
    return error.to_status().ByteSize()


@pytest.mark.parametrize("n", [1, 21, 100_000])
def test_a_status_stays_under_4_kb_however_many_items_fail(n: int) -> None:
    found = [Violation(f"items[{i}].名前" * 20, "説明 " * 300) for i in range(n)]
    error = InvalidArgument(found)
    assert _status_size(error) < MAX_STATUS_BYTES
    assert len(error.message) <= MESSAGE_CHARS
    kept = error.violations
    assert len(kept) <= MAX_VIOLATIONS + 1
    if len(kept) < n:
        assert kept[-1].description == f"... and {n - (len(kept) - 1)} more"
    # what goes on the wire: the trailers stay far below gRPC's 16 KB limit
    assert sum(len(k) + len(v) for k, v in status_metadata(error)) < 8 * 1024


def test_a_huge_message_and_retry_info_stay_bounded() -> None:
    error = ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ü" * 100_000, [Violation("f", "d")] * 50, retry_after_s=1.0
    )
    assert len(error.message) == MESSAGE_CHARS and _status_size(error) < MAX_STATUS_BYTES


def test_batch_rejections_are_bounded_too() -> None:
    item = rejection(3, [Violation("x", "y" * 1000)] * 1000)  # the byte budget binds before the count
    assert len(item.violations) <= MAX_VIOLATIONS + 1 and item.ByteSize() < MAX_STATUS_BYTES
    kept = len(item.violations) - 1
    assert item.violations[-1].description == f"... and {1000 - kept} more"
    small = rejection(3, [Violation("x", "y")] * 1000)  # the count binds
    assert len(small.violations) == MAX_VIOLATIONS + 1


# --- through a real server ---------------------------------------------------------------------------------
LOUD = "cbec.test.v1.LoudService"


class LoudEchoService(EchoService):
    """The echo service plus a method that fails with as many violations as it is asked for."""

    service_names: Sequence[str] = (*EchoService.service_names, LOUD)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)

    async def fail(self, request: wrappers_pb2.Int32Value, context: Any) -> wrappers_pb2.Int32Value:
        raise InvalidArgument(
            [Violation(f"items[{i}].name", "must not be " + "x" * 500) for i in range(request.value)]
        )

    def register(self, server: grpc.aio.Server) -> None:
        super().register(server)
        handler = grpc.unary_unary_rpc_method_handler(
            self.fail, wrappers_pb2.Int32Value.FromString, wrappers_pb2.Int32Value.SerializeToString
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(LOUD, {"Fail": handler}),))


async def test_the_runtime_checks_requests_before_the_servicer(models_dir: Path) -> None:
    server = Server(make_settings(models_dir), LoudEchoService)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            client = EchoClient(channel)
            assert (await client.echo(wrappers_pb2.StringValue(value="fine\tvalue"))).value == "fine\tvalue"
            computed = server.service.computed
            for value, words in (("x" * 2000, "at most 1024 characters"), ("a\x00b", "control")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.echo(wrappers_pb2.StringValue(value=value))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                ((field, description),) = field_violations(err.value)
                assert field == "value" and words in description
            assert server.service.computed == computed  # the servicer never saw them

            fail = channel.unary_unary(
                f"/{LOUD}/Fail", wrappers_pb2.Int32Value.SerializeToString, wrappers_pb2.Int32Value.FromString
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fail(wrappers_pb2.Int32Value(value=100_000))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(err.value)  # message and details agree with the call's
            assert status is not None and status.ByteSize() < MAX_STATUS_BYTES
            bad = error_details_pb2.BadRequest()
            status.details[0].Unpack(bad)
            assert bad.field_violations[0].field == "items[0].name"
            assert bad.field_violations[-1].description.endswith("more")
    finally:
        await server.stop(grace=1)
