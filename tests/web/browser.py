"""Headless Chromium for the browser tests: where it is, how pages are opened, what they log.

The browser is Debian's Chromium extracted by tools/install-chromium.sh (`make deploy-tools`), driven by
Playwright through ``executable_path``: Playwright's own browser download cannot run here."""

from __future__ import annotations

import os
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page

ROOT = Path(__file__).resolve().parents[2]
TOOLS_CHROMIUM = ROOT / "build" / "tools" / "bin" / "chromium"
SYSTEM_CHROMIUM = Path("/usr/bin/chromium")
# As root Chromium's sandbox cannot start; /dev/shm is often 64 MB in containers, too small for it.
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage"]
DESKTOP = {"viewport": {"width": 1280, "height": 900}}
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}


def chromium_path() -> Path:
    """The Chromium to launch: $CBEC_CHROMIUM if set, else ours from build/tools, else the machine's.
    A missing one fails the test: a skipped browser test would hide a broken set-up."""
    override = os.environ.get("CBEC_CHROMIUM")
    candidates = [Path(override)] if override else [TOOLS_CHROMIUM, SYSTEM_CHROMIUM]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        f"no Chromium at {' or '.join(map(str, candidates))}: run `make deploy-tools` "
        "(tools/install-chromium.sh)",
        pytrace=False,
    )


def screenshots_dir() -> Path:
    """Where screenshots go: $CBEC_SCREENSHOTS_DIR, else build/screenshots (kept after the run)."""
    path = Path(os.environ.get("CBEC_SCREENSHOTS_DIR") or ROOT / "build" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


async def save_screenshot(page: Page, name: str, *, full_page: bool = False) -> Path:
    """Save a PNG of ``page`` as ``<screenshots_dir>/<name>.png`` and return its path."""
    path = screenshots_dir() / f"{name}.png"
    await page.screenshot(path=path, full_page=full_page)
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@dataclass
class ConsoleLog:
    """What a page reported: console.error lines (failed resource loads included, as Chromium logs them;
    the browser's own /favicon.ico request excepted) and uncaught exceptions (always a bug in the page)."""

    errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        url = message.location.get("url", "")
        # The browser asks for /favicon.ico by itself; a page without one has done nothing wrong.
        if message.type == "error" and not url.endswith("/favicon.ico"):
            self.errors.append(f"{message.text} ({url}:{message.location.get('lineNumber', '')})")

    def on_page_error(self, error: Error) -> None:
        self.exceptions.append(f"{error.name}: {error.message}")


_LOGS: weakref.WeakKeyDictionary[Page, ConsoleLog] = weakref.WeakKeyDictionary()


def console_log(page: Page) -> ConsoleLog:
    """The console log of a page opened with :func:`new_page`."""
    return _LOGS[page]


def assert_no_console_errors(page: Page) -> None:
    """Fail naming every console error and uncaught exception the page has reported."""
    log = console_log(page)
    problems = [*log.errors, *log.exceptions]
    assert not problems, "the page reported errors:\n" + "\n".join(problems)


async def new_page(browser: Browser, device: dict | None = None, base_url: str | None = None) -> Page:
    """A page in a fresh context (own cookies and storage) with its console watched; close it with
    :func:`close_page`. ``device``: :data:`DESKTOP` (default) or :data:`PHONE`."""
    options = dict(device or DESKTOP)
    if base_url is not None:
        options["base_url"] = base_url
    context = await browser.new_context(**options)
    page = await context.new_page()
    log = ConsoleLog()
    page.on("console", log.on_console)
    page.on("pageerror", log.on_page_error)
    _LOGS[page] = log
    return page


async def close_page(page: Page) -> None:
    await page.context.close()
