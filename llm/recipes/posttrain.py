"""Post-training recipes: SFT, reward modelling and DPO (PostTrain), PPO and GRPO (OnPolicy).

The parent checkpoint (`init_from`) fixes the architecture, weights and tokenizer; the method's
examples come from TRL-format files, a hub dataset or the built-in tasks; on-policy methods score
completions with a reward model or the tasks' checker. Conversations are rendered with chat_turn or
a Jinja chat template (llm.data.chat); a run that read any writes <run>/chat_template.jinja. After
training, a LoRA run exports its merged model and every language-model stage answers held-out
prompts greedily, before and after.

    llm-train posttrain=sft init_from=<pretraining run> budget.steps=300
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from llm.config import ConfigError, method_config, typed
from llm.model import ModelConfig
from llm.recipes.base import Recipe, StageData
from llm.checkpoint import Parent, load_parent, load_trained_network
from llm.checkpoint.save import save_network
from llm.data.chat import build_chat_template, jinja_source
from llm.files import write_text
from llm.parallel.launch import is_rank_zero
from llm.run.layout import CHAT_TEMPLATE_FILE, RunDir
from llm.stages.init_from import RUNTIME_KEYS, check_architecture

if TYPE_CHECKING:
    from llm.run.plan import Plan, Settings

log = logging.getLogger(__name__)

# The groups whose choice a post-training run inherits from its parent checkpoint.
ARCHITECTURE_GROUPS = ("tokenizer", "model", "attention", "position")


class PostTrain(Recipe):
    """A stage that starts from a trained model: SFT, reward modelling, DPO."""

    parent: Optional[Parent] = None
    method: Any = None  # the method's typed config (llm.config.methods), set by prepare
    template: Any = None  # how conversations are rendered (llm.data.chat), set by prepare

    def prepare(self, cfg: DictConfig, overrides: list[str]) -> DictConfig:
        """The run's config with the parent's architecture and tokenizer in place, so the final
        validation checks what will really run."""
        if not cfg.get("init_from"):
            return cfg  # validation says that post-training needs init_from
        self.parent = parent = load_parent(cfg.init_from, cfg.paths.runs_dir, cache_dir=cfg.paths.cache_dir)
        check_architecture(parent.model_config, overrides)
        if parent.value_head and not self.module_class.value_head:
            raise ConfigError([f"init_from={cfg.init_from!r}: {parent.ref.path} is a reward model (stage "
                               f"{parent.stage}); posttrain={self.stage} needs a language model to start from"])
        cfg = cfg.copy()
        saved = OmegaConf.create(asdict(parent.model_config))
        for key in RUNTIME_KEYS:  # keys the command line may still set
            if any(o.lstrip("+").startswith(f"model.{key}=") for o in overrides):
                OmegaConf.update(saved, key, OmegaConf.select(cfg.model, key))
        cfg.model = OmegaConf.merge(cfg.model, saved)
        cfg.tokenizer = OmegaConf.create({"_target_": "llm.tokenizer.build_tokenizer", "_partial_": True,
                                          "kind": "pretrained", "path": str(parent.tokenizer_path)})
        self.method = method_config(cfg)  # the method's typed config, read once for the whole run
        # Built now, so a chat template that cannot work is refused before any data is read.
        self.template = build_chat_template(self.method.data, parent.tokenizer_path.parent)
        return cfg

    def labels(self, choices: dict[str, str]) -> dict[str, str]:
        """The architecture's choices are the parent's (its run.json when it has one, else what
        its checkpoint says), not the defaults this run composed."""
        if self.parent is None:
            return choices
        return {**choices, **parent_labels(self.parent)}

    def data(self, cfg: DictConfig, settings: Settings, run_dir: RunDir) -> StageData:
        from llm.data.posttrain_datamodule import build_posttrain_data
        from llm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(self.tokenizer_path(), "init_from")
        data = settings.data
        datamodule, eval_rows, line = build_posttrain_data(self.method.data, self.module_class.data_kind, tokenizer,
                                                           data.seq_len, data.micro_batch_size, data.val_batches,
                                                           self.template)
        log.info(line)
        if self.template.used and is_rank_zero():  # the run read conversations: how it rendered them (HF export)
            write_text(run_dir.path / CHAT_TEMPLATE_FILE, jinja_source(self.template))
        ranks = settings.parallelism.data_parallel_size(settings.world)
        val_batches = math.ceil(len(datamodule.val_examples) / data.micro_batch_size)
        if val_batches < ranks:  # Lightning would stop a rank that has no validation batch
            raise ConfigError([f"posttrain.data: {len(datamodule.val_examples)} held-out rows make {val_batches} "
                               f"validation batch(es) of data.micro_batch_size={data.micro_batch_size}, but each of the "
                               f"{ranks} data-parallel ranks needs one; give more held-out rows (posttrain.data.n_val, "
                               "val_source or val_fraction) or a smaller micro batch"])
        return StageData(tokenizer, datamodule, {**self.parent_facts(), "posttrain_data": line}, eval_rows)

    def tokenizer_path(self) -> Path:
        """The tokenizer the stage's data is read with: the parent's."""
        return self.parent.tokenizer_path

    def parent_facts(self) -> dict[str, Any]:
        """What summary.json and W&B record about where the stage started."""
        return self.parent.facts()

    def module_arguments(self, data: StageData) -> dict[str, Any]:
        return {"parent": self.parent, "tokenizer": data.tokenizer}

    def lineage(self) -> Optional[tuple[Path, Optional[Path]]]:
        return (self.parent.ref.path, self.parent.ref.run_dir) if self.parent is not None else None

    def finish(self, cfg: DictConfig, run_dir: RunDir, data: StageData, summary: dict[str, Any]) -> dict[str, Any]:
        """Export the merged model of a LoRA run; answer held-out prompts greedily with the parent
        and with the result; record the last value of every metric."""
        from llm.tracking.metrics import last_values

        method = self.method
        lora = method.lora
        model_config = typed(cfg.model, ModelConfig)
        value_head = self.module_class.value_head
        model = load_trained_network(run_dir.path, self.parent, model_config, lora, value_head)
        out: dict[str, Any] = {"last_metrics": last_values(run_dir.metrics)}
        if lora.enabled:  # an ordinary checkpoint that init_from, llm-generate, llm-eval and llm-hf read
            meta = {"stage": self.stage, "value_head": value_head, "parent": str(self.parent.ref.path)}
            out["merged_checkpoint"] = str(save_network(model, run_dir.merged_checkpoint, meta,
                                                        global_step=summary.get("steps_done", 0)))
        if data.eval_rows and not value_head:
            reward = self.eval_reward(cfg)
            steps = method.data.eval_max_new_tokens
            before = evaluate_answers(self.parent.load(value_head=False).eval(), data.tokenizer, data.eval_rows,
                                      reward, steps)
            after = evaluate_answers(model, data.tokenizer, data.eval_rows, reward, steps)
            out.update({**{f"eval_before/{k}": v for k, v in before.items()},
                        **{f"eval/{k}": v for k, v in after.items()}, "eval/prompts": len(data.eval_rows)})
            log.info(f"held-out greedy answers ({len(data.eval_rows)} prompts): exact match {before['accuracy']:.3f} -> "
                     f"{after['accuracy']:.3f}, mean reward {before['reward']:.3f} -> {after['reward']:.3f}")
        return out

    def eval_reward(self, cfg: DictConfig) -> Callable[[list[int], list[int], str, dict], float]:
        """The reward of the held-out evaluation: the tasks' checker."""
        check = task_reward(self.method.data)
        return lambda prompt, completion, text, row: check(text, row)

    def done_line(self, summary: dict[str, Any]) -> str:
        line = f"val/loss {summary['val/loss']:.4f}"
        return line + (f" (ppl {summary['val/ppl']:.1f})" if self.stage == "sft" and "val/ppl" in summary else "")


class OnPolicy(PostTrain):
    """PPO and GRPO: prompts in, completions sampled and scored by a reward model
    (posttrain.reward_model, which also starts PPO's critic) or the tasks' checker."""

    reward_model: Optional[Parent] = None

    def prepare(self, cfg: DictConfig, overrides: list[str]) -> DictConfig:
        cfg = super().prepare(cfg, overrides)
        if self.parent is None or not self.method.reward_model:
            return cfg
        name = self.method.reward_model
        self.reward_model = load_parent(name, cfg.paths.runs_dir, key="posttrain.reward_model",
                                        cache_dir=cfg.paths.cache_dir)
        if not self.reward_model.value_head:
            raise ConfigError([f"posttrain.reward_model={name!r}: {self.reward_model.ref.path} is a "
                               f"{self.reward_model.stage} language model, not a reward model (posttrain=reward)"])
        if asdict(self.reward_model.model_config) != asdict(self.parent.model_config):
            raise ConfigError([f"posttrain.reward_model={name!r}: its architecture differs from init_from's; the "
                               "critic starts from it, so they must match"])
        return cfg

    def module(self, cfg: DictConfig, settings: Settings, plan: Plan, data: StageData, run_dir: RunDir,
               schedule: Optional[Any] = None, total_steps: Optional[int] = None) -> pl.LightningModule:
        """The module with its reward, its critic's starting point and its sample log."""
        from llm.stages.rollout import Scorer
        from llm.tracking.samples import SampleLog

        module = super().module(cfg, settings, plan, data, run_dir, schedule, total_steps)
        if self.reward_model is not None:
            network = self.reward_model.load(value_head=True).requires_grad_(False).eval()
            module.scorer = Scorer(data.tokenizer, model=network)
            module.critic_init = self.reward_model
        else:
            module.scorer = Scorer(data.tokenizer, function=task_reward(self.method.data))
        module.samples = SampleLog(run_dir.path, every_n_steps=module.samples_every_n_steps, max_rows=64)
        return module

    def eval_reward(self, cfg: DictConfig) -> Callable[[list[int], list[int], str, dict], float]:
        """The reward the run trained on: its reward model's score of prompt + completion when it
        has one, else the tasks' checker."""
        if self.reward_model is None:
            return super().eval_reward(cfg)
        model = self.reward_model.load(value_head=True).eval()

        @torch.no_grad()
        def reward(prompt: list[int], completion: list[int], text: str, row: dict) -> float:
            return float(model(torch.tensor([prompt + completion]))[0, -1])
        return reward


def parent_labels(parent: Parent) -> dict[str, str]:
    """The architecture groups' choices of a parent: from its run.json, else derived from its
    checkpoint's model config (a bare checkpoint file)."""
    if parent.ref.run_dir is not None:
        run_file = RunDir(parent.ref.run_dir).run_file
        try:
            choices = json.loads(run_file.read_text()).get("choices", {})
            found = {g: str(choices[g]) for g in ARCHITECTURE_GROUPS if isinstance(choices.get(g), str)}
            if len(found) == len(ARCHITECTURE_GROUPS):
                return found
        except (OSError, ValueError, AttributeError):
            pass  # a damaged run.json: the checkpoint still says what the architecture is
    m = parent.model_config
    kv = m.kv_heads
    attention = "mha" if kv == m.n_heads else "mqa" if kv == 1 else "gqa"
    return {"tokenizer": "pretrained", "model": f"{m.n_layers}x{m.d_model}", "attention": attention,
            "position": m.position.kind}


def task_reward(data_cfg: Any) -> Callable[[str, dict], float]:
    """The tasks' checker: 1.0 for an exact answer, else 0.0 (or partial credit)."""
    from llm.data.tasks import score

    return partial(score, partial=bool(data_cfg.partial_reward))


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
