// Playground: one prompt (chat with a system prompt, or a plain completion) streamed to up to three columns at
// once, each the base model, an adapter or a weighted composition of adapters; TTFT and tokens/s under each.
import { ApiError, getJSON, sse } from "./api.js";
import { $, $$, DASH, fmtMs, fmtNum, h } from "./dom.js";

const MAX_COLUMNS = 3;
const STATS_TITLE = "TTFT: from sending the request to the first token. tok/s: the tokens after the first, " +
  "over the time from the first to the last.";
let ctx;
let adapterNames = [];
let columns = []; // [{choice: "base" | "a:NAME" | "compose", parts: [{name, weight}], el}]
let running = null; // the AbortController of the prompt being streamed

export function init(context) {
  ctx = context;
  $("#pg-max-tokens").max = ctx.session.max_model_len;
  $("#pg-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("#pg-stop").addEventListener("click", () => running && running.abort());
  $("#pg-add-column").addEventListener("click", () => {
    addColumn({ choice: "base", parts: [] });
    columns[columns.length - 1].el.querySelector("select").focus();
  });
  for (const radio of $$("input[name=mode]")) radio.addEventListener("change", syncMode);
  syncMode();
}

export async function show(params) {
  if (!ctx.session.can.generate) return;
  const models = await getJSON("v1/models");
  adapterNames = models.data.filter((m) => m.parent).map((m) => m.id);
  if (params.columns) setColumns(params.columns.split(",").slice(0, MAX_COLUMNS).map(parseColumn));
  else if (columns.length === 0) setColumns([{ choice: "base", parts: [] }, adapterNames.length
    ? { choice: `a:${adapterNames[0]}`, parts: [] } : { choice: "base", parts: [] }]);
  else columns.forEach(renderColumn); // the adapters may have changed
}

// "base", an adapter name, or a composition "a*0.7+b*0.3"
function parseColumn(text) {
  if (text === "base" || text === "") return { choice: "base", parts: [] };
  if (text.includes("*") || text.includes("+")) {
    const parts = text.split("+").map((p) => {
      const [name, weight] = p.split("*");
      return { name, weight: weight === undefined ? 1 : Number(weight) };
    });
    return { choice: "compose", parts };
  }
  return { choice: `a:${text}`, parts: [] };
}

function syncMode() {
  const chat = mode() === "chat";
  $("#pg-system-label").hidden = !chat;
}

function mode() {
  return $("input[name=mode]:checked").value;
}

function setColumns(specs) {
  columns = [];
  $("#pg-columns").replaceChildren();
  specs.forEach(addColumn);
}

function addColumn(spec) {
  if (columns.length >= MAX_COLUMNS) return;
  const col = { choice: spec.choice, parts: spec.parts.map((p) => ({ ...p })), el: null };
  columns.push(col);
  col.el = h("article", { class: "column", "aria-label": "Column" });
  $("#pg-columns").append(col.el);
  renderColumn(col);
  syncColumnButtons();
}

function removeColumn(col) {
  columns = columns.filter((c) => c !== col);
  col.el.remove();
  columns.forEach(renderColumn); // renumber
  syncColumnButtons();
}

function syncColumnButtons() {
  $("#pg-add-column").disabled = columns.length >= MAX_COLUMNS;
  for (const b of $$(".pg-remove")) b.disabled = columns.length <= 1;
}

function modelOptions(selected) {
  const opts = [h("option", { value: "base", selected: selected === "base" }, `Base model (${ctx.session.model})`)];
  if (adapterNames.length) {
    opts.push(h("optgroup", { label: "Adapters" },
      adapterNames.map((n) => h("option", { value: `a:${n}`, selected: selected === `a:${n}` }, n))));
  } else if (selected.startsWith("a:")) {
    opts.push(h("option", { value: selected, selected: true }, selected.slice(2)));
  }
  opts.push(h("option", { value: "compose", selected: selected === "compose" }, "Weighted composition…"));
  return opts;
}

function renderColumn(col) {
  const n = columns.indexOf(col) + 1;
  const select = h("select", { class: "pg-model", "aria-label": `Column ${n} model` }, modelOptions(col.choice));
  select.addEventListener("change", () => {
    col.choice = select.value;
    if (col.choice === "compose" && col.parts.length === 0 && adapterNames.length) {
      col.parts = adapterNames.slice(0, 2).map((name) => ({ name, weight: 1 / Math.min(2, adapterNames.length) }));
    }
    renderColumn(col);
    col.el.querySelector(".pg-model").focus();
  });
  const answer = col.el.querySelector(".answer") || h("div", { class: "answer", "aria-live": "polite", "aria-label": `Column ${n} answer` });
  const stats = col.el.querySelector(".stats") || h("p", { class: "stats", title: STATS_TITLE }, statsText({}));
  col.el.setAttribute("aria-label", `Column ${n}`);
  col.el.replaceChildren(...[
    h("div", { class: "col-head" },
      h("span", { class: "col-title" }, `Column ${n}`), select,
      h("button", { type: "button", class: "pg-remove", "aria-label": `Remove column ${n}`, onclick: () => removeColumn(col) }, "Remove")),
    col.choice === "compose" ? compositionEditor(col, n) : null,
    answer, stats].filter(Boolean));
  syncColumnButtons();
}

function compositionEditor(col, n) {
  const rows = col.parts.map((part, i) => {
    const pick = h("select", { "aria-label": `Column ${n} composition adapter ${i + 1}` },
      adapterNames.map((name) => h("option", { value: name, selected: name === part.name }, name)));
    pick.addEventListener("change", () => { part.name = pick.value; });
    const weight = h("input", { type: "number", step: "0.1", min: "-100", max: "100", value: part.weight,
      "aria-label": `Column ${n} weight of adapter ${i + 1}` });
    weight.addEventListener("input", () => { part.weight = Number(weight.value); });
    return h("li", {}, pick, weight, h("button", { type: "button", "aria-label": `Remove adapter ${i + 1} from column ${n}`,
      onclick: () => { col.parts.splice(i, 1); renderColumn(col); } }, "✕"));
  });
  return h("div", { class: "compose" },
    h("ol", {}, rows),
    h("button", { type: "button", disabled: adapterNames.length === 0, onclick: () => {
      col.parts.push({ name: adapterNames[0], weight: 1 });
      renderColumn(col);
    } }, "Add an adapter"));
}

function statsText({ ttft, tps, tokens }) {
  return `TTFT ${fmtMs(ttft)} · ${tps === undefined ? DASH : fmtNum(tps)} tok/s · ${tokens === undefined ? DASH : tokens} tokens`;
}

function requestBody(col) {
  const body = { stream: true, stream_options: { include_usage: true } };
  body.temperature = Number($("#pg-temperature").value);
  body.max_tokens = Number($("#pg-max-tokens").value);
  const seed = $("#pg-seed").value;
  if (seed !== "") body.seed = Number(seed);
  if (col.choice === "compose") {
    body.model = ctx.session.model;
    body.adapters = col.parts.map((p) => ({ name: p.name, weight: p.weight }));
  } else {
    body.model = col.choice === "base" ? ctx.session.model : col.choice.slice(2);
  }
  if (mode() === "chat") {
    const system = $("#pg-system").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: $("#pg-prompt").value }];
  } else {
    body.prompt = $("#pg-prompt").value;
  }
  return body;
}

async function send() {
  if (running) return;
  running = new AbortController();
  $("#pg-send").disabled = true;
  $("#pg-stop").disabled = false;
  const chat = mode() === "chat";
  try {
    await Promise.all(columns.map((col) => stream(col, requestBody(col), chat, running.signal)));
  } finally {
    running = null;
    $("#pg-send").disabled = false;
    $("#pg-stop").disabled = true;
  }
}

// Stream one column's answer; TTFT is measured from sending the request, tokens/s over the tokens after the first.
async function stream(col, body, chat, signal) {
  const answer = col.el.querySelector(".answer");
  const stats = col.el.querySelector(".stats");
  answer.textContent = "";
  answer.classList.remove("error");
  delete col.el.dataset.done;
  stats.textContent = statsText({});
  const start = performance.now();
  let first = null;
  let last = null;
  let chunks = 0;
  let usage = null;
  try {
    for await (const chunk of sse("POST", chat ? "v1/chat/completions" : "v1/completions", { json: body, signal })) {
      if (chunk.error) throw new ApiError(500, chunk);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      const text = choice ? (chat ? choice.delta && choice.delta.content : choice.text) : null;
      if (!text) continue;
      const now = performance.now();
      if (first === null) first = now;
      last = now;
      chunks++;
      answer.textContent += text;
      stats.textContent = statsText({ ttft: (first - start) / 1000, tokens: chunks });
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      answer.classList.add("error");
      answer.textContent += (answer.textContent ? "\n" : "") + `Error: ${e.message}`;
    }
  }
  const tokens = usage ? usage.completion_tokens : chunks;
  const tps = first !== null && last > first && tokens > 1 ? ((tokens - 1) * 1000) / (last - first) : undefined;
  stats.textContent = statsText({ ttft: first === null ? undefined : (first - start) / 1000, tps, tokens });
  col.el.dataset.done = "true";
}
