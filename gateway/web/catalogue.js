// The demo catalogue (GET /catalogue/products.json: titles per language, prices per market, images), the
// shopper's settings (market, language, demo user in dev) and the cart, both kept in localStorage.

export const MARKETS = {
  DE: { language: "de", currency: "EUR" },
  FR: { language: "fr", currency: "EUR" },
  ES: { language: "es", currency: "EUR" },
  IT: { language: "it", currency: "EUR" },
  PL: { language: "pl", currency: "PLN" },
  GB: { language: "en", currency: "GBP" },
  US: { language: "en", currency: "USD" },
  BR: { language: "pt", currency: "BRL" },
  JP: { language: "ja", currency: "JPY" },
};
export const LANGUAGES = {
  en: "English", de: "Deutsch", fr: "Français", es: "Español", it: "Italiano", pl: "Polski",
  pt: "Português", ja: "日本語",
};
const SAFE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;
const PREFS = "cbec.prefs";
const CART = "cbec.cart";

export const catalogue = {
  loaded: false,
  error: null, // an ApiError when there is no catalogue (the page still works from the services alone)
  synthetic: "",
  source: "",
  markets: { ...MARKETS },
  users: [],
  products: new Map(),
};

/** Loads products.json once; a missing or broken catalogue is recorded, never fatal. */
export async function loadCatalogue(api) {
  try {
    const doc = await api("/catalogue/products.json");
    catalogue.synthetic = String(doc.synthetic || "");
    catalogue.source = String(doc.source || "");
    if (doc.markets && typeof doc.markets === "object") {
      for (const [code, m] of Object.entries(doc.markets)) {
        catalogue.markets[code] = { ...(MARKETS[code] || {}), ...m };
      }
    }
    catalogue.users = Array.isArray(doc.users) ? doc.users.filter((u) => u && u.userId) : [];
    for (const p of Array.isArray(doc.products) ? doc.products : []) {
      if (p && typeof p.productId === "string") catalogue.products.set(p.productId, p);
    }
    catalogue.loaded = true;
  } catch (err) {
    catalogue.error = err;
  }
  return catalogue;
}

export function product(id) {
  return catalogue.products.get(id) || null;
}

export function marketInfo(market) {
  return catalogue.markets[market] || MARKETS[market] || { language: "en", currency: "EUR" };
}

/** The title in `language`, else English, else any, else what the service said, else the id. */
export function titleOf(id, language, fallback = "") {
  const p = product(id);
  const titles = p?.titles || {};
  return titles[language] || titles.en || Object.values(titles)[0] || fallback || id;
}

export function descriptionOf(id, language) {
  const d = product(id)?.descriptions || {};
  return d[language] || d.en || "";
}

/** {currencyCode, amount} of the product in the market, or null when it is not sold there. */
export function priceOf(id, market) {
  const price = product(id)?.prices?.[market];
  return price && typeof price.amount === "number" ? price : null;
}

export function formatMoney(amount, currency, language, market) {
  try {
    return new Intl.NumberFormat(`${language}-${market}`, { style: "currency", currency }).format(amount);
  } catch {
    return `${Number(amount).toFixed(2)} ${currency}`;
  }
}

export function formatPercent(share, language) {
  try {
    return new Intl.NumberFormat(language, { style: "percent", maximumFractionDigits: 0 }).format(share);
  } catch {
    return `${Math.round(share * 100)}%`;
  }
}

/** The image route of a catalogue product, or "" when it has none (or an id the route would refuse). */
export function imageUrl(id) {
  const p = product(id);
  if (!p || !p.image || !SAFE_ID.test(id)) return "";
  return `/catalogue/images/${encodeURIComponent(id)}.png`;
}

export function isSafeId(id) {
  return SAFE_ID.test(id);
}

// --- the shopper's settings ---------------------------------------------------------------------
function readJson(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key) || "null");
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function writeJson(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage full or disabled: the setting lasts as long as the page
  }
}

export const prefs = { market: "DE", language: "de", userId: "" };
let demoUsers = false; // whether the page may act as the catalogue's demo users (dev key only)

/**
 * Reads the saved settings. `demoUsers` only with the development key (it may act as any user): a key the
 * user typed is bound to its own user, so then userId stays "" and the gateway takes the user from the key.
 */
export function loadPrefs({ demoUsers: allowed = false } = {}) {
  demoUsers = allowed;
  const saved = readJson(PREFS, {});
  const markets = Object.keys(catalogue.markets);
  prefs.market = markets.includes(saved.market) ? saved.market : markets.includes("DE") ? "DE" : markets[0];
  prefs.language = saved.language in LANGUAGES ? saved.language : marketInfo(prefs.market).language;
  const users = catalogue.users.map((u) => u.userId);
  if (!demoUsers) {
    prefs.userId = "";
  } else if (typeof saved.userId === "string" && (saved.userId === "" || users.includes(saved.userId))) {
    prefs.userId = saved.userId;
  } else {
    prefs.userId = defaultUser(prefs.market);
  }
}

export function defaultUser(market) {
  const users = catalogue.users;
  return (users.find((u) => u.market === market) || users[0] || { userId: "" }).userId;
}

export function savePrefs() {
  const saved = readJson(PREFS, {});
  // without demo users the saved demo user is kept for the next dev session, not overwritten with ""
  const userId = demoUsers ? prefs.userId : typeof saved?.userId === "string" ? saved.userId : undefined;
  writeJson(PREFS, { market: prefs.market, language: prefs.language, userId });
}

// --- the cart -----------------------------------------------------------------------------------
export function cartItems() {
  const items = readJson(CART, []);
  return Array.isArray(items)
    ? items.filter((i) => i && typeof i.productId === "string" && Number.isInteger(i.quantity) && i.quantity > 0)
    : [];
}

export function setCart(items) {
  writeJson(CART, items.filter((i) => i.quantity > 0));
  document.dispatchEvent(new CustomEvent("cart-changed"));
}

export function addToCart(productId, quantity = 1) {
  const items = cartItems();
  const found = items.find((i) => i.productId === productId);
  if (found) found.quantity = Math.min(99, found.quantity + quantity);
  else items.push({ productId, quantity });
  setCart(items);
  return items.reduce((n, i) => n + i.quantity, 0);
}

export function cartCount() {
  return cartItems().reduce((n, i) => n + i.quantity, 0);
}

/** A google.type.Money (proto3 JSON) of a decimal amount, exact to the cent as the cart computes it. */
export function moneyOf(amount, currencyCode) {
  const cents = Math.round(Number(amount) * 100);
  return { currencyCode, units: String(Math.trunc(cents / 100)), nanos: (cents % 100) * 10_000_000 };
}

/** The decimal value of a google.type.Money (units arrive as a string in proto3 JSON). */
export function moneyValue(money) {
  return Number(money.units || 0) + Number(money.nanos || 0) / 1e9;
}
