"""What is on disk is data, not instructions: run.json builds only the config groups' targets,
credentials never reach a file or W&B, one process owns a run directory, and a resume either
honours what changed (lr, seq_len: D counts what was trained) or refuses it (corpus, tokenizer,
a spent budget) with exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.config import ConfigError
from llm.run.layout import RunDir
from llm.run.lock import RunLock
from llm.run.resume import known_targets
from llm.tracking.metrics import read_metrics
from llm.train import train
from tests.conftest import TINY_RUN, compose_train, llm_cli

SHORT = [*TINY_RUN, "budget.steps=4", "trainer.val_every=2", "trainer.checkpoint_every=2", "schedule=constant",
         "schedule.warmup=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run (its directory is copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("finished")
    summary = train(compose_train(SHORT, root))
    assert summary["status"] == "completed"
    return root


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def craft_target(run: Path, key: str, node: dict) -> None:
    saved = json.loads((run / "run.json").read_text())
    parent = saved["config"]
    *path, last = key.split(".")
    for part in path:
        parent = parent[part]
    parent[last] = node
    (run / "run.json").write_text(json.dumps(saved))


# -- run.json builds only what the config groups define -------------------------------------------

def test_the_allowlist_is_exactly_the_config_groups_targets():
    targets = known_targets()
    assert {"torch.optim.AdamW", "llm.data.TextCorpus", "llm.stages.pretrain.PretrainModule"} <= targets
    # Targets the old prefix list let through: a torch or llm function is not a config group's target.
    assert not {"torch.load", "torch.save", "llm.files.write_text", "os.system"} & targets


@pytest.mark.parametrize("command,key", [("train", "optim"), ("train", "data.corpus"), ("evaluate", "data.corpus")])
def test_a_crafted_target_in_run_json_is_refused_and_never_runs(command, key, finished, tmp_path, monkeypatch,
                                                               capsys, single_thread):
    run = copy_run(finished, tmp_path)
    marker = tmp_path / "MARKER"
    # llm.files.write_text is one of our own functions: allowed by the old `llm.` prefix, and it writes a file.
    craft_target(run, key, {"_target_": "llm.files.write_text", "path": str(marker), "text": "pwned"})
    args = [f"resume={run}"] if command == "train" else [f"checkpoint={run}"]
    code, stderr = llm_cli(command, args, tmp_path, monkeypatch, capsys)
    assert code == 2, stderr[-2000:]
    assert f"{key}._target_='llm.files.write_text'" in stderr and "refused" in stderr
    assert "Traceback" not in stderr
    assert not marker.exists()


def test_a_target_named_again_on_the_command_line_is_trusted(finished, tmp_path, monkeypatch, capsys, single_thread):
    run = copy_run(finished, tmp_path)
    craft_target(run, "optim._target_", "torch.optim.SGD")  # not a config group's optimizer target
    code, stderr = llm_cli("train", [f"resume={run}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "optim._target_='torch.optim.SGD'" in stderr and "optim._target_=torch.optim.SGD" in stderr


# -- secrets --------------------------------------------------------------------------------------

SECRET = "s3cr3t-v4lue-0f-a-t0ken"


def test_credentials_reach_no_file_and_nothing_sent_to_wandb(tmp_path, monkeypatch, capsys, single_thread):
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [*TINY_RUN, "budget.steps=2", "trainer.val_every=2", "logger=wandb", "logger.mode=offline",
            "hydra.run.dir=runs/secret", f"logger.group=grp-{SECRET}", f"logger.tags=[t-{SECRET}]",
            "logger.notes=${oc.env:MY_SERVICE_TOKEN}", f"experiment_name=exp-{SECRET}"]
    code, stderr = llm_cli("train", args, tmp_path, monkeypatch, capsys)
    assert code == 0, stderr[-3000:]
    run = tmp_path / "runs" / "secret"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "hydra.yaml" for p in files)
    leaked = [str(p.relative_to(tmp_path)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the secret is in {leaked}"
    assert SECRET not in stderr
    saved = json.loads((run / "run.json").read_text())
    assert saved["config"]["logger"]["notes"] == "${oc.env:MY_SERVICE_TOKEN}"  # where it is, not what it is
    assert "logger.group=grp-<redacted>" in saved["overrides"]
    sent = next(p for p in files if p.suffix == ".wandb").read_bytes()  # what W&B uploads, as recorded offline
    assert b"logger.group=grp-<redacted>" in sent and b"grp-<redacted>" in sent  # the args, and the group


def test_a_redacted_credential_must_be_given_again_on_resume(finished, tmp_path, monkeypatch, capsys, single_thread):
    run = copy_run(finished, tmp_path)
    craft_target(run, "logger.notes", "<redacted>")
    code, stderr = llm_cli("train", [f"resume={run}", "budget.steps=6"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "logger.notes: a credential, redacted from run.json; give it again" in stderr


# -- one process per run directory ----------------------------------------------------------------

HOLD = ("import sys, time; from llm.run.lock import RunLock; from llm.run.layout import RunDir; "
        "lock = RunLock(RunDir(sys.argv[1])); lock.acquire(); print('locked', flush=True); time.sleep(60)")


def test_a_held_lock_refuses_and_a_dead_owners_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another llm-train \(pid {holder.pid} on .*\) is running"):
            RunLock(RunDir(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(RunDir(tmp_path))
    lock.acquire()  # the kernel released the dead process's flock; its note is stale
    assert f"a stale lock of pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # a finished run leaves no owner behind


def test_llm_train_in_a_locked_directory_exits_2_and_leaves_it_alone(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in run.iterdir())
        code, stderr = llm_cli("train", [*TINY_RUN, "budget.steps=2", f"hydra.run.dir={run}"], tmp_path, monkeypatch,
                               capsys)
        assert code == 2 and f"another llm-train (pid {holder.pid}" in stderr and "Traceback" not in stderr
        assert sorted(p.name for p in run.iterdir()) == before  # no run.json, no checkpoint, the lock kept
        assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # two real llm-train processes: the case above covers the refusal in CI
def test_a_second_llm_train_on_a_running_directory_is_refused(tmp_path, monkeypatch, capsys):
    first = subprocess.Popen([sys.executable, "-m", "llm.cli.train", *TINY_RUN, "budget.steps=400",
                              "trainer.val_every=400", "hydra.run.dir=runs/shared"], cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "runs" / "shared" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and read_metrics(metrics)) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()[-2000:]
        code, stderr = llm_cli("train", [*TINY_RUN, "budget.steps=2", f"hydra.run.dir={tmp_path}/runs/shared"],
                               tmp_path, monkeypatch, capsys)
        assert code == 2, stderr[-2000:]
        assert f"another llm-train (pid {first.pid}" in stderr and "is running in this directory" in stderr
        assert first.poll() is None  # the first run is untouched and goes on
    finally:
        first.kill()
        first.wait()


# -- resumes that cannot silently diverge ---------------------------------------------------------

def test_resume_refuses_a_changed_corpus_and_keeps_the_run_s_tokenizer(tmp_path, monkeypatch, capsys, single_thread):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 60)
    args = [*SHORT, "data=text", f"data.corpus.paths={corpus}", "tokenizer.vocab_size=300"]
    assert train(compose_train(args, tmp_path))["status"] == "completed"
    tokenizer = (tmp_path / "run" / "tokenizer.json").read_bytes()
    corpus.write_text(("Pack my box with five dozen liquor jugs! " * 40 + "\n") * 60)
    code, stderr = llm_cli("train", [f"resume={tmp_path}/run", "budget.steps=6"], tmp_path, monkeypatch, capsys)
    assert code == 2, stderr[-2000:]
    assert "the corpus changed (its fingerprint was" in stderr
    assert "resume_new_data=true" in stderr and "Traceback" not in stderr
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tokenizer
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_done"] == 4
    # Asked for explicitly, it continues on the new data.
    code, stderr = llm_cli("train", [f"resume={tmp_path}/run", "budget.steps=6", "resume_new_data=true"], tmp_path,
                           monkeypatch, capsys)
    assert code == 0, stderr[-2000:]
    assert "continuing on the new data" in stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_done"] == 6
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tokenizer  # the embeddings' own tokenizer
    # and a tokenizer setting cannot be changed on resume (it could not take effect)
    code, stderr = llm_cli("train", [f"resume={tmp_path}/run", "budget.steps=8", "tokenizer.vocab_size=400"], tmp_path,
                           monkeypatch, capsys)
    assert code == 2 and "tokenizer.vocab_size=400: a resumed run keeps the tokenizer" in stderr


def test_resume_with_another_lr_and_seq_len_takes_effect_and_counts_d_as_trained(finished, tmp_path, single_thread):
    run = copy_run(finished, tmp_path)
    before = json.loads((run / "summary.json").read_text())
    assert before["D"] == 4 * 8 * 64
    summary = train(compose_train(["resume=run", "budget.steps=8", "data.seq_len=32", "optim.lr=1e-3",
                                   "trainer.log_every=1"], tmp_path))
    assert summary["status"] == "completed"
    records = [r for r in read_metrics(run / "metrics.jsonl") if "trainer/lr" in r]
    lrs = {r["step"]: r["trainer/lr"] for r in records}
    assert [lrs[s] for s in (5, 6, 7, 8)] == pytest.approx([1e-3] * 4)  # the new lr from the first resumed step
    assert summary["D"] == summary["tokens_seen"] == 4 * 8 * 64 + 4 * 8 * 32
    tokens = {r["step"]: r["trainer/tokens"] for r in records}
    assert tokens[8] == summary["D"] and tokens[5] == 4 * 8 * 64 + 8 * 32  # the W&B x-axis counts alike
    assert summary["C"] < summary["D"] * before["C"] / before["D"]  # shorter sequences: fewer FLOPs per token


def test_resume_of_a_spent_budget_says_so(finished, tmp_path, monkeypatch, capsys, single_thread):
    run = copy_run(finished, tmp_path)
    before = (run / "summary.json").read_bytes()
    code, stderr = llm_cli("train", [f"resume={run}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "already completed its budget (4 of 4 steps)" in stderr and "budget.steps=8" in stderr
    assert (run / "summary.json").read_bytes() == before


def test_a_token_budget_resumed_with_another_seq_len_trains_exactly_its_tokens(finished, tmp_path, single_thread):
    copy_run(finished, tmp_path)  # 4 steps of 8 x 64 tokens: 2,048
    summary = train(compose_train(["resume=run", "budget.steps=null", "budget.tokens=4096", "data.seq_len=32"],
                                  tmp_path))
    assert summary["steps_done"] == 4 + 2048 // (8 * 32)  # the remaining 2,048 tokens at 256 per step
    assert summary["D"] == 4096


def test_a_run_refused_after_it_took_the_lock_leaves_no_directory(tmp_path, monkeypatch, capsys, single_thread):
    (tmp_path / "short.txt").write_text("too short\n")
    code, stderr = llm_cli("train", [*TINY_RUN, "data=text", f"data.corpus.paths={tmp_path}/short.txt",
                                     "hydra.run.dir=runs/refused"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "too few for one block" in stderr
    assert not (tmp_path / "runs" / "refused").exists()  # neither Hydra's files nor an ownerless .lock
