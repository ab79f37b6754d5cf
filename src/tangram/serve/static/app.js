// Tangram dashboard: polls /admin/pool-map once a second and draws it. No dependencies, no build step.
// The admin token comes from the URL fragment (#token=..., never sent to the server) or the login field and is
// kept in this tab's sessionStorage. Every piece of server data reaches the page through textContent only.
"use strict";

const TOKEN_KEY = "tangram-admin-token";
const POLL_MS = 1000;
const STAGES = ["queue", "schedule", "init", "load", "kv", "prefill"];
const START_TYPES = ["warm", "pool-hit", "dram", "cold"];
let timer = null;
let selectedStart = null;
let lastStarts = [];

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtBytes(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " GB";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " MB";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " KB";
  return n + " B";
}

function fmtS(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 0) + " ms";
  return s.toFixed(2) + " s";
}

function fmtGain(g) {
  return (g !== 0 && Math.abs(g) < 1e-3 ? g.toExponential(2) : g.toPrecision(3)) + " s/s";
}

function fmtTime(unix) {
  const d = new Date(unix * 1000);
  return d.toLocaleTimeString([], {hour12: false});
}

// ------------------------------------------------------------------ token

function takeFragmentToken() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // the token leaves the address bar
  }
}

function showLogin(message) {
  clearTimeout(timer);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-msg").textContent = message || "";
  setConn("not signed in", false);
  $("token").focus();
}

function showMain() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
}

function setConn(text, ok) {
  const c = $("conn");
  c.textContent = text;
  c.classList.toggle("bad", !ok);
}

// ------------------------------------------------------------------ polling

async function poll() {
  clearTimeout(timer);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    showLogin();
    return;
  }
  try {
    const r = await fetch("/admin/pool-map", {headers: {Authorization: "Bearer " + token}, cache: "no-store"});
    if (r.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("The server refused that token.");
      return;
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    const map = await r.json();
    showMain();
    render(map);
    setConn("updated " + fmtTime(map.time), true);
  } catch (err) {
    setConn("cannot reach the server (" + err.message + "), retrying", false);
  }
  timer = setTimeout(poll, POLL_MS);
}

function render(map) {
  renderDevices(map.devices);
  renderDeployments(map.deployments);
  renderStarts(map.starts);
  renderEvents(map.events);
}

// ------------------------------------------------------------------ deployments

function renderDeployments(list) {
  const body = $("deployments").querySelector("tbody");
  body.textContent = "";
  if (!list.length) {
    const tr = el("tr");
    const td = el("td", "none", "no deployment");
    td.colSpan = 9;
    tr.append(td);
    body.append(tr);
  }
  for (const d of list) {
    const tr = el("tr");
    tr.dataset.deployment = d.name;
    const inst = d.instances + " / " + d.max_instances + (d.starting ? " (+" + d.starting + " starting)" : "");
    tr.append(el("td", null, d.name), el("td", null, inst), el("td", null, String(d.queued)),
              el("td", null, String(d.inflight)), el("td", null, d.requests_per_s.toFixed(1)));
    for (const t of START_TYPES) {
      const q = d.ttft[t];
      const td = el("td", null, q ? fmtS(q.p50_s) + " / " + fmtS(q.p95_s) : "–");
      if (q) td.title = q.count + " recent requests";
      tr.append(td);
    }
    body.append(tr);
    if (d.last_error) {
      const er = el("tr");
      const td = el("td", "err", d.name + ": " + d.last_error);
      td.colSpan = 9;
      er.append(td);
      body.append(er);
    }
  }
}

// ------------------------------------------------------------------ starts

function stageSeconds(s) {
  return {queue: s.queue_s, schedule: s.schedule_s, init: s.init_s, load: s.load_s, kv: s.kv_s, prefill: s.prefill_s};
}

function renderStarts(list) {
  lastStarts = list;
  const root = $("starts");
  root.textContent = "";
  if (!list.length) {
    root.append(el("p", "empty", "no start yet"));
    return;
  }
  const shown = list.slice(-12).reverse();  // newest first
  const totals = shown.map((s) => Object.values(stageSeconds(s)).reduce((a, b) => a + b, 0));
  const longest = Math.max(...totals, 1e-9);
  shown.forEach((s, i) => {
    const row = el("div", "start");
    row.dataset.startId = s.id;
    row.dataset.deployment = s.deployment;
    if (s.id === selectedStart) row.classList.add("selected");
    const who = el("div", "who");
    who.append(el("span", "badge " + s.start, s.start), fmtTime(s.at) + " " + s.deployment + " @ " + s.worker);
    who.title = s.id + ": " + fmtBytes(s.bytes_loaded) + " loaded, " + fmtBytes(s.bytes_reused) + " reused";
    const bar = el("div", "bar");
    const sec = stageSeconds(s);
    for (const st of STAGES) {
      if (sec[st] <= 0) continue;
      const part = el("span", "st-" + st);
      part.style.width = (100 * sec[st] / longest) + "%";
      part.title = st + " " + fmtS(sec[st]);
      bar.append(part);
    }
    const total = el("div", "total", s.ttft_s === null ? fmtS(totals[i]) + "*" : fmtS(s.ttft_s));
    total.title = s.ttft_s === null ? "no request has waited for this start yet (init + load only)" : "time to first token";
    row.append(who, bar, total);
    row.addEventListener("click", () => {
      selectedStart = s.id;
      renderStarts(lastStarts);
    });
    root.append(row);
  });
  renderDetail();
}

function renderDetail() {
  const box = $("start-detail");
  const s = lastStarts.find((x) => x.id === selectedStart);
  if (!s) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  box.textContent = "";
  box.append(el("h3", null, s.id + " on " + s.worker + " (" + s.start + " start, " + fmtTime(s.at) + ")"));
  const table = el("table");
  const rows = [["bytes loaded", fmtBytes(s.bytes_loaded)], ["bytes reused", fmtBytes(s.bytes_reused)]];
  const sec = stageSeconds(s);
  for (const st of STAGES) rows.push([st, fmtS(sec[st])]);
  rows.push(["time to first token", s.ttft_s === null ? "no request waited for it yet" : fmtS(s.ttft_s)]);
  for (const [k, v] of rows) {
    const tr = el("tr");
    tr.append(el("td", null, k), el("td", null, v));
    table.append(tr);
  }
  box.append(table);
}

// ------------------------------------------------------------------ events

function renderEvents(list) {
  const root = $("events");
  root.textContent = "";
  for (const e of list.slice(-80).reverse()) {
    const li = el("li");
    li.dataset.kind = e.kind;
    li.append(el("span", "t", fmtTime(e.at)), el("span", "kind " + e.kind, e.kind), el("span", "msg", e.message));
    root.append(li);
  }
  if (!list.length) root.append(el("li", "empty", "no event yet"));
}

// ------------------------------------------------------------------ start

function init() {
  const css = getComputedStyle(document.documentElement);
  for (const k of ["active", "kv", "retained", "free"]) COLORS[k] = css.getPropertyValue("--" + k).trim();
  takeFragmentToken();
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $("token").value = "";
    poll();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
  });
  window.addEventListener("hashchange", () => {
    takeFragmentToken();
    poll();
  });
  window.addEventListener("resize", () => { for (const d of devices.values()) draw(d); });
  poll();
}

init();
