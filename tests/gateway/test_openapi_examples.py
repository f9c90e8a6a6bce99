"""The OpenAPI document's example requests (``gateway/openapi_examples.json``): one per route, each a
valid request message under the proto3 JSON mapping (unknown fields refused) that fills every REQUIRED
field, each in the document, and each accepted by ``make run``'s suite on the demo catalogue.

The examples are sent in the file's order to the session's demo suite with the development key
(every scope). None may be refused as a bad request; the only non-2xx answer allowed is the one
listed in ``EXPECTED_STATUS`` (a session id that no suite has: NOT_FOUND is that route's honest
answer). The suite is shared with other tests, so the writes leave it as they expect it: the item
upsert restates a demo catalogue item exactly (checked below), the interactions are those of a user
(u-9001) whom the erasure example (ForgetUser) then forgets, the product indexed (P9001) is removed
again by the RemoveProducts example, and the review, article and outcome are of a product, topic and
transaction no other test reads.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
from google.api import field_behavior_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from gateway.descriptors import Route, RouteTable
from gateway.openapi import EXAMPLES_PATH, build_openapi, field_behaviors, load_examples
from gateway.transcode import build_request
from tests.demo_suite import DEV_KEY, DemoSuite

#: Routes whose example is honestly answered with another status than 2xx.
EXPECTED_STATUS = {"GET /v1/chat/sessions/{session_id}": 404}
#: What the undoing examples must report: they really undid the writes before them.
EXPECTED_RESULT = {
    "POST /v1/recommender/items": {"upsertedCount": 1},
    "POST /v1/recommender/interactions": {"acceptedCount": 2},
    "DELETE /v1/recommender/users/{user_id}": {"eventsDeleted": "2"},
    "POST /v1/vision/products:index": {"indexedCount": 1},
    "POST /v1/vision/products:remove": {"removedCount": 1},
    "POST /v1/sentiment/reviews": {"acceptedCount": 1},
    "POST /v1/chat/knowledge": {"upsertedCount": 1},
}


@pytest.fixture(scope="module")
def routes() -> dict[str, Route]:
    return {r.label: r for r in RouteTable.load().routes}


@pytest.fixture(scope="module")
def examples() -> dict[str, dict[str, Any]]:
    return load_examples()


def test_every_route_has_one_example(routes: dict[str, Route], examples: dict[str, Any]) -> None:
    assert set(examples) == set(routes), (
        f"routes without an example: {sorted(set(routes) - set(examples))}; "
        f"examples without a route: {sorted(set(examples) - set(routes))}"
    )
    for label, example in examples.items():
        assert set(example) <= {"body", "path", "query"}, label
        assert set(example.get("path", {})) == set(routes[label].template.variables), label
        assert ("body" in example) == bool(routes[label].body), label


def messages_of(route: Route, example: dict[str, Any]) -> list[dict[str, Any]]:
    """The example as request messages in proto3 JSON: the body (each streamed message) with the path
    variables and query parameters placed into it."""
    body = example.get("body", {})
    bodies = body if route.method.client_streaming else [body]
    out = []
    for b in bodies:
        payload = dict(b) if route.body == "*" else ({route.body: b} if route.body else {})
        for name, value in {**example.get("query", {}), **example.get("path", {})}.items():
            target = payload
            *parents, leaf = name.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
        out.append(payload)
    return out


def missing_required(message: Message, prefix: str = "") -> list[str]:
    """The REQUIRED fields (google.api.field_behavior) left unset, at any depth of what is set."""
    out = []
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        path = prefix + f.name
        if field_behavior_pb2.REQUIRED in field_behaviors(f):
            present = (
                message.HasField(f.name) if f.has_presence else bool(len(value) if f.is_repeated else value)
            )
            if not present:
                out.append(path)
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            if f.is_repeated:
                for i, item in enumerate(value):
                    out += missing_required(item, f"{path}[{i}].")
            elif message.HasField(f.name):
                out += missing_required(value, path + ".")
    return out


def test_every_example_is_a_valid_request_message(routes: dict[str, Route], examples: dict[str, Any]) -> None:
    problems = []
    for label, example in examples.items():
        route = routes[label]
        for i, payload in enumerate(messages_of(route, example)):
            message = route.method.request_cls()
            try:
                json_format.ParseDict(payload, message, ignore_unknown_fields=False)
            except json_format.ParseError as exc:
                problems.append(f"{label} [{i}]: {exc}")
                continue
            missing = missing_required(message)
            if missing:
                problems.append(f"{label} [{i}]: REQUIRED fields unset: {missing}")
        # and as the bridge reads it (strict JSON: base64, one name per field, path vs body)
        path_vars = {k: str(v) for k, v in example.get("path", {}).items()}
        bodies = example.get("body")
        for body in bodies if route.method.client_streaming else [bodies]:
            try:
                build_request(route, path_vars, example.get("query", {}).items(), body)
            except Exception as exc:  # reported with its route
                problems.append(f"{label}: the bridge refuses it: {exc}")
    assert not problems, "\n".join(problems)


def test_the_examples_are_in_the_document(routes: dict[str, Route], examples: dict[str, Any]) -> None:
    table = RouteTable.load()
    doc = build_openapi(table, table.backends())
    for label, example in examples.items():
        route = routes[label]
        op = doc["paths"][route.template.openapi_path][route.http_method.lower()]
        for param in op["parameters"]:
            if param["in"] == "path":
                assert param["example"] == example["path"][param["name"]], label
        if "body" in example:
            content = op["requestBody"]["content"]
            assert content["application/json"]["example"] == example["body"], label
    assert EXAMPLES_PATH.is_file()


def url_of(base: str, route: Route, example: dict[str, Any]) -> str:
    path = re.sub(
        r"\{([^}=]+)(=[^}]*)?\}",
        lambda m: urllib.parse.quote(str(example["path"][m.group(1)]), safe=""),
        route.template.template,
    )
    query = urllib.parse.urlencode(list(example.get("query", {}).items()), doseq=True)
    return base + path + (f"?{query}" if query else "")


def send(url: str, method: str, body: Any | None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"x-api-key": DEV_KEY}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_item_upsert_restates_a_demo_catalogue_item(
    demo_suite: DemoSuite, examples: dict[str, Any]
) -> None:
    """An upserted item that is not the catalogue's could be recommended where other tests expect only
    catalogue products; a market on it would be the recommender's first (the demo's items have none)."""
    import pandas as pd

    rows = pd.read_parquet(demo_suite.demo_dir / "items.parquet").set_index("item_id")
    for item in examples["POST /v1/recommender/items"]["body"]["items"]:
        row = rows.loc[item["itemId"]]
        assert [item.get(k, "") for k in ("title", "description", "category", "language")] == [
            row.title,
            row.description,
            row.category,
            row.language,
        ]
        assert not item.get("markets") and not row.markets
        price = item["listPrice"]
        assert price["currencyCode"] == row.currency
        assert int(price["units"]) + price.get("nanos", 0) / 1e9 == pytest.approx(row.price)


def test_every_example_is_accepted_by_the_running_suite(
    demo_suite: DemoSuite, routes: dict[str, Route], examples: dict[str, Any]
) -> None:
    failures = []
    for label, example in examples.items():  # the file's order: writes before what undoes them
        route = routes[label]
        status, text = send(url_of(demo_suite.url, route, example), route.http_method, example.get("body"))
        want = EXPECTED_STATUS.get(label)
        if want is not None:
            if status != want:
                failures.append(f"{label}: HTTP {status}, expected {want}: {text[:400]}")
            continue
        if not 200 <= status < 300:
            failures.append(f"{label}: HTTP {status}: {text[:400]}")
            continue
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        if route.method.server_streaming:
            if any("error" in line for line in lines) or "result" not in lines[-1]:
                failures.append(f"{label}: the stream did not end in a result: {text[-400:]}")
            continue
        answer = lines[0]
        if answer.get("rejected"):
            failures.append(f"{label}: elements rejected: {answer['rejected']}")
        for key, value in EXPECTED_RESULT.get(label, {}).items():
            if answer.get(key) != value:
                failures.append(f"{label}: {key} is {answer.get(key)!r}, expected {value!r}: {text[:400]}")
    assert not failures, "examples the suite does not accept:\n" + "\n".join(failures)
