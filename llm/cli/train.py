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

    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val/loss")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
