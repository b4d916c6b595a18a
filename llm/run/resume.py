"""Continuing a run: its own config from run.json, with this command line's plain key overrides
on top (e.g. budget.steps to extend it). Changing a group of an existing run is refused.

run.json is data on disk that someone else may have written: it may only build the exact
`_target_`s the config groups define (or one the command line names again), and its redacted
credentials must be given again. A resumed run keeps its tokenizer.json, and refuses a corpus
that changed unless told `resume_new_data=true`. Hyperparameters given on the command line take
effect: the optimizer's are applied over the ones Lightning restored from the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Optional

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from llm.config import ConfigError
from llm.files import InputError, read_input_json
from llm.run.layout import RUN_FILE, RunDir
from llm.tracking.run import GROUPS, REDACTED

log = logging.getLogger(__name__)


def command_line_overrides() -> list[str]:
    """This job's command-line overrides, as Hydra parsed them ([] outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@functools.lru_cache(maxsize=1)
def known_targets() -> frozenset[str]:
    """Every `_target_` an option of a config group defines (conf/**/*.yaml and the typed schemas):
    all that a config read back from disk may build."""
    from llm.config.schema import TARGET_SCHEMAS
    from llm.resources import conf_dir

    pattern = re.compile(r"^\s*_target_:\s*['\"]?([\w.]+)", re.M)
    found = {m for path in conf_dir().rglob("*.yaml") for m in pattern.findall(path.read_text(encoding="utf-8"))}
    return frozenset(found | set(TARGET_SCHEMAS))


def read_run_file(run_dir: RunDir, key: str = "resume", value: Any = None, trusted: tuple[str, ...] = ()) -> dict:
    """run.json of a run directory: its unresolved config, group choices and overrides. Its
    `_target_`s must be ones the config groups define, or in `trusted` (named on this command line)."""
    if not run_dir.run_file.is_file():
        raise ConfigError([f"{key}={value!r}: {run_dir.path} is not a run directory (no {RUN_FILE})"])
    fix = "the run's config is unknown; start a new run"
    try:
        saved = read_input_json(run_dir.run_file, f"{key}={value!r}", fix)
    except InputError as e:
        raise ConfigError([str(e).replace(f"{RUN_FILE} ", f"{RUN_FILE} is damaged: it ", 1)]) from e
    if not isinstance(saved.get("config"), dict) or not isinstance(saved.get("choices"), dict):
        raise ConfigError([f"{key}={value!r}: {run_dir.run_file} is damaged (no config or choices in it); {fix}"])
    allowed = known_targets() | set(trusted)
    refused = [(k, target) for k, target in _targets(saved["config"]) if target not in allowed]
    if refused:
        raise ConfigError([f"{k}._target_={target!r} (in {run_dir.run_file}): a config read from a run directory may "
                           "only build the targets the config groups define; refused (if you trust it, give it again "
                           f"on the command line: {k}._target_={target})" for k, target in refused])
    return saved


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The resumed run's config (its run.json with `overrides` applied) and its run.json."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed_overrides = [parser.parse_override(o) for o in overrides]  # typed values, as Hydra parses them
    trusted = tuple(str(p.value()) for p in parsed_overrides if p.key_or_group.endswith("._target_"))
    saved = read_run_file(RunDir(cfg.paths.run_dir), "resume", cfg.resume, trusted)
    merged = OmegaConf.create(saved["config"])
    for parsed in parsed_overrides:
        key = parsed.key_or_group
        value = None if parsed.is_delete() else parsed.value()
        if key == "resume" or key.startswith("hydra."):
            continue
        is_group = key in GROUPS
        if is_group and saved["choices"].get(key) == value:
            continue  # the run's own choice, repeated (a requeued job runs its command line again)
        if key.startswith("tokenizer.") and OmegaConf.select(merged, key, default=None) != value:
            raise ConfigError([f"{key}={value}: a resumed run keeps the tokenizer its model was trained with "
                               f"({RunDir(cfg.paths.run_dir).tokenizer}); start a new run to change it"])
        if is_group:
            raise ConfigError([f"{key}={value}: a resumed run keeps its groups (it chose {key}="
                               f"{saved['choices'].get(key)!r}); start a new run to change it"])
        OmegaConf.update(merged, key, value, force_add=False)
    redacted = [k for k, v in _leaves(OmegaConf.to_container(merged, resolve=False)) if v == REDACTED]
    if redacted:
        raise ConfigError([f"{k}: a credential, redacted from {RUN_FILE}; give it again on the command line "
                           f"({k}=...), or set it to an environment variable: {k}='${{oc.env:NAME}}'" for k in redacted])
    merged.resume = cfg.resume
    merged.paths = cfg.paths
    merged.resume_new_data = cfg.get("resume_new_data", False)
    return merged, saved


def check_same_data(run_dir: RunDir, facts: dict[str, Any], tokenizer: Any, allow_new: bool) -> None:
    """A resumed run trains on the data and tokenizer it started with: ConfigError saying what
    changed (the corpus's fingerprint, the tokenizer's vocabulary) unless `allow_new`."""
    changed = []
    try:
        before = read_input_json(run_dir.summary, "resume")
    except InputError:
        before = {}  # killed before its first summary: nothing recorded to compare
    old, new = before.get("data_fingerprint"), facts.get("data_fingerprint")
    if old is not None and new is not None and old != new:
        changed.append(f"the corpus changed (its fingerprint was {old}, now {new})")
    if run_dir.tokenizer.is_file():
        from llm.tokenizer import Tokenizer

        try:
            same = Tokenizer.load(run_dir.tokenizer).content_hash() == tokenizer.content_hash()
        except Exception:  # an unreadable tokenizer.json is a change too
            same = False
        if not same:
            changed.append(f"the tokenizer differs from the run's {run_dir.tokenizer}")
    if not changed or allow_new:
        for what in changed:
            log.warning(f"resume: {what}; continuing on the new data (resume_new_data=true)")
        return
    raise ConfigError([f"resume={str(run_dir.path)!r}: {what}; a resumed run continues on the data it trained on: "
                       "restore it, or give resume_new_data=true to continue on the new data (with the run's "
                       "own tokenizer)" for what in changed])


def refuse_spent_budget(run_dir: RunDir, step: int, steps: int) -> None:
    """A completed run resumed without more budget: say so instead of training zero steps."""
    try:
        status = read_input_json(run_dir.summary, "resume").get("status")
    except InputError:
        return
    if status == "completed" and step >= steps:
        raise ConfigError([f"resume={str(run_dir.path)!r}: the run already completed its budget ({step} of {steps} "
                           "steps); nothing to train. To train on, give a larger budget, e.g. "
                           f"budget.steps={2 * steps}"])


class ConfiguredHyperparameters(pl.Callback):
    """After Lightning restored a checkpoint's optimizer and scheduler, put back the optimizer
    settings this run was configured with (optim.lr, betas, eps, weight_decay): a value changed
    on `resume=` takes effect instead of being recorded and ignored. The schedule's multipliers
    are not restored (LambdaLR saves no functions): they follow this run's schedule already."""

    KEYS = ("betas", "eps")

    def __init__(self, optim: dict[str, Any]):
        self.optim = optim

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        for optimizer, scheduler in zip(trainer.optimizers, schedulers + [None] * len(trainer.optimizers)):
            changes = apply_hyperparameters(optimizer, scheduler, self.optim)
            for change in changes:
                log.info(f"resume: {change} takes effect from step {trainer.global_step}")


def apply_hyperparameters(optimizer: Any, scheduler: Optional[Any], optim: dict[str, Any]) -> list[str]:
    """Set `optim`'s lr, betas, eps and (on decayed groups) weight_decay on `optimizer` and its
    LambdaLR `scheduler`; returns what changed, as "optim.lr 0.003 -> 0.001"."""
    changes: dict[str, str] = {}
    for i, group in enumerate(optimizer.param_groups):
        for key in ConfiguredHyperparameters.KEYS:
            if key in optim and key in group and _differs(group[key], optim[key]):
                changes[key] = f"optim.{key} {_show(group[key])} -> {_show(optim[key])}"
                group[key] = tuple(optim[key]) if isinstance(group[key], tuple) else optim[key]
        decayed = bool(group.get("weight_decay"))  # groups without decay (norms, biases, embeddings) keep 0
        if "weight_decay" in optim and decayed and _differs(group["weight_decay"], optim["weight_decay"]):
            changes["weight_decay"] = f"optim.weight_decay {group['weight_decay']} -> {optim['weight_decay']}"
            group["weight_decay"] = optim["weight_decay"]
        if "lr" not in optim:
            continue
        base = scheduler.base_lrs[i] if scheduler is not None else group.get("initial_lr", group["lr"])
        if _differs(base, optim["lr"]):
            changes["lr"] = f"optim.lr {base} -> {optim['lr']}"
            group["initial_lr"] = optim["lr"]
            if scheduler is not None:
                scheduler.base_lrs[i] = optim["lr"]
                group["lr"] = optim["lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
                scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            else:
                group["lr"] = optim["lr"]
    return list(changes.values())


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return [float(x) for x in a] != [float(x) for x in b]
    return float(a) != float(b)


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), node)]


def _targets(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        found = [(prefix.rstrip("."), str(node["_target_"]))] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{prefix}{key}.")
        return found
    if isinstance(node, list):
        return [t for i, item in enumerate(node) for t in _targets(item, f"{prefix}{i}.")]
    return []
