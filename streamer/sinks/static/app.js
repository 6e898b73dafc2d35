// streamer's page: the live feed (Server-Sent Events from /api/live), the history table
// (/api/history) and the box panel. No framework, no CDN: uPlot (vendored) draws the charts.
"use strict";

const SCORE_SPAN_S = 600;        // the chart's span, as the server keeps it
const LEVEL_FLOOR_DB = -90;      // the level meter's left end
const SPECTRO_ROWS = 600;        // columns of the spectrogram canvas (one per row sent)
const TOP_LABELS_SHOWN = 5;
const CHART_MIN_SPAN_S = 60;     // a young chart still shows a minute
const COLORS = ["#4cc9f0", "#f72585", "#ffd166", "#06d6a0", "#ff9f1c", "#b5179e", "#90be6d", "#e5e5e5"];

const streams = new Map();       // name → {el, chart, data, targets, spectro, ...}
const debug = window.streamerDebug = {frames: 0, snapshots: 0, historyLoads: 0, errors: []};
let historyRev = -1;
let historyTimer = null;

// ---------------------------------------------------------------- colour map (for the spectrogram)
const LUT = (() => {
  // a perceptual dark-blue → teal → yellow ramp (viridis' anchor points)
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const lut = new Uint8ClampedArray(256 * 4);
  for (let i = 0; i < 256; i++) {
    const x = i / 255 * (stops.length - 1), k = Math.min(Math.floor(x), stops.length - 2), f = x - k;
    for (let c = 0; c < 3; c++) lut[i * 4 + c] = stops[k][c] + (stops[k + 1][c] - stops[k][c]) * f;
    lut[i * 4 + 3] = 255;
  }
  return lut;
})();

// ---------------------------------------------------------------- helpers
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function fmtTime(t) {
  if (t == null) return "–";
  const d = new Date(t * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], {hourCycle: "h23"}) : d.toLocaleString([], {hourCycle: "h23"});
}
function fmtDur(a, b) {
  if (a == null || b == null) return "…";
  const s = Math.max(0, b - a);
  return s < 60 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}
function b64bytes(text) {
  const bin = atob(text), out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// ---------------------------------------------------------------- one stream's card
function card(name) {
  let s = streams.get(name);
  if (s) return s;
  document.getElementById("no-streams")?.remove();
  const node = document.getElementById("stream-template").content.firstElementChild.cloneNode(true);
  node.dataset.stream = name;
  node.dataset.spectroRows = "0";
  node.dataset.points = "0";
  node.querySelector(".stream-name").textContent = name;
  const list = document.getElementById("streams");
  const after = [...list.children].find(c => c.dataset.stream > name);
  list.insertBefore(node, after || null);
  const canvas = node.querySelector(".spectro");
  s = {el: node, name, chart: null, targets: [], data: null, on: [], off: [],
       canvas, ctx: canvas.getContext("2d"), image: null, bins: 0, rows: 0, points: 0};
  streams.set(name, s);
  return s;
}

function setState(s, st) {
  const badge = s.el.querySelector(".state");
  badge.textContent = st.state + (st.error ? ": " + st.error : "");
  badge.className = "badge state " + st.state;
}

function setLevel(s, db) {
  const fill = s.el.querySelector(".meter-fill"), text = s.el.querySelector(".meter-text");
  if (db == null) { fill.style.width = "0%"; text.textContent = "– dBFS"; return; }
  const f = Math.max(0, Math.min(1, (db - LEVEL_FLOOR_DB) / -LEVEL_FLOOR_DB));
  fill.style.width = (f * 100).toFixed(1) + "%";
  fill.className = "meter-fill" + (db > -6 ? " hot" : db > -20 ? " warm" : "");
  text.textContent = db.toFixed(1) + " dBFS";
}

function setTop(s, top) {
  const box = s.el.querySelector(".top");
  box.replaceChildren(...top.slice(0, TOP_LABELS_SHOWN).map(([label, p]) => {
    const bar = el("div", {class: "bar-fill"});
    bar.style.width = (Math.max(0, Math.min(1, p)) * 100).toFixed(1) + "%";
    return el("div", {class: "bar", title: `${label}: ${p.toFixed(3)}`}, bar,
              el("span", {class: "bar-label", text: label}), el("span", {class: "bar-value", text: p.toFixed(2)}));
  }));
}

const ACTIVE_SHOWN = 8;  // chips per stream; the rest are counted
function setActive(s, active) {
  const box = s.el.querySelector(".active");
  const chips = active.slice(0, ACTIVE_SHOWN).map(e => el("span", {class: "chip", title: e.labels.join(", ")},
                                            `● ${e.target} since ${fmtTime(e.start_time)} · peak ${e.peak.toFixed(2)}`));
  if (active.length > ACTIVE_SHOWN) chips.push(el("span", {class: "chip more", text: `+${active.length - ACTIVE_SHOWN} more`}));
  box.replaceChildren(...chips);
  s.el.dataset.active = String(active.length);
}

// spectrogram: an offscreen ImageData of SPECTRO_ROWS × bins, scrolled left by each new batch
function addSpectro(s, sp, replace) {
  if (!sp) return;
  const rows = b64bytes(sp.rows), n = sp.n, bins = sp.bins;
  if (!s.image || s.bins !== bins || replace) {
    s.bins = bins;
    s.canvas.width = SPECTRO_ROWS;
    s.canvas.height = bins;
    s.image = s.ctx.createImageData(SPECTRO_ROWS, bins);
    s.image.data.fill(0);
    for (let i = 3; i < s.image.data.length; i += 4) s.image.data[i] = 255;
  }
  const W = SPECTRO_ROWS, px = s.image.data, shift = Math.min(n, W);
  // scroll left by `shift` columns
  for (let y = 0; y < bins; y++) {
    const row = y * W * 4;
    px.copyWithin(row, row + shift * 4, row + W * 4);
  }
  const first = n - shift;
  for (let k = 0; k < shift; k++) {
    const x = W - shift + k, src = (first + k) * bins;
    for (let b = 0; b < bins; b++) {
      const v = rows[src + b], y = bins - 1 - b, o = (y * W + x) * 4;  // low frequencies at the bottom
      px[o] = LUT[v * 4]; px[o + 1] = LUT[v * 4 + 1]; px[o + 2] = LUT[v * 4 + 2];
    }
  }
  s.ctx.putImageData(s.image, 0, 0);
  s.rows += n;
  s.el.dataset.spectroRows = String(s.rows);
}

// score chart: one line per target, its on (dashed) and off (dotted) thresholds in the same colour
function setSeries(s, series) {
  if (!series) return;
  const same = s.chart && s.targets.join("\u0000") === series.targets.join("\u0000");
  s.targets = series.targets; s.on = series.on; s.off = series.off;
  const t = series.t.slice(), values = series.v.map(v => v.slice());
  s.data = [t, ...values];
  s.points += t.length;
  s.el.dataset.points = String(s.points);
  if (same) { s.chart.setData(s.data); return; }
  s.chart?.destroy();
  const holder = s.el.querySelector(".chart");
  holder.replaceChildren();
  const targetSeries = s.targets.map((name, i) => ({label: name, stroke: COLORS[i % COLORS.length], width: 1.5,
                                                   points: {show: false},
                                                   value: (u, v) => v == null ? "–" : v.toFixed(2)}));
  const opts = {
    width: Math.max(200, holder.clientWidth || 300), height: 170,
    // at least CHART_MIN_SPAN_S wide, so a fresh chart is not a blur of sub-second ticks
    scales: {x: {time: true, range: (u, min, max) => [Math.min(min, max - CHART_MIN_SPAN_S), max]}, y: {range: [0, 1]}},
    axes: [{stroke: "#aaa", grid: {stroke: "#333"}, ticks: {stroke: "#333"}, values: clockTicks, space: 70},
           {stroke: "#aaa", grid: {stroke: "#333"}, ticks: {stroke: "#333"}, size: 36}],
    legend: {live: false},
    cursor: {drag: {x: false, y: false}},
    series: [{}, ...targetSeries],
    hooks: {draw: [u => drawThresholds(u, s)]},
  };
  s.chart = new uPlot(opts, s.data, holder);
}

// the time axis as a clock (HH:MM, with seconds when the span is short): uPlot's default adds a date line
function clockTicks(u, splits) {
  const span = u.scales.x.max - u.scales.x.min;
  const opts = span < 180 ? {hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23"}
                           : {hour: "2-digit", minute: "2-digit", hourCycle: "h23"};
  return splits.map(v => new Date(v * 1000).toLocaleTimeString([], opts));
}

// each target's on (dashed) and off (dotted) threshold, in its colour, across the plot
function drawThresholds(u, s) {
  const ctx = u.ctx, {left, width} = u.bbox;
  ctx.save();
  ctx.lineWidth = Math.max(1, devicePixelRatio);
  // targets that share their thresholds share the lines too: drawn once, in grey
  const shared = s.on.every(v => v === s.on[0]) && s.off.every(v => v === s.off[0]);
  s.targets.forEach((_, i) => {
    if (!u.series[i + 1].show || (shared && i > 0)) return;
    ctx.strokeStyle = shared ? "#c8c8c8" : COLORS[i % COLORS.length];
    for (const [value, dash] of [[s.on[i], [6, 4]], [s.off[i], [2, 3]]]) {
      if (value == null) continue;
      const y = Math.round(u.valToPos(value, "y", true)) + 0.5;
      ctx.setLineDash(dash.map(d => d * devicePixelRatio));
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + width, y); ctx.stroke();
    }
  });
  ctx.restore();
}

function addPoints(s, pts) {
  if (!pts || !s.data) return;
  const [t, ...values] = s.data;
  pts.t.forEach((x, k) => {
    if (t.length && x <= t[t.length - 1]) {  // the server merged into its last point: replace it
      values.forEach((v, i) => { v[v.length - 1] = pts.v[k][i]; });
      return;
    }
    t.push(x);
    values.forEach((v, i) => v.push(pts.v[k][i]));
  });
  const cut = t[t.length - 1] - SCORE_SPAN_S;
  let drop = 0;
  while (drop < t.length && t[drop] < cut) drop++;
  if (drop) s.data = s.data.map(a => a.slice(drop));
  s.points += pts.t.length;
  s.el.dataset.points = String(s.points);
  s.chart?.setData(s.data);
}

const resize = new ResizeObserver(() => {
  for (const s of streams.values()) {
    if (!s.chart) continue;
    const w = s.el.querySelector(".chart").clientWidth;
    if (w && Math.abs(w - s.chart.width) > 4) s.chart.setSize({width: w, height: 170});
  }
});
resize.observe(document.getElementById("streams"));

// ---------------------------------------------------------------- the live feed
function applyStream(name, d, full) {
  const s = card(name);
  if (d.state !== undefined) setState(s, typeof d.state === "string" ? d : d.state);
  if (d.level !== undefined) setLevel(s, d.level);
  if (d.top) setTop(s, d.top);
  if (d.active) setActive(s, d.active);
  if (d.series) setSeries(s, d.series);
  if (d.points) addPoints(s, d.points);
  if (d.spectro) addSpectro(s, d.spectro, full);
}

function onSnapshot(msg) {
  debug.snapshots++;
  for (const [name, d] of Object.entries(msg.streams)) applyStream(name, d, true);
  noteHistoryRev(msg.history_rev);
}

function onDelta(msg) {
  debug.frames++;
  for (const [name, d] of Object.entries(msg.streams)) applyStream(name, d, false);
  for (const e of msg.events || []) mergeEvent(e);
  noteHistoryRev(msg.history_rev);
}

function noteHistoryRev(rev) {
  if (rev === historyRev) return;
  historyRev = rev;
  clearTimeout(historyTimer);
  historyTimer = setTimeout(loadHistory, 50);
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/api/live");
  source.addEventListener("open", () => { conn.textContent = "live"; conn.className = "badge on"; });
  source.addEventListener("error", () => { conn.textContent = "reconnecting…"; conn.className = "badge off"; });
  source.addEventListener("snapshot", e => onSnapshot(JSON.parse(e.data)));
  source.addEventListener("delta", e => onDelta(JSON.parse(e.data)));
  source.addEventListener("box", e => renderBox(JSON.parse(e.data)));
}

// ---------------------------------------------------------------- history
const filters = document.getElementById("filters");

function epoch(value) {
  if (!value) return "";
  const t = new Date(value).getTime();
  return Number.isFinite(t) ? String(t / 1000) : "";
}

function fillSelect(select, values) {
  const keep = select.value;
  const have = new Set([...select.options].map(o => o.value));
  const want = new Set(["", ...values, keep].filter(v => v !== undefined));
  if (want.size === have.size && [...want].every(v => have.has(v))) return;
  select.replaceChildren(el("option", {value: "", text: "all"}),
                         ...[...want].filter(v => v).sort().map(v => el("option", {value: v, text: v})));
  select.value = keep;
}

async function loadHistory() {
  const f = new FormData(filters);
  const q = new URLSearchParams({stream: f.get("stream") || "", target: f.get("target") || "",
                                 since: epoch(f.get("since")), until: epoch(f.get("until"))});
  let body;
  try {
    const r = await fetch("/api/history?" + q, {cache: "no-store"});
    if (!r.ok) throw new Error(`history: HTTP ${r.status}`);
    body = await r.json();
  } catch (err) {
    debug.errors.push(String(err));
    return;
  }
  debug.historyLoads++;
  fillSelect(filters.elements.stream, body.streams);
  fillSelect(filters.elements.target, body.targets);
  const tbody = document.querySelector("#history-table tbody");
  tbody.replaceChildren(...body.events.map(row));
  document.getElementById("history-empty").hidden = body.events.length > 0;
}

// a live event goes into the table at once; the refetch from the store that follows confirms it
function mergeEvent(e) {
  const f = new FormData(filters);
  const t = e.start_time ?? Date.now() / 1000;
  if ((f.get("stream") && f.get("stream") !== e.stream) || (f.get("target") && f.get("target") !== e.target)) return;
  const since = epoch(f.get("since")), until = epoch(f.get("until"));
  if ((since && t < +since) || (until && t > +until)) return;
  const tbody = document.querySelector("#history-table tbody");
  const same = [...tbody.children].find(tr => tr.dataset.id === e.id);
  const fresh = row({...e, t, end_sample: e.state === "ON" ? null : e.end_sample});
  if (e.state === "OFF" && same) same.replaceWith(fresh);
  else if (!(e.state === "ON" && same && same.dataset.open === "1")) tbody.prepend(fresh);
  document.getElementById("history-empty").hidden = true;
}

function row(e) {
  const tr = el("tr", {"data-id": e.id, "data-clip": e.clip || ""});
  const open = e.end_sample == null && e.closed_by == null;
  tr.dataset.open = open ? "1" : "0";
  const length = open ? "ongoing" : e.closed_by === "interrupted" ? "interrupted"
    : e.start_time != null && e.end_time != null ? fmtDur(e.start_time, e.end_time)
    : ((e.end_sample - e.start_sample) / 16000).toFixed(1) + " s";
  const clip = el("td");
  if (e.clip) {
    const b = el("button", {class: "play", type: "button", title: "play " + e.clip, text: "▶"});
    b.addEventListener("click", () => play(e.clip));
    clip.append(b);
  } else {
    clip.textContent = "–";
  }
  tr.append(el("td", {text: fmtTime(e.t)}), el("td", {text: e.stream}), el("td", {text: e.target, title: e.labels.join(", ")}),
            el("td", {text: length}), el("td", {text: e.peak.toFixed(2)}), clip);
  return tr;
}

function play(name) {
  const player = document.getElementById("player");
  player.hidden = false;
  player.src = "/clips/" + encodeURIComponent(name);
  player.play().catch(err => debug.errors.push("play: " + err));
}

filters.addEventListener("change", loadHistory);
filters.addEventListener("reset", () => setTimeout(loadHistory, 0));

// ---------------------------------------------------------------- the box
function kv(obj) {
  const dl = el("dl", {class: "kv"});
  for (const [k, v] of Object.entries(obj || {})) dl.append(el("dt", {text: k.replaceAll("_", " ")}), el("dd", {text: v == null ? "–" : String(v)}));
  return dl;
}

function renderBox(box) {
  const panel = document.getElementById("box-panel");
  const sources = el("table", {class: "sources"},
    el("thead", {}, el("tr", {}, ...["source", "type", "state", "level", "windows", "lost samples", "restarts"].map(h => el("th", {text: h})))),
    el("tbody", {}, ...(box.sources || []).map(s => el("tr", {},
      el("td", {text: s.name}), el("td", {text: s.type || ""}),
      el("td", {}, el("span", {class: "badge state " + s.state, text: s.state + (s.error ? ": " + s.error : "")})),
      el("td", {text: s.level == null ? "–" : s.level.toFixed(1)}), el("td", {text: s.windows ?? "–"}),
      el("td", {text: s.lost ?? "–"}), el("td", {text: s.restarts ?? "–"})))));
  panel.replaceChildren(
    el("div", {class: "panel"}, el("h3", {text: "Sources"}), el("div", {class: "table-wrap"}, sources)),
    el("div", {class: "panel"}, el("h3", {text: "MQTT"}), kv(box.mqtt)),
    el("div", {class: "panel"}, el("h3", {text: "Counters"}), kv(box.counters)),
    el("div", {class: "panel"}, el("h3", {text: "Model"}), kv(box.model)));
}

connect();
loadHistory();
