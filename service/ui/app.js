// seeright playground: one image, up to four columns of interventions run as one batch, and where the model
// looked. Everything shown comes from the server's API; nothing is fetched from anywhere else.
"use strict";

const MAX_COLUMNS = 4;
const $ = (selector, root = document) => root.querySelector(selector);
const state = { model: null, cards: [], image: null, columns: [], jobsTimer: null, plots: {} };

// ---- API -----------------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = $("#api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function banner(message) {
  const el = $("#banner");
  el.textContent = message || "";
  el.hidden = !message;
}

// ---- start-up ------------------------------------------------------------------------------------------
async function load() {
  try {
    const models = await (await api("/v1/models")).json();
    state.model = models.data[0].id;
    $("#model").textContent = state.model;
    state.cards = (await (await api("/v1/interventions")).json()).data;
    banner("");
  } catch (error) {
    banner(error.status === 401 ? "This server needs an API key: type it above." : `Cannot reach the API: ${error.message}`);
    return false;
  }
  return true;
}

async function loadExamples() {
  const paths = await (await fetch("/ui/examples")).json();
  const box = $("#examples");
  box.replaceChildren();
  for (const path of paths) {
    const img = document.createElement("img");
    img.src = path;
    img.alt = path.split("/").pop();
    img.addEventListener("click", async () => setImage(await blobToDataURL(await (await fetch(path)).blob())));
    box.append(img);
  }
}

function blobToDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function setImage(dataURL) {
  state.image = dataURL;
  const preview = $("#preview");
  preview.src = dataURL;
  preview.hidden = false;
  $("#drop-hint").hidden = true;
  for (const column of state.columns) {
    $(".stage-image", column.el).src = dataURL;
    clearOverlay(column);
  }
}

// ---- columns -------------------------------------------------------------------------------------------
function addColumn(methods = []) {
  if (state.columns.length >= MAX_COLUMNS) return;
  const el = $("#column-template").content.firstElementChild.cloneNode(true);
  const column = { el, methods: new Set(), inputs: {}, result: null };
  state.columns.push(column);
  $("#columns").append(el);
  $(".remove", el).addEventListener("click", () => {
    state.columns = state.columns.filter((c) => c !== column);
    el.remove();
    renumber();
  });
  const box = $(".methods", el);
  for (const card of state.cards) {
    const label = document.createElement("label");
    const box_ = document.createElement("input");
    box_.type = "checkbox";
    box_.value = card.name;
    box_.disabled = card.unavailable !== null && card.unavailable !== undefined;
    label.title = box_.disabled ? card.unavailable : card.description;
    if (box_.disabled) label.classList.add("unavailable");
    box_.addEventListener("change", () => toggleMethod(column, card, box_.checked));
    label.append(box_, card.name);
    box.append(label);
    if (methods.includes(card.name) && !box_.disabled) {
      box_.checked = true;
      toggleMethod(column, card, true);
    }
  }
  if (state.image) $(".stage-image", el).src = state.image;
  renumber();
}

function renumber() {
  state.columns.forEach((column, i) => {
    const names = [...column.methods];
    $(".column-title", column.el).textContent = `${i + 1}. ${names.length ? names.join(" + ") : "plain"}`;
  });
  $("#add-column").disabled = state.columns.length >= MAX_COLUMNS;
}

function toggleMethod(column, card, on) {
  const forms = $(".forms", column.el);
  if (on) {
    column.methods.add(card.name);
    const fieldset = buildForm(card, column);
    fieldset.dataset.method = card.name;
    forms.append(fieldset);
  } else {
    column.methods.delete(card.name);
    delete column.inputs[card.name];
    const old = forms.querySelector(`fieldset[data-method="${card.name}"]`);
    if (old) old.remove();
  }
  renumber();
}

function fieldKind(schema) {
  const options = schema.anyOf ? schema.anyOf.filter((s) => s.type !== "null") : [schema];
  const main = options[0] || {};
  if (main.enum) return { kind: "enum", values: main.enum };
  return { kind: main.type || "json" };
}

// One form per method, generated from its parameter schema (GET /v1/interventions); a field left at its
// default is not sent, so the server's per-model default applies.
function buildForm(card, column) {
  const fieldset = document.createElement("fieldset");
  const legend = document.createElement("legend");
  legend.textContent = card.name;
  fieldset.append(legend);
  const inputs = {};
  for (const [name, schema] of Object.entries(card.parameters.properties || {})) {
    const { kind, values } = fieldKind(schema);
    const shown = card.defaults && name in card.defaults ? card.defaults[name] : schema.default;
    let input;
    if (kind === "enum") {
      input = document.createElement("select");
      for (const value of values) input.append(new Option(value, value, false, value === shown));
    } else if (kind === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(shown);
    } else {
      input = document.createElement("input");
      input.type = kind === "number" || kind === "integer" ? "number" : "text";
      if (kind === "number") input.step = "any";
      input.placeholder = shown === null || shown === undefined ? "default" : Array.isArray(shown) ? shown.join(",") : JSON.stringify(shown);
    }
    input.name = name;
    const initial = input.type === "checkbox" ? input.checked : input.value;
    inputs[name] = { input, kind, initial };
    const label = document.createElement("label");
    label.title = schema.description || "";
    label.append(name, input);
    fieldset.append(label);
  }
  column.inputs[card.name] = inputs;
  return fieldset;
}

function formValues(inputs) {
  const params = {};
  for (const [name, { input, kind, initial }] of Object.entries(inputs)) {
    const value = input.type === "checkbox" ? input.checked : input.value;
    if (value === initial) continue;
    if (kind === "boolean") params[name] = value;
    else if (kind === "number" || kind === "integer") params[name] = Number(value);
    else if (kind === "array") params[name] = value.split(",").map((v) => v.trim()).filter(Boolean).map((v) => (isNaN(Number(v)) ? v : Number(v)));
    else if (kind === "enum" || kind === "string") params[name] = value;
    else params[name] = JSON.parse(value);
  }
  return params;
}

// ---- running -------------------------------------------------------------------------------------------
function requestBody(column) {
  const question = $("#question").value;
  const content = state.image
    ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: question }]
    : question;
  const interventions = {};
  for (const name of column.methods) interventions[name] = formValues(column.inputs[name] || {});
  return {
    model: state.model, messages: [{ role: "user", content }], max_tokens: Number($("#max-tokens").value) || 24,
    logprobs: true, diagnostics: true, interventions,
  };
}

async function runAll() {
  const button = $("#run");
  button.disabled = true;
  try {
    await Promise.all(state.columns.map(runColumn));  // concurrent: the server batches them
  } finally {
    button.disabled = false;
  }
}

async function runColumn(column) {
  const el = column.el;
  const error = $(".column-error", el);
  error.hidden = true;
  $(".answer", el).textContent = "…";
  $(".stats", el).textContent = "";
  clearOverlay(column);
  let body;
  try {
    body = requestBody(column);
  } catch (e) {
    return showColumnError(column, `parameters: ${e.message}`);
  }
  const started = performance.now();
  try {
    const response = await (await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body) })).json();
    column.result = response.choices[0];
    renderAnswer(column, performance.now() - started, response.usage);
  } catch (e) {
    showColumnError(column, e.message);
  }
}

function showColumnError(column, message) {
  column.result = null;
  $(".answer", column.el).textContent = "";
  const error = $(".column-error", column.el);
  error.textContent = message;
  error.hidden = false;
}

function tokenColour(logprob) {
  const p = Math.exp(logprob);
  return `hsl(${Math.round(120 * p)}, 70%, 85%)`;
}

function renderAnswer(column, ms, usage) {
  const el = column.el;
  const choice = column.result;
  const answer = $(".answer", el);
  answer.replaceChildren();
  const tokens = (choice.logprobs && choice.logprobs.content) || [];
  const text = choice.message.content.trimEnd();
  tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    if (i === tokens.length - 1 && !text.endsWith(token.token.trim())) span.classList.add("special");  // end of sequence
    span.textContent = token.token;
    span.style.background = tokenColour(token.logprob);
    span.title = `p = ${Math.exp(token.logprob).toFixed(3)}`;
    span.dataset.index = i;
    span.addEventListener("mouseenter", () => showToken(column, i, span));
    answer.append(span);
  });
  if (!tokens.length) answer.textContent = choice.message.content;
  answer.dataset.text = choice.message.content;
  $(".stats", el).textContent = `${Math.round(ms)} ms · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens`;
  renderSignals(column);
  buildOverlayChoice(column);
}

// Under the answer: AGSER's score (both sub-queries, what the model answered to each and how consistent that is) and
// ViF's relay tokens (what a next agent's request passes back as interventions.vif.relay)
function renderSignals(column) {
  const d = column.result.diagnostics || {};
  const lines = [];
  if (d.agser) {
    const a = d.agser;
    const part = (name) => `${name} “${a[name + "_query"]}” → “${a[name + "_answer"]}” (ROUGE-L ${a[name + "_consistency"].toFixed(2)})`;
    lines.push(`AGSER score ${a.score.toFixed(3)} (lower: more likely hallucinated) · ${part("attentive")} · ${part("non_attentive")}`);
  }
  if (d.vif) {
    lines.push(`ViF relay tokens ${d.vif.relay.join(", ")} (${d.vif.scored ? "scored on this prompt" : "passed in"}): the next agent sends interventions.vif.relay = [${d.vif.relay.join(", ")}]`);
  }
  let box = $(".signals", column.el);
  if (!lines.length) { if (box) box.remove(); return; }
  if (!box) {
    box = document.createElement("div");
    box.className = "signals muted";
    $(".stats", column.el).after(box);
  }
  box.textContent = lines.join(" · ");
}

// ---- overlays ------------------------------------------------------------------------------------------
function overlays(column) {
  const d = (column.result && column.result.diagnostics) || {};
  const found = {};
  const maps = d.attention_map && d.attention_map.maps;
  if (maps && maps.length) found.attention = null;  // per token: drawn on hover
  const grid = d.attention_map && d.attention_map.grids ? d.attention_map.grids[0] : null;
  if (d.gift && d.gift.saliency) found.saliency = toGrid(d.gift.saliency, grid);
  if (d.carve && d.carve.mask) found.mask = d.carve.mask;
  if (d.vif && d.vif.relay && grid) {  // the relay tokens of the first image: 1 on their patches
    const cells = new Array(grid[0] * grid[1]).fill(0);
    d.vif.relay.filter((j) => j < cells.length).forEach((j) => { cells[j] = 1; });
    found.relay = toGrid(cells, grid);
  }
  return found;
}

function toGrid(flat, grid) {
  if (Array.isArray(flat[0])) return flat;
  const [rows, cols] = grid || [Math.round(Math.sqrt(flat.length)), Math.round(Math.sqrt(flat.length))];
  return Array.from({ length: rows }, (_, r) => flat.slice(r * cols, (r + 1) * cols));
}

function buildOverlayChoice(column) {
  const box = $(".overlay-choice", column.el);
  box.replaceChildren();
  const found = overlays(column);
  const names = { attention: "attention", saliency: "GIFT saliency", mask: "CARVE mask", relay: "ViF relay tokens" };
  const kinds = Object.keys(found);
  column.overlay = kinds[0] || null;
  for (const kind of kinds) {
    const label = document.createElement("label");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = `overlay-${state.columns.indexOf(column)}-${Date.now()}`;
    radio.value = kind;
    radio.checked = kind === column.overlay;
    radio.addEventListener("change", () => { column.overlay = kind; drawDefault(column); });
    label.append(radio, names[kind]);
    box.append(label);
  }
  drawDefault(column);
}

function drawDefault(column) {
  const found = overlays(column);
  if (column.overlay === "attention") {
    const maps = column.result.diagnostics.attention_map.maps;
    drawGrid(column, meanGrid(maps.map((m) => m[0])), "attention", "mean");
  } else if (column.overlay) {
    drawGrid(column, found[column.overlay], column.overlay, "");
  }
}

function showToken(column, i, span) {
  column.el.querySelectorAll(".tok.current").forEach((s) => s.classList.remove("current"));
  span.classList.add("current");
  const d = column.result && column.result.diagnostics;
  const maps = d && d.attention_map && d.attention_map.maps;
  if (!maps || !maps[i]) return;
  column.overlay = "attention";
  column.el.querySelectorAll(".overlay-choice input").forEach((r) => { r.checked = r.value === "attention"; });
  drawGrid(column, maps[i][0], "attention", String(i));
}

function meanGrid(grids) {
  const out = grids[0].map((row) => row.map(() => 0));
  for (const grid of grids) grid.forEach((row, r) => row.forEach((v, c) => { out[r][c] += v / grids.length; }));
  return out;
}

function clearOverlay(column) {
  const canvas = $(".overlay", column.el);
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  delete canvas.dataset.overlay;
  delete canvas.dataset.token;
  $(".overlay-choice", column.el).replaceChildren();
}

// A grid of values drawn over the image: min to max as transparent to opaque orange, one cell per value.
function drawGrid(column, grid, kind, token) {
  const canvas = $(".overlay", column.el);
  const rows = grid.length;
  const cols = grid[0].length;
  canvas.width = cols;
  canvas.height = rows;
  const flat = grid.flat();
  const lo = Math.min(...flat);
  const hi = Math.max(...flat);
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(cols, rows);
  flat.forEach((v, i) => {
    const t = hi > lo ? (v - lo) / (hi - lo) : 0;
    pixels.data.set([255, 90, 0, Math.round(200 * t)], 4 * i);
  });
  ctx.putImageData(pixels, 0, 0);
  canvas.dataset.overlay = kind;
  canvas.dataset.token = token;
}

// ---- evaluations ---------------------------------------------------------------------------------------
function metricsText(job) {
  const m = job.metrics || {};
  if (m.splits) {
    return Object.entries(m.splits)
      .map(([split, s]) => `${split.padEnd(11)} acc ${s.accuracy.toFixed(1)}  F1 ${s.f1.toFixed(1)}  yes ${s.yes_ratio.toFixed(1)}  (n ${s.n})`)
      .join("\n");
  }
  return Object.entries(m).filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${v.toFixed(2)}`).join("  ");
}

async function plotURL(job) {
  if (job.status !== "completed") return null;
  if (!(job.id in state.plots)) {
    state.plots[job.id] = null;
    try {
      state.plots[job.id] = URL.createObjectURL(await (await api(`/v1/evaluations/${job.id}/plot.png`)).blob());
    } catch (_) { /* no plot (matplotlib not installed): the metrics say it all */ }
  }
  return state.plots[job.id];
}

async function refreshJobs() {
  let jobs;
  try {
    jobs = (await (await api("/v1/evaluations")).json()).data;
  } catch (e) {
    $("#jobs").textContent = e.message;
    return;
  }
  const table = document.createElement("table");
  table.className = "jobs";
  table.innerHTML = "<tr><th>job</th><th>status</th><th>progress</th><th>metrics</th><th>plot</th></tr>";
  for (const job of jobs.slice().reverse()) {
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    tr.dataset.status = job.status;
    const { done, total } = job.progress;
    const pct = total ? Math.round((100 * done) / total) : 0;
    const cells = [
      `${job.benchmark} ${Object.keys(job.request.interventions).join("+") || "baseline"}<br><span class="muted">${job.id}</span>`,
      job.status + (job.error ? `<div class="error">${escapeHTML(job.error)}</div>` : ""),
      `<div class="bar"><div style="width:${pct}%"></div></div><span class="progress">${done} / ${total}</span>`,
      `<div class="metrics">${escapeHTML(metricsText(job))}</div>`,
      "",
    ];
    for (const html of cells) {
      const td = document.createElement("td");
      td.innerHTML = html;
      tr.append(td);
    }
    const url = await plotURL(job);
    if (url) {
      const img = document.createElement("img");
      img.className = "plot";
      img.src = url;
      img.alt = "report plot";
      tr.lastElementChild.append(img);
    }
    table.append(tr);
  }
  $("#jobs").replaceChildren(table);
}

function escapeHTML(text) {
  const div = document.createElement("div");
  div.textContent = text;
  return div.innerHTML;
}

async function startJob(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("#eval-error");
  error.hidden = true;
  const data = new FormData(form);
  let interventions;
  try {
    interventions = JSON.parse(data.get("interventions") || "{}");
  } catch (e) {
    error.textContent = `interventions: ${e.message}`;
    error.hidden = false;
    return;
  }
  const body = {
    benchmark: data.get("benchmark"), images: data.get("images"), split: data.getAll("split"), interventions,
    batch_size: Number(data.get("batch_size")) || 8,
  };
  if (data.get("limit")) body.limit = Number(data.get("limit"));
  try {
    await api("/v1/evaluations", { method: "POST", body: JSON.stringify(body) });
    await refreshJobs();
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
  }
}

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("#compare").hidden = name !== "compare";
  $("#evaluations").hidden = name !== "evaluations";
  clearInterval(state.jobsTimer);
  if (name === "evaluations") {
    refreshJobs();
    state.jobsTimer = setInterval(refreshJobs, 1000);
  }
}

// ---- wiring --------------------------------------------------------------------------------------------
async function start() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem("seeright-key") || "";
  key.addEventListener("change", async () => {
    sessionStorage.setItem("seeright-key", key.value);
    if (await load() && !state.columns.length) addDefaultColumns();
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) setImage(await blobToDataURL(e.dataTransfer.files[0]));
  });
  $("#file").addEventListener("change", async (e) => {
    if (e.target.files.length) setImage(await blobToDataURL(e.target.files[0]));
  });
  $("#add-column").addEventListener("click", () => addColumn());
  $("#run").addEventListener("click", runAll);
  $("#eval-form").addEventListener("submit", startJob);
  await loadExamples();
  if (await load()) addDefaultColumns();
}

function addDefaultColumns() {
  addColumn([]);
  addColumn(state.cards.some((c) => c.name === "var" && c.unavailable == null) ? ["var"] : []);
}

start();
