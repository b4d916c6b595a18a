"""`llm-train`: the Hydra app over conf/train.yaml. Thin: compose, then hand over to llm.train."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import llm.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from llm.cli.common import setup

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

setup()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> float | None:
    from llm.config import ConfigError
    from llm.train import train

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # recorded as a failed job; the sweep goes on and exits non-zero at the end
        sys.exit(2)
    return summary.get("val/loss")


def main() -> None:
    from llm.tracking.sweep import report_sweep

    try:
        _app()
    finally:
        report_sweep()  # after a multirun: index.json and a line per failed job


if __name__ == "__main__":
    main()
