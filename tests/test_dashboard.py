"""`llm-dashboard` on a real small sweep: run selection and grouping, the offline page's data, the W&B
report's panels and filters (built, not saved), the CLI's messages, and the page in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml

from llm.cli.dashboard import main as dashboard_main
from llm.files import InputError
from llm.scaling.fit import Estimate, FitResult
from llm.scaling.laws import ComputeLaw
from llm.tracking.dashboard import (Filters, SelectionError, find_local_runs, page_data, varying_groups, varying_keys,
                                    write_page)
from llm.tracking.dashboard.page import fit_panel
from llm.tracking.dashboard.runs import format_value
from llm.tracking.dashboard.report import build_report
from llm.tracking.metrics import JsonlLogger
from tests.conftest import TINY_RUN, place_files, run_cli

CHROMIUM = Path("/usr/bin/chromium")
# Headless on a machine without network: no first-run, sync, component or background requests.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
BLUE, RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)  # the page's first two group colours


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`llm-train -m attention=mha,mqa` for 6 steps, validating every 2."""
    root = tmp_path_factory.mktemp("dashboard")
    result = run_cli(["-m", *TINY_RUN, "attention=mha,mqa", "budget.steps=6", "trainer.val_every=2", "trainer.log_every=2"],
                     cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (root / "runs" / "multirun").iterdir()
    return sweep_dir


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_runs_are_found_filtered_and_grouped(sweep):
    runs = find_local_runs([sweep.parent])  # any depth below the directory
    assert [r.choices["attention"] for r in runs] == ["mha", "mqa"]
    first = runs[0]
    assert first.run_id == summary(sweep / "0")["run_id"] and first.name == f"{first.run_id} nano mha rope"
    assert first.group == f"multirun-{sweep.name}" and first.job_type == "pretrain" and "attention:mha" in first.tags
    assert first.value("data.seq_len") == 64 and first.value("choice/attention") == "mha"
    assert varying_groups(runs) == ["attention"]
    keep = lambda f: [r.choices["attention"] for r in runs if f.keeps(r)]  # noqa: E731
    assert keep(Filters(where={"attention": "mqa"})) == ["mqa"]
    assert keep(Filters(tags=["attention:mha"], job_type="pretrain")) == ["mha"]
    assert keep(Filters(where={"model.d_model": str(first.value("model.d_model"))})) == ["mha", "mqa"]
    assert keep(Filters(group="another_experiment")) == []
    with pytest.raises(SelectionError, match="expected KEY=VALUE"):
        Filters.parse_where(["attention"])
    with pytest.raises(InputError, match="missing does not exist; give run or sweep directories"):
        find_local_runs([sweep / "missing"])


def test_page_data_has_curves_on_every_axis_and_a_row_per_run(sweep):
    runs = find_local_runs([sweep])
    data = page_data(runs, title="ablation")
    assert data["groupOptions"][0] == "attention" and "run" in data["groupOptions"]
    assert data["groups"] == [f"multirun-{sweep.name}"]
    assert data["rewardMetrics"] == [] and data["fit"] is None
    for run, row in zip(runs, data["runs"]):
        facts = summary(run.run_dir)
        assert row["labels"]["attention"] == f"attention={run.choices['attention']}"
        val = row["curves"]["val/loss"]
        assert [p[0] for p in val] == [2, 4, 6]
        for step, tokens, flops, loss in val:  # step -> tokens -> FLOPs as the run counted them
            assert tokens == step * facts["tokens_per_step"] and flops == pytest.approx(tokens * facts["flops_per_token"])
        assert val[-1][3] == pytest.approx(facts["val/loss"])
        assert [p[0] for p in row["curves"]["train/loss"]] == [2, 4, 6]
        assert row["cells"]["attention"] == run.choices["attention"] and row["cells"]["val/loss"] == facts["val/loss"]
    assert {"attention", "model"} <= set(data["columns"]["choices"])
    assert {"N", "D", "C", "val/loss", "train/loss"} <= set(data["columns"]["final"])


def test_post_training_metrics_get_their_own_panels(sweep, tmp_path):
    run_dir = tmp_path / "posttrain"
    shutil.copytree(sweep / "0", run_dir)
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    for step in (2, 4, 6):  # as a DPO/PPO stage logs them (TRL's names)
        logger.log_metrics({"rewards/chosen": 0.1 * step, "objective/kl": 0.01 * step}, step=step - 1)
    (run,) = find_local_runs([run_dir])
    data = page_data([run])
    assert data["rewardMetrics"] == ["rewards/chosen", "objective/kl"]
    assert [(p[0], p[3]) for p in data["runs"][0]["curves"]["rewards/chosen"]] == [(2, 0.2), (4, 0.4), (6, pytest.approx(0.6))]
    assert data["runs"][0]["cells"]["objective/kl"] == pytest.approx(0.06)  # the final value, in the table


def test_moe_metrics_get_their_own_panels(sweep, tmp_path):
    """Runs that logged MoE metrics get a section (offline and in the W&B report); dense runs none."""
    import wandb_workspaces.reports.v2 as wr

    run_dir = tmp_path / "moe"
    shutil.copytree(sweep / "0", run_dir)
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    for step in (2, 4, 6):  # as MoE training logs them: 2 layers of 4 experts, loads summing to 1 per layer
        loads = {f"train/moe/load/layer{i}/expert{j}": (0.4 if j == 0 else 0.2) for i in (1, 3) for j in range(4)}
        logger.log_metrics({"train/moe/aux_loss": 1 + 0.01 * step, "train/moe/z_loss": 2.0, "train/moe/load_cv": 0.35,
                            "train/moe/dropped_frac": 0.0, **loads}, step=step - 1)
    dense = find_local_runs([sweep])
    (moe,) = find_local_runs([run_dir])
    data = page_data([*dense, moe])
    assert data["moeMetrics"] == ["train/moe/aux_loss", "train/moe/z_loss", "train/moe/load_cv", "train/moe/dropped_frac"]
    assert data["expertLoads"] == {str(i): [f"train/moe/load/layer{i}/expert{j}" for j in range(4)] for i in (1, 3)}
    row = data["runs"][-1]
    assert [(p[0], p[3]) for p in row["curves"]["train/moe/aux_loss"]] == [(2, 1.02), (4, 1.04), (6, 1.06)]
    assert [p[3] for p in row["curves"]["train/moe/load/layer3/expert0"]] == [0.4] * 3
    assert row["cells"]["train/moe/load_cv"] == 0.35 and "train/moe/load_cv" in data["columns"]["final"]
    assert page_data(dense)["moeMetrics"] == [] and page_data(dense)["expertLoads"] == {}

    def moe_panels(runs: list) -> list:
        blocks = build_report("my-team", "llm", runs, ["run"], Filters()).blocks
        heading = [i for i, b in enumerate(blocks) if isinstance(b, wr.H2) and b.text == "Mixture of experts"]
        return blocks[heading[0] + 1].panels if heading else []  # the panel grid below the heading

    panels = moe_panels([*dense, moe])
    assert [(p.x, p.y) for p in panels] == [("trainer/tokens", [m]) for m in data["moeMetrics"]] + [
        ("trainer/tokens", data["expertLoads"][i]) for i in ("1", "3")]
    assert panels[-1].title == "expert loads, layer 3 (balanced: 1/4)"
    assert moe_panels(dense) == []
    if not CHROMIUM.exists():
        return
    html, _ = render(write_page([*dense, moe], tmp_path / "dashboard.html"), tmp_path)
    assert '<h2 class="section" data-family="moe">Mixture of experts</h2>' in html  # (no section for dense runs)
    # One curve per MoE metric (the MoE run's); per layer, 4 experts + the balanced line; 3 runs' losses.
    for title in data["moeMetrics"]:
        assert curves_in(html, title) == 1
    assert curves_in(html, "expert loads, layer 1") == curves_in(html, "expert loads, layer 3") == 5
    assert curves_in(html, "train/loss") == 3


def curves_in(html: str, title: str) -> int:
    """The curves drawn in the panel titled `title` of a rendered page."""
    start = html.index(f'<div class="panel" data-metric="{title}"')
    end = html.find('<div class="panel"', start + 1)
    return html[start:end if end > 0 else len(html)].count('class="curve" d="M')


def _fit(C_c: float = 1e9, alpha_C: float = 0.05) -> dict:
    """A fit.json as `llm-scaling fit` writes it (with a skipped approach)."""
    kaplan = FitResult("kaplan", "L(C) = (C_c / C)^alpha_C", {"C_c": Estimate(C_c), "alpha_C": Estimate(alpha_C)}, n_points=2)
    return {"approaches": {"kaplan": kaplan.as_dict()}, "skipped": {"2": "needs 3 sizes per budget"}}


def test_scaling_fit_panel_draws_the_fitted_law(sweep):
    runs = find_local_runs([sweep])
    panel = fit_panel({**_fit(), "run_ids": [r.run_id for r in runs]}, runs)
    assert sorted(p[0] for p in panel["points"]) == sorted(summary(r.run_dir)["C"] for r in runs)
    (curve,) = panel["curves"]
    law = ComputeLaw(C_c=1e9, alpha_C=0.05)
    for c, loss in curve["points"][::10]:
        assert loss == pytest.approx(float(law.loss(c)))
    cs = [c for c, _ in curve["points"]]
    assert cs[0] < min(p[0] for p in panel["points"]) and cs[-1] > max(p[0] for p in panel["points"])
    assert any("alpha_C = 0.05" in line for line in panel["lines"])
    assert any("Approach 2: skipped (needs 3 sizes per budget)" in line for line in panel["lines"])


def test_report_builder_makes_the_expected_panels_and_filters(sweep):
    import wandb_workspaces.reports.v2 as wr

    runs = find_local_runs([sweep])
    filters = Filters(group="attention_ablation", job_type="pretrain", tags=["model:tiny"], where={"position": "rope"})
    report = build_report("my-team", "llm", runs, ["attention"], filters, title="Attention ablation")
    assert (report.entity, report.project, report.title) == ("my-team", "llm", "Attention ablation")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    panels = [p for g in grids for p in g.panels]
    lines = {(p.x, tuple(p.y)): p for p in panels if isinstance(p, wr.LinePlot)}
    assert {("trainer/tokens", ("val/loss",)), ("trainer/flops", ("val/loss",)), ("trainer/tokens", ("train/loss",))} <= set(lines)
    assert all(p.groupby == wr.Config("choice/attention") for p in lines.values())
    (scaling,) = [p for p in panels if isinstance(p, wr.ScatterPlot)]
    assert scaling.x == wr.SummaryMetric("trainer/flops") and scaling.y == wr.SummaryMetric("val/loss")
    assert scaling.log_x and scaling.log_y
    (parallel,) = [p for p in panels if isinstance(p, wr.ParallelCoordinatesPlot)]
    assert [c.metric for c in parallel.columns][:2] == [wr.Config("choice/attention"), wr.Config("derived.N")]
    assert any(isinstance(p, wr.RunComparer) for p in panels) and any(isinstance(p, wr.BarPlot) for p in panels)
    runset = grids[0].runsets[0]
    assert (runset.entity, runset.project, runset.groupby) == ("my-team", "llm", ["config.choice/attention"])
    assert "summary:val/loss" in runset.pinned_columns and "config:choice/attention.value" in runset.pinned_columns
    assert leaves(runset.filters) == [("=", "run", "group", "attention_ablation"), ("=", "run", "jobType", "pretrain"),
                                      ("IN", "run", "tags", ["model:tiny"]), ("=", "config", "choice/position", "rope")]
    # Runs selected from local directories: the report shows exactly those (by W&B id).
    exact = build_report("my-team", "llm", runs, ["attention"], Filters(), exact_runs=True)
    assert all(leaves(g.runsets[0].filters) == [("IN", "run", "name", [r.run_id for r in runs])]
               for g in exact.blocks if isinstance(g, wr.PanelGrid))


def leaves(expression: str) -> list[tuple]:
    """A runset's filter expression as W&B's backend reads it: (op, section, key, value) per condition."""
    from wandb_workspaces import expr

    tree = expr.expr_to_filters(expression)
    nodes = tree.filters if tree.op == "AND" else [tree]
    return [(f.op, f.key.section, f.key.name, f.value) for f in nodes]


def test_cli_writes_the_page_and_explains_bad_selections(sweep, tmp_path, capsys, monkeypatch):
    out = tmp_path / "page.html"
    ok = run_cli([str(sweep), "-o", str(out)], cwd=tmp_path, command="dashboard")
    assert ok.returncode == 0, ok.stderr
    assert "runs: 2 found" in ok.stdout and "grouped by attention" in ok.stdout and f"written: {out}" in ok.stdout
    assert out.stat().st_size > 5000
    (tmp_path / "empty").mkdir()
    for args, message in [  # the same entry point, in this process (each subprocess costs seconds of imports)
        ([str(tmp_path / "empty")], "no runs to show (no summary.json below"),
        ([str(tmp_path / "missing")], "missing does not exist"),
        ([str(sweep), "--where", "attention"], "expected KEY=VALUE"),
        ([str(sweep), "--where", "attention=gqa"], "no runs to show"),
        ([str(sweep), "--group-by", "colour"], "--group-by colour: not a choice or config key"),
        ([str(sweep), "wandb:team/llm"], "not both"),
    ]:
        with pytest.raises(SystemExit) as exit_code:
            dashboard_main([*args, "-o", str(tmp_path / "bad.html")])
        assert exit_code.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "bad.html").exists()
    # W&B without credentials: one line saying how to log in, before any work (no page, no traceback).
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for args in (["wandb:team/llm"], [str(sweep), "--report", "team/llm", "-o", str(tmp_path / "bad.html")]):
        with pytest.raises(SystemExit) as exit_code:
            dashboard_main(args)
        err = capsys.readouterr().err
        assert exit_code.value.code == 2 and "needs W&B credentials: run `wandb login`" in err, args
        assert "Traceback" not in err and not (tmp_path / "bad.html").exists()
    with pytest.raises(SystemExit) as exit_code:
        dashboard_main(["--help"])
    usage = capsys.readouterr().out
    assert exit_code.value.code == 0 and "wandb:[ENTITY/]PROJECT" in usage and "Exit codes" in usage


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y "
                                    "chromium): /usr/bin/chromium not found")


def render(page: Path, tmp_path: Path, size: str = "1400,1000", shot: bool = True) -> tuple[str, Optional[np.ndarray]]:
    """The page as headless Chromium renders it: (its DOM after the script ran, a screenshot's pixels)."""
    from PIL import Image

    assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")  # no network assets
    dom = _chromium(["--dump-dom", f"--window-size={size}", page.as_uri()], tmp_path / "profile-dom")
    assert dom.returncode == 0 and 'data-rendered="true"' in dom.stdout, dom.stderr[-2000:]  # the script ran to its end
    if not shot:
        return dom.stdout, None
    png = tmp_path / f"{page.stem}.png"
    result = _chromium([f"--screenshot={png}", f"--window-size={size}", page.as_uri()], tmp_path / "profile-shot")
    assert result.returncode == 0 and png.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    width, height = map(int, size.split(","))
    assert pixels.shape == (height, width, 3) and pixels.std() > 5  # not blank (a blank page: 0)
    return dom.stdout, pixels


def drawn(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(pixels - np.array(colour)).max(axis=2) < 40).sum())


def panels(html: str) -> list[str]:
    return re.findall(r'<div class="panel" data-metric="([^"]+)"', html)


@needs_chromium
def test_offline_dashboard_renders_in_headless_chromium(sweep, tmp_path):
    runs = find_local_runs([sweep])
    fit = {**_fit(), "run_ids": [r.run_id for r in runs]}
    page = write_page(runs, tmp_path / "dashboard.html", fit=fit, title="ablation")
    html, pixels = render(page, tmp_path)
    shown = panels(html)
    # A panel per logged metric, the losses first, the learning rate and guard events among them.
    assert shown[0].startswith("final val/loss vs compute")  # the fit: what the sweep was for, on top
    assert shown[1:3] == ["val/loss", "val/ppl"] and {"train/loss", "trainer/lr", "guard/rollbacks"} <= set(shown)
    assert "trainer/tokens" not in shown
    for run in runs:  # a table row, and a curve in each metric panel, for each run
        assert f'<tr data-run="{run.name}">' in html
        assert html.count(f'data-run="{run.name}" data-group=') == len(shown) - 1
    assert html.count('class="curve" d="M') == 2 * (len(shown) - 1) + 1  # and the fitted law
    for label in ("attention=mha", "attention=mqa"):
        assert f'class="legend-item" data-group="{label}"' in html
    assert html.count('class="point"') == 2  # the scaling panel's runs
    assert "alpha_C = 0.05" in html and "fit: Kaplan L(C)" in html  # the fit's legend
    # The config diff of the (all ticked) runs: the attention choice and its K/V heads differ.
    diff = re.findall(r'<tr data-key="([^"]+)">', html)
    assert "choice/attention" in diff and "model.attention.n_kv_heads" in diff and "choice/logger" not in diff
    for colour in (BLUE, RED):  # both groups' curves are drawn
        assert drawn(pixels, colour) > 200, colour


# ---------------------------------------------------------------- bad inputs through the CLI

def local_run(run_dir: Path, status: str = "completed", loss: float = 3.0, attention: str = "mha") -> Path:
    """A run directory as llm-train leaves it (summary.json, run.json, config.yaml, metrics.jsonl),
    written directly: no training."""
    run_dir.mkdir(parents=True)
    choices = {"model": "nano", "attention": attention}
    (run_dir / "summary.json").write_text(json.dumps({
        "run_id": run_dir.name, "status": status, "N": 1e6, "D": 1e7, "C": 6e13, "val/loss": loss, "choices": choices,
        "tokens_per_step": 1000, "flops_per_token": 6e6}))
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_dir.name, "choices": choices,
                                                  "config": {"model": {"d_model": 64}}}))
    (run_dir / "config.yaml").write_text("model:\n  d_model: 64\nlogger:\n  tags: [ablation]\n")
    records = [{"step": s, "train/loss": loss + 1 / s, "val/loss": loss + 0.5 / s} for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "tr')  # torn
    return run_dir


def runs_with(root: Path, **files: bytes | str | None) -> Path:
    """Two runs below root/sweep; run `1` gets `files` (summary_json -> summary.json; None: a directory)."""
    local_run(root / "sweep" / "0")
    run = local_run(root / "sweep" / "1", attention="mqa")
    place_files(run, files)
    return root / "sweep"


def found_fit(root: Path, content: str) -> None:
    runs_with(root)
    (root / "sweep" / "scaling").mkdir()
    (root / "sweep" / "scaling" / "fit.json").write_text(content)


SWEEP = ["{root}/sweep"]
# (id, arguments ({root}: the test's folder), what to write there, phrases the message must contain)
DASHBOARD_CASES = [
    ("source missing", SWEEP, lambda r: None, ["source:", "sweep does not exist", "give run or sweep directories"]),
    ("source a file", ["{root}/notes.txt"], lambda r: (r / "notes.txt").write_text("runs\n"),
     ["source:", "notes.txt is a file, not a directory"]),
    ("summary.json cut short", SWEEP, lambda r: runs_with(r, summary_json='{"status": "comp'),
     ["run:", "1/summary.json is not JSON", "cut short?", "rerun the run"]),
    ("summary.json empty", SWEEP, lambda r: runs_with(r, summary_json=""), ["1/summary.json is empty"]),
    ("summary.json a list", SWEEP, lambda r: runs_with(r, summary_json="[]"), ["1/summary.json holds list, not a JSON object"]),
    ("summary.json not UTF-8", SWEEP, lambda r: runs_with(r, summary_json=b'{"status": "\xe9"}'),
     ["1/summary.json is not UTF-8"]),
    ("summary.json a directory", SWEEP, lambda r: runs_with(r, summary_json=None),
     ["1/summary.json is a directory, not a file"]),
    ("choices not an object", SWEEP, lambda r: runs_with(r, summary_json='{"status": "completed", "choices": ["mha"]}'),
     ["1/summary.json has 'choices' that are list, not an object"]),
    ("metrics.jsonl a directory", SWEEP, lambda r: runs_with(r, metrics_jsonl=None),
     ["1/metrics.jsonl is a directory, not a file"]),
    ("metrics.jsonl torn before its end", SWEEP, lambda r: runs_with(r, metrics_jsonl='{"step": 1, "val\n{"step": 2}\n'),
     ["1/metrics.jsonl line 1 is not JSON"]),
    ("run.json cut short", SWEEP, lambda r: runs_with(r, run_json='{"config": '), ["1/run.json is not JSON"]),
    ("config.yaml not YAML", SWEEP, lambda r: runs_with(r, config_yaml="model: [d_model: 64\n"),
     ["1/config.yaml is not YAML"]),
    ("config.yaml a list", SWEEP, lambda r: runs_with(r, config_yaml="- model\n- attention\n"),
     ["1/config.yaml holds a ListConfig, not a mapping"]),
    ("--fit missing", [*SWEEP, "--fit", "{root}/fit.json"], runs_with, ["--fit:", "fit.json does not exist", "llm-scaling fit"]),
    ("--fit cut short", [*SWEEP, "--fit", "{root}/fit.json"],
     lambda r: (runs_with(r), (r / "fit.json").write_text('{"approaches": {')), ["--fit:", "fit.json is not JSON"]),
    ("found fit.json cut short", SWEEP, lambda r: found_fit(r, '{"appro'),
     ["fit.json:", "scaling/fit.json is not JSON", "give --fit another one"]),
    ("found fit.json of another shape", SWEEP, lambda r: found_fit(r, '{"approaches": ["3"]}'),
     ["scaling/fit.json has no 'approaches' object"]),
    ("-o a directory", [*SWEEP, "-o", "{root}/sweep"], runs_with, ["-o/--out:", "sweep is a directory", "dashboard.html"]),
    ("-o below a file", [*SWEEP, "-o", "{root}/sweep/0/summary.json/page.html"], runs_with,
     ["-o/--out:", "0/summary.json is a file, not a directory"]),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name,args,setup,phrases", DASHBOARD_CASES, ids=[c[0] for c in DASHBOARD_CASES])
def test_bad_input_exits_2_naming_it_and_writes_no_page(name, args, setup, phrases, tmp_path, monkeypatch, capsys):
    setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        dashboard_main([a.replace("{root}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("llm-dashboard: error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in: {err}"
    assert snapshot(tmp_path) == before  # no dashboard.html


def test_failed_runs_and_torn_last_lines_are_shown_not_refused(tmp_path, capsys):
    runs_with(tmp_path)
    local_run(tmp_path / "sweep" / "2", status="diverged", loss=math.nan, attention="gqa")
    with pytest.raises(SystemExit) as exit_info:
        dashboard_main([str(tmp_path / "sweep")])
    assert exit_info.value.code == 0, capsys.readouterr().err
    data = page_data(find_local_runs([tmp_path / "sweep"]))
    # The torn 4th record of each run is skipped; the diverged run is listed, its NaN losses not drawn.
    assert [(r["status"], len(r["curves"]["val/loss"])) for r in data["runs"]] == \
        [("completed", 3), ("completed", 3), ("diverged", 0)]
    assert (tmp_path / "sweep" / "dashboard.html").stat().st_size > 5000


# ---------------------------------------------------------------- what varied, stages, families, fits (no training)

BASE_CHOICES = {"model": "ladder", "attention": "mha", "position": "rope", "budget": "flops", "posttrain": "none",
                "logger": "none"}


def made_run(run_dir: Path, *, config: dict, overrides: list[str], choices: Optional[dict] = None,
             stage: str = "pretrain", records: Optional[list[dict]] = None, **summary) -> Path:
    """A run directory as llm-train leaves it, written directly: summary.json, run.json (choices,
    overrides, config), config.yaml and metrics.jsonl."""
    run_dir.mkdir(parents=True)
    choices = {**BASE_CHOICES, **(choices or {})}
    run_id = f"{run_dir.parent.name}-{run_dir.name}"  # as llm-train names a sweep's job: unique
    (run_dir / "summary.json").write_text(json.dumps({
        "run_id": run_id, "status": "completed", "stage": stage, "choices": choices, "tokens_per_step": 1000,
        "flops_per_token": 1e6, **summary}))
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "choices": choices, "overrides": overrides,
                                                  "config": config}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = records or [{"step": s, "train/loss": 4 - s / 10, "trainer/lr": 1e-3 / s} for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def made_sweep(sweep_dir: Path, params: Optional[dict] = None, task: Optional[list[str]] = None) -> Path:
    """The multirun.yaml Hydra writes into a sweep directory (the parts the dashboard reads)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"sweeper": {"params": params}, "overrides": {"task": task or []}}, "model": {"size": None}}))
    return sweep_dir


def key_sweep(root: Path, name: str = "isoflop") -> Path:
    """sweep=isoflop's shape at 2 x 2: model.size x budget.flops from hydra.sweeper.params; every job's
    overrides name its own values (and logger=none, which the sweep file set)."""
    sweep = made_sweep(root / name, params={"budget.flops": "2.5e12,5e12", "model.size": "2.5e4,5e4"})
    for i, (flops, size) in enumerate([(2.5e12, 2.5e4), (2.5e12, 5e4), (5e12, 2.5e4), (5e12, 5e4)]):
        made_run(sweep / str(i), config={"model": {"size": size, "d_model": 64}, "budget": {"flops": flops},
                                         "logger": {"kind": "none"}, "paths": {"run_dir": str(sweep / str(i))}},
                 overrides=["sweep=isoflop", f"budget.flops={flops:g}", f"model.size={size:g}"],
                 records=[{"step": s, "train/loss": 6 - s * (i + 1) / 8, "trainer/lr": 1e-3 * (1 - s / 8)}
                          for s in range(1, 9)],
                 N=size, C=flops, **{"val/loss": 5 - math.log10(flops) / 10 - size / 1e5})
    return sweep


def test_labels_name_exactly_what_the_sweep_varied(tmp_path):
    sweep = key_sweep(tmp_path)
    runs = find_local_runs([sweep])
    assert varying_keys(runs) == ["budget.flops", "model.size"]  # the sweeper's keys; nothing else varied
    data = page_data(runs)
    labels = [r["labels"][data["groupOptions"][0]] for r in data["runs"]]
    assert labels == ["budget.flops=2.5e12, model.size=2.5e4", "budget.flops=2.5e12, model.size=5e4",
                      "budget.flops=5e12, model.size=2.5e4", "budget.flops=5e12, model.size=5e4"]
    assert data["groupOptions"] == ["budget.flops, model.size", "budget.flops", "model.size", "run"]
    assert data["columns"]["choices"][:2] == ["budget.flops", "model.size"]
    assert data["runs"][1]["cells"]["model.size"] == "5e4"
    # Runs logged another way (logger=wandb, another paths.run_dir) do not vary in anything they tested.
    other = made_run(tmp_path / "single" / "w", config={"model": {"size": 5e4, "d_model": 64}, "budget": {"flops": 5e12},
                                                        "logger": {"kind": "wandb"}, "paths": {"run_dir": "x"}},
                     overrides=["model=ladder", "model.size=5e4", "budget.flops=5e12", "logger=wandb", "logger.mode=offline"],
                     choices={"logger": "wandb"})
    both = [runs[3], *find_local_runs([other])]
    assert varying_keys(both) == []
    assert all("logger" not in label for r in page_data(both)["runs"] for label in r["labels"].values())
    # A command-line sweep (`model.d_model=32,64`) and a choice: both named, the logger never.
    cli = made_sweep(tmp_path / "cli", task=["model=nano", "model.d_model=32,64", "attention=mha,gqa", "logger=none"])
    for i, (d, attention) in enumerate([(32, "mha"), (32, "gqa"), (64, "mha"), (64, "gqa")]):
        made_run(cli / str(i), config={"model": {"d_model": d}}, choices={"attention": attention, "logger": "csv" if i else "none"},
                 overrides=["model=nano", f"model.d_model={d}", f"attention={attention}", "logger=none"])
    assert find_local_runs([cli])[0].swept == ["model.d_model", "attention"]
    assert varying_keys(find_local_runs([cli])) == ["model.d_model", "attention"]


def test_numbers_are_formatted_compactly():
    assert [format_value(v) for v in (25000, 2.5e12, 1e5, 3e-4, 0.01, 128, 0.5, 3.14159, 0, -2.5e4, True, None, "gqa")] == \
        ["2.5e4", "2.5e12", "1e5", "3e-4", "0.01", "128", "0.5", "3.142", "0", "-2.5e4", "true", "null", "gqa"]


def mixed_posttraining(root: Path) -> Path:
    """An SFT and a DPO run of the same model (their losses are different objectives) and a pretraining
    run with an eval task and a data source's loss: families the dashboard has no code for."""
    made_run(root / "sft", config={"lr": 1e-4}, overrides=["posttrain=sft"], choices={"posttrain": "sft"}, stage="sft",
             records=[{"step": s, "train/loss": 2 - s / 10, "val/loss": 2.1 - s / 10} for s in (1, 2, 3)])
    made_run(root / "dpo", config={"lr": 1e-5}, overrides=["posttrain=dpo"], choices={"posttrain": "dpo"}, stage="dpo",
             records=[{"step": s, "train/loss": 0.69 - s / 100, "rewards/margins": s / 10, "objective/kl": s / 50}
                      for s in (1, 2, 3)])
    made_run(root / "base", config={"lr": 3e-3}, overrides=[], records=[
        {"step": s, "train/loss": 5 - s / 10, "val/loss/code": 5.5 - s / 10, "eval/hellaswag/acc": 0.25 + s / 100,
         "eval/hellaswag/acc_norm": 0.26 + s / 100, "data/epochs/code": s / 30} for s in (1, 2, 3)])
    return root


def test_each_stage_gets_its_own_axes_and_new_families_their_panels(tmp_path):
    runs = find_local_runs([mixed_posttraining(tmp_path)])
    data = page_data(runs)
    shown = {s["family"]: [(p["metric"], p["stage"]) for p in s["panels"]] for s in data["sections"]}
    assert list(shown) == ["val", "val/loss", "train", "eval/hellaswag", "rewards", "objective", "data/epochs"]
    # train/loss of three stages: three panels, never one axis; val/loss only SFT logged: one panel.
    assert shown["train"] == [("train/loss", "pretrain"), ("train/loss", "sft"), ("train/loss", "dpo")]
    assert shown["val"] == [("val/loss", None)] and shown["val/loss"] == [("val/loss/code", None)]
    assert shown["eval/hellaswag"] == [("eval/hellaswag/acc", None), ("eval/hellaswag/acc_norm", None)]
    assert data["varying"] == ["posttrain"] and data["rewardMetrics"] == ["rewards/margins", "objective/kl"]
    titles = [p["title"] for s in data["sections"] for p in s["panels"]]
    assert "train/loss (sft)" in titles and "train/loss (dpo)" in titles


def test_a_fit_is_drawn_only_over_the_sweep_it_was_fitted_to(tmp_path, capsys):
    sweep = key_sweep(tmp_path, "isoflop-a")
    other = key_sweep(tmp_path, "isoflop-b")
    runs, others = find_local_runs([sweep]), find_local_runs([other])
    fit = {**_fit(), "run_ids": [r.run_id for r in runs[:3]]}  # the ids `llm-scaling fit` lists
    (sweep / "scaling").mkdir()
    (sweep / "scaling" / "fit.json").write_text(json.dumps(fit))
    panel = fit_panel(fit, [*runs, *others])
    assert [p[2] for p in panel["points"]] == [r.name for r in runs[:3]] and panel["runs"] == [r.run_id for r in runs[:3]]
    cs = [c for c, _ in panel["curves"][0]["points"]]  # over its runs' compute range, not the other sweep's
    assert cs[0] == pytest.approx(2.5e12 / 3) and cs[-1] == pytest.approx(5e12 * 3)
    assert fit_panel(fit, others) is None and page_data(others, fit=fit)["fit"] is None
    # An older fit.json without run ids: the runs below the sweep it sits in (<sweep>/scaling/fit.json).
    old = {k: v for k, v in fit.items() if k != "run_ids"}
    assert fit_panel(old, [*runs, *others], sweep / "scaling" / "fit.json")["runs"] == [r.run_id for r in runs]
    assert fit_panel(old, others, sweep / "scaling" / "fit.json") is None
    # The CLI: the other sweep's page has no fit; this sweep's has it.
    out = tmp_path / "page.html"
    with pytest.raises(SystemExit) as exit_code:
        dashboard_main([str(tmp_path), "--where", f"paths.run_dir={others[0].run_dir}", "-o", str(out)])
    assert exit_code.value.code == 0 and '"fit": null' in out.read_text()
    assert "was fitted to none of the shown runs; not drawn" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dashboard_main([str(tmp_path), "-o", str(out)])
    page = json.loads(re.search(r'<script id="dashboard-data" type="application/json">(.*?)</script>',
                                out.read_text(), re.S)[1])
    assert page["fit"]["runs"] == [r.run_id for r in runs[:3]] and "isoflop" in page["fit"]["of"]


DRIVE = """{
const zone = document.querySelector('.panel[data-metric="train/loss"] .hover-zone'), box = zone.getBoundingClientRect();
const at = (kind, f) => zone.dispatchEvent(new MouseEvent(kind, {clientX: box.left + box.width * f, clientY: box.top + 20, bubbles: true}));
const mark = (key, value) => document.body.setAttribute("data-" + key, value);
at("mousemove", 0.45); mark("hover", document.getElementById("tooltip").innerText.replace(/\\n/g, " | "));
at("mousedown", 0.5); at("mousemove", 0.9); at("mouseup", 0.9); mark("zoom", JSON.stringify(state.xrange));
const slider = document.getElementById("smooth"); slider.value = "0.6"; slider.dispatchEvent(new Event("input"));
mark("raw", document.querySelectorAll("path.raw").length);
const diffKeys = () => [...document.querySelectorAll("#diff-table tr[data-key]")].map(r => r.dataset.key)
  .filter(k => !k.startsWith("choice/")).join(" ");
mark("diff", diffKeys());
for (const box of [...document.querySelectorAll("input.pick")].slice(0, 2)) { box.checked = false; box.dispatchEvent(new Event("change")); }
mark("diff-after", diffKeys());
}"""


@needs_chromium
def test_key_sweep_post_training_and_eval_pages_render(tmp_path):
    """Headless Chromium: a model.size x budget.flops sweep with its fit, a mixed SFT/DPO/pretraining set
    with eval and data-source panels."""
    sweep = key_sweep(tmp_path)
    runs = find_local_runs([sweep])
    page = write_page(runs, tmp_path / "sweep.html", fit={**_fit(), "run_ids": [r.run_id for r in runs]}, title="isoflop")
    html, pixels = render(page, tmp_path)
    for label in ("budget.flops=2.5e12, model.size=2.5e4", "budget.flops=5e12, model.size=5e4"):
        assert f'class="legend-item" data-group="{label}"' in html
    assert "logger" not in "".join(re.findall(r'data-group="([^"]*)"', html))
    assert curves_in(html, "train/loss") == 4 and html.count('class="point"') == 4
    assert drawn(pixels, BLUE) > 100 and drawn(pixels, RED) > 100

    # Hover, zoom, smoothing and the config diff, as a user's mouse would drive them.
    driven = tmp_path / "driven.html"
    driven.write_text(page.read_text().replace("</body>", f"<script>{DRIVE}</script></body>"))
    html, _ = render(driven, tmp_path, shot=False)
    found = dict(re.findall(r'data-(hover|zoom|raw|diff|diff-after)="([^"]*)"', html))
    assert found["hover"].startswith("tokens 4000") and "budget.flops=5e12, model.size=5e4" in found["hover"]
    assert found["hover"].count("\u00b7") == 4  # a row per run: value, label, run
    zoom = json.loads(found["zoom"])
    assert 4000 < zoom[0] < zoom[1] < 8000  # tokens: the dragged half of the plot
    assert found["raw"] == "8"  # smoothing on: the 4 runs' raw train/loss and trainer/lr curves stay, faint
    assert found["diff"] == "budget.flops model.size" and found["diff-after"] == "model.size"  # 2 runs unticked

    mixed = write_page(find_local_runs([mixed_posttraining(tmp_path / "mixed")]), tmp_path / "mixed.html")
    html, _ = render(mixed, tmp_path, size="1200,2400")
    assert re.findall(r'data-metric="(train/loss[^"]*)" data-stage="(\w+)"', html) == [
        ("train/loss (pretrain)", "pretrain"), ("train/loss (sft)", "sft"), ("train/loss (dpo)", "dpo")]
    for title in ("train/loss (sft)", "train/loss (dpo)", "eval/hellaswag/acc", "val/loss/code", "rewards/margins"):
        assert curves_in(html, title) == 1, title  # one run each: no objective shares an axis with another
    assert '<h2 class="section" data-family="eval/hellaswag">Evaluation: hellaswag</h2>' in html
