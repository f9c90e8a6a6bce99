"""The web storefront's public files on the HTTP bridge: the page, its modules, the demo catalogue.

- ``GET /`` the page (``gateway/web/index.html``); ``GET /web/<name>`` a file directly in ``gateway/web/``.
- ``GET /web/config.json``: ``{"env"}``, plus ``"apiKey"`` (the development key) only when
  ``CBEC_GATEWAY_ENV=dev`` and the request comes straight from this machine (a loopback peer, no proxy
  header): the key grants every scope, so a dev gateway reachable from the network must not hand it to
  any client. Otherwise no key is given out and the page asks its user for one, as in prod.
- ``GET /catalogue/products.json`` and ``GET /catalogue/images/<productId>.png`` from
  ``CBEC_GATEWAY_DEMO_CATALOGUE_DIR``; without it they are 404 ``DEMO_CATALOGUE_NOT_CONFIGURED``.

Like ``/healthz`` they need no credentials and take nothing from any rate limit: they are public
assets, and the page then calls the API with the same routes, keys and errors as any other client.
A name must match a plain pattern (no slash, no leading dot, no percent escape) before it touches the
file system, so no path can leave its folder; anything else is a ``google.rpc.Status`` 404.

Own code rather than aiohttp's static router because the bridge runs on aiohttp's low-level server
(one handler, no application router). The files are few and small: read whole, cached by mtime,
served with an ETag (304 on ``If-None-Match``) and ``Cache-Control: no-cache`` so a new version shows
at once; every answer carries a strict Content-Security-Policy (the page loads nothing from elsewhere).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from aiohttp import web

from services.runtime.errors import InvalidArgument, Violation

from .config import GatewaySettings
from .errors import GatewayError
from .files import SAFE_ID, FileCache

WEB_DIR = Path(__file__).resolve().parent / "web"
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
_WEB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9]+)+$")
_IMAGE_PATH = re.compile(r"^/catalogue/images/([^/]+)\.png$")
_CATALOGUE_CACHE = "no-cache"
_IMAGE_CACHE = "public, max-age=300"


def _not_found(message: str, reason: str = "NOT_FOUND") -> GatewayError:
    return GatewayError(grpc.StatusCode.NOT_FOUND, message, reason=reason)


_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def from_loopback(request: web.BaseRequest) -> bool:
    """Whether the request's peer is this machine (127.0.0.0/8, ::1, or ::ffff:127.x) and no proxy says it
    forwards someone else's: a reverse proxy on the same host would make every client look local."""
    if any(name in request.headers for name in _PROXY_HEADERS):
        return False
    remote = request.remote
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Storefront:
    """The storefront's routes; ``match`` gives the bridge a metrics label and a handler for a GET path."""

    def __init__(self, settings: GatewaySettings, web_dir: Path = WEB_DIR) -> None:
        self.settings = settings
        self.web_dir = web_dir
        directory = settings.demo_catalogue_dir.strip()
        self.catalogue_dir = Path(directory) if directory else None
        self._files = FileCache()
        self._config = json.dumps({"env": settings.env}).encode()
        self._dev_config = json.dumps({"env": settings.env, "apiKey": settings.dev_api_key}).encode()
        self._exact: dict[str, Handler] = {
            "/": self._index,
            "/index.html": self._index,
            "/web/config.json": self._config_json,
            "/catalogue/products.json": self._products,
        }

    def match(self, path: str) -> tuple[str, Handler] | None:
        """``(label, handler)`` for a storefront path, ``None`` for any other (the API's)."""
        handler = self._exact.get(path)
        if handler is not None:
            return path, handler
        if path.startswith("/web/"):
            return "/web/{file}", self._web_file
        if path.startswith("/catalogue/images/"):
            return "/catalogue/images/{productId}.png", self._image
        if path.startswith("/catalogue/"):
            return "/catalogue/{file}", self._unknown
        return None

    async def _serve(
        self, request: web.BaseRequest, path: Path, content_type: str, cache: str
    ) -> web.Response | None:
        found = await self._files.get(path)
        if found is None:
            return None
        data, etag = found
        headers = {**SECURITY_HEADERS, "Cache-Control": cache, "ETag": etag}
        if etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
            return web.Response(status=304, headers=headers)
        response = web.Response(body=data, headers=headers)
        response.headers["Content-Type"] = content_type
        return response

    async def _index(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._serve(request, self.web_dir / "index.html", CONTENT_TYPES[".html"], "no-cache")
        if response is None:
            raise _not_found("the storefront's index.html is missing from this gateway")
        return response

    async def _web_file(self, request: web.BaseRequest) -> web.StreamResponse:
        name = request.rel_url.raw_path.removeprefix("/web/")
        suffix = Path(name).suffix.lower()
        response = None
        if _WEB_NAME.match(name) and suffix in CONTENT_TYPES:
            response = await self._serve(request, self.web_dir / name, CONTENT_TYPES[suffix], "no-cache")
        if response is None:
            raise _not_found(f"no storefront file {name!r}")
        return response

    def gives_dev_key(self, request: web.BaseRequest) -> bool:
        """Whether config.json may carry the development key: dev, a loopback peer, no proxy header."""
        return self.settings.env == "dev" and from_loopback(request)

    async def _config_json(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        body = self._dev_config if self.gives_dev_key(request) else self._config
        return web.Response(body=body, content_type="application/json", headers=headers)

    def _catalogue(self) -> Path:
        if self.catalogue_dir is None:
            raise _not_found(
                "no demo catalogue is configured on this gateway (CBEC_GATEWAY_DEMO_CATALOGUE_DIR)",
                reason="DEMO_CATALOGUE_NOT_CONFIGURED",
            )
        return self.catalogue_dir

    async def _products(self, request: web.BaseRequest) -> web.StreamResponse:
        path = self._catalogue() / "products.json"
        response = await self._serve(request, path, CONTENT_TYPES[".json"], _CATALOGUE_CACHE)
        if response is None:
            raise _not_found("the demo catalogue has no products.json", reason="DEMO_CATALOGUE_INCOMPLETE")
        return response

    async def _unknown(self, request: web.BaseRequest) -> web.StreamResponse:
        raise _not_found(f"no catalogue file at {request.rel_url.raw_path}")

    async def _image(self, request: web.BaseRequest) -> web.StreamResponse:
        found = _IMAGE_PATH.match(request.rel_url.raw_path)
        if found is None:
            raise _not_found(f"no catalogue file at {request.rel_url.raw_path}")
        product_id = found.group(1)
        if not SAFE_ID.match(product_id):  # never reaches the file system: no way out of images/
            raise InvalidArgument(
                [Violation("productId", "must be letters, digits, '.', '_' or '-' (at most 200)")]
            )
        path = self._catalogue() / "images" / f"{product_id}.png"
        response = await self._serve(request, path, CONTENT_TYPES[".png"], _IMAGE_CACHE)
        if response is None:
            raise _not_found(f"no image for product {product_id}", reason="PRODUCT_IMAGE_NOT_FOUND")
        return response
