"""Pretraining: next-token cross-entropy. The base LightningModule of every stage."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from llm.model import ModelConfig, Transformer
from llm.model.moe import router_loss, update_router_biases
from llm.stages.optim import build_optimizer, clip_grad_norm_


# Per-expert loads are logged for small MoE models only (e.g. 4 layers x 8 experts): every
# `self.log` costs about 0.5 ms on a busy CPU, 64 layers x 64 experts would cost seconds a step.
PER_EXPERT_LIMIT = 32


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class PretrainModule(pl.LightningModule):
    """Owns the plain `Transformer`; the parallelism option shards/wraps it in `configure_model`."""

    stage = "pretrain"
    loss_spikes_are_faults = True  # the loss guard's spike test applies (a non-finite loss always does)

    def __init__(
        self,
        model_config: ModelConfig,
        optimizer: Callable,
        schedule: Callable[[int, int], float],
        parallelism: Any,
        total_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        gradient_clip: Optional[float] = 1.0,
        val_sources: Sequence[str] = (),
    ):
        super().__init__()
        self.model_config = model_config
        self.optimizer_factory = optimizer
        self.schedule = schedule
        self.parallelism = parallelism
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.gradient_clip = gradient_clip
        # a mixture's validation dataloaders, by name (llm.data.mixture); () for one corpus
        self.val_sources = list(val_sources)
        self.model: Optional[Transformer] = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = Transformer(self.model_config)
        mesh = getattr(self, "device_mesh", None)
        self.model = self.parallelism.parallelize(self.model, mesh)

    def trained_module(self) -> torch.nn.Module:
        """What the optimizer updates (PPO adds its critic)."""
        return self.model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def logging_step(self) -> bool:
        """Only steps whose metrics the Trainer will write: each `self.log` costs a fraction of a
        millisecond, which adds up to several percent of a small model's step."""
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def trained(self, steps: int) -> tuple[float, float]:
        """Tokens and FLOPs trained after `steps` optimizer steps: the run's TokenCount (set by
        llm.tracking.tokens; it knows the steps before a resume, perhaps of another shape), else
        this module's own shape."""
        count = getattr(self, "token_count", None)
        if count is not None:
            return float(count.tokens(steps)), float(count.flops(steps))
        return float(steps * self.tokens_per_step), float(steps * self.tokens_per_step * self.flops_per_token)

    @property
    def pipelined(self) -> bool:
        """Pipeline parallelism: the model is this rank's stages, run by a schedule (llm.parallel.pipeline)."""
        return getattr(self.parallelism, "pipelined", False)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if self.pipelined:  # forward and backward through the stages; the loss from the last one, on every rank
            if batch_idx % self.trainer.accumulate_grad_batches == 0:
                self.trained_module().zero_grad(set_to_none=True)
            loss = self.model.step(batch[:, :-1], batch[:, 1:], next_token_loss, self.trainer.accumulate_grad_batches)
        else:
            loss = next_token_loss(self.model(batch[:, :-1]), batch[:, 1:])
        if self.logging_step():
            steps_done = self.global_step + 1
            self.log("train/loss", loss, prog_bar=True)
            tokens, flops = self.trained(steps_done)
            self.log("trainer/tokens", tokens)
            self.log("trainer/flops", flops)
            self.log("trainer/lr", self.optimizers().param_groups[0]["lr"])
            self.log_moe()
        return loss + self.router_loss()  # train/loss stays the LM loss, comparable with dense runs

    # --- mixture of experts (no-ops for a dense model) -------------------------------------------

    def router_loss(self) -> Tensor | float:
        """The MoE router losses of the trained networks' last forward, coefficients applied: every
        stage adds them to the loss it trains on, right after its training forward(s)."""
        return router_loss(self.trained_module())

    def log_moe(self) -> None:
        """`train/moe/*` of the last forward: aux_loss and z_loss (unweighted, mean over MoE
        layers), load_cv (coefficient of variation of the experts' loads, mean over layers),
        dropped_frac (assignments over capacity), and, for up to PER_EXPERT_LIMIT values, each
        layer's load per expert (`load/layer{i}/expert{j}`): each logged value costs about 0.5 ms."""
        transformer = getattr(self.model, "backbone", self.model)  # a value model's backbone
        stats = transformer.moe_stats() if isinstance(transformer, Transformer) else []
        if not stats:
            return
        loads = torch.stack([s["load"] for s in stats])  # (layers, experts)
        cv = loads.std(dim=1, correction=0) / loads.mean(dim=1)
        summary = torch.stack([torch.stack([s["aux_loss"] for s in stats]).mean(),
                               torch.stack([s["z_loss"] for s in stats]).mean(), cv.mean()]).detach()
        values = torch.cat([summary, loads.flatten()]).tolist()  # one device sync
        metrics = {"train/moe/aux_loss": values[0], "train/moe/z_loss": values[1], "train/moe/load_cv": values[2],
                   "train/moe/dropped_frac": sum(s["dropped"] for s in stats) / sum(s["assignments"] for s in stats)}
        n_experts = loads.shape[1]
        for row, s in enumerate(stats if loads.numel() <= PER_EXPERT_LIMIT else []):
            for j in range(n_experts):
                metrics[f"train/moe/load/layer{s['layer']}/expert{j}"] = values[3 + row * n_experts + j]
        self.log_dict(metrics, batch_size=1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        update_router_biases(self.trained_module())  # auxiliary-loss-free balancing, if on

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.pipelined:  # a pipeline's schedule ran the backward in training_step
            super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, *args: Any, **kwargs: Any) -> None:
        if not self.pipelined:  # Lightning zeroes between training_step and backward: a pipeline zeroes itself
            super().optimizer_zero_grad(*args, **kwargs)

    def validation_step(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        if self.pipelined:
            loss = self.model.evaluate(batch[:, :-1], batch[:, 1:], next_token_loss)
        else:
            loss = next_token_loss(self.model(batch[:, :-1]), batch[:, 1:])
        if not self.val_sources:
            self.log("val/loss", loss, prog_bar=True, sync_dist=True)
            return loss
        # A mixture: each source's own loss, and token totals for the mixed val/loss at the epoch's end
        # (Lightning refuses one key logged from several dataloaders).
        tokens = batch[:, 1:].numel()
        self.log(f"val/loss/{self.val_sources[dataloader_idx]}", loss, sync_dist=True, add_dataloader_idx=False,
                 batch_size=tokens)
        self._val_totals += torch.stack([loss.detach().float() * tokens, loss.new_tensor(tokens, dtype=torch.float)])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_totals = torch.zeros(2, device=self.device)  # (sum of token losses, tokens) of a mixture

    def on_validation_epoch_end(self) -> None:
        if self.val_sources:  # the token-weighted mean over every source's validation tokens, all ranks
            loss_sum, tokens = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum").tolist()
            loss = loss_sum / tokens if tokens else math.nan
            self.log("val/loss", loss, prog_bar=True)
            epochs = getattr(self.trainer.datamodule, "epochs_consumed", None)
            if epochs is not None:
                self.log_dict(epochs(self.global_step), batch_size=1)
        else:
            loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", math.exp(min(float(loss), 50.0)), sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clipped here rather than by the Trainer, which refuses fused optimizers under mixed precision.
        if self.gradient_clip:
            if self.pipelined:  # the norm over every stage's gradients
                norm = self.model.clip_grad_norm_(self.gradient_clip)
            else:
                norm = clip_grad_norm_(list(self.trained_module().parameters()), self.gradient_clip)
            if self.logging_step():
                self.log("train/grad_norm", norm)

    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.optimizer_factory, self.trained_module())
        total = self.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.schedule(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        checkpoint["llm"] = {"stage": self.stage, "model_config": asdict(self.model_config)}
