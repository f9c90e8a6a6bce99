// The chat widget: POST /v1/chat/converse as server-sent events, the answer shown as it streams, then
// its sources and, when the assistant hands off, a notice. One conversation (sessionId) per page load
// until "New conversation". The same element lives in the floating panel or, on #/chat, in <main>.

import { isAbort, streamEvents } from "./api.js";
import { prefs } from "./catalogue.js";
import { errorBox, h } from "./ui.js";

export function createChat() {
  let sessionId = "";
  let busy = null; // the AbortController of the answer being streamed

  // A live region; aria-busy while an answer streams, so screen readers read the answer once, when done,
  // rather than again for every chunk that rewrites its text.
  const log = h("ol", { class: "chat-log", testid: "chat-log", "aria-live": "polite", "aria-relevant": "additions", "aria-busy": "false" },
    h("li", { class: "msg bot intro" }, "Hello! Ask about shipping, returns, customs or your order."));
  const input = h("textarea", {
    id: "chat-input", name: "message", rows: 2, maxlength: 4000, required: true, testid: "chat-input",
    placeholder: "Where is my parcel?",
  });
  const send = h("button", { type: "submit", class: "primary", testid: "chat-send" }, "Send");
  const reset = h("button", { type: "button", testid: "chat-new" }, "New conversation");
  const session = h("p", { class: "meta", testid: "chat-session" });
  const form = h("form", { class: "chat-form", testid: "chat-form" },
    h("label", { for: "chat-input" }, "Your message"), input, h("div", { class: "chat-actions" }, send, reset));
  const root = h("div", { class: "chat", testid: "chat" }, log, form, session);

  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  reset.addEventListener("click", () => {
    busy?.abort();
    sessionId = "";
    session.textContent = "";
    log.replaceChildren(h("li", { class: "msg bot intro" }, "New conversation. How can I help?"));
    input.focus();
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const message = input.value.trim();
    if (!message || busy) return;
    input.value = "";
    log.append(h("li", { class: "msg user", testid: "chat-question" }, message));
    const answer = h("div", { class: "answer", testid: "chat-answer", dataset: { state: "streaming" } });
    const item = h("li", { class: "msg bot" }, answer);
    log.setAttribute("aria-busy", "true");
    log.append(item);
    item.scrollIntoView({ block: "nearest" });
    busy = new AbortController();
    send.disabled = true;
    let result = null;
    try {
      await streamEvents(
        "/v1/chat/converse",
        { sessionId, userId: prefs.userId, message, market: prefs.market },
        {
          signal: busy.signal,
          onMessage: (chunk) => {
            if (typeof chunk.delta === "string") {
              answer.textContent += chunk.delta;
              item.scrollIntoView({ block: "nearest" });
            } else if (chunk.result) {
              result = chunk.result;
            }
          },
        },
      );
      if (!result) throw new Error("the answer ended before its final message");
      if (!answer.textContent && result.answer) answer.textContent = result.answer;
      sessionId = result.sessionId || sessionId;
      session.textContent = sessionId ? `Conversation ${sessionId}` : "";
      answer.dataset.state = "done";
      const sources = result.sources || [];
      if (sources.length) {
        item.append(h("div", { class: "sources", testid: "chat-sources" }, h("span", {}, "Sources: "),
          h("ul", {}, sources.map((s) => h("li", { dataset: { articleId: s.articleId || "" } }, s.title || s.articleId)))));
      }
      if (result.handoff) {
        item.append(h("p", { class: "notice handoff", role: "status", testid: "chat-handoff" },
          "Handed off to a person: someone from customer service will take over",
          result.handoffReason ? ` (${result.handoffReason})` : "", "."));
      }
    } catch (err) {
      if (isAbort(err)) {
        answer.dataset.state = "cancelled";
      } else {
        answer.dataset.state = "error";
        item.append(errorBox(err, "No answer"));
      }
    } finally {
      log.setAttribute("aria-busy", "false");
      busy = null;
      send.disabled = false;
    }
  });
  return { root, focus: () => input.focus() };
}
