// Tangram dashboard, the device maps: one card per device (data-device = its worker name), its arena drawn on a
// canvas from the merged segments of /admin/pool-map, a tooltip per segment, and the retained extents' gains.
// Loaded before app.js (classic scripts share their top-level names); server data goes through textContent only.
"use strict";

const COLORS = {};  // state -> CSS colour, read from the stylesheet's variables by app.js
const devices = new Map();  // worker name -> {card, canvas, segments, capacity, ...}

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

