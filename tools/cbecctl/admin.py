"""The model-admin API (``cbec.common.v1.ModelAdminService``) through the gateway's HTTP bridge.

``GET /v1/admin/{service}/model`` (which version serves, which versions the model store holds) and
``POST /v1/admin/{service}/model:load`` with ``{"version": "..."}`` (empty: newest valid version). With
the shared state backend the replica that takes the call switches, records the choice in PostgreSQL and
notifies the others, which follow within about a second; replicas started later load it too.

The API key needs the ``admin`` scope. It is read from a file (``--api-key-file``) or the environment
(``CBEC_ADMIN_API_KEY``), never from the command line, where ``ps`` and shell history would show it.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tools.cbecctl.errors import CbecctlError

API_KEY_ENV = "CBEC_ADMIN_API_KEY"
GATEWAY_ENV = "CBEC_GATEWAY_URL"
GATEWAY_CA_ENV = "CBEC_GATEWAY_CA_FILE"
# Statuses after which the replica certainly did not switch: the call was refused before or by the load.
NOT_CHANGED = frozenset({400, 401, 403, 404, 409, 412, 429})


class AdminApiError(CbecctlError):
    """The gateway answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def nothing_changed(self) -> bool:
        """True when the call certainly changed nothing (refused); False when it may have (5xx, no answer)."""
        return self.status in NOT_CHANGED


def read_api_key(path: str | None, environ: dict[str, str] | None = None) -> str:
    """The admin API key from ``path``, else from ``$CBEC_ADMIN_API_KEY``; a clear error without one."""
    environ = dict(os.environ) if environ is None else environ
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as exc:
            raise CbecctlError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
        if not key:
            raise CbecctlError(f"the API key file {path} is empty")
        if "\n" in key:
            raise CbecctlError(f"the API key file {path} holds more than one line; put only the key in it")
        return key
    key = environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise CbecctlError(
            "a model roll-out goes through the gateway's model-admin API and needs an API key with the "
            f"'admin' scope: pass --api-key-file PATH or set {API_KEY_ENV} (never the key itself as an "
            "argument)"
        )
    return key


def gateway_url(url: str | None, environ: dict[str, str] | None = None) -> str:
    environ = dict(os.environ) if environ is None else environ
    url = (url or environ.get(GATEWAY_ENV, "")).strip().rstrip("/")
    if not url:
        raise CbecctlError(
            "a model roll-out goes through the gateway's model-admin API: pass --gateway URL (e.g. "
            "https://api.shop.example, or http://127.0.0.1:8080 with kubectl port-forward) or set "
            f"{GATEWAY_ENV}"
        )
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise CbecctlError(f"--gateway must be an http:// or https:// URL, not {url!r}")
    return url


class AdminApi:
    """A small client of the gateway's model-admin routes (stdlib HTTP, honours HTTPS_PROXY/NO_PROXY)."""

    def __init__(
        self, url: str, api_key: str, ca_file: str | None = None, request_timeout: float = 10.0
    ) -> None:
        self.url = url.rstrip("/")
        self._key = api_key
        self.request_timeout = request_timeout
        context = None
        if self.url.startswith("https://"):
            try:
                context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise CbecctlError(f"cannot use the gateway CA file {ca_file}: {exc}") from None
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))

    def __repr__(self) -> str:  # never show the key
        return f"AdminApi({self.url!r})"

    def _call(self, method: str, path: str, body: dict[str, Any] | None, deadline_s: float) -> dict[str, Any]:
        headers = {
            "x-api-key": self._key,
            "accept": "application/json",
            # the gateway caps it at its CBEC_GATEWAY_MAX_DEADLINE_S
            "grpc-timeout": f"{max(1, int(deadline_s))}S",
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        what = f"{method} {self.url}{path}"
        try:
            with self._opener.open(request, timeout=deadline_s + self.request_timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._error(what, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminApiError(f"{what}: no answer from the gateway ({reason})") from None
        try:
            parsed = json.loads(raw or b"{}")
        except ValueError:
            raise AdminApiError(f"{what}: the answer is not JSON: {raw[:200]!r}", 200) from None
        return parsed if isinstance(parsed, dict) else {}

    @staticmethod
    def _error(what: str, exc: urllib.error.HTTPError) -> AdminApiError:
        try:
            status = json.loads(exc.read() or b"{}")
        except ValueError:
            status = {}
        message = str(status.get("message") or exc.reason or "") if isinstance(status, dict) else ""
        code = ""
        for detail in status.get("details", []) if isinstance(status, dict) else []:
            if isinstance(detail, dict) and detail.get("reason"):
                code = str(detail["reason"])
        hint = {
            401: "the gateway did not accept the API key",
            403: "the API key lacks the 'admin' scope",
            404: "the gateway has no such route or service (is it the cbec gateway, and a model service?)",
            429: "rate limited by the gateway; try again",
        }.get(exc.code)
        text = (
            f"{what}: HTTP {exc.code}" + (f" ({hint})" if hint else "") + (f": {message}" if message else "")
        )
        return AdminApiError(text, exc.code, code)

    def status(self, service: str, deadline_s: float = 10.0) -> dict[str, Any]:
        """GetModelStatus of the replica the gateway picked: ``serving`` and the store's ``versions``."""
        return self._call("GET", f"/v1/admin/{urllib.parse.quote(service)}/model", None, deadline_s)

    def load(self, service: str, version: str, deadline_s: float = 60.0) -> dict[str, Any]:
        """LoadModelVersion (empty version: un-pin, newest valid); returns ``serving`` and ``previous``."""
        return self._call(
            "POST",
            f"/v1/admin/{urllib.parse.quote(service)}/model:load",
            {"version": version},
            deadline_s,
        )


def version_of(info: Any) -> str:
    """The ``version`` of a ModelInfo in proto3 JSON ('' when unset)."""
    return str(info.get("version") or "") if isinstance(info, dict) else ""
