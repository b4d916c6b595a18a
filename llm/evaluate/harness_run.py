"""The path `llm-eval harness` takes: check the settings -> write the built-in tasks' harness
folder (builtin=[...]) -> load the checkpoint -> lm-evaluation-harness on our model (the `llm`
harness model) and, with compare_hf=<folder>, on a transformers folder through the harness's own
`hf` model -> a table, harness.json, eval/<task>/<metric> in the run's metrics.jsonl, W&B.

lm_eval is imported only once everything is checked, so a bad setting is refused at once."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from llm import fields
from llm.config import ConfigError
from llm.evaluate.options import EVAL_LOGGERS, TokenizerKey, collect, typed_settings
from llm.fields import at_least

log = logging.getLogger(__name__)


@dataclass
class HarnessSettings:
    """The keys of conf/eval_harness.yaml (see there for what each does)."""

    checkpoint: Optional[str] = None
    tokenizer: TokenizerKey = field(default_factory=TokenizerKey)
    tasks: list[str] = field(default_factory=list)
    builtin: list[str] = field(default_factory=list)
    builtin_questions: int = at_least(1, 64)
    builtin_choices: int = at_least(2, 4)
    include_path: Optional[str] = None
    limit: Optional[int] = at_least(1, None, null="for every document")
    num_fewshot: Optional[int] = at_least(0, None, null="for each task's own")
    batch_size: int = at_least(1, 16)
    compare_hf: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    out_dir: Optional[str] = None
    log_metrics: bool = True


@dataclass
class HarnessPlan:
    settings: HarnessSettings
    checkpoint: Any  # CheckpointRef
    tokenizer: Path
    builtin_knobs: dict[str, Any]  # the run's data=tasks knobs, seed and val_fraction, else {}
    wandb_mode: Optional[str]

    @property
    def out_dir(self) -> Path:
        s, ref = self.settings, self.checkpoint
        return Path(s.out_dir).expanduser() if s.out_dir else (ref.run_dir or ref.path.parent)


def _builtin_knobs(ref: Any, cfg: DictConfig) -> dict[str, Any]:
    """A data=tasks run's own task knobs, seed and val_fraction: its held-out prompts are the questions."""
    from llm.evaluate.evaluation import saved_run_config

    try:
        saved = saved_run_config(ref, cfg)
    except (KeyError, ConfigError):  # a run.json without its config: the default knobs
        return {}
    corpus = OmegaConf.select(saved, "data.corpus") if saved is not None else None
    if corpus is None or not str(corpus.get("_target_", "")).endswith("tasks.TaskCorpus"):
        return {}
    corpus = OmegaConf.to_container(corpus, resolve=True)
    return {"knobs": corpus.get("tasks") or {}, "seed": int(corpus.get("seed", 0)),
            "val_fraction": float(corpus.get("val_fraction", 0.1))}


def plan_harness(cfg: DictConfig) -> HarnessPlan:
    """Every setting checked, all problems at once, before lm_eval or a model is loaded."""
    from llm.checkpoint import resolve, tokenizer_file
    from llm.data.tasks import TASKS
    from llm.interop.hf import check_hf_folder

    s: HarnessSettings = typed_settings(cfg, HarnessSettings)
    problems = fields.problems(s)
    if cfg.logger.kind not in EVAL_LOGGERS:
        problems.append(f"logger={cfg.logger.kind}: allowed: {' | '.join(EVAL_LOGGERS)}")
    if not s.tasks and not s.builtin:
        problems.append("tasks=[], builtin=[]: nothing to evaluate; name harness tasks (tasks=[hellaswag] or "
                        "tasks of include_path=<folder of task YAMLs>) or built-in ones (builtin=[addition,copying])")
    unknown = [t for t in s.builtin if t not in TASKS]
    if unknown:
        problems.append(f"builtin={unknown}: unknown built-in task(s); allowed: {', '.join(TASKS)}")
    if s.include_path is not None and not Path(s.include_path).expanduser().is_dir():
        problems.append(f"include_path={s.include_path!r}: no such folder; give a folder of harness task YAMLs")
    if s.compare_hf is not None:
        collect(problems, check_hf_folder, Path(s.compare_hf).expanduser(), "compare_hf")
    ref = collect(problems, resolve, s.checkpoint, cfg.paths.runs_dir, "checkpoint")
    if ref is not None and ref.kind == "hf":
        collect(problems, check_hf_folder, ref.path, "checkpoint")
    tok_path = collect(problems, tokenizer_file, ref, s.tokenizer.path) if ref else None
    wandb_mode = None
    if cfg.logger.kind == "wandb":
        from llm.tracking.wandb import resolve_mode

        wandb_mode = collect(problems, resolve_mode, cfg.logger.mode)
    if problems:
        raise ConfigError(problems)
    return HarnessPlan(s, ref, tok_path, _builtin_knobs(ref, cfg) if s.builtin else {},
                       None if wandb_mode == "disabled" else wandb_mode)


def run_harness(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the checkpoint on harness tasks as the config says; returns the report also
    written to harness.json."""
    plan = plan_harness(cfg)
    s, ref = plan.settings, plan.checkpoint
    if s.builtin and not s.tasks:  # local files only: no hub round trip for the dataset builder
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.time()
    tasks, include = list(s.tasks), s.include_path
    if s.builtin:
        from llm.evaluate.harness_tasks import write_builtin_tasks

        k = plan.builtin_knobs
        folder = Path(cfg.paths.cache_dir) / "harness_tasks" / (ref.run_id or ref.path.stem)
        tasks += write_builtin_tasks(folder, s.builtin, k.get("knobs"), s.builtin_questions, s.builtin_choices,
                                     k.get("seed", 0), k.get("val_fraction", 0.1))
        include = [str(folder)] + ([include] if include else [])

    from llm.evaluate import harness  # lm_eval: only now

    lm = harness.HarnessLM(checkpoint=str(ref.path), tokenizer_path=str(plan.tokenizer), batch_size=s.batch_size,
                           device=s.device, seed=s.seed)
    results = {"llm": harness.scores(harness.evaluate(lm, tasks, include, s.limit, s.num_fewshot, seed=s.seed))}
    if s.compare_hf is not None:
        from lm_eval.models.huggingface import HFLM

        hf = HFLM(pretrained=str(Path(s.compare_hf).expanduser()), device=str(lm.model.embed.weight.device),
                  batch_size=s.batch_size, dtype="float32")
        results["hf"] = harness.scores(harness.evaluate(hf, tasks, include, s.limit, s.num_fewshot, seed=s.seed))
    metrics = harness.flat_scores(results["llm"])
    report = {"checkpoint": str(ref.path), "run_dir": str(ref.run_dir) if ref.run_dir else None,
              "run_id": ref.run_id, "step": ref.step, "device": str(lm.model.embed.weight.device),
              "settings": dataclasses.asdict(s), "tasks": tasks, "results": results, "metrics": metrics,
              "seconds": round(time.time() - started, 2)}
    if "hf" in results:
        report["max_abs_difference"] = max_difference(results["llm"], results["hf"])
    publish(report, plan, cfg.logger)
    return report


def max_difference(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> float:
    """The largest |a - b| over the metrics both have (relative for perplexities, which are exponentials)."""
    worst = 0.0
    for task, metrics in a.items():
        for metric, value in metrics.items():
            other = b.get(task, {}).get(metric)
            if other is not None and math.isfinite(value) and math.isfinite(other):
                scale = max(1.0, abs(value)) if "perplexity" in metric else 1.0
                worst = max(worst, abs(value - other) / scale)
    return worst


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per task and metric, one column per model."""
    rows = [(task, metric) for task, metrics in next(iter(results.values())).items() for metric in metrics]
    width = max([24, *(len(t) + 2 for t, _ in rows)])
    lines = [f"{'task':{width}}{'metric':18}" + "".join(f"{name:>14}" for name in results)]
    for task, metric in rows:
        cells = [results[name].get(task, {}).get(metric) for name in results]
        lines.append(f"{task:{width}}{metric:18}" + "".join(_cell(v) for v in cells))
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    """A 14-wide column: 4 decimals, or scientific where that would not fit (word perplexities of an
    untrained model reach 1e12)."""
    if value is None:
        return "-".rjust(14)
    return f"{value:14.4f}" if abs(value) < 1e8 else f"{value:14.6e}"


def publish(report: dict[str, Any], plan: HarnessPlan, logger: DictConfig) -> None:
    """Print the table, write harness.json, append the metrics to the run's metrics.jsonl, log to W&B."""
    from llm.evaluate.report import append_metrics, log_wandb
    from llm.files import write_json
    from llm.run.layout import RunDir

    ref, metrics, step = plan.checkpoint, report["metrics"], report["step"]
    lines = [f"lm-evaluation-harness on {ref.path} (step {step})", table(report["results"])]
    if "max_abs_difference" in report:
        lines.append(f"llm vs hf ({plan.settings.compare_hf}): largest difference {report['max_abs_difference']:.2e} "
                     "(relative for perplexities)")
    sys.stdout.write("\n".join(lines) + "\n")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.out_dir / "harness.json", report)
    log.info(f"written: {plan.out_dir / 'harness.json'}")
    if plan.settings.log_metrics and ref.run_dir is not None and metrics:
        append_metrics(RunDir(ref.run_dir).metrics, step, metrics)
        log.info(f"metrics: {len(metrics)} eval/<task>/<metric> -> {RunDir(ref.run_dir).metrics} (step {step})")
    if plan.wandb_mode is not None:
        log_wandb(logger, plan.wandb_mode, ref.run_id, plan.out_dir, step, metrics,
                  {"checkpoint": str(ref.path), "step": step, "settings": report["settings"], "tasks": report["tasks"]})
