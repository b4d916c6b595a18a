"""Shared test helpers: real Hydra composition of conf/train.yaml, tiny and fast settings."""

from __future__ import annotations

import logging
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from llm.cli.common import setup
from llm.cli.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

# A run that trains in seconds on 2 cores: the smallest model on ~300 kB of the stdlib corpus.
TINY_RUN = [
    "model=nano",
    "data.corpus.max_bytes=300000",
    "tokenizer.vocab_size=512",
    "data.seq_len=64",
    "data.micro_batch_size=8",
    "logger=none",
    "trainer.progress_bar=false",
]


def compose_train(overrides: list[str], root: Path | None = None, config_name: str = "train") -> DictConfig:
    """Compose like `llm-train` does (same config dir, resolvers, schemas), with paths under `root`."""
    setup()
    GlobalHydra.instance().clear()
    paths = [f"paths.root_dir={root}", f"paths.run_dir={root}/run"] if root else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, *paths], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} and the group choices resolve
    return cfg


def run_cli(args: list[str], cwd: Path, command: str = "train", timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script of this package in a subprocess, as a user would."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", f"llm.cli.{command}", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _main_exit_code(command: str, args: list[str], cwd: Path, monkeypatch) -> int:
    """`llm-<command> args` run in this process from `cwd`: its exit code."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [f"llm-{command}", *args])
    module = importlib.import_module(f"llm.cli.{command}")
    try:
        module.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def llm_cli(command: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run `llm-<command> args` in this process, as from a shell in `cwd`: (exit code, stderr).
    No interpreter start-up: seconds cheaper than `run_cli` where a subprocess proves nothing more."""
    code = _main_exit_code(command, args, cwd, monkeypatch)
    return code, capsys.readouterr().err


def llm_cli_output(command: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """As `llm_cli`, keeping what the command wrote to stdout: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = _main_exit_code(command, args, cwd, monkeypatch)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _logging_restored():
    """An entry point run in this process configures logging (Hydra's job logging, the argparse
    commands' console): the next test starts without its handlers, as a fresh process would."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path, monkeypatch):
    """No test may reach W&B's servers or a user's credentials."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory) -> Path:
    """One real sharded run for the tests that need one (test_parallel, test_checkpoint; 2 gloo
    processes cost ~20 s of CI a run): tests.test_parallel's CURVE under FSDP2 on 2 processes for
    10 steps, a sharded last.ckpt at step 10, in <root>/runs/fsdp. Read it; copy it to change it."""
    from tests.test_parallel import CURVE

    root = tmp_path_factory.mktemp("fsdp")
    run = root / "runs" / "fsdp"
    result = run_cli([*CURVE, "parallelism=fsdp", "trainer.devices=2", "budget.steps=10", f"hydra.run.dir={run}"],
                     cwd=root, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    """One real DDP run for the tests that need one (test_parallel: its loss curve;
    test_wandb_conventions: its one W&B run and console lines): tests.test_parallel's CURVE under
    DDP on 2 gloo processes for 20 steps, logged to W&B offline, progress bar on, in <root>/ddp
    (W&B's files under root): (the run, its stdout)."""
    from tests.test_parallel import CURVE
    from tests.test_wandb_conventions import clean_env

    root = tmp_path_factory.mktemp("ddp")
    run = root / "ddp"
    args = [a for a in CURVE if not a.startswith(("logger=", "trainer.progress_bar"))]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_API_KEY", raising=False)  # (before any test's _isolated_wandb)
        result = run_cli([*args, "logger=wandb", "logger.mode=offline", "trainer.progress_bar=true", "parallelism=ddp",
                          "trainer.devices=2", "budget.steps=20", f"hydra.run.dir={run}"], cwd=root,
                         env={**clean_env(root), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result.stdout


def place_files(directory: Path, files: dict) -> None:
    """Write `files` into `directory` over what is there: {"summary_json": text or bytes} writes
    summary.json; None makes a directory of that name (a file where a directory does not belong)."""
    for name, content in files.items():
        path = directory / name.replace("_", ".")
        if path.exists():
            path.unlink() if path.is_file() else path.rmdir()
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
