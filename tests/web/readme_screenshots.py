"""``python -m tests.web.readme_screenshots [--url URL] [--out docs/screenshots]``: the README's three
screenshots (home feed in Germany, a product page in the United States, chat in Spain), taken with the
browser tests' Chromium from a running ``make run`` (its full default models, not the tests' tiny ones)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from playwright.async_api import async_playwright, expect

from tests.web.browser import LAUNCH_ARGS, chromium_path, close_page, new_page

READY = "#main[data-state=ready]"


async def shoot(url: str, out: Path, product: str, question: str) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        page = await new_page(browser)
        try:
            await page.goto(f"{url}/#/")
            await page.get_by_test_id("market-select").select_option("DE")
            await expect(page.get_by_test_id("feed-card").first).to_be_visible(timeout=30_000)
            await page.screenshot(path=out / "home.png")
            await page.get_by_test_id("market-select").select_option("US")
            await page.goto(f"{url}/#/product/{product}")
            await expect(page.locator(READY)).to_be_visible(timeout=30_000)
            await page.screenshot(path=out / "product.png", full_page=True)
            await page.get_by_test_id("market-select").select_option("ES")
            await page.goto(f"{url}/#/")
            await expect(page.locator(READY)).to_be_visible(timeout=30_000)
            await page.get_by_test_id("chat-open").click()
            await page.get_by_test_id("chat-input").fill(question)
            await page.get_by_test_id("chat-send").click()
            answer = page.get_by_test_id("chat-answer").last
            await expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
            await page.screenshot(path=out / "chat.png")
        finally:
            await close_page(page)
            await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--product", default="P1078")
    parser.add_argument("--question", default="¿Cuánto tarda en llegar un pedido a España?")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot(args.url.rstrip("/"), args.out, args.product, args.question))
    print(f"screenshots in {args.out}: {', '.join(sorted(p.name for p in args.out.glob('*.png')))}")


if __name__ == "__main__":
    main()
