// The pages behind the hash routes: home feed, product page, search by photo, checkout, operations.
// Each renders into <main>, shows what the API reports (errors, missing parts) and never a blank page.

import { api, isAbort } from "./api.js";
import {
  addToCart, cartItems, catalogue, descriptionOf, formatMoney, formatPercent, isSafeId, marketInfo, moneyOf, moneyValue,
  prefs, priceOf, product, setCart, titleOf,
} from "./catalogue.js";
import {
  cardList, errorBox, h, loading, missingByPart, missingNotice, mount, priceText,
  productCard, productImage, sentimentChart, sentimentSummary, starsText,
} from "./ui.js";

const STRATEGIES = {
  STRATEGY_PERSONALISED: "personalised",
  STRATEGY_COLD_START: "popular in this market (cold start)",
  STRATEGY_CONTENT: "similar to what you viewed",
  STRATEGY_HYBRID: "hybrid",
  STRATEGY_UNSPECIFIED: "unspecified",
};
const SERVICES = ["recommender", "chat", "sentiment", "vision", "risk"];

function heading(text, testid) {
  return h("h1", { tabindex: "-1", testid }, text);
}

function failed(main, title, err, ctx) {
  if (isAbort(err)) return;
  mount(main, "error", heading(title), errorBox(err, ctx));
}

// --- home feed ----------------------------------------------------------------------------------
export async function homePage(main, { signal }) {
  const title = heading("Recommended for you", "page-title");
  mount(main, "loading", title, loading("Loading your feed…"));
  let feed;
  try {
    feed = await api("/v1/gateway/home-feed", {
      method: "POST", signal, body: { userId: prefs.userId, market: prefs.market, k: 12 },
    });
  } catch (err) {
    return failed(main, "Recommended for you", err, "The home feed could not be loaded");
  }
  const strategy = STRATEGIES[feed.strategy] || feed.strategy || "";
  const notices = (feed.missingParts || []).map(missingNotice);
  const items = feed.items || [];
  const cards = items.map(({ item = {}, sentiment }) =>
    productCard(item.itemId, {
      testid: "feed-card",
      fallbackTitle: item.title,
      category: item.category,
      extra: [
        sentimentSummary(sentiment),
        h("p", { class: "badge", testid: "feed-strategy", dataset: { strategy: feed.strategy || "" } }, strategy),
      ],
    }),
  );
  mount(
    main, "ready", title,
    h("p", { class: "lede" }, `For ${prefs.userId || "the key's user"} in ${prefs.market}`,
      strategy ? ` · recommendations: ${strategy}` : ""),
    notices,
    items.length ? cardList(cards, "feed") : h("p", { class: "empty", testid: "feed-empty" }, "No recommendations to show."),
  );
}

// --- product page -------------------------------------------------------------------------------
function section(title, testid, ...children) {
  const id = `h-${testid}`;
  return h("section", { class: "part", testid, "aria-labelledby": id }, h("h2", { id }, title), children);
}

function themes(list, kind) {
  if (!list?.length) return null;
  return h("div", { class: `drivers ${kind}` },
    h("h3", {}, kind === "positive" ? "What reviewers like" : "What reviewers dislike"),
    h("ul", { testid: `${kind}-drivers` },
      list.slice(0, 8).map((t) => h("li", {}, t.term, t.count ? ` (${Number(t.count)})` : ""))));
}

function trendText(trend) {
  const delta = Number(trend.negativeShareDelta || 0) * 100;
  const sign = delta > 0 ? "+" : "";
  const p = Number(trend.pValue ?? 1);
  return `Negative share ${sign}${delta.toFixed(1)} points vs the previous window (${Number(trend.previous?.total || 0)} reviews; ` +
    `p = ${p.toFixed(3)}${trend.significant ? ", significant" : ", not significant"})`;
}

function sentimentPart(report, missing, scope) {
  if (missing) return section("Review sentiment", "sentiment", missingNotice(missing));
  if (!report) return section("Review sentiment", "sentiment", h("p", { class: "empty" }, "No sentiment report."));
  const d = report.distribution || {};
  const total = Number(d.total || 0) || Number(d.negative || 0) + Number(d.neutral || 0) + Number(d.positive || 0);
  if (!total) {
    return section("Review sentiment", "sentiment",
      h("p", { class: "empty", testid: "sentiment-empty" }, `No reviews in ${prefs.market} in this window.`));
  }
  const languages = Object.entries(report.languages || {}).map(([l, n]) => `${l} ${Number(n)}`).join(", ");
  return section(
    "Review sentiment", "sentiment",
    h("p", { class: "meta", testid: "sentiment-scope", dataset: { market: scope || "" } },
      scope ? `Reviews from ${scope}` : prefs.market ? `No reviews from ${prefs.market} yet: reviews from every market` : "Reviews from every market"),
    h("p", { class: "stars", testid: "average-stars" },
      `${total} review${total === 1 ? "" : "s"}`, report.averageEstimatedStars ? ` · ${starsText(report.averageEstimatedStars)} (estimated)` : ""),
    sentimentChart(d),
    report.trend ? h("p", { class: "trend", testid: "sentiment-trend" }, trendText(report.trend)) : null,
    h("div", { class: "drivers-row", testid: "drivers" },
      themes(report.positiveDrivers, "positive"), themes(report.negativeDrivers, "negative")),
    (report.alerts || []).map((a) => h("p", { class: "notice alert", testid: "sentiment-alert" }, a.message || a.kind)),
    languages ? h("p", { class: "meta" }, `Review languages: ${languages}`) : null,
    report.windowStart && report.windowEnd
      ? h("p", { class: "meta" }, `Window: ${report.windowStart.slice(0, 10)} – ${report.windowEnd.slice(0, 10)}`)
      : null,
  );
}

function itemsPart(title, testid, items, missing, toCard) {
  if (missing) return section(title, testid, missingNotice(missing));
  if (!items?.length) return section(title, testid, h("p", { class: "empty" }, "Nothing to show here."));
  return section(title, testid, cardList(items.map(toCard), `${testid}-list`));
}

export async function productPage(main, { signal, params }) {
  const id = params[0] || "";
  if (!isSafeId(id)) {
    mount(main, "error", heading("Product not found"), h("p", { class: "error", role: "alert", testid: "error" }, `"${id}" is not a product id.`));
    return;
  }
  const p = product(id);
  const lang = prefs.language;
  const title = titleOf(id, lang);
  const status = h("p", { class: "added", role: "status", testid: "cart-status" });
  const info = h(
    "section",
    { class: "product", testid: "product", "aria-label": "Product" },
    productImage(id, { size: 224, alt: title }),
    h("div", { class: "product-info" },
      h("h1", { tabindex: "-1", testid: "product-title" }, title),
      h("p", { class: "price big", testid: "product-price" }, priceText(id) || "price unknown"),
      p?.category ? h("p", { class: "category" }, p.category) : null,
      descriptionOf(id, lang) ? h("p", { class: "description" }, descriptionOf(id, lang)) : null,
      p?.reviewCount ? h("p", { class: "meta" }, `${p.reviewCount} reviews · rated ${Number(p.averageRating || 0).toFixed(1)} / 5 by customers`) : null,
      !p ? h("p", { class: "notice" }, "This product is not in the demo catalogue; the parts below come from the services.") : null,
      h("button", {
        type: "button", class: "primary", testid: "add-to-cart", disabled: p && !priceOf(id, prefs.market) ? true : null,
        onclick: () => {
          const count = addToCart(id);
          status.textContent = `Added to your cart (${count} item${count === 1 ? "" : "s"}).`;
        },
      }, "Add to cart"),
      status),
  );
  mount(main, "loading", info, loading("Loading reviews and recommendations…"));
  let page;
  try {
    page = await api("/v1/gateway/product-page", {
      method: "POST", signal, body: { userId: prefs.userId, productId: id, market: prefs.market, k: 8 },
    });
  } catch (err) {
    if (isAbort(err)) return;
    mount(main, "error", info, errorBox(err, "The product page could not be loaded"));
    return;
  }
  const missing = missingByPart(page);
  const known = new Set(["sentiment", "visually_similar", "similar_items", "also_for_you"]);
  const recCard = (item) => productCard(item.itemId, { fallbackTitle: item.title, category: item.category });
  mount(
    main, "ready", info,
    Object.values(missing).filter((m) => !known.has(m.part)).map(missingNotice),
    sentimentPart(page.sentiment, missing.sentiment, page.sentimentMarket || ""),
    itemsPart("Visually similar", "visually-similar", page.visuallySimilar, missing.visually_similar, (m) =>
      productCard(m.productId, {
        category: m.category,
        extra: h("p", { class: "score", testid: "match-score" }, `similarity ${Number(m.score || 0).toFixed(2)}`,
          m.nearDuplicate ? " · near duplicate" : ""),
      })),
    itemsPart("Similar items", "similar-items", page.similarItems, missing.similar_items, recCard),
    itemsPart("Also for you", "also-for-you", page.alsoForYou, missing.also_for_you, recCard),
  );
}

// --- search by photo ----------------------------------------------------------------------------
function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

export async function searchPage(main, { signal }) {
  const results = h("div", { class: "search-results", testid: "search-output", "aria-live": "polite" });
  const preview = h("div", { class: "search-preview", testid: "search-preview" });
  let previewUrl = "";

  async function search(blob, label) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(blob);
    preview.replaceChildren(h("img", { src: previewUrl, alt: `Your photo: ${label}`, class: "product-img query", width: 112, height: 112 }));
    results.replaceChildren(loading("Searching…"));
    main.dataset.state = "loading";
    let answer;
    try {
      const image = toBase64(await blob.arrayBuffer());
      answer = await api("/v1/vision/search", { method: "POST", signal, body: { image, k: 8, market: prefs.market } });
    } catch (err) {
      if (isAbort(err)) return;
      results.replaceChildren(errorBox(err, "The search failed"));
      main.dataset.state = "error";
      return;
    }
    const matches = answer.matches || [];
    results.replaceChildren(
      h("h2", {}, `Results for ${label}`),
      matches.length
        ? cardList(matches.map((m) => productCard(m.productId, {
          testid: "search-result",
          category: m.category,
          extra: h("p", { class: "score", testid: "search-score" }, `score ${Number(m.score || 0).toFixed(3)}`,
            m.nearDuplicate ? " · near duplicate" : ""),
        })), "search-results")
        : h("p", { class: "empty", testid: "search-empty" }, "No similar products found."),
    );
    main.dataset.state = "ready";
  }

  const file = h("input", { type: "file", id: "search-file", accept: "image/png,image/jpeg,image/webp", testid: "search-file" });
  file.addEventListener("change", () => {
    if (file.files?.[0]) search(file.files[0], file.files[0].name);
  });
  const drop = h("label", { for: "search-file", class: "dropzone", testid: "search-dropzone" },
    h("span", {}, "Drop a photo here, or choose a file"), file);
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
    const f = e.dataTransfer?.files?.[0];
    if (f) search(f, f.name);
  });

  // A few catalogue images to try, one per category.
  const seen = new Set();
  const picks = [];
  for (const p of catalogue.products.values()) {
    if (!p.image || seen.has(p.category)) continue;
    seen.add(p.category);
    picks.push(p);
    if (picks.length >= 6) break;
  }
  const pickButtons = picks.map((p) =>
    h("li", {},
      h("button", {
        type: "button", class: "pick", testid: "search-pick", dataset: { productId: p.productId },
        onclick: async () => {
          try {
            const resp = await fetch(`/catalogue/images/${encodeURIComponent(p.productId)}.png`, { signal });
            if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
            await search(await resp.blob(), titleOf(p.productId, prefs.language));
          } catch (err) {
            if (!isAbort(err)) results.replaceChildren(errorBox(err, "The catalogue image could not be read"));
          }
        },
      }, productImage(p.productId, { size: 64, alt: "" }), h("span", {}, p.category))));
  mount(
    main, "ready", heading("Search by photo", "page-title"),
    h("p", { class: "lede" }, "Upload a photo of a garment to find products that look like it."),
    h("div", { class: "search-input" }, drop, preview),
    picks.length ? h("section", { "aria-labelledby": "h-picks" }, h("h2", { id: "h-picks" }, "Or try a catalogue photo"),
      h("ul", { class: "picks" }, pickButtons)) : null,
    results,
  );
}

// --- checkout -----------------------------------------------------------------------------------
function field(label, name, value, attrs = {}) {
  const id = `f-${name}`;
  return h("div", { class: "field" },
    h("label", { for: id }, label),
    h("input", { id, name, value, testid: `field-${name}`, ...attrs }));
}

function deviceId() {
  try {
    let id = localStorage.getItem("cbec.device");
    if (!id) {
      id = `web-${crypto.randomUUID()}`;
      localStorage.setItem("cbec.device", id);
    }
    return id;
  } catch {
    return "web-unknown";
  }
}

const DECISIONS = { DECISION_APPROVE: "APPROVE", DECISION_REVIEW: "REVIEW", DECISION_DECLINE: "DECLINE" };

function decisionView(a) {
  const name = DECISIONS[a.decision] || a.decision || "NONE";
  const lang = prefs.language;
  return h(
    "section",
    { class: `decision-panel ${name.toLowerCase()}`, testid: "decision-panel", "aria-labelledby": "h-decision" },
    h("h2", { id: "h-decision" }, "Risk decision"),
    h("p", { class: "decision", testid: "decision", dataset: { decision: name } }, name),
    h("p", { testid: "fraud-probability" }, `Fraud probability ${formatPercent(Number(a.fraudProbability || 0), lang)}`,
      ` (${Number(a.fraudProbability || 0).toFixed(3)})`),
    h("p", { class: "meta" }, `Anomaly score ${Number(a.anomalyScore || 0).toFixed(2)}`,
      a.referenceTotal ? ` · amount ${moneyValue(a.referenceTotal).toFixed(2)} ${a.referenceTotal.currencyCode || ""}` : "",
      a.model?.version ? ` · model ${a.model.version}` : ""),
    a.reasons?.length
      ? h("ol", { class: "reasons", testid: "decision-reasons" }, a.reasons.map((r) =>
        h("li", { dataset: { code: r.code || "" } }, h("code", {}, r.code || r.feature || "reason"), " ",
          r.description || "", ` (${Number(r.contribution || 0) >= 0 ? "+" : ""}${Number(r.contribution || 0).toFixed(2)})`)))
      : h("p", { class: "empty", testid: "decision-reasons" }, "No reasons given."),
  );
}

export async function checkoutPage(main, { signal }) {
  const market = prefs.market;
  const currency = marketInfo(market).currency;
  const outcome = h("div", { class: "outcome", "aria-live": "polite", testid: "checkout-outcome" });
  const cartBox = h("section", { class: "cart", testid: "cart", "aria-labelledby": "h-cart" });
  // Disabled while the cart is empty and while an order is being assessed (no second submit).
  const placeOrder = h("button", { type: "submit", class: "primary", testid: "place-order" }, "Place order");
  let total = 0;
  let inFlight = false;
  const updatePlaceOrder = () => {
    placeOrder.disabled = inFlight || cartItems().length === 0;
  };

  function renderCart() {
    const items = cartItems();
    updatePlaceOrder();
    total = 0;
    const rows = items.map((item) => {
      const price = priceOf(item.productId, market);
      if (price) total += price.amount * item.quantity;
      const change = (delta) => {
        setCart(cartItems().map((i) => (i.productId === item.productId ? { ...i, quantity: Math.min(99, i.quantity + delta) } : i)));
        renderCart();
      };
      const title = titleOf(item.productId, prefs.language);
      return h("li", { class: "cart-row", testid: "cart-item", dataset: { productId: item.productId } },
        productImage(item.productId, { size: 56 }),
        h("a", { href: `#/product/${encodeURIComponent(item.productId)}` }, title),
        h("span", { class: "price" }, price ? formatMoney(price.amount, price.currencyCode || currency, prefs.language, market) : `not sold in ${market}`),
        h("span", { class: "qty" },
          h("button", { type: "button", "aria-label": `One less ${title}`, onclick: () => change(-1) }, "−"),
          h("span", { testid: "cart-quantity" }, String(item.quantity)),
          h("button", { type: "button", "aria-label": `One more ${title}`, onclick: () => change(1) }, "+")));
    });
    total = Math.round(total * 100) / 100;
    cartBox.replaceChildren(
      h("h2", { id: "h-cart" }, "Your cart"),
      rows.length ? h("ul", { class: "cart-list" }, rows) : h("p", { class: "empty", testid: "cart-empty" }, "Your cart is empty: add products from their pages."),
      h("p", { class: "total" }, "Total ", h("strong", { testid: "cart-total" }, formatMoney(total, currency, prefs.language, market))),
    );
  }
  renderCart();

  const form = h(
    "form",
    { class: "checkout-form", testid: "checkout-form", novalidate: true },
    h("fieldset", {},
      h("legend", {}, "Payment and delivery"),
      field("Card fingerprint", "cardFingerprint", "card-demo-0001", { autocomplete: "off" }),
      h("div", { class: "field" },
        h("label", { for: "f-paymentMethod" }, "Payment method"),
        h("select", { id: "f-paymentMethod", name: "paymentMethod", testid: "field-paymentMethod" },
          h("option", { value: "card_not_present" }, "Card (online)"),
          h("option", { value: "wallet" }, "Wallet"))),
      field("Billing country", "billingCountry", market, { maxlength: 2, autocomplete: "off" }),
      field("Shipping country", "shippingCountry", market, { maxlength: 2, autocomplete: "off" }),
      field("IP country", "ipCountry", market, { maxlength: 2, autocomplete: "off" }),
      field("IP address (optional)", "ipAddress", "", { autocomplete: "off" }),
      field("Account created (optional)", "accountCreated", "", { type: "date" }),
    ),
    placeOrder,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (inFlight || cartItems().length === 0) return;
    const data = new FormData(form);
    const text = (name) => String(data.get(name) || "").trim();
    const order = {
      transactionId: `web-${crypto.randomUUID()}`,
      userId: prefs.userId,
      cardFingerprint: text("cardFingerprint"),
      deviceId: deviceId(),
      ipCountry: text("ipCountry").toUpperCase(),
      billingCountry: text("billingCountry").toUpperCase(),
      shippingCountry: text("shippingCountry").toUpperCase(),
      total: moneyOf(total, currency),
      occurredTime: new Date().toISOString(),
      paymentMethod: text("paymentMethod"),
    };
    if (text("ipAddress")) order.ipAddress = text("ipAddress");
    if (text("accountCreated")) order.accountCreatedTime = `${text("accountCreated")}T00:00:00Z`;
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    outcome.replaceChildren(loading("Checking the order…"));
    main.dataset.state = "loading";
    inFlight = true;
    updatePlaceOrder();
    try {
      const answer = await api("/v1/gateway/assess-order", { method: "POST", signal, body: { order } });
      outcome.replaceChildren(decisionView(answer.assessment || {}));
      main.dataset.state = "ready";
    } catch (err) {
      if (isAbort(err)) return;
      for (const v of err.violations || []) {  // mark the inputs the error names (order.card_fingerprint...)
        const key = String(v.field).split(".").pop().replace(/_/g, "").toLowerCase();
        for (const input of form.elements) {
          if (input.name && input.name.toLowerCase() === key) input.setAttribute("aria-invalid", "true");
        }
      }
      outcome.replaceChildren(errorBox(err, "The order was not assessed"));
      main.dataset.state = "error";
    } finally {
      inFlight = false;
      updatePlaceOrder();
    }
  });
  mount(main, "ready", heading("Checkout", "page-title"), cartBox,
    h("section", { "aria-label": "Order details" }, form), outcome);
}

// --- operations ---------------------------------------------------------------------------------
function metricsTable(metrics) {
  const entries = Object.entries(metrics || {}).sort(([a], [b]) => a.localeCompare(b));
  if (!entries.length) return h("p", { class: "empty" }, "No evaluation figures in the manifest.");
  return h("table", { class: "metrics", testid: "ops-metrics" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "figure"), h("th", { scope: "col" }, "value"))),
    h("tbody", {}, entries.slice(0, 12).map(([k, v]) =>
      h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, Number.isInteger(v) ? String(v) : Number(v).toPrecision(4))))));
}

export async function opsPage(main, { signal }) {
  const title = heading("Operations", "page-title");
  mount(main, "loading", title, loading("Asking every backend…"));
  const [ready, ...models] = await Promise.allSettled([
    api("/readyz", { signal, okStatuses: [503] }),
    ...SERVICES.map((s) => api(`/v1/admin/${s}/model`, { signal })),
  ]);
  if (signal.aborted) return;
  const backends = ready.status === "fulfilled" ? ready.value.backends || {} : {};
  const cards = SERVICES.map((name, i) => {
    const health = backends[name];
    const model = models[i];
    const serving = model.status === "fulfilled" ? model.value.serving : null;
    const state = health?.health || "UNKNOWN";
    return h("li", { class: `ops-card ${state === "SERVING" ? "ok" : "bad"}`, testid: "ops-service", dataset: { service: name } },
      h("h2", {}, name),
      h("p", { testid: "ops-health", dataset: { health: state } }, `health: ${state}`,
        health ? ` · circuit ${health.circuit}${health.required ? " · required" : ""}` : ""),
      model.status === "fulfilled"
        ? [
          h("p", { testid: "ops-version" }, serving?.version ? `serving ${serving.version}` : "no model serving",
            serving?.createdTime ? ` (built ${serving.createdTime.slice(0, 10)})` : ""),
          h("p", { class: "meta" }, `${(model.value.versions || []).length} version(s) in the store`),
          metricsTable(model.value.metrics),
        ]
        : errorBox(model.reason, "model status"));
  });
  mount(
    main, "ready", title,
    ready.status === "fulfilled"
      ? h("p", { class: `ready ${ready.value.status === "SERVING" ? "ok" : "bad"}`, testid: "ops-ready" },
        `Gateway readiness: ${ready.value.status}`)
      : errorBox(ready.reason, "readiness"),
    h("ul", { class: "ops-grid" }, cards),
    h("button", { type: "button", testid: "ops-refresh", onclick: () => window.dispatchEvent(new CustomEvent("cbec-rerender")) }, "Refresh"),
  );
}

/** No page at this address; `error` when the address itself could not be read (a bad %-escape). */
export function notFoundPage(main, { error } = {}) {
  mount(main, "error", heading("Page not found", "page-title"),
    error ? errorBox(error, "This address could not be opened") : null,
    h("p", { testid: "not-found" }, "There is no such page. ", h("a", { href: "#/" }, "Back to the shop")));
}
