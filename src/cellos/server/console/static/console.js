// The CellOS console. Plain JS, no dependencies. Every value is rendered as text (textContent,
// createTextNode): nothing from the server, a workload or a document ever becomes HTML.
// The token lives in sessionStorage and travels only in the Authorization header (fetch with a
// stream reader instead of EventSource, which cannot send headers).
"use strict";

const TOKEN_KEY = "cellos-token";
const PREFIX = "dev.cellos.events.cell.";
const $ = (id) => document.getElementById(id);

function el(tag, cls, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token() }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers, credentials: "omit" }));
  if (response.status === 401) { logout("The token was refused."); throw new Error("unauthorized"); }
  return response;
}

// Server-Sent Events over fetch: calls onEvent(name, data, id) for each event until the
// response ends or `signal` aborts.
async function sse(path, onEvent, signal) {
  const response = await api(path, { signal, headers: { Accept: "text/event-stream" } });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")), id);
    }
  }
}

// --- views ------------------------------------------------------------------------------

let viewAbort = null;
const VIEWS = ["login-view", "cells-view", "cell-view", "submit-view"];

function show(view) {
  for (const v of VIEWS) $(v).hidden = v !== view;
  $("nav").hidden = view === "login-view";
}

function route() {
  if (viewAbort) viewAbort.abort();
  viewAbort = new AbortController();
  if (!token()) { show("login-view"); $("token").focus(); return; }
  const hash = location.hash || "#/";
  if (hash.startsWith("#/cell/")) {
    show("cell-view");
    openCell(decodeURIComponent(hash.slice(7)), viewAbort.signal);
  } else if (hash === "#/submit") {
    show("submit-view");
  } else {
    show("cells-view");
  }
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopCells();
  $("login-error").textContent = message || "";
  route();
}

// --- cells --------------------------------------------------------------------------------

const cells = new Map(); // id -> {record, row}
let cellsAbort = null;
let updates = 0;

function duration(record) {
  if (!record.startedAt || !record.finishedAt) return "";
  const ms = Date.parse(record.finishedAt) - Date.parse(record.startedAt);
  return Number.isFinite(ms) ? (ms / 1000).toFixed(3) + " s" : "";
}

function evidenceText(evidence) {
  if (!evidence) return "no events";
  return (evidence.badges || []).join(" · ");
}

function evidenceClass(evidence) {
  if (!evidence) return "badge";
  if (evidence.problem) return "badge bad";
  if (evidence.forced) return "badge warn";
  return evidence.ok ? "badge ok" : "badge";
}

function newRow(id) {
  const row = el("tr");
  row.dataset.cellId = id;
  const link = el("a", null, id);
  link.href = "#/cell/" + encodeURIComponent(id);
  row.append(el("td", null, link));
  for (let i = 0; i < 8; i++) row.append(el("td"));
  row.cells[8].append(el("span", "badge"));
  return row;
}

function fillRow(row, r) {
  const values = [null, r.state, r.tenant, r.backend, r.startedAt, r.finishedAt,
    r.exitCode, duration(r)];
  for (let i = 1; i < values.length; i++) {
    const text = values[i] === null || values[i] === undefined ? "" : String(values[i]);
    if (row.cells[i].textContent !== text) row.cells[i].textContent = text;
  }
  row.cells[1].className = "state-" + r.state;
  const badge = row.cells[8].firstChild;
  badge.textContent = evidenceText(r.evidence);
  badge.className = evidenceClass(r.evidence);
  row.dataset.state = r.state;
  row.dataset.tenant = r.tenant;
  row.hidden = !matches(r);
}

function matches(r) {
  const state = $("filter-state").value, tenant = $("filter-tenant").value.trim();
  return (!state || r.state === state) && (!tenant || r.tenant === tenant);
}

function upsert(record) {
  let entry = cells.get(record.id);
  if (!entry) {
    entry = { record, row: newRow(record.id) };
    cells.set(record.id, entry);
    insertSorted(entry.row, record.id);
  }
  entry.record = record;
  fillRow(entry.row, record);
}

function insertSorted(row, id) {
  // Rows stay ordered by id, as the API lists them; new ids are rare next to updates.
  const body = $("cells-body");
  let lo = 0, hi = body.rows.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (body.rows[mid].dataset.cellId < id) lo = mid + 1; else hi = mid;
  }
  body.insertBefore(row, body.rows[lo] || null);
}

function status() {
  $("cells-status").textContent = cells.size + (cells.size === 1 ? " cell · " : " cells · ") + updates + " live updates";
  $("cells-table").dataset.updates = String(updates);
  $("cells-table").dataset.cells = String(cells.size);
}

function refilter() {
  for (const { record, row } of cells.values()) row.hidden = !matches(record);
}

function stopCells() { if (cellsAbort) { cellsAbort.abort(); cellsAbort = null; } }

async function followCells() {
  stopCells();
  const abort = cellsAbort = new AbortController();
  while (!abort.signal.aborted && token()) {
    try {
      await sse("/v1/console/stream", (name, data) => {
        if (name === "cellos.cells") {
          for (const record of data.items) upsert(record);
          $("cells-table").dataset.ready = "true";
        } else if (name === "cellos.cell") {
          upsert(data);
          updates++;
          if (currentCell === data.id) renderCellSummary(data);
        }
        status();
      }, abort.signal);
    } catch (err) {
      if (abort.signal.aborted) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// --- one cell -----------------------------------------------------------------------------

let currentCell = null;

function short(type) { return String(type || "").replace(PREFIX, ""); }

function keyFields(data) {
  if (!data || typeof data !== "object") return "";
  const parts = [];
  for (const [k, v] of Object.entries(data)) {
    if (k === "cellId" || v === null || v === undefined) continue;
    // Nested values (correlation, labels, limits) as JSON text, cut to stay readable.
    const text = typeof v === "object" ? JSON.stringify(v) : String(v);
    parts.push(k + "=" + (text.length > 300 ? text.slice(0, 300) + "…" : text));
  }
  return parts.join("  ");
}

function renderCellSummary(record) {
  $("cell-title").textContent = "Cell " + record.id;
  const dl = $("cell-summary");
  dl.replaceChildren();
  const rows = [["State", record.state], ["Tenant", record.tenant], ["Run", record.runId],
    ["Backend", record.backend], ["Started", record.startedAt], ["Finished", record.finishedAt],
    ["Exit code", record.exitCode], ["Duration", duration(record)], ["Reason", record.reason]];
  for (const [k, v] of rows) dl.append(el("dt", null, k), el("dd", null, v ?? ""));
  const badge = $("cell-evidence");
  badge.textContent = evidenceText(record.evidence);
  badge.className = evidenceClass(record.evidence);
  dl.dataset.state = record.state;
}

// The inner event of a signed envelope, of either format (cellos.core.envelopes.inner_event):
// "envelope" carries it as data.event, "dsse" as the base64 DSSE payload (UTF-8 JSON).
function inner(event) {
  if (!(event && event.type === "dev.cellos.events.signed_envelope.v1" && event.data)) return event || {};
  if (event.datacontenttype !== "application/vnd.dsse.envelope.v1+json") return event.data.event || {};
  try {
    const bytes = Uint8Array.from(atob(event.data.payload), (c) => c.charCodeAt(0));
    const decoded = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    return decoded && typeof decoded === "object" ? decoded : {};
  } catch {
    return {};
  }
}

const NETWORK = ["observability.v1.network_flow_decision", "observability.v1.dns_query_permitted",
  "observability.v1.dns_query_refused", "observability.v1.l7_egress_decision"];

function addEvent(item, runId) {
  const ev = inner(item.event);
  if (runId && item.runId !== runId) return;
  const data = ev.data || {};
  const type = short(item.type);
  const row = el("tr", null, el("td", null, item.runSeq ?? ""), el("td", null, item.time ?? ""),
    el("td", null, type), el("td", null, keyFields(data)));
  if (item.rejected) row.append(el("td", "error", "rejected: " + item.rejected));
  $("timeline").tBodies[0].append(row);
  if (type === "lifecycle.v1.started" && Array.isArray(data.isolation)) {
    $("isolation").replaceChildren(...data.isolation.map((x) => el("li", null, x)));
  }
  if (NETWORK.includes(type)) {
    const decision = data.decision ?? data.verdict ?? data.action ??
      (type.endsWith("refused") ? "refused" : type.endsWith("permitted") ? "permitted" : "");
    const rest = Object.assign({}, data); delete rest.decision;
    $("network").tBodies[0].append(el("tr", null, el("td", null, item.runSeq ?? ""),
      el("td", null, type.replace("observability.v1.", "")), el("td", null, decision),
      el("td", null, keyFields(rest))));
  }
  if (type === "export.v2.completed") {
    $("artifacts").tBodies[0].append(el("tr", null, el("td", null, data.name ?? ""),
      el("td", null, data.sizeBytes ?? ""), el("td", null, data.sha256 ?? ""),
      el("td", null, data.destination ?? data.path ?? "")));
  }
}

async function followLog(cellId, runId, stream, signal) {
  const pre = $("log-" + stream);
  const decoder = new TextDecoder();
  const q = "stream=" + stream + "&follow=true" + (runId ? "&run=" + encodeURIComponent(runId) : "");
  try {
    await sse("/v1/cells/" + encodeURIComponent(cellId) + "/logs?" + q, (name, data) => {
      if (name === "cellos.log") {
        const bytes = Uint8Array.from(atob(data.data), (c) => c.charCodeAt(0));
        pre.append(document.createTextNode(decoder.decode(bytes, { stream: true })));
        pre.scrollTop = pre.scrollHeight;
      } else if (name === "cellos.log.gap") {
        pre.append(el("span", "error", "\n[" + (data.to - data.from) + " bytes lost]\n"));
      } else if (name === "cellos.log.end") {
        pre.dataset.ended = "true";
      }
    }, signal);
  } catch (err) { /* aborted when leaving the view */ }
}

async function verify(cellId, runId) {
  const out = $("verify-result");
  if (!runId) { out.textContent = "no run yet"; return; }
  const response = await api("/v1/cells/" + encodeURIComponent(cellId) + "/runs/" +
    encodeURIComponent(runId) + "/verdict");
  const body = await response.json();
  out.textContent = response.ok ? body.verify + "\n" + (body.badges || []).join(" · ") : body.detail;
  out.dataset.ok = String(Boolean(body.ok));
}

async function openCell(cellId, signal) {
  currentCell = cellId;
  for (const id of ["timeline", "network", "artifacts"]) $(id).tBodies[0].replaceChildren();
  for (const id of ["isolation", "log-stdout", "log-stderr", "verify-result"]) $(id).replaceChildren();
  $("log-stdout").dataset.ended = $("log-stderr").dataset.ended = "";
  const path = "/v1/cells/" + encodeURIComponent(cellId);
  const response = await api(path);
  if (!response.ok) {
    $("cell-title").textContent = "Cell " + cellId + ": " + (await response.json()).detail;
    return;
  }
  const record = Object.assign(await response.json(), { evidence: cells.get(cellId)?.record.evidence });
  renderCellSummary(record);
  const runId = record.state === "PENDING" ? null : record.runId;
  let since = 0;
  for (;;) {
    const page = await (await api(path + "/events?limit=10000&since=" + since, { signal })).json();
    for (const item of page.items) addEvent(item, runId);
    since = page.lastSeq;
    if (!page.more) break;
  }
  followLog(cellId, runId, "stdout", signal);
  followLog(cellId, runId, "stderr", signal);
  let liveRun = runId;
  sse(path + "/events/stream?since=" + since, (name, item) => {
    if (!liveRun && item.runId) liveRun = item.runId;
    addEvent(item, liveRun);
    if (item.type === PREFIX + "compliance.v1.summary") verify(cellId, liveRun);
  }, signal).catch(() => {});
  $("verify-button").onclick = () => verify(cellId, liveRun || cells.get(cellId)?.record.runId);
}

// --- submit -------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  const text = $("document").value;
  let type = "application/yaml";
  try { JSON.parse(text); type = "application/json"; } catch (err) { /* YAML */ }
  const result = $("submit-result"), table = $("submit-errors");
  table.tBodies[0].replaceChildren();
  table.hidden = true;
  const response = await api("/v1/cells", { method: "POST", body: text, headers: { "Content-Type": type } });
  const body = await response.json();
  if (response.ok) {
    const link = el("a", null, body.id);
    link.href = "#/cell/" + encodeURIComponent(body.id);
    result.replaceChildren("Queued: ", link, " (" + body.state + ")");
    // The response says what the cell was when the server took the request; the live stream
    // may have delivered newer states (ADMITTED, RUNNING, even COMPLETED) before this line
    // runs. A row the stream already made is left to the stream, or it would go back.
    if (body.id && !cells.has(body.id)) upsert(Object.assign({ evidence: null }, body));
    return;
  }
  result.textContent = body.detail || ("HTTP " + response.status);
  for (const e of body.errors || []) {
    table.tBodies[0].append(el("tr", null, el("td", null, e.path), el("td", null, e.reason)));
  }
  table.hidden = !(body.errors || []).length;
}

// --- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const candidate = $("token").value.trim();
    const response = await fetch("/v1/cells?state=PENDING", { headers: { Authorization: "Bearer " + candidate }, credentials: "omit" });
    if (!response.ok) { $("login-error").textContent = "The token was refused."; return; }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $("token").value = "";
    $("login-error").textContent = "";
    followCells();
    route();
  });
  $("logout").addEventListener("click", () => logout(""));
  $("filter-state").addEventListener("change", refilter);
  $("filter-tenant").addEventListener("input", refilter);
  $("submit-form").addEventListener("submit", submit);
  $("document-file").addEventListener("change", async () => {
    const file = $("document-file").files[0];
    if (file) $("document").value = await file.text();
  });
  window.addEventListener("hashchange", route);
  if (token()) followCells();
  route();
});
