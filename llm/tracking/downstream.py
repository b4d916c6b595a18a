"""Downstream evaluation during training (`trainer.downstream`): every `every` optimizer steps,
and once before the first, the model answers the built-in multiple-choice tasks (no extra
dependency) and, if named, lm-evaluation-harness tasks; `eval/<task>/<metric>` is logged with
`trainer/tokens` and `trainer/flops` of that step (metrics.jsonl, W&B against tokens, the dashboard).

Every rank evaluates (a sharded model needs all its ranks in each forward; an unsharded one costs
the others no more than waiting at the next step's all-reduce); the loggers write at rank zero.
The model is in eval mode without gradients meanwhile, and back in train mode after.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from pytorch_lightning.callbacks import Callback

from llm.evaluate.multiple_choice import Question, questions, score_questions

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer
    from llm.tracking.tokens import TokenCount

log = logging.getLogger(__name__)


def builtin_questions(tasks: Sequence[str], corpus: Optional[Mapping[str, Any]], n: int,
                      n_choices: int) -> dict[str, list[Question]]:
    """The questions of each built-in task; with a data=tasks corpus, from its own held-out prompts
    (its task knobs, seed and val_fraction), so none of them was trained on."""
    knobs: Mapping[str, Any] = {}
    seed, val_fraction = 0, 0.1
    if corpus is not None and str(corpus.get("_target_", "")).endswith("tasks.TaskCorpus"):
        knobs = corpus.get("tasks") or {}
        seed, val_fraction = int(corpus.get("seed", 0)), float(corpus.get("val_fraction", 0.1))
    return {task: questions(task, knobs.get(task), n, n_choices, seed, val_fraction) for task in tasks}


class DownstreamEval(Callback):
    """Logs eval/<task>/acc and eval/<task>/acc_norm of the built-in tasks, and the harness's
    eval/<task>/<metric>, at step 0 and every `every` steps."""

    def __init__(self, every: int, tokenizer: Tokenizer, token_count: TokenCount,
                 builtin: Mapping[str, list[Question]], harness_tasks: Sequence[str] = (),
                 harness_include: Optional[str] = None, harness_limit: Optional[int] = None, batch_size: int = 16):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.tokenizer, self.token_count = every, tokenizer, token_count
        self.builtin, self.batch_size = dict(builtin), batch_size
        self.harness_tasks, self.harness_include, self.harness_limit = list(harness_tasks), harness_include, harness_limit
        self.last_step = -1
        self.defined: set[str] = set()
        self.history: list[dict[str, float]] = []  # what was logged, in order (also for tests)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step == 0:  # the curve starts where the untrained model stands (chance)
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Called per micro-batch: with gradient accumulation a step's last one sees the new step first.
        if trainer.global_step % self.every == 0 and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        step = trainer.global_step
        self.last_step = step
        model = getattr(pl_module.model, "backbone", pl_module.model)  # a value model's backbone
        started, was_training = time.time(), model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = self.measure(model)
        finally:
            model.train(was_training)
        metrics.update({"trainer/tokens": float(self.token_count.tokens(step)),
                        "trainer/flops": float(self.token_count.flops(step))})
        if trainer.is_global_zero:
            self.define_axes(trainer, metrics)
            for logger in trainer.loggers:
                # JsonlLogger records step + 1 (steps done); the step being logged is step - 1.
                logger.log_metrics(metrics, step=step - 1)
            log.info(f"downstream at step {step}: " + ", ".join(
                f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/")) +
                f" ({time.time() - started:.1f}s)")
        self.history.append({"step": step, **metrics})
        return metrics

    def define_axes(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        """W&B plots each new eval/<task>/<metric> against trainer/tokens (once per name)."""
        new = [k for k in metrics if k not in self.defined]
        self.defined.update(new)
        for logger in trainer.loggers:
            if new and type(logger).__name__ == "WandbLogger":
                from llm.tracking.wandb import define_token_axis

                define_token_axis(logger.experiment, new)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for task, items in self.builtin.items():
            result = score_questions(model, self.tokenizer, items, self.batch_size)
            metrics.update({f"eval/{task}/{k}": v for k, v in result.metrics().items()})
        if self.harness_tasks:
            from llm.evaluate.harness import evaluate_model, flat_scores

            scores = evaluate_model(model, self.tokenizer, self.harness_tasks, include_path=self.harness_include,
                                    limit=self.harness_limit, batch_size=self.batch_size)
            metrics.update(flat_scores(scores))
        return metrics


def downstream_callback(settings: Any, corpus: Optional[Mapping[str, Any]], tokenizer: Tokenizer,
                        token_count: TokenCount) -> Optional[DownstreamEval]:
    """The callback `trainer.downstream` asks for (None when `every` is 0 or it names no task);
    its task names were checked with the rest of the config (llm.config.validate)."""
    d = settings.trainer.downstream
    if not d.every or not (d.tasks or d.harness):
        if d.every:
            log.warning("trainer.downstream.every is set but no task is named (trainer.downstream.tasks or .harness)")
        return None
    builtin = builtin_questions(d.tasks, corpus, d.questions, d.choices)
    return DownstreamEval(d.every, tokenizer, token_count, builtin, d.harness, d.harness_include, d.harness_limit,
                          d.batch_size)
