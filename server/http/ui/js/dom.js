// Building and formatting page content. Text always goes in as text (never as HTML): adapter names, model output
// and server messages cannot inject markup.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

// h("button", {class: "x", onclick: fn, dataset: {name: "a"}}, "text", child, ...)
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") {
      for (const [dk, dv] of Object.entries(v)) if (dv !== undefined && dv !== null) el.dataset[dk] = dv;
    }
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  el.append(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return el;
}

// The dialog asking to confirm a destructive action; resolves to true or false.
export function confirmAction(title, text, confirmLabel = "Confirm") {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-yes").textContent = confirmLabel;
  dialog.returnValue = "";
  dialog.showModal();
  $("#confirm-no").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// List `problems` (strings) in the list element `list`; for each, `render` may return richer content.
export function showProblems(list, problems, render = (p) => p) {
  list.replaceChildren(...problems.map((p) => h("li", {}, render(p))));
}

export const DASH = "—";

export function fmtBytes(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return DASH;
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtNum(v, digits = 1) {
  if (v === undefined || v === null || !Number.isFinite(v)) return DASH;
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en");
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}

export function fmtMs(seconds) {
  if (seconds === undefined || seconds === null || !Number.isFinite(seconds)) return DASH;
  return seconds < 10 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(1)} s`;
}

export function fmtDuration(seconds) {
  if (seconds === undefined || seconds === null || !Number.isFinite(seconds) || seconds < 0) return DASH;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function fmtTime(unixSeconds) {
  if (!unixSeconds) return DASH;
  return new Date(unixSeconds * 1000).toLocaleString();
}
