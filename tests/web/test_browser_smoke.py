"""The browser-test set-up works end to end: Chromium starts, runs a page's JavaScript modules, fetches
from the server that served it, reports errors, and saves screenshots."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Page, expect

from tests.web import browser as web_browser
from tests.web.browser import console_log, png_size, save_screenshot

INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cbec smoke</title>
<style>body { font-family: sans-serif; margin: 2rem; } h1 { color: #1a5fb4; } .cjk { font-size: 2em; }</style>
<script type="module" src="/app.js"></script></head>
<body><h1>Browser smoke test</h1>
<p id="status">module not run</p><p id="echo"></p><p id="width"></p>
<p class="cjk">日本語のテキスト · 中文文本 · 한국어 텍스트 · Ünïcödé</p>
</body></html>
"""
# A module importing another module: what the storefront's pages do.
APP_JS = """import { reverse } from "/util.js";
document.querySelector("#status").textContent = "module ran";
document.querySelector("#width").textContent = `width ${window.innerWidth}`;
const token = new URLSearchParams(location.search).get("token");
const response = await fetch(`/api/echo?text=${encodeURIComponent(token)}`);
const body = await response.json();
document.querySelector("#echo").textContent = `echo ${reverse(body.reversed)}`;
"""
UTIL_JS = "export const reverse = (text) => [...text].reverse().join('');\n"
BROKEN_JS = "document.querySelector('#status').textContent = 'about to throw';\nnull.boom();\n"


async def echo(request: web.Request) -> web.Response:
    """The server's own work (reversing), so the page can only show the token by fetching it."""
    text = request.query.get("text", "")
    return web.json_response({"reversed": text[::-1]})


def static(body: str, content_type: str) -> web.RequestHandler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=body, content_type=content_type)

    return handler


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site() -> AsyncIterator[str]:
    """A tiny aiohttp site on an ephemeral loopback port; its base URL."""
    app = web.Application()
    app.router.add_get("/", static(INDEX, "text/html"))
    app.router.add_get("/broken", static(INDEX.replace("/app.js", "/broken.js"), "text/html"))
    app.router.add_get("/app.js", static(APP_JS, "text/javascript"))
    app.router.add_get("/util.js", static(UTIL_JS, "text/javascript"))
    app.router.add_get("/broken.js", static(BROKEN_JS, "text/javascript"))
    app.router.add_get("/api/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_page_runs_modules_fetches_and_is_screenshotted(page: Page, site: str) -> None:
    token = secrets.token_hex(4)
    await page.goto(f"{site}/?token={token}")
    await expect(page.locator("#status")).to_have_text("module ran")
    await expect(page.locator("#echo")).to_have_text(f"echo {token}")
    await expect(page.locator("#width")).to_have_text("width 1280")
    web_browser.assert_no_console_errors(page)

    path = await save_screenshot(page, "smoke-desktop")
    assert png_size(path) == (1280, 900)
    assert path.stat().st_size > 1024, "a blank screenshot: nothing was rendered"


async def test_phone_page_has_phone_width(phone_page: Page, site: str) -> None:
    await phone_page.goto(f"{site}/?token=phone")
    await expect(phone_page.locator("#width")).to_have_text("width 390")
    await expect(phone_page.locator("#echo")).to_have_text("echo phone")
    assert png_size(await save_screenshot(phone_page, "smoke-phone")) == (390, 844)


async def test_uncaught_errors_and_failed_loads_are_collected(page: Page, site: str) -> None:
    await page.goto(f"{site}/broken")
    await expect(page.locator("#status")).to_have_text("about to throw")
    async with page.expect_console_message(lambda message: message.type == "error"):
        await page.evaluate("fetch('/no-such-route')")
    log = console_log(page)
    assert any("TypeError" in exception for exception in log.exceptions), log.exceptions
    assert any("404" in error for error in log.errors), log.errors
    with pytest.raises(AssertionError, match="TypeError"):
        web_browser.assert_no_console_errors(page)


def test_missing_chromium_fails_naming_the_make_target(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("CBEC_CHROMIUM", raising=False)
    monkeypatch.setattr(web_browser, "TOOLS_CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(web_browser, "SYSTEM_CHROMIUM", tmp_path / "no-system-chromium")
    with pytest.raises(pytest.fail.Exception, match="make deploy-tools"):
        web_browser.chromium_path()
