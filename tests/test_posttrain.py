"""Post-training stages end to end: each method trains from a tiny parent checkpoint with a real
Lightning Trainer (what changes, what must not, LoRA and its merged export, TRL-named metrics),
packed rows, `llm-train posttrain=...` under DDP and FSDP with 2 CPU processes, its errors and
its config. Loss functions, LoRA layers and the data pipeline have their own test files."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from llm.checkpoint import load_parent
from llm.config import ConfigError, typed, validate
from llm.data.posttrain import TokenizedExample, collate_sft, pack
from llm.model import ModelConfig, Transformer
from llm.recipes import recipe_for
from llm.checkpoint import load_trained_network
from llm.checkpoint.save import save_network
from llm.run import RunDir
from llm.run.plan import Settings, plan
from llm.model.lora import LoRALinear, lora_modules
from llm.model.value import ValueModel
from llm.parallel import FSDP
from llm.stages.dpo import DPOModule
from llm.stages.objectives import IGNORE_INDEX, Ratio
from llm.stages.posttrain import PostTrainModule, reduce_over_processes
from llm.tokenizer import Tokenizer, build_tokenizer
from llm.tracking.metrics import JsonlLogger, read_metrics
from tests.conftest import REPO, compose_train, llm_cli, run_cli

# The parent: 2 layers, 32 wide, untied head (so LoRA can target lm_head), byte vocabulary.
PARENT_SHAPE = dict(n_layers=2, d_model=32, n_heads=4, max_seq_len=64, tie_embeddings=False)

STEPS = 4
# Tiny and fast, with a learning rate that visibly moves every weight in a few steps.
TINY = ["data.seq_len=48", "data.micro_batch_size=4", "data.val_batches=1", "posttrain.data.n_train=32",
        "posttrain.data.n_val=4", "posttrain.data.eval_prompts=2", "posttrain.data.eval_max_new_tokens=4",
        "optim.lr=1e-3", "schedule=constant", "schedule.warmup=0", f"budget.steps={STEPS}", "logger=none",
        "trainer.progress_bar=false"]
# Short rollouts; GRPO with beta > 0 so that it has a frozen reference.
METHOD_ARGS = {
    "sft": [],
    "reward": [],
    "dpo": [],
    "grpo": ["posttrain.num_generations=2", "posttrain.max_new_tokens=4", "posttrain.beta=0.04"],
    "ppo": ["posttrain.max_new_tokens=4", "posttrain.num_ppo_epochs=2"],
}
METHODS = list(METHOD_ARGS)

# The frozen reference is in eval mode on purpose (llm.stages.posttrain filters this outside pytest).
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")


# ---------------------------------------------------------------- parents


def save_run(run_dir: Path, network: nn.Module, model_config: ModelConfig, tokenizer: Tokenizer, stage: str,
             value_head: bool = False) -> Path:
    """A run directory as llm-train leaves it: checkpoints/last.ckpt, tokenizer.json, run.json."""
    (run_dir / "checkpoints").mkdir(parents=True)
    tokenizer.save(run_dir / "tokenizer.json")
    meta = {"stage": stage, "model_config": asdict(model_config), "value_head": value_head}
    torch.save({"state_dict": {f"model.{k}": v for k, v in network.state_dict().items()}, "global_step": 0,
                "llm": meta}, run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_dir.name, "choices": {"posttrain": stage}}))
    return run_dir


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return build_tokenizer(None, tmp_path_factory.mktemp("cache"), kind="byte")


@pytest.fixture(scope="module")
def model_config(tokenizer) -> ModelConfig:
    return ModelConfig(**PARENT_SHAPE, vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tokenizer, model_config) -> Path:
    """A 'pretraining' run: a freshly initialised tiny language model."""
    torch.manual_seed(0)
    return save_run(tmp_path_factory.mktemp("runs") / "base", Transformer(model_config), model_config, tokenizer,
                    "pretrain")


@pytest.fixture(scope="module")
def reward_parent(tmp_path_factory, tokenizer, model_config) -> Path:
    """A 'reward' run: a value model of the parent's architecture (scores vary from prompt to prompt)."""
    torch.manual_seed(1)
    model = ValueModel(model_config)
    nn.init.normal_(model.head.weight, std=1.0)  # rewards spread enough for GRPO's groups to differ
    return save_run(tmp_path_factory.mktemp("runs") / "reward", model, model_config, tokenizer, "reward",
                    value_head=True)


# ---------------------------------------------------------------- in-process runs


def build_stage(method: str, parent: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """What llm.train.train does before fitting a post-training run, in this process: the stage's
    recipe prepares the config, reads the data and builds the module."""
    overrides = [f"posttrain={method}", f"init_from={parent}", *TINY, *METHOD_ARGS[method], *extra]
    recipe = recipe_for(compose_train(overrides, run_dir))
    cfg = recipe.prepare(compose_train(overrides, run_dir), overrides)
    validate(cfg, world_size=1)
    settings = Settings.of(cfg)
    data = recipe.data(cfg, settings, RunDir(run_dir))
    steps = plan(settings, data.tokenizer.vocab_size)
    module = recipe.module(cfg, settings, steps, data, RunDir(run_dir))
    return {"module": module, "datamodule": data.datamodule, "parent": recipe.parent, "model_config": steps.model}


def fit(module: pl.LightningModule, datamodule: Any, run_dir: Path) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, val_check_interval=STEPS,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=1,
                         logger=JsonlLogger(run_dir / "metrics.jsonl"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=run_dir)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == STEPS
    return trainer


def snapshot(model: Optional[nn.Module]) -> dict[str, torch.Tensor]:
    return {} if model is None else {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def logged_names(run_dir: Path) -> set[str]:
    return set().union(*read_metrics(run_dir / "metrics.jsonl"))


# Metric names as TRL logs them (training, and `val/` for what validation computes).
TRL_METRICS = {
    "sft": {"train/loss", "val/loss", "val/ppl", "train/mean_token_accuracy", "train/entropy", "train/num_tokens",
            "val/mean_token_accuracy", "val/entropy"},
    "reward": {"train/accuracy", "train/margin", "train/mean_reward", "train/min_reward", "train/max_reward",
               "val/accuracy", "val/margin", "val/loss"},
    "dpo": {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "val/rewards/accuracies", "val/rewards/margins",
            "val/logits/chosen", "val/loss"},
    "grpo": {"train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/kl",
             "completions/mean_length", "completions/clipped_ratio", "val/reward"},
    "ppo": {"objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
            "policy/clipfrac_avg", "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
            "val/clipfrac_avg", "val/reward"},
}


@pytest.mark.parametrize("method,extra", [
    *[(m, ()) for m in METHODS],
    ("sft", ("posttrain.data.packing=true",)),
    ("grpo", ("posttrain.beta=0.0",)),
], ids=[*METHODS, "sft-packed", "grpo-beta0"])
def test_each_method_changes_every_trainable_weight_and_never_the_reference(
        method, extra, parent, reward_parent, tmp_path, single_thread):
    if method in ("grpo", "ppo"):  # a reward model: continuous scores, so every group has an advantage
        extra = (*extra, f"posttrain.reward_model={reward_parent}")
    if method == "reward":  # Bradley-Terry alone gives the head's bias a zero gradient (only gaps count):
        # it "changed" only through rounding, which Adam blew up to a full step, or not at all
        extra = (*extra, "posttrain.center_rewards_coefficient=0.01")
    built = build_stage(method, parent, tmp_path, extra)
    module, parent_run = built["module"], built["parent"]
    module.configure_model()  # what fit does first (and only once): weights can be recorded before
    before = snapshot(module.model)
    reference, critic = snapshot(module.reference), snapshot(getattr(module, "critic", None))
    scorer = module.scorer.model if getattr(module, "scorer", None) is not None else None
    scorer_before = snapshot(scorer)
    if method == "sft":  # the batches fit will train on (a fresh stream starts where fit starts)
        batches = iter(built["datamodule"].train_dataloader())
        seen = sum(int(next(batches)["mask"].sum()) for _ in range(STEPS))
    trainer = fit(module, built["datamodule"], tmp_path)

    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == set(before)  # no LoRA: the whole network trains
    assert changed(before, module.model) == trainable
    has_reference = method in ("dpo", "ppo") or (method == "grpo" and "posttrain.beta=0.0" not in extra)
    assert (module.reference is not None) == has_reference
    if has_reference:
        assert changed(reference, module.reference) == set()
        for name, weight in module.reference.state_dict().items():  # and it is the parent
            torch.testing.assert_close(weight, parent_run.state[name], rtol=0, atol=0)
    if method == "ppo":
        assert changed(critic, module.critic) == set(critic)  # the critic trains whole
        assert torch.equal(critic["head.weight"], parent_run_value_head(reward_parent))  # it started from the RM
    if scorer is not None:
        assert changed(scorer_before, scorer) == set()

    names = logged_names(tmp_path)
    expected = TRL_METRICS[method] - ({"train/kl"} if method == "grpo" and not has_reference else set())
    assert expected <= names, expected - names
    assert ("train/kl" in names) == has_reference or method != "grpo"  # GRPO's KL needs its reference
    assert {"train/loss", "trainer/trainable_params", "trainer/tokens"} <= names
    logged_params = [r["trainer/trainable_params"] for r in read_metrics(tmp_path / "metrics.jsonl")
                     if "trainer/trainable_params" in r]
    assert logged_params[-1] == sum(p.numel() for p in module.model.parameters())
    assert trainer.callback_metrics["train/loss"].isfinite()
    if method == "sft":
        rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/mean_token_accuracy" in r]
        vocab = module.model_config.padded_vocab_size  # the logits also cover the padded entries
        assert all(0 <= r["train/mean_token_accuracy"] <= 1 and 0 < r["train/entropy"] <= math.log(vocab) for r in rows)
        # TRL's num_tokens: every non-padding token trained on, cumulative; kept by a checkpoint.
        assert [r["train/num_tokens"] for r in rows][-1] == seen
        checkpoint: dict = {"state_dict": dict(module.state_dict())}
        module.on_save_checkpoint(checkpoint)
        assert checkpoint["state_dict"].keys() == module.state_dict().keys()  # without LoRA: every key
        module.num_tokens = 0
        module.on_load_checkpoint(checkpoint)
        assert module.num_tokens == seen


# ---------------------------------------------------------------- metrics over processes


def fake_processes(monkeypatch, world: int, others: Any) -> None:
    """torch.distributed as `world` processes whose all-reduce (a sum) adds `others(tensor)`, the
    other processes' share, to this one's tensor."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: tensor.add_(others(tensor)))


def test_training_metrics_are_reduced_over_processes_as_trl_gathers_them(monkeypatch):
    # This rank: 3 of 4 tokens right, entropy 1.0; the other: 0 of 1 right, entropy 2.0.
    mine = {"mean_token_accuracy": Ratio(torch.tensor(3.0), torch.tensor(4)), "entropy": torch.tensor(1.0)}
    other = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)  # the same names, flattened in order
    fake_processes(monkeypatch, 2, lambda tensor: other)
    reduced = reduce_over_processes(mine, torch.device("cpu"))
    assert float(reduced["mean_token_accuracy"]) == pytest.approx(3 / 5)  # token-weighted, not (3/4 + 0) / 2
    assert float(reduced["entropy"]) == pytest.approx(1.5)  # a per-process value: averaged


def test_num_tokens_sums_the_data_parallel_ranks_once(monkeypatch):
    # 4 processes, tensor parallel 2: ranks (0, 1) train on one batch of 5 tokens, ranks (2, 3) on one of 3.
    fake_processes(monkeypatch, 4, lambda tensor: torch.tensor(5 + 3 + 3))
    module = type("Counter", (), {"parallelism": FSDP(tensor_parallel=2), "num_tokens": 100})()
    PostTrainModule.count_tokens(module, torch.tensor([[1, 1, 1, 1, 1, 0]]))
    assert int(module.num_tokens) == 100 + 5 + 3


def test_dpo_logits_metrics_split_the_chosen_and_rejected_halves():
    vocab = 16

    def model(tokens: torch.Tensor) -> torch.Tensor:  # every vocabulary entry at t is tokens[t]
        return tokens.float()[..., None].expand(*tokens.shape, vocab)
    batch = {"chosen": {"tokens": torch.tensor([[1, 2, 3, 4]]),
                        "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4]])},
             "rejected": {"tokens": torch.tensor([[1, 5, 7, 0]]),
                          "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]])}}
    stage = type("Stage", (), {"logits": staticmethod(lambda net, b: net(b["tokens"])), "loss_type": "sigmoid"})()
    metrics: dict = {}
    DPOModule.logps(stage, model, batch, metrics)
    # By hand: positions 1 and 2 predict the chosen answer (3, 4): logits 2 and 3; position 1
    # predicts the rejected answer (7): logit 5.
    assert float(metrics["logits/chosen"].value()) == 2.5
    assert float(metrics["logits/rejected"].value()) == 5.0


def parent_run_value_head(reward_run: Path) -> torch.Tensor:
    return load_parent(str(reward_run), reward_run.parent).state["head.weight"]


# Adapters where each method has linear layers; lm_head only exists in language models.
LORA_ARGS = {
    "sft": ["posttrain.lora.targets=[q,v,lm_head]"],
    "reward": [],
    "dpo": ["posttrain.lora.targets=[all-linear]"],
    "grpo": [],
    "ppo": [],
}


@pytest.mark.parametrize("method", METHODS)
def test_lora_trains_only_the_adapters_and_the_merged_model_is_base_plus_update(
        method, parent, reward_parent, tmp_path, single_thread):
    extra = ["posttrain.lora.enabled=true", "posttrain.lora.rank=2", "posttrain.lora.alpha=4", *LORA_ARGS[method]]
    if method in ("grpo", "ppo"):
        extra.append(f"posttrain.reward_model={reward_parent}")
    built = build_stage(method, parent, tmp_path, tuple(extra))
    module, parent_run = built["module"], built["parent"]
    module.configure_model()
    before = snapshot(module.model)
    critic = snapshot(getattr(module, "critic", None))
    trainer = fit(module, built["datamodule"], tmp_path)

    adapters = {n for n in before if n.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    value_head = {"head.weight", "head.bias"} if method == "reward" else set()
    assert adapters and {n for n, p in module.model.named_parameters() if p.requires_grad} == adapters | value_head
    # The base weights did not move. (A reward head's bias gets no gradient from the Bradley-Terry
    # loss, which sees only r_chosen - r_rejected: whether Adam nudges it depends on rounding.)
    assert changed(before, module.model) - {"head.bias"} == adapters | value_head - {"head.bias"}
    if method == "ppo":
        assert changed(critic, module.critic) == set(critic)  # the critic is not adapted: it trains whole
    if module.reference is not None:
        assert not lora_modules(module.reference)  # the reference is the plain parent

    # The checkpoint holds what training changed; merging it into the parent gives the adapted model.
    trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == adapters | value_head
    # ...except a sharded checkpoint: torch.distributed.checkpoint loads every key back, so it keeps all.
    parallelism, module.parallelism = module.parallelism, SimpleNamespace(sharded_checkpoints=True)
    checkpoint = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(checkpoint)
    module.parallelism = parallelism
    assert checkpoint["state_dict"].keys() == module.state_dict().keys()
    merged = load_trained_network(tmp_path, parent_run, built["model_config"], module.lora,
                                             method == "reward")
    assert not lora_modules(merged) and all(p.requires_grad for p in merged.parameters())
    adapted = dict(module.model.named_modules())
    for name, layer in lora_modules(module.model).items():
        expected = before[f"{name}.weight"] + (4 / 2) * layer.lora_b @ layer.lora_a  # base + (alpha/rank) B A
        torch.testing.assert_close(merged.get_submodule(name).weight, expected)
        assert isinstance(adapted[name], LoRALinear) and not isinstance(merged.get_submodule(name), LoRALinear)
    tokens = torch.randint(0, parent_run.model_config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), module.model.eval()(tokens), rtol=1e-5, atol=1e-5)

    # The export is an ordinary checkpoint that the next stage's init_from picks from the run directory.
    module.tokenizer.save(tmp_path / "tokenizer.json")  # as llm-train leaves it in every run directory
    save_network(merged, RunDir(tmp_path).merged_checkpoint, {"stage": method, "value_head": method == "reward"})
    child = load_parent(str(tmp_path), tmp_path.parent)
    assert child.ref.path.name == "merged.ckpt" and child.value_head == (method == "reward")
    for key, value in merged.state_dict().items():
        assert torch.equal(child.state[key], value)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("position,window", [("rope", None), ("alibi", None), ("learned", None), ("rope", 5)])
def test_packed_documents_give_the_logits_of_each_document_alone(position, window, tokenizer, single_thread):
    config = ModelConfig(**PARENT_SHAPE, vocab_size=tokenizer.vocab_size)
    config.position.kind, config.attention.window = position, window
    torch.manual_seed(0)
    model = Transformer(config).eval()
    texts = ["12+34=46", "sort 3 1 2: 1 2 3", "copy abc: abc", "7+8=15", "count aaa: 3"]
    documents = [TokenizedExample(tuple(tokenizer.encode(t)), (True,) * len(tokenizer.encode(t))) for t in texts]
    packs = pack(documents, seq_len=40)
    assert len(packs) < len(documents) and all(len(p) > 1 for p in packs[:1])  # rows really hold several documents
    batch = collate_sft(packs, tokenizer.pad_id)
    with torch.no_grad():
        packed = model(batch["tokens"], batch["positions"], documents=batch["documents"])
        for row, documents_of_row in enumerate(packs):
            start = 0
            for document in documents_of_row:
                alone = model(torch.tensor([document.tokens]))[0]
                torch.testing.assert_close(packed[row, start:start + len(document)], alone, rtol=1e-5, atol=1e-5)
                start += len(document)
        # Without the document mask the later documents would see the earlier ones: the mask matters.
        unmasked = model(batch["tokens"], batch["positions"])
    first = packs[0]
    assert not torch.allclose(unmasked[0, len(first[0]):len(first[0]) + len(first[1])],
                              model(torch.tensor([first[1].tokens]))[0], atol=1e-4)


# ---------------------------------------------------------------- llm-train


# Two optimizer steps on a handful of rows; each of the 2 ranks gets one validation batch.
CLI_TINY = ["budget.steps=2", "data.seq_len=48", "data.micro_batch_size=2", "data.val_batches=2",
            "posttrain.data.n_train=16", "posttrain.data.n_val=4", "posttrain.data.eval_prompts=2",
            "posttrain.data.eval_max_new_tokens=4", "optim.lr=1e-3", "trainer.log_every=1", "logger=none",
            "trainer.progress_bar=false"]
CLI_METHOD_ARGS = {**METHOD_ARGS, "ppo": ["posttrain.max_new_tokens=4", "posttrain.num_ppo_epochs=1"]}
# One metric of each method that only its own training step logs.
OWN_METRIC = {"sft": "val/ppl", "reward": "train/accuracy", "dpo": "rewards/accuracies", "grpo": "train/reward_std",
              "ppo": "objective/rlhf_reward"}


def only_run(root: Path) -> Path:
    runs = [p for p in (root / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def train_here(args: list[str], cwd: Path, monkeypatch, capsys) -> SimpleNamespace:
    """`llm-train args` in this process, as from a shell in `cwd` (tests.conftest.llm_cli: one
    interpreter fewer to start than run_cli, seconds of CI a run), as completed_run reads it."""
    code, stderr = llm_cli("train", args, cwd, monkeypatch, capsys)
    return SimpleNamespace(returncode=code, stdout="", stderr=stderr)


def completed_run(result: Any, root: Path) -> tuple[Path, dict]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run = only_run(root)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    return run, summary


# Every method x layout under -m slow. In CI, tests/test_posttrain_parallel.py runs each method on
# two processes (and checks its metrics against one process), and tests/test_matrix.py samples the
# stage x layout combinations.
@pytest.mark.slow
@pytest.mark.parametrize("method,parallelism", [(m, p) for m in METHODS for p in ("ddp", "fsdp")])
def test_each_method_runs_under_ddp_and_fsdp_on_two_processes(method, parallelism, parent, tmp_path):
    result = run_cli([f"posttrain={method}", f"init_from={parent}", f"parallelism={parallelism}", "trainer.devices=2",
                      *CLI_TINY, *CLI_METHOD_ARGS[method]], cwd=tmp_path)
    run, summary = completed_run(result, tmp_path)
    assert (summary["stage"], summary["world_size"], summary["steps_done"]) == (method, 2, 2)
    assert summary["parent_checkpoint"] == str(parent / "checkpoints" / "last.ckpt")
    assert OWN_METRIC[method] in summary["last_metrics"]
    # TRL's metrics, reduced over both ranks: every rank reaches the same all-reduces (no hang).
    assert {"sft": {"train/mean_token_accuracy", "train/entropy", "train/num_tokens"},
            "dpo": {"logits/chosen", "logits/rejected"}}.get(method, set()) <= set(summary["last_metrics"])
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() if parallelism == "fsdp" else last.is_file()  # FSDP saves shards
    if method != "reward":  # the finished model answered the held-out prompts (gathered from the shards)
        assert summary["eval/prompts"] == 2 and 0 <= summary["eval/accuracy"] <= 1


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def addition_rows(start: int, n: int) -> list[dict]:
    return [{"prompt": f"{a}+{a % 7}=", "completion": f"{a + a % 7}"} for a in range(start, start + n)]


def test_sft_then_dpo_from_trl_jsonl_files(parent, tmp_path, monkeypatch, capsys, single_thread):
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    sft_dir.mkdir(), dpo_dir.mkdir()
    train = write_jsonl(tmp_path / "sft.jsonl", addition_rows(10, 24))
    val = write_jsonl(tmp_path / "sft_val.jsonl", addition_rows(50, 4))
    result = train_here(["posttrain=sft", f"init_from={parent}", *CLI_TINY, f"posttrain.data.source={train}",
                         f"posttrain.data.val_source={val}"], sft_dir, monkeypatch, capsys)
    sft_run, summary = completed_run(result, sft_dir)
    assert f"sft data from {train}: train kept 24 of 24 rows; val kept 4 of 4 rows" in summary["posttrain_data"]
    assert "val/loss" in summary["last_metrics"]
    # The run is labelled with the architecture it trained: the parent's (a bare run.json without
    # architecture choices, so read from its checkpoint), never the composed default (model=tiny).
    parent_labels = {"tokenizer": "pretrained", "model": "2x32", "attention": "mha", "position": "rope"}
    assert {g: summary["choices"][g] for g in parent_labels} == parent_labels
    assert json.loads((sft_run / "run.json").read_text())["choices"]["model"] == "2x32"

    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": str(int(r["completion"]) + 1)}
             for r in addition_rows(10, 24)]
    train, val = write_jsonl(tmp_path / "dpo.jsonl", pairs[:20]), write_jsonl(tmp_path / "dpo_val.jsonl", pairs[20:])
    result = train_here(["posttrain=dpo", f"init_from={sft_run}", *CLI_TINY, f"posttrain.data.source={train}",
                         f"posttrain.data.val_source={val}"], dpo_dir, monkeypatch, capsys)
    _, summary = completed_run(result, dpo_dir)
    assert summary["parent_stage"] == "sft" and summary["parent_run_id"] == sft_run.name
    assert {g: summary["choices"][g] for g in parent_labels} == parent_labels  # inherited through the sft run
    assert f"preference data from {train}: train kept 20 of 20 rows" in summary["posttrain_data"]
    assert {"rewards/accuracies", "val/rewards/margins"} <= set(summary["last_metrics"])


def test_ppo_scores_with_a_reward_run_made_by_llm_train(parent, tmp_path, monkeypatch, capsys, single_thread):
    reward_dir, ppo_dir = tmp_path / "reward", tmp_path / "ppo"
    reward_dir.mkdir(), ppo_dir.mkdir()
    result = train_here(["posttrain=reward", f"init_from={parent}", *CLI_TINY, "posttrain.lora.enabled=true"],
                        reward_dir, monkeypatch, capsys)
    reward_run, summary = completed_run(result, reward_dir)
    assert summary["merged_checkpoint"] == str(reward_run / "checkpoints" / "merged.ckpt")  # LoRA: merged on export
    result = train_here(["posttrain=ppo", f"init_from={parent}", *CLI_TINY, *CLI_METHOD_ARGS["ppo"],
                         f"posttrain.reward_model={reward_run}"], ppo_dir, monkeypatch, capsys)
    ppo_run, summary = completed_run(result, ppo_dir)
    assert {"objective/scores", "objective/kl", "loss/value_avg"} <= set(summary["last_metrics"])
    assert json.loads((ppo_run / "run.json").read_text())["config"]["posttrain"]["reward_model"] == str(reward_run)


def test_cli_errors_exit_2_naming_the_problem_and_leave_no_model(parent, reward_parent, tmp_path, monkeypatch, capsys,
                                                                single_thread):
    from tests.test_bad_inputs import llm_cli  # the real llm-train main, in this process (no interpreter start-up)

    bad_rows = write_jsonl(tmp_path / "rows.jsonl", [*addition_rows(0, 1), {"prompt": "1+1="}, *addition_rows(5, 3)])
    rows, two_rows = write_jsonl(tmp_path / "ok.jsonl", addition_rows(0, 8)), write_jsonl(tmp_path / "two.jsonl",
                                                                                          addition_rows(20, 2))
    cases = [
        (["posttrain=sft", f"init_from={parent}", f"posttrain.data.source={rows}", f"posttrain.data.val_source={two_rows}",
          "parallelism=ddp", "trainer.devices=2"],
         ["2 held-out rows make 1 validation batch(es) of data.micro_batch_size=2", "each of the 2 data-parallel"]),
        (["posttrain=sft"], ["init_from: posttrain=sft starts from a trained model"]),
        (["posttrain=dpo", f"init_from={parent}", "model.n_layers=3", "attention=gqa"],
         ["model.n_layers=3: conflicts with the checkpoint of init_from, which has n_layers=2",
          "attention=gqa: the architecture comes from init_from", "n_kv_heads=None"]),
        (["posttrain=sft", f"init_from={reward_parent}"], ["is a reward model (stage reward); posttrain=sft needs"]),
        (["posttrain=dpo", f"init_from={reward_parent}"], ["is a reward model (stage reward); posttrain=dpo needs"]),
        (["posttrain=sft", f"init_from={parent}", f"posttrain.data.source={bad_rows}"],
         [f"{bad_rows}:2: missing key 'completion'"]),
        (["posttrain=ppo", f"init_from={parent}", f"posttrain.reward_model={parent}"],
         ["posttrain.reward_model=", "is a pretrain language model, not a reward model"]),
    ]
    for overrides, phrases in cases:
        code, stderr = llm_cli("train", [*overrides, *CLI_TINY], tmp_path, monkeypatch, capsys)
        assert code == 2, (overrides, stderr[-3000:])
        assert "Traceback" not in stderr
        for phrase in phrases:
            assert phrase in stderr, (phrase, stderr[-3000:])
    # Nothing a later run could take for a trained model: no checkpoint, no completed summary.
    assert not list(tmp_path.glob("runs/*/checkpoints/*"))
    for summary in tmp_path.glob("runs/*/summary.json"):
        assert json.loads(summary.read_text())["status"] != "completed"


# ---------------------------------------------------------------- config


def test_methods_bring_trls_learning_rates_and_the_command_line_wins(tmp_path):
    assert compose_train(["posttrain=dpo"], tmp_path).optim.lr == 1e-6
    assert compose_train(["posttrain=ppo"], tmp_path).optim.lr == 3e-6
    assert compose_train(["posttrain=dpo", "optim.lr=3e-4"], tmp_path).optim.lr == 3e-4
    assert compose_train(["optim.lr=3e-4", "posttrain=grpo"], tmp_path).optim.lr == 3e-4  # order does not matter
    preset = OmegaConf.load(REPO / "experiments" / "posttrain" / "dpo.yaml").optim.lr
    assert preset != 1e-6 and compose_train(["experiment=posttrain/dpo"], tmp_path).optim.lr == preset  # presets win
    assert compose_train(["posttrain=none"], tmp_path).optim.lr != 1e-6  # pretraining keeps its own


def test_a_method_config_validates_with_the_parents_architecture(parent, tmp_path):
    overrides = ["posttrain=grpo", f"init_from={parent}", "model=small", "model.dropout=0.1"]
    cfg = compose_train(overrides, tmp_path)
    with pytest.raises(ConfigError, match="model=small: the architecture comes from init_from") as refused:
        recipe_for(cfg).prepare(cfg, overrides)
    assert "whose checkpoint has n_layers=2, d_model=32, n_heads=" in str(refused.value)  # the parent's shape
    overrides = overrides[:2] + overrides[3:]  # dropout is not architecture: the command line may set it
    cfg = compose_train(overrides, tmp_path)
    cfg = recipe_for(cfg).prepare(cfg, overrides)
    validate(cfg)
    model = typed(cfg.model, ModelConfig)
    assert (model.n_layers, model.d_model, model.tie_embeddings, model.dropout) == (2, 32, False, 0.1)
    assert cfg.tokenizer.path == str(parent / "tokenizer.json")
    assert callable(instantiate(cfg.posttrain, _convert_="all"))


def test_each_data_parallel_rank_needs_a_validation_batch(tmp_path):
    cfg = compose_train(["parallelism=ddp", "trainer.devices=2", "data.val_batches=1"], tmp_path)
    with pytest.raises(ConfigError, match=r"data.val_batches=1: the 2 data-parallel ranks .* allowed: >= 2"):
        validate(cfg)
    validate(compose_train(["parallelism=ddp", "trainer.devices=2", "data.val_batches=2"], tmp_path))
