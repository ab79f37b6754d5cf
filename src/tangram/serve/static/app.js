// Tangram dashboard: polls /admin/pool-map once a second and draws it. No dependencies, no build step.
// The admin token comes from the URL fragment (#token=..., never sent to the server) or the login field and is
// kept in this tab's sessionStorage. Every piece of server data reaches the page through textContent only.
"use strict";

const TOKEN_KEY = "tangram-admin-token";
const POLL_MS = 1000;
const STAGES = ["queue", "schedule", "init", "load", "kv", "prefill"];
const START_TYPES = ["warm", "pool-hit", "dram", "cold"];
const COLORS = {};  // state -> CSS colour, read from the stylesheet's variables
let timer = null;
let selectedStart = null;
let lastStarts = [];
const devices = new Map();  // worker name -> {el, canvas, segments, capacity, ...}

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

// ------------------------------------------------------------------ devices

function deviceCard(dev) {
  const card = el("div", "device");
  card.dataset.device = dev.worker;
  const head = el("div", "device-head");
  const name = el("span", "device-name", dev.worker);
  const meta = el("span", "device-meta");
  const stats = el("span", "device-stats");
  head.append(name, meta, stats);
  const canvas = el("canvas", "map");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", "pool map of " + dev.worker);
  const axis = el("div", "axis");
  const axis0 = el("span", null, "0");
  const axis1 = el("span");
  axis.append(axis0, axis1);
  const foot = el("div", "device-foot");
  const instances = el("div", "instances");
  const retained = el("div", "retained-box");
  foot.append(instances, retained);
  card.append(head, canvas, axis, foot);
  const d = {card, meta, stats, canvas, axis1, instances, retained, segments: [], capacity: 1};
  canvas.addEventListener("mousemove", (ev) => hover(d, ev));
  canvas.addEventListener("mouseleave", () => { $("tip").hidden = true; });
  return d;
}

function renderDevices(list) {
  const root = $("devices");
  const nodes = new Set(list.map((d) => d.node));
  const byNode = nodes.size > 1;
  const seen = new Set();
  let groups = root.querySelectorAll(".node-group");
  const wanted = byNode ? [...nodes].sort((a, b) => a - b) : [null];
  // one group per node in Ray mode (several nodes), one plain group otherwise
  if (groups.length !== wanted.length || [...groups].some((g, i) => g.dataset.node !== String(wanted[i]))) {
    root.textContent = "";
    devices.clear();
    for (const n of wanted) {
      const g = el("div", "node-group");
      g.dataset.node = String(n);
      if (n !== null) g.append(el("div", "node-title", "node " + n));
      root.append(g);
    }
    groups = root.querySelectorAll(".node-group");
  }
  for (const dev of list) {
    seen.add(dev.worker);
    let d = devices.get(dev.worker);
    if (!d) {
      d = deviceCard(dev);
      devices.set(dev.worker, d);
      const g = byNode ? [...groups].find((x) => x.dataset.node === String(dev.node)) : groups[0];
      g.append(d.card);
    }
    updateDevice(d, dev);
  }
  for (const [name, d] of devices) {
    if (!seen.has(name)) {
      d.card.remove();
      devices.delete(name);
    }
  }
}

function updateDevice(d, dev) {
  const a = dev.arena;
  d.segments = a.segments;
  d.capacity = a.capacity;
  d.meta.textContent = dev.device + " · " + fmtBytes(a.capacity) + " · policy " + a.policy + " · " + a.tensors + " tensors";
  const weights = a.totals.active - a.kv_bytes;
  d.stats.textContent = "";
  const parts = [["active", weights, "active"], ["kv", a.kv_bytes, "KV"], ["retained", a.totals.retained, "retained"],
                 ["free", a.totals.free, "free"]];
  for (const [cls, n, label] of parts) {
    const item = el("span", "stat");
    const k = el("span", "k");
    k.style.background = COLORS[cls];
    item.append(k, el("b", null, fmtBytes(n)), " " + label);
    d.stats.append(item);
  }
  const frag = el("span", "stat");
  frag.append("fragmentation ", el("b", null, (100 * a.fragmentation).toFixed(1) + "%"));
  const big = el("span", "stat");
  big.append("largest free ", el("b", null, fmtBytes(a.largest_free)));
  d.stats.append(frag, big);
  d.axis1.textContent = fmtBytes(a.capacity);
  draw(d);

  d.instances.textContent = "";
  d.instances.append(el("span", "label", "instances"));
  if (!dev.instances.length) d.instances.append(el("span", "none", "none"));
  for (const i of dev.instances) d.instances.append(el("span", "inst", i.id + " · " + i.inflight + " in flight"));

  d.retained.textContent = "";
  d.retained.append(el("span", "label", "retained (gain)"));
  const kept = a.segments.filter((s) => s.state === "retained").sort((x, y) => y.gain - x.gain);
  if (!kept.length) {
    d.retained.append(el("span", "none", "none"));
    return;
  }
  const ul = el("ul", "retained");
  for (const s of kept.slice(0, 8)) {
    const li = el("li", "retained-extent",
                  (s.models.join(", ") || "?") + " · " + fmtBytes(s.size) + " · gain " + fmtGain(s.gain));
    li.dataset.models = s.models.join(",");
    li.title = s.tensors + " tensors at offset " + fmtBytes(s.offset) + "; retention gain = load seconds saved per second";
    ul.append(li);
  }
  if (kept.length > 8) ul.append(el("li", "more", "+" + (kept.length - 8) + " more"));
  d.retained.append(ul);
}

function draw(d) {
  const c = d.canvas;
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(c.clientWidth * dpr));
  const h = Math.max(1, Math.round(c.clientHeight * dpr));
  if (c.width !== w || c.height !== h) {
    c.width = w;
    c.height = h;
  }
  const g = c.getContext("2d");
  g.fillStyle = COLORS.free;
  g.fillRect(0, 0, w, h);
  const scale = w / d.capacity;
  let prevEnd = -1;
  let prevModels = null;
  for (const s of d.segments) {
    if (s.state === "free") {
      prevModels = null;
      continue;
    }
    const x0 = Math.floor(s.offset * scale);
    const x1 = Math.max(x0 + 1, Math.round((s.offset + s.size) * scale));
    g.fillStyle = COLORS[s.state];
    g.fillRect(x0, 0, x1 - x0, h);
    const key = s.models.join(",");
    if (prevModels !== null && prevModels !== key && prevEnd === s.offset && x1 - x0 > 2) {
      g.fillStyle = "rgba(255,255,255,0.85)";  // a boundary between two models' bytes
      g.fillRect(x0, 0, Math.max(1, dpr), h);
    }
    prevModels = key;
    prevEnd = s.offset + s.size;
    const label = s.state === "kv" ? "KV" : s.models.join(", ");
    g.font = Math.round(11 * dpr) + "px system-ui, sans-serif";
    const tw = g.measureText(label).width;
    if (label && x1 - x0 > tw + 8 * dpr) {
      g.fillStyle = "#fff";
      g.textBaseline = "middle";
      g.fillText(label, x0 + 4 * dpr, h / 2);
    }
  }
}

function segmentAt(segments, offset) {
  let lo = 0;
  let hi = segments.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const s = segments[mid];
    if (offset < s.offset) hi = mid - 1;
    else if (offset >= s.offset + s.size) lo = mid + 1;
    else return s;
  }
  return null;
}

function hover(d, ev) {
  const rect = d.canvas.getBoundingClientRect();
  const s = segmentAt(d.segments, ((ev.clientX - rect.left) / rect.width) * d.capacity);
  const tip = $("tip");
  if (!s) {
    tip.hidden = true;
    return;
  }
  tip.textContent = "";
  const title = s.state === "free" ? "free" : s.state === "kv" ? "KV cache blocks" : (s.models.join(", ") || "?");
  tip.append(el("b", null, title), el("br"));
  const what = s.state === "free" ? "" : s.state === "kv" ? s.tensors + " blocks · " : s.state + " · " + s.tensors + " tensors · ";
  tip.append(what + fmtBytes(s.size) + " at " + fmtBytes(s.offset));
  if (s.state === "retained") tip.append(el("br"), "retention gain " + fmtGain(s.gain));
  tip.hidden = false;
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 390) + "px";
  tip.style.top = ev.clientY + 16 + "px";
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
