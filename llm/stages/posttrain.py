"""The base of every post-training stage: a network initialised from a parent checkpoint,
optionally LoRA adapters, optionally a frozen reference copy, and the data of its method.

A stage subclass says which network it trains (`build_network`), whether it needs a reference
policy, which batches it eats (`collate`, the data kind) and its loss (`training_step`). The
optimizer, schedule, gradient clipping, logging steps and the parallelism hook are the
pretraining module's.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
import warnings
from dataclasses import asdict
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llm.model.lora import LoRAConfig, apply_lora
from llm.model.value import build_network
from llm.stages.objectives import IGNORE_INDEX, Extreme, Metrics, Ratio
from llm.stages.pretrain import PretrainModule

log = logging.getLogger(__name__)


# The frozen reference is in eval mode on purpose (no dropout); Lightning warns about any module that is.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class PostTrainModule(PretrainModule):
    stage = "posttrain"
    data_kind = "sft"  # which examples the method reads: sft | preference | prompt
    value_head = False  # trains a ValueModel (reward model) instead of a language model
    needs_reference = False
    # Preference and policy-gradient losses swing from batch to batch by design (a few hard pairs
    # or one lucky rollout): for the loss guard only a non-finite loss is a fault. SFT's is an LM loss.
    loss_spikes_are_faults = False
    counts_tokens = False  # logs TRL's `num_tokens` (SFT): the batches carry an attention `mask`

    def __init__(self, *args: Any, data: Optional[dict] = None, lora: Optional[dict] = None,
                 parent: Any = None, tokenizer: Any = None, qat: str = "none", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.data_config = dict(data or {})
        self.lora = LoRAConfig(**(lora or {}))
        self.qat = str(qat)  # none | int8 | int4: fake-quantised Linear layers (llm.generate.quantize)
        self.parent = parent  # llm.checkpoint.Parent: weights and architecture to start from
        self.tokenizer = tokenizer
        self.reference: Optional[nn.Module] = None
        self.trainable_params = 0
        # TRL's num_tokens: non-padding tokens trained on, all ranks, since the run began (kept across
        # resumes). An int, or a tensor on the device once counting starts (no host sync per step).
        self.num_tokens: Union[int, Tensor] = 0
        # A LoRA checkpoint holds the adapters only; the frozen base comes from `parent` again.
        self.strict_loading = not self.lora.enabled

    # --- the network -------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.parent is not None:
            model = self.parent.load(self.value_head)
        else:
            model = build_network(self.model_config, self.value_head)
        if self.needs_reference:
            # Frozen and whole on every rank (never sharded): it only ever runs forward.
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        if self.lora.enabled:
            # A value model's fresh head has nothing to adapt: it trains whole.
            self.trainable_params = apply_lora(model, self.lora.rank, self.lora.alpha, self.lora.dropout,
                                               self.lora.targets, train_modules=[*self.lora.train_modules, *(["head"] if self.value_head else [])])
        else:
            self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.qat != "none":  # after the reference copy: only the trained model sees quantised weights
            from llm.generate.quantize import fake_quantize_linears

            log.info(f"qat: {fake_quantize_linears(model, self.qat)} Linear layers train fake-quantised to {self.qat}")
        self.model = self.parallelism.parallelize(model, getattr(self, "device_mesh", None))

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        if self.global_rank == 0:
            total = sum(p.numel() for p in self.model.parameters())
            log.info(f"{self.stage}: training {self.trainable_params:,} of {total:,} parameters"
                     + (f" (LoRA rank {self.lora.rank} on {', '.join(self.lora.targets)})" if self.lora.enabled else ""))

    def train(self, mode: bool = True) -> PostTrainModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # never in training mode (dropout), whatever Lightning asks
        return self

    def on_validation_epoch_end(self) -> None:
        """Perplexity means something only for a language-model loss (SFT's)."""
        if self.data_kind == "sft":
            super().on_validation_epoch_end()

    # --- batches -----------------------------------------------------------------------------

    def packed(self) -> bool:
        return bool(self.data_config.get("packing", False))

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits of a right-padded batch; packed rows keep attention inside each document."""
        if self.packed():
            return model(batch["tokens"], batch["positions"], documents=batch["documents"])
        return model(batch["tokens"])

    def log_metrics(self, prefix: str, metrics: Metrics, batch_size: int = 1) -> None:
        """TRL-named metrics: `val/<name>` for validation; in training `train/<name>`, except names
        that already have a section (`rewards/margins`, `objective/kl`, ...), on logging steps.

        In training every process logs the same value, reduced over processes as TRL gathers them
        (`reduce_over_processes`). Validation batches are spread unevenly over the ranks, so there
        each process averages its batches and Lightning averages the processes (TRL averages its
        per-batch values)."""
        if prefix == "val/":
            local = {k: v.value() if isinstance(v, Ratio) else v.value if isinstance(v, Extreme) else v
                     for k, v in metrics.items()}
            self.log_dict({f"val/{k}": v for k, v in local.items()}, sync_dist=True, batch_size=batch_size)
        elif self.logging_step():
            reduced = reduce_over_processes(metrics, self.device)
            self.log_dict({f"train/{k}" if "/" not in k else k: v for k, v in reduced.items()}, batch_size=1)

    def count_tokens(self, mask: Tensor) -> None:
        """Add a training micro-batch's non-padding tokens (TRL counts the attention mask: prompt
        tokens too), summed over the data-parallel ranks, to `num_tokens`. Called on every rank at
        every micro-batch: one all-reduce of one integer, queued on the device (no barrier)."""
        count = mask.sum()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
            world = dist.get_world_size()
            replicas = world // self.parallelism.data_parallel_size(world)  # tensor-parallel ranks share a batch
            count = count // replicas
        self.num_tokens = self.num_tokens + count

    def log_progress(self, loss: Tensor) -> None:
        """`train/loss` is the mean of the processes' micro-batch losses, as TRL gathers it: the
        global batch's loss over equal batches, the same on every process."""
        if self.logging_step():
            tokens, flops = self.trained(self.global_step + 1)
            loss = reduce_over_processes({"loss": loss}, self.device)["loss"]
            self.log_dict({"train/loss": loss, "trainer/tokens": tokens, "trainer/flops": flops,
                           "trainer/lr": self.optimizers().param_groups[0]["lr"],
                           "trainer/trainable_params": float(self.trainable_params)}, batch_size=1)
            self.log_moe()

    # --- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["llm"] = {"stage": self.stage, "model_config": asdict(self.model_config),
                             "value_head": self.value_head, "lora": asdict(self.lora) if self.lora.enabled else None,
                             "parent": None if self.parent is None else str(self.parent.ref.path)}
        if self.counts_tokens:
            checkpoint["llm"]["num_tokens"] = int(self.num_tokens)
        # A LoRA checkpoint holds only what training changes (the base is the parent's), except a
        # sharded one: torch.distributed.checkpoint loads a module's every key back, so a resume or
        # a WSD branch under FSDP needs them all.
        if self.lora.enabled and not getattr(self.parallelism, "sharded_checkpoints", False):
            trained = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resume (or a rollback, or a WSD branch) counts on from the checkpoint; TRL starts again from 0.
        self.num_tokens = int((checkpoint.get("llm") or {}).get("num_tokens", 0))


def reduce_over_processes(metrics: Metrics, device: torch.device) -> dict[str, Tensor]:
    """Metrics as TRL gathers them over processes: a `Ratio`'s sum and count are each summed, then
    divided (a token-weighted mean); an `Extreme` is the minimum or maximum over processes; any
    other value is averaged over processes (per-example means over equal batches: the mean over
    every example). One all-reduce, in float64, for the sums and means, one more for extremes;
    every process must pass the same names. Tensor-parallel ranks hold equal values, which changes
    none of these."""
    def scalar(x) -> Tensor:
        return torch.as_tensor(x).detach().to(device, torch.float64).reshape(())

    summed = [p for v in metrics.values() if not isinstance(v, Extreme)
              for p in ((v.total, v.count) if isinstance(v, Ratio) else (v,))]
    # Maxima negated, so that one MIN all-reduce takes both kinds.
    extremes = [-scalar(v.value) if v.largest else scalar(v.value) for v in metrics.values() if isinstance(v, Extreme)]
    flat = torch.stack([scalar(p) for p in summed]) if summed else None
    lowest = torch.stack(extremes) if extremes else None
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        if flat is not None:
            dist.all_reduce(flat)
        if lowest is not None:
            dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    reduced, i, j = {}, 0, 0
    for name, v in metrics.items():
        if isinstance(v, Extreme):
            reduced[name] = -lowest[j] if v.largest else lowest[j]
            j += 1
        elif isinstance(v, Ratio):
            reduced[name] = Ratio(flat[i], flat[i + 1]).value()
            i += 2
        else:
            reduced[name] = flat[i] / world
            i += 1
    return reduced


def masked_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits[:, t] against labels[:, t + 1], over trained labels only."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)


class SupervisedModule(PostTrainModule, ABC):
    """A method with a loss on fixed batches (SFT, reward, DPO): one training and validation step
    around its `step`. The on-policy methods (llm.stages.grpo, ppo) sample their own batches."""

    @abstractmethod
    def step(self, batch: Any) -> tuple[Tensor, Metrics]:
        """The method's loss on a batch, and its metrics (TRL's names)."""

    def wants_metrics(self) -> bool:
        """Whether this step's metrics are logged: every validation step, and training steps that
        log. Costly metrics (SFT's entropy: a softmax over the vocabulary) are computed only then."""
        return not self.training or self.logging_step()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, metrics = self.step(batch)
        if self.counts_tokens:
            self.count_tokens(batch["mask"])
            metrics["num_tokens"] = self.num_tokens  # the same on every rank: averaging keeps it
        self.log_progress(loss)
        self.log_metrics("train/", metrics)
        return loss + self.router_loss()  # an MoE model's router losses (its forward was in `step`)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, metrics = self.step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log_metrics("val/", metrics)
        return loss

