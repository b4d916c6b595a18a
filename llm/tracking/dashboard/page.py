"""The offline dashboard: one self-contained HTML file (inline CSS, JS and SVG; no network assets)
that compares runs from their local metrics, so it needs no W&B account.

Sections: one per metric family, found from the names the runs logged (the prefix before the first
`/`, or the first two parts of a deeper name: `eval/<task>`, `val/loss`, `data/epochs`; `train/moe/*`
is MoE's), so a new family shows up without code here. A panel per metric; where the runs of
several stages logged one (SFT's and DPO's train/loss), a panel per stage, so no two objectives share
an axis. Curves coloured by group (what varied: swept keys and differing choices), against step,
tokens or FLOPs, with hover values, smoothing and a shared zoom; per-expert loads of MoE layers
against the balanced 1/n_experts; a sortable table of runs; a config diff of the ticked runs; and
the scaling fit, drawn over the runs of the sweep it was fitted to only.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm.files import write_text
from llm.tracking.dashboard.runs import (EXPERT_LOAD, Run, expert_load_metrics, format_value, group_label,
                                         moe_metrics, varying_keys)

log = logging.getLogger(__name__)

LOSS_METRICS = ("val/loss", "train/loss")
REWARD_PREFIXES = ("rewards/", "objective/", "reward")
FINAL_COLUMNS = ("N", "D", "C", "train/loss", "val/loss", "best_val/loss", "val/ppl", "tokens_per_s", "wall_seconds")
MAX_POINTS = 1000  # per curve: a long run's every logged step would only bloat the file
AXES = ("step", "epoch", "trainer/tokens", "trainer/flops", "trainer/global_step")  # x-axes, not panels
# Families first in this order (the losses on top), then any other in first-logged order.
FAMILY_ORDER = ("val", "train", "eval", "rewards", "objective", "logps", "logits", "trainer", "perf", "guard", "moe",
                "data")
STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "distill")  # a pipeline's order
FAMILY_TITLES = {"val": "Validation", "train": "Training", "trainer": "Learning rate and trainer", "perf": "Throughput",
                 "guard": "Loss guard events", "rewards": "Rewards", "objective": "Objective",
                 "moe": "Mixture of experts", "eval": "Evaluation"}


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def reward_metrics(runs: list[Run]) -> list[str]:
    """Post-training metrics the runs logged, in first-seen order."""
    names = (k for r in runs for record in r.history for k in record)
    return [k for k in dict.fromkeys(names) if k.startswith(REWARD_PREFIXES)]


def metric_family(name: str) -> str:
    """train/loss -> train; eval/hellaswag/acc -> eval/hellaswag; val/loss/code -> val/loss;
    train/moe/aux_loss -> moe; a name without a prefix -> other."""
    parts = name.split("/")
    if name.startswith("train/moe/"):
        return "moe"
    if len(parts) == 1:
        return "other"
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def _family_rank(family: str) -> tuple[int, str]:
    base = family.split("/")[0]
    return (FAMILY_ORDER.index(base) if base in FAMILY_ORDER else len(FAMILY_ORDER), family if "/" in family else "")


def sections(runs: list[Run]) -> list[dict]:
    """[{family, title, panels: [{metric, stage, title}]}]: a panel per logged metric, and per stage
    where runs of several stages logged it. The curves of local runs only (a W&B run has no history)."""
    stages_of: dict[str, dict[str, None]] = {}  # metric -> the stages that logged a number of it, first seen first
    for r in runs:
        for record in r.history:
            for name, value in record.items():
                if name not in AXES and _number(value) is not None and r.job_type not in stages_of.get(name, {}):
                    stages_of.setdefault(name, {})[r.job_type] = None
    families: dict[str, list[dict]] = {}
    for name, logged_by in stages_of.items():
        if EXPERT_LOAD.match(name):  # drawn per layer, all experts on one axis
            continue
        stages = sorted(logged_by, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
        for stage in (stages if len(stages) > 1 else [None]):
            families.setdefault(metric_family(name), []).append(
                {"metric": name, "stage": stage, "title": f"{name} ({stage})" if stage else name})
    ordered = sorted(families, key=lambda f: (_family_rank(f), list(families).index(f)))
    return [{"family": f, "title": _family_title(f), "panels": families[f]} for f in ordered]


def _family_title(family: str) -> str:
    """'Evaluation: hellaswag' for eval/hellaswag; 'Training' for train; unknown families as named."""
    base, _, sub = family.partition("/")
    title = FAMILY_TITLES.get(base, base)
    return f"{title}: {sub}" if sub else title


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


def fit_members(fit: dict, runs: list[Run], fit_path: Optional[Path] = None) -> list[Run]:
    """The shown runs that the fit was made from: the run ids fit.json lists (`llm-scaling fit`
    writes them); for an older fit.json, the runs below its sources or below the sweep it sits in
    (`<sweep>/scaling/fit.json`)."""
    ids = fit.get("run_ids")
    if isinstance(ids, list):
        wanted = {str(i) for i in ids}
        return [r for r in runs if r.run_id in wanted]
    roots = []
    for source in fit.get("sources") or []:
        if isinstance(source, str) and not source.startswith("wandb:") and not source.endswith(".csv"):
            path = Path(source)
            roots += [path] if path.is_absolute() else [Path.cwd() / path] + (
                [fit_path.parent.parent / path, fit_path.parent.parent.parent / path] if fit_path else [])
    if fit_path is not None:
        roots.append(fit_path.parent.parent)
    roots = [r.resolve() for r in roots if r.is_dir()]
    return [r for r in runs if r.run_dir is not None and any(r.run_dir.resolve().is_relative_to(root) for root in roots)]


def fit_panel(fit: dict, runs: list[Run], fit_path: Optional[Path] = None) -> Optional[dict]:
    """The fit's runs' final (C, val/loss) and the fitted laws' loss at the compute-optimal
    allocation, over the compute range of those runs only; None when none of them is shown."""
    from llm.scaling.fit import law_from_params
    from llm.scaling.laws import ComputeLaw, ParametricLaw

    members = fit_members(fit, runs, fit_path)
    if not members:
        return None
    # Log axes: a run without a positive C and loss (failed, diverged) has no point there.
    points = [[r.summary["C"], r.summary["val/loss"], r.name] for r in members
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
    sweeps = sorted({r.group for r in members if r.group})
    return {"points": points, "curves": curves, "lines": lines, "runs": [r.run_id for r in members],
            "of": f"{len(members)} run(s)" + (f" of {', '.join(sweeps)}" if sweeps else "")}


def _compact(value: Any) -> Any:
    """Config values as the diff shows them: numbers as labels format them, lists as text."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return format_value(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def page_data(runs: list[Run], group_by: Optional[list[str]] = None, fit: Optional[dict] = None,
              title: str = "Runs", fit_path: Optional[Path] = None) -> dict:
    """Everything the page shows, as JSON-able data (the page's script draws it)."""
    varying = varying_keys(runs)
    initial = list(group_by) if group_by else (varying or ["run"])
    options = {", ".join(initial): initial, **{g: [g] for g in varying}, "run": ["run"]}
    rewards = reward_metrics(runs)
    moe, loads = moe_metrics(runs), expert_load_metrics(runs)
    panels = sections(runs)
    metrics = list(dict.fromkeys([*LOSS_METRICS, *(p["metric"] for s in panels for p in s["panels"]),
                                  *(n for ns in loads.values() for n in ns)]))
    wanted = dict.fromkeys([*(k.removeprefix("choice/") for k in initial if k != "run"), *varying, "model"])
    key_columns = [k for k in wanted if any(r.value(k) is not None for r in runs)]  # choices and config keys
    final_columns = [c for c in FINAL_COLUMNS if any(_number(r.summary.get(c)) is not None for r in runs)]
    fit_data = fit_panel(fit, runs, fit_path) if fit else None
    if fit and fit_data is None:
        log.warning("scaling fit: none of the shown runs is one it was fitted to; not drawn (give --fit the fit of "
                    "these runs)")
    data_runs = []
    for r in runs:
        final_rewards = {m: next((v for *_, v in reversed(curve(r, m))), None) for m in (*rewards, *moe)}
        data_runs.append({
            "id": r.run_id, "name": r.name, "status": r.status, "job_type": r.job_type, "group": r.group,
            "labels": {option: group_label(r, keys) for option, keys in options.items()},
            "cells": {**{c: _compact(r.value(c)) for c in key_columns},
                      **{c: _number(r.summary.get(c)) for c in final_columns}, **final_rewards},
            "config": {**{f"choice/{g}": c for g, c in r.choices.items()},
                       **{k: _compact(v) for k, v in r.config.items() if not k.startswith("paths.")}},
            "curves": {m: curve(r, m) for m in metrics},
        })
    return {
        "title": title, "generated": time.strftime("%Y-%m-%d %H:%M"), "groupOptions": list(options),
        "varying": varying,
        "columns": {"choices": key_columns, "final": [*final_columns, *rewards, *moe]},
        "lossMetrics": list(LOSS_METRICS), "rewardMetrics": rewards, "sections": panels, "runs": data_runs,
        "moeMetrics": moe, "expertLoads": {str(layer): names for layer, names in loads.items()},
        "groups": sorted({r.group for r in runs if r.group}), "fit": fit_data,
    }


def render_page(data: dict) -> str:
    payload = json.dumps(data, default=str).replace("</", "<\\/")  # never closes the <script>
    return TEMPLATE.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)


def write_page(runs: list[Run], out: str | Path, group_by: Optional[list[str]] = None,
               fit: Optional[dict] = None, title: str = "Runs", fit_path: Optional[Path] = None) -> Path:
    out = Path(out)
    write_text(out, render_page(page_data(runs, group_by, fit, title, fit_path)))  # whole or not at all
    return out


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: #666; margin-bottom: 10px; }
.controls { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: center; position: sticky; top: 0;
            background: #fafafa; padding: 6px 0; z-index: 2; border-bottom: 1px solid #eee; }
select, button { font: inherit; } input[type=range] { vertical-align: middle; width: 120px; }
.panels { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 440px), 1fr)); gap: 12px; }
.panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; min-width: 0; position: relative; }
#fit-panel .panel { max-width: 900px; }
.panel h3 { font-size: 14px; margin: 0 0 4px; font-weight: 600; }
.panel svg { display: block; width: 100%; cursor: crosshair; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 8px 0; }
.legend span.swatch { display: inline-block; width: 14px; height: 4px; margin-right: 6px; vertical-align: middle; }
.panel-legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; margin-top: 4px; }
.panel-legend svg { width: 26px; height: 10px; vertical-align: middle; margin-right: 4px; display: inline; }
#tooltip { position: fixed; pointer-events: none; background: rgba(255,255,255,0.96); border: 1px solid #bbb;
           border-radius: 4px; padding: 4px 8px; font-size: 12px; display: none; z-index: 10; max-width: 420px; }
#tooltip .row { white-space: nowrap; } #tooltip .sw { display: inline-block; width: 10px; height: 10px; margin-right: 5px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \25B2"; } th.sorted-desc::after { content: " \25BC"; }
td.text, th.text { text-align: left; }
.scroll { overflow-x: auto; max-width: 100%; }
.fitlines { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; }
.note { color: #666; font-size: 13px; }
</style></head>
<body>
<h1 id="title"></h1>
<div class="meta" id="meta"></div>
<div class="controls">
  <label>x-axis <select id="xaxis"><option value="1">tokens</option><option value="2">FLOPs</option><option value="0">step</option></select></label>
  <label>group by <select id="groupby"></select></label>
  <label><input type="checkbox" id="logx"> log x</label>
  <label>smoothing <input type="range" id="smooth" min="0" max="0.99" step="0.01" value="0"> <span id="smooth-value">0</span></label>
  <button id="reset-zoom" hidden>reset zoom</button>
  <span class="note">drag across a plot to zoom, double-click to reset</span>
</div>
<div class="legend" id="legend"></div>
<h2 id="fit-heading" hidden>Scaling fit</h2>
<div class="panels" id="fit-panel"></div>
<div id="sections"></div>
<h2>Runs</h2>
<div class="scroll"><table id="runs-table"></table></div>
<h2>Config diff of the ticked runs</h2>
<div class="scroll" id="config-diff"></div>
<div id="tooltip"></div>
<script id="dashboard-data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("dashboard-data").textContent);
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
const X_NAMES = ["step", "tokens", "FLOPs"];
const SVG = "http://www.w3.org/2000/svg";
const state = { x: 1, group: DATA.groupOptions[0], logx: false, smooth: 0, xrange: null, sortKey: null, sortDir: 1,
                selected: new Set(DATA.runs.map(r => r.id)) };
const tooltip = document.getElementById("tooltip");

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
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2).replace("e+", "e");
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
  // Up to 10 groups: the categorical palette; more (a 6 x 3 sweep): hues spread evenly.
  return new Map(labels.map((l, i) => [l, labels.length <= PALETTE.length ? PALETTE[i]
                                              : `hsl(${Math.round(i * 330 / labels.length)}, 70%, 42%)`]));
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
// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0.
function smoothed(points, w) {
  if (!w) return points;
  let last = 0;
  return points.map(([x, y], i) => { last = last * w + (1 - w) * y; return [x, last / (1 - Math.pow(w, i + 1))]; });
}
function nearest(points, x) {  // the point of a curve (sorted by x) nearest to x
  let lo = 0, hi = points.length - 1;
  while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (points[mid][0] < x) lo = mid; else hi = mid; }
  return Math.abs(points[lo][0] - x) <= Math.abs(points[hi][0] - x) ? points[lo] : points[hi];
}
// One line plot. series = [{label, color, run, points: [[x, y], ...], scatter, dash, width, legend}];
// opts: logx, logy, zoom (the shared x range applies), smooth (curves are smoothed), legend (a legend below).
function plot(parent, title, series, xName, opts) {
  opts = opts || {};
  // A panel made beforehand (drawCurves lays out a section's panels first, so each is measured at its final width).
  const panel = parent.classList.contains("panel") ? parent : el("div", { class: "panel" }, parent);
  panel.setAttribute("data-metric", title);
  el("h3", { text: title }, panel);
  const W = Math.max(320, Math.round(panel.clientWidth - 16) || 560), H = 280, L = 62, R = 14, T = 10, B = 38;
  const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` }, panel, true);
  const logx = !!opts.logx, logy = !!opts.logy, range = opts.zoom ? state.xrange : null;
  const shown = q => (!logx || q[0] > 0) && (!logy || q[1] > 0) && (!range || (q[0] >= range[0] && q[0] <= range[1]));
  series = series.map(s => {
    const raw = s.points.filter(shown);
    return { ...s, raw, points: opts.smooth && !s.scatter ? smoothed(raw, state.smooth) : raw };
  });
  const pts = series.flatMap(s => s.points);
  if (!pts.length) { el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", text: "no data" }, svg, true); return panel; }
  let [x0, x1] = range ? [...range] : [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x0 === x1) { x0 = logx ? x0 / 2 : x0 - 1; x1 = logx ? x1 * 2 : x1 + 1; }
  if (y0 === y1) { y0 = logy ? y0 / 1.5 : y0 - 0.5; y1 = logy ? y1 * 1.5 : y1 + 0.5; }
  const pad = (y1 - y0) * 0.05; if (!logy) { y0 -= pad; y1 += pad; }
  const fx = logx ? v => Math.log10(v) : v => v, fy = logy ? v => Math.log10(v) : v => v;
  const sx = v => L + (fx(v) - fx(x0)) / (fx(x1) - fx(x0)) * (W - L - R);
  const sy = v => H - B - (fy(v) - fy(y0)) / (fy(y1) - fy(y0)) * (H - T - B);
  const xAt = px => { const f = fx(x0) + (px - L) / (W - L - R) * (fx(x1) - fx(x0)); return logx ? Math.pow(10, f) : f; };
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
  const line = p => p.map((q, i) => `${i ? "L" : "M"}${sx(q[0]).toFixed(1)},${sy(q[1]).toFixed(1)}`).join("");
  for (const s of series) {
    if (!s.points.length) continue;
    if (s.scatter || s.points.length === 1) {
      for (const q of s.points) {
        const c = el("circle", { class: "point", cx: sx(q[0]), cy: sy(q[1]), r: 4, fill: s.color, "data-run": s.run || "" }, svg, true);
        el("title", { text: `${s.label}: ${fmt(q[1])} at ${fmt(q[0])}` }, c, true);
      }
      continue;
    }
    if (opts.smooth && state.smooth > 0)  // the raw curve stays visible, faintly
      el("path", { class: "raw", d: line(s.raw), fill: "none", stroke: s.color, "stroke-width": 1, opacity: 0.25 }, svg, true);
    const path = el("path", { class: "curve", d: line(s.points), fill: "none", stroke: s.color, "stroke-width": s.width || 1.8,
                              "stroke-dasharray": s.dash || "", "data-run": s.run || "", "data-group": s.label }, svg, true);
    el("title", { text: s.label }, path, true);
  }
  // Hover: every curve's value nearest the pointer; drag: zoom the x range of all panels.
  const cursor = el("line", { y1: T, y2: H - B, stroke: "#888", "stroke-dasharray": "3,3", visibility: "hidden" }, svg, true);
  const band = el("rect", { y: T, height: H - T - B, fill: "#1f77b4", opacity: 0.12, visibility: "hidden" }, svg, true);
  const zone = el("rect", { class: "hover-zone", x: L, y: T, width: W - L - R, height: H - T - B, fill: "transparent" }, svg, true);
  let dragFrom = null;
  const local = e => { const b = svg.getBoundingClientRect(); return (e.clientX - b.left) * W / b.width; };
  zone.addEventListener("mousemove", e => {
    const px = local(e), x = xAt(px);
    cursor.setAttribute("x1", px); cursor.setAttribute("x2", px); cursor.setAttribute("visibility", "visible");
    if (dragFrom !== null) {
      band.setAttribute("x", Math.min(dragFrom, px)); band.setAttribute("width", Math.abs(px - dragFrom));
      band.setAttribute("visibility", "visible");
    }
    const rows = series.filter(s => s.points.length && !s.noHover).map(s => [s, nearest(s.points, x)])
      .filter(([, q]) => Math.abs(sx(q[0]) - px) < Math.max(40, (W - L - R) / 8))  // not a curve that ended long before.sort((a, b) => b[1][1] - a[1][1]).slice(0, 24);
    tooltip.innerHTML = "";
    el("div", { text: `${xName} ${fmt(rows.length ? rows[0][1][0] : x)}`, style: "color:#666" }, tooltip);
    for (const [s, q] of rows) {
      const row = el("div", { class: "row" }, tooltip);
      el("span", { class: "sw", style: `background:${s.color}` }, row);
      row.appendChild(document.createTextNode(`${fmt(q[1])}  ${s.label}${s.run && s.run !== s.label ? " \u00b7 " + s.run.split(" ")[0] : ""}`));
    }
    tooltip.style.display = "block";
    tooltip.style.left = `${Math.min(e.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8)}px`;
    tooltip.style.top = `${e.clientY + 14}px`;
  });
  zone.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); tooltip.style.display = "none"; });
  if (opts.zoom) {
    zone.addEventListener("mousedown", e => { dragFrom = local(e); e.preventDefault(); });
    zone.addEventListener("mouseup", e => {
      const px = local(e), from = dragFrom; dragFrom = null; band.setAttribute("visibility", "hidden");
      if (from === null || Math.abs(px - from) < 5) return;
      state.xrange = [xAt(Math.min(from, px)), xAt(Math.max(from, px))]; tooltip.style.display = "none"; drawCurves();
    });
    zone.addEventListener("dblclick", () => { state.xrange = null; drawCurves(); });
  }
  if (opts.legend) {
    const legend = el("div", { class: "panel-legend" }, panel);
    for (const s of series.filter(s => s.legend)) {
      const item = el("span", { class: "legend-entry", text: "" }, legend);
      const sw = el("svg", { viewBox: "0 0 26 10" }, item, true);
      if (s.scatter) el("circle", { cx: 13, cy: 5, r: 4, fill: s.color }, sw, true);
      else el("line", { x1: 0, x2: 26, y1: 5, y2: 5, stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash || "" }, sw, true);
      item.appendChild(document.createTextNode(s.legend));
    }
  }
  return panel;
}
function runSeries(metric, stage) {
  const colors = groupColors();
  return DATA.runs.filter(r => !stage || r.job_type === stage).map(r => ({
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
  const xName = X_NAMES[state.x], root = document.getElementById("sections");
  root.innerHTML = "";
  document.getElementById("reset-zoom").hidden = !state.xrange;
  const opts = { logx: state.logx && state.x > 0, zoom: true, smooth: true };
  const boxes = {};
  for (const section of DATA.sections) {
    el("h2", { class: "section", "data-family": section.family, text: section.title }, root);
    const box = boxes[section.family] = el("div", { class: "panels", "data-family": section.family }, root);
    const slots = section.panels.map(p => el("div", { class: "panel", "data-metric": p.title }, box));
    section.panels.forEach((p, i) => {
      if (p.stage) slots[i].setAttribute("data-stage", p.stage);
      plot(slots[i], p.title, runSeries(p.metric, p.stage), xName, opts);
    });
  }
  if (Object.keys(DATA.expertLoads).length && !boxes.moe) {
    el("h2", { class: "section", "data-family": "moe", text: "Mixture of experts" }, root);
    boxes.moe = el("div", { class: "panels", "data-family": "moe" }, root);
  }
  drawExpertLoads(boxes.moe, xName, opts);
}
// Per MoE layer: every run's load of each expert (coloured by expert, one dash pattern per run),
// and the balanced 1 / n_experts.
function drawExpertLoads(box, xName, opts) {
  const dashes = ["", "5,3", "1,3", "8,3,1,3"], layers = Object.entries(DATA.expertLoads);
  const slots = layers.map(([layer]) => el("div", { class: "panel", "data-metric": `expert loads, layer ${layer}` }, box));
  for (const [k, [layer, names]] of layers.entries()) {
    const series = [];
    DATA.runs.forEach((r, i) => names.forEach((m, j) => series.push({
      label: `expert ${j}`, color: PALETTE[j % PALETTE.length], run: r.name, width: 1.2,
      dash: dashes[i % dashes.length],
      points: (r.curves[m] || []).filter(p => p[state.x] !== null).map(p => [p[state.x], p[3]]),
    })));
    const xs = series.flatMap(s => s.points.map(p => p[0]));
    if (xs.length) series.push({ label: `balanced 1/${names.length}`, color: "#333", dash: "6,4", width: 1.2, noHover: true,
                                 points: [[Math.min(...xs), 1 / names.length], [Math.max(...xs), 1 / names.length]] });
    plot(slots[k], `expert loads, layer ${layer}`, series, xName, { ...opts, smooth: false });
  }
}
// The scaling fit over the runs it was fitted to (and only those), with a legend.
function drawFit() {
  const box = document.getElementById("fit-panel"); box.innerHTML = "";
  if (!DATA.fit) return;
  document.getElementById("fit-heading").hidden = false;
  const colors = groupColors(), byName = new Map(DATA.runs.map(r => [r.name, r]));
  const series = DATA.fit.points.map(([c, loss, name]) => {
    const label = byName.has(name) ? byName.get(name).labels[state.group] : name;
    return { label, color: colors.get(label) || "#555", run: name, scatter: true, points: [[c, loss]] };
  });
  if (series.length) series.push({ label: "", color: "#777", scatter: true, points: [], legend: `final val/loss: the ${DATA.fit.of} fitted` });
  DATA.fit.curves.forEach((c, i) => series.push({ label: c.label, color: "#333", dash: i ? "6,4" : "", width: 1.4,
                                                  points: c.points, legend: `fit: ${c.label}` }));
  const panel = plot(box, `final val/loss vs compute: the fit of ${DATA.fit.of}`, series, "training FLOPs C",
                     { logx: true, logy: true, legend: true });
  el("div", { class: "fitlines", text: DATA.fit.lines.join("\n") }, panel);
}
function drawTable() {
  const table = document.getElementById("runs-table"); table.innerHTML = "";
  // The run column is coloured by group; the keys that make the groups have their own columns.
  const cols = [["id", "run", true], ["status", "status", true], ["job_type", "stage", true],
    ...DATA.columns.choices.map(c => [c, c, true]), ...DATA.columns.final.map(c => [c, c, false])];
  const value = (r, key) => key === "id" ? r.id : key === "status" ? r.status : key === "job_type" ? r.job_type : r.cells[key];
  const head = el("tr", {}, el("thead", {}, table));
  const all = el("input", { type: "checkbox", title: "tick all (config diff)" }, el("th", { class: "text" }, head));
  all.checked = state.selected.size === DATA.runs.length;
  all.onchange = () => { state.selected = new Set(all.checked ? DATA.runs.map(r => r.id) : []); drawTable(); drawDiff(); };
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
    const box = el("input", { type: "checkbox", class: "pick", "data-id": r.id }, el("td", { class: "text" }, tr));
    box.checked = state.selected.has(r.id);
    box.onchange = () => { box.checked ? state.selected.add(r.id) : state.selected.delete(r.id); drawDiff(); };
    for (const [key, , text] of cols) {
      const td = el("td", { class: (text ? "text " : "") + key.replace(/[^a-z]/gi, "-"), text: fmt(value(r, key)) }, tr);
      if (key === "id") { td.style.borderLeft = `6px solid ${colors.get(r.labels[state.group])}`; td.title = r.name; }
    }
  }
}
// Config diff: the keys whose value differs between the ticked runs, one column per run.
function drawDiff() {
  const box = document.getElementById("config-diff"); box.innerHTML = "";
  const runs = DATA.runs.filter(r => state.selected.has(r.id));
  if (runs.length < 2) { el("p", { class: "note", text: "tick two or more runs in the table to compare their configs" }, box); return; }
  const keys = [...new Set(runs.flatMap(r => Object.keys(r.config)))].sort()
    .filter(k => new Set(runs.map(r => JSON.stringify(r.config[k] === undefined ? null : r.config[k]))).size > 1);
  if (!keys.length) { el("p", { class: "note", text: "the ticked runs have the same config" }, box); return; }
  const table = el("table", { id: "diff-table" }, box), colors = groupColors();
  const head = el("tr", {}, el("thead", {}, table));
  el("th", { class: "text", text: `${keys.length} key${keys.length > 1 ? "s" : ""} differ` }, head);
  for (const r of runs) {
    const th = el("th", { class: "text", text: r.id, title: r.name }, head);
    th.style.borderTop = `4px solid ${colors.get(r.labels[state.group])}`;
  }
  const body = el("tbody", {}, table);
  for (const k of keys) {
    const tr = el("tr", { "data-key": k }, body);
    el("td", { class: "text", text: k }, tr);
    for (const r of runs) el("td", { class: "text", text: r.config[k] === undefined ? "\u2014" : fmt(r.config[k]) }, tr);
  }
}
function draw() { drawLegend(); drawCurves(); drawFit(); drawTable(); drawDiff(); }

document.getElementById("title").textContent = DATA.title;
document.getElementById("meta").textContent = `${DATA.runs.length} runs` +
  (DATA.groups.length ? ` \u00b7 experiment/sweep: ${DATA.groups.join(", ")}` : "") +
  (DATA.varying.length ? ` \u00b7 varied: ${DATA.varying.join(", ")}` : "") + ` \u00b7 generated ${DATA.generated}`;
const groupSelect = document.getElementById("groupby");
for (const option of DATA.groupOptions) el("option", { value: option, text: option }, groupSelect);
groupSelect.onchange = e => { state.group = e.target.value; draw(); };
document.getElementById("xaxis").onchange = e => { state.x = Number(e.target.value); state.xrange = null; drawCurves(); };
document.getElementById("logx").onchange = e => { state.logx = e.target.checked; drawCurves(); };
document.getElementById("smooth").oninput = e => {
  state.smooth = Number(e.target.value); document.getElementById("smooth-value").textContent = e.target.value; drawCurves();
};
document.getElementById("reset-zoom").onclick = () => { state.xrange = null; drawCurves(); };
let resizing = null;  // panels fill the window: redraw at the new width
window.addEventListener("resize", () => { clearTimeout(resizing); resizing = setTimeout(() => { drawCurves(); drawFit(); }, 150); });
draw();
document.body.setAttribute("data-rendered", "true");
</script>
</body></html>
"""
