// DOM helpers shared by the pages: an element builder (text only, never innerHTML, so no answer of any
// service can inject markup), error and missing-part notices, product cards, the sentiment chart.

import { ApiError } from "./api.js";
import { formatMoney, formatPercent, imageUrl, marketInfo, prefs, priceOf, product, titleOf } from "./catalogue.js";

const SVG_NS = "http://www.w3.org/2000/svg";

/** h("a", {href, class, dataset: {testid}}, child...) -- children are nodes or text. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  applyAttrs(el, attrs);
  append(el, children);
  return el;
}

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  applyAttrs(el, attrs);
  append(el, children);
  return el;
}

function applyAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "testid") el.dataset.testid = value;
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key === "className" ? "class" : key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function loading(text = "Loading…") {
  return h("p", { class: "loading", testid: "loading", role: "status" }, text);
}

/** An error as a visible alert: status, code, message, the fields a BadRequest names, the request id. */
export function errorBox(err, context = "") {
  const e = err instanceof ApiError ? err : new ApiError({ code: "SCRIPT_ERROR", message: String(err?.message || err) });
  const hint =
    e.status === 401 ? "Check the API key (header x-api-key)." :
    e.status === 403 ? "This key may not do that, or names another user." :
    e.status === 429 ? `Too many requests${e.retryAfter ? `; retry after ${e.retryAfter}` : ""}.` :
    e.status === 503 || e.network ? "A service is unavailable; try again shortly." : "";
  return h(
    "div",
    { class: "error", role: "alert", testid: "error", dataset: { code: e.code, status: String(e.status) } },
    h("p", { class: "error-title" }, context ? `${context}: ` : "", e.summary),
    e.violations.length
      ? h("ul", { class: "error-fields", testid: "error-fields" },
        e.violations.map((v) => h("li", { dataset: { field: v.field } }, h("code", {}, v.field || "(request)"), " ", v.description)))
      : null,
    hint ? h("p", { class: "error-hint" }, hint) : null,
    e.reason ? h("p", { class: "error-meta" }, `reason: ${e.reason}`) : null,
    e.requestId ? h("p", { class: "error-meta" }, `request id: ${e.requestId}`) : null,
  );
}

const PART_LABELS = {
  recommendations: "Recommendations",
  sentiment: "Review sentiment",
  similar_items: "Similar items",
  visually_similar: "Visually similar",
  also_for_you: "Also for you",
};

export function partLabel(part) {
  return PART_LABELS[part] || part.replace(/_/g, " ");
}

/** One notice for a part an aggregated response left out. */
export function missingNotice(missing) {
  return h(
    "p",
    { class: "notice missing", role: "status", testid: "missing-part", dataset: { part: missing.part || "" } },
    `${partLabel(missing.part || "a part")} is unavailable right now: ${missing.code || "UNKNOWN"}`,
    missing.message ? ` – ${missing.message}` : "",
  );
}

/** {part: MissingPart} from a response's missingParts (field names of both spellings). */
export function missingByPart(response) {
  const out = {};
  for (const m of response?.missingParts || response?.missing_parts || []) out[m.part] = m;
  return out;
}

export function productImage(id, { size = 112, alt = "" } = {}) {
  const url = imageUrl(id);
  const placeholder = () =>
    h("div", { class: "product-img placeholder", role: alt ? "img" : null, "aria-label": alt || null },
      (product(id)?.category || "no image").slice(0, 14));
  if (!url) return placeholder();
  const img = h("img", { class: "product-img", src: url, alt, width: size, height: size });
  img.addEventListener("error", () => img.replaceWith(placeholder()), { once: true });
  return img;
}

export function priceText(id) {
  const price = priceOf(id, prefs.market);
  if (!price) return product(id) ? `not sold in ${prefs.market}` : "";
  const currency = price.currencyCode || marketInfo(prefs.market).currency;
  return formatMoney(price.amount, currency, prefs.language, prefs.market);
}

export function starsText(stars) {
  const value = Number(stars);
  return value > 0 ? `★ ${value.toFixed(1)} / 5` : "";
}

/** A product card: image, title in the chosen language, price in the market's currency, extra lines. */
export function productCard(id, { testid = "product-card", fallbackTitle = "", category = "", extra = [] } = {}) {
  const title = titleOf(id, prefs.language, fallbackTitle);
  const price = priceText(id);
  return h(
    "li",
    { class: "card", testid, dataset: { productId: id } },
    h("a", { class: "card-link", href: `#/product/${encodeURIComponent(id)}` },
      productImage(id),
      h("span", { class: "card-title", testid: "card-title" }, title)),
    price ? h("p", { class: "price", testid: "price" }, price) : null,
    category || product(id)?.category ? h("p", { class: "category" }, category || product(id).category) : null,
    extra,
  );
}

export function cardList(children, testid) {
  return h("ul", { class: "cards", testid }, children);
}

/**
 * The review summary of a feed item (SentimentSummary), with the market it covers in data-market: the
 * requested one, or "" when that market had no reviews and the summary covers every market ("all
 * markets"). Without a summary a "no reviews" line under another testid, so it never passes for one.
 */
export function sentimentSummary(summary, market = prefs.market) {
  const count = Number(summary?.reviewCount || 0);
  if (!summary || count <= 0) {  // the gateway already fell back to every market: none anywhere (or no part)
    return h("p", { class: "sentiment-summary none", testid: "feed-sentiment-none" }, "No reviews yet");
  }
  const lang = prefs.language;
  const covered = typeof summary.market === "string" ? summary.market : "";
  const everyMarket = !covered && market
    ? `no reviews from ${market} yet; from every market`
    : "";
  return h(
    "p",
    { class: "sentiment-summary", testid: "feed-sentiment", dataset: { market: covered } },
    `${count} review${count === 1 ? "" : "s"} · `,
    h("span", { class: "pos" }, `${formatPercent(Number(summary.positiveShare || 0), lang)} positive`),
    " · ",
    h("span", { class: "neg" }, `${formatPercent(Number(summary.negativeShare || 0), lang)} negative`),
    summary.averageEstimatedStars ? ` · ${starsText(summary.averageEstimatedStars)}` : "",
    everyMarket
      ? [" · ", h("span", { class: "scope", testid: "feed-sentiment-scope", title: everyMarket }, "all markets"),
        h("span", { class: "sr-only" }, ` (${everyMarket})`)]
      : null,
  );
}

/** A horizontal bar chart (inline SVG) of a SentimentDistribution: negative, neutral, positive. */
export function sentimentChart(distribution) {
  const rows = [
    ["negative", Number(distribution?.negative || 0)],
    ["neutral", Number(distribution?.neutral || 0)],
    ["positive", Number(distribution?.positive || 0)],
  ];
  const total = Number(distribution?.total || 0) || rows.reduce((n, [, v]) => n + v, 0);
  const width = 360;
  const barX = 80;
  const barMax = 200;
  const rowH = 30;
  const label = rows.map(([name, v]) => `${name} ${v}`).join(", ");
  const chart = svg(
    "svg",
    {
      class: "sentiment-chart", viewBox: `0 0 ${width} ${rows.length * rowH + 4}`, role: "img",
      "aria-label": `Review sentiment of ${total} reviews: ${label}`,
      testid: "sentiment-chart", dataset: { total: String(total) },
    },
    svg("title", {}, `Review sentiment: ${label}`),
  );
  rows.forEach(([name, value], i) => {
    const share = total ? value / total : 0;
    const y = i * rowH + 4;
    chart.append(
      svg("text", { x: 0, y: y + 17, class: "chart-label" }, name),
      svg("rect", { x: barX, y, width: barMax, height: 22, class: "chart-track", rx: 3 }),
      svg("rect", {
        x: barX, y, width: Math.max(0, Math.round(share * barMax)), height: 22, rx: 3,
        class: `chart-bar ${name}`, dataset: { sentiment: name, count: String(value) },
      }),
      svg("text", { x: barX + barMax + 8, y: y + 17, class: "chart-value" }, `${value} (${Math.round(share * 100)}%)`),
    );
  });
  return chart;
}

/** Replaces the page's content; the page's state (loading / ready / error) is on <main> for tests. */
export function mount(main, state, ...children) {
  main.replaceChildren(...children.flat().filter(Boolean));
  main.dataset.state = state;
}
