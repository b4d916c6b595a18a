"""D and C as trained: the tokens and FLOPs of every optimizer step, kept across resumes.

A resumed run may train with another `data.seq_len` or batch than the steps before it, so D is
not `global_step * tokens_per_step`. The count lives in the checkpoint (Lightning stores a
callback's `state_dict` there and gives it back on resume and on every rollback), so summary.json
and the scaling fits that read it count what was actually trained.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import Callback


class TokenCount(Callback):
    """Tokens and FLOPs trained up to any step: the count stored with the checkpoint the run
    started from, plus this run's steps at its own tokens per step."""

    def __init__(self, tokens_per_step: int, flops_per_token: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.base_step, self.base_tokens, self.base_flops = 0, 0, 0.0
        self._trainer: Any = None
        self._restored = False

    def tokens(self, step: int) -> int:
        return self.base_tokens + (step - self.base_step) * self.tokens_per_step

    def flops(self, step: int) -> float:
        return self.base_flops + (step - self.base_step) * self.tokens_per_step * self.flops_per_token

    def state_dict(self) -> dict[str, Any]:
        # Called while a checkpoint is written, at the step it records.
        step = self._trainer.global_step if self._trainer is not None else self.base_step
        return {"step": step, "tokens": self.tokens(step), "flops": self.flops(step)}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Before Lightning restores a checkpoint: a fresh fit (a rollback to step 0 too) counts from zero.
        self._trainer = trainer
        self._restored = False
        pl_module.token_count = self  # what the module logs as trainer/tokens and trainer/flops
        self.base_step, self.base_tokens, self.base_flops = 0, 0, 0.0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_step, self.base_tokens = int(state["step"]), int(state["tokens"])
        self.base_flops = float(state["flops"])
        self._restored = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step and not self._restored:
            # A checkpoint written before counts were stored: assume this run's tokens per step.
            self.base_step, self.base_tokens = trainer.global_step, trainer.global_step * self.tokens_per_step
            self.base_flops = self.base_tokens * self.flops_per_token
