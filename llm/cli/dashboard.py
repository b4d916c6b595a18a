"""`llm-dashboard`: compare runs, offline as one HTML file or online as a W&B Report.

  llm-dashboard runs/multirun/20250101-120000-000000           # HTML: <sweep dir>/dashboard.html
  llm-dashboard runs --group attention_ablation -o attention.html
  llm-dashboard runs --where model=tiny --group-by position    # only model=tiny, one colour per position
  llm-dashboard wandb:my-team/llm --group attention_ablation   # a W&B Report; prints its URL
  llm-dashboard runs/multirun/20250101-... --report my-team/llm  # a report of these runs (after `wandb sync`)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from llm.cli.common import CONFIG_ERROR_EXIT_CODE, config_error_in
from llm.files import InputError

log = logging.getLogger("llm.cli.dashboard")  # not __name__: that is __main__ under `python -m`

EPILOG = """Sources:
  DIR                       a run or sweep directory: every summary.json below it is one run
  wandb:[ENTITY/]PROJECT    the runs of a W&B project (needs `wandb login` and network)

Offline (directories): one self-contained HTML file (no network assets): a section per metric family
the runs logged (train, val, trainer (lr), perf, guard, rewards, objective, eval/<task>, MoE, ...), a
panel per metric and per stage (SFT's and DPO's losses never share an axis), curves coloured by group
against step, tokens or FLOPs, with hover values, smoothing and drag-to-zoom; a sortable table of the
runs; a config diff of the ticked runs; and the scaling fit over the runs it was fitted to, when
`llm-scaling fit` wrote a fit.json below the sources (or --fit).

Online (wandb: source, or --report): a W&B Report with val/loss against tokens and FLOPs grouped by the
same keys, a scaling panel, a parallel-coordinates plot, a run comparer and the runs' final metrics.

Grouping: by default, what varied between the selected runs: the keys their sweeps swept and their
overrides set (model.size, budget.flops, attention, ...) and the config groups whose choice differs,
if their values differ (never the logger); labels name just those keys, numbers compact (2.5e4).
--group-by takes choices (attention, position) or config keys (model.d_model), comma-separated, or `run`.

Exit codes: 0 done; 1 the W&B report could not be saved; 2 no runs found, a bad source, filter or key, a
wandb: source or --report without W&B credentials, or a damaged file (summary.json, run.json, config.yaml,
metrics.jsonl, fit.json): the message names it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-dashboard", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="run/sweep directory, or wandb:[ENTITY/]PROJECT")
    select = parser.add_argument_group("selecting runs (all conditions must hold)")
    select.add_argument("--group", help="W&B group: the experiment name (experiment_name) or sweep")
    select.add_argument("--job-type", help="the stage: pretrain, sft, dpo, ppo, grpo, ...")
    select.add_argument("--tag", action="append", default=[], metavar="TAG",
                        help="a tag the runs carry, e.g. attention:gqa (repeatable)")
    select.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="a choice or config value, e.g. attention=gqa or model.d_model=128 (repeatable)")
    select.add_argument("--completed", action="store_true", help="only runs whose status is completed/finished")
    show = parser.add_argument_group("what to show")
    show.add_argument("--group-by", metavar="KEYS",
                      help="comma-separated choices or config keys, or `run` (default: the choices that differ)")
    show.add_argument("--title", help="page/report title (default: the group, or 'Run comparison')")
    show.add_argument("--fit", metavar="FIT_JSON", help="scaling fit to show (default: the newest fit.json below the sources)")
    show.add_argument("-o", "--out", metavar="HTML", help="where the page goes (default: <first source>/dashboard.html)")
    show.add_argument("--report", metavar="ENTITY/PROJECT",
                      help="also build a W&B Report of these local runs in this project (they must be synced)")
    return parser


def fail(message: object) -> int:
    sys.stderr.write(f"llm-dashboard: error: {message}\n")  # the command's answer to a bad source, filter or key
    return CONFIG_ERROR_EXIT_CODE


def check_output(out: Path) -> Path:
    """The page's path: not a directory, and below a directory (or where one can be made)."""
    if out.is_dir():
        raise InputError(f"-o/--out: {out} is a directory; give the HTML file's path, e.g. {out / 'dashboard.html'}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"-o/--out: {parent} is a file, not a directory; give a path in a directory")
        if parent.exists():
            break
    return out


def run(args: argparse.Namespace) -> int:
    from llm.tracking.dashboard import Filters, SelectionError, find_local_runs, find_wandb_runs, varying_keys
    from llm.scaling.fit import FIT_FIX, read_fit
    from llm.tracking.dashboard.page import fit_members
    from llm.tracking.dashboard.runs import check_group_by, find_fits
    from llm.tracking.wandb import has_credentials

    online = [s for s in args.sources if s.startswith("wandb:")]
    if online and (len(online) > 1 or len(args.sources) > 1):
        return fail("give run/sweep directories, or one wandb:[ENTITY/]PROJECT source, not both")
    report_entity, _, report_project = (args.report or "").rpartition("/")
    if args.report is not None and not report_project:
        return fail(f"--report {args.report!r}: expected ENTITY/PROJECT or PROJECT")
    if (online or args.report is not None) and not has_credentials():  # before any work, not a traceback after it
        what = online[0] if online else f"--report {args.report}"
        return fail(f"{what} needs W&B credentials: run `wandb login` (or set WANDB_API_KEY); the offline page of "
                    "run directories needs none")
    try:
        filters = Filters(group=args.group, job_type=args.job_type, tags=list(args.tag),
                          where=Filters.parse_where(args.where))
        found = find_wandb_runs(online[0], filters) if online else find_local_runs(args.sources)
        runs = [r for r in found if filters.keeps(r)]
        if args.completed:
            runs = [r for r in runs if r.status in ("completed", "finished")]
        log.info(f"runs: {len(found)} found in {', '.join(args.sources)}; {len(runs)} selected (filters: {filters.describe()})")
        if not runs:
            hint = "" if found else " (no summary.json below the directories: are they run or sweep directories?)"
            return fail(f"no runs to show{hint}")
        group_by = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else varying_keys(runs)
        check_group_by(runs, group_by)
    except SelectionError as e:
        return fail(str(e))
    grouping = ", ".join(group_by) or "run (no swept key or choice differs between the runs)"
    log.info(f"grouped by {grouping}")
    title = args.title or (filters.group or (runs[0].group if len({r.group for r in runs}) == 1 else None)
                           or "Run comparison")

    if online:
        from llm.tracking.dashboard.runs import parse_wandb_source

        entity, project = parse_wandb_source(online[0])
        return publish_report(entity, project, runs, group_by, filters, title, exact_runs=False)

    # Every input is read and checked before the page is written: a damaged file leaves no page.
    out = check_output(Path(args.out) if args.out else Path(args.sources[0]) / "dashboard.html")
    # The fit is drawn over the runs it was fitted to only: the newest fit.json below the sources
    # that was fitted to some of the shown runs (a fit of another sweep there is not theirs).
    fit, fit_path = None, None
    for path in [Path(args.fit)] if args.fit else find_fits(args.sources):
        candidate = read_fit(path, "--fit") if args.fit else read_fit(
            path, "fit.json", f"{FIT_FIX}; or give --fit another one (this fit.json is below the sources)")
        if fit_members(candidate, runs, path):
            fit, fit_path = candidate, path
            log.info(f"scaling fit: {path}")
            break
        log.info(f"scaling fit: {path} was fitted to none of the shown runs; not drawn")
    from llm.tracking.dashboard import write_page

    write_page(runs, out, group_by or None, fit, title, fit_path)
    log.info(f"written: {out} ({out.stat().st_size / 1024:.0f} KiB; open it in a browser, it needs no network)")
    if args.report:
        return publish_report(report_entity or None, report_project, runs, group_by, filters, title, exact_runs=True)
    return 0


def publish_report(entity: Optional[str], project: str, runs: list, group_by: list[str], filters, title: str,
                   exact_runs: bool) -> int:
    from llm.tracking.dashboard.report import build_report, save_report

    try:
        import wandb

        entity = entity or wandb.Api().default_entity
        report = build_report(entity, project, runs, group_by, filters, title, exact_runs=exact_runs)
        url = save_report(report)
    except Exception as e:  # credentials, network, server: say what to do
        sys.stderr.write(f"error: cannot save the W&B report ({type(e).__name__}: {e}); log in with `wandb login` "
                         "(or set WANDB_API_KEY) and check the network; the offline page needs neither\n")
        return 1
    sys.stdout.write(f"report: {url}\n")  # the command's output: where the report is
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    from llm.tracking.console import setup_console_logging

    args = build_parser().parse_args(argv)
    setup_console_logging()
    try:
        code = run(args)
    except Exception as e:  # a file the user gave is damaged (InputError): exit 2, no traceback
        cause = config_error_in(e)
        if cause is None:
            raise
        code = fail(cause)
    sys.exit(code)


if __name__ == "__main__":
    main()
