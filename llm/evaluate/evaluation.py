"""The path `llm-eval` takes: check every setting -> load the checkpoint and its tokenizer ->
perplexity on the held-out split and/or task accuracy, for the model and (quantize=int8|int4) its
weight-only quantised copy, side by side with weight bytes and tokens/s -> table, eval.json, the
run's metrics.jsonl, W&B."""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from llm.checkpoint import CheckpointRef, load_network, load_tokenizer, resolve, tokenizer_file
from llm.config import ConfigError
from llm.config.validate import check_target, missing_keys
from llm.evaluate.completion import Completer, DecodeSettings
from llm.evaluate.device import resolve_device
from llm.evaluate.options import EvalSettings, check_eval, collect, typed_settings
from llm.evaluate.perplexity import HeldOut, held_out, perplexity
from llm.evaluate.report import append_metrics, flat_metrics, log_wandb, table, write_eval_json
from llm.evaluate.tasks import Task, read_tasks, task_accuracy
from llm.interop.hf import check_hf_folder
from llm.generate.decode import ABSOLUTE_POSITIONS
from llm.evaluate.speed import throughput
from llm.generate.quantize import model_bytes, quantize
from llm.tracking.samples import SampleLog
from llm.run.layout import RunDir
from llm.run.resume import read_run_file

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8  # batch size when neither batch_size nor a run's data.micro_batch_size says


def saved_run_config(ref: CheckpointRef, cfg: DictConfig) -> Optional[DictConfig]:
    """The run's own config (run.json, unresolved), with this command's paths for interpolations."""
    if ref.run_dir is None or not RunDir(ref.run_dir).run_file.is_file():
        return None
    # A run.json is data on disk: read as resume= reads it (only the config groups' targets are built).
    saved = OmegaConf.create(read_run_file(RunDir(ref.run_dir), "checkpoint", str(ref.run_dir))["config"])
    saved.paths = cfg.paths
    return saved


def data_corpus(cfg: DictConfig, saved: Optional[DictConfig]) -> DictConfig:
    """The corpus to evaluate on, resolved: data=<option> when chosen, else the run's own."""
    if cfg.get("data") is not None:
        node = cfg.data.get("corpus")
    elif saved is not None and OmegaConf.select(saved, "data.corpus") is not None:
        node = saved.data.corpus
    elif saved is not None and OmegaConf.select(saved, "data.sources"):
        # A mixture's validation is per source (val/loss/<source> in the run's metrics); here, one corpus.
        names = ", ".join(str(k) for k in saved.data.sources)
        raise ConfigError([f"data: the run trained on a mixture (data.sources: {names}); llm-eval measures one corpus: "
                           "choose it with a data option as llm-train takes it, e.g. data=stdlib, and its settings"])
    else:
        raise ConfigError(["data: the checkpoint has no run.json to take its data config from; choose one of "
                           "llm-train's data options: data=stdlib | data=text data.corpus.paths=... | data=hf ... | "
                           "data=synthetic"])
    if node is None:
        raise ConfigError(["data.corpus: missing (the data option defines no corpus)"])
    problems = [f"data.corpus.{k}: required but not set (`???`); give it: data.corpus.{k}=..."
                for k in missing_keys(node)]
    problems += check_target(node, "data.corpus")
    if problems:
        raise ConfigError(problems)
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


def _run_setting(saved: Optional[DictConfig], key: str) -> Optional[int]:
    value = OmegaConf.select(saved, key, default=None) if saved is not None else None
    return int(value) if value is not None else None


@dataclass
class EvalPlan:
    """Everything llm-eval will do, checked, with nothing loaded yet."""

    settings: EvalSettings
    checkpoint: CheckpointRef
    tokenizer: Path
    corpus: Optional[DictConfig]  # resolved `_target_` node of the corpus; None: no perplexity
    tasks: Optional[list[Task]]
    seq_len: Optional[int]  # None: the model's max_seq_len
    batch_size: int
    wandb_mode: Optional[str]  # None: no W&B

    @property
    def out_dir(self) -> Path:
        s, ref = self.settings, self.checkpoint
        return Path(s.out_dir).expanduser() if s.out_dir else (ref.run_dir or ref.path.parent)


def plan_eval(cfg: DictConfig) -> EvalPlan:
    """Check every setting (all problems at once, as one ConfigError) before anything is loaded."""
    s: EvalSettings = typed_settings(cfg, EvalSettings)
    problems = check_eval(s, cfg.logger.kind)
    ref: Optional[CheckpointRef] = collect(problems, resolve, s.checkpoint, cfg.paths.runs_dir, "checkpoint")
    if ref is not None and ref.kind == "hf":  # its config.json and tokenizer, before any weights
        collect(problems, check_hf_folder, ref.path, "checkpoint")
    tok_path = collect(problems, tokenizer_file, ref, s.tokenizer.path) if ref else None
    saved = saved_run_config(ref, cfg) if ref else None
    corpus = collect(problems, data_corpus, cfg, saved) if ref and s.perplexity else None
    tasks = None
    if s.tasks_file is not None and Path(s.tasks_file).expanduser().is_file():
        tasks = collect(problems, read_tasks, s.tasks_file)
    wandb_mode = None
    if cfg.logger.kind == "wandb":
        from llm.tracking.wandb import resolve_mode

        wandb_mode = collect(problems, resolve_mode, cfg.logger.mode)
    if problems:
        raise ConfigError(problems)
    return EvalPlan(
        settings=s, checkpoint=ref, tokenizer=tok_path, corpus=corpus, tasks=tasks,
        seq_len=s.seq_len or _run_setting(saved, "data.seq_len"),
        batch_size=s.batch_size or _run_setting(saved, "data.micro_batch_size") or DEFAULT_BATCH,
        wandb_mode=None if wandb_mode == "disabled" else wandb_mode,
    )


def measure(model: nn.Module, tokenizer: Tokenizer, plan: EvalPlan, batches: list[Tensor],
            heldout: Optional[HeldOut], samples: Optional[list[dict]] = None) -> dict[str, float]:
    """One model's numbers: weight bytes, perplexity on the batches, task accuracy (its
    completions are appended to `samples`)."""
    s = plan.settings
    values: dict[str, float] = {"model_bytes": float(model_bytes(model))}
    if heldout is not None:
        values.update(perplexity(model, batches, heldout.tokens_per_byte).metrics())
    if plan.tasks is not None:
        settings = DecodeSettings(strategy="greedy", max_new_tokens=s.task_max_new_tokens, stop=list(s.task_stop),
                                  add_bos=s.add_bos, batch_size=plan.batch_size)
        accuracy = task_accuracy(Completer(model, tokenizer, settings), plan.tasks)
        values.update(accuracy.metrics())
        if samples is not None:
            samples.extend(accuracy.samples)
    return values


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the checkpoint as the config says; returns the report also written to eval.json."""
    plan = plan_eval(cfg)
    s, ref = plan.settings, plan.checkpoint
    started = time.time()
    device = resolve_device(s.device)
    tokenizer = load_tokenizer(plan.tokenizer)
    model = load_network(ref, device, value_head=False)
    seq_len = plan.seq_len or model.cfg.max_seq_len
    problems = []
    if model.cfg.position.kind in ABSOLUTE_POSITIONS and seq_len > model.cfg.max_seq_len:
        problems.append(f"seq_len={seq_len}: longer than the model's max_seq_len={model.cfg.max_seq_len} "
                        f"({model.cfg.position.kind} positions end there); allowed: <= {model.cfg.max_seq_len}")
    if plan.tasks is not None:
        settings = DecodeSettings(max_new_tokens=s.task_max_new_tokens, add_bos=s.add_bos)
        problems += Completer(model, tokenizer, settings).prompt_problems([t.prompt for t in plan.tasks], "tasks_file")
    if problems:
        raise ConfigError(problems)

    heldout, batches, data = None, [], None
    if plan.corpus is not None:
        heldout = held_out(instantiate(plan.corpus), tokenizer, cfg.paths.cache_dir)
        batches = heldout.batches(seq_len, plan.batch_size, s.max_batches)
        data = {"corpus": heldout.corpus, "split": "val", "config": OmegaConf.to_container(plan.corpus),
                "seq_len": seq_len, "batch_size": plan.batch_size, "batches": len(batches),
                "split_tokens": heldout.n_tokens, "split_bytes": heldout.n_bytes,
                "tokens_per_byte": heldout.tokens_per_byte}
    models = {"fp32": model}
    if s.quantize != "none":  # a copy, on the same device: both are measured alike
        models[s.quantize] = quantize(copy.deepcopy(model), s.quantize)
    samples: list[dict] = []  # the task completions of the fp32 model
    results = {name: measure(variant, tokenizer, plan, batches, heldout, samples if name == "fp32" else None)
               for name, variant in models.items()}
    if s.speed_repeats:
        for name, rates in throughput(models, batches[0] if batches else None, s.speed_new_tokens,
                                      s.speed_repeats).items():
            results[name].update(rates)

    step = ref.step
    report: dict[str, Any] = {
        "checkpoint": str(ref.path), "run_dir": str(ref.run_dir) if ref.run_dir else None, "run_id": ref.run_id,
        "step": step, "device": str(device), "settings": dataclasses.asdict(s), "data": data,
        "tasks": {"file": s.tasks_file, "count": len(plan.tasks)} if plan.tasks is not None else None,
        "results": results, "metrics": flat_metrics(results), "seconds": round(time.time() - started, 2),
    }
    if s.quantize != "none":
        report[f"{s.quantize}_vs_fp32"] = _change(results["fp32"], results[s.quantize])
    publish(report, plan, cfg.logger, samples)
    return report


def publish(report: dict[str, Any], plan: EvalPlan, logger: DictConfig, samples: Optional[list[dict]] = None) -> None:
    """Print the table, write eval.json, append the metrics to the run's metrics.jsonl, log to W&B;
    task completions go to samples.jsonl beside eval.json (and a W&B Table)."""
    ref, results, metrics, step = plan.checkpoint, report["results"], report["metrics"], report["step"]
    data = report["data"]
    where = (f"{data['corpus']}/val, {data['batches']} batches of {data['batch_size']} x {data['seq_len']} tokens"
             if data else "tasks only")
    # The table is the command's output (stdout); what was written where are messages (logging).
    lines = [f"eval of {ref.path} (step {step}) on {where}", table(results)]
    scheme = plan.settings.quantize
    if scheme != "none":
        change, fp32, quant = report[f"{scheme}_vs_fp32"], results["fp32"], results[scheme]
        if "ppl" in fp32:
            lines.append(f"{scheme} vs fp32: perplexity {fp32['ppl']:.4f} -> {quant['ppl']:.4f} "
                         f"({change['ppl_change']:+.4%}), loss {change['loss_delta']:+.2e} nats/token")
        lines.append(f"{scheme} vs fp32: weights {fp32['model_bytes'] / 2**20:.3f} MiB -> "
                     f"{quant['model_bytes'] / 2**20:.3f} MiB ({change['bytes_ratio']:.2f}x smaller)")
        if "decode_speedup" in change:
            lines.append(f"{scheme} vs fp32: tokens/s x{change['decode_speedup']:.2f} decoding"
                         + (f", x{change['forward_speedup']:.2f} forward" if "forward_speedup" in change else "")
                         + f" (best of {plan.settings.speed_repeats}, {report['device']})")
    sys.stdout.write("\n".join(lines) + "\n")
    log.info(f"written: {write_eval_json(plan.out_dir, report)}")
    if plan.settings.log_metrics and ref.run_dir is not None and metrics:
        append_metrics(RunDir(ref.run_dir).metrics, step, metrics)
        log.info(f"metrics: {', '.join(metrics)} -> {RunDir(ref.run_dir).metrics} (step {step})")
    sample_log = SampleLog(plan.out_dir, key="eval/samples") if samples else None
    if plan.wandb_mode is not None:
        log_wandb(logger, plan.wandb_mode, ref.run_id, plan.out_dir, step, metrics,
                  {"checkpoint": str(ref.path), "step": step, "settings": report["settings"], "data": data},
                  while_open=(lambda: sample_log.log(step, samples, force=True)) if sample_log else None)
    elif sample_log:
        sample_log.log(step, samples, force=True)
    if sample_log:
        log.info(f"samples: {len(samples)} task completions -> {sample_log.path}")


def _change(fp32: dict[str, float], quant: dict[str, float]) -> dict[str, float]:
    """How the quantised copy differs: loss and perplexity deltas, relative perplexity, weight
    memory, speed-ups (its tokens/s over fp32's)."""
    out = {"bytes_ratio": fp32["model_bytes"] / quant["model_bytes"]}
    if "loss" in fp32:
        out.update(loss_delta=quant["loss"] - fp32["loss"], ppl_delta=quant["ppl"] - fp32["ppl"],
                   ppl_change=quant["ppl"] / fp32["ppl"] - 1)
    if "accuracy" in fp32:
        out["accuracy_delta"] = quant["accuracy"] - fp32["accuracy"]
    for kind in ("decode", "forward"):
        if f"{kind}_tokens_per_s" in fp32:
            out[f"{kind}_speedup"] = quant[f"{kind}_tokens_per_s"] / fp32[f"{kind}_tokens_per_s"]
    return out
