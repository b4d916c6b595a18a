"""The distillation recipe: SFT's data and parent handling, plus a frozen teacher.

The teacher (`posttrain.teacher`: a run directory, run id, checkpoint file or Hugging Face folder)
must read the student's tokens: the same tokenizer and vocabulary size, refused up front
otherwise. The student is `init_from` (as for every post-training stage) or, without it, a fresh
model of the `model` group on the teacher's tokenizer.

With `posttrain.corpus=true` the student learns on the `data` group's corpus exactly as a
pretraining run reads it (the same token stream for the same data, seed and shape, tokenised with
the teacher's tokenizer), so distilling and training from scratch compare at equal tokens.

    llm-train posttrain=distill init_from=runs/<student> posttrain.teacher=runs/<teacher>
    llm-train posttrain=distill posttrain.teacher=runs/<teacher> model=nano     # a fresh student
    llm-train posttrain=distill posttrain.teacher=runs/<teacher> model=nano posttrain.corpus=true posttrain.lmbda=0
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from llm.checkpoint import Parent, load_parent
from llm.config import ConfigError, method_config, typed
from llm.config.validate import ABSOLUTE_POSITIONS
from llm.model import ModelConfig
from llm.data.chat import build_chat_template
from llm.recipes.base import StageData
from llm.recipes.posttrain import PostTrain, evaluate_answers
from llm.recipes.pretrain import Pretrain
from llm.run.layout import RunDir

if TYPE_CHECKING:
    from llm.run.plan import Plan, Settings

log = logging.getLogger(__name__)


class Distill(PostTrain):
    """posttrain=distill: a student (init_from or fresh) and a frozen teacher."""

    teacher: Optional[Parent] = None

    def prepare(self, cfg: DictConfig, overrides: list[str]) -> DictConfig:
        method = method_config(cfg)
        if not method.teacher:
            return cfg  # validation says that distillation needs a teacher
        if cfg.get("init_from"):
            cfg = super().prepare(cfg, overrides)
        self.teacher = teacher = load_parent(method.teacher, cfg.paths.runs_dir, key="posttrain.teacher",
                                             cache_dir=cfg.paths.cache_dir)
        name = f"posttrain.teacher={method.teacher!r}"
        if teacher.value_head:
            raise ConfigError([f"{name}: {teacher.ref.path} is a reward model (stage reward); a teacher is a language "
                               "model"])
        if self.parent is None:  # a fresh student: the teacher's tokenizer, the model group's architecture
            if method.lora.enabled:
                raise ConfigError(["posttrain.lora.enabled=true: LoRA adapts a trained student; give init_from=<run>, "
                                   "or train a fresh student whole (posttrain.lora.enabled=false)"])
            cfg = cfg.copy()
            cfg.tokenizer = OmegaConf.create({"_target_": "llm.tokenizer.build_tokenizer", "_partial_": True,
                                              "kind": "pretrained", "path": str(teacher.tokenizer_path)})
            if cfg.model.get("vocab_size") is None:  # the teacher's logits, entry for entry
                cfg.model.vocab_size = teacher.model_config.vocab_size
                cfg.model.pad_vocab_to = teacher.model_config.pad_vocab_to
            self.method = method_config(cfg)
            self.template = build_chat_template(self.method.data, teacher.tokenizer_path.parent)
            student_tokenizer = teacher.tokenizer_path
            student_vocab = typed(cfg.model, ModelConfig).padded_vocab_size
        else:
            student_vocab, student_tokenizer = self.parent.model_config.padded_vocab_size, self.parent.tokenizer_path
        problems = []
        if tokenizer_hash(teacher.tokenizer_path) != tokenizer_hash(student_tokenizer):
            problems.append(f"{name}: its tokenizer ({teacher.tokenizer_path}) differs from the student's "
                            f"({student_tokenizer}); the divergence compares distributions over the same tokens, so "
                            "teacher and student must share one tokenizer")
        if teacher.model_config.padded_vocab_size != student_vocab:
            problems.append(f"{name}: its logits have {teacher.model_config.padded_vocab_size} entries (model.vocab_size "
                            f"padded to pad_vocab_to), the student's {student_vocab}; allowed: equal sizes")
        position, longest = teacher.model_config.position.kind, teacher.model_config.max_seq_len
        if position in ABSOLUTE_POSITIONS and cfg.data.seq_len > longest:
            problems.append(f"data.seq_len={cfg.data.seq_len}: the teacher ({name}) has a {position} position table of "
                            f"{longest} rows and reads every row of the student's; allowed: <= {longest}")
        if problems:
            raise ConfigError(problems)
        return cfg

    def data(self, cfg: DictConfig, settings: Settings, run_dir: RunDir) -> StageData:
        """Rows as SFT reads them, or with `corpus` the pretraining corpus's blocks (Pretrain's own
        data: the same caches and order), tokenised with the student's tokenizer."""
        if not self.method.corpus:
            return super().data(cfg, settings, run_dir)
        data = Pretrain(self.module_class).data(cfg, settings, run_dir)
        data.facts.update(self.parent_facts())
        return data

    def labels(self, choices: dict[str, str]) -> dict[str, str]:
        return super().labels(choices) if self.parent is not None else {**choices, "tokenizer": "pretrained"}

    def tokenizer_path(self) -> Path:
        return self.parent.tokenizer_path if self.parent is not None else self.teacher.tokenizer_path

    def parent_facts(self) -> dict[str, Any]:
        facts = self.parent.facts() if self.parent is not None else {"parent_checkpoint": None}
        return {**facts, "teacher_checkpoint": str(self.teacher.ref.path), "teacher_run_id": self.teacher.ref.run_id,
                "teacher_stage": self.teacher.stage}

    def module(self, cfg: DictConfig, settings: Settings, plan: Plan, data: StageData, run_dir: RunDir,
               schedule: Optional[Any] = None, total_steps: Optional[int] = None) -> pl.LightningModule:
        module = super().module(cfg, settings, plan, data, run_dir, schedule, total_steps)
        module.teacher_source = self.teacher
        return module

    def inputs(self) -> dict[str, tuple[Path, Optional[Path]]]:
        """Both parents: the student's (init_from, if any) and the teacher."""
        found = super().inputs()
        if self.teacher is not None:
            found["teacher"] = (self.teacher.ref.path, self.teacher.ref.run_dir)
        return found

    def finish(self, cfg: DictConfig, run_dir: RunDir, data: StageData, summary: dict[str, Any]) -> dict[str, Any]:
        """As SFT's (held-out greedy answers before and after; a fresh student has no before),
        plus the teacher's answers to the same prompts."""
        from llm.checkpoint import load_trained_network
        from llm.tracking.metrics import last_values

        if self.parent is not None:
            out = super().finish(cfg, run_dir, data, summary)
        else:
            out = {"last_metrics": last_values(run_dir.metrics)}
            if data.eval_rows:
                model = load_trained_network(run_dir.path, None, typed(cfg.model, ModelConfig), self.method.lora, False)
                after = evaluate_answers(model, data.tokenizer, data.eval_rows, self.eval_reward(cfg),
                                         self.method.data.eval_max_new_tokens)
                out.update({**{f"eval/{k}": v for k, v in after.items()}, "eval/prompts": len(data.eval_rows)})
        # summary.json's val/ppl is exp(val/loss), here the divergence's: the student's perplexity
        # (the last val/ppl it logged, from val/nll_loss) is what compares with an SFT or scratch run.
        last = out["last_metrics"]
        if "val/nll_loss" in last:
            out["val/nll_loss"] = last["val/nll_loss"]
            out["val/ppl"] = last.get("val/ppl", math.exp(min(last["val/nll_loss"], 50.0)))
        if data.eval_rows:
            teacher = evaluate_answers(self.teacher.load(value_head=False).eval(), data.tokenizer, data.eval_rows,
                                       self.eval_reward(cfg), self.method.data.eval_max_new_tokens)
            out.update({f"eval_teacher/{k}": v for k, v in teacher.items()})
            log.info(f"held-out greedy answers: teacher exact match {teacher['accuracy']:.3f}, student "
                     f"{out['eval/accuracy']:.3f}")
        return out


    def done_line(self, summary: dict[str, Any]) -> str:
        if self.method.corpus:  # val/loss is the student's next-token loss, as pretraining's
            return f"val/loss {summary['val/loss']:.4f} (ppl {summary.get('val/ppl', math.nan):.1f})"
        line = f"val/loss {summary['val/loss']:.4f}"
        return line + (f" (student next-token loss {summary['val/nll_loss']:.4f}, ppl {summary['val/ppl']:.1f})"
                       if "val/nll_loss" in summary else "")


def tokenizer_hash(path: Path) -> str:
    from llm.tokenizer import Tokenizer

    return Tokenizer.load(path, "posttrain.teacher").content_hash()
