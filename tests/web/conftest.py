"""Browser fixtures: one headless Chromium per session, a fresh desktop or phone page per test.

Playwright's async API is bound to the event loop it starts in, so the browser lives in pytest-asyncio's
session loop and every async test under tests/web runs there too (marked below). Async fixtures that
serve what those tests open (aiohttp apps, gRPC servers) must run in the same loop: declare them with
``@pytest_asyncio.fixture(loop_scope="session")`` (any ``scope``), or the server's loop is idle while
the test awaits the browser."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect
from pytest_asyncio import is_async_test

from tests.web.browser import LAUNCH_ARGS, PHONE, chromium_path, close_page, new_page

HERE = Path(__file__).resolve().parent
# Page assertions wait this long (Playwright's default is 5 s; the 2-core machine runs models too).
expect.set_options(timeout=15_000)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every async test under tests/web in the session loop, where the browser is."""
    session_loop = pytest.mark.asyncio(loop_scope="session")
    for item in items:
        if is_async_test(item) and HERE in item.path.parents:
            item.add_marker(session_loop, append=False)


def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> None:
    """Fail at once, naming the fixture, when an async fixture of a browser test would run in another
    loop than the browser's (the test would otherwise time out waiting for an idle server). Reads the
    loop scope pytest-asyncio's own hook wrapper has resolved onto the fixture by now."""
    loop_scope = getattr(fixturedef.func, "_loop_scope", None)
    path = getattr(request.node, "path", None)
    if loop_scope not in (None, "session") and path is not None and HERE in Path(path).parents:
        pytest.fail(
            f"async fixture {fixturedef.argname!r} runs in the {loop_scope} event loop; browser tests "
            'need @pytest_asyncio.fixture(loop_scope="session") (see tests/web/conftest.py)',
            pytrace=False,
        )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A 1280x900 desktop page; its console errors: tests.web.browser.console_log(page)."""
    page = await new_page(browser)
    yield page
    await close_page(page)


@pytest_asyncio.fixture(loop_scope="session")
async def phone_page(browser: Browser) -> AsyncIterator[Page]:
    """A 390x844 touch phone page (is_mobile: the meta viewport applies)."""
    page = await new_page(browser, PHONE)
    yield page
    await close_page(page)
