// Server: live charts of the last minutes from /metrics, polled at most once a second and only while this page is
// shown (the next poll is set when the previous answer has arrived, so polls never pile up). Everything is
// derived here from the scrapes; the server computes nothing for the page. A series the server does not export
// shows "—": new ones are added by name in SERIES.
import { ApiError, getText } from "./api.js";
import { $, DASH, fmtMs, fmtNum, h } from "./dom.js";
import { LineChart } from "./charts.js";
import { Scrape, quantile, rate } from "./prom.js";

export const POLL_SECONDS = 1; // never below 1
const WINDOW_SECONDS = 300; // what the charts show
const QUANTILE_WINDOW = 30; // latency percentiles over the observations of the last 30 s (as rate(...[30s]))
const MAX_ADAPTER_SERIES = 6;

// The series the page reads, by name (a counter may also be exported with the suffix _total).
const SERIES = {
  generationTokens: "loraplex_generation_tokens",
  promptTokens: "loraplex_prompt_tokens",
  requests: "loraplex_requests",
  ttft: "loraplex_time_to_first_token_seconds",
  itl: "loraplex_inter_token_latency_seconds",
  e2e: "loraplex_e2e_request_latency_seconds",
  running: "loraplex_running_requests",
  waiting: "loraplex_queue_depth",
  kvRows: "loraplex_kv_cache_rows",
  kvUsage: "loraplex_kv_cache_usage_ratio", // share of KV-cache rows in use, 0–1
  poolPages: "loraplex_lora_pool_pages",
  poolUsage: "loraplex_lora_pool_usage_ratio", // share of LoRA-pool pages in use, 0–1
  adaptersLoaded: "loraplex_adapters_loaded",
  adaptersRegistered: "loraplex_adapters_registered",
  adapterRequests: "loraplex_adapter_requests",
  merged: "loraplex_adapter_merged",
  merges: "loraplex_adapter_merges",
  jobs: "loraplex_training_jobs",
};

let timer = null;
let lastPoll = -Infinity; // performance.now() when the last poll started
let inFlight = false;
let paused = false;
let active = false;
let scrapes = []; // [Scrape], oldest first, within the window
let charts = null;
let adapterSeries = []; // adapter names charted in "per-adapter traffic"

export function init() {
  $("#sv-interval").textContent = POLL_SECONDS;
  $("#sv-window").textContent = WINDOW_SECONDS / 60;
  $("#sv-pause").addEventListener("click", () => {
    paused = !paused;
    $("#sv-pause").setAttribute("aria-pressed", String(paused));
    $("#sv-pause").textContent = paused ? "Resume" : "Pause";
    if (!paused) schedule();
  });
  document.addEventListener("visibilitychange", () => { if (active && !document.hidden) schedule(); });
}

export function show() {
  active = true;
  if (!charts) charts = makeCharts();
  schedule();
}

export function hide() {
  active = false;
  clearTimeout(timer);
  timer = null;
}

// The next poll, one interval after the last one started (at once if that is past).
function schedule() {
  clearTimeout(timer);
  timer = setTimeout(poll, Math.max(0, lastPoll + POLL_SECONDS * 1000 - performance.now()));
}

async function poll() {
  timer = null;
  if (!active || paused || document.hidden || inFlight) return; // one in flight schedules the next itself
  lastPoll = performance.now();
  inFlight = true;
  try {
    const text = await getText("metrics");
    $("#sv-error").hidden = true;
    add(new Scrape(text, Date.now() / 1000));
  } catch (e) {
    const error = $("#sv-error");
    error.hidden = false;
    error.textContent = e instanceof ApiError && e.status === 403
      ? "This key may not read /metrics." : `Cannot read /metrics: ${e.message}`;
  } finally {
    inFlight = false;
  }
  if (active && !paused) schedule();
}

function makeCharts() {
  const box = (title) => {
    const chart = h("div", { class: "chart" });
    $("#sv-charts").append(h("figure", {}, h("figcaption", {}, title), chart));
    return chart;
  };
  const ms = (u, v) => (v === null || v === undefined ? DASH : fmtMs(v / 1000));
  const chart = (title, series, opts = {}) => new LineChart(box(title), series, { xWindow: WINDOW_SECONDS, ...opts });
  return {
    tokens: chart("Tokens per second", [{ label: "generated" }, { label: "prompt" }]),
    ttft: chart("Time to first token (ms, last 30 s)", ["p50", "p90", "p99"].map((label) => ({ label, value: ms }))),
    itl: chart("Inter-token latency (ms, last 30 s)", ["p50", "p90", "p99"].map((label) => ({ label, value: ms }))),
    e2e: chart("End-to-end latency (ms, last 30 s)", ["p50", "p90", "p99"].map((label) => ({ label, value: ms }))),
    load: chart("Requests", [{ label: "running" }, { label: "waiting" }]),
    memory: chart("KV-cache and LoRA-pool use (%)", [{ label: "KV cache" }, { label: "LoRA pool" }], { yRange: [0, 100] }),
    adapters: null, // made when adapters have traffic (its series are the adapters seen)
    merged: chart("Merged adapter (1 = merged)", [{ label: "merged" }], { yRange: [0, 1] }),
    adapterBox: box("Per-adapter requests per second"),
  };
}

function add(scrape) {
  scrapes.push(scrape);
  const now = scrape.time;
  while (scrapes.length > 2 && scrapes[0].time < now - WINDOW_SECONDS - QUANTILE_WINDOW) scrapes.shift();
  const prev = scrapes.length > 1 ? scrapes[scrapes.length - 2] : null;
  const back = scrapes.find((s) => s.time >= now - QUANTILE_WINDOW) || scrapes[0];
  const older = back === scrape ? prev : back;
  const q = (name) => [0.5, 0.9, 0.99].map((p) => (older ? quantile(p, older, scrape, name) : undefined)).map((v) => (v === undefined ? v : v * 1000));

  const genRate = prev ? rate(prev, scrape, SERIES.generationTokens) : undefined;
  const promptRate = prev ? rate(prev, scrape, SERIES.promptTokens) : undefined;
  const running = scrape.value(SERIES.running);
  const waiting = scrape.value(SERIES.waiting);
  const kvRows = scrape.value(SERIES.kvRows);
  // KV-cache use: the server's own gauge when it has one, else rows held by running sequences (one row each)
  const kvUse = scrape.has(SERIES.kvUsage) ? scrape.value(SERIES.kvUsage) * 100
    : running !== undefined && kvRows ? (100 * running) / kvRows : undefined;
  const poolUse = scrape.has(SERIES.poolUsage) ? scrape.value(SERIES.poolUsage) * 100 : undefined;
  const merged = scrape.value(SERIES.merged);

  const ttft = q(SERIES.ttft);
  const itl = q(SERIES.itl);
  const e2e = q(SERIES.e2e);
  charts.tokens.push(now, genRate, promptRate);
  charts.ttft.push(now, ...ttft);
  charts.itl.push(now, ...itl);
  charts.e2e.push(now, ...e2e);
  charts.load.push(now, running, waiting);
  charts.memory.push(now, kvUse, poolUse);
  charts.merged.push(now, merged);
  pushAdapterTraffic(prev, scrape, now);
  for (const chart of Object.values(charts)) {
    if (!(chart instanceof LineChart)) continue;
    chart.trim(now - WINDOW_SECONDS);
    chart.redraw();
  }

  const reqs = scrape.by(SERIES.requests, "status");
  const errors = Object.entries(reqs).filter(([s]) => !s.startsWith("2")).reduce((a, [, v]) => a + v, 0);
  const jobs = scrape.by(SERIES.jobs, "status");
  tiles([
    ["Generated tokens/s", fmtNum(genRate)],
    ["TTFT p50", fmtMs(ttft[0] === undefined ? undefined : ttft[0] / 1000)],
    ["Inter-token p50", fmtMs(itl[0] === undefined ? undefined : itl[0] / 1000)],
    ["Running / waiting", `${fmtNum(running, 0)} / ${fmtNum(waiting, 0)}`],
    ["KV-cache rows", fmtNum(kvRows, 0)],
    ["KV-cache use", kvUse === undefined ? DASH : `${fmtNum(kvUse)} %`],
    ["LoRA-pool pages", fmtNum(scrape.value(SERIES.poolPages), 0)],
    ["LoRA-pool use", poolUse === undefined ? DASH : `${fmtNum(poolUse)} %`],
    ["Adapters in pool / registered", `${fmtNum(scrape.value(SERIES.adaptersLoaded), 0)} / ${fmtNum(scrape.value(SERIES.adaptersRegistered), 0)}`],
    ["Merged", merged === undefined ? DASH : merged ? "yes" : "no"],
    ["Merges", fmtNum(scrape.value(SERIES.merges), 0)],
    ["Requests (errors)", scrape.has(SERIES.requests) ? `${fmtNum(Object.values(reqs).reduce((a, v) => a + v, 0), 0)} (${fmtNum(errors, 0)})` : DASH],
    ["Training jobs running / queued", scrape.has(SERIES.jobs) ? `${fmtNum(jobs.running || 0, 0)} / ${fmtNum(jobs.queued || 0, 0)}` : DASH],
  ]);
}

// Requests per second of the busiest adapters (the chart is made again when the set of adapters changes).
function pushAdapterTraffic(prev, scrape, now) {
  if (!prev) return;
  const before = prev.by(SERIES.adapterRequests, "adapter");
  const after = scrape.by(SERIES.adapterRequests, "adapter");
  const dt = scrape.time - prev.time;
  const rates = Object.fromEntries(Object.entries(after).map(([a, v]) => [a, Math.max(0, v - (before[a] || 0)) / dt]));
  const top = Object.keys(after).sort((a, b) => after[b] - after[a]).slice(0, MAX_ADAPTER_SERIES).sort();
  if (top.length === 0) return;
  if (top.join("\n") !== adapterSeries.join("\n")) {
    const old = charts.adapters;
    adapterSeries = top;
    charts.adapters = new LineChart(charts.adapterBox, top.map((label) => ({ label })), { xWindow: WINDOW_SECONDS });
    if (old) {
      // keep the history of the adapters still charted
      for (let i = 0; i < old.data[0].length; i++) {
        charts.adapters.push(old.data[0][i], ...top.map((a) => {
          const j = old.series.indexOf(a);
          return j < 0 ? undefined : old.data[j + 1][i] ?? undefined;
        }));
      }
      old.destroy();
    }
    charts.adapters.series = top;
  }
  charts.adapters.push(now, ...top.map((a) => rates[a]));
}

function tiles(entries) {
  $("#sv-tiles").replaceChildren(...entries.map(([k, v]) => h("div", { class: "tile" }, h("dt", {}, k), h("dd", {}, v))));
}
