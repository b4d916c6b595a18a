"""`llm-bench <overrides>`: tokens/s, MFU and memory of a config's training step, against a bare
PyTorch loop over the same model and batches in the same process.

  llm-bench                       # the default CPU model
  llm-bench model=small bench.steps=10
  llm-bench bench.parallel=[ddp,fsdp]   # 2-process DDP and FSDP runs against single
  llm-bench bench.against=transformers  # the bare loop against transformers' twin (Llama; Mixtral for MoE)
  llm-bench bench.peer=transformers     # every ratio of issue 21 against transformers, as a Markdown table
  llm-bench bench=gpu                   # on a GPU machine: the 1B FSDP run's tokens/s and MFU, as Markdown
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


class Peer(Choice):
    none = "none"
    transformers = "transformers"  # train eager at two shapes, train compiled, decode b1 and b8: ours / transformers


@dataclass
class PeerShape:
    """bench.peer's second training shape (issue 21's), over the composed model's other settings."""

    n_layers: int = at_least(1, 4, high=1024)
    d_model: int = at_least(1, 256, high=2**16)
    n_heads: int = at_least(1, 8, high=1024)
    n_kv_heads: int = at_least(1, 2, high=1024)
    mlp_hidden: int = at_least(1, 688, high=2**20)
    vocab_size: int = at_least(1, 8192, high=2**24)
    batch: int = at_least(1, 8, high=2**16)
    seq_len: int = at_least(1, 256, high=2**20)


@dataclass
class BenchSettings:
    """The `bench` keys of conf/bench.yaml, typed and ranged like every other group."""

    steps: int = at_least(1, 20, high=10**6)
    warmup: int = at_least(0, 3, high=10**6)
    repeats: int = at_least(1, 3, high=1000)
    parallel: list[str] = field(default_factory=list)
    against: Against = Against.framework
    hf_experts: Optional[str] = None  # transformers' experts_implementation (eager, grouped_mm, ...); null: its default
    peer: Peer = Peer.none
    peer_shape: PeerShape = field(default_factory=PeerShape)
    peer_compile: bool = True  # bench.peer: also the compiled cases (training step at peer_shape, decoding)
    peer_profile: bool = True  # bench.peer: where each eager training step's time goes, and the bound it leaves
    decode_tokens: int = at_least(1, 128, high=10**6)
    decode_batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = at_least(1, 16, high=10**6)
    mfu: bool = False  # a real llm-train run and a Markdown block of its tokens/s and MFU
    train: list[str] = field(default_factory=list)  # bench.mfu: llm-train overrides (before the command line's)


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
        (Path(cfg.paths.run_dir) / "bench.log").unlink(missing_ok=True)  # its job log (e.g. bench.mfu's "running: ...")
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
    if bench.peer == Peer.transformers:
        _peer(run_cfg, bench, out_dir)
        return
    if bench.mfu:
        _mfu(bench, out_dir)
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
                 f"peak {result['peak_flops'] / 1e9:,.0f} GFLOP/s, {result['peak_source']})")
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


def _needs_transformers(key: str) -> None:
    from llm.config import ConfigError

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError([f"{key}: the transformers package is not installed; pip install 'llm[hf]'"]) from None


def _peer(cfg: DictConfig, bench: BenchSettings, out_dir: Path) -> None:
    """Issue 21's side-by-side against transformers: training step eager at bench.peer_shape and
    at this config's shape, compiled at bench.peer_shape, greedy decoding at each batch of
    bench.decode_batches; a Markdown table of ours / transformers for each, with its goal."""
    import dataclasses

    import torch

    from llm.bench.hf import peer_model, peer_table, peer_vs_transformers, split_table
    from llm.config import ConfigError, typed
    from llm.config.schema import DataSchema, TrainerSchema
    from llm.config.validate import tokenizer_vocab_size
    from llm.model import ModelConfig
    from llm.tracking.throughput import cpu_name

    _needs_transformers("bench.peer=transformers")
    import transformers

    data: DataSchema = typed(cfg.data, DataSchema, drop=("corpus",))
    trainer: TrainerSchema = typed(cfg.trainer, TrainerSchema)
    model_cfg: ModelConfig = typed(cfg.model, ModelConfig)
    if model_cfg.vocab_size is None:  # random token batches: no tokenizer file is read or trained
        model_cfg.vocab_size = tokenizer_vocab_size(cfg.tokenizer, load=True)
    p = bench.peer_shape
    problems = []
    if not bench.decode_batches or any(b < 1 for b in bench.decode_batches):
        problems.append(f"bench.decode_batches={bench.decode_batches}: one or more batch sizes >= 1, e.g. [1,8]")
    decode_len = bench.prompt_len + bench.decode_tokens
    shape = {k: v for k, v in dataclasses.asdict(p).items() if k not in ("batch", "seq_len")}
    models = {}
    for key, fields, length in (("bench.peer_shape", shape, max(p.seq_len, decode_len)), ("model", {}, decode_len)):
        try:
            models[key] = peer_model(model_cfg, fields, length, key)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    peer_cfg, model_cfg = models["bench.peer_shape"], models["model"]
    device = "cuda" if torch.cuda.is_available() and trainer.accelerator != "cpu" else "cpu"
    peer_name, config_name = "bench.peer_shape", f"model={_choice('model') or 'model'}"
    shapes = {peer_name: (peer_cfg, p.batch, p.seq_len), config_name: (model_cfg, data.micro_batch_size, data.seq_len)}
    rows = peer_vs_transformers(shapes, peer_name if bench.peer_compile else None, peer_name,
                                steps=bench.steps, warmup=bench.warmup, repeats=bench.repeats,
                                decode_tokens=bench.decode_tokens, decode_batches=tuple(bench.decode_batches),
                                prompt_len=bench.prompt_len, seed=cfg.seed, device=device,
                                profile=bench.peer_profile)
    threads = torch.get_num_threads()
    machine = (torch.cuda.get_device_name() if device == "cuda" else
               f"{cpu_name()}, {threads} thread{'s' * (threads > 1)}")
    header = (f"ours vs transformers {transformers.__version__} (LlamaForCausalLM, SDPA) on {machine}, torch "
              f"{torch.__version__}, fp32, AdamW, eager unless compiled; best of {bench.repeats} rounds "
              f"({bench.steps} training steps each, the two sides alternating step by step; "
              f"{bench.decode_tokens} new tokens per row)")
    command = " ".join(["llm-bench", *_task_overrides()])
    lines = [header, "", *peer_table(rows), "", f"`{command}`"]
    split = split_table(rows)
    if split:
        lines += ["", "Where an eager training step's time goes (ms per step, torch's profiler, 3 steps each): the "
                  "matmuls, attention kernel, the loop's loss and the optimizer are the same calls on both sides; "
                  "the bound is transformers' step over our shared part, the most ours / transformers could reach "
                  "if our other ops cost nothing.", "", *split]
    (out_dir / "bench_peer.json").write_text(json.dumps({"header": header, "command": command, "rows": rows},
                                                        indent=2) + "\n")
    (out_dir / "bench_peer.md").write_text("\n".join(lines) + "\n")
    _output(lines)
    log.info(f"written: {out_dir / 'bench_peer.json'}, {out_dir / 'bench_peer.md'} (the table to paste)")


def _mfu(bench: BenchSettings, out_dir: Path) -> None:
    """bench.mfu: one real llm-train run (bench.train, then this command line's other overrides)
    and the Markdown block of its tokens/s and MFU (see `llm.bench.mfu`)."""
    from llm.bench.mfu import markdown, mfu_run

    from hydra.core.hydra_config import HydraConfig

    # llm-train composes the same groups (bench=gpu chooses them), then bench.train's values and the command line's
    choices = [f"{group}={option}" for group, option in HydraConfig.get().runtime.choices.items()
               if option is not None and group != "bench" and not group.startswith(("hydra", "schema"))]
    overrides = [*bench.train, *(o for o in _task_overrides() if not o.startswith(("bench", "hydra.")))]
    row = mfu_run(overrides, bench.steps, bench.warmup, out_dir, choices)
    command = " ".join(["llm-bench", *_task_overrides()])
    lines = markdown(row, command)
    (out_dir / "bench_mfu.json").write_text(json.dumps(row, indent=2) + "\n")
    (out_dir / "bench_mfu.md").write_text("\n".join(lines) + "\n")
    _output(lines)
    log.info(f"written: {out_dir / 'bench_mfu.json'}, {out_dir / 'bench_mfu.md'} (the block to paste)")


def _output(lines: list[str]) -> None:
    """The benchmark's table: the command's output, on stdout after a blank line (not a log message)."""
    sys.stdout.write("\n" + "\n".join(lines) + "\n")
    sys.stdout.flush()


def _choice(group: str) -> Optional[str]:
    """The option chosen for a config group (model=tiny: "tiny"), or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def main() -> None:
    ENTRY.run(_app)


if __name__ == "__main__":
    main()
