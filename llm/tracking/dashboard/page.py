"""The offline dashboard: one self-contained HTML file (inline CSS, JS and SVG; no network assets)
that compares runs from their local metrics, so it needs no W&B account.

Panels: val/loss and train/loss curves coloured by group, against step, tokens or FLOPs (a
selector); a sortable table of runs with their choices and final metrics; the scaling fit when a
fit.json exists; post-training reward panels (metrics named rewards/*, objective/*, reward*); and,
for mixture-of-experts runs, their router metrics (train/moe/aux_loss, z_loss, load_cv,
dropped_frac) and each layer's per-expert loads against the balanced 1/n_experts.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm.files import write_text
from llm.tracking.dashboard.runs import Run, expert_load_metrics, group_label, moe_metrics, varying_groups

LOSS_METRICS = ("val/loss", "train/loss")
REWARD_PREFIXES = ("rewards/", "objective/", "reward")
FINAL_COLUMNS = ("N", "D", "C", "train/loss", "val/loss", "best_val/loss", "val/ppl", "tokens_per_s", "wall_seconds")
MAX_POINTS = 1000  # per curve: a long run's every logged step would only bloat the file


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def reward_metrics(runs: list[Run]) -> list[str]:
    """Post-training metrics the runs logged, in first-seen order."""
    names = (k for r in runs for record in r.history for k in record)
    return [k for k in dict.fromkeys(names) if k.startswith(REWARD_PREFIXES)]


def curve(run: Run, metric: str) -> list[list[float]]:
    """[[step, tokens, flops, value], ...] of one metric, thinned to at most MAX_POINTS (the last kept)."""
    tokens_per_step = _number(run.summary.get("tokens_per_step"))
    flops_per_token = _number(run.summary.get("flops_per_token"))
    points = []
    for record in run.history:
        step, value = _number(record.get("step")), _number(record.get(metric))
        if step is None or value is None:
            continue
        tokens = step * tokens_per_step if tokens_per_step else _number(record.get("trainer/tokens"))
        flops = tokens * flops_per_token if tokens is not None and flops_per_token else _number(record.get("trainer/flops"))
        points.append([step, tokens, flops, value])
    points.sort(key=lambda p: p[0])
    if len(points) > MAX_POINTS:
        stride = math.ceil(len(points) / MAX_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points


def fit_panel(fit: dict, runs: list[Run]) -> dict:
    """The runs' final (C, val/loss) and the fitted laws' loss at the compute-optimal allocation."""
    from llm.scaling.fit import law_from_params
    from llm.scaling.laws import ComputeLaw, ParametricLaw

    # Log axes: a run without a positive C and loss (failed, diverged) has no point there.
    points = [[r.summary["C"], r.summary["val/loss"], r.name] for r in runs
              if (_number(r.summary.get("C")) or 0) > 0 and (_number(r.summary.get("val/loss")) or 0) > 0]
    lines, curves = [], []
    compute = [p[0] for p in points] or [1e12]
    grid = np.logspace(math.log10(min(compute) / 3), math.log10(max(compute) * 3), 60)
    for approach, result in (fit.get("approaches") or {}).items():
        values = {k: e["value"] for k, e in result.get("params", {}).items() if e.get("value") is not None}
        lines.append(f"{'Kaplan' if approach == 'kaplan' else 'Approach ' + approach}: {result.get('form', '')}; "
                     + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
        try:
            law = law_from_params(approach, values)
        except (KeyError, TypeError, ValueError):
            continue
        if isinstance(law, ComputeLaw):
            loss = law.loss(grid)
        elif isinstance(law, ParametricLaw):
            loss = law.loss(*law.optimal(grid))
        else:  # a frontier gives N_opt(C), not a loss: its parameters are listed
            continue
        keep = np.isfinite(loss)
        curves.append({"label": "Kaplan L(C)" if approach == "kaplan" else f"Approach {approach}: L(N_opt, D_opt)",
                       "points": [[float(c), float(l)] for c, l in zip(grid[keep], loss[keep])]})
    for approach, why in (fit.get("skipped") or {}).items():
        lines.append(f"{'Kaplan' if approach == 'kaplan' else 'Approach ' + approach}: skipped ({why})")
    return {"points": points, "curves": curves, "lines": lines}


def page_data(runs: list[Run], group_by: Optional[list[str]] = None, fit: Optional[dict] = None,
              title: str = "Runs") -> dict:
    """Everything the page shows, as JSON-able data (the page's script draws it)."""
    varying = varying_groups(runs)
    initial = list(group_by) if group_by else (varying or ["run"])
    options = {", ".join(initial): initial, **{g: [g] for g in varying}, "run": ["run"]}
    rewards = reward_metrics(runs)
    moe, loads = moe_metrics(runs), expert_load_metrics(runs)
    wanted = dict.fromkeys([*varying, "model", *(k.removeprefix("choice/") for k in initial)])
    choice_columns = [g for g in wanted if any(g in r.choices for r in runs)]
    config_columns = [k for k in initial if k != "run" and k.removeprefix("choice/") not in choice_columns]
    final_columns = [c for c in FINAL_COLUMNS if any(_number(r.summary.get(c)) is not None for r in runs)]
    data_runs = []
    for r in runs:
        final_rewards = {m: next((v for *_, v in reversed(curve(r, m))), None) for m in (*rewards, *moe)}
        data_runs.append({
            "id": r.run_id, "name": r.name, "status": r.status, "job_type": r.job_type,
            "labels": {option: group_label(r, keys) for option, keys in options.items()},
            "cells": {**{c: r.choices.get(c) for c in choice_columns}, **{c: r.value(c) for c in config_columns},
                      **{c: _number(r.summary.get(c)) for c in final_columns}, **final_rewards},
            "curves": {m: curve(r, m) for m in (*LOSS_METRICS, *rewards, *moe, *(n for ns in loads.values() for n in ns))},
        })
    return {
        "title": title, "generated": time.strftime("%Y-%m-%d %H:%M"), "groupOptions": list(options),
        "columns": {"choices": [*choice_columns, *config_columns], "final": [*final_columns, *rewards, *moe]},
        "lossMetrics": list(LOSS_METRICS), "rewardMetrics": rewards, "runs": data_runs,
        "moeMetrics": moe, "expertLoads": {str(layer): names for layer, names in loads.items()},
        "groups": sorted({r.group for r in runs if r.group}), "fit": fit_panel(fit, runs) if fit else None,
    }


def render_page(data: dict) -> str:
    payload = json.dumps(data, default=str).replace("</", "<\\/")  # never closes the <script>
    return TEMPLATE.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)


def write_page(runs: list[Run], out: str | Path, group_by: Optional[list[str]] = None,
               fit: Optional[dict] = None, title: str = "Runs") -> Path:
    out = Path(out)
    write_text(out, render_page(page_data(runs, group_by, fit, title)))  # whole or not at all
    return out


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 20px 0 8px; }
.meta { color: #666; margin-bottom: 10px; }
.controls label { margin-right: 18px; } select { font: inherit; }
.panels { display: flex; flex-wrap: wrap; gap: 12px; }
.panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.panel h3 { font-size: 14px; margin: 0 0 4px; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 8px 0; }
.legend span.swatch { display: inline-block; width: 14px; height: 4px; margin-right: 6px; vertical-align: middle; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \25B2"; } th.sorted-desc::after { content: " \25BC"; }
td.text, th.text { text-align: left; }
.fitlines { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; }
</style></head>
<body>
<h1 id="title"></h1>
<div class="meta" id="meta"></div>
<div class="controls">
  <label>x-axis <select id="xaxis"><option value="1">tokens</option><option value="2">FLOPs</option><option value="0">step</option></select></label>
  <label>group by <select id="groupby"></select></label>
  <label><input type="checkbox" id="logx"> log x</label>
</div>
<div class="legend" id="legend"></div>
<div class="panels" id="loss-panels"></div>
<h2 id="reward-heading" hidden>Post-training</h2>
<div class="panels" id="reward-panels"></div>
<h2 id="moe-heading" hidden>Mixture of experts</h2>
<div class="panels" id="moe-panels"></div>
<h2 id="fit-heading" hidden>Scaling fit</h2>
<div class="panels" id="fit-panel"></div>
<h2>Runs</h2>
<table id="runs-table"></table>
<script id="dashboard-data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("dashboard-data").textContent);
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
const X_NAMES = ["step", "tokens", "FLOPs"];
const SVG = "http://www.w3.org/2000/svg";
const state = { x: 1, group: DATA.groupOptions[0], logx: false, sortKey: null, sortDir: 1 };

function el(tag, attrs, parent, ns) {
  const node = ns ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  if (parent) parent.appendChild(node);
  return node;
}
function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  if (a >= 100) return Number.isInteger(v) ? String(v) : v.toFixed(1);
  return Number.isInteger(v) ? String(v) : v.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
}
function tickFmt(v) {  // axis ticks: 50k, 1.5M, 2T
  const a = Math.abs(v);
  if (a < 1e4) return fmt(v);
  const [scale, suffix] = [[1e18, "E"], [1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]].find(([s]) => a >= s);
  return `${+(v / scale).toPrecision(3)}${suffix}`;
}
function groupColors() {
  const labels = [...new Set(DATA.runs.map(r => r.labels[state.group]))];
  return new Map(labels.map((l, i) => [l, PALETTE[i % PALETTE.length]]));
}
function ticks(lo, hi, log) {
  if (log) {  // powers of ten; over a narrow range also 2x and 5x, then every digit, then linear ticks
    const e0 = Math.floor(Math.log10(lo)), e1 = Math.ceil(Math.log10(hi));
    for (const mults of [[1], [1, 2, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9]]) {
      const out = [];
      for (let e = e0; e <= e1; e++) for (const m of mults) out.push(m * Math.pow(10, e));
      const inside = out.filter(t => t >= lo * 0.999 && t <= hi * 1.001);
      if (inside.length >= 3) return inside;
    }
    return ticks(lo, hi, false);
  }
  const span = hi - lo || Math.abs(hi) || 1, raw = span / 5, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => span / s <= 6);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
  return out;
}
// One line plot: series = [{label, color, run, points: [[x, y], ...]}]
function plot(parent, title, series, xName, opts) {
  opts = opts || {};
  const W = 560, H = 320, L = 62, R = 14, T = 10, B = 38;
  const panel = el("div", { class: "panel", "data-metric": title }, parent);
  el("h3", { text: title }, panel);
  const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` }, panel, true);
  const logx = !!opts.logx, logy = !!opts.logy;
  const pts = series.flatMap(s => s.points).filter(p => (!logx || p[0] > 0) && (!logy || p[1] > 0));
  if (!pts.length) { el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", text: "no data" }, svg, true); return panel; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; if (!logy) { y0 -= pad; y1 += pad; }
  const fx = logx ? v => Math.log10(v) : v => v, fy = logy ? v => Math.log10(v) : v => v;
  const sx = v => L + (fx(v) - fx(x0)) / (fx(x1) - fx(x0)) * (W - L - R);
  const sy = v => H - B - (fy(v) - fy(y0)) / (fy(y1) - fy(y0)) * (H - T - B);
  for (const t of ticks(y0, y1, logy)) {
    el("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), stroke: "#eee" }, svg, true);
    el("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end", text: tickFmt(t) }, svg, true);
  }
  for (const t of ticks(x0, x1, logx)) {
    el("line", { x1: sx(t), x2: sx(t), y1: T, y2: H - B, stroke: "#f2f2f2" }, svg, true);
    el("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle", text: tickFmt(t) }, svg, true);
  }
  el("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#bbb" }, svg, true);
  el("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", text: xName }, svg, true);
  for (const s of series) {
    const p = s.points.filter(q => (!logx || q[0] > 0) && (!logy || q[1] > 0));
    if (!p.length) continue;
    if (s.scatter || p.length === 1) {
      for (const q of p) {
        const c = el("circle", { class: "point", cx: sx(q[0]), cy: sy(q[1]), r: 4, fill: s.color, "data-run": s.run || "" }, svg, true);
        el("title", { text: `${s.label}: ${fmt(q[1])} at ${fmt(q[0])}` }, c, true);
      }
      continue;
    }
    const d = p.map((q, i) => `${i ? "L" : "M"}${sx(q[0]).toFixed(1)},${sy(q[1]).toFixed(1)}`).join("");
    const path = el("path", { class: "curve", d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.8,
                              "stroke-dasharray": s.dash || "", "data-run": s.run || "", "data-group": s.label }, svg, true);
    el("title", { text: s.label }, path, true);
  }
  return panel;
}
function runSeries(metric) {
  const colors = groupColors();
  return DATA.runs.map(r => ({
    label: r.labels[state.group], color: colors.get(r.labels[state.group]), run: r.name,
    points: (r.curves[metric] || []).filter(p => p[state.x] !== null).map(p => [p[state.x], p[3]]),
  })).filter(s => s.points.length);
}
function drawLegend() {
  const legend = document.getElementById("legend"); legend.innerHTML = "";
  const counts = new Map();
  for (const r of DATA.runs) counts.set(r.labels[state.group], (counts.get(r.labels[state.group]) || 0) + 1);
  for (const [label, color] of groupColors()) {
    const item = el("span", { class: "legend-item", "data-group": label }, legend);
    el("span", { class: "swatch", style: `background:${color}` }, item);
    item.appendChild(document.createTextNode(`${label} (${counts.get(label)} run${counts.get(label) > 1 ? "s" : ""})`));
  }
}
function drawCurves() {
  const xName = X_NAMES[state.x];
  const panels = [["loss-panels", DATA.lossMetrics, null], ["reward-panels", DATA.rewardMetrics, "reward-heading"],
                  ["moe-panels", DATA.moeMetrics, "moe-heading"]];
  for (const [id, metrics, heading] of panels) {
    const box = document.getElementById(id); box.innerHTML = "";
    if (heading) document.getElementById(heading).hidden = !metrics.length;
    for (const m of metrics) plot(box, m, runSeries(m), xName, { logx: state.logx && state.x > 0 });
  }
  drawExpertLoads(xName);
}
// Per MoE layer: every run's load of each expert (coloured by expert, one dash pattern per run),
// and the balanced 1 / n_experts.
function drawExpertLoads(xName) {
  const box = document.getElementById("moe-panels"), layers = Object.entries(DATA.expertLoads);
  if (layers.length) document.getElementById("moe-heading").hidden = false;
  const dashes = ["", "5,3", "1,3", "8,3,1,3"];
  for (const [layer, names] of layers) {
    const series = [];
    DATA.runs.forEach((r, i) => names.forEach((m, j) => series.push({
      label: `${r.name} expert ${j}`, color: PALETTE[j % PALETTE.length], run: r.name, width: 1.2,
      dash: dashes[i % dashes.length],
      points: (r.curves[m] || []).filter(p => p[state.x] !== null).map(p => [p[state.x], p[3]]),
    })));
    const xs = series.flatMap(s => s.points.map(p => p[0]));
    if (xs.length) series.push({ label: `balanced 1/${names.length}`, color: "#333", dash: "6,4", width: 1.2,
                                 points: [[Math.min(...xs), 1 / names.length], [Math.max(...xs), 1 / names.length]] });
    plot(box, `expert loads, layer ${layer}`, series, xName, { logx: state.logx && state.x > 0 });
  }
}
function drawFit() {
  if (!DATA.fit) return;
  document.getElementById("fit-heading").hidden = false;
  const box = document.getElementById("fit-panel");
  const colors = groupColors(), byName = new Map(DATA.runs.map(r => [r.name, r]));
  const series = DATA.fit.points.map(([c, loss, name]) => {
    const label = byName.has(name) ? byName.get(name).labels[state.group] : name;
    return { label: `${name}`, color: colors.get(label) || "#555", run: name, scatter: true, points: [[c, loss]] };
  });
  DATA.fit.curves.forEach((c, i) => series.push({ label: c.label, color: "#333", dash: i ? "6,4" : "", width: 1.4, points: c.points }));
  const panel = plot(box, "final val/loss vs compute (FLOPs)", series, "training FLOPs C", { logx: true, logy: true });
  el("div", { class: "fitlines", text: DATA.fit.lines.join("\n") }, panel);
}
function drawTable() {
  const table = document.getElementById("runs-table"); table.innerHTML = "";
  // The run column is coloured by group; the choices that make the groups have their own columns.
  const cols = [["id", "run", true], ["status", "status", true],
    ...DATA.columns.choices.map(c => [c, c, true]), ...DATA.columns.final.map(c => [c, c, false])];
  const value = (r, key) => key === "id" ? r.id : key === "status" ? r.status : r.cells[key];
  const head = el("tr", {}, el("thead", {}, table));
  for (const [key, title, text] of cols) {
    const cls = (text ? "text " : "") + (state.sortKey === key ? (state.sortDir > 0 ? "sorted-asc" : "sorted-desc") : "");
    const th = el("th", { class: cls, "data-key": key, text: title }, head);
    th.onclick = () => { state.sortDir = state.sortKey === key ? -state.sortDir : 1; state.sortKey = key; drawTable(); };
  }
  const rows = [...DATA.runs];
  if (state.sortKey) rows.sort((a, b) => {
    const va = value(a, state.sortKey), vb = value(b, state.sortKey);
    if (va === vb) return 0; if (va === null || va === undefined) return 1; if (vb === null || vb === undefined) return -1;
    return (typeof va === "number" && typeof vb === "number" ? va - vb : String(va).localeCompare(String(vb))) * state.sortDir;
  });
  const body = el("tbody", {}, table), colors = groupColors();
  for (const r of rows) {
    const tr = el("tr", { "data-run": r.name }, body);
    for (const [key, , text] of cols) {
      const td = el("td", { class: (text ? "text " : "") + key.replace(/[^a-z]/gi, "-"), text: fmt(value(r, key)) }, tr);
      if (key === "id") { td.style.borderLeft = `6px solid ${colors.get(r.labels[state.group])}`; td.title = r.name; }
    }
  }
}
function draw() { drawLegend(); drawCurves(); document.getElementById("fit-panel").innerHTML = ""; drawFit(); drawTable(); }

document.getElementById("title").textContent = DATA.title;
document.getElementById("meta").textContent = `${DATA.runs.length} runs` +
  (DATA.groups.length ? ` \u00b7 experiment/sweep: ${DATA.groups.join(", ")}` : "") + ` \u00b7 generated ${DATA.generated}`;
const groupSelect = document.getElementById("groupby");
for (const option of DATA.groupOptions) el("option", { value: option, text: option }, groupSelect);
groupSelect.onchange = e => { state.group = e.target.value; draw(); };
document.getElementById("xaxis").onchange = e => { state.x = Number(e.target.value); draw(); };
document.getElementById("logx").onchange = e => { state.logx = e.target.checked; draw(); };
draw();
document.body.setAttribute("data-rendered", "true");
</script>
</body></html>
"""
