// The storefront's only way to the gateway: the public HTTP/JSON bridge, with the same routes, headers
// and errors as any other client. Errors are google.rpc.Status bodies; they become ApiError, whose
// fields (code, violations, reason, retry, request id) the pages show instead of failing silently.

const KEY_STORAGE = "cbec.apiKey";
const STATUS_NAMES = {
  1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
  6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
  10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
  15: "DATA_LOSS", 16: "UNAUTHENTICATED",
};

let config = { env: "unknown" };
let memoryKey = ""; // when sessionStorage is disabled, the key lasts as long as this page

/** Reads /web/config.json: the environment and, in dev only, the development key. */
export async function loadConfig() {
  try {
    const resp = await fetch("/web/config.json", { headers: { Accept: "application/json" } });
    if (!resp.ok) throw await errorFrom(resp);
    config = await resp.json();
  } catch (err) {
    config = { env: "unknown", error: toApiError(err) };
  }
  return config;
}

export function getConfig() {
  return config;
}

/** The key sent as x-api-key: the development key in dev, else what the user entered (this tab only). */
export function apiKey() {
  if (config.apiKey) return config.apiKey;
  try {
    return sessionStorage.getItem(KEY_STORAGE) || memoryKey;
  } catch {
    return memoryKey;
  }
}

export function setApiKey(value) {
  try {
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: memoryKey below keeps it
  }
  memoryKey = value;
}

export function needsKey() {
  return !config.apiKey;
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const key = apiKey();
  if (key) h["x-api-key"] = key;
  return h;
}

/** An error the page can show: HTTP status, gRPC code name, message and the Status details. */
export class ApiError extends Error {
  constructor({ status = 0, code = "UNKNOWN", message = "", violations = [], reason = "",
    metadata = {}, retryAfter = "", requestId = "", network = false } = {}) {
    super(message || code);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.violations = violations;
    this.reason = reason;
    this.metadata = metadata;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
    this.network = network;
  }

  /** One line: "HTTP 400 INVALID_ARGUMENT: message". */
  get summary() {
    if (this.network) return `Network error: ${this.message}`;
    return this.status ? `HTTP ${this.status} ${this.code}: ${this.message}` : `${this.code}: ${this.message}`;
  }
}

/** An ApiError from a google.rpc.Status JSON object (an HTTP error body or an SSE error event). */
export function errorFromStatus(body, httpStatus = 0, requestId = "") {
  const code = typeof body?.code === "number" ? STATUS_NAMES[body.code] || `CODE_${body.code}` : "UNKNOWN";
  const err = new ApiError({ status: httpStatus, code, message: body?.message || "", requestId });
  for (const detail of Array.isArray(body?.details) ? body.details : []) {
    const type = String(detail["@type"] || "");
    if (type.endsWith("google.rpc.BadRequest")) {
      for (const v of detail.fieldViolations || []) {
        err.violations.push({ field: v.field || "", description: v.description || "" });
      }
    } else if (type.endsWith("google.rpc.ErrorInfo")) {
      err.reason = detail.reason || "";
      err.metadata = detail.metadata || {};
    } else if (type.endsWith("google.rpc.RetryInfo")) {
      err.retryAfter = detail.retryDelay || "";
    } else if (type.endsWith("google.rpc.RequestInfo")) {
      err.requestId = detail.requestId || err.requestId;
    }
  }
  return err;
}

async function errorFrom(resp) {
  const requestId = resp.headers.get("x-request-id") || "";
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  if (body && typeof body === "object" && "code" in body) return errorFromStatus(body, resp.status, requestId);
  return new ApiError({
    status: resp.status, code: resp.status === 404 ? "NOT_FOUND" : "UNKNOWN",
    message: resp.statusText || "the gateway answered without a status body", requestId,
  });
}

function toApiError(err) {
  if (err instanceof ApiError) return err;
  if (err?.name === "AbortError") return err;
  return new ApiError({ network: true, code: "UNAVAILABLE", message: `could not reach the gateway (${err?.message || err})` });
}

export function isAbort(err) {
  return err?.name === "AbortError";
}

/**
 * Calls the bridge and returns the JSON answer. `okStatuses` lets a caller read a body that comes with
 * another status (GET /readyz answers 503 with the same JSON when a backend is down).
 */
export async function api(path, { method = "GET", body, signal, okStatuses = [] } = {}) {
  const init = { method, signal, headers: headers() };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw toApiError(err);
  }
  if (!resp.ok && !okStatuses.includes(resp.status)) throw await errorFrom(resp);
  try {
    return await resp.json();
  } catch (err) {
    if (isAbort(err)) throw err;
    throw new ApiError({ status: resp.status, code: "INTERNAL", message: "the answer was not JSON" });
  }
}

/**
 * A server-streaming call as server-sent events, read with fetch() and a ReadableStream (EventSource can
 * only GET). `onMessage` gets each message's JSON; an `event: error` becomes an ApiError, as does an HTTP
 * error before the first message.
 */
export async function streamEvents(path, body, { onMessage, signal } = {}) {
  let resp;
  try {
    resp = await fetch(path, {
      method: "POST",
      signal,
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
    });
  } catch (err) {
    throw toApiError(err);
  }
  if (!resp.ok) throw await errorFrom(resp);
  if (!resp.body) throw new ApiError({ status: resp.status, code: "INTERNAL", message: "no response stream" });
  const requestId = resp.headers.get("x-request-id") || "";
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const dispatch = (block) => {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let parsed;
    try {
      parsed = JSON.parse(data.join("\n"));
    } catch {
      throw new ApiError({ status: resp.status, code: "INTERNAL", message: "a stream event was not JSON", requestId });
    }
    if (event === "error") throw errorFromStatus(parsed, resp.status, requestId);
    onMessage?.(parsed);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatch(block);
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) dispatch(buffer);
  } catch (err) {
    reader.cancel().catch(() => {});
    throw toApiError(err);
  }
}
