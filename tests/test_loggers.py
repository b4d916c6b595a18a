"""The loggers a run writes to besides metrics.jsonl (llm.tracking.loggers): TensorBoard, CSV and W&B,
one or several at once, with the metric names and steps of metrics.jsonl. Real `llm-train` runs,
W&B offline; TensorBoard's event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llm.config import typed
from llm.config.schema import LoggerSchema
from llm.tracking.loggers import logger_kinds, uses
from tests.conftest import TINY_RUN, compose_train, llm_cli, run_cli
from tests.test_wandb_conventions import OfflineRun, clean_env, offline_runs


def test_logger_kinds_are_kind_then_also():
    assert logger_kinds(typed(compose_train(["logger=tensorboard"]).logger, LoggerSchema)) == ["tensorboard"]
    chosen = typed(compose_train(["logger=wandb", "logger.also=[tensorboard,csv,wandb,none]"]).logger, LoggerSchema)
    assert logger_kinds(chosen) == ["wandb", "tensorboard", "csv"]  # in order, once each, `none` dropped
    assert logger_kinds({"kind": "none"}) == [] and logger_kinds({"kind": "csv"}) == ["csv"]  # run.json of older runs
    assert uses({"kind": "tensorboard", "also": ["wandb"]}, "wandb") and not uses({"kind": "csv"}, "wandb")


def scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalar events TensorBoard reads from a directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logger_writes_at_metrics_jsonl_steps(tmp_path):
    """Lightning's step 0 is one optimizer step done: step 1, as metrics.jsonl; no `epoch` tag."""
    from llm.tracking.loggers import tensorboard_logger

    logger = tensorboard_logger(tmp_path)
    logger.log_metrics({"train/loss": 2.5, "trainer/lr": 1e-3, "epoch": 0}, step=0)
    logger.log_metrics({"val/loss": 2.25}, step=1)
    logger.finalize("success")
    assert scalars(tmp_path / "tensorboard") == {"train/loss": [(1, 2.5)], "trainer/lr": [(1, pytest.approx(1e-3))],
                                                 "val/loss": [(2, 2.25)]}


def metrics_jsonl(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a run's metrics.jsonl."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], value))
    return expected


def logged_run(tmp_path: Path, loggers: list[str], steps: int, env: dict | None = None) -> Path:
    result = run_cli([*TINY_RUN, *loggers, f"budget.steps={steps}", f"trainer.val_every={steps}", "trainer.log_every=1"],
                     cwd=tmp_path, env=env or {})
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    return summary.parent


def assert_same_as_jsonl(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's event files and metrics.csv hold metrics.jsonl's metrics, at its steps."""
    expected = metrics_jsonl(run_dir)
    assert {"train/loss", "val/loss", "trainer/lr", "trainer/tokens", "guard/rollbacks"} <= set(expected)
    logged = scalars(run_dir / "tensorboard")
    assert set(logged) == set(expected)  # the same tags, no `epoch` or `hp_metric`
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag  # optimizer steps done, as metrics.jsonl
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {k for row in rows for k, v in row.items() if v} >= set(expected)
    return expected


def test_tensorboard_and_csv_at_once_log_what_metrics_jsonl_logs(tmp_path, monkeypatch, capsys):
    """`logger=tensorboard logger.also=[csv]`, one step (in this process: no interpreter start-up):
    TensorBoard's scalars are metrics.jsonl's."""
    code, err = llm_cli("train", [*TINY_RUN, "logger=tensorboard", "logger.also=[csv]", "budget.steps=1",
                                  "trainer.val_every=1", "trainer.log_every=1"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    assert_same_as_jsonl(summary.parent)


@pytest.mark.slow
def test_wandb_tensorboard_and_csv_at_once(tmp_path):
    """`logger=wandb logger.also=[tensorboard,csv]` (W&B offline): every logger has metrics.jsonl's
    metrics, and W&B plots the learning rate and the guard's events against tokens like the rest."""
    run_dir = logged_run(tmp_path, ["logger=wandb", "logger.mode=offline", "logger.also=[tensorboard,csv]"], steps=2,
                         env=clean_env(tmp_path))
    expected = assert_same_as_jsonl(run_dir)
    (wandb_dir,) = offline_runs(run_dir)
    w = OfflineRun(wandb_dir)
    assert {k for h in w.history for k in h} >= set(expected)
    metrics = {m.glob_name or m.name: m.step_metric for m in w.of("metric")}
    assert metrics["trainer/lr"] == metrics["guard/*"] == metrics["train/*"] == "trainer/tokens"


@pytest.mark.parametrize("chosen", [["logger=wandb"], ["logger=tensorboard", "logger.also=[wandb]"]], ids=["kind", "also"])
def test_online_wandb_without_credentials_exits_2_before_any_work(chosen, tmp_path, monkeypatch, capsys):
    """W&B chosen as the logger or beside it, online, with no credentials (the autouse fixture
    hides them): one line saying how to log in, before any data work, and no run left behind."""
    args = [*(o for o in TINY_RUN if not o.startswith("logger=")), *chosen, "logger.mode=online"]
    code, err = llm_cli("train", args, tmp_path, monkeypatch, capsys)
    assert code == 2 and "logger.mode='online': no W&B credentials; run `wandb login`" in err, err
    assert "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no tokenizer trained, no cache, no run
