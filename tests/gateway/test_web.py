"""The storefront's public files on the bridge: page, modules, demo catalogue, config; no way out of them."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from PIL import Image

from gateway.config import DEV_API_KEY, GatewaySettings
from gateway.errors import GatewayError
from gateway.service import Gateway
from gateway.web import WEB_DIR, Storefront, from_loopback
from services.runtime.server import Server
from tests.gateway.conftest import SLOW_KEY, RunningGateway, gateway_settings

NOWHERE = "127.0.0.1:9"  # no backend: the storefront's files must not need any
PRODUCTS = {
    "synthetic": "Titles, prices and users are synthetic (test fixture).",
    "source": "test fixture",
    "markets": {"DE": {"language": "de", "currency": "EUR"}, "JP": {"language": "ja", "currency": "JPY"}},
    "users": [{"userId": "u-1001", "market": "DE"}],
    "products": [
        {
            "productId": "P1078",
            "category": "Dresses",
            "imageClass": "Dress",
            "image": "images/P1078.png",
            "titles": {"en": "Summer dress", "de": "Sommerkleid"},
            "descriptions": {"en": "Light.", "de": "Leicht."},
            "prices": {"DE": {"currencyCode": "EUR", "amount": 89.99}},
            "reviewCount": 87,
            "averageRating": 4.2,
        }
    ],
}


def png(seed: int) -> bytes:
    """A 28x28 grey-scale PNG like the catalogue's Fashion-MNIST images (a light item on black)."""
    image = Image.new("L", (28, 28), 0)
    for x in range(6, 22):
        for y in range(4 + seed % 3, 24):
            image.putpixel((x, y), 180 + (x * y + seed) % 60)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def catalogue_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "catalogue"
    (folder / "images").mkdir(parents=True)
    (folder / "products.json").write_text(json.dumps(PRODUCTS))
    (folder / "images" / "P1078.png").write_bytes(png(1))
    (folder / "images" / "P2001.png").write_bytes(png(2))
    (folder / "secret.png").write_bytes(png(3))  # in the catalogue folder, outside images/
    return folder


@pytest.fixture
async def storefront(
    models_dir: Path, keys_file: Path, jwt_secret_file: Path
) -> AsyncIterator[Callable[..., Any]]:
    """A gateway whose backends are nowhere: the storefront's files are served without them."""
    started: list[Server] = []

    async def start(**over: Any) -> RunningGateway:
        backends = {name: NOWHERE for name in ("recommender", "chat", "sentiment", "vision", "risk")}
        settings = gateway_settings(backends, models_dir, keys_file, jwt_secret_file, **over)
        server = Server(settings, Gateway)
        await server.start()
        started.append(server)
        return RunningGateway(server)

    yield start
    for server in started:
        await server.stop(grace=0.5)


async def raw_get(gw: RunningGateway, target: str) -> tuple[int, bytes]:
    """GET with the request target exactly as written: clients normalise ``..`` and escapes away."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def reason_of(body: dict[str, Any]) -> str:
    infos = [d for d in body.get("details", []) if d["@type"].endswith("google.rpc.ErrorInfo")]
    return infos[0]["reason"] if infos else ""


# --- the page and its modules -------------------------------------------------------------------------
async def test_page_is_served_with_a_strict_policy_and_without_credentials(storefront: Any) -> None:
    gw = await storefront()
    async with aiohttp.ClientSession(gw.http_url) as http:
        # no key, and a wrong one: the page is a public asset; the API still refuses the wrong key
        for headers in ({}, {"x-api-key": "not-a-key-0123456789"}):
            async with http.get("/", headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
                csp = resp.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp and "img-src 'self' data: blob:" in csp
                assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
                assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert resp.headers["Cache-Control"] == "no-cache"
                page = await resp.text()
        assert page == (WEB_DIR / "index.html").read_text()
        assert '<script type="module" src="/web/app.js">' in page
        assert "http://" not in page and "https://" not in page  # nothing from elsewhere at run time
        async with http.post("/v1/gateway/home-feed", json={}, headers={"x-api-key": "not-a-key"}) as resp:
            assert resp.status == 401
        async with http.head("/") as resp:
            assert resp.status == 200 and await resp.read() == b""


async def test_every_file_of_the_storefront_has_its_content_type(storefront: Any) -> None:
    gw = await storefront()
    expected = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    files = sorted(p for p in WEB_DIR.iterdir() if p.suffix in expected)
    assert {p.name for p in files} >= {"app.js", "api.js", "style.css"}
    async with aiohttp.ClientSession(gw.http_url) as http:
        for path in files:
            async with http.get(f"/web/{path.name}") as resp:
                assert resp.status == 200, path.name
                assert resp.headers["Content-Type"] == expected[path.suffix]
                assert "Content-Security-Policy" in resp.headers
                assert await resp.read() == path.read_bytes()
                etag = resp.headers["ETag"]
            async with http.get(f"/web/{path.name}", headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304 and resp.headers["ETag"] == etag
    for source in files:  # the modules import only each other, by relative path: nothing from elsewhere
        if source.suffix == ".js":
            imported = re.findall(r'^import\b[^;]*?from\s+"([^"]+)";', source.read_text(), re.M | re.S)
            assert imported or source.name not in ("app.js", "pages.js")
            for module in imported:
                assert module.startswith("./") and (WEB_DIR / module[2:]).is_file(), (source.name, module)


@pytest.mark.parametrize(
    "target",
    [
        "/web/../config.py",
        "/web/..%2Fconfig.py",
        "/web/%2e%2e/config.py",
        "/web/%2E%2E%2Fconfig.py",
        "/web/..%5Cconfig.py",
        "/web/%252e%252e%252fconfig.py",
        "/web//etc/passwd",
        "/web/.%2e/.%2e/pyproject.toml",
        "/web/web.py",  # a real file beside the folder's, with a type the storefront never serves
        "/web/",
        "/web/nothing.js",
        "/web/app.js%00.css",
    ],
)
async def test_no_path_leaves_the_storefront_folder(storefront: Any, target: str) -> None:
    gw = await storefront()
    status, body = await raw_get(gw, target)
    assert status == 404, (target, body[:200])
    assert b"GatewaySettings" not in body and b"[project]" not in body and b"root:" not in body
    assert "code" in json.loads(body)  # a google.rpc.Status, like every other error of the bridge


# --- the demo catalogue -----------------------------------------------------------------------------
async def test_catalogue_without_a_folder_is_a_clear_404(storefront: Any) -> None:
    gw = await storefront()
    async with aiohttp.ClientSession(gw.http_url) as http:
        for path in ("/catalogue/products.json", "/catalogue/images/P1078.png"):
            async with http.get(path) as resp:
                body = await resp.json()
                assert resp.status == 404, path
                assert reason_of(body) == "DEMO_CATALOGUE_NOT_CONFIGURED"
                assert "CBEC_GATEWAY_DEMO_CATALOGUE_DIR" in body["message"]


async def test_catalogue_serves_products_and_images(storefront: Any, catalogue_dir: Path) -> None:
    gw = await storefront(demo_catalogue_dir=str(catalogue_dir))
    async with aiohttp.ClientSession(gw.http_url) as http:
        async with http.get("/catalogue/products.json") as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.json() == PRODUCTS
        async with http.get("/catalogue/images/P1078.png") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"
            assert "max-age" in resp.headers["Cache-Control"]
            image = Image.open(io.BytesIO(await resp.read()))
            assert image.size == (28, 28) and image.mode == "L"
        async with http.get("/catalogue/images/P9999.png") as resp:
            assert resp.status == 404 and reason_of(await resp.json()) == "PRODUCT_IMAGE_NOT_FOUND"
        async with http.get("/catalogue/images/P1078.jpg") as resp:
            assert resp.status == 404
        # a changed file is served new (the cache follows mtime and size)
        (catalogue_dir / "images" / "P1078.png").write_bytes(png(2) + b"\0" * 7)
        async with http.get("/catalogue/images/P1078.png") as resp:
            assert await resp.read() == png(2) + b"\0" * 7


@pytest.mark.parametrize(
    "target",
    [
        "/catalogue/images/..%2Fsecret.png",
        "/catalogue/images/.hidden.png",
        "/catalogue/images/-P1078.png",
        "/catalogue/images/P1078%00.png",
        "/catalogue/images/%2e%2e%2fsecret.png",
        "/catalogue/images/" + "P" * 201 + ".png",
    ],
)
async def test_catalogue_refuses_bad_product_ids(storefront: Any, catalogue_dir: Path, target: str) -> None:
    gw = await storefront(demo_catalogue_dir=str(catalogue_dir))
    status, body = await raw_get(gw, target)
    assert status == 400, (target, body[:200])
    status_json = json.loads(body)
    violations = [d for d in status_json["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    assert violations[0]["fieldViolations"][0]["field"] == "productId"


@pytest.mark.parametrize(
    "target", ["/catalogue/images/../secret.png", "/catalogue/secret.png", "/catalogue/images/a/b.png"]
)
async def test_catalogue_serves_nothing_but_its_two_routes(
    storefront: Any, catalogue_dir: Path, target: str
) -> None:
    gw = await storefront(demo_catalogue_dir=str(catalogue_dir))
    status, body = await raw_get(gw, target)
    assert status == 404, (target, body[:200])
    assert not body.startswith(b"\x89PNG")


# --- config.json: the development key only in dev ------------------------------------------------------
async def test_config_gives_no_key_in_prod(storefront: Any) -> None:
    gw = await storefront()
    async with aiohttp.ClientSession(gw.http_url) as http, http.get("/web/config.json") as resp:
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        assert await resp.json() == {"env": "prod"}
        assert DEV_API_KEY not in await resp.text()


async def test_config_in_dev_gives_the_key_the_api_accepts(
    make_gateway: Callable[..., Any],
) -> None:
    gw = await make_gateway(env="dev", dev_api_key="dev-key-for-this-test-0123")
    assert isinstance(gw.service.settings, GatewaySettings)
    async with aiohttp.ClientSession(gw.http_url) as http:
        async with http.get("/web/config.json") as resp:
            config = await resp.json()
        assert config == {"env": "dev", "apiKey": "dev-key-for-this-test-0123"}
        async with http.get("/v1/vision/index/stats", headers={"x-api-key": config["apiKey"]}) as resp:
            assert resp.status == 200, await resp.text()


async def test_config_in_dev_gives_no_key_to_a_proxied_request(make_gateway: Callable[..., Any]) -> None:
    """A reverse proxy on this host connects from loopback for every client: its header withholds the key."""
    gw = await make_gateway(env="dev", dev_api_key="dev-key-for-this-test-0123")
    async with aiohttp.ClientSession(gw.http_url) as http:
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            async with http.get("/web/config.json", headers={header: "203.0.113.7"}) as resp:
                assert resp.status == 200
                assert await resp.json() == {"env": "dev"}, header
                assert "dev-key-for-this-test-0123" not in await resp.text()


@pytest.mark.parametrize(
    ("remote", "local"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.5", False),
        ("2001:db8::1", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("localhost", False),  # a peer address is never a name: refuse what does not parse
        ("", False),
    ],
)
def test_only_a_loopback_peer_counts_as_local(remote: str, local: bool) -> None:
    request = make_mocked_request("GET", "/web/config.json").clone(remote=remote)
    assert from_loopback(request) is local


@pytest.mark.parametrize(
    ("env", "remote", "headers", "gets_key"),
    [
        ("dev", "127.0.0.1", {}, True),
        ("dev", "::1", {}, True),
        ("dev", "10.0.0.5", {}, False),
        ("dev", "127.0.0.1", {"X-Forwarded-For": "10.0.0.5"}, False),
        ("prod", "127.0.0.1", {}, False),
        ("prod", "10.0.0.5", {}, False),
    ],
)
async def test_config_gives_the_dev_key_only_in_dev_and_only_to_this_machine(
    env: str, remote: str, headers: dict[str, str], gets_key: bool, keys_file: Path
) -> None:
    keys = keys_file if env == "prod" else None  # prod refuses to start without keys
    shop = Storefront(GatewaySettings(env=env, dev_api_key="dev-key-for-this-test-0123", api_keys_file=keys))
    request = make_mocked_request("GET", "/web/config.json", headers=headers).clone(remote=remote)
    found = shop.match("/web/config.json")
    assert found is not None
    response = await found[1](request)
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    config = json.loads(response.body)
    expected = {"env": env, "apiKey": "dev-key-for-this-test-0123"} if gets_key else {"env": env}
    assert config == expected
    assert gets_key or b"dev-key-for-this-test-0123" not in response.body


async def test_static_requests_take_nothing_from_a_rate_limit(make_gateway: Callable[..., Any]) -> None:
    """The slow key's bucket holds 3: twenty page loads with it leave the API calls untouched."""
    gw = await make_gateway()
    async with aiohttp.ClientSession(gw.http_url, headers={"x-api-key": SLOW_KEY}) as http:
        for _ in range(5):
            for path in ("/", "/web/app.js", "/web/style.css", "/web/config.json"):
                async with http.get(path) as resp:
                    assert resp.status == 200, path
        async with http.get("/v1/vision/index/stats") as resp:
            assert resp.status == 200, await resp.text()
        statuses = []
        for _ in range(6):  # and the bucket is real: the API calls alone run it dry
            async with http.get("/v1/vision/index/stats") as resp:
                statuses.append(resp.status)
        assert 429 in statuses


@pytest.mark.parametrize(
    "target",
    ["/web/../secret.json", "/web/%2e%2e/secret.json", "/web/..%2Fsecret.json", "/web/.%2E%2Fsecret.json"],
)
async def test_a_servable_file_beside_the_folder_stays_out_of_reach(tmp_path: Path, target: str) -> None:
    """The folder's neighbour has a type the storefront serves: only the name check keeps it out."""
    site = tmp_path / "site"
    (site / "web").mkdir(parents=True)
    (site / "web" / "index.html").write_text("<!doctype html>")
    (site / "secret.json").write_text('{"secret": true}')
    shop = Storefront(GatewaySettings(env="dev"), web_dir=site / "web")
    request = make_mocked_request("GET", target)
    found = shop.match(request.rel_url.raw_path)
    assert found is not None
    with pytest.raises(GatewayError) as caught:
        await found[1](request)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    ok = await shop.match("/web/index.html")[1](make_mocked_request("GET", "/web/index.html"))  # type: ignore[index]
    assert ok.status == 200
