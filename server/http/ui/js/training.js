// Training: upload a JSONL file (bad lines shown with their numbers), start a job from a form built from the
// server's hyperparameter schema, defaults and limits, and follow a job's event stream: training loss, eval loss
// and learning rate by step, progress and ETA, cancel, and "open in playground" once its adapter is servable.
import { ApiError, call, getJSON, postJSON, sse } from "./api.js";
import { $, $$, DASH, confirmAction, fmtBytes, fmtDuration, fmtNum, fmtTime, h, showProblems } from "./dom.js";
import { LineChart } from "./charts.js";

const MAIN_FIELDS = ["rank", "alpha", "n_epochs", "max_steps", "learning_rate", "batch_size", "target_modules"];
const TERMINAL = ["succeeded", "failed", "cancelled"];
const MAX_EVENTS_SHOWN = 200;

let ctx;
let schema; // {name: {kind, default, min, max, options, nullable, auto, description, method}}
let job = null; // the job shown
let follow = null; // AbortController of its event stream
let charts = null;
let progress = null; // {step, total, loss, eval, times: [[step, created_at]]}
let clock = null;
let visible = false;

export function init(context) {
  ctx = context;
  const { limits, methods } = ctx.session;
  $("#tr-method").replaceChildren(...methods.map((m) => h("option", { value: m }, m)));
  $("#tr-method").addEventListener("change", syncMethod);
  const maxSeconds = $("#tr-max-seconds");
  maxSeconds.max = limits.max_job_seconds;
  maxSeconds.placeholder = `${limits.max_job_seconds} (limit)`;
  $("#tr-file-limit").textContent = `At most ${fmtBytes(limits.max_training_file_bytes)} and ` +
    `${limits.max_training_examples.toLocaleString("en")} examples.`;
  buildHyperparameterForm();
  $("#tr-file-form").addEventListener("submit", (event) => {
    event.preventDefault();
    uploadFile();
  });
  $("#tr-job-form").addEventListener("submit", (event) => {
    event.preventDefault();
    createJob();
  });
  $("#tr-refresh").addEventListener("click", refreshJobs);
  $("#tr-cancel").addEventListener("click", cancelJob);
  $("#tr-open").addEventListener("click", () => ctx.navigate("playground", { columns: `base,${job.adapter_name}` }));
}

export async function show() {
  visible = true;
  if (!ctx.session.can.train) return;
  await Promise.all([refreshFiles(), refreshJobs()]);
  if (job && !TERMINAL.includes(job.status)) showJob(job.id);
}

export function hide() {
  visible = false;
  if (follow) follow.abort();
  clearInterval(clock);
}

// ---- the hyperparameter form, from the schema (defaults, bounds, descriptions) and the server's limits ----------

function describe(name, prop) {
  const branches = prop.anyOf || [prop];
  const main = branches.find((b) => b.type !== "null" && b.const !== "auto") || {};
  const field = {
    kind: main.enum ? "enum" : main.type, default: prop.default, options: main.enum,
    min: main.minimum ?? main.exclusiveMinimum, max: main.maximum ?? main.exclusiveMaximum,
    nullable: branches.some((b) => b.type === "null"), auto: branches.some((b) => b.const === "auto"),
    description: prop.description || "", method: (prop.description || "").startsWith("switchlora:") ? "switchlora" : null,
  };
  const { limits } = ctx.session;
  if (name === "rank" || name === "export_rank") field.max = limits.max_lora_rank;
  if (name === "max_steps") field.max = limits.max_train_steps;
  return field;
}

function buildHyperparameterForm() {
  schema = {};
  const main = [];
  const more = [];
  for (const [name, prop] of Object.entries(ctx.session.hyperparameters.properties)) {
    const field = describe(name, prop);
    schema[name] = field;
    (MAIN_FIELDS.includes(name) ? main : more).push(inputFor(name, field));
  }
  $("#tr-hp").replaceChildren(...main);
  $("#tr-hp-more").replaceChildren(...more);
  syncMethod();
}

function inputFor(name, f) {
  const id = `hp-${name}`;
  const hint = [f.description, f.max !== undefined && f.kind !== "boolean" ? `Limit: ${f.max}.` : ""].join(" ").trim();
  let control;
  if (name === "target_modules") {
    const boxes = ctx.session.target_modules.map((m) => h("label", { class: "check" },
      h("input", { type: "checkbox", name: "target_modules", value: m }), ` ${m}`));
    control = h("fieldset", { class: "inline", id }, h("legend", {}, "target_modules (none: every linear layer)"), boxes);
    return h("div", { class: "wide", dataset: { field: name } }, control, h("small", {}, f.description));
  }
  if (f.kind === "boolean") {
    control = h("input", { type: "checkbox", id, checked: f.default === true });
    return h("label", { class: "check", title: hint, dataset: { field: name, method: f.method } }, control, ` ${name}`);
  }
  if (f.kind === "enum") {
    control = h("select", { id }, f.options.map((o) => h("option", { value: o, selected: o === f.default }, o)));
  } else {
    const integer = f.kind === "integer";
    control = h("input", {
      id, type: "number", step: integer ? "1" : "any", min: f.min, max: f.max,
      value: f.default ?? undefined, placeholder: f.default === null ? (f.nullable ? "default" : "") : undefined,
    });
  }
  return h("label", { title: hint, dataset: { field: name, method: f.method } }, name, control);
}

function syncMethod() {
  const method = $("#tr-method").value;
  for (const el of $$("[data-method]")) el.hidden = el.dataset.method !== method;
}

// The hyperparameters that differ from the server's defaults (an empty field keeps the default).
function hyperparameters() {
  const out = {};
  const method = $("#tr-method").value;
  for (const [name, f] of Object.entries(schema)) {
    if (f.method && f.method !== method) continue;
    if (name === "target_modules") {
      const picked = $$("input[name=target_modules]:checked").map((b) => b.value);
      if (picked.length) out.target_modules = picked;
      continue;
    }
    const el = $(`#hp-${name}`);
    if (f.kind === "boolean") {
      if (el.checked !== f.default) out[name] = el.checked;
    } else if (f.kind === "enum") {
      if (el.value !== f.default) out[name] = el.value;
    } else if (el.value !== "" && Number(el.value) !== f.default) {
      out[name] = Number(el.value);
    }
  }
  return out;
}

// ---- files --------------------------------------------------------------------------------------------------

async function refreshFiles(select) {
  const files = (await getJSON("v1/files")).data.filter((f) => f.purpose === "fine-tune");
  const label = (f) => `${f.filename} (${f.id})`;
  const train = $("#tr-train-file");
  const keep = select || train.value;
  train.replaceChildren(...(files.length ? files.map((f) => h("option", { value: f.id, selected: f.id === keep }, label(f)))
    : [h("option", { value: "" }, "upload a file first")]));
  const val = $("#tr-val-file");
  const keepVal = val.value;
  val.replaceChildren(h("option", { value: "" }, "none"),
    ...files.map((f) => h("option", { value: f.id, selected: f.id === keepVal }, label(f))));
}

async function uploadFile() {
  const file = $("#tr-file").files[0];
  const result = $("#tr-file-result");
  const problems = $("#tr-file-problems");
  problems.replaceChildren();
  if (!file) return;
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  result.textContent = "Uploading…";
  try {
    const record = await (await call("POST", "v1/files", { form })).json();
    result.textContent = `Uploaded ${record.filename} as ${record.id}.`;
    await refreshFiles(record.id);
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    result.textContent = `The server refused the file (${e.status}):`;
    const lines = (await file.text()).split(/\r?\n/);
    showProblems(problems, e.problems, (p) => {
      const m = /^line (\d+): (.*)$/.exec(p);
      if (!m) return p;
      const text = lines[Number(m[1]) - 1] || "";
      return [h("span", { class: "lineno" }, `line ${m[1]}`), " ",
        h("code", {}, text.length > 120 ? `${text.slice(0, 120)}…` : text), h("span", {}, ` — ${m[2]}`)];
    });
  }
}

// ---- jobs ---------------------------------------------------------------------------------------------------

async function createJob() {
  const result = $("#tr-job-result");
  const problems = $("#tr-job-problems");
  problems.replaceChildren();
  const body = {
    training_file: $("#tr-train-file").value, adapter_name: $("#tr-name").value.trim(),
    method: { type: $("#tr-method").value, hyperparameters: hyperparameters() },
    overwrite: $("#tr-overwrite").checked,
  };
  if ($("#tr-val-file").value) body.validation_file = $("#tr-val-file").value;
  if ($("#tr-seed").value !== "") body.seed = Number($("#tr-seed").value);
  if ($("#tr-max-seconds").value !== "") body.max_seconds = Number($("#tr-max-seconds").value);
  try {
    const created = await postJSON("v1/fine_tuning/jobs", body);
    result.textContent = `Job ${created.id} queued.`;
    await refreshJobs();
    showJob(created.id);
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    result.textContent = `The server refused the job (${e.status}):`;
    showProblems(problems, e.problems);
  }
}

async function refreshJobs() {
  const jobs = (await getJSON("v1/fine_tuning/jobs")).data;
  $("#tr-jobs tbody").replaceChildren(...jobs.map((j) => {
    const m = j.metrics || {};
    const total = m.total_steps || (j.hyperparameters && j.hyperparameters.max_steps);
    return h("tr", { dataset: { job: j.id } },
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => showJob(j.id) }, j.id)),
      h("td", {}, j.adapter_name), h("td", {}, j.status),
      h("td", {}, m.step !== undefined ? `${m.step}/${total || "?"}` : DASH), h("td", {}, fmtTime(j.created_at)));
  }));
}

async function showJob(id) {
  if (follow) follow.abort();
  job = await getJSON(`v1/fine_tuning/jobs/${id}`);
  $("#tr-detail").hidden = false;
  $("#tr-detail-title").textContent = `Job ${job.id} → ${job.adapter_name}`;
  $("#tr-events").replaceChildren();
  if (charts) Object.values(charts).forEach((c) => c.destroy());
  charts = {
    loss: new LineChart($("#tr-loss-chart"), [{ label: "training loss" }, { label: "eval loss", points: true, spanGaps: true }],
      { time: false, xLabel: "step" }),
    lr: new LineChart($("#tr-lr-chart"), [{ label: "learning rate" }], { time: false, xLabel: "step" }),
  };
  progress = { step: job.metrics.step || 0, total: job.metrics.total_steps || null, loss: null, eval: null, times: [] };
  render();
  clearInterval(clock);
  clock = setInterval(render, 1000);
  const controller = new AbortController();
  follow = controller;
  try {
    for await (const event of sse("GET", `v1/fine_tuning/jobs/${id}/events`, { query: { stream: "true" }, signal: controller.signal })) {
      onEvent(event);
    }
  } catch (e) {
    if (e.name === "AbortError") return;
    throw e;
  }
  if (follow !== controller) return;
  job = await getJSON(`v1/fine_tuning/jobs/${id}`); // the stream ended: the job has finished
  render();
  clearInterval(clock);
  if (visible) refreshJobs();
}

function onEvent(event) {
  const d = event.data || {};
  const list = $("#tr-events");
  list.append(h("li", { class: event.level }, `${fmtTime(event.created_at)} ${event.message}`));
  while (list.children.length > MAX_EVENTS_SHOWN) list.firstChild.remove();
  if (d.total_steps) progress.total = d.total_steps;
  if (d.step !== undefined && d.loss !== undefined) {
    progress.step = d.step;
    progress.loss = d.loss;
    progress.times.push([d.step, event.created_at]);
    charts.loss.put(d.step, 0, d.loss);
    charts.lr.put(d.step, 0, d.learning_rate);
    charts.loss.scheduleRedraw();
    charts.lr.scheduleRedraw();
  }
  if (d.eval_loss !== undefined) {
    progress.eval = d.eval_loss;
    charts.loss.put(d.step, 1, d.eval_loss);
    charts.loss.scheduleRedraw();
  }
  if (job.status === "queued" && d.total_steps) job.status = "running";
  render();
}

// Steps per second from the step events' own times (whole seconds, so over at least 2 s of them): over the last
// ~10 s of steps, so a job that paused (a server restart) or changed pace is estimated by its recent steps.
function stepRate() {
  const t = progress.times;
  if (t.length < 2) return null;
  const [s1, c1] = t[t.length - 1];
  let i = t.length - 2;
  while (i > 0 && c1 - t[i][1] < 10) i--;
  const [s0, c0] = t[i];
  return c1 - c0 >= 2 ? (s1 - s0) / (c1 - c0) : null;
}

function render() {
  const done = TERMINAL.includes(job.status);
  const { step, total } = progress;
  $("#tr-status").textContent = job.status;
  $("#tr-step").textContent = total ? `${step}/${total}` : String(step || DASH);
  $("#tr-loss").textContent = fmtNum(progress.loss ?? job.metrics.train_loss, 4);
  $("#tr-eval").textContent = fmtNum(progress.eval ?? job.metrics.eval_loss, 4);
  const bar = $("#tr-progress");
  bar.max = total || 1;
  bar.value = done && job.status === "succeeded" ? bar.max : Math.min(step, bar.max);
  const end = job.finished_at || Date.now() / 1000;
  $("#tr-elapsed").textContent = job.started_at ? fmtDuration(end - job.started_at) : DASH;
  const rate = stepRate();
  $("#tr-eta").textContent = done ? DASH : rate && total ? fmtDuration((total - step) / rate) : DASH;
  $("#tr-cancel").hidden = done;
  $("#tr-open").hidden = job.status !== "succeeded";
  const error = $("#tr-error");
  error.hidden = !job.error;
  error.textContent = job.error ? job.error.message : "";
}

async function cancelJob() {
  if (!(await confirmAction("Cancel job", `Cancel job ${job.id}? It stops after its current optimizer step.`, "Cancel job"))) return;
  try {
    job = await postJSON(`v1/fine_tuning/jobs/${job.id}/cancel`, {});
  } catch (e) {
    $("#tr-job-result").textContent = `Could not cancel: ${e.message}`;
  }
  render();
}
