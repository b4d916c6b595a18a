"""`llm.checkpoint`: every kind of reference resolves (and a wrong one is refused naming the key,
the path and the fix); a loaded network holds exactly the saved weights (files, shards, LoRA
adapters folded onto their parent, Hugging Face folders); a real 2-process FSDP checkpoint
consolidates into one file with the same state; the atomic writer never leaves a torn file."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from llm.checkpoint import (
    CheckpointRef,
    checkpoint_problem,
    load_meta,
    load_network,
    load_parent,
    load_tokenizer,
    read_weights,
    resolve,
    tokenizer_file,
)
from llm.checkpoint.save import verify_readable, atomic_torch_save, save_network
from llm.cli.checkpoint import main as llm_consolidate
from llm.config import ConfigError
from llm.files import atomic_write, json_lines, read_jsonl, write_json
from llm.model import ModelConfig, Transformer
from llm.model.lora import LoRAConfig, apply_lora, lora_state_dict, merge_lora
from llm.model.value import ValueModel
from llm.run.layout import LAST, RunDir
from llm.tokenizer import Tokenizer, build_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layers": 2, "d_model": 32, "n_heads": 4, "vocab_size": 64, "max_seq_len": 32, **kw})


def make_run(runs: Path, name: str, model: nn.Module, step: int = 7, **llm) -> RunDir:
    """A run directory as llm-train leaves it, as far as the checkpoint module reads it."""
    run = RunDir(runs / name)
    run.path.mkdir(parents=True)
    write_json(run.run_file, {"run_id": name, "config": {}, "choices": {}})
    build_tokenizer(None, runs / "cache", kind="byte").save(run.tokenizer)
    save_network(model, run.last_checkpoint, {"stage": "pretrain", **llm}, global_step=step)
    return run


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# ---- resolve and load: files, run directories, run ids ----

def test_a_run_directory_its_id_and_its_file_resolve_to_last_ckpt_and_load_its_weights(tmp_path):
    runs = tmp_path / "runs"
    model = Transformer(tiny())
    run = make_run(runs, "pre", model)
    by_dir, by_id, by_file = resolve(run.path, runs), resolve("pre", runs), resolve(run.last_checkpoint, runs)
    assert by_dir == by_id == by_file == CheckpointRef(run.last_checkpoint.resolve(), run.path.resolve(), "file")
    assert by_dir.step == 7 and by_dir.run_id == "pre"
    assert tokenizer_file(by_dir) == run.tokenizer.resolve()
    assert load_tokenizer(tokenizer_file(by_dir)).encode("héllo") == load_tokenizer(run.tokenizer).encode("héllo")
    loaded = load_network(by_dir)
    assert type(loaded) is Transformer and not loaded.training
    assert_same_state(loaded, model.state_dict())

    # A file outside a run: no run directory; its tokenizer is the one beside it, or must be given.
    bare = tmp_path / "elsewhere" / "model.ckpt"
    save_network(model, bare)
    assert resolve(bare, runs) == CheckpointRef(bare.resolve(), None, "file")
    with pytest.raises(ConfigError, match=r"tokenizer.path: required.*give tokenizer.path="):
        tokenizer_file(resolve(bare, runs))
    (bare.parent / "tokenizer.json").write_text(run.tokenizer.read_text())
    assert tokenizer_file(resolve(bare, runs)) == (bare.parent / "tokenizer.json").resolve()
    assert tokenizer_file(resolve(bare, runs), run.tokenizer) == run.tokenizer


def test_a_value_model_loads_as_one_and_is_refused_where_a_language_model_is_needed(tmp_path):
    reward = ValueModel(tiny())
    path = save_network(reward, tmp_path / "reward.ckpt", {"stage": "reward", "value_head": True})
    loaded = load_network(path)
    assert isinstance(loaded, ValueModel)
    assert_same_state(loaded, reward.state_dict())
    with pytest.raises(ConfigError, match=r"checkpoint: .*reward.ckpt is a reward/value model \(stage reward\); "
                                          r"this needs a language model"):
        load_network(path, value_head=False)


# ---- LoRA: adapters folded onto the parent, and the merged export a finished run leaves ----

def lora_run(runs: Path) -> tuple[RunDir, RunDir, dict[str, torch.Tensor]]:
    """A pretraining run, and an SFT run with LoRA adapters on it (adapters only in its last.ckpt,
    as PostTrainModule saves them); and the merged weights the two make."""
    torch.manual_seed(0)
    base = Transformer(tiny())
    parent = make_run(runs, "base", base)
    lora = LoRAConfig(rank=2, alpha=4.0, targets=["q", "v"], enabled=True)
    tuned = copy.deepcopy(base)
    apply_lora(tuned, lora.rank, lora.alpha, lora.dropout, lora.targets)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.requires_grad:  # the adapters, as training left them (B starts at zero)
                param.add_(torch.randn_like(param))
    adapters = lora_state_dict(tuned)
    merged = merge_lora(copy.deepcopy(tuned)).state_dict()
    run = RunDir(runs / "sft")
    run.path.mkdir()
    write_json(run.run_file, {"run_id": "sft", "config": {}, "choices": {}})
    run.tokenizer.write_text(parent.tokenizer.read_text())
    atomic_torch_save({"state_dict": {f"model.{k}": v for k, v in adapters.items()}, "global_step": 3,
                       "llm": {"stage": "sft", "model_config": asdict(base.cfg), "value_head": False,
                               "lora": asdict(lora), "parent": str(parent.last_checkpoint.resolve())}},
                      run.last_checkpoint)
    return parent, run, merged


def test_lora_adapters_fold_onto_the_parent_and_a_finished_run_resolves_to_merged_ckpt(tmp_path):
    runs = tmp_path / "runs"
    parent, run, merged = lora_run(runs)
    adapters_only = resolve(run.path, runs)
    assert adapters_only.path == run.last_checkpoint.resolve()
    assert all("lora_" in key for key in read_weights(adapters_only.path))  # the adapters, nothing of the base
    assert_same_state(load_network(adapters_only), merged)

    # What the finished run exports: merged.ckpt, which a run directory then stands for.
    save_network(load_network(adapters_only), run.merged_checkpoint, {"stage": "sft", "parent": str(parent.path)})
    ref = resolve(run.path, runs)
    assert ref == CheckpointRef(run.merged_checkpoint.resolve(), run.path.resolve(), "file")
    assert_same_state(load_network(ref), merged)
    started = load_parent("sft", runs)
    assert started.ref == ref and started.stage == "sft" and started.tokenizer_path == run.tokenizer.resolve()
    for key, value in merged.items():
        assert torch.equal(started.state[key], value), key

    # Adapters whose base is gone: refused with the fix.
    run.merged_checkpoint.unlink()
    parent.last_checkpoint.rename(parent.last_checkpoint.with_name("moved.ckpt"))
    with pytest.raises(ConfigError, match=r"init_from='sft': .*holds LoRA adapters only.*give the run directory"):
        load_parent("sft", runs)


# ---- Hugging Face folders ----

def test_a_hugging_face_folder_resolves_and_loads_its_weights_and_tokenizer(tmp_path):
    pytest.importorskip("safetensors")
    from llm.interop import export_hf

    tokenizer = build_tokenizer(None, tmp_path / "cache", kind="byte")
    model = Transformer(tiny(vocab_size=tokenizer.vocab_size))
    folder = export_hf(model, tmp_path / "hf", tokenizer)
    ref = resolve(folder, tmp_path)
    assert ref == CheckpointRef(folder.resolve(), None, "hf") and ref.step == 0
    assert_same_state(load_network(ref), model.state_dict())
    assert load_tokenizer(tokenizer_file(ref)).encode("héllo wörld") == tokenizer.encode("héllo wörld")
    # As init_from: imported on the fly, its tokenizer converted once into the cache.
    parent = load_parent(str(folder), tmp_path, cache_dir=tmp_path / "cache")
    assert (parent.stage, parent.value_head, parent.model_config) == ("hf", False, model.cfg)
    assert_same_state(parent.load(value_head=False), model.state_dict())
    assert parent.tokenizer_path.is_relative_to(tmp_path / "cache" / "hf_tokenizers")
    assert Tokenizer.load(parent.tokenizer_path).content_hash() == tokenizer.content_hash()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"init_from='.*hf'.*has no tokenizer.json; a stage needs the model's"):
        load_parent(str(folder), tmp_path, cache_dir=tmp_path / "cache")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint='.*hf': the Hugging Face folder .* has no weights"):
        resolve(str(folder), tmp_path)


# ---- what is refused ----

def test_references_that_name_no_checkpoint_are_refused_with_the_key_the_path_and_the_fix(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.raises(ConfigError, match=r"init_from: required; give init_from=<run directory \| run id"):
        resolve(None, runs, key="init_from")
    with pytest.raises(ConfigError, match=r"checkpoint='nope': no such checkpoint file, run directory, or run id "
                                          rf"under {runs}; allowed: a run directory, a run id"):
        resolve("nope", runs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"is a directory without checkpoints/last.ckpt, meta.pt, model.ckpt or config.json; "
                                          r"allowed:"):
        resolve(tmp_path / "empty", runs)
    started = RunDir(runs / "started")
    started.path.mkdir()
    write_json(started.run_file, {"run_id": "started"})
    with pytest.raises(ConfigError, match=r"checkpoint='started': the run directory .* has no checkpoints/last.ckpt"):
        resolve("started", runs)

    # Resolved, but not loadable: a torn file, a foreign file.
    torn = tmp_path / "torn.ckpt"
    save_network(Transformer(tiny()), torn)
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"checkpoint: .*torn.ckpt: not a readable checkpoint \(not a whole "
                                          r"checkpoint archive .*\); give a run directory"):
        load_network(torn)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ConfigError, match=r"foreign.pt: not a readable checkpoint \(no model config in it: it was "
                                          r"not written by llm-train\)"):
        load_network(foreign)


# ---- a real sharded checkpoint: FSDP on 2 gloo processes ----

# fsdp_run (tests/conftest.py): ten optimizer steps of llm-train under FSDP2 on 2 processes, a
# sharded last.ckpt at step 10 (the run test_parallel resumes on one process).


def test_a_real_fsdp_checkpoint_resolves_loads_and_consolidates_to_the_same_state(fsdp_run, tmp_path):
    runs, shards = fsdp_run.parent, fsdp_run / "checkpoints" / LAST
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2  # one file of shards per rank
    expected = CheckpointRef(shards.resolve(), fsdp_run.resolve(), "sharded")
    assert resolve(fsdp_run, runs) == resolve("fsdp", runs) == resolve(shards, runs) == expected
    assert expected.step == 10

    out = tmp_path / "full.ckpt"
    llm_consolidate([str(shards), "-o", str(out)])
    full = torch.load(out, map_location="cpu", weights_only=True)
    meta = load_meta(shards)
    assert full["global_step"] == meta["global_step"] == 10 and full["llm"] == meta["llm"]
    assert full["loops"] == meta["loops"]  # the loop state: the file resumes like the directory
    assert checkpoint_problem(out) is None

    # Whole tensors (not one rank's half), equal to what torch's reader reads from the shards in place.
    from_shards = read_weights(shards)
    network = Transformer(ModelConfig.from_dict(full["llm"]["model_config"]))
    assert set(from_shards) == set(network.state_dict())
    assert set(full["state_dict"]) == {f"model.{k}" for k in from_shards}
    for key, value in network.state_dict().items():
        assert full["state_dict"][f"model.{key}"].shape == value.shape == from_shards[key].shape, key
        assert torch.equal(full["state_dict"][f"model.{key}"], from_shards[key]), key
    (optimizer,) = full["optimizer_states"]
    moments = {k: v["exp_avg"] for k, v in optimizer["state"].items()}
    assert {k.removeprefix("model.") for k in moments} == set(from_shards) - {"lm_head.weight"}  # tied to embed
    assert all(v.shape == from_shards[k.removeprefix("model.")].shape for k, v in moments.items())
    assert any(v.abs().sum() > 0 for v in moments.values())  # ten real steps, not zeros

    tokens = torch.randint(0, network.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(load_network(shards)(tokens), load_network(out)(tokens))

    # llm-hf export of the sharded run reads the shards whole, as llm-generate does (no consolidation step).
    pytest.importorskip("safetensors")
    from llm.interop import export_checkpoint, import_hf

    exported, _ = import_hf(export_checkpoint(fsdp_run, tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(exported.eval()(tokens), load_network(shards)(tokens))

    # Not a sharded directory: exit code 2 and the fix.
    with pytest.raises(SystemExit) as exit_info:
        llm_consolidate([str(out)])
    assert exit_info.value.code == 2


# ---- the one atomic writer ----

def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as f:
            f.write(b'{"new": ')
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)  # readable by the other tools

    # A checkpoint that cannot be written, or does not read back, never replaces the previous one.
    checkpoint = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1}, checkpoint)
    with pytest.raises(Exception):
        atomic_torch_save({"global_step": 2, "not a tensor": lambda: 0}, checkpoint)  # pickling fails midway

    whole = (tmp_path / "last.ckpt").read_bytes()
    with pytest.raises(Exception):  # the disk silently kept half of it: the read-back check refuses it
        with atomic_write(checkpoint, check=verify_readable) as f:
            f.write(whole[: len(whole) // 2])
    assert torch.load(checkpoint, weights_only=True) == {"global_step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "summary.json"]

    # A file that never existed stays absent.
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new" / "tokens.bin") as f:
            raise RuntimeError("interrupted")
    assert list((tmp_path / "new").iterdir()) == []


def test_json_lines_skip_a_torn_last_line_or_name_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    lines = json_lines(path)
    assert [(line.number, line.value) for line in lines[:2]] == [(1, {"step": 1}), (3, {"step": 2})]
    assert lines[2].number == 4 and "column" in lines[2].error
