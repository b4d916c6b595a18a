"""Scaling-law fitting and planning (`llm.scaling.{points,fit,plan,plots}`, `llm-scaling`) on data drawn
from known laws: each approach must recover the law it was generated from."""

from __future__ import annotations

import json
import shutil
import math
from pathlib import Path

import numpy as np
import pytest

from llm.cli.scaling import main as scaling_main
from llm.config import validate
from llm.model import ModelConfig
from llm.scaling.fit import (FitResult, budget_flops, fit_approach1, fit_approach2, fit_approach3, fit_kaplan,
                             group_budgets)
from llm.scaling.flops import model_size
from llm.scaling.laws import ParametricLaw
from llm.scaling.plan import config_overrides, ladder_batch, ladder_lr, plan, shape_for_params, shape_params
from llm.scaling.points import Curve, Point, load_curves, load_points, load_runs, parse_wandb_spec
from tests.conftest import compose_train, place_files

TRUE = ParametricLaw(E=1.8, A=400.0, B=1200.0, alpha=0.34, beta=0.28)
TRUE_A = TRUE.beta / (TRUE.alpha + TRUE.beta)  # exponent of N_opt(C): 0.4516
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def law_points(noise: float = 0.005, seed: int = 0) -> list[Point]:
    """An 8 x 8 grid of runs over N in [1e6, 1e9] and D in [1e8, 1e11] (64 points), loss with
    multiplicative noise of `noise` (log-normal)."""
    rng = np.random.default_rng(seed)
    N, D = (x.ravel() for x in np.meshgrid(np.logspace(6, 9, 8), np.logspace(8, 11, 8)))
    loss = TRUE.loss(N, D) * np.exp(rng.normal(0.0, noise, N.size))
    return [Point(N=float(n), D=float(d), C=6 * n * d, loss=float(l), run_id=f"r{i}", source="synthetic")
            for i, (n, d, l) in enumerate(zip(N, D, loss))]


def isoflop_points(budgets=(1e17, 1e18, 1e19, 1e20), sizes: int = 9, noise: float = 0.002, seed: int = 0) -> list[Point]:
    """IsoFLOP sweeps as one would plan them without knowing the law: sizes spread +-1 decade around
    the 20-tokens-per-parameter guess N = sqrt(C / 120), whose exponent (0.5) is not the true one."""
    rng = np.random.default_rng(seed)
    points = []
    for C in budgets:
        for N in math.sqrt(C / 120) * np.logspace(-1, 1, sizes):
            D = C / (6 * N)
            # Real runs overshoot the budget by up to one optimizer step: C is not exactly equal.
            points.append(Point(N=N, D=D, C=C * (1 + rng.uniform(0, 0.02)), run_id=f"{C:g}-{N:.3g}",
                                loss=float(TRUE.loss(N, D)) * math.exp(rng.normal(0, noise)), source="synthetic"))
    return points


def law_curves(sizes=np.logspace(6, 9, 13)) -> list[Curve]:
    """Loss-vs-FLOPs curves from the law, tokens growing along each run, 6 N FLOPs per token."""
    D = np.logspace(7, 13, 60)
    return [Curve(run_id=f"n{N:.3g}", N=N, flops_per_token=6 * N, C=6 * N * D, loss=TRUE.loss(N, D), source="synthetic")
            for N in sizes]


# ---------------------------------------------------------------- Approach 3

@pytest.fixture(scope="module")
def approach3() -> FitResult:
    return fit_approach3(law_points(), n_bootstrap=20, seed=0)


def test_approach3_recovers_the_law_and_its_intervals_contain_it(approach3):
    p = approach3.params
    assert abs(p["alpha"].value - TRUE.alpha) < 0.02
    assert abs(p["beta"].value - TRUE.beta) < 0.02
    assert abs(p["E"].value - TRUE.E) < 0.05
    assert abs(p["a"].value - TRUE_A) < 0.02
    assert approach3.n_bootstrap == 20
    for name in ("E", "A", "B", "alpha", "beta"):
        e = p[name]
        assert e.low < e.value < e.high, name
        assert e.low <= getattr(TRUE, name) <= e.high, (name, e)
    assert p["alpha"].high - p["alpha"].low < 0.1  # an interval, not "anything goes"
    # The derived allocation is the closed form of the fitted parameters.
    G = (p["alpha"].value * p["A"].value / (p["beta"].value * p["B"].value)) ** (1 / (p["alpha"].value + p["beta"].value))
    assert p["G"].value == pytest.approx(G, rel=1e-12)
    assert p["a"].value + p["b"].value == pytest.approx(1.0)


def test_approach3_needs_five_points():
    with pytest.raises(ValueError, match=r"at least 5 points.*got 4"):
        fit_approach3(law_points()[:4], n_bootstrap=0)


# ---------------------------------------------------------------- Approach 2

def test_approach2_recovers_the_optimal_size_exponent():
    result = fit_approach2(isoflop_points(), n_bootstrap=20, seed=0)
    a, b = result.value("a"), result.value("b")
    assert abs(a - TRUE_A) < 0.03, a
    assert abs(b - (1 - TRUE_A)) < 0.03, b
    budgets = result.details["budgets"]
    assert len(budgets) == 4 and all(m["n_points"] == 9 and m["inside"] for m in budgets)
    for m in budgets:  # each parabola's vertex is near the true optimum of its budget
        assert m["N_opt"] == pytest.approx(float(TRUE.optimal(m["C"])[0]), rel=0.25)
        assert m["D_opt"] == pytest.approx(m["C"] / (6 * m["N_opt"]))
    assert result.params["a"].low <= TRUE_A <= result.params["a"].high


def test_approach2_fits_each_parabola_near_its_minimum():
    # Sizes far above a budget's optimum stall on an early plateau, far above what the law says; a
    # parabola through every size then misplaces the vertex, one through the 5 nearest the best does not.
    points = []
    for C in (1e17, 1e18, 1e19, 1e20):
        group = sorted((p for p in isoflop_points() if p.run_id.startswith(f"{C:g}-")), key=lambda p: p.N)
        points += [Point(p.N, p.D, p.C, p.loss + (0.6 if i >= 7 else 0.0), p.run_id, p.source) for i, p in enumerate(group)]
    windowed, everything = (fit_approach2(points, n_bootstrap=0, window=w) for w in (5, 0))
    assert abs(windowed.value("a") - TRUE_A) < 0.03
    assert windowed.details["window"] == 5
    for near, far in zip(windowed.details["budgets"], everything.details["budgets"]):
        true_N = float(TRUE.optimal(near["C"])[0])
        assert (near["n_points"], near["n_fitted"], far["n_fitted"]) == (9, 5, 9)
        assert near["N_opt"] == pytest.approx(true_N, rel=0.15)
        assert not far["N_opt"] == pytest.approx(true_N, rel=0.25)


def test_approach2_window_needs_three_sizes():
    with pytest.raises(ValueError, match=r"window=2.*allowed 0 \(all sizes\) or >= 3"):
        fit_approach2(isoflop_points(), n_bootstrap=0, window=2)


def test_approach2_groups_by_launch_budget_when_known():
    # C up to 50 % over the budget would split or merge groups by C; the launch budget keeps them apart.
    points = [Point(p.N, p.D, p.C * (1.5 if i % 2 else 1.0), p.loss, p.run_id, p.source, budget=float(f"{p.C:.0e}"))
              for i, p in enumerate(isoflop_points(budgets=(1e17, 1e18, 1e19)))]
    assert len(fit_approach2(points, n_bootstrap=0).details["budgets"]) == 3


@pytest.mark.parametrize("budgets, sizes, phrase", [
    ((1e18,), 9, r"at least 2 FLOP budgets with a minimum inside their sizes; got 1 of 1:\n  C = 1.01e\+18 \(9 points, 9 sizes\): usable"),
    ((1e17, 1e18), 2, r"got 0 of 2:\n  C = 1.01e\+17 \(2 points, 2 sizes\): left out: 2 model sizes; a parabola needs 3"),
    ((), 2, r"got 0 of 0 \(no points\)"),
])
def test_approach2_too_few_points(budgets, sizes, phrase):
    with pytest.raises(ValueError, match=phrase):
        fit_approach2(isoflop_points(budgets, sizes), n_bootstrap=0)


def continuous_points(n: int = 200, seed: int = 0, noise: float = 0.002) -> list[Point]:
    """Runs without fixed budgets: C log-uniform over 3 decades (1e17 to 1e20), N within +-1 decade
    of the 20-tokens-per-parameter guess, loss from the law."""
    rng = np.random.default_rng(seed)
    C = 10 ** rng.uniform(17, 20, n)
    N = np.sqrt(C / 120) * 10 ** rng.uniform(-1, 1, n)
    loss = TRUE.loss(N, C / (6 * N)) * np.exp(rng.normal(0, noise, n))
    return [Point(N=float(x), D=float(c / (6 * x)), C=float(c), loss=float(l), run_id=f"r{i}", source="synthetic")
            for i, (x, c, l) in enumerate(zip(N, C, loss))]


def launch_budgets(points: list[Point]) -> list[Point]:
    return [Point(p.N, p.D, p.C, p.loss, p.run_id, p.source, budget=float(f"{p.C:.0e}")) for p in points]


@pytest.mark.parametrize("data", ["continuous", "isoflop", "law grid"])
@pytest.mark.parametrize("tolerance", [0.25, 0.1])
def test_budgets_by_C_have_bounded_spread(data, tolerance):
    points = {"continuous": continuous_points, "isoflop": isoflop_points, "law grid": law_points}[data]()
    groups = group_budgets(points, tolerance)
    assert sorted(p.run_id for g in groups for p in g) == sorted(p.run_id for p in points)  # a partition
    for g in groups:
        C = [p.C for p in g]
        assert max(C) <= (1 + tolerance) * min(C)
        centre = budget_flops(g)  # the C the fit gives the budget
        assert all(centre / (1 + tolerance) <= c <= centre * (1 + tolerance) for c in C)
    for g, h in zip(groups, groups[1:]):  # each group took every point it could: none fits in the one before
        assert h[0].C > (1 + tolerance) * g[0].C


def test_budgets_by_C_group_as_worked_out_by_hand():
    C = [1.0, 1.1, 1.2, 1.3, 1.5, 1.6, 2.0, 10.0, 11.0]
    points = [Point(N=float(i + 1), D=c * 1e18 / (6 * (i + 1)), C=c * 1e18, loss=3.0, run_id=str(c), source="s")
              for i, c in enumerate(C)]
    # Each group starts at its cheapest point and reaches 1.25x it: 1.0 -> 1.25, 1.3 -> 1.625, 2.0, 10 -> 12.5.
    # Joining each point to the previous one (within 25 %) would chain 1.0 ... 2.0 into one budget.
    expected = [["1.0", "1.1", "1.2"], ["1.3", "1.5", "1.6"], ["2.0"], ["10.0", "11.0"]]
    assert [[p.run_id for p in g] for g in group_budgets(points[::-1], 0.25)] == expected
    assert [[p.run_id for p in g] for g in group_budgets(points, 0.5)] == [["1.0", "1.1", "1.2", "1.3", "1.5"],
                                                                           ["1.6", "2.0"], ["10.0", "11.0"]]
    # The 8 x 8 grid: C = 6 N D takes 15 values 10^(3/7) = 2.7x apart, along the diagonals of the grid.
    assert [len(g) for g in group_budgets(law_points())] == [1, 2, 3, 4, 5, 6, 7, 8, 7, 6, 5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="budget tolerance -0.1: must be a finite number >= 0"):
        group_budgets(points, -0.1)


@pytest.mark.parametrize("data", ["continuous", "launch budgets"])
def test_budgets_and_the_fit_do_not_depend_on_the_order_of_the_points(data):
    points = continuous_points() if data == "continuous" else launch_budgets(isoflop_points(sizes=6, noise=0.01, seed=3))
    rng = np.random.default_rng(1)
    orders = [points, points[::-1], *([points[i] for i in rng.permutation(len(points))] for _ in range(3))]
    groupings = [[[p.run_id for p in g] for g in group_budgets(order)] for order in orders]
    assert all(g == groupings[0] for g in groupings)
    fits = [fit_approach2(order, n_bootstrap=5).as_dict() for order in orders]  # the resamples too
    assert all(f == fits[0] for f in fits)


def test_approach2_on_continuous_compute_fits_only_bracketed_budgets():
    result = fit_approach2(continuous_points(), n_bootstrap=0)
    assert result.details["grouped_by"] == "C" and len(result.details["budgets"]) >= 2
    for m in result.details["budgets"]:
        lo, hi = m["N_range"]
        assert lo <= m["N_opt"] <= hi and m["loss_min"] > 0 and m["why"] is None
    for m in result.details["dropped_budgets"]:
        assert m["why"]
        if "lies outside" in m["why"]:  # the reason says on which side sizes are missing
            assert ("add smaller sizes" if m["N_opt"] < m["N_range"][0] else "add larger sizes") in m["why"]
    assert abs(result.value("a") - TRUE_A) < 0.05


N0 = 1e8  # the sizes of the bad budgets below: N0 e^x


def bad_budgets() -> list[Point]:
    """Three budgets whose parabolas (exact in x = ln(N / N0)) give no optimum: C = 1e21 opens downward
    (3 - 0.1 x^2); C = 1e22 has its vertex at x = 3, beyond its sizes x in [-2, 2] (3 + 0.1 (x - 3)^2);
    C = 1e23 has its vertex inside, at x = 0, but its loss is 0.1 - 1.9 / 3 < 0 (least squares through
    2 at x = +-2 and 0.1 at x = +-1: c2 = 1.9 / 3, c0 = 0.1 - c2)."""
    profiles = [(1e21, [-2, -1, 0, 1, 2], lambda x: 3 - 0.1 * x**2),
                (1e22, [-2, -1, 0, 1, 2], lambda x: 3 + 0.1 * (x - 3) ** 2),
                (1e23, [-2, -1, 1, 2], lambda x: {1: 0.1, 2: 2.0}[abs(x)])]
    return [Point(N=N0 * math.exp(x), D=C / (6 * N0 * math.exp(x)), C=C, loss=float(f(x)), run_id=f"{C:g}-{x}", source="s")
            for C, xs, f in profiles for x in xs]


BAD_WHY = {  # the reason each bad budget is left out
    1e21: "the parabola opens downward (no minimum)",
    1e22: f"its vertex N = {N0 * math.exp(3):.3g} lies outside the fitted sizes [{N0 * math.exp(-2):.3g}, "
          f"{N0 * math.exp(2):.3g}] (the profile does not bracket its optimum: add larger sizes)",
    1e23: f"its vertex loss is {0.1 - 1.9 / 3:.3g}, not a positive finite number",
}


def test_approach2_leaves_out_budgets_without_a_minimum_inside_saying_why():
    good = isoflop_points(budgets=(1e17, 1e18, 1e19))
    result = fit_approach2(good + bad_budgets(), n_bootstrap=0)
    dropped = result.details["dropped_budgets"]
    assert [(m["C"], m["why"]) for m in dropped] == [pytest.approx((C, why)) for C, why in BAD_WHY.items()]
    assert dropped[2]["N_opt"] == pytest.approx(N0) and dropped[2]["loss_min"] == pytest.approx(0.1 - 1.9 / 3)
    assert len(result.details["budgets"]) == 3 and result.n_points == 27
    alone = fit_approach2(good, n_bootstrap=0)  # the fit is that of the good budgets alone
    assert result.params == alone.params


def test_cli_lists_the_budgets_it_left_out(tmp_path, capsys):
    write_csv(tmp_path / "points.csv", isoflop_points(budgets=(1e17, 1e18, 1e19)) + bad_budgets())
    code, out, err = run_main(["fit", str(tmp_path / "points.csv"), "--approaches", "2", "--bootstrap", "0",
                               "--no-plots", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "(27 points of 3 budgets, 3 left out, 0 bootstrap resamples)" in out
    for C, why in BAD_WHY.items():
        n = 4 if C == 1e23 else 5
        assert f"warning: Approach 2: left out the budget C = {C:.3g} ({n} points, {n} sizes): {why}\n" in err
    details = json.loads((tmp_path / "o" / "fit.json").read_text())["approaches"]["2"]["details"]
    assert [(m["C"], m["why"]) for m in details["dropped_budgets"]] == [pytest.approx((C, why)) for C, why in BAD_WHY.items()]


def test_cli_approach2_alone_with_under_two_budgets_exits_2_listing_each(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "points.csv", isoflop_points(budgets=(1e17,)) + bad_budgets() + isoflop_points((1e19,), sizes=2))
    code, out, err = run_main(["fit", "points.csv", "--approaches", "2", "--bootstrap", "0"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == ("llm-scaling: error: Approach 2 needs at least 2 FLOP budgets with a minimum inside their "
                        "sizes; got 1 of 5:")
    # The CSV has no C column: C = 6 N D, the budget without the overshoot of isoflop_points.
    assert lines[1:3] == ["  C = 1e+17 (9 points, 9 sizes): usable",
                          "  C = 1e+19 (2 points, 2 sizes): left out: 2 model sizes; a parabola needs 3"]
    assert lines[3:] == [f"  C = {C:.3g} ({4 if C == 1e23 else 5} points, {4 if C == 1e23 else 5} sizes): left out: {why}"
                         for C, why in BAD_WHY.items()]
    assert not (tmp_path / "scaling").exists()  # nothing written
    # Beside another approach, Approach 2 is skipped with the same list, and the other one fits.
    code, out, err = run_main(["fit", "points.csv", "--approaches", "2,kaplan", "--bootstrap", "0", "--no-plots"], capsys)
    assert code == 0, err
    assert "Approach 2: skipped: Approach 2 needs at least 2 FLOP budgets" in out and BAD_WHY[1e22] in out
    assert "left out: the parabola opens downward" in json.loads((tmp_path / "scaling" / "fit.json").read_text())["skipped"]["2"]


# ---------------------------------------------------------------- Approach 1 and Kaplan

def test_approach1_envelope_gives_the_law_exponents():
    result = fit_approach1(law_curves(), n_bootstrap=10)
    assert abs(result.value("a") - TRUE_A) < 0.03
    assert abs(result.value("b") - (1 - TRUE_A)) < 0.03
    # Only interior sizes are kept: where the smallest or largest model wins, the optimum may lie beyond.
    assert min(result.details["sizes_on_envelope"]) > 1e6 and max(result.details["sizes_on_envelope"]) < 1e9


def test_approach1_needs_two_sizes():
    with pytest.raises(ValueError, match=r"at least 2 model sizes; got 1 curves of 1 size"):
        fit_approach1(law_curves(sizes=[1e7]), n_bootstrap=0)


def test_kaplan_fit_recovers_a_pure_power_law_and_needs_points():
    C = np.logspace(15, 21, 12)
    points = [Point(N=1.0, D=c / 6, C=c, loss=(2.3e8 / c) ** 0.05, run_id=str(i), source="s") for i, c in enumerate(C)]
    result = fit_kaplan(points, n_bootstrap=5)
    assert result.value("alpha_C") == pytest.approx(0.05, rel=1e-6)
    assert result.value("C_c") == pytest.approx(2.3e8, rel=1e-4)
    with pytest.raises(ValueError, match=r"at least 3 points.*got 2"):
        fit_kaplan(points[:2], n_bootstrap=0)


# ---------------------------------------------------------------- planning

def test_plan_with_published_chinchilla_matches_the_closed_form():
    C = 5.76e23
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    N = G * (C / 6) ** (beta / (alpha + beta))
    D = (C / 6) ** (alpha / (alpha + beta)) / G
    result = plan(flops=C)
    assert result["N"] == pytest.approx(N, rel=1e-9) and 3e10 < result["N"] < 4e10
    assert result["D"] == pytest.approx(D, rel=1e-9)
    assert result["loss"] == pytest.approx(E + A / N**alpha + B / D**beta, rel=1e-9)
    assert result["C"] == pytest.approx(6 * result["N"] * result["D"], rel=1e-12)


@pytest.mark.parametrize("C", [1e15, 5.76e23])
def test_plan_round_trips_between_flops_tokens_and_params(C):
    by_flops = plan(flops=C)
    by_tokens = plan(tokens=by_flops["D"])
    by_params = plan(params=by_flops["N"])
    for other in (by_tokens, by_params):
        for key in ("C", "N", "D", "loss"):
            assert other[key] == pytest.approx(by_flops[key], rel=1e-9), key
        assert other["C"] == pytest.approx(6 * other["N"] * other["D"], rel=1e-12)


def test_plan_from_a_fit_uses_its_law(approach3):
    result = plan(flops=1e20, fit=approach3)
    law = approach3.law()
    N, D = law.optimal(1e20)
    assert result["N"] == pytest.approx(float(N)) and result["D"] == pytest.approx(float(D))
    assert result["loss"] == pytest.approx(float(law.loss(N, D)))
    assert "Approach 3" in result["law"]
    with pytest.raises(ValueError, match="exactly one of flops, tokens, params"):
        plan(flops=1e20, tokens=1e9)


@pytest.mark.parametrize("target", np.logspace(5, 9, 9))
def test_shape_for_params_hits_the_target(target):
    shape = shape_for_params(target)
    size = model_size(ModelConfig(**shape, vocab_size=2048))
    # Below 1e6 the allowed shapes are sparse: nothing lies between 4 layers of width 64 (214K) and
    # 2 of width 128 (402K).
    assert abs(size.non_embedding / target - 1) < (0.25 if target >= 1e6 else 0.35), (shape, size.non_embedding)
    assert shape["d_model"] % 64 == 0 and shape["d_model"] == 64 * shape["n_heads"]
    assert shape["d_model"] / shape["n_layers"] >= 16  # never deeper than the minimum aspect ratio
    if target >= 1e7:  # big enough for the aspect-ratio rule not to be bent by rounding
        assert 32 <= shape["d_model"] / shape["n_layers"] <= 128


@pytest.mark.parametrize("target, width", [(1.2e4, 32), (2.5e4, 48), (5e4, 64)])
def test_small_shapes_step_by_16_in_width_with_one_head(target, width):
    shape = shape_for_params(target)
    assert shape["d_model"] == width and shape["n_heads"] == 1
    assert abs(shape_params(shape) / target - 1) < 0.15


def test_depth_stops_at_the_minimum_aspect_ratio():
    # By count alone 3e5 would be 6 layers of width 64 (aspect 11); 4 is the most width 64 allows.
    assert shape_for_params(3e5) == {"n_layers": 4, "d_model": 64, "n_heads": 1}
    assert shape_for_params(4e5) == {"n_layers": 2, "d_model": 128, "n_heads": 2}
    assert shape_for_params(1e9)["n_layers"] > 16  # large models keep the ~64 aspect ratio


def test_the_ladder_lr_rule():
    assert ladder_lr(1e5) == pytest.approx(4e-3)
    assert ladder_lr(4e5) == pytest.approx(2e-3)  # N^(-1/2)
    assert ladder_lr(1e3) == 1e-2  # capped
    # OLMo's constants, as sweeps/isoflop_cluster passes them: 4.7e-3 at 1.08e8, N^(-1/3).
    assert ladder_lr(8 * 1.08e8, 4.7e-3, 1.08e8, 1 / 3) == pytest.approx(4.7e-3 / 2)
    with pytest.raises(ValueError, match="model.size=0"):
        ladder_lr(0)


def test_the_ladder_batch_rule():
    # OLMo's ladder: 160 sequences of 2048 tokens at 1.08e8 parameters, rounded to 32 sequences.
    assert ladder_batch(1.08e8, 2048, 32) == 160
    assert ladder_batch(8 * 1.08e8, 2048, 32) == 640  # grows as N^(2/3): 8^(2/3) = 4
    assert ladder_batch(1.08e8, 128, 16) == 160 * 16  # the same tokens in 16x shorter sequences
    assert ladder_batch(1e4, 128, 16) == 16  # at least one micro-batch step
    assert all(ladder_batch(n, 128, 24) % 24 == 0 for n in np.logspace(4, 9, 11))
    with pytest.raises(ValueError, match="must be > 0"):
        ladder_batch(1e6, 128, 0)


def test_ladder_sweeps_take_lr_and_batch_from_the_rules(tmp_path):
    cfg = compose_train(["sweep=ladder", "model.size=8e5"], tmp_path)
    validate(cfg)
    assert cfg.optim.lr == pytest.approx(ladder_lr(8e5))
    assert cfg.data.global_batch_size == ladder_batch(8e5, 128, 16) == 96
    cfg = compose_train(["sweep=isoflop_cluster", "model.size=4e8"], tmp_path)
    assert cfg.optim.lr == pytest.approx(4.7e-3 * (4e8 / 1.08e8) ** (-1 / 3), rel=1e-5)
    assert cfg.data.global_batch_size == ladder_batch(4e8, 2048, 64) == 384
    # Two data-parallel ranks: the batch is a multiple of micro-batch x ranks, and validates.
    cfg = compose_train(["sweep=ladder", "model.size=8e5", "parallelism=ddp", "trainer.devices=2"], tmp_path)
    validate(cfg)
    assert cfg.data.global_batch_size == ladder_batch(8e5, 128, 32) == 96
    cfg = compose_train(["sweep=ladder", "model.size=2e6", "parallelism=ddp", "trainer.devices=2"], tmp_path)
    assert cfg.data.global_batch_size % 32 == 0 and cfg.data.global_batch_size == ladder_batch(2e6, 128, 32)
    cfg = compose_train(["sweep=ladder", "model.size=8e5", "optim.lr=1e-3", "data.global_batch_size=32"], tmp_path)
    assert (cfg.optim.lr, cfg.data.global_batch_size) == (1e-3, 32)  # overridable


def test_shape_for_total_params_counts_the_embedding():
    shape = shape_for_params(1e7, kind="total", vocab_size=32000)
    size = model_size(ModelConfig(**shape, vocab_size=32000))
    assert abs(size.params / 1e7 - 1) < 0.25
    assert size.non_embedding < 0.8e7


def test_config_overrides_compose_into_a_valid_run(tmp_path):
    overrides = config_overrides(3e6, 6e7)
    assert overrides[-2:] == ["budget=tokens", "budget.tokens=60000000"]
    cfg = compose_train(overrides, tmp_path)
    validate(cfg)
    shape = shape_for_params(3e6)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (shape["n_layers"], shape["d_model"], shape["n_heads"])
    assert cfg.budget.tokens == 6e7 and cfg.budget.steps is None


# ---------------------------------------------------------------- loading

def write_run(run_dir: Path, N: float, D: float, loss: float, status: str = "completed",
              val: list[tuple[int, float]] | None = None, tokens_per_step: int = 1000) -> None:
    run_dir.mkdir(parents=True)
    fpt = 6.0 * N
    summary = {"run_id": run_dir.name, "status": status, "N": N, "N_non_embedding": N / 2, "flops_per_token": fpt,
               "tokens_per_step": tokens_per_step, "D": D, "C": D * fpt, "val/loss": loss,
               "best_val/loss": loss - 0.01, "choices": {"model": "tiny"}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    records = [{"step": s, "train/loss": l + 0.1, "trainer/tokens": s * tokens_per_step,
                "trainer/flops": s * tokens_per_step * fpt} for s, l in val or []]
    records += [{"step": s, "val/loss": l, "val/ppl": math.exp(l)} for s, l in val or []]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9')  # torn line


def test_load_points_reads_a_sweep_and_skips_unfinished_runs(tmp_path):
    sweep = tmp_path / "multirun" / "2025-01-01_00-00-00"
    write_run(sweep / "0", N=1e6, D=2e7, loss=4.0, val=[(10, 5.0), (20, 4.0)])
    write_run(sweep / "sub" / "1", N=2e6, D=3e7, loss=3.5, val=[(30, 3.5)])  # nested one level deeper
    write_run(sweep / "2", N=4e6, D=3e7, loss=9.0, status="failed")
    write_run(sweep / "3", N=4e6, D=3e7, loss=9.0, status="running")

    runs = load_runs([str(sweep)])
    assert sorted((p.N, p.D, p.loss) for p in runs.points) == [(1e6, 2e7, 4.0), (2e6, 3e7, 3.5)]
    assert sorted(Path(k).name for k in runs.skipped) == ["2", "3"]
    assert "failed" in runs.skipped[str(sweep / "2")]
    point = next(p for p in runs.points if p.N == 1e6)
    assert point.C == 2e7 * 6e6 and point.run_id == "0" and point.source == str(sweep)

    assert sorted(p.N for p in load_points([str(sweep)], n_kind="non_embedding")) == [5e5, 1e6]
    assert sorted(p.N for p in load_points([str(sweep)], n_kind="active")) == [1e6, 2e6]  # dense: N

    # An MoE run: N counts every expert, params_active the ones a token passes through; C is active compute.
    moe = sweep / "moe"
    write_run(moe, N=8e6, D=1e7, loss=3.0, val=[(10, 3.0)])
    summary = json.loads((moe / "summary.json").read_text())
    (moe / "summary.json").write_text(json.dumps({**summary, "params_active": 2e6, "flops_per_token": 1.2e7,
                                                  "C": 1e7 * 1.2e7}))
    by_kind = {kind: next(p for p in load_points([str(sweep)], n_kind=kind) if p.run_id == "moe")
               for kind in ("total", "active")}
    assert (by_kind["total"].N, by_kind["active"].N) == (8e6, 2e6)
    assert by_kind["total"].C == by_kind["active"].C == 1e7 * 1.2e7
    assert next(c for c in load_curves([str(sweep)], n_kind="active") if c.run_id == "moe").N == 2e6
    shutil.rmtree(moe)
    assert sorted(p.loss for p in load_points([str(sweep)], loss_key="best_val/loss")) == [3.49, 3.99]

    curve = next(c for c in load_curves([str(sweep)]) if c.N == 1e6)
    # FLOPs at a val record = step x tokens_per_step x flops_per_token
    assert curve.C.tolist() == [10 * 1000 * 6e6, 20 * 1000 * 6e6]
    assert curve.loss.tolist() == [5.0, 4.0] and curve.D.tolist() == [1e4, 2e4]


def test_load_points_reads_csv_with_and_without_C(tmp_path):
    (tmp_path / "a.csv").write_text("N,D,loss\n1e6,2e7,3.5\n2e6,4e7,3.1\n")
    (tmp_path / "b.csv").write_text("run_id,N,D,C,loss,budget\nx,1e6,2e7,1.5e14,3.4,1e14\n")
    a = load_points([str(tmp_path / "a.csv")])
    assert [(p.N, p.D, p.C, p.loss) for p in a] == [(1e6, 2e7, 6 * 1e6 * 2e7, 3.5), (2e6, 4e7, 6 * 2e6 * 4e7, 3.1)]
    (b,) = load_points([str(tmp_path / "b.csv")])
    assert (b.C, b.budget, b.run_id) == (1.5e14, 1e14, "x")


def test_csv_missing_a_column_names_it(tmp_path):
    (tmp_path / "bad.csv").write_text("N,D,val_loss\n1e6,2e7,3.5\n")
    with pytest.raises(ValueError, match=r"missing column 'loss'"):
        load_points([str(tmp_path / "bad.csv")])
    (tmp_path / "nan.csv").write_text("N,D,loss\n1e6,abc,3.5\n")
    with pytest.raises(ValueError, match=r"nan.csv:2: column 'D': not a number"):
        load_points([str(tmp_path / "nan.csv")])


def test_wandb_source_spec_and_error_without_credentials():
    assert parse_wandb_spec("wandb:me/proj") == ("me", "proj", None)
    assert parse_wandb_spec("wandb:me/proj/isoflop") == ("me", "proj", "isoflop")
    with pytest.raises(ValueError, match="expected wandb:<entity>/<project>"):
        parse_wandb_spec("wandb:proj")
    pytest.importorskip("wandb")
    with pytest.raises(RuntimeError, match="wandb login"):  # conftest removes every credential
        load_points(["wandb:me/proj"])


# ---------------------------------------------------------------- CLI

def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        scaling_main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def write_csv(path: Path, points: list[Point]) -> None:
    path.write_text("N,D,loss\n" + "".join(f"{float(p.N)!r},{float(p.D)!r},{float(p.loss)!r}\n" for p in points))


def test_cli_fit_on_a_csv_writes_fit_json_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "points.csv", isoflop_points(budgets=(1e17, 1e18, 1e19), sizes=7))
    code, out, err = run_main(["fit", "points.csv", "--bootstrap", "3"], capsys)
    assert code == 0, err
    assert "Approach 1: skipped" in out and "Approach 3:" in out and "alpha" in out
    fit = json.loads((tmp_path / "scaling" / "fit.json").read_text())  # default --out for a file source
    assert fit["n_points"] == 21 and sorted(fit["succeeded"]) == ["2", "3", "kaplan"]
    assert "loss curves" in fit["skipped"]["1"]
    assert set(fit["approaches"]["3"]["params"]["alpha"]) == {"value", "low", "high"}
    names = sorted(Path(p).name for p in fit["plots"])
    assert names == ["frontier.png", "isoflops.png", "loss_vs_compute.png", "residuals.png"]
    for name in names:
        data = (tmp_path / "scaling" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000

    code, out, err = run_main(["plan", "--flops", "1e19", "--fit", "scaling/fit.json"], capsys)
    assert code == 0, err
    assert "Approach 3" in out and "expected loss" in out and "budget=tokens" in out


def test_cli_fit_on_a_sweep_with_curves_runs_approach1(tmp_path, capsys):
    sweep = tmp_path / "multirun" / "stamp"
    steps = np.unique(np.logspace(1, 7, 60).astype(int))
    for i, curve in enumerate(law_curves()):
        val = [(int(s), float(TRUE.loss(curve.N, s * 1e6))) for s in steps]
        write_run(sweep / str(i), N=curve.N, D=steps[-1] * 1e6, loss=val[-1][1], val=val, tokens_per_step=1_000_000)
    write_run(sweep / "99", N=1e7, D=1e9, loss=3.0, status="failed")
    code, out, err = run_main(["fit", str(sweep), "--approaches", "1,kaplan", "--bootstrap", "0"], capsys)
    assert code == 0, err
    assert "skipped 1 run(s)" in out
    fit = json.loads((sweep / "scaling" / "fit.json").read_text())  # default --out for a directory
    assert fit["n_curves"] == 13 and sorted(fit["succeeded"]) == ["1", "kaplan"]
    assert abs(fit["approaches"]["1"]["params"]["a"]["value"] - TRUE_A) < 0.03


def test_cli_fit_with_too_few_points_fails_saying_why(tmp_path, capsys):
    write_csv(tmp_path / "few.csv", law_points()[:2])  # below every approach's minimum
    code, out, err = run_main(["fit", str(tmp_path / "few.csv"), "--out", str(tmp_path / "o"), "--bootstrap", "0"], capsys)
    assert code == 1
    assert "Approach 3: skipped: Approach 3 needs at least 5 points" in out and "no approach could run" in err
    fit = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert fit["succeeded"] == [] and set(fit["skipped"]) == {"1", "2", "3", "kaplan"}


def test_cli_fit_reports_a_bad_csv_by_column(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("N,loss\n1e6,3.5\n")
    code, _, err = run_main(["fit", str(tmp_path / "bad.csv")], capsys)
    assert code == 2 and "missing column 'D'" in err


def test_cli_plan_prints_chinchilla_allocation_and_overrides(capsys):
    code, out, err = run_main(["plan", "--flops", "1e18"], capsys)
    assert code == 0, err
    expected = plan(flops=1e18)
    assert f"N = {expected['N']:.4g}" in out and "Chinchilla" in out
    overrides = out.strip().splitlines()[-1].split()
    assert overrides == config_overrides(expected["N"], expected["D"], "total", 2048)
    code, _, err = run_main(["plan", "--flops", "1e18", "--tokens", "1e9"], capsys)
    assert code == 2 and "not allowed with argument" in err


def test_cli_help_explains_sources_and_approaches(capsys):
    code, out, _ = run_main(["fit", "--help"], capsys)
    assert code == 0 and "wandb:ENTITY/PROJECT" in out and "IsoFLOP" in out and "--n-kind" in out
    code, out, _ = run_main(["plan", "--help"], capsys)
    assert code == 0 and "--flops" in out and "Chinchilla" in out


# ---------------------------------------------------------------- bad inputs through the CLI

# The same value spelled for JSON (summary.json) and for a CSV cell, and what the message says of it.
BAD_VALUES = [  # (id, JSON, CSV, phrase)
    ("nan", "NaN", "nan", "is nan, not a finite number"),
    ("inf", "Infinity", "inf", "is inf, not a finite number"),
    ("zero", "0", "0", "is 0, not > 0"),
    ("negative", "-3", "-3", "is -3, not > 0"),
    ("huge", "1e999", "1e999", "is inf, not a finite number"),  # beyond float64: reads as inf
    ("text", '"abc"', "abc", "not a number"),
]
KEYS = [("N", "N"), ("D", "D"), ("C", "C"), ("loss", "val/loss")]  # (CSV column, summary.json key)
GOOD = {"N": 1e6, "D": 2e7, "C": 1.2e14, "loss": 3.5}


def sweep_with(root: Path, summary_text: str | None = None, **files: bytes | str | None) -> Path:
    """A sweep of two completed runs and a diverged one (NaN loss: skipped, not an error); the run
    `bad` gets `summary_text` as its summary.json (else a good one) and `files` (name -> content;
    None makes a directory of that name)."""
    sweep = root / "sweep"
    write_run(sweep / "good", N=1e6, D=2e7, loss=3.5, val=[(10, 4.0), (20, 3.5)])
    write_run(sweep / "diverged", N=2e6, D=2e7, loss=math.nan, status="diverged")
    write_run(sweep / "bad", N=4e6, D=2e7, loss=3.2, val=[(10, 3.8), (20, 3.2)])
    bad = sweep / "bad"
    if summary_text is not None:
        (bad / "summary.json").write_text(summary_text)
    place_files(bad, files)
    return sweep


def summary_with(key: str, raw: str) -> str:
    """A completed run's summary.json text whose `key` is the raw JSON `raw` (NaN, Infinity, 1e999...)."""
    summary = {"run_id": "bad", "status": "completed", "N": 4e6, "D": 2e7, "C": 4.8e14, "val/loss": 3.2,
               "flops_per_token": 2.4e7, "tokens_per_step": 1000, key: "@VALUE@"}
    return json.dumps(summary).replace('"@VALUE@"', raw)


def csv_with(column: str, text: str) -> str:
    """Two rows of N, D, C, loss; the second (line 3) has `text` in `column`."""
    bad = {**GOOD, column: text}
    return "N,D,C,loss\n1e6,2e7,1.2e14,3.5\n" + ",".join(str(bad[c]) for c in ("N", "D", "C", "loss")) + "\n"


FIT_3 = {"approaches": {"3": {"params": {k: {"value": v} for k, v in TRUE.as_dict().items()}}}}


def fit_json(root: Path, content: str | dict | list | None) -> None:
    """root/fit.json: text, JSON of a dict or list, or a directory (None)."""
    path = root / "fit.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))


def with_params(approach: str, **values) -> dict:
    return {"approaches": {approach: {"params": {k: {"value": v} for k, v in values.items()}}}}


LATIN1 = "N,D,loss\n1e6,2e7,3.5 caf\xe9\n".encode("latin-1")
PLAN = ["plan", "--flops", "1e18", "--fit", "{root}/fit.json"]
# (id, arguments ({root}: the test's folder), what to write there, phrases the message must contain)
SCALING_CASES = [
    # -- the sources --
    ("csv missing", ["fit", "{root}/points.csv"], lambda r: None, ["source:", "points.csv does not exist", "columns N, D, loss"]),
    ("source missing", ["fit", "{root}/sweep"], lambda r: None, ["sweep does not exist", "give a run or sweep directory"]),
    ("csv empty", ["fit", "{root}/points.csv"], lambda r: (r / "points.csv").write_text(""), ["points.csv is empty"]),
    ("csv not UTF-8", ["fit", "{root}/points.csv"], lambda r: (r / "points.csv").write_bytes(LATIN1),
     ["points.csv is not UTF-8", "UTF-8 CSV"]),
    ("csv header only", ["fit", "{root}/points.csv"], lambda r: (r / "points.csv").write_text("N,D,loss\n"),
     ["points.csv has a header but no rows"]),
    ("csv missing a column", ["fit", "{root}/points.csv"], lambda r: (r / "points.csv").write_text("N,D,val_loss\n1,2,3\n"),
     ["points.csv: missing column 'loss'", "['N', 'D', 'val_loss']"]),
    ("csv row cut short", ["fit", "{root}/points.csv"], lambda r: (r / "points.csv").write_text("N,D,loss\n1e6,2e7,3\n1e6,2e7\n"),
     ["points.csv:3: column 'loss': not a number: ''", "or delete the row"]),
    ("csv name on a directory", ["fit", "{root}/points.csv"], lambda r: (r / "points.csv").mkdir(),
     ["points.csv has no summary.json below it"]),
    ("neither directory nor csv", ["fit", "{root}/points.txt"], lambda r: (r / "points.txt").write_text("N,D,loss\n"),
     ["points.txt is neither a run/sweep directory nor a .csv file"]),
    ("6ND overflows", ["fit", "{root}/points.csv"], lambda r: (r / "points.csv").write_text("N,D,loss\n1e200,1e200,3\n"),
     ["points.csv:2: C = 6 N D = 6 x 1e+200 x 1e+200 is inf"]),
    # -- a run's files --
    ("summary.json empty", ["fit", "{root}/sweep"], lambda r: sweep_with(r, ""), ["bad/summary.json is empty", "rerun the run"]),
    ("summary.json cut short", ["fit", "{root}/sweep"], lambda r: sweep_with(r, '{"status": "compl'),
     ["bad/summary.json is not JSON", "cut short?"]),
    ("summary.json a list", ["fit", "{root}/sweep"], lambda r: sweep_with(r, "[1, 2]"),
     ["bad/summary.json holds list, not a JSON object"]),
    ("summary.json not UTF-8", ["fit", "{root}/sweep"], lambda r: sweep_with(r, summary_json=b'{"status": "\xff"}'),
     ["bad/summary.json is not UTF-8"]),
    ("summary.json a directory", ["fit", "{root}/sweep"], lambda r: sweep_with(r, summary_json=None),
     ["bad/summary.json is a directory, not a file"]),
    ("metrics.jsonl a directory", ["fit", "{root}/sweep"], lambda r: sweep_with(r, metrics_jsonl=None),
     ["bad/metrics.jsonl is a directory, not a file"]),
    ("metrics.jsonl not UTF-8", ["fit", "{root}/sweep"], lambda r: sweep_with(r, metrics_jsonl=b'{"step": 1}\n\xff\xfe\n{}\n'),
     ["bad/metrics.jsonl is not UTF-8"]),
    ("metrics.jsonl torn before its end", ["fit", "{root}/sweep"],
     lambda r: sweep_with(r, metrics_jsonl='{"step": 10, "val/l\n{"step": 20, "val/loss": 3.2}\n'),
     ["bad/metrics.jsonl line 1 is not JSON"]),
    ("metrics.jsonl record a list", ["fit", "{root}/sweep"], lambda r: sweep_with(r, metrics_jsonl='[10, 3.2]\n{"step": 1}\n'),
     ["bad/metrics.jsonl line 1 holds list, not a JSON object"]),
    ("metrics.jsonl negative loss", ["fit", "{root}/sweep"],
     lambda r: sweep_with(r, metrics_jsonl='{"step": 10, "val/loss": -1.5}\n'), ["has val/loss -1.5 at step 10, not > 0"]),
    ("run.json cut short", ["fit", "{root}/sweep"], lambda r: sweep_with(r, run_json='{"config": {"bud'),
     ["bad/run.json is not JSON"]),
    ("--out is a file", ["fit", "{root}/sweep", "--out", "{root}/sweep/good/summary.json"], sweep_with,
     ["--out:", "summary.json is a file, not a directory"]),
    # -- llm-scaling plan --fit --
    ("fit.json missing", PLAN, lambda r: None, ["--fit:", "fit.json does not exist", "llm-scaling fit"]),
    ("fit.json a directory", PLAN, lambda r: fit_json(r, None), ["fit.json is a directory, not a file"]),
    ("fit.json cut short", PLAN, lambda r: fit_json(r, '{"approaches": {"3"'), ["fit.json is not JSON"]),
    ("fit.json a list", PLAN, lambda r: fit_json(r, [FIT_3]), ["fit.json holds list, not a JSON object"]),
    ("fit.json without approaches", PLAN, lambda r: fit_json(r, {"succeeded": []}),
     ["fit.json has no 'approaches' object"]),
    ("fit.json parameter text", PLAN, lambda r: fit_json(r, with_params("2", k_N=0.1, a="half")),
     ["approach 2's a = 'half', not a finite number or null"]),
    ("fit.json law incomplete", PLAN, lambda r: fit_json(r, with_params("3", E=None, A=1.0, B=1.0, alpha=0.3, beta=0.3)),
     ["none of Approaches 3, 2, 1 with all its parameters", "3 lacks a value for E"]),
    ("fit.json frontier degenerate", PLAN, lambda r: fit_json(r, with_params("2", k_N=-0.1, a=0.5)),
     ["gives no usable allocation", "plan without --fit"]),
    # -- a completed run's, or a CSV row's, values: each of N, D, C, loss, spelled six bad ways --
    *((f"summary {key} {name}", ["fit", "{root}/sweep"], lambda r, k=key, j=raw: sweep_with(r, summary_with(k, j)),
       ["run:", "bad/summary.json", f"'{key}'", phrase, "although the run completed", "move its directory out"])
      for _, key in KEYS for name, raw, _, phrase in BAD_VALUES),
    *((f"csv {column} {name}", ["fit", "{root}/points.csv"],
       lambda r, c=column, t=text: (r / "points.csv").write_text(csv_with(c, t)),
       ["points.csv:3: column", f"'{column}'", phrase, "positive finite numbers"])
      for column, _ in KEYS for name, _, text, phrase in BAD_VALUES),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name,args,setup,phrases", SCALING_CASES, ids=[c[0] for c in SCALING_CASES])
def test_bad_input_exits_2_naming_it_and_writes_nothing(name, args, setup, phrases, tmp_path, monkeypatch, capsys):
    setup(tmp_path)
    monkeypatch.chdir(tmp_path)  # where a file source's default --out (./scaling) would go
    before = snapshot(tmp_path)
    code, out, err = run_main([a.replace("{root}", str(tmp_path)) for a in args], capsys)
    assert code == 2, err
    assert err.startswith("llm-scaling: error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in: {err}"
    assert snapshot(tmp_path) == before  # no fit.json, no plot
    assert not (tmp_path / "scaling").exists() and not (tmp_path / "sweep" / "scaling").exists()


def test_failed_runs_and_runs_without_a_loss_are_skipped_not_refused(tmp_path, capsys):
    sweep = sweep_with(tmp_path)  # the table's sweep, with nothing damaged: it fits
    write_run(sweep / "no-val", N=3e6, D=2e7, loss=3.0)
    summary = json.loads((sweep / "no-val" / "summary.json").read_text())
    del summary["val/loss"]  # a completed run trained without validation
    (sweep / "no-val" / "summary.json").write_text(json.dumps(summary))
    code, out, err = run_main(["fit", str(sweep), "--approaches", "kaplan", "--bootstrap", "0", "--no-plots"], capsys)
    assert code == 0, err
    assert "skipped 2 run(s)" in out and "diverged: status 'diverged'" in out and "no-val: summary.json lacks val/loss" in out
    assert json.loads((sweep / "scaling" / "fit.json").read_text())["n_points"] == 2


def test_the_bad_input_table_covers_every_value_and_file():
    assert len(SCALING_CASES) >= 70
    assert {c[0].split()[1] for c in SCALING_CASES if c[0].startswith(("summary ", "csv "))} >= {"N", "D", "C", "loss"}
