// The public HTTP API (API.md) from the browser: the API key (this tab's session only), JSON calls, and
// server-sent event streams read with fetch (the browser's EventSource cannot send an Authorization header).
import { EventSourceParserStream } from "../vendor/eventsource-parser/stream.js";

const KEY = "loraplex.key";
// the page is <root>/ui/: the API is one level up, so the console works behind a path prefix too
const ROOT = new URL("../", document.baseURI);

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

// "401 without a key" handler, set by the app (it asks for a key)
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

// Prefixes the server puts before a list of problems joined with "; " (adapter validation, training files).
const PROBLEM_PREFIXES = ["invalid adapter: ", "invalid training file: "];

export class ApiError extends Error {
  constructor(status, envelope) {
    const err = (envelope && envelope.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || null;
    this.code = err.code || null;
    this.param = err.param || null;
  }

  // Every problem the server reported, one per entry (it joins them with "; " in one message).
  get problems() {
    let text = this.message;
    const prefix = PROBLEM_PREFIXES.find((p) => text.startsWith(p));
    if (prefix) text = text.slice(prefix.length);
    return text.split("; ").filter((p) => p.length > 0);
  }
}

export function apiUrl(path, query) {
  const url = new URL(path.replace(/^\//, ""), ROOT);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null) url.searchParams.set(k, String(v));
  }
  return url;
}

// One call; resolves to the Response when it is 2xx, else throws ApiError with the server's envelope.
export async function call(method, path, { json, form, query, signal } = {}) {
  const headers = new Headers();
  const key = apiKey.get();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let body;
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  const res = await fetch(apiUrl(path, query), { method, headers, body, signal });
  if (!res.ok) {
    let envelope = null;
    try { envelope = await res.json(); } catch { /* not JSON: keep the status */ }
    const err = new ApiError(res.status, envelope);
    if (res.status === 401) onUnauthorized(err);
    throw err;
  }
  return res;
}

export async function getJSON(path, query) {
  return (await call("GET", path, { query })).json();
}

export async function postJSON(path, json) {
  return (await call("POST", path, { json })).json();
}

export async function getText(path) {
  return (await call("GET", path)).text();
}

// The JSON payloads of an SSE response, until `data: [DONE]` (or the end of the stream).
export async function* sse(method, path, { json, query, signal } = {}) {
  const res = await call(method, path, { json, query, signal });
  const events = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
  for await (const event of events) {
    if (event.data === "[DONE]") return;
    yield JSON.parse(event.data);
  }
}

// Save a response body as a file (downloads need the Authorization header, so a plain link will not do).
export async function download(path, filename) {
  const blob = await (await call("GET", path)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
