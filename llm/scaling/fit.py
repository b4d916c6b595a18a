"""Fitting scaling laws to runs, the three ways of Hoffmann et al. (2022) plus Kaplan's L(C).

- Approach 1 (`fit_approach1`): the lower envelope of all runs' loss-vs-FLOPs curves gives, at each
  FLOP count, the best model size and its tokens; power laws N_opt = k_N C^a, D_opt = k_D C^b are fitted
  to it by least squares in log-log space.
- Approach 2 (`fit_approach2`): IsoFLOP profiles. Points are grouped into FLOP budgets (by their
  launch budget, else by C within a factor 1 + tolerance); each budget gets a parabola of loss in
  log N, through the sizes nearest its lowest loss (`window`, default 5); its vertex is N_opt(C),
  and D_opt(C) = C / (6 N_opt) (the vertex lies between trained sizes, so no measured FLOPs/token
  exists for it; C = 6 N D also keeps a + b = 1 exactly). A budget whose parabola opens downward,
  whose vertex lies outside its fitted sizes or whose vertex loss is not positive is left out, with
  the reason. Power laws as above.
- Approach 3 (`fit_approach3`): L(N, D) = E + A/N^alpha + B/D^beta by minimising the Huber loss of
  log-space residuals with L-BFGS from a grid of starts; the frontier follows in closed form.
- Kaplan (`fit_kaplan`): L(C) = (C_c / C)^alpha_C (+ E when irreducible=True) on the compute frontier.

Every fit reports percentile bootstrap intervals (2.5 %, 97.5 %) and raises ValueError, saying what
it got and what it needs, when the data cannot determine it. All arithmetic is float64.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from llm.files import InputError, read_input_json
from llm.scaling.laws import FLOPS_PER_PARAM_TOKEN, ComputeLaw, Frontier, ParametricLaw, power_law_fit
from llm.scaling.points import Curve, Point, RunSet

APPROACHES = ("1", "2", "3", "kaplan")
HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of starting points for Approach 3 (theirs is finer in alpha and beta).
START_GRID = {
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
    "e": np.arange(-1.0, 1.51, 0.5),
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
}


@dataclass
class Estimate:
    """A fitted value with its bootstrap interval (None when no resample succeeded)."""

    value: float
    low: Optional[float] = None
    high: Optional[float] = None

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass
class FitResult:
    approach: str  # one of APPROACHES
    form: str  # the law, in words
    params: dict[str, Estimate]
    n_points: int  # data points the fit used (runs, points on the envelope, ...)
    n_bootstrap: int = 0  # resamples that succeeded
    details: dict = field(default_factory=dict)  # small JSON-able extras (per-budget minima, ...)

    def value(self, name: str) -> float:
        return self.params[name].value

    def law(self) -> ParametricLaw | Frontier | ComputeLaw:
        """The fitted law: ParametricLaw (3), Frontier (1, 2) or ComputeLaw (kaplan)."""
        return law_from_params(self.approach, {k: e.value for k, e in self.params.items()})

    def as_dict(self) -> dict:
        return {"approach": self.approach, "form": self.form, "n_points": self.n_points,
                "n_bootstrap": self.n_bootstrap, "params": {k: e.as_dict() for k, e in self.params.items()},
                "details": self.details}

    @classmethod
    def from_dict(cls, data: dict) -> "FitResult":
        params = {k: Estimate(**v) for k, v in data["params"].items()}
        return cls(approach=str(data["approach"]), form=data.get("form", ""), params=params,
                   n_points=int(data.get("n_points", 0)), n_bootstrap=int(data.get("n_bootstrap", 0)),
                   details=data.get("details", {}))


FIT_FIX = "give a fit.json that `llm-scaling fit` wrote (rerun it to write a new one)"


def read_fit(path: str | os.PathLike, key: str = "--fit", fix: str = FIT_FIX) -> dict:
    """A fit.json as `llm-scaling fit` writes it, with its shape checked: {"approaches": {name:
    {"params": {param: {"value": number or null, ...}}}}, "skipped": {name: why}}. InputError
    naming `key` and the file otherwise, so that readers (plan, the dashboard) can index it freely.
    A null value is allowed: the fit writes a value that overflowed (inf, nan) as null."""
    data = read_input_json(path, key, fix)
    problem = _fit_problem(data)
    if problem:
        raise InputError(f"{key}: {path} {problem}; {fix}")
    return data


def _fit_problem(data: dict) -> Optional[str]:
    approaches = data.get("approaches")
    if not isinstance(approaches, dict):
        return f"has no 'approaches' object (found {type(approaches).__name__})"
    for name, result in approaches.items():
        if name not in APPROACHES:
            return f"names an unknown approach {name!r} (known: {', '.join(APPROACHES)})"
        params = result.get("params") if isinstance(result, dict) else None
        if not isinstance(params, dict):
            return f"has no 'params' object for approach {name}"
        for param, estimate in params.items():
            value = estimate.get("value", "absent") if isinstance(estimate, dict) else "absent"
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                return f"has approach {name}'s {param} = {value!r}, not a finite number or null"
    if not isinstance(data.get("skipped", {}), dict):
        return "has a 'skipped' entry that is not an object"
    return None


def law_from_params(approach: str, values: dict[str, float]) -> ParametricLaw | Frontier | ComputeLaw:
    if approach == "3":
        return ParametricLaw(**{k: values[k] for k in ("E", "A", "B", "alpha", "beta")})
    if approach in ("1", "2"):
        return Frontier(k_N=values["k_N"], a=values["a"])
    if approach == "kaplan":
        return ComputeLaw(C_c=values["C_c"], alpha_C=values["alpha_C"], E=values.get("E", 0.0))
    raise ValueError(f"unknown approach {approach!r}; known: {', '.join(APPROACHES)}")


def _with_intervals(values: dict[str, float], samples: list[dict[str, float]]) -> dict[str, Estimate]:
    out = {}
    for name, value in values.items():
        column = np.array([s[name] for s in samples], dtype=np.float64)
        column = column[np.isfinite(column)]
        if len(column) >= 2:
            low, high = np.percentile(column, [2.5, 97.5])
            out[name] = Estimate(float(value), float(low), float(high))
        else:
            out[name] = Estimate(float(value))
    return out


def _bootstrap(refit: Callable[[np.random.Generator], dict[str, float]], n: int, seed: int) -> list[dict[str, float]]:
    """Up to n refits on resampled data; resamples the fit cannot handle (ValueError) are dropped."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        try:
            samples.append(refit(rng))
        except ValueError:
            continue
    return samples


# ---------------------------------------------------------------- Approach 1: envelope of curves

@dataclass
class Envelope:
    """The lowest loss over all curves at each FLOP value of a log grid, and the run attaining it."""

    C: np.ndarray
    loss: np.ndarray
    run: np.ndarray  # index into the curves
    N: np.ndarray
    D: np.ndarray  # C / flops_per_token of that run


def envelope(curves: Sequence[Curve], n_grid: int = 200) -> Envelope:
    """Interpolates each curve linearly in log C, only inside the FLOP range it covers."""
    if not curves:
        raise ValueError("the envelope needs at least one loss curve; got none")
    lo = min(float(c.C.min()) for c in curves)
    hi = max(float(c.C.max()) for c in curves)
    grid = np.logspace(math.log10(lo), math.log10(hi), n_grid) if hi > lo else np.array([lo])
    log_grid = np.log(grid)
    table = np.full((len(curves), len(grid)), np.inf)
    for i, curve in enumerate(curves):
        log_c = np.log(curve.C)
        inside = (log_grid >= log_c.min() - 1e-12) & (log_grid <= log_c.max() + 1e-12)
        table[i, inside] = np.interp(log_grid[inside], log_c, curve.loss)
    run = np.argmin(table, axis=0)
    N = np.array([curves[r].N for r in run], dtype=np.float64)
    fpt = np.array([curves[r].flops_per_token for r in run], dtype=np.float64)
    return Envelope(C=grid, loss=table[run, np.arange(len(grid))], run=run, N=N, D=grid / fpt)


def _approach1_values(curves: Sequence[Curve], n_grid: int, trim_boundary: bool) -> tuple[dict[str, float], Envelope, np.ndarray]:
    sizes = sorted({c.N for c in curves})
    if len(sizes) < 2:
        raise ValueError(f"Approach 1 needs loss curves of at least 2 model sizes; got {len(curves)} curves "
                         f"of {len(sizes)} size(s)")
    env = envelope(curves, n_grid)
    keep = np.ones(len(env.C), dtype=bool)
    if trim_boundary:
        # Where the smallest (largest) model wins, the optimum may be smaller (larger) than any model
        # trained: those FLOP values say nothing about where it is, so they are left out.
        keep = (env.N > sizes[0]) & (env.N < sizes[-1])
    on_envelope = sorted(set(env.N[keep].tolist()))
    if len(on_envelope) < 2:
        raise ValueError(f"Approach 1 needs at least 2 model sizes on the lower envelope away from the smallest and "
                         f"largest size; got {len(on_envelope)} of {len(sizes)} sizes (train more sizes, or longer)")
    k_N, a = power_law_fit(env.C[keep], env.N[keep])
    k_D, b = power_law_fit(env.C[keep], env.D[keep])
    return {"a": a, "k_N": k_N, "b": b, "k_D": k_D}, env, keep


def fit_approach1(curves: Sequence[Curve], n_grid: int = 200, trim_boundary: bool = True,
                  n_bootstrap: int = 100, seed: int = 0) -> FitResult:
    """Power laws N_opt = k_N C^a and D_opt = k_D C^b from the lower envelope of the curves.

    Intervals come from resampling whole runs (curves) with replacement."""
    values, env, keep = _approach1_values(curves, n_grid, trim_boundary)

    def refit(rng: np.random.Generator) -> dict[str, float]:
        picked = [curves[i] for i in rng.integers(0, len(curves), len(curves))]
        return _approach1_values(picked, n_grid, trim_boundary)[0]

    samples = _bootstrap(refit, n_bootstrap, seed)
    details = {"sizes_on_envelope": sorted(set(env.N[keep].tolist())), "n_curves": len(curves),
               "C_range": [float(env.C[keep].min()), float(env.C[keep].max())], "trim_boundary": trim_boundary}
    return FitResult("1", "N_opt = k_N C^a, D_opt = k_D C^b (lower envelope of loss-vs-FLOPs curves)",
                     _with_intervals(values, samples), n_points=int(keep.sum()), n_bootstrap=len(samples),
                     details=details)


# ---------------------------------------------------------------- Approach 2: IsoFLOP profiles

def _point_order(p: Point) -> tuple:
    """A total order on points: groups, and the resamples drawn from them, then do not depend on
    the order in which the sources listed the runs."""
    return (p.C, p.N, p.D, p.loss, p.run_id, p.source)


def group_budgets(points: Sequence[Point], tolerance: float = 0.25) -> list[list[Point]]:
    """Points of one FLOP budget together; groups in order of their C, points in order of C.

    When every point records its launch `budget`, by that budget. Otherwise by C: each group starts
    at the cheapest point not yet grouped and takes every point whose C is at most (1 + tolerance)
    times that one's. In every group the largest C is then at most (1 + tolerance) x the smallest,
    so each point lies within that factor of the group's C (`budget_flops`, their geometric mean),
    however continuously C varies; no grouping with that bound has fewer groups. Fixed budgets whose
    runs overshoot by less than the tolerance, and lie further apart than it, give one group each."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"budget tolerance {tolerance!r}: must be a finite number >= 0 (0.25: C within 25 %)")
    ordered = sorted(points, key=_point_order)
    if ordered and all(p.budget is not None for p in ordered):
        groups: dict[float, list[Point]] = {}
        for p in ordered:
            groups.setdefault(p.budget, []).append(p)
        return [groups[k] for k in sorted(groups)]
    out: list[list[Point]] = []
    for p in ordered:
        # Compared with the group's first (cheapest) point, not the previous one: chaining
        # neighbours would join C varying continuously over decades into one "budget".
        if out and p.C <= out[-1][0].C * (1.0 + tolerance):
            out[-1].append(p)
        else:
            out.append([p])
    return out


def budget_flops(group: Sequence[Point]) -> float:
    """The FLOPs of a budget: the launch budget when known, else the geometric mean of the runs' C."""
    if group[0].budget is not None:
        return float(group[0].budget)
    return float(np.exp(np.mean(np.log([p.C for p in group]))))


def near_minimum(group: Sequence[Point], window: int) -> list[Point]:
    """The points of the `window` sizes nearest (in order of N) to the size with the lowest loss;
    window=0 keeps all. Far from its minimum an IsoFLOP profile is not a parabola (undertrained large
    models rise steeply), so a parabola through every size can misplace the vertex."""
    sizes = sorted({p.N for p in group})
    if window == 0 or window >= len(sizes):
        return list(group)
    best = sizes.index(min(group, key=lambda p: p.loss).N)
    first = min(max(0, best - window // 2), len(sizes) - window)
    kept = set(sizes[first:first + window])
    return [p for p in group if p.N in kept]


def isoflop_minimum(group: Sequence[Point], window: int = 0) -> dict:
    """Parabola of loss in ln N through one budget's points near its lowest loss (`near_minimum`);
    its vertex is the optimal N. `why` says why the budget gives no optimum (None when it does):
    fewer than 3 sizes, a parabola that opens downward, a vertex outside the fitted sizes (the
    profile does not bracket its optimum, and the vertex is an extrapolation) or a vertex loss that
    is not a positive finite number (no real loss is: the parabola does not describe the profile)."""
    C = budget_flops(group)
    n_sizes = len({p.N for p in group})
    out = {"C": C, "n_points": len(group), "n_sizes": n_sizes, "points": [[float(p.N), float(p.loss)] for p in group]}
    if n_sizes < 3:
        return {**out, "N_opt": None, "why": f"{n_sizes} model size{'s' if n_sizes != 1 else ''}; a parabola needs 3"}
    fitted = near_minimum(group, window)
    logN = np.log([p.N for p in fitted])
    loss = np.array([p.loss for p in fitted], dtype=np.float64)
    center = float(logN.mean())  # centring keeps the quadratic fit well conditioned
    c2, c1, c0 = np.polyfit(logN - center, loss, 2)
    lo, hi = float(np.exp(logN.min())), float(np.exp(logN.max()))
    out = {**out, "n_fitted": len(fitted), "coef": [float(c2), float(c1), float(c0)], "center": center, "N_range": [lo, hi]}
    if c2 <= 0:
        return {**out, "N_opt": None, "why": "the parabola opens downward (no minimum)"}
    log_opt = center - c1 / (2 * c2)
    with np.errstate(over="ignore"):  # a vertex far outside may overflow: it is refused below anyway
        N_opt = float(np.exp(log_opt))
    loss_min = float(c0 - c1**2 / (4 * c2))
    inside = bool(logN.min() <= log_opt <= logN.max())
    problems = []
    if not inside:
        side = "smaller" if log_opt < logN.min() else "larger"
        problems.append(f"its vertex N = {N_opt:.3g} lies outside the fitted sizes [{lo:.3g}, {hi:.3g}] "
                        f"(the profile does not bracket its optimum: add {side} sizes)")
    if not (math.isfinite(loss_min) and loss_min > 0):
        problems.append(f"its vertex loss is {loss_min:.3g}, not a positive finite number")
    return {**out, "N_opt": N_opt, "D_opt": C / (FLOPS_PER_PARAM_TOKEN * N_opt), "loss_min": loss_min,
            "inside": inside, "why": "; ".join(problems) or None}


def budget_label(m: dict) -> str:
    """A budget as messages name it: `C = 1e+18 (9 points, 6 sizes)`."""
    def count(n: int, word: str) -> str:
        return f"{n} {word}{'s' if n != 1 else ''}"

    return f"C = {m['C']:.3g} ({count(m['n_points'], 'point')}, {count(m['n_sizes'], 'size')})"


def _budget_line(m: dict) -> str:
    return f"{budget_label(m)}: " + ("usable" if m["why"] is None else f"left out: {m['why']}")


def _approach2_values(groups: list[list[Point]], window: int) -> tuple[dict[str, float], list[dict]]:
    minima = [isoflop_minimum(g, window) for g in groups]
    used = [m for m in minima if m["why"] is None]
    if len(used) < 2:
        listing = ":" + "".join(f"\n  {_budget_line(m)}" for m in minima) if minima else " (no points)"
        raise ValueError(f"Approach 2 needs at least 2 FLOP budgets with a minimum inside their sizes; got {len(used)} "
                         f"of {len(minima)}{listing}")
    C = [m["C"] for m in used]
    k_N, a = power_law_fit(C, [m["N_opt"] for m in used])
    k_D, b = power_law_fit(C, [m["D_opt"] for m in used])
    return {"a": a, "k_N": k_N, "b": b, "k_D": k_D}, minima


def fit_approach2(points: Sequence[Point], tolerance: float = 0.25, n_bootstrap: int = 100, seed: int = 0,
                  window: int = 5) -> FitResult:
    """IsoFLOP parabolas -> N_opt(C), D_opt(C) = C / (6 N_opt) -> power laws in C.

    Points are grouped into budgets by `group_budgets` (`tolerance`). Each budget's parabola goes
    through its `window` sizes nearest the lowest loss (0: all sizes); a budget without a usable
    minimum (`isoflop_minimum`'s `why`) is left out, and listed with the reason in
    details["dropped_budgets"]. Needs at least 2 budgets with a minimum. Intervals come from
    resampling points with replacement within each budget, and refitting as above."""
    if window != 0 and window < 3:
        raise ValueError(f"window={window}: a parabola needs at least 3 sizes; allowed 0 (all sizes) or >= 3")
    groups = group_budgets(points, tolerance)
    values, minima = _approach2_values(groups, window)
    # A budget of fewer than 3 sizes stays so in every resample: only the others are resampled.
    candidates = [g for g in groups if len({p.N for p in g}) >= 3]

    def refit(rng: np.random.Generator) -> dict[str, float]:
        return _approach2_values([[g[i] for i in rng.integers(0, len(g), len(g))] for g in candidates], window)[0]

    samples = _bootstrap(refit, n_bootstrap, seed)
    used = [m for m in minima if m["why"] is None]
    form = "N_opt = k_N C^a, D_opt = k_D C^b (IsoFLOP parabolas; D_opt = C / 6 N_opt)"
    grouped_by = "launch budget" if points and all(p.budget is not None for p in points) else "C"
    return FitResult("2", form, _with_intervals(values, samples), n_points=sum(m["n_points"] for m in used),
                     n_bootstrap=len(samples),
                     details={"budgets": used, "dropped_budgets": [m for m in minima if m["why"] is not None],
                              "grouped_by": grouped_by, "tolerance": tolerance, "window": window})


# ---------------------------------------------------------------- Approach 3: parametric L(N, D)

def _log_residuals_np(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray) -> np.ndarray:
    """theta (..., 5) = (a, b, e, alpha, beta) -> residuals (..., n) of log L_pred - log L."""
    a, b, e, alpha, beta = (theta[..., i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (*e.shape[:-1], len(logN)))])
    return np.logaddexp.reduce(terms, axis=0) - logL


def _huber_np(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(axis=-1)


def _minimize(objective: Callable[[torch.Tensor], torch.Tensor], theta0: np.ndarray, max_iter: int = 500) -> tuple[np.ndarray, float]:
    """L-BFGS (strong Wolfe line search) in float64 from theta0."""
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        value = float(objective(theta))
    return theta.detach().numpy().copy(), value


def _approach3_objective(logN: np.ndarray, logD: np.ndarray, logL: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    logN_t, logD_t, logL_t = (torch.tensor(x, dtype=torch.float64) for x in (logN, logD, logL))

    def objective(theta: torch.Tensor) -> torch.Tensor:
        a, b, e, alpha, beta = theta
        pred = torch.logsumexp(torch.stack([a - alpha * logN_t, b - beta * logD_t, e.expand_as(logN_t)]), dim=0)
        return torch.nn.functional.huber_loss(pred, logL_t, reduction="sum", delta=HUBER_DELTA)

    return objective


def _approach3_solve(logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                     starts: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The best L-BFGS result over the starts: (theta, objective, index of its start)."""
    objective = _approach3_objective(logN, logD, logL)
    best, best_value, best_start = None, math.inf, -1
    for i, start in enumerate(starts):
        theta, value = _minimize(objective, start)
        if math.isfinite(value) and np.all(np.isfinite(theta)) and value < best_value:
            best, best_value, best_start = theta, value, i
    if best is None:
        raise ValueError("Approach 3: L-BFGS diverged from every start")
    return best, best_value, best_start


def _approach3_values(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(x) for x in theta)
    with np.errstate(over="ignore"):  # a runaway resample gives inf, which the intervals drop
        E, A, B = (float(np.exp(x)) for x in (e, a, b))
    law = ParametricLaw(E=E, A=A, B=B, alpha=alpha, beta=beta)
    # G, a, b are NaN for a degenerate resample (no interior optimum); intervals drop NaNs.
    return {**law.as_dict(), "a": law.a, "b": law.b, "G": law.G}


def fit_approach3(points: Sequence[Point], n_bootstrap: int = 100, n_starts: int = 16, seed: int = 0) -> FitResult:
    """L(N, D) = E + A/N^alpha + B/D^beta, minimising sum_i Huber_1e-3(LSE(a - alpha ln N_i,
    b - beta ln D_i, e) - ln L_i) with A = e^a, B = e^b, E = e^e (Hoffmann et al., Approach 3).

    Every start of Hoffmann et al.'s grid (alpha, beta in [0, 2], e in [-1, 1.5], a, b in [0, 25])
    is scored; L-BFGS runs from the `n_starts` best of them (running it from all 5400 changes
    nothing on well-posed data and costs minutes). Bootstrap resamples (points with
    replacement) restart from the best fit."""
    if len(points) < 5:
        raise ValueError(f"Approach 3 needs at least 5 points (one per parameter E, A, B, alpha, beta); got {len(points)}")
    logN = np.log([p.N for p in points])
    logD = np.log([p.D for p in points])
    logL = np.log([p.loss for p in points])
    if len(set(logN.tolist())) < 2 or len(set(logD.tolist())) < 2:
        raise ValueError(f"Approach 3 needs at least 2 distinct N and 2 distinct D; got {len(set(logN.tolist()))} N "
                         f"and {len(set(logD.tolist()))} D")
    grid = np.array(list(itertools.product(*START_GRID.values())), dtype=np.float64)
    scores = _huber_np(_log_residuals_np(grid, logN, logD, logL))
    starts = grid[np.argsort(scores, kind="stable")[:n_starts]]
    theta, objective, best_start = _approach3_solve(logN, logD, logL, starts)

    def refit(rng: np.random.Generator) -> dict[str, float]:
        i = rng.integers(0, len(points), len(points))
        return _approach3_values(_approach3_solve(logN[i], logD[i], logL[i], theta[None])[0])

    samples = _bootstrap(refit, n_bootstrap, seed)
    residuals = _log_residuals_np(theta, logN, logD, logL)
    details = {"huber_objective": objective, "rms_log_residual": float(np.sqrt(np.mean(residuals**2))),
               "n_starts": int(len(starts)), "best_start": dict(zip(START_GRID, starts[best_start].tolist()))}
    return FitResult("3", "L(N, D) = E + A / N^alpha + B / D^beta", _with_intervals(_approach3_values(theta), samples),
                     n_points=len(points), n_bootstrap=len(samples), details=details)


# ---------------------------------------------------------------- Kaplan: L(C)

def compute_frontier(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
    """(C, loss) of the points no cheaper point beats: the best loss reached so far, by compute."""
    C, loss, best = [], [], math.inf
    for p in sorted(points, key=lambda p: (p.C, p.loss)):
        if p.loss < best:
            C.append(p.C)
            loss.append(p.loss)
            best = p.loss
    return np.array(C, dtype=np.float64), np.array(loss, dtype=np.float64)


def _kaplan_values(C: np.ndarray, loss: np.ndarray, irreducible: bool) -> dict[str, float]:
    needed = 4 if irreducible else 3  # one more than the parameters, so the fit is not exact interpolation
    if len(C) < needed or len(set(C.tolist())) < 2:
        raise ValueError(f"the Kaplan fit L(C){' with E' if irreducible else ''} needs at least {needed} points on the "
                         f"compute frontier; got {len(C)}")
    slope, intercept = np.polyfit(np.log(C), np.log(loss), 1)
    alpha = -float(slope)
    log_cc = float(intercept) / alpha if alpha != 0 else math.inf
    if not irreducible:
        return {"C_c": math.exp(log_cc) if log_cc < 700 else math.inf, "alpha_C": alpha}
    logC_t, logL_t = torch.tensor(np.log(C)), torch.tensor(np.log(loss))

    def objective(theta: torch.Tensor) -> torch.Tensor:
        lcc, al, e = theta
        pred = torch.logsumexp(torch.stack([al * (lcc - logC_t), e.expand_as(logC_t)]), dim=0)
        return ((pred - logL_t) ** 2).sum()

    best, best_value = None, math.inf
    for fraction in (0.1, 0.5, 0.9, 0.99):  # starts for E below the lowest loss seen
        # Each start's C_c and alpha_C are the power law through L - E: starting from the pure
        # power law instead strands the fit (tiny alpha_C, huge C_c, E near 0) whenever E is most
        # of the loss, as it is late in a sweep.
        e0 = fraction * float(loss.min())
        slope0, intercept0 = np.polyfit(np.log(C), np.log(loss - e0), 1)
        start = [intercept0 / -slope0, -slope0] if slope0 < 0 else [log_cc, alpha]
        theta, value = _minimize(objective, np.array([*start, math.log(e0)]))
        if value < best_value:
            best, best_value = theta, value
    lcc, al, e = (float(x) for x in best)
    return {"C_c": math.exp(min(lcc, 700.0)), "alpha_C": al, "E": math.exp(e)}


def fit_kaplan(points: Sequence[Point] = (), curves: Sequence[Curve] = (), irreducible: bool = False,
               n_bootstrap: int = 100, seed: int = 0) -> FitResult:
    """L(C) = (C_c / C)^alpha_C, or E + (C_c / C)^alpha_C with irreducible=True, by least squares
    in log space. Fitted to the lower envelope of the curves when there are curves, else to the
    compute frontier of the final points."""
    if curves:
        env = envelope(curves)
        C, loss, data = env.C, env.loss, "lower envelope of the loss curves"
    else:
        C, loss = compute_frontier(points)
        data = "compute frontier of the final points"
    values = _kaplan_values(C, loss, irreducible)

    def refit(rng: np.random.Generator) -> dict[str, float]:
        i = np.unique(rng.integers(0, len(C), len(C)))  # a frontier point twice adds nothing new
        return _kaplan_values(C[i], loss[i], irreducible)

    samples = _bootstrap(refit, n_bootstrap, seed)
    form = "L(C) = E + (C_c / C)^alpha_C" if irreducible else "L(C) = (C_c / C)^alpha_C"
    return FitResult("kaplan", form, _with_intervals(values, samples), n_points=len(C), n_bootstrap=len(samples),
                     details={"data": data})


# ---------------------------------------------------------------- all of them

def fit_all(runs: RunSet, approaches: Sequence[str] = APPROACHES, n_bootstrap: int = 100, seed: int = 0,
            budget_tolerance: float = 0.25, kaplan_irreducible: bool = False,
            window: int = 5) -> tuple[dict[str, FitResult], dict[str, str]]:
    """Every requested approach that the data allows: (results, {approach: why it was skipped})."""
    results: dict[str, FitResult] = {}
    skipped: dict[str, str] = {}
    for approach in approaches:
        try:
            if approach == "1":
                if not runs.curves:
                    raise ValueError("Approach 1 needs loss curves (metrics.jsonl of run directories); the sources "
                                     "have none (CSV and W&B sources carry final points only)")
                results[approach] = fit_approach1(runs.curves, n_bootstrap=n_bootstrap, seed=seed)
            elif approach == "2":
                results[approach] = fit_approach2(runs.points, budget_tolerance, n_bootstrap, seed, window)
            elif approach == "3":
                results[approach] = fit_approach3(runs.points, n_bootstrap=n_bootstrap, seed=seed)
            elif approach == "kaplan":
                results[approach] = fit_kaplan(runs.points, runs.curves, kaplan_irreducible, n_bootstrap, seed)
            else:
                raise ValueError(f"unknown approach {approach!r}; known: {', '.join(APPROACHES)}")
        except ValueError as e:
            skipped[approach] = str(e)
    return results, skipped
