"""`llm-bench <overrides>`: tokens/s, MFU and memory of a config's training step, against a bare
PyTorch loop over the same model and batches in the same process.

  llm-bench                       # the default CPU model
  llm-bench model=small bench.steps=10
  llm-bench bench.parallel=[ddp,fsdp]   # 2-process DDP and FSDP runs against single
  llm-bench bench.against=transformers  # the bare loop against transformers' twin (Llama; Mixtral for MoE)
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

import llm.config  # noqa: F401  (registers the schemas)
from llm.cli.common import CONFIG_ERROR_EXIT_CODE, config_error_in, setup
from llm.cli.generate import HydraEntry
from llm.cli.train import CONF_DIR
from llm.fields import Choice, at_least

setup()
log = logging.getLogger("llm.cli.bench")  # not __name__: that is __main__ under `python -m`
ENTRY = HydraEntry()


class Against(Choice):
    framework = "framework"  # llm-train's module, Trainer and callbacks against a bare loop
    transformers = "transformers"  # a bare loop over our model against one over its transformers twin


@dataclass
class BenchSettings:
    """The `bench` keys of conf/bench.yaml, typed and ranged like every other group."""

    steps: int = at_least(1, 20, high=10**6)
    warmup: int = at_least(0, 3, high=10**6)
    repeats: int = at_least(1, 3, high=1000)
    parallel: list[str] = field(default_factory=list)
    against: Against = Against.framework
    hf_experts: Optional[str] = None  # transformers' experts_implementation (eager, grouped_mm, ...); null: its default


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def _app(cfg: DictConfig) -> None:
    ENTRY.composed = True
    try:
        _bench(cfg)
    except Exception as e:  # a config or input error: its message, exit 2, and no output folder left
        cause = config_error_in(e)
        if cause is None:
            raise
        from llm.run.run import discard_unstarted

        sys.stderr.write(f"error: {cause}\n")
        discard_unstarted(cfg.paths.run_dir)
        sys.exit(CONFIG_ERROR_EXIT_CODE)


def _bench(cfg: DictConfig) -> None:
    from llm.bench.step import benchmark
    from llm.config import validate
    from llm.config.validate import checked

    bench = checked(BenchSettings, OmegaConf.to_container(cfg.bench, resolve=True), "bench")
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "bench"])
    validate(run_cfg)
    out_dir = Path(cfg.paths.run_dir)
    if bench.parallel:
        from llm.bench.parallel import benchmark_parallel

        overrides = [o for o in _task_overrides() if not o.startswith(("bench.", "parallelism", "trainer.devices"))]
        rows = benchmark_parallel(list(bench.parallel), overrides, bench.warmup + bench.steps, out_dir)
        (out_dir / "bench_parallel.json").write_text(json.dumps(rows, indent=2) + "\n")
        lines = [f"{'parallelism':12}{'ranks':>6}{'tokens/s':>12}{'vs single':>11}{'peak MiB/rank':>15}"]
        lines += [f"{r['option']:12}{r['ranks']:>6}{r['tokens_per_s']:>12,.0f}{r['vs_single']:>11.2f}"
                  f"{r['peak_memory_mib_per_rank']:>15,.0f}" for r in rows]
        _output(lines)
        log.info(f"written: {out_dir / 'bench_parallel.json'}")
        return
    if bench.against == Against.transformers:
        _against_transformers(run_cfg, bench, out_dir)
        return
    result = benchmark(run_cfg, steps=bench.steps, warmup=bench.warmup, repeats=bench.repeats, log_dir=str(out_dir))
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"model: {result['params']:,} parameters, {result['flops_per_token']:.3g} FLOPs/token, "
             f"{result['tokens_per_step']:,} tokens/step, {result['threads']} threads",
             f"{'':12}{'tokens/s':>12}{'MFU':>8}"]
    lines += [f"{name:12}{result[f'{name}_tokens_per_s']:>12,.0f}{result[f'{name}_mfu']:>8.1%}" for name in ("bare", "framework")]
    lines.append(f"ratio framework / bare: {result['ratio']:.3f} best of {result['repeats']} rounds, "
                 f"{result['median_ratio']:.3f} of medians   (peak RSS {result['peak_rss_mib']:,.0f} MiB, "
                 f"CPU/GPU peak {result['peak_flops'] / 1e9:,.0f} GFLOP/s)")
    _output(lines)
    log.info(f"written: {out_dir / 'bench.json'}")


def _against_transformers(cfg: DictConfig, bench: BenchSettings, out_dir: Path) -> None:
    """The training step of our model against its transformers twin (see `llm.bench.hf`)."""
    import torch

    from llm.bench.hf import train_step_vs_transformers
    from llm.config import ConfigError, typed
    from llm.config.schema import DataSchema, TrainerSchema
    from llm.config.validate import tokenizer_vocab_size
    from llm.model import ModelConfig
    from llm.scaling.flops import model_size

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(["bench.against=transformers: the transformers package is not installed; "
                           "pip install 'llm[hf]' (or bench.against=framework)"]) from None
    from llm.interop.hf import choose_family

    data: DataSchema = typed(cfg.data, DataSchema, drop=("corpus",))
    trainer: TrainerSchema = typed(cfg.trainer, TrainerSchema)
    model_cfg: ModelConfig = typed(cfg.model, ModelConfig)
    if model_cfg.vocab_size is None:  # random token batches: no tokenizer file is read or trained
        model_cfg.vocab_size = tokenizer_vocab_size(cfg.tokenizer, load=True)
    try:
        family = choose_family(model_cfg).MODEL_TYPE
    except ValueError as e:
        raise ConfigError([f"bench.against=transformers: {e}"]) from None
    device = "cuda" if torch.cuda.is_available() and trainer.accelerator != "cpu" else "cpu"
    torch.manual_seed(cfg.seed)
    try:
        result = train_step_vs_transformers(model_cfg, data.micro_batch_size, data.seq_len, steps=bench.steps,
                                            warmup=bench.warmup, repeats=bench.repeats, seed=cfg.seed, device=device,
                                            experts_implementation=bench.hf_experts)
    except ValueError as e:
        if bench.hf_experts is not None and "experts_implementation" in str(e):
            raise ConfigError([f"bench.hf_experts={bench.hf_experts!r}: {e}"]) from None
        raise
    size = model_size(model_cfg, data.seq_len)
    result.update(family=family, params=size.params, params_active=size.active, flops_per_token=size.flops_per_token)
    (out_dir / "bench_transformers.json").write_text(json.dumps(result, indent=2) + "\n")
    kernel = f" (experts: {result['hf_experts_implementation']})" if result["hf_experts_implementation"] else ""
    active = f" ({size.active:,} active)" if size.active != size.params else ""
    lines = [f"model: {size.params:,} parameters{active}, batch {result['batch']} x {result['seq_len']}, "
             f"{result['threads']} threads, fp32, AdamW; transformers: {result['hf_model']}{kernel}",
             f"{'':14}{'tokens/s':>10}{'first loss':>12}"]
    lines += [f"{label:14}{result[f'{name}_tokens_per_s']:>10,.0f}{result[f'first_loss_{name}']:>12.4f}"
              for name, label in (("ours", "ours"), ("hf", "transformers"))]
    lines.append(f"ratio ours / transformers: {result['ratio']:.3f} best of {result['repeats']} rounds "
                 f"of {result['steps']} steps")
    _output(lines)
    log.info(f"written: {out_dir / 'bench_transformers.json'}")


def _output(lines: list[str]) -> None:
    """The benchmark's table: the command's output, on stdout after a blank line (not a log message)."""
    sys.stdout.write("\n" + "\n".join(lines) + "\n")
    sys.stdout.flush()


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def main() -> None:
    ENTRY.run(_app)


if __name__ == "__main__":
    main()
