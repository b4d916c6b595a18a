"""`llm-bench <overrides>`: tokens/s, MFU and memory of a config's training step, against a bare
PyTorch loop over the same model and batches in the same process.

  llm-bench                       # the default CPU model
  llm-bench model=small bench.steps=10
  llm-bench bench.parallel=[ddp,fsdp]   # 2-process DDP and FSDP runs against single
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import llm.config  # noqa: F401  (registers the schemas)
from llm.cli.common import CONFIG_ERROR_EXIT_CODE, config_error_in, setup
from llm.cli.generate import HydraEntry
from llm.cli.train import CONF_DIR
from llm.fields import at_least

setup()
log = logging.getLogger("llm.cli.bench")  # not __name__: that is __main__ under `python -m`
ENTRY = HydraEntry()


@dataclass
class BenchSettings:
    """The `bench` keys of conf/bench.yaml, typed and ranged like every other group."""

    steps: int = at_least(1, 20, high=10**6)
    warmup: int = at_least(0, 3, high=10**6)
    repeats: int = at_least(1, 3, high=1000)
    parallel: list[str] = field(default_factory=list)


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
