"""PNG figures of the data and the fits (matplotlib's object API with the Agg canvas: no display,
no global pyplot state, safe in tests and on headless machines).

`write_plots` draws every figure the data and fits allow and returns the paths written:
  loss_vs_compute.png   loss against FLOPs, one line per model size (+ the Kaplan L(C) fit)
  isoflops.png          IsoFLOP points with their fitted parabolas and minima (Approach 2)
  frontier.png          N_opt(C) and D_opt(C) of every approach, with the points they came from
  residuals.png         log-space residuals of the Approach-3 fit against N and D
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from llm.scaling.fit import FitResult, envelope
from llm.scaling.laws import ComputeLaw, Frontier, ParametricLaw
from llm.scaling.points import Curve, Point


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _colors(values: Sequence[float]) -> tuple[Callable[[float], tuple], ScalarMappable]:
    """Colour by log value (viridis), and the mappable a colorbar for it needs."""
    lo, hi = min(values), max(values)
    mappable = ScalarMappable(norm=LogNorm(lo, hi if hi > lo else lo * 1.01), cmap="viridis")
    return (lambda v: mappable.to_rgba(v)), mappable


def _group_sizes(points: Sequence[Point], rel: float = 0.01) -> list[list[Point]]:
    """Points of one model size together: N within `rel` of each other (CSV values may be rounded)."""
    groups: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.N):
        if groups and p.N <= groups[-1][0].N * (1 + rel):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def plot_loss_vs_compute(points: Sequence[Point], curves: Sequence[Curve], out_dir: Path,
                         kaplan: FitResult | None = None) -> Path:
    """One line per model size (colour = N): its val-loss curve when there are curves, else its final points."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    if curves:
        color, mappable = _colors([c.N for c in curves])
        for c in curves:
            ax.plot(c.C, c.loss, color=color(c.N), lw=1)
    else:
        color, mappable = _colors([p.N for p in points])
        for group in _group_sizes(points):
            group.sort(key=lambda p: p.C)
            ax.plot([p.C for p in group], [p.loss for p in group], "o-", color=color(group[0].N), ms=3, lw=1)
    fig.colorbar(mappable, ax=ax, label="parameters N")
    if kaplan is not None:
        law = kaplan.law()
        assert isinstance(law, ComputeLaw)
        C = np.concatenate([c.C for c in curves] or [[p.C for p in points]])
        grid = np.logspace(np.log10(C.min()), np.log10(C.max()), 100)
        ax.plot(grid, law.loss(grid), "k--", lw=1.5, label=f"Kaplan fit {kaplan.form}, alpha_C={law.alpha_C:.3f}")
        ax.legend(fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss", title="Loss vs compute")
    return _save(fig, out_dir / "loss_vs_compute.png")


def plot_isoflops(result: FitResult, out_dir: Path) -> Path:
    """Each budget's points, its parabola in ln N and the vertex (the optimal N)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    budgets = result.details["budgets"]
    colors, _ = _colors([b["C"] for b in budgets])
    for b in budgets:
        color = colors(b["C"])
        N, loss = np.array(b["points"]).T
        ax.plot(N, loss, "o", color=color, ms=4, label=f"C={b['C']:.2g}")
        lo, hi = b["N_range"]
        x = np.linspace(np.log(lo), np.log(hi), 100)
        ax.plot(np.exp(x), np.polyval(b["coef"], x - b["center"]), "-", color=color, lw=1)
        if b["N_opt"] is not None:
            ax.plot([b["N_opt"]], [b["loss_min"]], "*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles (Approach 2); * = minimum")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "isoflops.png")


def plot_frontier(results: Mapping[str, FitResult], points: Sequence[Point], curves: Sequence[Curve],
                  out_dir: Path) -> Path:
    """N_opt(C) and D_opt(C): each approach's law as a line over the FLOPs of the data, and the
    optima it was fitted to as markers (Approach 1: envelope; Approach 2: parabola minima)."""
    fig = Figure(figsize=(11, 4.5))
    ax_n, ax_d = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    Cs: list[float] = [p.C for p in points]
    colors = {"1": "C0", "2": "C1", "3": "C2"}
    if "1" in results and curves:
        env = envelope(curves)
        used = np.ones(len(env.C), dtype=bool)
        if results["1"].details.get("trim_boundary"):  # as fit_approach1: boundary sizes are not fitted
            sizes = [c.N for c in curves]
            used = (env.N > min(sizes)) & (env.N < max(sizes))
        for ax, y in ((ax_n, env.N), (ax_d, env.D)):
            ax.plot(env.C[used], y[used], ".", color=colors["1"], ms=3, alpha=0.5)
            ax.plot(env.C[~used], y[~used], ".", color="0.7", ms=3, label="envelope at the smallest/largest size (not fitted)")
        Cs += [float(env.C.min()), float(env.C.max())]
    if "2" in results:
        minima = [b for b in results["2"].details["budgets"] if b["N_opt"] is not None]
        ax_n.plot([b["C"] for b in minima], [b["N_opt"] for b in minima], "o", color=colors["2"])
        ax_d.plot([b["C"] for b in minima], [b["D_opt"] for b in minima], "o", color=colors["2"])
        Cs += [b["C"] for b in minima]
    grid = np.logspace(np.log10(min(Cs)) - 0.5, np.log10(max(Cs)) + 0.5, 100)
    for key in ("1", "2", "3"):
        if key not in results:
            continue
        law = results[key].law()
        if isinstance(law, ParametricLaw):
            N, D = law.optimal(grid)
            a, b = law.a, law.b
        else:
            assert isinstance(law, Frontier)
            r = results[key]
            N, D = r.value("k_N") * grid ** r.value("a"), r.value("k_D") * grid ** r.value("b")
            a, b = r.value("a"), r.value("b")
        ax_n.plot(grid, N, "-", color=colors[key], label=f"Approach {key}: a={a:.3f}")
        ax_d.plot(grid, D, "-", color=colors[key], label=f"Approach {key}: b={b:.3f}")
    ax_n.set(xscale="log", yscale="log", xlabel="FLOPs C", ylabel="optimal parameters N_opt", title="N_opt(C)")
    ax_d.set(xscale="log", yscale="log", xlabel="FLOPs C", ylabel="optimal tokens D_opt", title="D_opt(C)")
    ax_n.legend(fontsize=8)
    ax_d.legend(fontsize=8)
    return _save(fig, out_dir / "frontier.png")


def plot_residuals(points: Sequence[Point], result: FitResult, out_dir: Path) -> Path:
    """ln L_fit - ln L of every point, against N and against D: structure here means misfit."""
    law = result.law()
    assert isinstance(law, ParametricLaw)
    N = np.array([p.N for p in points])
    D = np.array([p.D for p in points])
    residual = np.log(law.loss(N, D)) - np.log([p.loss for p in points])
    fig = Figure(figsize=(11, 4))
    for i, (x, name) in enumerate(((N, "parameters N"), (D, "tokens D"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.axhline(0, color="k", lw=0.8)
        ax.scatter(x, residual, s=12)
        ax.set(xscale="log", xlabel=name, ylabel="ln L_fit - ln L", title=f"Approach 3 residuals vs {name.split()[-1]}")
    return _save(fig, out_dir / "residuals.png")


def write_plots(points: Sequence[Point], curves: Sequence[Curve], results: Mapping[str, FitResult],
                out_dir: str | Path) -> list[Path]:
    """Every figure the data and fits allow, as PNGs in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if points or curves:
        paths.append(plot_loss_vs_compute(points, curves, out, results.get("kaplan")))
    if "2" in results:
        paths.append(plot_isoflops(results["2"], out))
    if any(k in results for k in ("1", "2", "3")):
        paths.append(plot_frontier(results, points, curves, out))
    if "3" in results:
        paths.append(plot_residuals(points, results["3"], out))
    return paths
