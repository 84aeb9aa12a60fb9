// The fleet dashboard: reads /v1/dashboard every REFRESH_MS and draws it. No framework,
// nothing fetched from elsewhere. Text from the fleet (device ids, labels, what a plan
// waits for) goes in through textContent and attributes only, never as markup.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
// States in the order a device passes them; the chart and tables list them so.
const STATE_ORDER = ["downloading", "downloaded", "staged", "validated", "shadowing",
  "shadow_waiting", "shadow_skipped", "shadow_passed", "waiting_window", "waiting_app",
  "deferral_expired", "activated", "committed", "rejected_in_shadow", "failed",
  "rolled_back"];

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A figure shown as text, its exact value in data-value (what tests and scripts read).
function figure(id, field, value, text) {
  return el("span", {id, class: "figure", "data-field": field,
    "data-value": value === null ? "" : value}, text);
}

function bytes(n) {  // 1,234,567 B shown as 1.2 MB (SI units, as the CLI's commas count)
  for (const [unit, size] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}

function pct(share) {
  return share === null || share === undefined ? "–" : `${+(share * 100).toFixed(1)}%`;
}

function share1(share) {  // one decimal always: 14.3%, 0.0%
  return share === null || share === undefined ? "–" : `${(share * 100).toFixed(1)}%`;
}

function ago(seconds) {
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
    if (seconds >= size) return `${Math.round(seconds / size)} ${unit} ago`;
  }
  return `${Math.max(0, Math.round(seconds))} s ago`;
}

function orderStates(states) {
  return [...states].sort((a, b) => {
    const ia = STATE_ORDER.indexOf(a), ib = STATE_ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
}

function bar(fillShare, cls, marker) {
  const outer = el("div", {class: `bar ${cls || ""}`, role: "progressbar",
    "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": Math.round(Math.min(1, fillShare) * 100)});
  const fill = el("div", {class: "fill"});
  fill.style.width = `${Math.min(1, Math.max(0, fillShare)) * 100}%`;
  outer.append(fill);
  if (marker !== undefined && marker !== null) {
    const mark = el("div", {class: "marker", title: "threshold"});
    mark.style.left = `${Math.min(1, marker) * 100}%`;
    outer.append(mark);
  }
  return outer;
}

function renderStage(r, stage) {
  const fig = r.figures;
  let fill = stage.status === "done" ? 1 : 0;
  let note = stage.status === "done" ? "done" : "not yet";
  if (stage.status === "current") {
    fill = fig && fig.known ? fig.committed / fig.known : 0;
    note = fig ? `${fig.committed} of ${fig.known} known cohort devices committed` : "";
  }
  return el("li", {class: `stage stage-${stage.status}`, "data-stage": stage.number,
      "data-fraction": stage.fraction, "data-status": stage.status},
    el("span", {class: "stage-label"}, `stage ${stage.number} · ${pct(stage.fraction)}`),
    bar(fill, `stage-bar stage-${stage.status}`),
    el("span", {class: "stage-note"}, note));
}

function renderRollout(r) {
  const id = `rollout-${r.rollout_id}`;
  const fig = r.figures || {committed: 0, failed: 0, final: 0, known: 0};
  const over = r.failure_share !== null && r.failure_share > r.failure_threshold;
  const selector = Object.entries(r.selector || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  const devices = orderStates(Object.keys(r.devices || {}))
    .map((s) => el("li", {"data-state": s, "data-count": r.devices[s]},
      el("span", {class: `dot s-${s}`}), `${s} ${r.devices[s]}`));
  return el("article", {class: `rollout state-${r.state}`, id, "data-rollout-id": r.rollout_id,
      "data-model": r.model, "data-version": r.version, "data-state": r.state},
    el("h3", null, `${r.model} ${r.version} `,
      el("span", {class: `badge badge-${r.state}`, id: `${id}-state`, "data-field": "state",
        "data-value": r.state}, r.state)),
    el("p", {class: "meta"}, `rollout ${r.rollout_id} · `,
      figure(`${id}-fraction`, "fraction", r.fraction, pct(r.fraction)), " of the fleet",
      selector ? ` matching ${selector}` : "", " · stage ",
      figure(`${id}-stage`, "stage", r.stage, String(r.stage)), " of ",
      figure(`${id}-stages`, "stages", r.stages.length, String(r.stages.length)),
      r.planned ? "" : " (promoted by hand)"),
    el("ol", {class: "stages"}, ...r.stages.map((s) => renderStage(r, s))),
    el("div", {class: `failures${over ? " over" : ""}`},
      el("p", null, "cohort: ",
        figure(`${id}-committed`, "committed", fig.committed, String(fig.committed)),
        " committed, ",
        figure(`${id}-failed`, "failed", fig.failed, String(fig.failed)), " of ",
        figure(`${id}-final`, "final", fig.final, String(fig.final)),
        " executed failed: failure share ",
        figure(`${id}-failure-share`, "failure-share", r.failure_share,
          share1(r.failure_share)),
        " against threshold ",
        figure(`${id}-failure-threshold`, "failure-threshold", r.failure_threshold,
          pct(r.failure_threshold)),
        ` (judged from ${r.min_reports} executed)`),
      bar(r.failure_share || 0, "failure-bar", r.failure_threshold)),
    r.waits_for ? el("p", {class: "waits", id: `${id}-waits-for`, "data-field": "waits-for"},
      r.waits_for) : null,
    renderShadow(id, r.shadow),
    renderTravel(id, r),
    el("ul", {class: "device-states legend"}, ...devices));
}

// How the release travelled: bytes as deltas and as full files, devices waiting for a
// window or their app, engines prebuilt or built (fleet status prints the same).
function renderTravel(id, r) {
  const d = r.downloads, w = r.waiting, e = r.engines;
  if (!d || !w || !e) return null;
  const n = (field, value) => figure(`${id}-${field}`, field, value, String(value));
  const b = (field, value) => figure(`${id}-${field}`, field, value, bytes(value));
  return el("p", {class: "travel", id: `${id}-travel`},
    "downloads: ", n("delta-devices", d.delta.devices), " as deltas (",
    b("delta-bytes", d.delta.bytes), "), ", n("full-devices", d.full.devices),
    " as full files (", b("full-bytes", d.full.bytes), "); ", b("sent-bytes", d.bytes),
    " sent, ", b("saved-bytes", d.saved_bytes), " saved · waiting for a window ",
    n("waiting-window", w.window), ", for their app ", n("waiting-app", w.app),
    " · engines ", n("engines-prebuilt", e.prebuilt), " prebuilt, ",
    n("engines-built", e.built), " built");
}

// A rollout with a shadow phase: how its devices' shadows ended and how far the candidate
// disagreed with the live version (updater/shadow.py; fleet status prints the same).
function renderShadow(id, sh) {
  if (!sh) return null;
  const n = (field, value) => figure(`${id}-shadow-${field}`, `shadow-${field}`, value,
    String(value));
  return el("p", {class: "shadow", id: `${id}-shadow`},
    "shadow phase: ", n("devices", sh.devices), " devices (", n("passed", sh.passed),
    " passed, ", n("rejected", sh.rejected), " rejected, ", n("waiting", sh.waiting),
    " waiting), ", n("requests", sh.requests), " requests compared, disagreement ",
    figure(`${id}-shadow-disagreement`, "shadow-disagreement", sh.disagreement,
      share1(sh.disagreement)),
    " (worst device ",
    figure(`${id}-shadow-worst`, "shadow-worst", sh.worst_disagreement,
      share1(sh.worst_disagreement)), ")");
}

function renderRollouts(data) {
  const list = document.getElementById("rollout-list");
  const cards = data.rollouts.map(renderRollout);
  list.replaceChildren(...(cards.length ? cards : [el("p", {class: "note"}, "no rollouts")]));
  const unrolled = data.unrolled.map((u) => `${u.model} ${u.version}`).join(", ");
  document.getElementById("unrolled").textContent =
    unrolled ? `published, not rolled out: ${unrolled}` : "";
}

function renderVersions(data) {
  const states = orderStates(new Set(data.versions.flatMap((v) => Object.keys(v.states))));
  const table = document.getElementById("version-table");
  table.tHead.replaceChildren(el("tr", null, el("th", null, "model"), el("th", null, "version"),
    ...states.map((s) => el("th", {"data-state": s}, s)), el("th", null, "devices")));
  table.tBodies[0].replaceChildren(...data.versions.map((v) => el("tr",
    {"data-model": v.model, "data-version": v.version},
    el("td", null, v.model), el("td", null, v.version),
    ...states.map((s) => el("td", {"data-state": s, "data-value": v.states[s] || 0},
      v.states[s] || "")),
    el("td", {"data-field": "devices", "data-value": v.devices}, v.devices))));
}

function renderChart(data) {
  const c = data.reports_per_minute;
  const states = orderStates(Object.keys(c.by_state));
  const totals = Array.from({length: c.minutes},
    (_, i) => states.reduce((n, s) => n + c.by_state[s][i], 0));
  const top = Math.max(1, ...totals);
  const W = 720, H = 180, left = 36, bottom = 20, plotH = H - bottom - 6;
  const step = (W - left) / c.minutes;
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": `reports per minute by state, last ${c.minutes} minutes`,
    "data-total": c.total, "data-start": c.start});
  const base = H - bottom;
  svg.append(el("svg:line", {x1: left, y1: base, x2: W, y2: base, class: "axis"}),
    el("svg:text", {x: left - 4, y: base - plotH + 10, class: "tick", "text-anchor": "end"}, top),
    el("svg:text", {x: left - 4, y: base, class: "tick", "text-anchor": "end"}, 0),
    el("svg:text", {x: left, y: H - 4, class: "tick"}, `−${c.minutes} min`),
    el("svg:text", {x: W, y: H - 4, class: "tick", "text-anchor": "end"}, "now"));
  const stacked = new Array(c.minutes).fill(0);
  for (const s of states) {
    const series = c.by_state[s];
    const g = el("svg:g", {class: `series s-${s}`, "data-state": s,
      "data-total": series.reduce((a, b) => a + b, 0)});
    series.forEach((n, i) => {
      if (!n) return;
      const h = (n / top) * plotH, y = base - (stacked[i] / top) * plotH - h;
      stacked[i] += n;
      const rect = el("svg:rect", {x: (left + i * step + 0.5).toFixed(1), y: y.toFixed(1),
        width: Math.max(1, step - 1).toFixed(1), height: h.toFixed(1), "data-minute": i,
        "data-count": n});
      rect.append(el("svg:title", null, `${s}: ${n}`));
      g.append(rect);
    });
    svg.append(g);
  }
  document.getElementById("chart").replaceChildren(svg);
  document.getElementById("chart-legend").replaceChildren(...states.map((s) =>
    el("li", {"data-state": s, "data-total": c.by_state[s].reduce((a, b) => a + b, 0)},
      el("span", {class: `dot s-${s}`}), `${s} ${c.by_state[s].reduce((a, b) => a + b, 0)}`)),
  el("li", {"data-state": "all", "data-total": c.total}, `all ${c.total}`));
}

function renderStale(data) {
  const s = data.stale;
  const minutes = s.after_s / 60;
  const mins = document.getElementById("stale-minutes");
  mins.textContent = +minutes.toFixed(1);
  mins.dataset.value = s.after_s;
  const summary = document.getElementById("stale-summary");
  summary.replaceChildren(figure("stale-count", "stale-count", s.count, String(s.count)),
    ` of ${s.devices} devices not heard from for ${+minutes.toFixed(1)} minutes or more`,
    s.count > s.listed.length ? ` (the ${s.listed.length} longest silent listed)` : "");
  const rows = s.listed.map((d) => el("tr", {"data-device-id": d.device_id},
    el("td", null, d.device_id),
    el("td", null, Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "–"),
    el("td", null, `${d.model} ${d.version} ${d.state}`),
    el("td", {"data-value": d.last_seen}, ago(data.generated_at - d.last_seen))));
  document.getElementById("stale-table").tBodies[0].replaceChildren(...rows);
}

function render(data) {
  renderRollouts(data);
  renderVersions(data);
  renderChart(data);
  renderStale(data);
  const updated = document.getElementById("updated");
  updated.dataset.state = "ok";
  updated.dataset.generatedAt = data.generated_at;
  updated.textContent = `updated ${new Date(data.generated_at * 1000).toLocaleTimeString()}`;
}

async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const resp = await fetch("/v1/dashboard", {cache: "no-store"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
  } catch (err) {
    // Keep the last figures on screen; say they are old.
    updated.dataset.state = "error";
    updated.textContent = `can't reach the fleet server (${err.message}); retrying`;
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
