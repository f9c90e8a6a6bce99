// The storefront's entry: settings (market, language, demo user in dev, API key), hash routes, chat panel.
// Routes: #/ home feed, #/product/<id>, #/search, #/chat, #/checkout, #/ops.

import { ApiError, api, apiKey, getConfig, loadConfig, needsKey, setApiKey } from "./api.js";
import {
  LANGUAGES, catalogue, cartCount, loadCatalogue, loadPrefs, marketInfo, prefs, savePrefs,
} from "./catalogue.js";
import { createChat } from "./chat.js";
import { checkoutPage, homePage, notFoundPage, opsPage, productPage, searchPage } from "./pages.js";
import { errorBox, h, mount } from "./ui.js";

const ROUTES = [
  [/^\/?$/, homePage, "Home"],
  [/^\/product\/([^/]+)$/, productPage, "Product"],
  [/^\/search$/, searchPage, "Search by photo"],
  [/^\/checkout$/, checkoutPage, "Checkout"],
  [/^\/ops$/, opsPage, "Operations"],
  [/^\/chat$/, chatPage, "Chat"],
];

const main = document.getElementById("main");
const notices = document.getElementById("notices");
const chat = createChat();
const panel = document.getElementById("chat-panel");
const panelSlot = document.getElementById("chat-slot");
const toggle = document.getElementById("chat-toggle");
let current = null; // AbortController of the page being shown

/** The page of the address; one that cannot be decoded (#/product/%E0) is the not-found page with its error. */
function route() {
  const raw = (location.hash || "#/").slice(1);
  let path;
  try {
    path = decodeURIComponent(raw);
  } catch (err) {
    const error = new ApiError({ code: "BAD_ADDRESS", message: `the address "#${raw}" is not valid (${err?.message || err})` });
    return { page: notFoundPage, name: "Not found", params: [], path: raw, error };
  }
  for (const [pattern, page, name] of ROUTES) {
    const found = pattern.exec(path);
    if (found) return { page, name, params: found.slice(1), path };
  }
  return { page: notFoundPage, name: "Not found", params: [], path };
}

async function render({ focus = false } = {}) {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  let name = "Page";
  try {
    const resolved = route();
    const { page, params, path, error } = resolved;
    name = resolved.name;
    document.title = `${name} · cbec shop`;
    main.dataset.route = path.split("/")[1] || "home";
    for (const link of document.querySelectorAll("nav a")) {
      if (link.getAttribute("href") === `#/${path.split("/")[1] || ""}`) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    placeChat(page === chatPage);
    const shown = page(main, { signal: controller.signal, params, error });
    if (focus) main.querySelector("h1")?.focus();
    await shown;
    if (focus && controller === current && document.activeElement === document.body) main.querySelector("h1")?.focus();
  } catch (err) {
    if (controller === current) mount(main, "error", h("h1", {}, name), errorBox(err, "This page failed"));
  }
}

// --- chat: a panel on every page, or the page itself on #/chat -----------------------------------
function chatPage(target) {
  mount(target, "ready", h("h1", { tabindex: "-1" }, "Customer service chat"), chat.root);
}

function placeChat(onChatPage) {
  toggle.hidden = onChatPage;
  if (onChatPage) closePanel(false);
  else if (chat.root.parentElement !== panelSlot) panelSlot.append(chat.root);
}

function openPanel() {
  panelSlot.append(chat.root);
  panel.hidden = false;
  toggle.setAttribute("aria-expanded", "true");
  chat.focus();
}

function closePanel(returnFocus = true) {
  if (panel.hidden) return;
  panel.hidden = true;
  toggle.setAttribute("aria-expanded", "false");
  if (returnFocus) toggle.focus();
}

toggle.addEventListener("click", () => (panel.hidden ? openPanel() : closePanel()));
document.getElementById("chat-close").addEventListener("click", () => closePanel());
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && !panel.hidden) {
    e.preventDefault();
    closePanel();
  }
});

// --- settings -------------------------------------------------------------------------------------
function option(value, label, selected) {
  return h("option", { value, selected: selected ? true : null }, label);
}

/** <html lang> follows the language switch, so screen readers read titles in their language. */
function applyLanguage() {
  document.documentElement.lang = prefs.language;
}

function fillSettings() {
  const market = document.getElementById("market");
  const language = document.getElementById("language");
  const user = document.getElementById("user");
  market.replaceChildren(...Object.keys(catalogue.markets).map((m) =>
    option(m, `${m} · ${marketInfo(m).currency}`, m === prefs.market)));
  language.replaceChildren(...Object.entries(LANGUAGES).map(([code, name]) => option(code, name, code === prefs.language)));
  // Demo users only with the development key: a typed key is bound to its own user (userId "").
  document.getElementById("user-field").hidden = needsKey();
  user.disabled = needsKey();
  user.replaceChildren(
    ...catalogue.users.map((u) => option(u.userId, `${u.userId}${u.market ? ` (${u.market})` : ""}`, u.userId === prefs.userId)),
    option("", "the key's own user", prefs.userId === ""),
  );
  applyLanguage();
  market.addEventListener("change", () => {
    prefs.market = market.value;
    prefs.language = marketInfo(prefs.market).language; // a market switch brings its language
    language.value = prefs.language;
    applyLanguage();
    savePrefs();
    render();
  });
  language.addEventListener("change", () => {
    prefs.language = language.value;
    applyLanguage();
    savePrefs();
    render();
  });
  user.addEventListener("change", () => {
    prefs.userId = user.value;
    savePrefs();
    render();
  });
}

function updateCartCount() {
  document.getElementById("cart-count").textContent = String(cartCount());
}

function setUpKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const status = document.getElementById("key-status");
  if (!needsKey()) return; // dev: the development key from /web/config.json
  form.hidden = false;
  input.value = apiKey();
  status.textContent = apiKey() ? "key set for this tab" : "no key yet";
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    status.textContent = apiKey() ? "key set for this tab" : "key removed";
    showNotices();
    render();
  });
}

function showNotices() {
  const config = getConfig();
  const items = [];
  if (config.error) items.push(errorBox(config.error, "Settings could not be read"));
  if (needsKey() && !apiKey()) {
    items.push(h("p", { class: "notice", testid: "key-notice" }, "This gateway runs in production mode: enter an API key above to shop."));
  }
  if (catalogue.error) {
    items.push(h("p", { class: "notice", testid: "catalogue-notice" },
      `No demo catalogue (${catalogue.error.message}): titles come from the services, without images or prices.`));
  }
  notices.replaceChildren(...items);
  const footer = document.getElementById("synthetic");
  footer.textContent = [catalogue.synthetic, catalogue.source && `Sources: ${catalogue.source}`].filter(Boolean).join(" ");
}

async function start() {
  await loadConfig();
  await loadCatalogue(api);
  loadPrefs({ demoUsers: !needsKey() });
  fillSettings();
  setUpKeyForm();
  showNotices();
  updateCartCount();
  document.addEventListener("cart-changed", updateCartCount);
  window.addEventListener("storage", updateCartCount);
  window.addEventListener("hashchange", () => render({ focus: true }));
  window.addEventListener("cbec-rerender", () => render());
  document.getElementById("skip").addEventListener("click", () => main.focus());
  document.body.dataset.ready = "true";
  await render();
}

start().catch((err) => mount(main, "error", h("h1", {}, "The shop could not start"), errorBox(err)));
