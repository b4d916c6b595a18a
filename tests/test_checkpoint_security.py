"""A sharded checkpoint's pickled parts run no code: a crafted index (`.metadata`) or shard entry is
refused, with the file or entry named, at every place one is read (resume, llm-eval,
llm-generate, init_from, llm-consolidate, Lightning's own resume load), and the marker file its
payload would create never appears; genuine sharded checkpoints still load exactly."""

from __future__ import annotations

import os
import pickle
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from llm.checkpoint import checkpoint_problem, load_network, newest_loadable_checkpoint, read_weights
from llm.checkpoint.consolidate import consolidate
from llm.checkpoint.safe_reader import METADATA_FILE, RefusedPickle, SafeFileSystemReader
from llm.config import ConfigError
from llm.files import write_json
from llm.model import ModelConfig, Transformer
from llm.parallel import FSDP
from llm.parallel.strategy import SafeModelParallelStrategy
from llm.run.layout import LAST, META, RunDir
from llm.tokenizer import build_tokenizer
from tests.conftest import llm_cli

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


class RunsShell:
    """What an attacker pickles: unpickling it runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class TouchesFile(RunsShell):
    """The same through pathlib.Path.touch: a function of a module whose PosixPath the index may hold."""

    def __reduce__(self):
        return Path.touch, (self.marker,)


def tiny() -> ModelConfig:
    return ModelConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=260, max_seq_len=16)


def adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=lr,
                             betas=(0.9, 0.95))


def trained(model: nn.Module) -> torch.optim.Optimizer:
    """An AdamW after one step on `model`: moments, step counts and two param groups to save."""
    optimizer = adamw(model)
    model(torch.randint(0, 260, (2, 8))).float().pow(2).mean().backward()
    optimizer.step()
    return optimizer


def save_sharded(directory: Path, model: nn.Module, step: int = 1, **extra) -> dict:
    """A sharded checkpoint in Lightning's layout, written by torch.distributed.checkpoint in this
    process (the module as `model.`, an optimizer's state keyed by parameter name, non-tensor
    entries of every plain kind), and meta.pt; returns the state saved."""
    lit = nn.ModuleDict({"model": model})  # the LightningModule holds the network as `self.model`
    state = {"state_dict": get_model_state_dict(lit), "optimizer_0": get_optimizer_state_dict(lit, trained(model)),
             "extra": {"count": 3, "ratio": 0.5, "blob": b"\x00\x01", "name": "x", "none": None,
                       "half": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(4)}, **extra}
    dcp.save(state, checkpoint_id=directory, no_dist=True)  # a Path, as Lightning passes it
    torch.save({"global_step": step, "llm": {"stage": "pretrain", "model_config": asdict(model.cfg)}}, directory / META)
    return state


def plant(directory: Path, payload: RunsShell) -> None:
    """Rewrite the shards' index as an attacker would: the genuine one, carrying a payload."""
    metadata = pickle.loads((directory / METADATA_FILE).read_bytes())  # our own file, just written
    metadata.storage_meta.modules = [payload]
    (directory / METADATA_FILE).write_bytes(pickle.dumps(metadata))


def make_run(root: Path) -> RunDir:
    run = RunDir(root / "run")
    run.checkpoints.mkdir(parents=True)
    write_json(run.run_file, {"run_id": "run", "config": {}, "choices": {}})
    build_tokenizer(None, root / "cache", kind="byte").save(run.tokenizer)
    return run


def same(a, b) -> bool:
    """Equal values of equal types all the way down (tensors: equal dtype, shape and elements)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ---- genuine checkpoints: the allowlist is not too narrow ----

def test_a_genuine_sharded_checkpoint_reads_exactly_through_the_safe_reader(tmp_path):
    model = Transformer(tiny())
    saved = save_sharded(tmp_path / "shards", model, step=3)
    shards = tmp_path / "shards"
    # The index unpickles to what torch's own (plain pickle) reader gives.
    mine, torchs = SafeFileSystemReader(shards).read_metadata(), dcp.FileSystemReader(shards).read_metadata()
    assert mine.state_dict_metadata == torchs.state_dict_metadata and mine.storage_data == torchs.storage_data
    assert mine.planner_data == torchs.planner_data and mine.storage_meta.checkpoint_id == shards
    assert checkpoint_problem(shards) is None

    weights = read_weights(shards)
    assert same(weights, model.state_dict())
    tokens = torch.randint(0, 260, (2, 8))
    with torch.no_grad():
        assert torch.equal(load_network(shards)(tokens), model(tokens))

    full = torch.load(consolidate(shards, tmp_path / "full.ckpt"), weights_only=True)
    assert same(full["state_dict"], saved["state_dict"])
    assert same(full["optimizer_states"], [saved["optimizer_0"]])  # betas a tuple, params names, step tensors
    assert same(full["extra"], saved["extra"]) and full["global_step"] == 3


# ---- a crafted index: refused everywhere, nothing run ----

@pytest.mark.parametrize("payload", [RunsShell, TouchesFile], ids=["os.system", "pathlib.Path.touch"])
def test_a_crafted_index_is_refused_by_every_reader_and_runs_nothing(payload, tmp_path):
    shards, marker = tmp_path / "shards", tmp_path / "MARKER"
    save_sharded(shards, Transformer(tiny()))
    plant(shards, payload(marker))
    refused = "refused to unpickle " + ("posix.system" if payload is RunsShell else "pathlib.Path.touch")

    assert refused in checkpoint_problem(shards)  # the resume check
    with pytest.raises(RefusedPickle, match=rf"{METADATA_FILE}: {refused}"):
        read_weights(shards)  # init_from, a post-training run's finish
    with pytest.raises(ConfigError, match=rf"shards: not a readable checkpoint \(.*{METADATA_FILE}: {refused}"):
        load_network(shards)  # llm-eval, llm-generate, a parent
    with pytest.raises(ConfigError, match=rf"not a readable checkpoint \(.*{refused}"):
        consolidate(shards, tmp_path / "full.ckpt")
    assert not marker.exists() and not (tmp_path / "full.ckpt").exists()


def test_resume_sets_a_crafted_checkpoint_aside_and_takes_the_previous_one(tmp_path):
    run, marker = make_run(tmp_path), tmp_path / "MARKER"
    save_sharded(run.checkpoints / "step-1.ckpt", Transformer(tiny()), step=1)
    save_sharded(run.checkpoints / LAST, Transformer(tiny()), step=2)
    plant(run.checkpoints / LAST, RunsShell(marker))

    found, corrupt = newest_loadable_checkpoint(run.path)
    assert found == run.checkpoints / "step-1.ckpt"
    assert [c["path"] for c in corrupt] == [str(run.checkpoints / LAST)]
    assert "RefusedPickle" in corrupt[0]["error"] and "refused to unpickle posix.system" in corrupt[0]["error"]
    assert (run.checkpoints / f"{LAST}.corrupt").is_dir() and not marker.exists()


@pytest.mark.parametrize("command,args", [("checkpoint", ["{ckpt}"]), ("evaluate", ["checkpoint={run}", "data=synthetic"]),
                                          ("generate", ["checkpoint={run}", "prompt=x"])],
                         ids=["llm-consolidate", "llm-eval", "llm-generate"])
def test_the_commands_refuse_a_crafted_checkpoint_with_exit_2(command, args, tmp_path, monkeypatch, capsys):
    run, marker = make_run(tmp_path), tmp_path / "MARKER"
    save_sharded(run.last_checkpoint, Transformer(tiny()))
    plant(run.last_checkpoint, RunsShell(marker))
    args = [a.format(ckpt=run.last_checkpoint, run=run.path) for a in args]
    code, stderr = llm_cli(command, args, tmp_path, monkeypatch, capsys)
    assert code == 2, stderr[-3000:]
    assert f"{run.last_checkpoint}: not a readable checkpoint (" in stderr
    assert f"{run.last_checkpoint / METADATA_FILE}: refused to unpickle posix.system" in stderr
    assert "Traceback" not in stderr and not marker.exists()


# ---- a crafted non-tensor entry in the shards ----

def test_a_crafted_shard_entry_is_refused_and_runs_nothing(tmp_path):
    shards, marker = tmp_path / "shards", tmp_path / "MARKER"
    model = Transformer(tiny())
    save_sharded(shards, model, planted={"note": RunsShell(marker)})  # torch pickles it into a shard file
    assert same(read_weights(shards), model.state_dict())  # the network's tensors alone are untouched
    with pytest.raises(ConfigError, match=r"shard entry planted.note: refused to unpickle posix.system"):
        consolidate(shards, tmp_path / "full.ckpt")
    assert not marker.exists()


# ---- Lightning's resume load under FSDP/TP ----

class Lit(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = Transformer(tiny())


def strategy_for(module: Lit) -> SafeModelParallelStrategy:
    """The strategy `parallelism=fsdp` gives, holding the module and its optimizer as after setup
    (made as configure_optimizers makes it, before a resume loads its state)."""
    strategy = FSDP().strategy(world_size=1)
    assert isinstance(strategy, SafeModelParallelStrategy)
    strategy.connect(module)
    strategy.optimizers = [adamw(module.model, lr=0.5)]
    return strategy


def lightning_checkpoint(directory: Path, module: Lit, optimizer_state: dict) -> None:
    """What ModelParallelStrategy.save_checkpoint writes: the module and each optimizer, and meta.pt."""
    dcp.save({"state_dict": get_model_state_dict(module), "optimizer_0": optimizer_state}, checkpoint_id=directory,
             no_dist=True)
    torch.save({"global_step": 5, "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}}},
               directory / META)


def test_lightnings_resume_load_restores_a_genuine_checkpoint_and_refuses_crafted_ones(tmp_path):
    saved = Lit()
    optimizer = trained(saved.model)
    lightning_checkpoint(tmp_path / "genuine", saved, get_optimizer_state_dict(saved, optimizer))
    fresh = Lit()
    strategy = strategy_for(fresh)
    meta = strategy.load_checkpoint(tmp_path / "genuine")
    assert meta["global_step"] == 5 and meta["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    assert same(fresh.state_dict(), saved.state_dict())
    assert same(strategy.optimizers[0].state_dict(), optimizer.state_dict())  # moments, steps, lr 1e-3, groups

    marker = tmp_path / "MARKER"
    lightning_checkpoint(tmp_path / "index", saved, get_optimizer_state_dict(saved, optimizer))
    plant(tmp_path / "index", RunsShell(marker))
    with pytest.raises(RefusedPickle, match=r"\.metadata: refused to unpickle posix.system"):
        strategy_for(Lit()).load_checkpoint(tmp_path / "index")
    crafted = get_optimizer_state_dict(saved, optimizer)
    crafted["param_groups"][0]["lr"] = RunsShell(marker)  # an optimizer hyperparameter: a non-tensor entry
    lightning_checkpoint(tmp_path / "entry", saved, crafted)
    with pytest.raises(RefusedPickle, match=r"shard entry optimizer_0.param_groups.0.lr: refused to unpickle posix"):
        strategy_for(Lit()).load_checkpoint(tmp_path / "entry")
    assert not marker.exists()
