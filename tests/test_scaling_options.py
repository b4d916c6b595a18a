"""The documented options of the scaling-law fits (`llm.scaling.fit`, `llm-scaling fit`), pinned by value:
Kaplan's irreducible term, the bootstrap intervals (they resample, and follow --seed), Approach 2's
window of sizes around each budget's minimum, and the CLI options that reach the fits (--window,
--budget-tolerance, --kaplan-irreducible, --seed, --bootstrap, --loss, --n-kind, --no-plots).

The laws here are small and exact, so the expected numbers are worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llm.cli.scaling import main as scaling_main
from llm.scaling.fit import _with_intervals, fit_approach1, fit_approach2, fit_kaplan, isoflop_minimum, near_minimum
from llm.scaling.laws import ParametricLaw
from llm.scaling.points import Curve, Point

# ---------------------------------------------------------------- Kaplan with an irreducible term

# L(C) = E + (C_c / C)^alpha_C over C = 1e15 ... 1e21: the power term falls from 70 % of the loss to 4 %.
KAPLAN_E, KAPLAN_C_C, KAPLAN_ALPHA = 1.7, 1e17, 0.3
KAPLAN_TRUTH = {"E": KAPLAN_E, "C_c": KAPLAN_C_C, "alpha_C": KAPLAN_ALPHA}


def kaplan_points(noise: float = 0.0, seed: int = 0, E: float = KAPLAN_E, C_c: float = KAPLAN_C_C,
                  alpha: float = KAPLAN_ALPHA) -> list[Point]:
    """13 runs, one per C (log-spaced over 1e15 ... 1e21), each on the compute frontier; loss from
    the law times a log-normal factor of `noise`."""
    C = np.logspace(15, 21, 13)
    loss = (E + (C_c / C) ** alpha) * np.exp(np.random.default_rng(seed).normal(0.0, noise, C.size))
    return [Point(N=1.0, D=c / 6, C=c, loss=float(x), run_id=f"k{i}", source="synthetic")
            for i, (c, x) in enumerate(zip(C, loss))]


def test_kaplan_irreducible_recovers_the_floor_and_the_power_law_on_exact_data():
    # Two resamples only: each irreducible refit is three L-BFGS runs (~0.3 s on a loaded 2-core CPU).
    result = fit_kaplan(kaplan_points(), irreducible=True, n_bootstrap=2, seed=0)
    assert result.form == "L(C) = E + (C_c / C)^alpha_C" and result.n_points == 13 and result.n_bootstrap == 2
    assert result.value("E") > 0  # a floor under the loss, not a term added to the power law's fall
    for name, truth in KAPLAN_TRUTH.items():
        estimate = result.params[name]
        assert estimate.value == pytest.approx(truth, rel=1e-6), name
        # Exact data: every resample (a subset of the frontier) recovers the same law.
        assert estimate.low == pytest.approx(truth, rel=1e-6) and estimate.high == pytest.approx(truth, rel=1e-6), name
    C = np.logspace(15, 21, 13)  # the fitted law is the data's law, floor included
    assert result.law().loss(C) == pytest.approx(KAPLAN_E + (KAPLAN_C_C / C) ** KAPLAN_ALPHA, rel=1e-8)


def test_kaplan_irreducible_intervals_on_noisy_data_contain_the_truth():
    # 0.3 % noise, data seed 1: the point estimates lie within 0.1 % (E), 0.2 % (C_c) and 0.1 % (alpha)
    # of the law. Five resamples (each irreducible refit is three L-BFGS runs) contain it for each
    # of the resampling seeds 0-4; four with seed 0 all land above E = 1.7, hence five.
    result = fit_kaplan(kaplan_points(noise=0.003, seed=1), irreducible=True, n_bootstrap=5, seed=0)
    assert result.n_bootstrap == 5
    for name, truth in KAPLAN_TRUTH.items():
        estimate = result.params[name]
        assert estimate.low <= truth <= estimate.high, (name, estimate)
        assert estimate.high - estimate.low > 1e-3 * truth, (name, estimate)  # the resamples differ
    assert result.value("E") == pytest.approx(KAPLAN_E, rel=0.002)
    assert result.value("alpha_C") == pytest.approx(KAPLAN_ALPHA, rel=0.002)


def test_kaplan_without_the_irreducible_term_has_no_floor():
    # A pure power law through E + (C_c / C)^alpha: the loss falls from 5.68 to 1.76 over 6 decades
    # (end to end a log-log slope of ln(5.68 / 1.76) / ln(1e6) = 0.085; least squares over all 13
    # points: 0.080), far shallower than the law's 0.3.
    result = fit_kaplan(kaplan_points(), irreducible=False, n_bootstrap=0)
    assert result.form == "L(C) = (C_c / C)^alpha_C" and set(result.params) == {"C_c", "alpha_C"}
    assert result.law().E == 0.0
    assert 0.07 < result.value("alpha_C") < 0.09


def test_kaplan_irreducible_recovers_a_floor_that_is_most_of_the_loss():
    # The power term is 13 % of the loss at 1e15 and 0.2 % at 1e21, as late in a real sweep.
    result = fit_kaplan(kaplan_points(C_c=1e13), irreducible=True, n_bootstrap=0)
    assert result.value("E") == pytest.approx(KAPLAN_E, rel=1e-3)
    assert result.value("alpha_C") == pytest.approx(KAPLAN_ALPHA, rel=1e-3)


# ---------------------------------------------------------------- bootstrap intervals

LAW = ParametricLaw(E=1.8, A=400.0, B=1200.0, alpha=0.34, beta=0.28)
LAW_A = LAW.beta / (LAW.alpha + LAW.beta)  # exponent of N_opt(C): 0.4516; b = 1 - a = 0.5484


def law_curves(n_sizes: int = 13, noise: float = 0.0, seed: int = 0) -> list[Curve]:
    """Loss-vs-FLOPs curves of `n_sizes` sizes over N = 1e6 ... 1e9 (6 N FLOPs per token), each run's
    curve scaled by its own log-normal factor of `noise` (seed-to-seed spread of whole runs)."""
    rng = np.random.default_rng(seed)
    D = np.logspace(7, 13, 60)
    return [Curve(run_id=f"n{i}", N=N, flops_per_token=6 * N, C=6 * N * D,
                  loss=LAW.loss(N, D) * math.exp(rng.normal(0.0, noise)), source="synthetic")
            for i, N in enumerate(np.logspace(6, 9, n_sizes))]


def test_approach1_bootstrap_intervals_contain_the_exponents_and_are_not_degenerate():
    result = fit_approach1(law_curves(noise=0.005), n_bootstrap=20, seed=0)
    assert result.n_bootstrap == 20
    a, b = result.params["a"], result.params["b"]
    assert a.low <= LAW_A <= a.high and b.low <= 1 - LAW_A <= b.high, (a, b)
    # Refits on the original runs would all give the point estimate: low = value = high. Resampled
    # runs move the envelope, and the interval holds the estimate strictly inside (here a = 0.448 in
    # [0.407, 0.480]).
    assert a.low < a.value < a.high and a.high - a.low > 0.02, a
    assert b.low < b.value < b.high and b.high - b.low > 0.02, b


def test_approach1_intervals_narrow_with_more_runs():
    # Noise-free curves: the interval reflects only which sizes a resample keeps. 49 sizes over the same
    # decades pin the envelope far better than 13 (widths ~0.06 and ~0.007).
    few, many = (fit_approach1(law_curves(n), n_bootstrap=20, seed=0).params["a"] for n in (13, 49))
    assert many.low <= LAW_A <= many.high and few.low <= LAW_A <= few.high, (few, many)
    assert 0 < many.high - many.low < 0.5 * (few.high - few.low), (few, many)


def isoflop_points(noise: float = 0.005, seed: int = 0) -> list[Point]:
    """9 sizes (+-1 decade around sqrt(C / 120)) at each of 4 budgets 1e17 ... 1e20, loss from LAW."""
    rng = np.random.default_rng(seed)
    points = []
    for C in (1e17, 1e18, 1e19, 1e20):
        for N in math.sqrt(C / 120) * np.logspace(-1, 1, 9):
            loss = float(LAW.loss(N, C / (6 * N))) * math.exp(rng.normal(0.0, noise))
            points.append(Point(N=N, D=C / (6 * N), C=C, loss=loss, run_id=f"{C:g}-{N:.3g}", source="synthetic"))
    return points


BOOTSTRAPPED_FITS = {  # approach -> a fit of noisy data with R resamples and a seed, and one parameter to look at
    "1": (lambda R, seed: fit_approach1(law_curves(noise=0.005), n_bootstrap=R, seed=seed), "a"),
    "2": (lambda R, seed: fit_approach2(isoflop_points(), n_bootstrap=R, seed=seed), "a"),
    "kaplan": (lambda R, seed: fit_kaplan(kaplan_points(noise=0.01, E=0.0), n_bootstrap=R, seed=seed), "alpha_C"),
}


@pytest.mark.parametrize("approach", BOOTSTRAPPED_FITS)
def test_bootstrap_resamples_follow_the_seed(approach):
    fit, name = BOOTSTRAPPED_FITS[approach]
    first, again, other = fit(10, 0), fit(10, 0), fit(10, 1)
    assert first.as_dict() == again.as_dict()  # --seed makes the intervals reproducible
    assert other.value(name) == first.value(name)  # the point estimate does not depend on it...
    e, o = first.params[name], other.params[name]
    assert (e.low, e.high) != (o.low, o.high)  # ...the resamples do: a fit of the same data would not
    assert e.high - e.low > 0 and o.high - o.low > 0
    without = fit(0, 0).params[name]  # --bootstrap 0: a value without an interval
    assert (without.value, without.low, without.high) == (first.value(name), None, None)


# ---------------------------------------------------------------- Approach 2: the window of sizes

N0 = 1e8  # sizes N0 e^x, x = 0 ... 8
WINDOW_BUDGETS = {  # C -> (x of the parabola's vertex, index of the size with the lowest loss)
    1e18: (4.3, 4),  # the window is centred on x = 4
    1e20: (1.2, 1),  # it would reach below x = 0: clamped to the smallest sizes
    1e22: (6.8, 7),  # it would reach above x = 8: clamped to the largest sizes
}
FIVE_SIZES = {1e18: range(2, 7), 1e20: range(0, 5), 1e22: range(4, 9)}  # window 5, worked out by hand


def windowed_profiles() -> list[Point]:
    """9 sizes per budget. On the 5 sizes of FIVE_SIZES the loss is the parabola 3 + 0.1 (x - vertex)^2;
    the other sizes lie 1.0 above it (undertrained far from the optimum), so a parabola that takes in
    any of them no longer has its vertex at (vertex, 3.0)."""
    points = []
    for C, (vertex, _) in WINDOW_BUDGETS.items():
        for x in range(9):
            loss = 3.0 + 0.1 * (x - vertex) ** 2 + (0.0 if x in FIVE_SIZES[C] else 1.0)
            N = N0 * math.exp(x)
            points.append(Point(N=N, D=C / (6 * N), C=C, loss=loss, run_id=f"{C:g}:{x}", source="synthetic"))
    return points


def budget(points: list[Point], C: float) -> list[Point]:
    return [p for p in points if p.C == C]


# window -> the sizes (x) each budget's parabola is fitted to. An even window keeps one more size below
# the minimum than above it (first = best - window // 2); near the ends it slides inwards, keeping its width.
EXPECTED_SIZES = {
    3: {1e18: [3, 4, 5], 1e20: [0, 1, 2], 1e22: [6, 7, 8]},
    4: {1e18: [2, 3, 4, 5], 1e20: [0, 1, 2, 3], 1e22: [5, 6, 7, 8]},
    5: {C: list(xs) for C, xs in FIVE_SIZES.items()},
    0: {C: list(range(9)) for C in WINDOW_BUDGETS},  # 0: all sizes
    9: {C: list(range(9)) for C in WINDOW_BUDGETS},  # as many as there are: all
    12: {C: list(range(9)) for C in WINDOW_BUDGETS},
}


@pytest.mark.parametrize("window", EXPECTED_SIZES)
def test_near_minimum_keeps_exactly_the_sizes_around_the_lowest_loss(window):
    points = windowed_profiles()
    for C, expected in EXPECTED_SIZES[window].items():
        lowest = min(budget(points, C), key=lambda p: p.loss)  # the profile is as WINDOW_BUDGETS says
        assert int(lowest.run_id.split(":")[1]) == WINDOW_BUDGETS[C][1]
        kept = near_minimum(budget(points, C), window)
        assert sorted(int(p.run_id.split(":")[1]) for p in kept) == expected, C
        m = isoflop_minimum(budget(points, C), window)
        assert m["n_fitted"] == len(expected)
        assert m["N_range"] == pytest.approx([N0 * math.exp(expected[0]), N0 * math.exp(expected[-1])], rel=1e-12)


@pytest.mark.parametrize("window", [3, 4, 5])
def test_approach2_parabolas_go_through_the_window_only(window):
    # Within the window the profile is an exact parabola, so its vertex is (N0 e^vertex, 3.0) and its
    # curvature 0.1 to rounding; one size from outside would add 1.0 to a point and move all three.
    result = fit_approach2(windowed_profiles(), n_bootstrap=0, window=window)
    budgets = result.details["budgets"]
    assert result.details["window"] == window
    assert [m["C"] for m in budgets] == pytest.approx(list(WINDOW_BUDGETS), rel=1e-12)  # (a geometric mean of equal Cs)
    assert result.details["dropped_budgets"] == []
    for m, (C, (vertex, _)) in zip(budgets, WINDOW_BUDGETS.items()):
        sizes = EXPECTED_SIZES[window][C]
        assert (m["n_points"], m["n_sizes"], m["n_fitted"]) == (9, 9, len(sizes))
        assert m["N_range"] == pytest.approx([N0 * math.exp(sizes[0]), N0 * math.exp(sizes[-1])], rel=1e-12)
        assert m["N_opt"] == pytest.approx(N0 * math.exp(vertex), rel=1e-9), C
        assert m["loss_min"] == pytest.approx(3.0, abs=1e-9) and m["coef"][0] == pytest.approx(0.1, rel=1e-9)
    # N_opt = N0 e^vertex at each C: the exponent is the slope of the vertices in ln C.
    slope = np.polyfit(np.log(list(WINDOW_BUDGETS)), [v for v, _ in WINDOW_BUDGETS.values()], 1)[0]
    assert result.value("a") == pytest.approx(slope, rel=1e-9)


def test_approach2_with_every_size_misplaces_these_vertices():
    # The contrast to the window: through all 9 sizes the 1.0 steps pull the vertices off (x = 4.3, 1.2,
    # 6.8 -> 4.17, 0.72, 7.28: N_opt off by 14 % to 62 %).
    result = fit_approach2(windowed_profiles(), n_bootstrap=0, window=0)
    minima = sorted(result.details["budgets"] + result.details["dropped_budgets"], key=lambda m: m["C"])
    assert len(minima) == 3
    for m, (vertex, _) in zip(minima, WINDOW_BUDGETS.values()):
        assert m["n_fitted"] == 9
        assert not m["N_opt"] == pytest.approx(N0 * math.exp(vertex), rel=0.05)


# ---------------------------------------------------------------- llm-scaling fit options

def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        scaling_main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def write_csv(path: Path, points: list[Point], columns: tuple[str, ...] = ("N", "D", "loss")) -> None:
    rows = [",".join(repr(float(getattr(p, c))) for c in columns) for p in points]
    path.write_text(",".join(columns) + "\n" + "".join(row + "\n" for row in rows))


def fit_json(out: Path) -> dict:
    return json.loads((out / "fit.json").read_text())


def test_cli_window_seed_and_bootstrap_reach_approach2(tmp_path, capsys):
    write_csv(tmp_path / "p.csv", windowed_profiles())  # C = 6 N D is each budget's C (to rounding)
    fits = {}
    for seed in ("7", "8"):
        code, _, err = run_main(["fit", str(tmp_path / "p.csv"), "--approaches", "2", "--window", "3", "--bootstrap",
                                 "10", "--seed", seed, "--no-plots", "--out", str(tmp_path / seed)], capsys)
        assert code == 0, err
        fits[seed] = fit_json(tmp_path / seed)
        assert (fits[seed]["seed"], fits[seed]["bootstrap"]) == (int(seed), 10)
    details = fits["7"]["approaches"]["2"]["details"]
    assert details["window"] == 3
    assert [m["N_range"] for m in details["budgets"]] == [
        pytest.approx([N0 * math.exp(x[0]), N0 * math.exp(x[-1])]) for x in EXPECTED_SIZES[3].values()]
    # The intervals are those of the library's fit with the same window, resamples and seed, and
    # another seed gives others.
    expected = fit_approach2(windowed_profiles(), n_bootstrap=10, seed=7, window=3)
    got = fits["7"]["approaches"]["2"]["params"]
    assert set(got) == set(expected.params) == {"a", "k_N", "b", "k_D"}
    for name, e in expected.params.items():
        assert [got[name][k] for k in ("value", "low", "high")] == pytest.approx([e.value, e.low, e.high], rel=1e-12)
    assert fits["8"]["approaches"]["2"]["params"]["a"]["low"] != fits["7"]["approaches"]["2"]["params"]["a"]["low"]


def overshooting_points() -> list[Point]:
    """7 sizes (-0.75 ... +0.75 decades around LAW's optimum) at each of 3 budgets; the i-th size
    overshoots its budget by 0.32 i / 6 (0 ... 32 %), loss from LAW at its own C."""
    points = []
    for C in (1e17, 1e18, 1e19):
        for i, N in enumerate(float(LAW.optimal(C)[0]) * np.logspace(-0.75, 0.75, 7)):
            spent = C * (1 + 0.32 * i / 6)
            D = spent / (6 * N)
            points.append(Point(N=N, D=D, C=spent, loss=float(LAW.loss(N, D)), run_id=f"{C:g}-{i}", source="synthetic"))
    return points


def test_cli_budget_tolerance_decides_the_groups(tmp_path, capsys):
    points = overshooting_points()
    assert len(points) == 21
    write_csv(tmp_path / "p.csv", points, ("N", "D", "C", "loss"))
    groups = {}
    for tolerance in ("0.25", "0.5"):
        code, _, err = run_main(["fit", str(tmp_path / "p.csv"), "--approaches", "2", "--budget-tolerance", tolerance,
                                 "--bootstrap", "0", "--no-plots", "--out", str(tmp_path / tolerance)], capsys)
        assert code == 0, err
        details = fit_json(tmp_path / tolerance)["approaches"]["2"]["details"]
        assert details["tolerance"] == float(tolerance) and details["grouped_by"] == "C"
        groups[tolerance] = details
    # 0.25: each budget's sizes 0-4 (C up to 1.21x the cheapest) stay together; sizes 5 and 6 (1.27x,
    # 1.32x) start a group of 2 sizes, left out. 0.5: all 7 sizes of each budget in one group.
    assert [m["n_points"] for m in groups["0.25"]["budgets"]] == [5, 5, 5]
    overshoot = math.exp(np.mean(np.log(1 + 0.32 * np.arange(5) / 6)))  # a budget's C: its runs' geometric mean
    assert [m["C"] for m in groups["0.25"]["budgets"]] == pytest.approx([1e17 * overshoot, 1e18 * overshoot,
                                                                         1e19 * overshoot], rel=1e-12)
    assert [(m["n_points"], m["why"]) for m in groups["0.25"]["dropped_budgets"]] == \
        [(2, "2 model sizes; a parabola needs 3")] * 3
    assert [m["n_points"] for m in groups["0.5"]["budgets"]] == [7, 7, 7] and groups["0.5"]["dropped_budgets"] == []


def test_cli_kaplan_irreducible_and_no_plots(tmp_path, capsys):
    write_csv(tmp_path / "k.csv", kaplan_points())  # N = 1, D = C / 6: the CSV's C = 6 N D is the law's C
    args = ["fit", str(tmp_path / "k.csv"), "--approaches", "kaplan", "--kaplan-irreducible", "--bootstrap", "0",
            "--no-plots", "--out", str(tmp_path / "o")]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    fit = fit_json(tmp_path / "o")
    assert fit["plots"] == [] and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fit.json"]  # no PNG
    kaplan = fit["approaches"]["kaplan"]
    assert kaplan["form"] == "L(C) = E + (C_c / C)^alpha_C" and kaplan["n_bootstrap"] == 0
    for name, truth in KAPLAN_TRUTH.items():
        assert kaplan["params"][name]["value"] == pytest.approx(truth, rel=1e-6), name
    assert "L(C) = E + (C_c / C)^alpha_C" in out


def write_summary(run_dir: Path, C: float, val_loss: float, best_loss: float) -> None:
    run_dir.mkdir(parents=True)
    summary = {"run_id": run_dir.name, "status": "completed", "N": 1.0, "N_non_embedding": 0.5, "D": C / 6,
               "C": C, "val/loss": val_loss, "best_val/loss": best_loss}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def cli_fit_values(source: Path, approach: str, option: str, value: str, out: Path, capsys) -> dict[str, float]:
    """`llm-scaling fit` of one approach with `option value` (no bootstrap, no plots): the fitted
    values, after checking that fit.json records the option."""
    code, _, err = run_main(["fit", str(source), "--approaches", approach, option, value, "--bootstrap", "0",
                             "--no-plots", "--out", str(out)], capsys)
    assert code == 0, err
    fit = fit_json(out)
    assert fit[option.removeprefix("--").replace("-", "_")] == value
    return {k: e["value"] for k, e in fit["approaches"][approach]["params"].items()}


def test_cli_loss_best_fits_the_best_losses(tmp_path, capsys):
    # Each run's best loss is the pure law (2.3e8 / C)^0.05; its final loss is 1.1x that. The same
    # exponent, and C_c scaled by 1.1^(1 / 0.05) for the final losses.
    for i, C in enumerate(np.logspace(15, 21, 7)):
        best = (2.3e8 / C) ** 0.05
        write_summary(tmp_path / "sweep" / str(i), C, 1.1 * best, best)
    fitted = {loss: cli_fit_values(tmp_path / "sweep", "kaplan", "--loss", loss, tmp_path / loss, capsys)
              for loss in ("best", "final")}
    assert fitted["best"]["alpha_C"] == pytest.approx(0.05, rel=1e-9)
    assert fitted["best"]["C_c"] == pytest.approx(2.3e8, rel=1e-6)
    assert fitted["final"]["alpha_C"] == pytest.approx(0.05, rel=1e-9)
    assert fitted["final"]["C_c"] == pytest.approx(2.3e8 * 1.1 ** (1 / 0.05), rel=1e-6)


def test_cli_n_kind_non_embedding_takes_the_csv_column(tmp_path, capsys):
    # Halving every N (with C given) shifts each parabola by ln 2 in ln N: N_opt halves, D_opt = C / 6 N_opt
    # doubles, the exponents stay.
    rows = [",".join(repr(float(x)) for x in (p.N, p.N / 2, p.D, p.C, p.loss)) + "\n" for p in isoflop_points()]
    (tmp_path / "p.csv").write_text("N,N_non_embedding,D,C,loss\n" + "".join(rows))
    fitted = {kind: cli_fit_values(tmp_path / "p.csv", "2", "--n-kind", kind, tmp_path / kind, capsys)
              for kind in ("total", "non_embedding")}
    total, non_embedding = fitted["total"], fitted["non_embedding"]
    assert non_embedding["k_N"] == pytest.approx(total["k_N"] / 2, rel=1e-9)
    assert non_embedding["k_D"] == pytest.approx(total["k_D"] * 2, rel=1e-9)
    assert non_embedding["a"] == pytest.approx(total["a"], abs=1e-9)
    assert non_embedding["b"] == pytest.approx(total["b"], abs=1e-9)


def test_approach2_resamples_every_budget_of_at_least_three_sizes(monkeypatch):
    """Three sizes are the fewest a parabola needs: such a budget is resampled with the others
    (a budget of two sizes never has a minimum, so it is left out of the resamples)."""
    import llm.scaling.fit as fit
    points = isoflop_points()
    by_budget = {C: sorted((p for p in points if p.C == C), key=lambda p: p.N) for C in sorted({p.C for p in points})}
    budgets = list(by_budget)
    kept = by_budget[budgets[0]] + by_budget[budgets[1]] + by_budget[budgets[2]][3:6] + by_budget[budgets[3]][3:5]
    seen: list[set[float]] = []
    original = fit._approach2_values

    def spy(groups, window):
        seen.append({g[0].C for g in groups})
        return original(groups, window)

    monkeypatch.setattr(fit, "_approach2_values", spy)
    fit.fit_approach2(kept, n_bootstrap=5, seed=0, window=0)
    assert seen[0] == set(budgets)  # the fit itself sees every budget
    assert all(s == set(budgets[:3]) for s in seen[1:]) and len(seen) == 6  # resamples: 9, 9 and 3 sizes, not 2


def test_intervals_are_the_2_5th_and_97_5th_percentiles_of_the_resamples():
    samples = [{"a": float(x)} for x in range(101)]  # 0 ... 100: percentile q is q
    estimate = _with_intervals({"a": 50.0}, samples)["a"]
    assert (estimate.value, estimate.low, estimate.high) == (50.0, 2.5, 97.5)
    assert _with_intervals({"a": 1.0}, [{"a": 3.0}])["a"].low is None  # one resample gives no interval
