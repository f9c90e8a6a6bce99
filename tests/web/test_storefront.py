"""The storefront in headless Chromium, against ``make run``'s suite on the demo catalogue
(``tests/demo_suite.py``): every page shows real data from the services, through the HTTP bridge only.

Screenshots go to ``build/screenshots/`` (``CBEC_SCREENSHOTS_DIR``); the README shows three of them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from tests.demo_suite import ROOT, DemoSuite, free_port, http_get
from tests.web.browser import (
    PHONE,
    assert_no_console_errors,
    close_page,
    console_log,
    new_page,
    png_size,
    save_screenshot,
)

READY = "#main[data-state=ready]"


async def open_page(page: Page, suite: DemoSuite, route: str, market: str = "DE") -> None:
    """Open ``route`` for ``market`` (the settings persist in localStorage: set them on the page)."""
    await page.goto(f"{suite.url}/#{route}")
    select = page.get_by_test_id("market-select")
    if await select.input_value() != market:
        await select.select_option(market)
    await expect(page.locator(READY)).to_be_visible()


def titles(suite: DemoSuite, language: str) -> dict[str, str]:
    return {p["titles"][language]: p["productId"] for p in suite.products}


async def test_home_feed_shows_catalogue_products_with_their_sentiment(
    page: Page, demo_suite: DemoSuite
) -> None:
    await open_page(page, demo_suite, "/", "DE")
    cards = page.get_by_test_id("feed-card")
    await expect(cards.first).to_be_visible()
    assert await cards.count() >= 6
    shown = await page.get_by_test_id("card-title").all_inner_texts()
    german = titles(demo_suite, "de")
    assert shown and all(t in german for t in shown), shown
    assert await page.get_by_test_id("feed-sentiment").count() == await cards.count()
    prices = await cards.get_by_test_id("price").all_inner_texts()
    assert prices and all("€" in p for p in prices), prices
    await expect(page.get_by_test_id("missing-part")).to_have_count(0)
    assert png_size(await save_screenshot(page, "home")) == (1280, 900)
    # The market switch: Japanese titles and yen
    await page.get_by_test_id("market-select").select_option("JP")
    await expect(page.locator(READY)).to_be_visible()
    await expect(cards.first).to_be_visible()
    shown = await page.get_by_test_id("card-title").all_inner_texts()
    japanese = titles(demo_suite, "ja")
    assert shown and all(t in japanese for t in shown), shown
    prices = await cards.get_by_test_id("price").all_inner_texts()
    assert all("¥" in p or "￥" in p for p in prices), prices
    assert_no_console_errors(page)


async def test_product_page_shows_all_four_parts(page: Page, demo_suite: DemoSuite) -> None:
    product = demo_suite.products[0]
    await open_page(page, demo_suite, f"/product/{product['productId']}", "DE")
    await expect(page.get_by_test_id("product-title")).to_have_text(product["titles"]["de"])
    chart = page.get_by_test_id("sentiment-chart")
    await expect(chart).to_be_visible()
    assert int(await chart.get_attribute("data-total") or 0) > 0
    for part in ("visually-similar", "similar-items", "also-for-you"):
        cards = page.get_by_test_id(part).locator("[data-product-id]")
        await expect(cards.first).to_be_visible()
    await expect(page.get_by_test_id("missing-part")).to_have_count(0)
    width, height = png_size(await save_screenshot(page, "product", full_page=True))
    assert width == 1280 and height > 900
    assert_no_console_errors(page)


async def test_photo_search_returns_the_uploaded_products_class_first(
    page: Page, demo_suite: DemoSuite, tmp_path: Path
) -> None:
    from PIL import Image

    product = demo_suite.products[3]
    photo = Image.open(demo_suite.demo_dir / product["image"]).convert("RGB").resize((112, 112))
    upload = tmp_path / "my-photo.jpg"
    photo.save(upload, format="JPEG", quality=85)  # a re-encoded, resized copy: not byte-identical
    await open_page(page, demo_suite, "/search", "DE")
    await page.get_by_test_id("search-file").set_input_files(upload)
    results = page.get_by_test_id("search-result")
    await expect(results.first).to_be_visible()
    first = await results.first.get_attribute("data-product-id")
    image_class = {p["productId"]: p["imageClass"] for p in demo_suite.products}
    assert image_class[first] == product["imageClass"], (first, product["productId"])
    # picking a catalogue photo works too
    await page.get_by_test_id("search-pick").first.click()
    await expect(results.first).to_be_visible()
    assert_no_console_errors(page)


async def test_a_chat_answer_streams_with_its_sources(page: Page, demo_suite: DemoSuite) -> None:
    streamed: list[str] = []
    page.on(
        "request",
        lambda r: streamed.append(r.headers.get("accept", "")) if "/v1/chat/converse" in r.url else None,
    )
    await open_page(page, demo_suite, "/", "GB")
    await page.get_by_test_id("chat-open").click()
    await page.get_by_test_id("chat-input").fill("How long does delivery to Germany take?")
    await page.get_by_test_id("chat-send").click()
    answer = page.get_by_test_id("chat-answer").last
    await expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
    assert len((await answer.inner_text()).strip()) > 20
    await expect(page.get_by_test_id("chat-sources").last).to_be_visible()
    assert streamed and all("text/event-stream" in a for a in streamed), streamed
    assert png_size(await save_screenshot(page, "chat")) == (1280, 900)
    # asking for a person hands off
    await page.get_by_test_id("chat-input").fill("I want to talk to a human agent please")
    await page.get_by_test_id("chat-send").click()
    await expect(page.get_by_test_id("chat-handoff").last).to_be_visible(timeout=60_000)
    # the keyboard closes the panel
    await page.keyboard.press("Escape")
    await expect(page.get_by_test_id("chat-panel")).to_be_hidden()
    assert_no_console_errors(page)


async def test_checkout_shows_the_risk_decision_and_its_reasons(page: Page, demo_suite: DemoSuite) -> None:
    product = demo_suite.products[1]
    await open_page(page, demo_suite, f"/product/{product['productId']}", "DE")
    await page.get_by_test_id("add-to-cart").click()
    await expect(page.get_by_test_id("cart-count")).to_have_text("1")
    await page.get_by_test_id("nav-checkout").click()
    await expect(page.get_by_test_id("cart-item")).to_have_count(1)
    await page.get_by_test_id("place-order").click()
    decision = page.get_by_test_id("decision")
    await expect(decision).to_be_visible()
    assert await decision.get_attribute("data-decision") in ("APPROVE", "REVIEW", "DECLINE")
    await expect(page.get_by_test_id("decision-reasons").locator("li").first).to_be_visible()
    assert_no_console_errors(page)


async def test_operations_page_shows_each_backend(page: Page, demo_suite: DemoSuite) -> None:
    await open_page(page, demo_suite, "/ops", "DE")
    services = page.get_by_test_id("ops-service")
    await expect(services).to_have_count(5)
    for name in ("recommender", "chat", "sentiment", "vision", "risk"):
        card = page.locator(f"[data-testid=ops-service][data-service={name}]")
        await expect(card.get_by_test_id("ops-health")).to_have_attribute("data-health", "SERVING")
        await expect(card.get_by_test_id("ops-version")).not_to_be_empty()
    assert_no_console_errors(page)


async def test_phone_width_has_no_sideways_scrolling(browser: Browser, demo_suite: DemoSuite) -> None:
    page = await new_page(browser, PHONE)
    try:
        for route in ("/", f"/product/{demo_suite.products[0]['productId']}", "/search", "/checkout"):
            await open_page(page, demo_suite, route, "FR")
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (route, width)
        await save_screenshot(page, "phone-product")
        assert_no_console_errors(page)
    finally:
        await close_page(page)


async def tab_to(page: Page, testid: str, most: int = 60) -> None:
    """Press Tab until the element with ``testid`` has the focus (as a keyboard user gets there)."""
    for _ in range(most):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement && document.activeElement.dataset.testid") == testid:
            return
    pytest.fail(f"{testid} is not reachable with Tab within {most} presses")


async def test_keyboard_reaches_the_pages(page: Page, demo_suite: DemoSuite) -> None:
    await open_page(page, demo_suite, "/", "DE")
    await tab_to(page, "nav-search")
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("search-dropzone")).to_be_visible()
    await tab_to(page, "chat-open")
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("chat-input")).to_be_focused()
    await page.keyboard.press("Escape")
    await expect(page.get_by_test_id("chat-panel")).to_be_hidden()


# --- a backend killed mid-test ----------------------------------------------------------------------
@pytest.fixture
def own_vision_gateway(demo_suite: DemoSuite, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A vision process of this test's own (loaded with the catalogue's photos) and a gateway that
    uses it and the suite's other backends: killing it leaves the session's suite whole."""
    from demo.seed import run as seed
    from services.runtime.access import read_token

    token_file = demo_suite.work / "state" / "internal-token"
    base = {k: v for k, v in os.environ.items() if not k.startswith("CBEC_")}
    common = {
        **base,
        "CBEC_INTERNAL_TOKEN_FILE": str(token_file),
        "CBEC_METRICS_ENABLED": "false",
        "CBEC_DEVICE": "cpu",
        "CBEC_GATEWAY_ENV": "dev",
        "CBEC_MODELS_DIR": str(demo_suite.work / "models"),
    }
    vision_port, http_port = free_port(), free_port()
    logs = (tmp_path / "vision.log").open("wb"), (tmp_path / "gateway.log").open("wb")
    vision = subprocess.Popen(
        [sys.executable, "-m", "services.vision"],
        cwd=ROOT,
        env={**common, "CBEC_GRPC_PORT": str(vision_port), "CBEC_STATE_DIR": str(tmp_path / "vision")},
        stdout=logs[0],
        stderr=subprocess.STDOUT,
    )
    addresses = {
        f"CBEC_GATEWAY_{name.upper()}_ADDR": f"127.0.0.1:{port}"
        for name, port in demo_suite.grpc_ports.items()
        if name != "gateway"
    }
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        cwd=ROOT,
        env={
            **common,
            **addresses,
            "CBEC_GATEWAY_VISION_ADDR": f"127.0.0.1:{vision_port}",
            "CBEC_GRPC_PORT": str(free_port()),
            "CBEC_GATEWAY_HTTP_PORT": str(http_port),
            "CBEC_STATE_DIR": str(tmp_path / "gateway"),
            "CBEC_GATEWAY_DEMO_CATALOGUE_DIR": str(demo_suite.demo_dir),
            "CBEC_GATEWAY_PRODUCT_IMAGES_DIR": str(demo_suite.demo_dir / "images"),
            "CBEC_GATEWAY_PRODUCT_SENTIMENT_WINDOW_DAYS": "3650",  # as make run's launcher sets for the demo
            "CBEC_GATEWAY_FEED_SENTIMENT_WINDOW_DAYS": "3650",
        },
        stdout=logs[1],
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 90
        while http_get(f"{url}/readyz")[0] != 200:
            if time.monotonic() > deadline or vision.poll() is not None or gateway.poll() is not None:
                pytest.fail(
                    "own vision + gateway did not come up:\n"
                    + (tmp_path / "vision.log").read_text()[-1500:]
                    + (tmp_path / "gateway.log").read_text()[-1500:]
                )
            time.sleep(0.3)
        seed(demo_suite.demo_dir, {"vision": f"127.0.0.1:{vision_port}"}, read_token(token_file))
        yield url, vision
    finally:
        for proc in (gateway, vision):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for log in logs:
            log.close()


async def test_a_killed_backend_shows_a_missing_part_notice(
    page: Page, demo_suite: DemoSuite, own_vision_gateway: tuple[str, subprocess.Popen]
) -> None:
    url, vision = own_vision_gateway
    product = demo_suite.products[2]
    await page.goto(f"{url}/#/product/{product['productId']}")
    await expect(page.locator(READY)).to_be_visible()
    await expect(page.get_by_test_id("visually-similar").locator("[data-product-id]").first).to_be_visible()
    vision.send_signal(signal.SIGKILL)
    vision.wait(10)
    await page.reload()
    await expect(page.locator(READY)).to_be_visible()
    notice = page.locator("[data-testid=missing-part][data-part=visually_similar]")
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text("UNAVAILABLE")
    # the rest of the page still renders
    any_title = re.compile("|".join(re.escape(t) for t in product["titles"].values()))
    await expect(page.get_by_test_id("product-title")).to_have_text(any_title)
    await expect(page.get_by_test_id("sentiment-chart")).to_be_visible()
    await expect(page.get_by_test_id("similar-items").locator("[data-product-id]").first).to_be_visible()
    assert not console_log(page).exceptions
    await save_screenshot(page, "missing-part")
