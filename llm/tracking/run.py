"""The run: one id ties together the run directory, checkpoints, resolved config and W&B run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf


GROUPS = ("tokenizer", "model", "attention", "position", "data", "optim", "schedule", "trainer",
          "budget", "parallelism", "posttrain", "logger", "experiment")


def run_id(run_dir: Path, runs_dir: Path) -> str:
    """The run directory relative to the runs root, with '/' -> '-' (a valid W&B id)."""
    try:
        rel = run_dir.resolve().relative_to(runs_dir.resolve())
    except ValueError:
        rel = Path(run_dir.name)
    return "-".join(rel.parts)


def group_choices(cfg: DictConfig | None = None) -> dict[str, str]:
    """The option chosen in every config group (from Hydra), e.g. {'attention': 'gqa', ...}."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except (ValueError, ImportError):
        return {}
    return {g: str(choices[g]) for g in GROUPS if g in choices and choices[g] is not None}


def git_state(root: Path) -> dict[str, Any]:
    """Commit and dirty flag of the code that runs: the repository holding this package (a source
    checkout), else the one at `root` (where llm-train started), else {}."""
    for where in (Path(__file__).resolve().parent, root):
        state = _git_state(where)
        if state:
            return state
    return {}


def _git_state(where: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": dirty} if commit else {}


def resolved_config(cfg: DictConfig, resolve: bool = True) -> dict:
    """The run's config as plain data, without Hydra's own `hydra` node. Resolved, it is also
    redacted: an `${oc.env:...}` interpolation must not copy a secret into config.yaml or W&B."""
    config = {k: OmegaConf.to_container(cfg[k], resolve=resolve) if OmegaConf.is_config(cfg[k]) else cfg[k]
              for k in cfg if k != "hydra"}
    return redact_secrets(config) if resolve else config


REDACTED = "<redacted>"
# Key names that hold credentials (`hf_token`, `wandb_api_key`, ...), not `flops_per_token` or `max_new_tokens`.
_SECRET_KEY = re.compile(r"^token$|(^|_)(api_?key|secret|secret_key|private_key|password|passwd|access_token|auth_token|"
                         r"hf_token)$", re.I)
_SECRET_ENV = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD)", re.I)


def secret_values() -> list[str]:
    """Values of environment variables named like credentials (WANDB_API_KEY, HF_TOKEN, ...)."""
    return [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8]


def redact_secrets(data: Any, secrets: list[str] | None = None) -> Any:
    """A copy of `data` with credentials replaced by "<redacted>": values of keys named like
    credentials, and any string containing the value of a credential environment variable. An
    unresolved interpolation (`${oc.env:HF_TOKEN}`) names where a secret is, not the secret: kept."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(data, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") and not _is_interpolation(v)
                else redact_secrets(v, secrets) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_secrets(v, secrets) for v in data)
    if isinstance(data, str):
        key, is_override, value = data.partition("=")  # a command-line override: `+data.corpus.hf_token=...`
        if is_override and _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and not _is_interpolation(value.strip("'\"")):
            return f"{key}={REDACTED}"
        for secret in secrets:
            data = data.replace(secret, REDACTED)
    return data


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${") and value.endswith("}") and "\n" not in value


def redact_yaml_files(directory: Path) -> None:
    """Rewrite the YAML files Hydra wrote for a job (.hydra/config.yaml, hydra.yaml with the
    command line, overrides.yaml) with credentials redacted, as every other file of a run is."""
    import yaml

    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # not Hydra's (or not whole): not ours to rewrite
        clean = redact_secrets(data)
        if clean != data:
            from llm.files import write_text

            write_text(path, yaml.safe_dump(clean, sort_keys=False))


@contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv with credentials redacted while a library records it (W&B's run metadata keeps
    the command line as `args`)."""
    saved = sys.argv
    sys.argv = [saved[0], *redact_secrets(list(saved[1:]))]
    try:
        yield
    finally:
        sys.argv = saved
