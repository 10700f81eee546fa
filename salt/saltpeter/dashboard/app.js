// Saltpeter dashboard: plain JavaScript, no build step, nothing loaded from elsewhere.
//
// Data comes from the HTTP API (GET /config, /jobs, /runs, /runs/<id>) and live
// updates from the WebSocket /ws, subscribed to every job ("*"). Output chunks are
// queued per minion and appended as text nodes once per animation frame, so a run
// on hundreds of minions never re-renders a whole pane. The job table creates rows
// only for the jobs it shows (a filter and "Show more" bound that number) and
// updates cells in place.

const JOB_PAGE = 200; // job rows added per "Show more"
const ROWS_PER_FRAME = 100; // job rows built per animation frame
const MAX_PANE_CHARS = 200000; // output kept per minion pane; older text nodes are removed
const FINISHED_RUN_SECONDS = 60; // a finished run stays in "Runs in flight" this long
const CONFIG_POLL_MS = 5000;
const JOBS_POLL_MS = 30000;
const MANY_MINIONS = 12; // runs with more minions start with their panes folded

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// ---------------------------------------------------------------- formatting

function formatTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function formatRelative(iso) {
  if (!iso) return "";
  const seconds = Math.round((new Date(iso).getTime() - Date.now()) / 1000);
  const size = Math.abs(seconds);
  let text;
  if (size < 60) text = `${size} s`;
  else if (size < 3600) text = `${Math.round(size / 60)} min`;
  else if (size < 86400) text = `${Math.round(size / 3600)} h`;
  else text = `${Math.round(size / 86400)} d`;
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

function retcodeClass(result) {
  if (!result) return "";
  if (result.state === "maintenance") return "maint";
  if (result.retcode === null || result.retcode === undefined || result.retcode === "") {
    return "running";
  }
  return result.retcode === 0 ? "ok" : "fail";
}

function resultText(result) {
  if (result.state === "maintenance") return "maintenance";
  if (result.retcode === null || result.retcode === undefined) return result.state || "pending";
  return `${result.retcode} (${result.reason || "exit"})`;
}

// ------------------------------------------------------------------ the API

let signedOut = false;
let jobCount = 0; // from GET /config

async function api(path, options = {}) {
  const response = await fetch(path, {
    credentials: "same-origin",
    headers: options.body ? { "Content-Type": "application/json" } : {},
    ...options,
  });
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = { status: "error", message: `${response.status} ${response.statusText}` };
  }
  if (response.status === 401) {
    showLogin();
    throw new Error(body.message || "sign in needed");
  }
  return { status: response.status, ok: response.ok, body };
}

function toast(message, isError = false) {
  const node = el("div", { class: isError ? "toast error" : "toast", text: message });
  $("#toasts").append(node);
  setTimeout(() => node.remove(), isError ? 10000 : 5000);
}

async function action(path, job) {
  try {
    const { ok, body } = await api(path, { method: "POST", body: JSON.stringify({ job }) });
    toast(body.message, !ok);
    if (ok) refreshJob(job);
  } catch (error) {
    toast(String(error.message || error), true);
  }
}

// ------------------------------------------------------------ sign in and out

function showLogin() {
  signedOut = true;
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#logout").hidden = true;
  live.stop();
  $("#login-token").focus();
}

async function login(event) {
  event.preventDefault();
  const token = $("#login-token").value;
  const response = await fetch("/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
  if (response.ok) {
    $("#login-token").value = "";
    $("#login-error").textContent = "";
    start();
  } else {
    const body = await response.json().catch(() => ({}));
    $("#login-error").textContent = body.message || "sign in failed";
  }
}

async function logout() {
  await fetch("/logout", { method: "POST", credentials: "same-origin" });
  showLogin();
}

// ---------------------------------------------------------- runtime settings

async function loadConfig() {
  let config;
  try {
    const { ok, body } = await api("/config");
    if (!ok) return;
    config = body;
  } catch (error) {
    return;
  }
  const maintenance = $("#maintenance");
  const machines = config.maintenance.machines;
  if (config.maintenance.global) {
    maintenance.textContent = "maintenance: global";
  } else if (machines.length) {
    maintenance.textContent = `maintenance: ${machines.length} minion(s)`;
  } else {
    maintenance.textContent = "maintenance: off";
  }
  maintenance.title = machines.length ? `Minions under maintenance: ${machines.join(", ")}` : "";
  maintenance.classList.toggle("on", config.maintenance.global || machines.length > 0);
  maintenance.dataset.global = String(config.maintenance.global);
  maintenance.dataset.machines = machines.join(",");
  const debug = $("#debug");
  debug.textContent = `debug: ${config.debug ? "on" : "off"}`;
  debug.classList.toggle("on", config.debug);
  debug.dataset.value = String(config.debug);
  jobCount = config.jobs;
  updateRunSummary();
  $("#server-time").textContent = formatTime(config.server_time);
  $("#logout").hidden = !config.token_required;
}

// ----------------------------------------------------------------- the jobs

const jobs = new Map(); // name -> document from GET /jobs
const jobRows = new Map(); // name -> { row, cells }
let jobOrder = []; // names matching the filter, in order
let jobsShown = JOB_PAGE;
let jobRenderToken = 0;

function jobMatches(job, filter) {
  if (!filter) return true;
  const definition = job.definition;
  return [job.name, definition.targets, definition.command, definition.group]
    .some((text) => String(text || "").toLowerCase().includes(filter));
}

function resultCells(results) {
  const box = el("div", { class: "cells" });
  for (const [machine, result] of Object.entries(results || {})) {
    box.append(el("span", {
      class: `cell ${retcodeClass(result)}`,
      title: `${machine}: ${resultText(result)}`,
      "data-machine": machine,
    }));
  }
  return box;
}

function buildJobRow(name) {
  const cells = {
    name: el("td"),
    schedule: el("td"),
    next: el("td"),
    last: el("td"),
    status: el("td"),
    minions: el("td"),
    actions: el("td", { class: "actions" }),
  };
  cells.actions.append(
    el("button", { type: "button", class: "run-now", text: "Run now", onclick: () => action("/run", name) }),
    el("button", { type: "button", class: "kill", text: "Kill", onclick: () => action("/kill", name) }),
    el("button", { type: "button", class: "history", text: "History", onclick: () => showHistory(name) }),
  );
  const row = el("tr", { "data-job": name }, ...Object.values(cells));
  const entry = { row, cells, rendered: "" };
  jobRows.set(name, entry);
  fillJobRow(name);
  return entry;
}

function fillJobRow(name) {
  const entry = jobRows.get(name);
  const job = jobs.get(name);
  if (!entry || !job) return;
  // Cells change only when the document does, so a refresh that changes nothing
  // touches no DOM node.
  const key = JSON.stringify([job.next_run, job.last_run_id, job.last_status, job.last_results,
    job.running, job.schedule_text, job.definition.targets]);
  if (entry.rendered === key) {
    entry.cells.next.lastChild.textContent = formatRelative(job.next_run);
    return;
  }
  entry.rendered = key;
  const { cells } = entry;
  cells.name.replaceChildren(
    el("div", { class: "jobname", text: name }),
    el("div", { class: "sub mono", text: `${job.definition.targets} (${job.definition.target_type})` }),
  );
  cells.schedule.replaceChildren(
    el("div", { text: job.schedule_text }),
    el("div", { class: "sub mono", text: Object.values(job.definition.schedule).join(" ") }),
  );
  cells.next.replaceChildren(
    el("div", { text: formatTime(job.next_run) || "never" }),
    el("div", { class: "sub", text: formatRelative(job.next_run) }),
  );
  cells.last.replaceChildren(el("div", { text: formatTime(job.last_run) }));
  const status = job.running.length ? "running" : (job.last_status || "");
  cells.status.replaceChildren(el("span", { class: `status ${status}`, text: status || "never ran" }));
  cells.minions.replaceChildren(resultCells(job.last_results));
}

function renderJobs() {
  const filter = $("#job-filter").value.trim().toLowerCase();
  jobOrder = [...jobs.keys()].sort().filter((name) => jobMatches(jobs.get(name), filter));
  const visible = jobOrder.slice(0, jobsShown);
  const tbody = $("#jobs tbody");
  const token = ++jobRenderToken;
  tbody.replaceChildren();
  let index = 0;
  // Rows are attached in batches, one batch per frame, so that building a long
  // list does not freeze the page.
  const step = () => {
    if (token !== jobRenderToken) return;
    const fragment = document.createDocumentFragment();
    for (const end = Math.min(index + ROWS_PER_FRAME, visible.length); index < end; index++) {
      const name = visible[index];
      fragment.append((jobRows.get(name) || buildJobRow(name)).row);
    }
    tbody.append(fragment);
    if (index < visible.length) requestAnimationFrame(step);
  };
  step();
  $("#jobs-count").textContent = String(jobs.size);
  $("#jobs-more-line").hidden = jobOrder.length <= jobsShown;
  $("#jobs-shown").textContent = `${Math.min(jobsShown, jobOrder.length)} of ${jobOrder.length} shown`;
}

async function loadJobs() {
  let body;
  try {
    const response = await api("/jobs");
    if (!response.ok) return;
    body = response.body;
  } catch (error) {
    return;
  }
  const seen = new Set();
  let changedSet = false;
  for (const job of body.jobs) {
    seen.add(job.name);
    if (!jobs.has(job.name)) changedSet = true;
    jobs.set(job.name, job);
    fillJobRow(job.name);
  }
  for (const name of [...jobs.keys()]) {
    if (!seen.has(name)) {
      jobs.delete(name);
      jobRows.delete(name);
      changedSet = true;
    }
  }
  if (changedSet || !$("#jobs tbody").childElementCount) renderJobs();
}

const refreshing = new Set();

function refreshJob(name) {
  // Several events of one run arrive together; one request per job and frame is enough.
  if (refreshing.has(name)) return;
  refreshing.add(name);
  setTimeout(async () => {
    refreshing.delete(name);
    try {
      const { ok, body } = await api(`/jobs?job=${encodeURIComponent(name)}`);
      if (!ok) return;
      for (const job of body.jobs) {
        jobs.set(job.name, job);
        fillJobRow(job.name);
      }
    } catch (error) {
      // The next poll retries.
    }
  }, 250);
}

// ------------------------------------------------------------- runs in flight

const runs = new Map(); // run id -> { card, job, machines: Map(name -> pane) }
const pendingOutput = new Set(); // panes with queued chunks
let flushScheduled = false;

function createPane(runId, machine, container) {
  const status = el("span", { class: "retcode running", text: "pending" });
  const output = el("pre", { class: "output" });
  const node = el("div", { class: "machine", "data-machine": machine },
    el("div", { class: "machine-head" }, el("span", { class: "name", text: machine }), status),
    output);
  container.append(node);
  return { node, status, output, queue: [], chars: 0 };
}

function setPaneResult(pane, result) {
  pane.status.className = `retcode ${retcodeClass(result)}`;
  pane.status.textContent = resultText(result);
}

function ensureRun(job, runId, startedAt, machineNames) {
  let run = runs.get(runId);
  if (run) return run;
  const kill = el("button", { type: "button", class: "kill", text: "Kill", onclick: () => action("/kill", job) });
  const state = el("span", { class: "status running", text: "running" });
  const count = el("span", { class: "muted" });
  const panes = el("div", { class: "machines" });
  let body = panes;
  if (machineNames.length > MANY_MINIONS) {
    body = el("details", { class: "many" }, el("summary", { text: "Show every minion's output" }), panes);
  }
  const card = el("div", { class: "run-card", "data-run": runId, "data-job": job },
    el("div", { class: "run-head" },
      el("span", { class: "jobname", text: job }),
      el("span", { class: "mono muted", text: runId }),
      el("span", { class: "muted", text: `started ${formatTime(startedAt)}` }),
      count, state, el("span", { class: "spacer" }), kill),
    body);
  run = { card, job, state, count, kill, panes, machines: new Map(), done: false };
  for (const machine of machineNames) run.machines.set(machine, createPane(runId, machine, panes));
  runs.set(runId, run);
  $("#runs").prepend(card);
  updateRunCount(run);
  updateRunSummary();
  return run;
}

function paneFor(run, runId, machine) {
  let pane = run.machines.get(machine);
  if (!pane) {
    pane = createPane(runId, machine, run.panes);
    run.machines.set(machine, pane);
    updateRunCount(run);
  }
  return pane;
}

function updateRunCount(run) {
  let done = 0;
  for (const pane of run.machines.values()) {
    if (!pane.status.classList.contains("running")) done++;
  }
  run.count.textContent = `${done} of ${run.machines.size} minion(s) done`;
}

function updateRunSummary() {
  const active = [...runs.values()].filter((run) => !run.done).length;
  $("#running-count").textContent = String(active);
  $("#running-empty").hidden = runs.size > 0;
  // The WebSocket keeps this count current; GET /config is polled only every 5 s.
  $("#summary").textContent = `${jobCount} job(s), ${active} run(s) in flight`;
}

function queueOutput(pane, text) {
  pane.queue.push(text);
  pendingOutput.add(pane);
  if (!flushScheduled) {
    flushScheduled = true;
    requestAnimationFrame(flushOutput);
  }
}

function flushOutput() {
  flushScheduled = false;
  const panes = [...pendingOutput];
  pendingOutput.clear();
  // Every layout read comes before every write: a read after a write forces the
  // browser to lay the page out again, once per pane. Panes in a folded
  // <details> are not laid out, so they are not read at all.
  const follow = panes.map((pane) => {
    if (pane.node.offsetParent === null) return false;
    const output = pane.output;
    return output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
  });
  for (const pane of panes) {
    const text = pane.queue.join("");
    pane.queue = [];
    const output = pane.output;
    output.append(document.createTextNode(text));
    pane.chars += text.length;
    while (pane.chars > MAX_PANE_CHARS && output.firstChild && output.firstChild !== output.lastChild) {
      pane.chars -= output.firstChild.textContent.length;
      output.firstChild.remove();
    }
  }
  panes.forEach((pane, index) => {
    if (follow[index]) pane.output.scrollTop = pane.output.scrollHeight;
  });
}

function appendNote(pane, text) {
  pane.output.append(el("span", { class: "note", text }));
}

function onSnapshot(message) {
  const run = ensureRun(message.job, message.run_id, message.started_at, Object.keys(message.machines));
  for (const [machine, result] of Object.entries(message.machines)) {
    const pane = paneFor(run, message.run_id, machine);
    if (message.machines[machine].output_skipped) {
      appendNote(pane, `[${result.output_skipped} earlier characters: open the run's history for the full output]\n`);
    }
    if (result.output) queueOutput(pane, result.output);
    setPaneResult(pane, result);
  }
  updateRunCount(run);
}

function finishRun(runId, data) {
  const run = runs.get(runId);
  if (!run) return;
  run.done = true;
  const status = data.success ? "succeeded" : "failed";
  run.card.classList.add("done", status);
  run.state.className = `status ${status}`;
  run.state.textContent = status;
  run.kill.disabled = true;
  updateRunSummary();
  setTimeout(() => {
    run.card.remove();
    runs.delete(runId);
    updateRunSummary();
  }, FINISHED_RUN_SECONDS * 1000);
}

function onEvent(message) {
  const { tag, job, data } = message;
  const parts = tag.split("/");
  const kind = parts[parts.length - 1];
  if (parts.length === 4 && kind === "start") {
    ensureRun(job, data.run_id, new Date().toISOString(), [...data.targets, ...data.maintenance]);
    const run = runs.get(data.run_id);
    for (const machine of data.maintenance) {
      setPaneResult(paneFor(run, data.run_id, machine), { state: "maintenance" });
    }
    refreshJob(job);
  } else if (parts.length === 5 && kind === "start") {
    const run = runs.get(data.run_id);
    if (run) paneFor(run, data.run_id, data.minion).status.textContent = `running, pid ${data.pid}`;
  } else if (parts.length === 5 && kind === "complete") {
    const run = runs.get(data.run_id);
    if (run) {
      setPaneResult(paneFor(run, data.run_id, data.minion), { state: "done", ...data });
      updateRunCount(run);
    }
  } else if (parts.length === 4 && kind === "complete") {
    finishRun(data.run_id, data);
    refreshJob(job);
  } else if (parts.length === 4 && kind === "skipped") {
    refreshJob(job);
  }
}

function onOutput(message) {
  const run = runs.get(message.run_id) ||
    ensureRun(message.job, message.run_id, new Date().toISOString(), []);
  queueOutput(paneFor(run, message.run_id, message.machine), message.data);
}

function onOutputDropped(message) {
  const run = runs.get(message.run_id);
  if (!run) return;
  const pane = paneFor(run, message.run_id, message.machine);
  flushOutput();
  appendNote(pane, `\n[${message.chars} characters not shown here because the page fell behind; ` +
    "open the run's history for the full output]\n");
}

// ------------------------------------------------------------- the WebSocket

const live = {
  socket: null,
  retryMs: 1000,
  stopped: true,

  start() {
    this.stopped = false;
    this.connect();
  },

  stop() {
    this.stopped = true;
    if (this.socket) this.socket.close();
  },

  connect() {
    if (this.stopped) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/ws`);
    this.socket = socket;
    const badge = $("#connection");
    socket.onopen = () => {
      this.retryMs = 1000;
      badge.textContent = "live";
      badge.className = "badge live";
      // The snapshots sent after the subscription rebuild every run in flight.
      for (const run of runs.values()) run.card.remove();
      runs.clear();
      updateRunSummary();
      socket.send(JSON.stringify({ subscribe: "*" }));
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      switch (message.type) {
        case "snapshot": onSnapshot(message); break;
        case "event": onEvent(message); break;
        case "output": onOutput(message); break;
        case "output_dropped": onOutputDropped(message); break;
        case "error": toast(message.message, true); break;
        default: break;
      }
    };
    socket.onclose = () => {
      if (this.socket !== socket) return;
      badge.textContent = "disconnected";
      badge.className = "badge down";
      if (this.stopped) return;
      setTimeout(() => this.connect(), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, 30000);
      // A failed handshake may mean that the session ended, which GET /config shows.
      loadConfig();
    };
  },
};

// ------------------------------------------------------------------- history

async function showHistory(job) {
  const section = $("#history-section");
  section.hidden = false;
  $("#history-job").textContent = job;
  $("#run-detail").replaceChildren();
  const tbody = $("#history tbody");
  tbody.replaceChildren(el("tr", {}, el("td", { colSpan: 6, class: "muted", text: "loading" })));
  const { ok, body } = await api(`/runs?job=${encodeURIComponent(job)}&limit=50`);
  if (!ok) {
    tbody.replaceChildren(el("tr", {}, el("td", { colSpan: 6, class: "error", text: body.message })));
    return;
  }
  tbody.replaceChildren(...body.runs.map((run) => {
    const status = run.skip_reason ? `skipped: ${run.skip_reason}` : run.status;
    const row = el("tr", { "data-run": run.run_id, onclick: () => showRun(run.run_id, row) },
      el("td", { class: "mono", text: run.run_id }),
      el("td", { text: run.trigger }),
      el("td", { text: formatTime(run.started_at) }),
      el("td", { text: formatTime(run.ended_at) }),
      el("td", {}, el("span", { class: `status ${run.status}`, text: status })),
      el("td", {}, resultCells(run.results)));
    return row;
  }));
  if (!body.runs.length) {
    tbody.replaceChildren(el("tr", {}, el("td", { colSpan: 6, class: "muted", text: "No run stored." })));
  }
  section.scrollIntoView({ behavior: "smooth", block: "start" });
}

async function showRun(runId, row) {
  for (const selected of document.querySelectorAll("#history tr.selected")) selected.classList.remove("selected");
  if (row) row.classList.add("selected");
  const detail = $("#run-detail");
  const { ok, body } = await api(`/runs/${encodeURIComponent(runId)}`);
  if (!ok) {
    detail.replaceChildren(el("p", { class: "error", text: body.message }));
    return;
  }
  const panes = el("div", { class: "machines" });
  for (const [machine, result] of Object.entries(body.results)) {
    const pane = createPane(runId, machine, panes);
    setPaneResult(pane, result);
    pane.output.textContent = result.output;
  }
  detail.replaceChildren(
    el("h2", {}, "Run ", el("span", { class: "mono", text: runId }), ` (${body.status})`),
    panes,
  );
}

// ---------------------------------------------------------------------- start

let polling = null;

async function start() {
  signedOut = false;
  const { status } = await api("/config").catch(() => ({ status: 401 }));
  if (status === 401) return;
  $("#login").hidden = true;
  $("#app").hidden = false;
  await loadConfig();
  await loadJobs();
  live.start();
  if (!polling) {
    polling = [
      setInterval(() => { if (!signedOut) loadConfig(); }, CONFIG_POLL_MS),
      setInterval(() => { if (!signedOut) loadJobs(); }, JOBS_POLL_MS),
    ];
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#history-close").addEventListener("click", () => { $("#history-section").hidden = true; });
  let filterTimer = null;
  $("#job-filter").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => { jobsShown = JOB_PAGE; renderJobs(); }, 150);
  });
  $("#jobs-more").addEventListener("click", () => { jobsShown += JOB_PAGE; renderJobs(); });
  start();
});
