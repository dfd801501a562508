// playrec's operator console: polls the worker's JSON routes and draws them. No library, nothing fetched
// from another origin. Every value from the worker (ids above all: they are user data) is put into the
// page as text (textContent, attributes), never parsed as HTML.
"use strict";

const POLL_LIVE_MS = 2000;
const POLL_SLOW_MS = 5000;
const COLORS = ["#2b6cb0", "#d69e2e", "#38a169", "#e53e3e", "#805ad5", "#dd6b20", "#319795", "#b83280",
                "#718096", "#2c5282", "#975a16", "#276749"];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

// -- small helpers -------------------------------------------------------------------------------
function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function row(cells, attrs) {
  const tr = el("tr", null, attrs);
  for (const cell of cells) {
    if (cell instanceof Node) {
      const td = el("td");
      td.appendChild(cell);
      tr.appendChild(td);
    } else if (cell && typeof cell === "object") {
      tr.appendChild(el("td", cell.text, cell.attrs));
    } else {
      tr.appendChild(el("td", cell));
    }
  }
  return tr;
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...rows);
  if (!rows.length && empty) tbody.appendChild(row([{ text: empty, attrs: { colspan: columns, class: "empty" } }]));
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const d = digits === undefined ? (Math.abs(value) >= 100 || Number.isInteger(value) ? 0 : 1) : digits;
  return Number(value).toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
}

function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  const minutes = Math.round((Date.now() - t.getTime()) / 60000);
  const ago = minutes < 1 ? "just now" : minutes < 120 ? `${minutes} min ago` : `${Math.round(minutes / 60)} h ago`;
  return `${t.toISOString().slice(0, 16).replace("T", " ")} UTC (${ago})`;
}

async function getJSON(path, options) {
  let response;
  try {
    response = await fetch(path, { cache: "no-store", ...(options || {}) });
  } catch (err) {
    return { status: 0, body: { error: `the worker does not answer (${err.message})` } };
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = { error: `not JSON (${response.status})` };
  }
  return { status: response.status, body };
}

function setStatus(node, text, kind) {
  node.textContent = text || "";
  node.dataset.kind = kind || "";
}

// -- charts --------------------------------------------------------------------------------------
// series: [{name, points: [[t, value|null]]}]; draws lines on a shared time axis, y from 0 to the max.
function drawChart(node, series, unit) {
  const width = node.clientWidth || 380, height = node.clientHeight || 120;
  const left = 44, right = 8, top = 8, bottom = 18;
  node.setAttribute("viewBox", `0 0 ${width} ${height}`);
  node.replaceChildren();
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null));
  const ts = series.flatMap((s) => s.points.map((p) => p[0]));
  const t0 = Math.min(...ts), t1 = Math.max(...ts);
  const max = Math.max(0, ...all.map((p) => p[1]));
  const yMax = max > 0 ? niceCeil(max) : 1;
  const x = (t) => left + (t1 > t0 ? ((t - t0) / (t1 - t0)) * (width - left - right) : 0);
  const y = (v) => top + (1 - v / yMax) * (height - top - bottom);
  for (const frac of [0, 0.5, 1]) {
    const v = yMax * frac;
    node.appendChild(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
    node.appendChild(svg("text", { x: left - 4, y: y(v) + 3, class: "axis", "text-anchor": "end" }, fmt(v, v < 10 && v > 0 ? 1 : 0)));
  }
  if (ts.length) {
    const span = Math.round(t1 - t0);
    node.appendChild(svg("text", { x: left, y: height - 4, class: "axis" }, span > 0 ? `−${span} s` : ""));
    node.appendChild(svg("text", { x: width - right, y: height - 4, class: "axis", "text-anchor": "end" }, "now"));
  }
  series.forEach((s, i) => {
    let d = "", pen = false;
    for (const [t, v] of s.points) {
      if (v === null) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    }
    if (d) node.appendChild(svg("path", { d, class: "line", stroke: COLORS[i % COLORS.length] }));
  });
  // legend: names are data (a dead-letter kind, a partition): text nodes only
  let lx = left + 4;
  series.slice(0, 8).forEach((s, i) => {
    const last = [...s.points].reverse().find((p) => p[1] !== null);
    const label = `${s.name} ${last ? fmt(last[1]) : "–"}${unit || ""}`;
    node.appendChild(svg("text", { x: lx, y: top + 10, class: "legend", fill: COLORS[i % COLORS.length] }, label));
    lx += 12 + label.length * 6.2;
  });
  if (!series.length) node.appendChild(svg("text", { x: width / 2, y: height / 2, class: "axis", "text-anchor": "middle" }, "none yet"));
  const lastOfFirst = series.length ? [...series[0].points].reverse().find((p) => p[1] !== null) : undefined;
  node.dataset.points = String(series.length ? series[0].points.length : 0);
  node.dataset.max = String(max);
  node.dataset.last = lastOfFirst ? String(lastOfFirst[1]) : "";
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// rate of a counter between consecutive samples (null across a restart of the worker's counters)
function rates(samples, pick) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i], dt = b.t - a.t;
    const dv = (pick(b) || 0) - (pick(a) || 0);
    out.push([b.t, dt > 0 && dv >= 0 ? dv / dt : null]);
  }
  return out;
}

// mean of a histogram between consecutive samples: d(sum) / d(count), null when nothing was observed
function means(samples, sum, count, scale) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i];
    const n = b[count] - a[count];
    out.push([b.t, n > 0 ? ((b[sum] - a[sum]) / n) * scale : null]);
  }
  return out;
}

function keysOf(samples, field) {
  const keys = new Set();
  for (const s of samples) for (const k of Object.keys(s[field] || {})) keys.add(k);
  return [...keys].sort((a, b) => (Number(a) - Number(b)) || a.localeCompare(b));
}

// -- live ----------------------------------------------------------------------------------------
async function refreshLive() {
  const { status, body } = await getJSON("/console/live.json");
  const badge = $("status");
  if (status !== 200) {
    badge.textContent = body && body.error ? body.error : `error ${status}`;
    badge.dataset.kind = "bad";
    return;
  }
  badge.textContent = body.ready ? "ready" : `not ready: ${body.reason}`;
  badge.dataset.kind = body.ready ? "ok" : "warn";
  $("worker-url").textContent = body.worker;
  $("serving-version").textContent = body.version || "no model";
  $("own-partitions").textContent = body.partitions.length ? body.partitions.join(", ") : "none";
  $("updated").textContent = new Date().toLocaleTimeString("en-GB");

  const samples = body.samples;
  const last = samples[samples.length - 1];
  const events = rates(samples, (s) => s.events);
  const lastRate = events.length ? events[events.length - 1][1] : null;
  setTile("tile-events-rate", lastRate, 1);
  setTile("tile-events", last.events);
  setTile("tile-streams", last.streams);
  setTile("tile-dead-letters", Object.values(last.dead_letters).reduce((a, b) => a + b, 0));
  setTile("tile-fold-ins", last.user_fold_ins);
  setTile("tile-lag", Object.values(last.lag).reduce((a, b) => a + b, 0));
  const p95 = Math.max(...Object.entries(body.routes).filter(([r]) => r !== "console").map(([, v]) => v.p95_s || 0), 0);
  setTile("tile-p95", p95 * 1000, 1);

  drawChart($("chart-events"), [
    { name: "applied", points: events },
    { name: "streams", points: rates(samples, (s) => s.streams) },
  ], "/s");
  const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);
  drawChart($("chart-dead-letters"), [{ name: "all", points: rates(samples, (s) => sum(s.dead_letters)) },
    ...keysOf(samples, "dead_letters").map((kind) => (
      { name: kind, points: rates(samples, (s) => (s.dead_letters || {})[kind]) }))], "/s");
  drawChart($("chart-fold-ins"), [
    { name: "users", points: rates(samples, (s) => s.user_fold_ins) },
    { name: "tracks", points: rates(samples, (s) => s.track_fold_ins) },
  ], "/s");
  drawChart($("chart-fold-in-latency"), [
    { name: "fold-in", points: means(samples, "fold_in_seconds", "fold_in_runs", 1000) },
  ], " ms");
  drawChart($("chart-lag"), keysOf(samples, "lag").map((p) => (
    { name: `p${p}`, points: samples.map((s) => [s.t, p in (s.lag || {}) ? s.lag[p] : null]) })), "");
  drawChart($("chart-latency"), [
    { name: "API", points: means(samples, "request_seconds", "requests", 1000) },
  ], " ms");
}

function setTile(id, value, digits) {
  const node = $(id);
  node.textContent = fmt(value, digits);
  node.dataset.value = value === null || value === undefined ? "" : String(value);
}

// -- model ---------------------------------------------------------------------------------------
function metric(m, key, digits) {
  return m && typeof m[key] === "number" ? fmt(key === "mpr" ? 100 * m[key] : m[key], digits) + (key === "mpr" ? "%" : "") : "–";
}

function inputOf(v) {
  if (v.watermark) {
    const offsets = Object.values(v.watermark);
    const total = offsets.reduce((a, b) => a + b, 0);
    return `${v.source || "stream"}, changelog offsets Σ ${fmt(total)}`;
  }
  if (v.path) return `file ${String(v.path).split("/").pop()}`;
  return v.source || "–";
}

function gateOf(v) {
  if (!v.gate) return v.metrics ? "trained from a file (no gate)" : "–";
  return v.gate.reason || (v.gate.published ? "published" : "kept the live model");
}

async function refreshModel() {
  const { status, body } = await getJSON("/console/model.json");
  if (status !== 200) {
    $("model-note").textContent = body && body.error ? body.error : `error ${status}`;
    return;
  }
  const serving = body.versions.find((v) => v.version === body.serving);
  $("model-version").textContent = body.serving || "no model loaded";
  $("model-note").textContent = body.current && body.current !== body.serving ? `store CURRENT is ${body.current}` : `${body.versions.length} version(s) in the store`;
  if (serving) {
    $("model-trained").textContent = when(serving.created_at);
    $("model-plays").textContent = `${fmt(serving.plays)} (user, track) play counts · ${fmt(serving.users)} users × ${fmt(serving.tracks)} tracks · +${fmt(body.new_tracks)} folded-in tracks`;
    $("model-watermark").textContent = serving.watermark ? `${inputOf(serving)} over ${Object.keys(serving.watermark).length} partitions` : inputOf(serving);
    $("model-watermark").title = serving.watermark ? JSON.stringify(serving.watermark) : "";
    $("model-gate").textContent = gateOf(serving);
  }
  const rows = body.versions.map((v) => {
    const tr = row([
      v.version,
      when(v.created_at).split(" UTC")[0],
      { text: fmt(v.plays), attrs: { class: "n" } },
      { text: metric(v.metrics, "precision", 4), attrs: { class: "n" } },
      { text: metric(v.metrics, "ndcg", 4), attrs: { class: "n" } },
      { text: metric(v.metrics, "mpr", 2), attrs: { class: "n" } },
      v.error ? v.error : gateOf(v),
    ], { "data-version": v.version });
    if (v.version === body.serving) tr.classList.add("live");
    tr.title = `input: ${inputOf(v)}`;
    if (v.judged_against_metrics) {
      tr.title += `\njudged against ${v.judged_against}: NDCG@10 ${metric(v.judged_against_metrics, "ndcg", 4)}, ` +
        `P@10 ${metric(v.judged_against_metrics, "precision", 4)}, MPR ${metric(v.judged_against_metrics, "mpr", 2)}`;
    }
    return tr;
  });
  fill($("versions").tBodies[0], rows, "no model published yet", 7);
}

// -- workers -------------------------------------------------------------------------------------
async function refreshWorkers() {
  const { status, body } = await getJSON("/console/workers.json");
  if (status !== 200) {
    $("workers-note").textContent = body && body.error ? body.error : `error ${status}`;
    return;
  }
  $("workers-note").textContent = `${body.members.length} in the group · ${body.partitions} partitions of ${body.topic}` +
    (body.rebalancing ? " · rebalancing" : "") + ` · generation ${body.generation}`;
  const rows = body.members.map((m) => {
    let who;
    if (/^https?:\/\//.test(m.url) && !m.self) {
      who = el("a", m.url, { href: `${m.url.replace(/\/$/, "")}/console` });
    } else {
      who = el("span", m.self ? `${m.url} (this worker)` : m.url);
    }
    return row([who, m.partitions.length ? m.partitions.join(", ") : "none"],
      { "data-url": m.url, "data-partitions": m.partitions.join(","), class: m.self ? "live" : "" });
  });
  fill($("workers-table").tBodies[0], rows, "no assignment yet", 2);
  const lag = Object.entries(body.lag).sort((a, b) => Number(a[0]) - Number(b[0]));
  fill($("lag-table").tBodies[0], lag.map(([p, v]) => row([p, { text: fmt(v), attrs: { class: "n" } }])), "no lag measured yet", 2);
}

// -- take-downs ----------------------------------------------------------------------------------
async function refreshTakedowns() {
  const { status, body } = await getJSON("/console/takedowns.json");
  if (status !== 200) return;
  $("takedowns-note").textContent = `${fmt(body.total)} track(s)` + (body.total > body.tracks.length ? `, first ${body.tracks.length} listed` : "");
  fill($("takedowns-table").tBodies[0], body.tracks.map((t) => row([t.track, t.reason || "–"], { "data-track": t.track })),
    "no track is taken down", 2);
}

async function changeTakedown(down) {
  const track = $("takedown-track").value;
  const token = $("admin-token").value;
  const node = $("takedown-status");
  if (!track) return setStatus(node, "enter a track id", "bad");
  if (!token) return setStatus(node, "the admin token is needed to change take-downs", "bad");
  const options = {
    method: down ? "PUT" : "DELETE",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
  };
  if (down) options.body = JSON.stringify({ reason: $("takedown-reason").value });
  const { status, body } = await getJSON(`/admin/tracks/${encodeURIComponent(track)}/takedown`, options);
  if (status === 202) {
    setStatus(node, `${down ? "taken down" : "restored"}: ${track} (every worker applies it from the take-down topic)`, "ok");
    setTimeout(refreshTakedowns, 500);
  } else {
    setStatus(node, `${status}: ${body && body.error ? body.error : "failed"}`, "bad");
  }
}

// -- lookups -------------------------------------------------------------------------------------
async function lookupUser(user) {
  const node = $("user-status");
  setStatus(node, `looking up ${user}…`, "");
  const u = encodeURIComponent(user);
  const [plays, recs] = await Promise.all([getJSON(`/users/${u}/plays`), getJSON(`/users/${u}/recommendations?k=10`)]);
  if (plays.status !== 200 || recs.status !== 200) {
    const failed = plays.status !== 200 ? plays : recs;
    setStatus(node, `${failed.status}: ${failed.body && failed.body.error}`, "bad");
    return;
  }
  const counts = Object.entries(plays.body.plays).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  fill($("user-plays").tBodies[0], counts.slice(0, 50).map(([t, c]) => row([t, { text: fmt(c), attrs: { class: "n" } }], { "data-track": t })),
    "no streams counted since the model", 2);
  $("user-source").textContent = recs.body.source;
  $("user-source").dataset.kind = recs.body.source;
  const items = recs.body.items;
  const cells = items.map(() => el("span", "…"));
  fill($("user-recs").tBodies[0], items.map((item, i) => row(
    [String(i + 1), item.track, { text: fmt(item.score, 3), attrs: { class: "n" } }, cells[i]],
    { "data-track": item.track, "data-source": recs.body.source })), "no recommendation", 4);
  setStatus(node, `${counts.length} track(s) streamed since the model · ${items.length} recommendations from ` +
    `${recs.body.source} (model ${recs.body.version})`, "ok");
  await Promise.all(items.map(async (item, i) => {
    const { status, body } = await getJSON(`/users/${u}/recommendations/${encodeURIComponent(item.track)}/explanation`);
    if (status === 200) {
      cells[i].textContent = body.contributions.slice(0, 3).map((c) => `${c.track} (${fmt(c.plays)}×)`).join(", ") || "–";
      cells[i].title = body.contributions.map((c) => `${c.track}: ${fmt(c.contribution, 4)}`).join("\n");
    } else {
      cells[i].textContent = recs.body.source === "popularity" ? "popular overall" : (body && body.error) || `error ${status}`;
    }
    cells[i].dataset.done = "1";
  }));
}

async function lookupTrack(track) {
  const node = $("track-status");
  const { status, body } = await getJSON(`/tracks/${encodeURIComponent(track)}/similar?k=10`);
  if (status !== 200) {
    fill($("similar").tBodies[0], [], null, 3);
    return setStatus(node, `${status}: ${body && body.error}`, "bad");
  }
  fill($("similar").tBodies[0], body.items.map((item, i) => row([String(i + 1), item.track, { text: fmt(item.score, 3), attrs: { class: "n" } }],
    { "data-track": item.track })), "no similar track", 3);
  setStatus(node, `closest to ${track} (model ${body.version})`, "ok");
}

// -- start ---------------------------------------------------------------------------------------
function every(ms, fn) {
  const run = () => fn().catch((err) => console.warn(err)).finally(() => setTimeout(run, ms));
  run();
}

document.addEventListener("DOMContentLoaded", () => {
  $("user-form").addEventListener("submit", (e) => { e.preventDefault(); lookupUser($("user-id").value); });
  $("track-form").addEventListener("submit", (e) => { e.preventDefault(); lookupTrack($("track-id").value); });
  $("takedown-form").addEventListener("submit", (e) => { e.preventDefault(); changeTakedown(true); });
  $("restore-button").addEventListener("click", () => changeTakedown(false));
  every(POLL_LIVE_MS, refreshLive);
  every(POLL_SLOW_MS * 2, refreshModel);
  every(POLL_SLOW_MS, refreshWorkers);
  every(POLL_SLOW_MS, refreshTakedowns);
});
