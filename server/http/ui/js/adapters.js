// Adapters: the served adapters (where each lives now, merged or not, the traffic it served), upload by drag and
// drop (a PEFT folder, its two files, or an archive) with every problem the server finds listed, replace,
// download and delete with confirmation.
import { ApiError, call, download, getJSON, getText } from "./api.js";
import { $, DASH, confirmAction, fmtBytes, h, showProblems } from "./dom.js";
import { Scrape } from "./prom.js";

const CONFIG = "adapter_config.json";
const WEIGHTS = "adapter_model.safetensors";
const ARCHIVE = /\.(zip|tar\.gz|tgz)$/i;
const PEFT_FILES = /^adapter_model\.(safetensors|bin)$|^adapter_config\.json$/; // what a folder contributes
const REFRESH_MS = 5000;
// per-adapter series of /metrics (a missing one shows "—")
const REQUESTS = "loraplex_adapter_requests";
const TOKENS = "loraplex_adapter_generation_tokens";
const TIERS = { device: "device pool", host: "host memory", disk: "disk" };

let ctx;
let chosen = []; // File objects to upload
let autoName = ""; // the name we filled in (replaced when other files are chosen)
const rows = new Map(); // adapter name → its <tr>
let timer = null;

export function init(context) {
  ctx = context;
  const drop = $("#ad-drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const { files, folder } = await droppedFiles(event.dataTransfer);
    choose(files, folder);
  });
  $("#ad-pick-files").addEventListener("click", () => $("#ad-files").click());
  $("#ad-pick-folder").addEventListener("click", () => $("#ad-folder").click());
  $("#ad-files").addEventListener("change", (e) => choose([...e.target.files], null));
  $("#ad-folder").addEventListener("change", (e) => {
    const files = [...e.target.files];
    const folder = files.length ? files[0].webkitRelativePath.split("/")[0] : null;
    choose(files.filter((f) => PEFT_FILES.test(f.name)), folder);
  });
  $("#ad-upload").addEventListener("submit", (event) => {
    event.preventDefault();
    upload($("#ad-overwrite").checked);
  });
  $("#ad-refresh").addEventListener("click", refresh);
}

export function show() {
  refresh();
  clearInterval(timer);
  timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
}

export function hide() {
  clearInterval(timer);
  timer = null;
}

// The files of a drop: plain files as they are; a folder's PEFT files (its other files, e.g. README.md, stay).
async function droppedFiles(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  const dir = entries.find((e) => e.isDirectory);
  if (!dir) return { files: [...transfer.files], folder: null };
  const children = await new Promise((resolve, reject) => dir.createReader().readEntries(resolve, reject));
  const files = await Promise.all(children.filter((e) => e.isFile && PEFT_FILES.test(e.name))
    .map((e) => new Promise((resolve, reject) => e.file(resolve, reject))));
  return { files, folder: dir.name };
}

function choose(files, folder) {
  chosen = files;
  $("#ad-chosen").replaceChildren(...files.map((f) => h("li", {}, `${f.name} (${fmtBytes(f.size)})`)));
  const archive = files.find((f) => ARCHIVE.test(f.name));
  const suggested = (folder || (archive ? archive.name.replace(ARCHIVE, "") : "")).replace(/[^A-Za-z0-9._-]/g, "-");
  const name = $("#ad-name");
  if (suggested && (name.value === "" || name.value === autoName)) {
    name.value = suggested;
    autoName = suggested;
  }
  $("#ad-problems").replaceChildren();
  $("#ad-result").textContent = files.length ? `${files.length} file(s) ready to upload.` : "";
}

function fieldOf(file) {
  if (file.name === CONFIG || file.name === WEIGHTS) return file.name;
  if (ARCHIVE.test(file.name)) return "archive";
  return file.name; // anything else: the server names the problem (pickle weights, an unexpected file)
}

async function upload(overwrite, confirmed = false) {
  const name = $("#ad-name").value.trim();
  const result = $("#ad-result");
  const problems = $("#ad-problems");
  problems.replaceChildren();
  if (chosen.length === 0) {
    result.textContent = "Choose or drop the adapter's files first.";
    return;
  }
  if (overwrite && !confirmed && rows.has(name)
      && !(await confirmAction("Replace adapter", `Replace the adapter '${name}' with the uploaded files? Requests already running finish on the old version.`, "Replace"))) {
    return;
  }
  const form = new FormData();
  form.append("name", name);
  for (const file of chosen) form.append(fieldOf(file), file, file.name);
  result.textContent = "Uploading…";
  try {
    const res = await call("POST", "v1/adapters", { form, query: { overwrite: overwrite ? "true" : undefined } });
    const adapter = await res.json();
    $("#ad-name").value = "";
    $("#ad-overwrite").checked = false;
    choose([], null);
    result.textContent = `Uploaded '${adapter.id}' (version ${adapter.version}).`;
    await refresh();
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    if (e.status === 409 && !overwrite) {
      result.textContent = "";
      if (await confirmAction("Adapter exists", `An adapter named '${name}' exists. Replace it with these files?`, "Replace")) {
        await upload(true, true);
      }
      return;
    }
    result.textContent = `The server refused the upload (${e.status}):`;
    showProblems(problems, e.problems);
  }
}

export async function refresh() {
  const [list, residence, metrics] = await Promise.all([
    getJSON("v1/adapters"),
    getJSON("ui/api/adapters").catch(() => null),
    getText("metrics").then((t) => new Scrape(t, 0)).catch(() => null),
  ]);
  const traffic = (series) => (metrics && metrics.has(series) ? metrics.by(series, "adapter") : null);
  const requests = traffic(REQUESTS);
  const tokens = traffic(TOKENS);
  const tbody = $("#ad-table tbody");
  const names = list.data.map((a) => a.id);
  for (const [name, tr] of rows) {
    if (!names.includes(name)) {
      tr.remove();
      rows.delete(name);
    }
  }
  for (const a of list.data) {
    const tr = rows.get(a.id) || newRow(a.id);
    const tier = residence && residence.adapters[a.id];
    const cells = [a.id, String(a.version), `${a.rank} (${a.alpha})`, a.target_modules.join(", "),
      fmtBytes(a.size_bytes), tier ? TIERS[tier] : DASH, residence ? (residence.merged === a.id ? "yes" : "no") : DASH,
      requests ? String(requests[a.id] || 0) : DASH, tokens ? String(tokens[a.id] || 0) : DASH];
    cells.forEach((text, i) => { if (tr.cells[i].textContent !== text) tr.cells[i].textContent = text; });
  }
  const inOrder = [...tbody.rows].map((tr) => tr.dataset.name);
  if (inOrder.join("\n") !== names.join("\n")) tbody.append(...names.map((n) => rows.get(n))); // moves only on change
  $("#ad-empty").hidden = names.length > 0;
}

function newRow(name) {
  const can = ctx.session.can;
  const actions = h("td", { class: "row-actions" },
    h("a", { href: `#/playground?columns=base,${encodeURIComponent(name)}`, class: "button" }, "Try"),
    can.download_adapters ? h("button", { type: "button", onclick: () => download(`v1/adapters/${encodeURIComponent(name)}/download`, `${name}.tar.gz`) }, "Download") : null,
    can.manage_adapters ? h("button", { type: "button", onclick: () => replace(name) }, "Replace…") : null,
    can.manage_adapters ? h("button", { type: "button", class: "danger", onclick: () => remove(name) }, "Delete") : null);
  const tr = h("tr", { dataset: { name } }, ...Array.from({ length: 9 }, () => h("td")), actions);
  rows.set(name, tr);
  return tr;
}

function replace(name) {
  $("#ad-name").value = name;
  $("#ad-overwrite").checked = true;
  $("#ad-upload").scrollIntoView({ behavior: "smooth", block: "start" });
  $("#ad-pick-files").focus();
}

async function remove(name) {
  if (!(await confirmAction("Delete adapter", `Delete the adapter '${name}'? Requests already running finish first; new ones get 404.`, "Delete"))) return;
  try {
    await call("DELETE", `v1/adapters/${encodeURIComponent(name)}`);
    $("#ad-result").textContent = `Deleted '${name}'.`;
  } catch (e) {
    $("#ad-result").textContent = `Could not delete '${name}': ${e.message}`;
  }
  await refresh();
}
