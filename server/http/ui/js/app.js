// The console's shell: asks for an API key when the server needs one, learns what the key may do
// (/ui/api/session), hides what it may not, and shows one page at a time (#/playground, #/adapters, #/training,
// #/server; a page may take parameters: #/playground?columns=base,my-adapter).
import { ApiError, apiKey, getJSON, setUnauthorizedHandler } from "./api.js";
import { $, $$ } from "./dom.js";
import * as adapters from "./adapters.js";
import * as playground from "./playground.js";
import * as server from "./serverpage.js";
import * as training from "./training.js";

const PAGES = { playground, adapters, training, server };
const ctx = { session: null, navigate };
let current = null;

function navigate(page, params = {}) {
  const query = Object.entries(params).map(([k, v]) => `${k}=${encodeURIComponent(v).replace(/%2C/g, ",")}`).join("&");
  location.hash = `#/${page}${query ? `?${query}` : ""}`;
}

function route() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const name = PAGES[path] ? path : "playground";
  // parameters as written ("+" stays a plus: it joins the adapters of a composition, alpha*0.5+beta*0.5)
  const params = Object.fromEntries((query || "").split("&").filter(Boolean)
    .map((kv) => kv.split("=").map((part) => decodeURIComponent(part || ""))));
  if (current && current !== name) PAGES[current].hide?.();
  for (const section of $$("[data-page]")) section.hidden = section.dataset.page !== name;
  for (const link of $$("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  current = name;
  PAGES[name].show(params);
}

// Hide what the key may not do: [data-needs=ACTION] is hidden, [data-lacks=ACTION] (its notice) shown.
function applyPermissions(can) {
  for (const el of $$("[data-needs]")) if (!can[el.dataset.needs]) el.hidden = true;
  for (const el of $$("[data-lacks]")) el.hidden = !!can[el.dataset.lacks];
}

function banner(text) {
  const el = $("#banner");
  el.textContent = text || "";
  el.hidden = !text;
}

function askForKey(message) {
  const dialog = $("#key-dialog");
  const error = $("#key-error");
  error.textContent = message || "";
  error.hidden = !message;
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}

async function loadSession() {
  for (;;) {
    try {
      return await getJSON("ui/api/session");
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return null; // the key dialog is open
      const wait = e instanceof ApiError && e.status === 503 ? "the model is loading" : "cannot reach the server";
      $("#server-status").textContent = wait;
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}

async function start() {
  const session = await loadSession();
  if (!session) return;
  ctx.session = session;
  $("#server-status").textContent = `model: ${session.model}`;
  const who = $("#who");
  who.hidden = !session.auth;
  who.textContent = session.auth ? `key scopes: ${session.scopes.join(", ") || "none"}` : "";
  $("#sign-out").hidden = !session.auth;
  applyPermissions(session.can);
  for (const page of Object.values(PAGES)) page.init(ctx);
  window.addEventListener("hashchange", route);
  route();
  document.documentElement.dataset.ready = "true"; // for tests: the console has drawn itself
}

function setUp() {
  setUnauthorizedHandler(() => {
    const had = apiKey.get() !== null;
    apiKey.clear();
    askForKey(had ? "The server refused the key: enter another." : "");
  });
  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    apiKey.set($("#key-input").value.trim());
    try {
      await getJSON("ui/api/session");
    } catch (e) {
      apiKey.clear();
      askForKey(e instanceof ApiError && e.status === 401 ? "The server refused this key." : e.message);
      return;
    }
    $("#key-dialog").close();
    $("#key-input").value = "";
    if (ctx.session) location.reload(); // a different key: draw everything again for its scopes
    else start();
  });
  $("#key-dialog").addEventListener("cancel", (event) => event.preventDefault()); // nothing works without one
  $("#sign-out").addEventListener("click", () => {
    apiKey.clear();
    location.reload();
  });
  window.addEventListener("unhandledrejection", (event) => {
    if (event.reason instanceof ApiError && event.reason.status === 401) return;
    banner(String(event.reason && event.reason.message ? event.reason.message : event.reason));
  });
  start();
}

setUp();
