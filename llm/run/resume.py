"""Continuing a run: its own config from run.json, with this command line's plain key overrides
on top (e.g. budget.steps to extend it). Changing a group of an existing run is refused."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llm.config import ConfigError
from llm.run.layout import RUN_FILE, RunDir

# What a config read back from disk may instantiate: a crafted run.json must not run arbitrary code.
ALLOWED_TARGETS = ("llm.", "torch.", "pytorch_lightning.", "lightning.")


def command_line_overrides() -> list[str]:
    """This job's command-line overrides, as Hydra parsed them ([] outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def read_run_file(run_dir: RunDir, key: str = "resume", value: Any = None) -> dict:
    """run.json of a run directory: its unresolved config, group choices and overrides."""
    if not run_dir.run_file.exists():
        raise ConfigError([f"{key}={value!r}: {run_dir.path} is not a run directory (no {RUN_FILE})"])
    try:
        saved = json.loads(run_dir.run_file.read_text())
        if not isinstance(saved.get("config"), dict) or not isinstance(saved.get("choices"), dict):
            raise ValueError("no config or choices in it")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError([f"{key}={value!r}: {run_dir.run_file} is damaged ({e}), so the run's config is unknown; "
                           "start a new run"]) from e
    refused = [f"{k}._target_={target!r}" for k, target in _targets(saved["config"])
               if not target.startswith(ALLOWED_TARGETS)]
    if refused:
        raise ConfigError([f"{r}: a config read from a run directory may only build objects from "
                           f"{', '.join(ALLOWED_TARGETS)}; refused" for r in refused])
    return saved


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The resumed run's config (its run.json with `overrides` applied) and its run.json."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = read_run_file(RunDir(cfg.paths.run_dir), "resume", cfg.resume)
    merged = OmegaConf.create(saved["config"])
    parser = OverridesParser.create()
    for override in overrides:
        parsed = parser.parse_override(override)  # typed values, as Hydra parses them: 300000 is an int
        key = parsed.key_or_group
        value = None if parsed.is_delete() else parsed.value()
        if key == "resume" or key.startswith("hydra."):
            continue
        if "." not in key and saved["choices"].get(key) == value:
            continue  # the run's own choice, repeated (a requeued job runs its command line again)
        if "." not in key:
            raise ConfigError([f"{key}={value}: a resumed run keeps its groups (it chose {key}="
                               f"{saved['choices'].get(key)!r}); start a new run to change it"])
        OmegaConf.update(merged, key, value, force_add=False)
    merged.resume = cfg.resume
    merged.paths = cfg.paths
    return merged, saved


def _targets(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        found = [(prefix.rstrip("."), str(node["_target_"]))] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{prefix}{key}.")
        return found
    if isinstance(node, list):
        return [t for i, item in enumerate(node) for t in _targets(item, f"{prefix}{i}.")]
    return []
