"""What a post-training run adds to `llm.train.train`: the parent checkpoint fixes architecture,
weights and tokenizer; the method's data; the reward of on-policy methods; and, when training is
over, the merged export of LoRA runs and the before/after evaluation on held-out prompts.

`llm-train posttrain=sft init_from=<pretraining run>` and so on: the other groups (parallelism,
logger, budget, optim, schedule, trainer) are the same as for pretraining.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from llm.config import ConfigError
from llm.model import ModelConfig
from llm.model.lora import LoRAConfig, apply_lora, merge_lora
from llm.model.value import build_network, load_weights
from llm.stages.init_from import MERGED, RUNTIME_KEYS, Parent, check_architecture, load_parent
from llm.stages.posttrain import PostTrainModule
from llm.tracking.checkpoint_io import atomic_torch_save
from llm.tracking.checkpoints import LAST, META


def method_class(cfg: DictConfig) -> type:
    return get_class(cfg.posttrain._target_)


def is_posttrain(cfg: DictConfig) -> bool:
    return issubclass(method_class(cfg), PostTrainModule)


def prepare(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Parent, Optional[Parent]]:
    """The run's config with the parent's architecture and tokenizer in place (so validation
    checks what will really run), the parent, and PPO's reward model when one is named."""
    method = method_class(cfg)
    if not cfg.get("init_from"):
        raise ConfigError([f"init_from: posttrain={method.stage} starts from a trained model; give "
                           "init_from=<run directory | run id | checkpoint file> (e.g. a pretraining run)"])
    if cfg.posttrain.lora.enabled and int(cfg.parallelism.get("tensor_parallel", 1) or 1) > 1:
        raise ConfigError([f"posttrain.lora.enabled=true with parallelism.tensor_parallel="
                           f"{cfg.parallelism.tensor_parallel}: LoRA adapters have no tensor-parallel plan; "
                           "allowed: LoRA with single, ddp, fsdp or hsdp (tensor_parallel=1)"])
    parent = load_parent(cfg.init_from, cfg.paths.runs_dir)
    check_architecture(parent.model_config, overrides)
    if parent.value_head and not method.value_head:
        raise ConfigError([f"init_from={cfg.init_from!r}: {parent.ref.path} is a reward model (stage "
                           f"{parent.stage}); posttrain={method.stage} needs a language model to start from"])
    cfg = cfg.copy()
    saved = asdict(parent.model_config)
    for key in RUNTIME_KEYS:  # keys the command line may still set
        if any(o.lstrip("+").startswith(f"model.{key}=") for o in overrides):
            OmegaConf.update(saved_node := OmegaConf.create(saved), key, OmegaConf.select(cfg.model, key))
            saved = OmegaConf.to_container(saved_node)
    cfg.model = OmegaConf.merge(cfg.model, saved)
    cfg.tokenizer = OmegaConf.create({"_target_": "llm.tokenizer.build_tokenizer", "_partial_": True,
                                      "kind": "pretrained", "path": str(parent.tokenizer_path)})
    reward_model = None
    if cfg.posttrain.get("reward_model"):
        reward_model = load_parent(cfg.posttrain.reward_model, cfg.paths.runs_dir, key="posttrain.reward_model")
        if not reward_model.value_head:
            raise ConfigError([f"posttrain.reward_model={cfg.posttrain.reward_model!r}: {reward_model.ref.path} is a "
                               f"{reward_model.stage} language model, not a reward model (posttrain=reward)"])
        if asdict(reward_model.model_config) != asdict(parent.model_config):
            raise ConfigError([f"posttrain.reward_model={cfg.posttrain.reward_model!r}: its architecture differs from "
                               "init_from's; the critic starts from it, so they must match"])
    return cfg, parent, reward_model


def load_final_network(run_dir: Path, parent: Parent, model_config: ModelConfig, lora: LoRAConfig,
                       value_head: bool) -> nn.Module:
    """The trained network of a finished run as a plain module (sharded checkpoints gathered,
    LoRA adapters folded into the parent's weights)."""
    path = Path(run_dir) / "checkpoints" / LAST
    if path.is_dir() and (path / META).is_file():
        from lightning_fabric.utilities.load import _load_distributed_checkpoint

        state = _load_distributed_checkpoint(path)["state_dict"]
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model = build_network(model_config, value_head)
    if lora.enabled:
        load_weights(model, parent.state, parent.value_head)
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets,
                   train_modules=[*lora.train_modules, *(["head"] if value_head else [])])
        missing = [k for k in model.state_dict() if k not in state and ("lora_a" in k or "lora_b" in k)]
        if missing:
            raise ValueError(f"{path}: the LoRA adapters {missing[:3]} are missing")
        model.load_state_dict(state, strict=False)
        merge_lora(model)
    else:
        model.load_state_dict(state)
    return model.eval()


def export_merged(model: nn.Module, run_dir: Path, stage: str, model_config: ModelConfig, value_head: bool,
                  parent: Parent) -> Path:
    """`checkpoints/merged.ckpt`: an ordinary checkpoint of the merged model, which init_from,
    llm-generate, llm-eval and llm-hf read like any pretraining checkpoint."""
    out = Path(run_dir) / "checkpoints" / MERGED
    atomic_torch_save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 0,
                       "llm": {"stage": stage, "model_config": asdict(model_config), "value_head": value_head,
                               "parent": str(parent.ref.path)}}, out)
    return out


@torch.no_grad()
def evaluate_answers(model: nn.Module, tokenizer: Any, rows: list[dict], reward: Any, max_new_tokens: int,
                     batch_size: int = 64) -> dict[str, float]:
    """Greedy answers to held-out prompts: exact-match accuracy and mean reward, where
    `reward(prompt ids, completion ids, completion text, row)` is the run's own reward."""
    from llm.data.tasks import score
    from llm.generate.decode import generate

    correct, rewards, by_task = [], [], {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tokenizer.encode(r["prompt"]) for r in chunk]
        outputs = generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for row, prompt, out in zip(chunk, prompts, outputs):
            text = tokenizer.decode(out)
            correct.append(score(text, row))
            rewards.append(reward(prompt, out, text, row))
            by_task.setdefault(row.get("task", "all"), []).append(correct[-1])
    return {"accuracy": sum(correct) / len(correct), "reward": sum(rewards) / len(rewards),
            **{f"accuracy/{task}": sum(v) / len(v) for task, v in sorted(by_task.items())}}


def build_data(data_cfg: Any, kind: str, tokenizer: Any, seq_len: int, micro_batch_size: int,
               val_batches: Optional[int]) -> tuple[Any, list[dict], str]:
    """The method's datamodule, the held-out prompts with answers (for the before/after
    evaluation; only the tasks have them), and a line saying what was read and kept."""
    from llm.data.formats import ChatTemplate, read_examples
    from llm.data.posttrain import collator, pack, tokenize_preferences, tokenize_prompts, tokenize_sft
    from llm.data.posttrain_datamodule import PostTrainDataModule
    from llm.data.tasks import TaskMix

    template = ChatTemplate(data_cfg.chat_turn, data_cfg.generation_prompt)
    eval_rows: list[dict] = []
    if data_cfg.source == "tasks":
        mix = TaskMix(data_cfg.tasks, seed=data_cfg.seed, val_fraction=data_cfg.val_fraction)
        rows = {"sft": mix.sft_rows, "preference": mix.preference_rows, "prompt": mix.prompt_rows}[kind]
        train_source, val_source = rows(data_cfg.n_train, "train"), rows(data_cfg.n_val, "val")
        eval_rows = mix.prompt_rows(data_cfg.eval_prompts, "val")
    else:
        train_source, val_source = data_cfg.source, data_cfg.val_source
    read = dict(kind=kind, format=data_cfg.format, template=template, hf_split=data_cfg.hf_split)
    train = read_examples(train_source, **read)
    if val_source is not None:
        val = read_examples(val_source, **read)
    else:  # a deterministic held-out share of the one source
        from llm.data.corpus import hash_fraction

        held_out = [hash_fraction(str(i) + repr(e)) < data_cfg.val_fraction for i, e in enumerate(train)]
        val = [e for e, h in zip(train, held_out) if h]
        train = [e for e, h in zip(train, held_out) if not h]

    def tokenize(examples: list, what: str) -> Any:
        if kind == "sft":
            result = tokenize_sft(examples, tokenizer, seq_len)
        elif kind == "preference":
            result = tokenize_preferences(examples, tokenizer, seq_len)
        else:
            result = tokenize_prompts(examples, tokenizer, data_cfg.max_prompt_length)
        return result.require_some(what)

    train_tok, val_tok = tokenize(train, "posttrain.data.source"), tokenize(val, "held-out rows")
    train_examples, val_examples = train_tok.examples, val_tok.examples
    if data_cfg.packing:
        if kind != "sft":
            raise ConfigError([f"posttrain.data.packing=true: packing is for SFT rows; {kind} data is not packed"])
        train_examples, val_examples = pack(train_examples, seq_len), pack(val_examples, seq_len)
    datamodule = PostTrainDataModule(train_examples, val_examples, collator(kind, tokenizer.pad_id), micro_batch_size,
                                     seed=data_cfg.seed, val_batches=val_batches)
    line = (f"{kind} data from {data_cfg.source}: train {train_tok.summary()}; val {val_tok.summary()}"
            + (f"; packed into {len(train_examples)} rows" if data_cfg.packing else ""))
    return datamodule, eval_rows, line


def reward_function(data_cfg: Any) -> Any:
    """The tasks' checker: 1.0 for an exact answer, else 0.0 (or partial credit)."""
    from llm.data.tasks import score

    return partial(score, partial=bool(data_cfg.partial_reward))


def eval_reward(cfg: DictConfig) -> Any:
    """The reward the run trained on, for greedy answers: its reward model's score of prompt +
    completion when it has one (PPO, GRPO), else the tasks' checker."""
    if not cfg.posttrain.get("reward_model"):
        check = reward_function(cfg.posttrain.data)
        return lambda prompt, completion, text, row: check(text, row)
    parent = load_parent(cfg.posttrain.reward_model, cfg.paths.runs_dir, key="posttrain.reward_model")
    model = parent.load(value_head=True).eval()

    @torch.no_grad()
    def reward(prompt: list[int], completion: list[int], text: str, row: dict) -> float:
        return float(model(torch.tensor([prompt + completion]))[0, -1])
    return reward


def attach(module: PostTrainModule, data_cfg: Any, tokenizer: Any, reward_model: Optional[Parent],
           run_dir: Path) -> None:
    """Give an on-policy method its reward, its critic's starting point and its sample log."""
    from llm.stages.grpo import OnPolicyModule
    from llm.stages.rollout import Scorer

    if not isinstance(module, OnPolicyModule):
        return
    if reward_model is not None:
        module.scorer = Scorer(tokenizer, model=reward_model.load(value_head=True).requires_grad_(False).eval())
        module.critic_init = reward_model
    else:
        if data_cfg.source != "tasks":
            raise ConfigError([f"posttrain.reward_model: required for prompts from {data_cfg.source!r} (the "
                               "built-in reward checks the synthetic tasks' answers); give a reward run"])
        module.scorer = Scorer(tokenizer, function=reward_function(data_cfg))
    from llm.tracking.samples import SampleLog

    module.samples = SampleLog(run_dir, every_n_steps=module.samples_every_n_steps, max_rows=64)


def finish(cfg: DictConfig, parent: Parent, tokenizer: Any, eval_rows: list[dict], run_dir: Path) -> dict[str, Any]:
    """After training (one process): export the merged model of a LoRA run and answer held-out
    prompts greedily with the parent and with the result. Returns what it adds to summary.json."""
    from llm.config import typed

    method = method_class(cfg)
    lora = LoRAConfig(**OmegaConf.to_container(cfg.posttrain.lora, resolve=True))
    model_config = typed(cfg.model, ModelConfig)
    model = load_final_network(run_dir, parent, model_config, lora, method.value_head)
    out: dict[str, Any] = {}
    if lora.enabled:
        out["merged_checkpoint"] = str(export_merged(model, run_dir, method.stage, model_config, method.value_head,
                                                     parent))
    if eval_rows and not method.value_head:
        base = parent.load(value_head=False)
        reward = eval_reward(cfg)
        steps = int(cfg.posttrain.data.eval_max_new_tokens)
        before = evaluate_answers(base.eval(), tokenizer, eval_rows, reward, steps)
        after = evaluate_answers(model, tokenizer, eval_rows, reward, steps)
        out.update({**{f"eval_before/{k}": v for k, v in before.items()}, **{f"eval/{k}": v for k, v in after.items()},
                    "eval/prompts": len(eval_rows)})
        print(f"held-out greedy answers ({len(eval_rows)} prompts): exact match {before['accuracy']:.3f} -> "
              f"{after['accuracy']:.3f}, mean reward {before['reward']:.3f} -> {after['reward']:.3f}")
    return out
