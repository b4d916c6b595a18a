"""W&B conventions end to end, offline: real `llm-train` runs (Hydra multirun, DDP with gloo, resume)
write offline W&B runs, and we read back what W&B recorded from its own run files."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm.tracking.run import group_choices
from llm.tracking.samples import SampleLog, read_samples
from llm.tracking.wandb import parent_checkpoint, use_parent_artifact
from tests.conftest import REPO, TINY_RUN, compose_train, run_cli

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef0fake0key"
FAKE_HF_TOKEN = "hf_FAKEtokenNEVERinAnyFile42"
WANDB_RUN = [*TINY_RUN, "logger=wandb", "logger.mode=offline"]


# ---------------------------------------------------------------- reading W&B's run files

def wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's protobuf `Record`s framed as a LevelDB log (32 KiB
    blocks; each chunk: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, chunk = [], header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunk += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """What one offline-run-* directory says about its run."""

    def __init__(self, directory: Path):
        self.directory = directory
        (log,) = directory.glob("*.wandb")
        self.records = wandb_records(log)

    def of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def run(self):
        return self.of("run")[0]

    @property
    def config(self) -> dict:
        items = [*self.run.config.update, *(i for c in self.of("config") for i in c.update)]
        return {_key(i): json.loads(i.value_json) for i in items}

    @property
    def history(self) -> list[dict]:
        return [{_key(i): json.loads(i.value_json) for i in h.item} for h in self.of("history")]

    @property
    def exit_code(self) -> int:
        (exit_record,) = self.of("exit")
        return exit_record.exit_code


def offline_runs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("offline-run-*") if p.is_dir() and not p.is_symlink())


def clean_env(home: Path, **extra: str) -> dict:
    """No user's W&B settings or credentials; W&B's caches under the test's directory."""
    return {"WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home / ".wandb-config"), "WANDB_DATA_DIR": str(home / ".wandb-data"),
            "WANDB_CACHE_DIR": str(home / ".wandb-cache"), "NETRC": str(home / "no-netrc"), **extra}


# ---------------------------------------------------------------- a 2-job multirun, logged offline

@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """`llm-train -m attention=mha,mqa logger=wandb logger.mode=offline`, with checkpoints logged
    as artifacts, and (fake) credentials in the environment that a config interpolation reaches."""
    root = tmp_path_factory.mktemp("sweep")
    env = clean_env(root, WANDB_API_KEY=FAKE_WANDB_KEY, HF_TOKEN=FAKE_HF_TOKEN)
    result = run_cli(["-m", *WANDB_RUN, "attention=mha,mqa", "budget.steps=4", "trainer.val_every=2",
                      "trainer.log_every=2", "trainer.checkpoint_every=2", "logger.log_checkpoints=true",
                      "logger.notes=${oc.env:HF_TOKEN}"], cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (root / "runs" / "multirun").iterdir()
    jobs = [sweep_dir / "0", sweep_dir / "1"]
    return {"root": root, "dir": sweep_dir, "jobs": jobs, "stdout": result.stdout,
            "summaries": [json.loads((j / "summary.json").read_text()) for j in jobs],
            "wandb": [OfflineRun(d) for j in jobs for d in offline_runs(j)]}


def test_each_multirun_job_is_its_own_finished_offline_run(sweep):
    assert [len(offline_runs(job)) for job in sweep["jobs"]] == [1, 1]
    ids = [w.run.run_id for w in sweep["wandb"]]
    assert ids == [s["run_id"] for s in sweep["summaries"]] and len(set(ids)) == 2  # the W&B id is the run id
    assert [w.exit_code for w in sweep["wandb"]] == [0, 0]  # each job finished its own run


def test_run_name_group_job_type_and_tags(sweep):
    stamp = sweep["dir"].name
    for w, summary, attention in zip(sweep["wandb"], sweep["summaries"], ["mha", "mqa"]):
        assert w.run.display_name == f"{summary['run_id']} nano {attention} rope"
        assert w.run.run_group == f"multirun-{stamp}"  # no experiment name: the sweep is the group
        assert w.run.job_type == "pretrain"
        assert {f"attention:{attention}", "model:nano", "position:rope", "logger:wandb"} <= set(w.run.tags)


def test_config_holds_the_resolved_config_choices_overrides_and_derived_facts(sweep):
    config = sweep["wandb"][1].config
    assert config["model"]["d_model"] > 0 and config["data"]["seq_len"] == 64  # the resolved config
    assert config["choice/attention"] == "mqa" and config["choice/model"] == "nano" and config["choice/posttrain"] == "none"
    assert "attention=mqa" in config["overrides"] and "budget.steps=4" in config["overrides"]
    derived = config["derived"]
    assert derived["N"] == sweep["summaries"][1]["N"] > derived["N_non_embedding"] > 0
    assert derived["flops_per_token"] == sweep["summaries"][1]["flops_per_token"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert derived["git_commit"] == commit and isinstance(derived["git_dirty"], bool)
    assert len(derived["data_fingerprint"]) == 64


def test_metrics_carry_tokens_and_flops_axes(sweep):
    w, summary = sweep["wandb"][0], sweep["summaries"][0]
    history = w.history
    assert {"train/loss", "val/loss", "val/ppl", "perf/tokens_per_s", "trainer/tokens", "trainer/flops"} <= set().union(*history)
    val = [h for h in history if "val/loss" in h]
    assert len(val) == 2
    for record in val:  # validation points sit at their tokens and FLOPs, not at the last training record's
        steps_done = record["trainer/global_step"] + 1
        assert record["trainer/tokens"] == steps_done * summary["tokens_per_step"] in (2 * 512, 4 * 512)
        assert record["trainer/flops"] == pytest.approx(record["trainer/tokens"] * summary["flops_per_token"])
    metrics = {m.glob_name or m.name: m for m in w.of("metric")}
    assert metrics["train/*"].step_metric == "trainer/tokens" and metrics["val/*"].step_metric == "trainer/tokens"
    # The learning rate and the loss guard's events line up with the loss: tokens too.
    assert metrics["trainer/lr"].step_metric == metrics["guard/*"].step_metric == "trainer/tokens"
    assert all("trainer/tokens" in h for h in history if "trainer/lr" in h or "guard/rollbacks" in h)
    assert metrics["val/loss"].summary.min  # the summary of val/loss is its minimum


def test_checkpoints_are_logged_as_model_artifacts(sweep):
    for w, summary in zip(sweep["wandb"], sweep["summaries"]):
        artifacts = [(a.name, a.type, sorted(a.aliases), json.loads(a.metadata)["step"]) for a in w.of("artifact")]
        name = f"model-{summary['run_id']}"
        assert artifacts == [(name, "model", ["latest", "step-2"], 2), (name, "model", ["latest", "step-4"], 4)]


def test_secrets_never_reach_configs_logs_or_artifacts(sweep):
    files = [p for p in sweep["root"].rglob("*") if p.is_file()]
    assert len(files) > 20
    leaked = [p for p in files if FAKE_HF_TOKEN.encode() in p.read_bytes() or FAKE_WANDB_KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert all(w.run.notes == "<redacted>" for w in sweep["wandb"])  # notes=${oc.env:HF_TOKEN} was resolved, then redacted
    assert "notes: <redacted>" in (sweep["jobs"][0] / "config.yaml").read_text()


def test_redaction_hides_credentials_and_keeps_ordinary_keys(monkeypatch):
    from llm.tracking.run import redact_secrets

    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-123")
    config = {"flops_per_token": 6.0, "max_new_tokens": 8, "tokens": 100, "bos_token": "<s>",
              "data": {"hf_token": "hf_abc", "api_key": "k", "token": "t", "name": "set with s3cr3t-value-123 inside"},
              "overrides": ["+data.corpus.hf_token=hf_abc", "attention=gqa"]}
    assert redact_secrets(config) == {
        "flops_per_token": 6.0, "max_new_tokens": 8, "tokens": 100, "bos_token": "<s>",
        "data": {"hf_token": "<redacted>", "api_key": "<redacted>", "token": "<redacted>", "name": "set with <redacted> inside"},
        "overrides": ["+data.corpus.hf_token=<redacted>", "attention=gqa"]}


def test_offline_run_prints_one_wandb_sync_line_that_finds_the_run(sweep):
    lines = [line for line in sweep["stdout"].splitlines() if "wandb sync" in line]
    assert len(lines) == 2  # one per job
    path = lines[0].split("wandb sync ", 1)[1].strip()
    assert Path(path) == offline_runs(sweep["jobs"][0])[0]
    wandb_cli = Path(sys.executable).with_name("wandb")
    dry = subprocess.run([str(wandb_cli), "sync", "--dry-run", path], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **clean_env(sweep["root"] / "sync")})
    assert dry.returncode == 0 and "Would sync 1 run" in dry.stdout + dry.stderr, dry.stdout + dry.stderr


def test_resume_continues_the_same_wandb_run(sweep, tmp_path):
    # A copy of job 1 at the same place below a runs directory keeps its run id.
    job = tmp_path / "runs" / "multirun" / sweep["dir"].name / "1"
    shutil.copytree(sweep["jobs"][1], job)
    result = run_cli([f"resume={job}", "budget.steps=6"], cwd=tmp_path,
                     env=clean_env(tmp_path, HF_TOKEN=FAKE_HF_TOKEN, LLM_CACHE_DIR=str(sweep["root"] / ".cache")))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (OfflineRun(d) for d in offline_runs(job))
    assert first.run.run_id == second.run.run_id == sweep["summaries"][1]["run_id"]
    assert max(h["trainer/global_step"] for h in second.history) == 5  # it went on to step 6


def test_ddp_run_creates_exactly_one_wandb_run_and_each_progress_line_appears_once(ddp_run):
    """DDP on 2 gloo processes: one W&B run (the launcher and rank 1 start none); rank 0 appends
    to train.log what the console shows and rank 1 logs no information, so each progress line
    appears once (one two-rank run for both: tests/test_progress.py's twin is `slow`; the run is
    tests.conftest.ddp_run, whose loss curve test_parallel checks)."""
    run, stdout = ddp_run
    (only,) = offline_runs(run.parent)  # the launcher and rank 1 start none
    w, summary = OfflineRun(only), json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and w.run.run_id == summary["run_id"]
    assert w.exit_code == 0 and any("val/loss" in h for h in w.history)
    assert stdout.count("wandb sync") == 1
    logged = (run / "train.log").read_text()
    for pattern in (r"step 5/20 \| loss", r"step 5/20 \| val/loss", r"step 20/20 \| loss", r"step 20/20 \| val/loss",
                    r"done: "):
        assert len(re.findall(f"^{pattern}", stdout, re.M)) == 1, (pattern, stdout)
        assert len(re.findall(pattern, logged)) == 1, (pattern, logged)
    assert "step" not in "".join(p.read_text() for p in run.glob("rank*.log"))  # other ranks: warnings at most


def test_use_parent_artifact_records_the_parent_offline(sweep, tmp_path, caplog):
    import wandb

    caplog.set_level(logging.INFO, logger="llm")

    parent = sweep["jobs"][0]
    child = wandb.init(project="llm", mode="offline", dir=str(tmp_path), job_type="sft")
    try:
        ref = use_parent_artifact(parent / "checkpoints" / "last.ckpt")
    finally:
        child.finish()
    rid = sweep["summaries"][0]["run_id"]
    assert ref.artifact == f"llm/model-{rid}:step-4" and ref.logged and ref.step == 4
    assert "W&B links inputs only online" in caplog.text
    (child_dir,) = offline_runs(tmp_path)
    assert OfflineRun(child_dir).config["parent"] == {"run_id": rid, "checkpoint": str((parent / "checkpoints" / "last.ckpt").resolve()),
                                                     "step": 4, "artifact": ref.artifact}
    stray = tmp_path / "elsewhere.ckpt"
    shutil.copy(parent / "checkpoints" / "last.ckpt", stray)
    with pytest.raises(FileNotFoundError, match="give the parent's run directory"):
        parent_checkpoint(stray)
    assert parent_checkpoint(stray, parent_run_dir=parent).artifact == ref.artifact


def test_a_stage_from_a_checkpoint_outside_any_run_logs_to_wandb(sweep, tmp_path):
    """init_from a loose checkpoint (or a Hugging Face folder, or an import): no run.json to link
    to, so the lineage is the parent_checkpoint in the config, and the run goes on."""
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(sweep["jobs"][0] / "checkpoints" / "last.ckpt", loose / "model.ckpt")
    shutil.copy(sweep["jobs"][0] / "tokenizer.json", loose / "tokenizer.json")
    from tests.test_posttrain import CLI_TINY

    args = ["posttrain=sft", f"init_from={loose / 'model.ckpt'}", *CLI_TINY, "budget.steps=1",
            "logger=wandb", "logger.mode=offline"]
    result = run_cli(args, cwd=tmp_path, env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = offline_runs(tmp_path / "runs")
    config = OfflineRun(run).config
    assert config["derived"]["parent_checkpoint"] == str((loose / "model.ckpt").resolve()) and "parent" not in config


def test_sample_log_writes_jsonl_always_and_a_wandb_table_when_a_run_is_active(tmp_path):
    import wandb

    rows = [{"prompt": "2+2=", "completion": "4", "reward": 1.0}, {"prompt": "3+3=", "completion": "7", "reward": 0.0}]
    samples = SampleLog(tmp_path / "run", every_n_steps=5, key="samples")
    assert not samples.log(3, rows)  # not due
    assert samples.log(5, rows[:1])  # no W&B run: the file only
    run = wandb.init(project="llm", mode="offline", dir=str(tmp_path))
    try:
        assert samples.log(10, rows)
    finally:
        run.finish()
    assert read_samples(tmp_path / "run") == [{"step": 5, "key": "samples", **rows[0]},
                                              *({"step": 10, "key": "samples", **r} for r in rows)]
    (table_file,) = offline_runs(tmp_path)[0].rglob("*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward"]
    assert table["data"] == [[10, "2+2=", "4", 1.0], [10, "3+3=", "7", 0.0]]
    with pytest.raises(ValueError, match="every_n_steps=0"):
        SampleLog(tmp_path, every_n_steps=0)


def test_llm_eval_writes_its_task_completions_as_samples(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sweep["jobs"][0], run)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in [("import", " os"), ("def", " f")]))
    result = run_cli([f"checkpoint={run}", f"tasks_file={tasks}", "perplexity=false", "task_max_new_tokens=4"],
                     cwd=tmp_path, command="evaluate", env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_samples(run)
    assert [(r["key"], r["prompt"], r["answer"]) for r in rows] == [("eval/samples", "import", " os"), ("eval/samples", "def", " f")]
    assert all(r["step"] == 4 and isinstance(r["completion"], str) and r["reward"] in (0.0, 1.0) for r in rows)
    eval_report = json.loads((run / "eval.json").read_text())
    assert sum(r["reward"] for r in rows) == eval_report["results"]["fp32"]["correct"]


# ---------------------------------------------------------------- the W&B sweep file

def test_wandb_sweep_file_drives_llm_train_with_valid_overrides(tmp_path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, make_launch_sweep_entrypoint

    spec = yaml.safe_load((REPO / "sweeps" / "wandb_attention.yaml").read_text())
    assert spec["program"] == "llm-train" and spec["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert spec["command"] == ["${env}", "llm-train", "${args_no_hyphens}"]
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'llm-train = "llm.cli.train:main"' in scripts
    params = spec["parameters"]
    grid = [dict(zip(params, values)) for values in
            itertools.product(*(p["values"] if "values" in p else [p["value"]] for p in params.values()))]
    assert len(grid) == 3
    for point in grid:  # exactly the arguments W&B's agent builds for this trial
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
        entrypoint, overrides = make_launch_sweep_entrypoint(args, list(spec["command"]))
        assert entrypoint == ["${env}", "llm-train"]
        cfg = compose_train(overrides, tmp_path)
        assert group_choices(cfg)["attention"] == point["attention"]
        assert cfg.experiment_name == "attention_ablation" and cfg.budget.flops == 4e12
        from llm.config import validate

        validate(cfg, world_size=1)  # the composed trial passes llm-train's own checks
