"""Every REQUIRED field of every RPC, taken out of an otherwise valid request, is refused by the running
service with a field violation naming it (issue 18: "a REQUIRED field missing from a request is rejected
by the runtime, naming the field, for every RPC that has one").

The fields come from the compiled contract: the generated modules' descriptors, read here straight from
``(google.api.field_behavior)``, not through the runtime's own rule tables, in the request and in every
message set in it (elements of repeated fields included). The servers are the suite ``make run``
starts (``tests/abuse/suite.py``: every service and the gateway as processes, small real models).

Each RPC has one hand-written valid request (``BASES``). It is sent first and must not be refused
with INVALID_ARGUMENT (nor have an element rejected), so a case cannot pass because the base was bad
already; then each REQUIRED field is cleared in a copy and that copy must be refused, naming the field
(``transactions[0].card_fingerprint``). A message of a client stream is named ``requests[0].<field>``.
Where an element is rejected alone (``(cbec.common.v1.item).rejected_alone``: batch upserts, a stream
of products) the call succeeds and that element's ``ItemRejection`` names the field instead.
``test_every_required_field_is_covered`` checks the bases reach every REQUIRED field of the contract.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cbec.chat.v1 import chat_pb2
from cbec.common.v1 import common_pb2, options_pb2
from cbec.gateway.v1 import gateway_pb2
from cbec.recommender.v1 import recommender_pb2 as rec
from cbec.risk.v1 import risk_pb2
from cbec.sentiment.v1 import sentiment_pb2
from cbec.vision.v1 import vision_pb2
from google.api import field_behavior_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.type import money_pb2

from services.runtime.errors import field_violations
from tests.abuse.suite import USERS, Suite, running_suite

USER = USERS["healthy"]
CALL_TIMEOUT_S = 60.0
MODULES = (chat_pb2, common_pb2, gateway_pb2, rec, risk_pb2, sentiment_pb2, vision_pb2)
PROCESS = {"chat": "chat", "recommender": "recommender", "risk": "risk", "sentiment": "sentiment",
           "vision": "vision", "gateway": "gateway"}  # fmt: skip


@dataclass(frozen=True)
class Ctx:
    """What a base request needs from the running suite."""

    item: str  # an item of the recommender's catalogue
    image: bytes  # a product photo (PNG)


def _transaction() -> risk_pb2.Transaction:
    t = risk_pb2.Transaction(
        transaction_id=f"req-{uuid.uuid4().hex[:12]}",
        user_id=USER,
        card_fingerprint="card-required-1",
        ip_country="DE",
        billing_country="DE",
        shipping_country="DE",
        total=money_pb2.Money(currency_code="EUR", units=42, nanos=500_000_000),
    )
    t.occurred_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
    return t


REC, CHAT = "cbec.recommender.v1.RecommenderService/", "cbec.chat.v1.ChatService/"
SENT, VIS = "cbec.sentiment.v1.SentimentService/", "cbec.vision.v1.VisionService/"
RISK, GW = "cbec.risk.v1.RiskService/", "cbec.gateway.v1.GatewayService/"

# One valid request per RPC that has a REQUIRED field (a list of messages for a client stream).
# Optional messages that hold REQUIRED fields are set (a price), so that those are reached too.
BASES: dict[str, Callable[[Ctx], Any]] = {
    f"{REC}Recommend": lambda c: rec.RecommendRequest(user_id=USER, k=3),
    f"{REC}SimilarItems": lambda c: rec.SimilarItemsRequest(item_id=c.item, k=3),
    f"{REC}RecordInteractions": lambda c: rec.RecordInteractionsRequest(
        interactions=[rec.Interaction(user_id=USER, item_id=c.item, type=rec.INTERACTION_TYPE_VIEW)]
    ),
    f"{REC}UpsertItems": lambda c: rec.UpsertItemsRequest(
        items=[rec.Item(item_id="REQ-ITEM-1", title="Required fields test jacket", category="tops",
                        price=common_pb2.Money(currency_code="EUR", amount=12.5))]
    ),
    f"{REC}ForgetUser": lambda c: rec.ForgetUserRequest(user_id="U-REQ-FORGET"),
    f"{CHAT}Converse": lambda c: chat_pb2.ConverseRequest(message="Where is my parcel?"),
    f"{CHAT}GetSession": lambda c: chat_pb2.GetSessionRequest(session_id="0" * 32),
    f"{CHAT}EndSession": lambda c: chat_pb2.EndSessionRequest(session_id="0" * 32),
    f"{CHAT}UpsertKnowledge": lambda c: chat_pb2.UpsertKnowledgeRequest(
        articles=[chat_pb2.Article(article_id="required-fields-test", topic="shipping", language="en",
                                   title="Test article", body="Parcels to Germany take three days.")]
    ),
    f"{CHAT}GenerateProductCopy": lambda c: chat_pb2.GenerateProductCopyRequest(
        product=chat_pb2.ProductAttributes(name="Trail shoe", category="shoes",
                                           price=common_pb2.Money(currency_code="EUR", amount=89.9)),
        target_language="en",
    ),
    f"{SENT}Analyze": lambda c: sentiment_pb2.AnalyzeRequest(
        texts=[sentiment_pb2.TextInput(id="1", text="Great fit, love it")]
    ),
    f"{SENT}AnalyzeStream": lambda c: [
        sentiment_pb2.AnalyzeStreamRequest(text=sentiment_pb2.TextInput(id="1", text="Great fit"))
    ],
    f"{SENT}IngestReviews": lambda c: sentiment_pb2.IngestReviewsRequest(
        reviews=[sentiment_pb2.Review(review_id="req-review-1", product_id=c.item, market="DE",
                                      text="Great fit, love it")]
    ),
    f"{VIS}IndexProducts": lambda c: [
        vision_pb2.IndexProductsRequest(product_id="REQ-PHOTO-1", image=c.image, category="tops")
    ],
    f"{VIS}SearchByImage": lambda c: vision_pb2.SearchByImageRequest(image=c.image, k=3),
    f"{VIS}RemoveProducts": lambda c: vision_pb2.RemoveProductsRequest(
        product_ids=["REQ-NOT-INDEXED"]
    ),
    f"{RISK}ScoreTransaction": lambda c: risk_pb2.ScoreTransactionRequest(
        transaction=_transaction()
    ),
    f"{RISK}ScoreTransactions": lambda c: risk_pb2.ScoreTransactionsRequest(
        transactions=[_transaction()]
    ),
    f"{RISK}ReportOutcome": lambda c: risk_pb2.ReportOutcomeRequest(
        transaction_id="req-outcome-1", outcome=risk_pb2.OUTCOME_LEGITIMATE
    ),
    f"{GW}GetProductPage": lambda c: gateway_pb2.GetProductPageRequest(
        product_id=c.item, k=3
    ),
    f"{GW}AssessOrder": lambda c: gateway_pb2.AssessOrderRequest(order=_transaction()),
}  # fmt: skip


# --- the contract ---------------------------------------------------------------------------------------
def required(fd: FieldDescriptor) -> bool:
    return field_behavior_pb2.REQUIRED in fd.GetOptions().Extensions[field_behavior_pb2.field_behavior]


def rejected_alone(descriptor: Descriptor) -> bool:
    options = descriptor.GetOptions()
    return options.HasExtension(options_pb2.item) and options.Extensions[options_pb2.item].rejected_alone


def methods() -> Iterator[MethodDescriptor]:
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def _message_fields(descriptor: Descriptor) -> Iterator[FieldDescriptor]:
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.message_type.GetOptions().map_entry:
            yield fd


def required_in_type(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> set[str]:
    """Full names of every REQUIRED field reachable from a message type (whether set or not)."""
    if descriptor.full_name in seen:
        return set()
    found = {fd.full_name for fd in descriptor.fields if required(fd)}
    for fd in _message_fields(descriptor):
        found |= required_in_type(fd.message_type, seen | {descriptor.full_name})
    return found


Step = tuple[str, int | None]  # a field name, and the element's index for a repeated field


@dataclass(frozen=True)
class Case:
    """One REQUIRED field of one RPC's base request."""

    method: MethodDescriptor
    steps: tuple[Step, ...]  # from the request (or the first message of a client stream)
    field: FieldDescriptor

    @property
    def key(self) -> str:
        return f"{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def path(self) -> str:
        parts = [f"{name}[{i}]" if i is not None else name for name, i in self.steps]
        return ("requests[0]." if self.method.client_streaming else "") + ".".join(parts)

    def alone(self) -> tuple[int, str, str] | None:
        """Where the element rejected alone is: (its index, the field's path in it, the repeated
        field's path up to the element); None when the whole call is refused."""
        if self.method.client_streaming and rejected_alone(self.method.input_type):
            return 0, self.path.removeprefix("requests[0]."), ""
        descriptor = self.method.input_type
        for n, (name, index) in enumerate(self.steps[:-1]):
            descriptor = descriptor.fields_by_name[name].message_type
            if index is not None and rejected_alone(descriptor):
                head = ".".join(s for s, _ in self.steps[:n]) + ("." if n else "") + name
                inner = [f"{s}[{i}]" if i is not None else s for s, i in self.steps[n + 1 :]]
                return index, ".".join(inner), head
        return None


def required_paths(
    message: Message, steps: tuple[Step, ...] = ()
) -> Iterator[tuple[tuple[Step, ...], FieldDescriptor]]:
    """Every REQUIRED field of ``message`` and of the messages set in it (first elements of repeated
    fields), with its path."""
    for fd in message.DESCRIPTOR.fields:
        if required(fd):
            yield (*steps, (fd.name, None)), fd
    for fd in _message_fields(message.DESCRIPTOR):
        if fd.is_repeated:
            values = getattr(message, fd.name)
            if values:
                yield from required_paths(values[0], (*steps, (fd.name, 0)))
        elif message.HasField(fd.name):
            yield from required_paths(getattr(message, fd.name), (*steps, (fd.name, None)))


PLACEHOLDER = Ctx(item="P-PLACEHOLDER", image=b"\x89PNG")


def first_message(base: Any) -> Message:
    return base[0] if isinstance(base, list) else base


def cases() -> list[Case]:
    out = []
    for method in methods():
        key = f"{method.containing_service.full_name}/{method.name}"
        if key in BASES:
            for steps, fd in required_paths(first_message(BASES[key](PLACEHOLDER))):
                out.append(Case(method, steps, fd))
    return out


CASES = cases()
WITH_REQUIRED = [m for m in methods() if required_in_type(m.input_type)]


def without(base: Any, steps: tuple[Step, ...]) -> Any:
    """A copy of the base request with the field at ``steps`` cleared."""
    requests = [
        type(m).FromString(m.SerializeToString()) for m in (base if isinstance(base, list) else [base])
    ]
    holder: Any = requests[0]
    for name, index in steps[:-1]:
        holder = getattr(holder, name)[index] if index is not None else getattr(holder, name)
    holder.ClearField(steps[-1][0])
    return requests if isinstance(base, list) else requests[0]


# --- the checks that need no server ---------------------------------------------------------------------
def test_every_rpc_with_a_required_field_has_a_base_request() -> None:
    keys = {f"{m.containing_service.full_name}/{m.name}" for m in WITH_REQUIRED}
    assert keys == set(BASES), "an RPC with a REQUIRED field needs a valid base request here"
    assert len(keys) >= 20


def test_every_required_field_is_covered() -> None:
    """The bases set every optional message that holds a REQUIRED field, so every one is tested."""
    for method in WITH_REQUIRED:
        covered = {c.field.full_name for c in CASES if c.method is method}
        assert covered == required_in_type(method.input_type), method.full_name


# --- against the running suite --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    with running_suite(tmp_path_factory.mktemp("required-fields")) as running:
        yield running


@pytest.fixture(scope="module")
def ctx(suite: Suite) -> Ctx:
    from tests.vision import imagegen

    reply = _call(suite, _method("cbec.recommender.v1.RecommenderService/Recommend"),
                  rec.RecommendRequest(user_id=USER, k=1))  # fmt: skip
    photo = io.BytesIO()
    imagegen.draw("circle", "red", seed=7).save(photo, format="PNG")
    return Ctx(item=reply.items[0].item_id, image=photo.getvalue())


def _method(key: str) -> MethodDescriptor:
    return next(m for m in methods() if f"{m.containing_service.full_name}/{m.name}" == key)


def _call(suite: Suite, method: MethodDescriptor, request: Any) -> Any:
    """One call as its real callers make it: the gateway with the admin API key, a backend with the
    internal token and an identity holding every scope. A server stream is read to its end."""
    process = method.containing_service.full_name.split(".")[1]
    metadata = (
        (("x-api-key", suite.keys["admin"]),)
        if process == "gateway"
        else suite.trusted_metadata(user=USER, scopes=("*",))
    )
    response_cls = message_factory.GetMessageClass(method.output_type)
    with grpc.insecure_channel(suite.address(PROCESS[process])) as channel:
        kind = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        path = f"/{method.containing_service.full_name}/{method.name}"
        fn = kind(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        result = fn(
            iter(request) if method.client_streaming else request, timeout=CALL_TIMEOUT_S, metadata=metadata
        )
        return list(result) if method.server_streaming else result


@pytest.mark.parametrize("key", sorted(BASES))
def test_the_base_request_is_valid(suite: Suite, ctx: Ctx, key: str) -> None:
    """Not refused as invalid, and no element rejected: whatever a case below sees is its own doing."""
    method = _method(key)
    try:
        reply = _call(suite, method, BASES[key](ctx))
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.INVALID_ARGUMENT, (key, field_violations(exc), exc.details())
        return
    for message in reply if isinstance(reply, list) else [reply]:
        assert not getattr(message, "rejected", None), (key, message.rejected)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.key.split('.')[-1]}:{c.path}" for c in CASES])
def test_a_missing_required_field_is_refused_naming_it(suite: Suite, ctx: Ctx, case: Case) -> None:
    request = without(BASES[case.key](ctx), case.steps)
    alone = case.alone()
    if alone is None:
        with pytest.raises(grpc.RpcError) as err:
            _call(suite, case.method, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        fields = [f for f, _ in field_violations(err.value)]
        assert case.path in fields, (case.path, field_violations(err.value))
        return
    index, inner, head = alone
    reply = _call(suite, case.method, request)
    rejections = {r.index: [v.field for v in r.violations] for r in reply.rejected}
    assert index in rejections, (case.path, reply)
    named = {inner, f"{head}[{index}].{inner}"}  # a path in the element, or from the request
    assert named & set(rejections[index]), (case.path, rejections[index])


def test_the_cases_are_many_and_reach_nested_and_per_element_fields() -> None:
    paths = {c.path for c in CASES}
    assert {"transactions[0].card_fingerprint", "order.occurred_time", "product.price.currency_code",
            "requests[0].text", "items[0].item_id", "requests[0].product_id"} <= paths  # fmt: skip
    assert sum(c.alone() is not None for c in CASES) >= 10
    assert len(CASES) >= 45
