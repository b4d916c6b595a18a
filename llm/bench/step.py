"""Training-step benchmark: the framework (Lightning module + Trainer, as `llm-train` runs it)
against a bare PyTorch loop over the same model, optimizer, schedule and batches, interleaved
in one process so machine noise hits both. Figures are tokens/s, MFU and peak memory. The bare loop
runs on the framework's device, in its precision and with its per-block compile (trainer=gpu)."""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

from llm.config import typed
from llm.config.schema import DataSchema, TrainerSchema
from llm.config.validate import tokenizer_vocab_size
from llm.model import ModelConfig, Transformer
from llm.scaling.flops import model_size
from llm.stages.optim import build_optimizer
from llm.stages.pretrain import next_token_loss
from llm.tracking.metrics import JsonlLogger
from llm.tracking.throughput import compute_dtype, device_peak, peak_memory_mib

log = logging.getLogger(__name__)


def random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g) for _ in range(n)]


def bare_loop(model_cfg: ModelConfig, optim: Callable, schedule: Callable, batches: list, warmup: int,
              clip: float | None, seed: int, device: torch.device = torch.device("cpu"), precision: str = "32-true",
              compile: bool = False) -> float:
    """Seconds for the timed steps of a plain PyTorch training loop, on the framework's device, in
    its precision (autocast for "-mixed", the weights cast for "-true") and with its per-block compile."""
    torch.manual_seed(seed)
    model = Transformer(model_cfg).to(device)
    dtype = compute_dtype(precision)
    if precision.endswith("-true") and dtype != torch.float32:
        model.to(dtype)
    if compile:
        from llm.parallel.apply import apply_compile

        apply_compile(model)
    autocast = (torch.autocast(device.type, dtype=dtype) if precision.endswith("-mixed")
                else contextlib.nullcontext())
    optimizer = build_optimizer(optim, model)
    total = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total))
    model.train()
    for i, batch in enumerate(batches):
        if i == warmup:
            _synchronize(device)
            start = time.perf_counter()
        batch = batch.to(device)
        with autocast:
            loss = next_token_loss(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    """Wait for a CUDA device's queued work, so a clock read means the steps are done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock(Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in (self.warmup, trainer.max_steps):  # the clock's reads: after queued GPU work
            _synchronize(pl_module.device)
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def framework_loop(cfg: DictConfig, model_cfg: ModelConfig, batches: list, warmup: int, trainer_cfg: TrainerSchema,
                   tokens_per_step: int, flops_per_token: float, log_dir: str) -> float:
    """Seconds for the timed steps of what llm-train runs: the stage's recipe builds the module,
    and the run's own Trainer factory and callbacks (loss guard, checkpoints, throughput, progress,
    preemption) and metrics logger drive it."""
    from llm.recipes import StageData, recipe_for
    from llm.run.layout import RunDir
    from llm.run.plan import Plan, Settings
    from llm.run.run import Run, RunCallbacks

    torch.manual_seed(cfg.seed)
    settings = Settings.of(cfg)
    plan = Plan(model_cfg, model_size(model_cfg, settings.data.seq_len), settings.data.micro_batch_size, 1,
                tokens_per_step, len(batches), f"{len(batches)} steps")
    recipe = recipe_for(cfg)
    module = recipe.module(cfg, settings, plan, StageData(None, None, {}), RunDir(log_dir))
    kit = RunCallbacks.build(settings, plan, RunDir(log_dir), "bench", module.loss_spikes_are_faults)
    clock = _StepClock(warmup)
    trainer = Run.trainer(settings, len(batches), 1, [JsonlLogger(RunDir(log_dir).metrics)], [*kit.all, clock],
                          Path(log_dir))
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return clock.end - clock.start


def benchmark(cfg: DictConfig, steps: int = 20, warmup: int = 3, repeats: int = 3, log_dir: str = ".") -> dict:
    """Interleave `repeats` rounds of bare and framework loops; report the best round of each and
    their ratio (and the ratio of medians)."""
    data: DataSchema = typed(cfg.data, DataSchema, drop=("corpus",))
    trainer_cfg: TrainerSchema = typed(cfg.trainer, TrainerSchema)
    model_cfg: ModelConfig = typed(cfg.model, ModelConfig)
    if model_cfg.vocab_size is None:  # random token batches: no tokenizer file is read or trained
        model_cfg.vocab_size = tokenizer_vocab_size(cfg.tokenizer, load=True)
    size = model_size(model_cfg, data.seq_len)
    tokens_per_step = data.micro_batch_size * data.seq_len
    batches = random_batches(warmup + steps, data.micro_batch_size, data.seq_len, model_cfg.vocab_size, cfg.seed)
    optim, schedule = instantiate(cfg.optim, _convert_="all"), instantiate(cfg.schedule)
    bare, framework = [], []

    device = torch.device("cuda" if torch.cuda.is_available() and trainer_cfg.accelerator != "cpu" else "cpu")

    def run_bare() -> None:
        bare.append(bare_loop(model_cfg, optim, schedule, batches, warmup, trainer_cfg.gradient_clip_val, cfg.seed,
                              device, str(trainer_cfg.precision), bool(cfg.parallelism.get("compile", False))))

    def run_framework() -> None:
        framework.append(framework_loop(cfg, model_cfg, batches, warmup, trainer_cfg, tokens_per_step,
                                        size.flops_per_token, log_dir))

    for r in range(repeats):
        # Alternate which goes first (ABBA), so a drift of the machine during the run hits both.
        order = (run_bare, run_framework) if r % 2 == 0 else (run_framework, run_bare)
        log.info(f"round {r + 1}/{repeats}: {' then '.join(f.__name__[4:] for f in order)} ...")
        for loop in order:
            gc.collect()
            loop()
    peak = device_peak(device, compute_dtype(trainer_cfg.precision))
    # Best-of-rounds is the headline (the least disturbed round of each, on a shared machine);
    # medians are reported beside it.
    tps = {name: tokens_per_step * steps / min(times) for name, times in (("bare", bare), ("framework", framework))}
    median = {name: tokens_per_step * steps / statistics.median(times) for name, times in
              (("bare", bare), ("framework", framework))}
    return {
        "params": size.params, "non_embedding": size.non_embedding, "flops_per_token": size.flops_per_token,
        "tokens_per_step": tokens_per_step, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
        "bare_tokens_per_s": tps["bare"], "framework_tokens_per_s": tps["framework"],
        "ratio": tps["framework"] / tps["bare"], "median_ratio": median["framework"] / median["bare"],
        "bare_mfu": tps["bare"] * size.flops_per_token / peak.flops,
        "framework_mfu": tps["framework"] * size.flops_per_token / peak.flops,
        "peak_flops": peak.flops, "peak_source": peak.source, "peak_rss_mib": peak_memory_mib(torch.device("cpu")),
        "bare_seconds": bare, "framework_seconds": framework,
    }
