"""`llm-scaling`: fit scaling laws to finished runs, and plan compute-optimal runs.

  llm-scaling fit runs/multirun/2025-01-01_12-00-00          # a sweep: every summary.json below it
  llm-scaling fit points.csv --approaches 2,3 --bootstrap 200
  llm-scaling plan --flops 1e18                              # published Chinchilla law
  llm-scaling plan --flops 1e18 --fit runs/multirun/.../scaling/fit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from llm.cli.common import CONFIG_ERROR_EXIT_CODE, config_error_in
from llm.files import InputError, write_text

log = logging.getLogger("llm.cli.scaling")  # not __name__: that is __main__ under `python -m`

FIT_HELP = """Fit scaling laws to finished runs and write fit.json plus PNG plots.

Sources (any number, mixed):
  DIR                          a run or Hydra sweep directory: every summary.json below it is one run;
                               runs whose status is not "completed" are skipped (and listed)
  FILE.csv                     columns N, D, loss; optional C (default 6*N*D), budget, run_id
  wandb:ENTITY/PROJECT[/GROUP] finished runs of a W&B project (needs `wandb login` and network)

Approaches (Hoffmann et al. 2022; Kaplan et al. 2020):
  1       lower envelope of the runs' val-loss-vs-FLOPs curves (metrics.jsonl) -> N_opt = k_N C^a, D_opt = k_D C^b
  2       IsoFLOP profiles: a parabola of loss in ln N per FLOP budget -> N_opt(C), D_opt(C) = C / 6 N_opt -> a, b;
          runs are grouped by their launch budget, else by C within a factor 1 + --budget-tolerance. A budget
          whose parabola opens downward, whose vertex lies outside its fitted sizes or whose vertex loss is
          not positive is left out (each is listed with the reason, and in fit.json)
  3       L(N, D) = E + A/N^alpha + B/D^beta (Huber loss on log residuals, L-BFGS); a = beta/(alpha+beta)
  kaplan  L(C) = (C_c / C)^alpha_C on the compute frontier

Intervals are 95 % percentile bootstrap intervals. An approach the data cannot support is skipped
with the reason; the command fails (exit 1) only when none could run.

Exit codes: 0 done; 1 no approach could run; 2 a bad source: a file missing or damaged (not UTF-8,
not JSON, a directory), a CSV column missing, or a completed run or CSV row whose N, D, C or loss is
not a positive finite number (the message names the file, row and key; nothing is written); 2 also
when Approach 2 is the only approach asked for and fewer than 2 budgets are usable (the message
lists each budget and why it was left out; nothing is written)."""

PLAN_HELP = """Compute-optimal parameters N and tokens D for a budget, and the llm-train overrides.

Give one of --flops, --tokens, --params; the others follow from the law and C = 6 N D. The law is
the fit's Approach 3 (else 2, else 1) with --fit, or the published Chinchilla law
L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 (Hoffmann et al. 2022) without. The model shape follows
llm.scaling.plan.shape_for_params: d_model a multiple of 64 (16 below 64), 64-wide heads,
d_model/n_layers ~ 64 and at least 16."""


def _parsed(text: str, kind: type, what: str, ok: Callable[[Any], bool], rule: str) -> Any:
    """An argparse type: `text` as `kind` (int or float) that passes `ok`, else an error naming `rule`."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}: {text!r}")
    return value


def _number(text: str) -> float:
    return _parsed(text, float, "a number", lambda v: math.isfinite(v) and v > 0, "a positive number")


def _count(text: str) -> int:
    return _parsed(text, int, "a whole number", lambda v: v >= 0, ">= 0")


def _fraction(text: str) -> float:
    return _parsed(text, float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _approaches(text: str) -> list[str]:
    from llm.scaling.fit import APPROACHES

    chosen = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in APPROACHES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(APPROACHES)} (comma-separated)")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,plan}")

    fit = sub.add_parser("fit", help="fit scaling laws to runs / CSV / W&B; write fit.json and plots",
                         description=FIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("sources", nargs="+", metavar="SOURCE", help="run/sweep directory, .csv file, or wandb:ENTITY/PROJECT[/GROUP]")
    fit.add_argument("--out", metavar="DIR", help="where fit.json and the PNGs go (default: <first source>/scaling "
                                                  "for a directory, else ./scaling)")
    fit.add_argument("--bootstrap", type=_count, default=100, metavar="R",
                     help="bootstrap resamples per approach for the intervals; 0 = none (default: %(default)s)")
    fit.add_argument("--n-kind", choices=("total", "non_embedding", "active"), default="total",
                     help="N = all parameters (summary key N, as Hoffmann et al.), non-embedding ones "
                          "(N_non_embedding, as Kaplan et al.) or those a token is computed with (params_active: an "
                          "MoE model's routed top-k and shared experts; N for dense runs) (default: %(default)s). "
                          "C always counts the active compute (flops_per_token)")
    fit.add_argument("--approaches", type=_approaches, default="1,2,3,kaplan", metavar="LIST",
                     help="comma-separated subset of 1,2,3,kaplan (default: %(default)s)")
    fit.add_argument("--loss", choices=("final", "best"), default="final",
                     help="each run's final val/loss or its best_val/loss (default: %(default)s)")
    fit.add_argument("--budget-tolerance", type=_fraction, default=0.25, metavar="REL",
                     help="Approach 2 groups runs into FLOP budgets, each starting at its cheapest run and "
                          "taking every run whose C is at most 1 + REL times that, so every run lies within that "
                          "factor of its budget's C; unless every run records its launch budget, which then "
                          "groups them (default: %(default)s)")
    fit.add_argument("--window", type=_count, default=5, metavar="K",
                     help="Approach 2 fits each budget's parabola to its K sizes nearest the lowest loss; "
                          "0 = all sizes (default: %(default)s)")
    fit.add_argument("--kaplan-irreducible", action="store_true",
                     help="fit L(C) = E + (C_c/C)^alpha_C instead of Kaplan's pure power law")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: %(default)s)")
    fit.add_argument("--no-plots", action="store_true", help="write fit.json only")

    plan = sub.add_parser("plan", help="compute-optimal N, D, C and llm-train overrides for a budget",
                          description=PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    given = plan.add_mutually_exclusive_group(required=True)
    given.add_argument("--flops", type=_number, metavar="C", help="training compute in FLOPs, e.g. 1e18")
    given.add_argument("--tokens", type=_number, metavar="D", help="training tokens, e.g. 2e9")
    given.add_argument("--params", type=_number, metavar="N",
                       help="model parameters, e.g. 1e8: total, or non-embedding when the fit used --n-kind non_embedding")
    plan.add_argument("--fit", metavar="FIT_JSON", help="fit.json written by `llm-scaling fit` (default: published Chinchilla law)")
    plan.add_argument("--vocab-size", type=int, default=2048, metavar="V",
                      help="vocabulary for counting embeddings when N is total parameters, and for the FLOPs/token "
                           "of the chosen shape (default: %(default)s, conf/tokenizer/bpe.yaml)")
    plan.add_argument("--seq-len", type=int, default=128, metavar="T",
                      help="sequence length for the attention FLOPs of the chosen shape (default: %(default)s, data.seq_len)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    return parser


# ---------------------------------------------------------------- fit

def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def _finite(data: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def default_out(sources: list[str]) -> Path:
    first = Path(sources[0])
    return first / "scaling" if not sources[0].startswith("wandb:") and first.is_dir() else Path("scaling")


def output_dir(path: Path) -> Path:
    """Where fit.json and the plots go: an existing directory, or one that can be made there."""
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise InputError(f"--out: {parent} is a file, not a directory; give a directory for fit.json and the plots")
        if parent.exists():
            break
    return path


def run_fit(args: argparse.Namespace) -> int:
    from llm.scaling.fit import budget_label, fit_all
    from llm.scaling.points import load_runs

    # Everything is read and checked before anything is written: a bad input leaves no fit.json
    # or plot behind that a later reader (plan, the dashboard) could take for this data's fit.
    out = output_dir(Path(args.out) if args.out else default_out(args.sources))
    try:
        runs = load_runs(args.sources, args.n_kind, "val/loss" if args.loss == "final" else "best_val/loss")
    except RuntimeError as e:  # W&B: credentials or network
        return error(e)
    output(f"data: {len(runs.points)} runs/points, {len(runs.curves)} loss curves from {len(args.sources)} source(s); "
           f"N = {args.n_kind} parameters")
    if runs.skipped:
        output(f"skipped {len(runs.skipped)} run(s):", *(f"  {run}: {why}" for run, why in runs.skipped.items()))

    results, skipped = fit_all(runs, args.approaches, n_bootstrap=args.bootstrap, seed=args.seed,
                               budget_tolerance=args.budget_tolerance, kaplan_irreducible=args.kaplan_irreducible,
                               window=args.window)
    if set(args.approaches) == {"2"} and "2" in skipped:  # the one fit asked for cannot be made: say why, write nothing
        return error(skipped["2"])
    if "2" in results:  # the fit leaves them out; without a word its exponents would hide that
        for m in results["2"].details["dropped_budgets"]:
            log.warning(f"Approach 2: left out the budget {budget_label(m)}: {m['why']}")
    for approach in args.approaches:
        title = "Kaplan" if approach == "kaplan" else f"Approach {approach}"
        if approach in skipped:
            output("", f"{title}: skipped: {skipped[approach]}")
            continue
        r = results[approach]
        budgets = ""
        if approach == "2":
            used, dropped = len(r.details["budgets"]), len(r.details["dropped_budgets"])
            budgets = f" of {used} budgets" + (f", {dropped} left out" if dropped else "")
        output("", f"{title}: {r.form}", f"  ({r.n_points} points{budgets}, {r.n_bootstrap} bootstrap resamples)",
               f"  {'parameter':<10}{'value':>12}   95% interval")
        for name, e in r.params.items():
            interval = f"[{_fmt(e.low)}, {_fmt(e.high)}]" if e.low is not None else "-"
            output(f"  {name:<10}{_fmt(e.value):>12}   {interval}")

    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if not args.no_plots:
        from llm.scaling.plots import write_plots

        plots = [str(p) for p in write_plots(runs.points, runs.curves, results, out)]
    report = {
        "sources": args.sources, "n_kind": args.n_kind, "loss": args.loss, "n_points": len(runs.points),
        "n_curves": len(runs.curves), "skipped_runs": runs.skipped, "bootstrap": args.bootstrap, "seed": args.seed,
        "run_ids": [p.run_id for p in runs.points],  # the runs fitted: the dashboard draws the fit over these only
        "succeeded": list(results), "approaches": {k: r.as_dict() for k, r in results.items()},
        "skipped": skipped, "plots": plots,
    }
    write_text(out / "fit.json", json.dumps(_finite(report), indent=2) + "\n")  # whole or not at all
    output("")
    log.info(f"written: {out / 'fit.json'}" + "".join(f"\n         {p}" for p in plots))
    if not results:
        error("no approach could run on these data (reasons above)")
        return 1
    return 0


# ---------------------------------------------------------------- plan

def run_plan(args: argparse.Namespace) -> int:
    from llm.model.config import ModelConfig
    from llm.scaling.flops import model_size
    from llm.scaling.plan import config_overrides, plan, shape_for_params

    from llm.scaling.fit import read_fit

    fit = read_fit(args.fit, "--fit") if args.fit else None
    try:
        result = plan(flops=args.flops, tokens=args.tokens, params=args.params, fit=fit)
    except ValueError as e:  # the fit's law cannot plan (no approach with all parameters, a degenerate one)
        return error(f"--fit {args.fit}: {e}" if args.fit else e)
    # The shape proposed is dense, whose parameters are all active: an `active` fit plans its total.
    kind = "total" if result["n_kind"] == "active" else result["n_kind"]
    shape = shape_for_params(result["N"], kind, args.vocab_size)
    size = model_size(ModelConfig(**shape, vocab_size=args.vocab_size), args.seq_len)
    overrides = config_overrides(result["N"], result["D"], kind, args.vocab_size)
    if args.json:
        output(json.dumps({**result, "shape": shape, "model_size": size.as_dict(), "overrides": overrides}, indent=2))
        return 0
    output(f"law: {result['law']}",
           f"  compute  C = {result['C']:.4g} FLOPs",
           f"  params   N = {result['N']:.4g} ({kind.replace('_', '-')})",
           f"  tokens   D = {result['D']:.4g} ({result['tokens_per_param']:.3g} tokens per parameter)")
    if result["loss"] is not None:
        output(f"  expected loss: {result['loss']:.4f}")
    output(f"model shape: {' '.join(f'{k}={v}' for k, v in shape.items())} -> {size.params:.4g} parameters "
           f"({size.non_embedding:.4g} non-embedding, vocab {args.vocab_size}); "
           f"{size.flops_per_token:.4g} FLOPs/token at seq_len {args.seq_len}, "
           f"so D tokens cost {size.flops_per_token * result['D']:.4g} FLOPs by llm-train's accounting",
           "llm-train overrides:",
           "  " + " ".join(overrides))
    return 0


# The fit's tables and the plan are the command's output (stdout, e.g. `llm-scaling plan ... --json
# > plan.json`); messages go through logging, and errors to stderr.
def output(*lines: str) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))


def error(message: object) -> int:
    sys.stderr.write(f"llm-scaling: error: {message}\n")  # as argparse words its own errors
    return CONFIG_ERROR_EXIT_CODE


def main(argv: Optional[list[str]] = None) -> None:
    from llm.tracking.console import setup_console_logging

    args = build_parser().parse_args(argv)
    setup_console_logging()
    try:
        code = run_fit(args) if args.command == "fit" else run_plan(args)
    except Exception as e:  # a file or value the user gave (InputError, ConfigError): exit 2, no traceback
        cause = config_error_in(e)
        if cause is None:
            raise
        code = error(cause)
    sys.exit(code)


if __name__ == "__main__":
    main()
