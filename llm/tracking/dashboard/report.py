"""The online dashboard: a W&B Report (the `wandb-workspaces` package) over the selected runs.

`build_report` makes the report object without touching the server (tests check its panels and
filters); `save_report` saves it and returns its URL (needs credentials and network).

Panels: val/loss against tokens and against FLOPs, grouped by the chosen config keys; a scaling
panel (final val/loss against training FLOPs, log-log); a parallel-coordinates plot of the
choices, size and loss; a run comparer; and a table of the runs' final metrics. Where the runs
logged mixture-of-experts metrics, a section of their own: the router losses, load_cv and
dropped_frac against tokens, and one panel per layer with its experts' loads.
"""

from __future__ import annotations

from typing import Any, Optional

from llm.tracking.dashboard.runs import Filters, Run, config_key, expert_load_metrics, moe_metrics, typed_value
from llm.tracking.wandb import wandb_id

FINAL_METRICS = ("val/loss", "val/ppl", "train/loss", "trainer/tokens", "trainer/flops", "perf/tokens_per_s")


def runset_filters(filters: Filters, run_ids: Optional[list[str]] = None) -> list:
    """The report's run filters: the selection's filters, or exactly the given runs."""
    from wandb_workspaces import expr

    conditions = []
    if filters.group is not None:
        conditions.append(expr.Metric("Group") == filters.group)
    if filters.job_type is not None:
        conditions.append(expr.Metric("JobType") == filters.job_type)
    if filters.tags:
        conditions += [expr.Tags().isin([t]) for t in filters.tags]
    conditions += [expr.Config(config_key(k)) == typed_value(v) for k, v in filters.where.items()]
    if run_ids:
        conditions.append(expr.Metric("ID").isin([wandb_id(r) for r in run_ids]))
    return conditions


def _group_field(key: str) -> str:
    """A grouping key as W&B names it: choices are flat config keys (`choice/attention`)."""
    if key == "run":
        return "run.displayName"
    return f"config.{config_key(key)}"


def build_report(entity: str, project: str, runs: list[Run], group_by: list[str], filters: Filters,
                 title: str = "Run comparison", exact_runs: bool = False) -> Any:
    """The report object for these runs (not saved). `exact_runs`: filter by the runs' ids (for runs
    selected from local directories and synced), else by `filters`."""
    import wandb_workspaces.reports.v2 as wr

    keys = [k for k in group_by if k != "run"]
    runset = wr.Runset(
        entity=entity, project=project, name="selected runs",
        filters=runset_filters(filters, [r.run_id for r in runs] if exact_runs else None),
        groupby=[_group_field(k) for k in keys],
        pinned_columns=["run:displayName", *(f"config:{config_key(k)}.value" for k in keys),
                        *(f"summary:{m}" for m in FINAL_METRICS)],
    )
    group_config = wr.Config(config_key(keys[0])) if len(keys) == 1 else None
    curves = [
        wr.LinePlot(title="val/loss vs tokens", x="trainer/tokens", y=["val/loss"], groupby=group_config,
                    title_x="tokens", title_y="val/loss"),
        wr.LinePlot(title="val/loss vs FLOPs", x="trainer/flops", y=["val/loss"], groupby=group_config,
                    title_x="training FLOPs", title_y="val/loss"),
        wr.LinePlot(title="train/loss vs tokens", x="trainer/tokens", y=["train/loss"], groupby=group_config),
    ]
    scaling = wr.ScatterPlot(title="Scaling: best val/loss vs training FLOPs", x=wr.SummaryMetric("trainer/flops"),
                             y=wr.SummaryMetric("val/loss"), log_x=True, log_y=True)
    columns = [*(wr.ParallelCoordinatesPlotColumn(metric=wr.Config(config_key(k))) for k in keys),
               wr.ParallelCoordinatesPlotColumn(metric=wr.Config("derived.N"), log=True),
               wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("trainer/tokens"), log=True),
               wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("val/loss"))]
    comparison = [wr.ParallelCoordinatesPlot(title="choices, size and loss", columns=columns),
                  wr.RunComparer(diff_only="split")]
    final = wr.BarPlot(title="final metrics", metrics=[wr.SummaryMetric(m) for m in ("val/loss", "train/loss")],
                       groupby=group_config, orientation="h")
    grouped = ", ".join(k.removeprefix("choice/") for k in keys) or "run"
    moe = [wr.LinePlot(title=f"{m} vs tokens", x="trainer/tokens", y=[m], groupby=group_config, title_x="tokens",
                       title_y=m.removeprefix("train/moe/")) for m in moe_metrics(runs)]
    moe += [wr.LinePlot(title=f"expert loads, layer {layer} (balanced: 1/{len(names)})", x="trainer/tokens",
                        y=names, title_x="tokens", title_y="fraction of assignments")
            for layer, names in expert_load_metrics(runs).items()]
    moe_blocks = [wr.H2(text="Mixture of experts"), wr.PanelGrid(runsets=[runset], panels=moe)] if moe else []
    return wr.Report(
        entity=entity, project=project, title=title,
        description=f"{len(runs)} runs; filters: {filters.describe()}; grouped by {grouped}. Made by llm-dashboard.",
        blocks=[
            wr.H1(text=title),
            wr.P(text=f"Curves grouped by {grouped}. The runs table below the panels lists the final metrics."),
            wr.PanelGrid(runsets=[runset], panels=[*curves, scaling]),
            wr.H2(text="Comparison"),
            wr.PanelGrid(runsets=[runset], panels=[*comparison, final]),
            *moe_blocks,
        ],
    )


def save_report(report: Any) -> str:
    """Save to the W&B server; returns the report's URL."""
    report.save()
    return report.url
