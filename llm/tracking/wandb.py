"""Weights & Biases conventions, in one place, so every run is logged the same way.

- Mode: `auto` is online with credentials, else offline with one `wandb sync` line; never a login prompt.
- One W&B run per run, created on global rank 0 only; its id is the run id, so `resume=` continues it.
- Name: the run id and the architecture choices; group: the experiment (or, in a multirun without
  one, the sweep); job_type: the stage; tags: `group:option` for every config group.
- Config: the resolved Hydra config, `choice/<group>` keys, the command-line overrides and the
  derived facts (N, FLOPs per token, git commit and dirty flag, data fingerprint), with secrets redacted.
- Axes: `trainer/tokens` for train/*, val/*, perf/*, trainer/lr and guard/*; the summary of val/loss is its minimum.
- Checkpoints as artifacts (`logger.log_checkpoints`), and a later stage records its parent's as input.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger

from llm.config import ConfigError
from llm.files import InputError, read_input_json
from llm.tracking.loggers import uses
from llm.tracking.run import redact_secrets, redacted_argv

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "model"
# Metrics plotted against tokens seen; post-training and eval metrics against optimizer steps.
# (the learning rate and the loss guard's events too, so they line up with the loss)
TOKEN_AXIS_METRICS = ("train/*", "val/*", "perf/*", "data/epochs/*", "trainer/lr", "guard/*")
STEP_AXIS_METRICS = ("rewards/*", "logps/*", "logits/*", "objective/*", "eval/*", "samples/*")
NAME_GROUPS = ("model", "attention", "position", "posttrain")  # what the run name describes


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """auto -> online with credentials, else offline. Online without credentials is an error
    here, before any work, instead of a login prompt later."""
    env = os.environ.get("WANDB_MODE")
    if mode == "auto" and env in ("online", "offline", "disabled"):
        return env
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    if mode == "online" and not has_credentials():
        raise ConfigError(["logger.mode='online': no W&B credentials; run `wandb login`, set WANDB_API_KEY, "
                           "or use logger.mode=offline (sync later with `wandb sync`)"])
    return mode


# ---------------------------------------------------------------- naming

def wandb_id(run_id: str) -> str:
    """A valid W&B run id (letters, digits, '-', '_') for our run id."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_id)


def run_name(run_id: str, choices: dict[str, str]) -> str:
    """'<run id> tiny gqa rope' (and the post-training method when there is one)."""
    described = [choices[g] for g in NAME_GROUPS if g in choices and not (g == "posttrain" and choices[g] == "none")]
    return " ".join([run_id, *described])


def run_group(configured: Optional[str], run_dir: Path, runs_dir: Path) -> Optional[str]:
    """The configured group (by default the experiment name); in a multirun without one, the sweep:
    the run id of the sweep directory, so the jobs of one `llm-train -m` sit together."""
    if configured:
        return configured
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not inside a Hydra app
        return None
    if not multirun:
        return None
    from llm.tracking.run import run_id

    return run_id(run_dir.parent, runs_dir)


def run_tags(choices: dict[str, str], extra: list[str]) -> list[str]:
    return [*(f"{g}:{c}" for g, c in choices.items()), *extra]


def run_config(resolved: dict, choices: dict[str, str], overrides: list[str], facts: dict[str, Any]) -> dict:
    """What W&B's config gets: the resolved config, flat `choice/<group>` keys, the overrides and
    the derived facts, with credentials redacted."""
    return redact_secrets({**resolved, **{f"choice/{g}": c for g, c in choices.items()}, "overrides": list(overrides),
                           "derived": {k: v for k, v in facts.items() if k != "choices"}})


# ---------------------------------------------------------------- the run and the Lightning logger

def define_axes(run: Any) -> None:
    """Tokens and FLOPs as x-axes; the best validation loss as its summary."""
    for axis in ("trainer/global_step", "trainer/tokens", "trainer/flops"):
        run.define_metric(axis)
    for pattern in TOKEN_AXIS_METRICS:
        run.define_metric(pattern, step_metric="trainer/tokens")
    for pattern in STEP_AXIS_METRICS:
        run.define_metric(pattern, step_metric="trainer/global_step")
    run.define_metric("val/loss", summary="min")


def define_token_axis(run: Any, names: Iterable[str]) -> None:
    """Exact metric names plotted against trainer/tokens: in-training downstream evaluation
    (llm.tracking.downstream) logs eval/<task>/<metric>, which the eval/* glob puts on the step
    axis; an exact definition takes precedence over a glob."""
    for name in names:
        if not name.startswith("trainer/"):
            run.define_metric(name, step_metric="trainer/tokens")


def start_run(cfg: Any, run_id: str, run_dir: Path, job_type: str, name: str, group: Optional[str],
              tags: list[str], config: dict, mode: Optional[str] = None) -> Any:
    """`wandb.init` with our conventions (call on global rank 0 only). resume="allow": a resumed
    run directory continues the same W&B run."""
    import wandb

    mode = mode or resolve_mode(cfg.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    # reinit="finish_previous": a run left open by a failed job in this process is never reused.
    with redacted_argv():  # W&B records the command line as the run's `args`
        run = wandb.init(project=cfg.project, entity=cfg.entity, id=wandb_id(run_id), name=redact_secrets(name),
                         group=redact_secrets(group), job_type=job_type, tags=redact_secrets(tags),
                         notes=redact_secrets(cfg.notes), mode=mode, dir=str(run_dir), resume="allow",
                         config=redact_secrets(config), reinit="finish_previous")
    define_axes(run)
    if mode == "offline":
        log.info(f"W&B is offline; to upload this run later: {sync_command(run)}")
    return run


def sync_command(run: Any) -> str:
    """The command that uploads an offline run (its own offline-run-* directory)."""
    return f"wandb sync {Path(run.dir).parent}"


class AxesWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose every record carries its tokens and FLOPs, so validation
    points sit at the right x too (the stage logs them with the training metrics only)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if step is not None:  # Lightning's step counts from 0: steps done = step + 1
            tokens = (step + 1) * self.tokens_per_step
            metrics = {"trainer/tokens": tokens, "trainer/flops": tokens * self.flops_per_token, **metrics}
        super().log_metrics(metrics, step)


def wandb_logger(cfg: Any, run_id: str, run_dir: Path, job_type: str, choices: dict[str, str], config: dict,
                 runs_dir: Path, tokens_per_step: int, flops_per_token: float, rank_zero: bool = True) -> Any:
    """The logger of a run. Only global rank 0 starts a W&B run; on other ranks Lightning's
    logger never touches W&B (its `experiment` is a no-op there)."""
    axes = {"tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token}
    if not rank_zero:
        return AxesWandbLogger(**axes, project=cfg.project, id=wandb_id(run_id), save_dir=str(run_dir))
    run = start_run(cfg, run_id, run_dir, job_type, run_name(run_id, choices), run_group(cfg.group, run_dir, runs_dir),
                    run_tags(choices, list(cfg.tags)), config)
    return AxesWandbLogger(**axes, experiment=run, project=cfg.project, id=run.id, save_dir=str(run_dir))


def finish_run(failed: bool) -> None:
    """Close the active W&B run, also on failure, so the next job of a multirun never reuses it."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


# ---------------------------------------------------------------- checkpoints as artifacts and lineage

def artifact_name(run_id: str) -> str:
    """The artifact that holds a run's checkpoints (one version per saved checkpoint)."""
    return f"model-{wandb_id(run_id)}"


def log_checkpoint(run: Any, path: Path, run_id: str, step: int, metadata: Optional[dict] = None) -> Any:
    """Log a checkpoint file (or sharded checkpoint directory) as a version of the run's model
    artifact, with aliases `latest` and `step-<step>`."""
    import wandb

    artifact = wandb.Artifact(artifact_name(run_id), type=ARTIFACT_TYPE,
                              metadata={"run_id": run_id, "step": step, **(metadata or {})})
    if path.is_dir():
        artifact.add_dir(str(path), name=path.name)
    else:
        artifact.add_file(str(path), name=path.name)
    return run.log_artifact(artifact, aliases=["latest", f"step-{step}"])


class CheckpointArtifacts(Callback):
    """With `logger.log_checkpoints=true`: every checkpoint that `PeriodicCheckpoint` saves becomes
    an artifact version (rank 0). Put it after the PeriodicCheckpoint in the callback list, and call
    `log_saved` again after the final save."""

    def __init__(self, checkpoints: Any, run_id: str):
        self.checkpoints = checkpoints
        self.run_id = run_id
        self.logged_step = -1

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.log_saved(trainer)

    def log_saved(self, trainer: Any) -> None:
        import wandb

        from llm.run.layout import LAST

        step = self.checkpoints.saved_step
        if step <= self.logged_step or not trainer.is_global_zero or wandb.run is None:
            return
        self.logged_step = step
        log_checkpoint(wandb.run, self.checkpoints.dirpath / LAST, self.run_id, step,
                       {"stage": getattr(trainer.lightning_module, "stage", None)})


@dataclass(frozen=True)
class ParentCheckpoint:
    """Where a post-training stage starts from, and the W&B artifact that holds it."""

    run_id: str
    checkpoint: str
    step: int
    artifact: str  # [entity/]project/model-<run id>:step-<step>
    logged: bool  # whether the parent run logged its checkpoints as artifacts to W&B

    def as_config(self) -> dict:
        return {"run_id": self.run_id, "checkpoint": self.checkpoint, "step": self.step, "artifact": self.artifact}


def parent_checkpoint(checkpoint: str | Path, parent_run_dir: Optional[str | Path] = None) -> ParentCheckpoint:
    """The parent of a stage that starts from `checkpoint` (a file or sharded directory inside a run's
    checkpoints/ directory, or anywhere with `parent_run_dir` given). Reads the parent's run.json."""
    from llm.checkpoint import checkpoint_step
    from llm.run.layout import RunDir

    checkpoint = Path(checkpoint).resolve()
    run_dir = Path(parent_run_dir) if parent_run_dir else checkpoint.parent.parent
    run_file = RunDir(run_dir).run_file
    if not run_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no run.json in {run_dir}; give the parent's run directory")
    saved = read_input_json(run_file, "init_from", "give the parent's run directory")
    logger = (saved.get("config") or {}).get("logger") or {}
    if not isinstance(logger, dict) or not isinstance(saved.get("run_id"), str):
        raise InputError(f"init_from: {run_file} has no run_id or logger config: it was not written by llm-train")
    step = checkpoint_step(checkpoint)
    owner = "/".join(str(p) for p in (logger.get("entity"), logger.get("project")) if p)
    name = f"{artifact_name(saved['run_id'])}:step-{step}"
    return ParentCheckpoint(run_id=saved["run_id"], checkpoint=str(checkpoint), step=step,
                            artifact=f"{owner}/{name}" if owner else name,
                            logged=uses(logger, "wandb") and bool(logger.get("log_checkpoints")))


def use_parent_artifact(checkpoint: str | Path, parent_run_dir: Optional[str | Path] = None,
                        run: Any = None, key: str = "parent") -> ParentCheckpoint:
    """Record the parent checkpoint of this run (the active W&B run unless `run` is given): always
    under `key` in its config (`parent`; a distilled student's teacher: `teacher`); online, also as
    an input artifact, so W&B's lineage graph links the two runs. W&B can declare inputs only
    online; offline the config keeps the reference."""
    parent = parent_checkpoint(checkpoint, parent_run_dir)
    if run is None:
        import wandb

        run = wandb.run
    if run is None:  # not logging to W&B
        return parent
    run.config.update({key: parent.as_config()}, allow_val_change=True)
    if not parent.logged:
        log.warning(f"lineage: {key} run {parent.run_id} did not log its checkpoints (logger.log_checkpoints=false); "
                    "recorded in the config only")
    elif run.settings.mode == "offline":
        log.info(f"lineage: {key} artifact {parent.artifact} recorded in the config (W&B links inputs only online)")
    else:
        try:
            run.use_artifact(parent.artifact, type=ARTIFACT_TYPE)
        except Exception as e:  # e.g. the parent ran offline and was never synced
            log.warning(f"lineage: cannot use artifact {parent.artifact} ({type(e).__name__}: {e}); "
                        "recorded in the config only")
    return parent
