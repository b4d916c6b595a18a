r"""llm-generate: complete prompts with a trained checkpoint.

  llm-generate checkpoint=runs/<run id> prompt='"def fibonacci(n):"' max_new_tokens=64
  llm-generate checkpoint=<run id> prompt=import strategy=sample temperature=0.8 top_p=0.95 seed=1 stream=true
  llm-generate checkpoint=<run id> prompts_file=prompts.jsonl output_file=completions.jsonl batch_size=16
  llm-generate checkpoint=<run id> prompt='"class "' strategy=beam beam_width=4 stop='["\n\n"]'
  llm-generate checkpoint=<big run> draft_checkpoint=<small run> strategy=speculative prompt='"def "'
  llm-generate checkpoint=path/to/model.ckpt tokenizer.path=path/to/tokenizer.json prompt=x quantize=int4

`checkpoint` is a run directory, a run id under the runs directory, or a checkpoint file. With
`prompt`, the completion is printed (streamed with stream=true); with `prompts_file` (JSONL, a
"prompt" field per line) the completions go to `output_file` as JSONL with prompt, completion and
n_tokens. Hydra parses the values: quote text with spaces or punctuation inside the shell's
quotes (prompt='"x = f(1)"'); in prompt and stop strings \n and \t are newline and tab.
Everything is checked before a model is loaded; a bad setting exits with code 2, naming the key.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

import llm.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from llm.cli.common import CONFIG_ERROR_EXIT_CODE, exit_on_config_error, setup
from llm.cli.train import CONF_DIR


def register_help() -> None:
    """`hydra.help.header: ${llm_cli_doc:<module>}` shows the module docstring of llm.cli.<module> in --help."""
    if not OmegaConf.has_resolver("llm_cli_doc"):
        OmegaConf.register_new_resolver("llm_cli_doc", lambda name: importlib.import_module(f"llm.cli.{name}").__doc__)


class HydraEntry:
    """Runs a Hydra app so that Hydra refusing the command line (an unknown key, a bad group
    option), which it reports with exit code 1 before the app starts, exits with 2 instead, the
    code of every other config error (as llm-train does). The app sets `composed` first thing."""

    def __init__(self) -> None:
        self.composed = False

    def run(self, app: Callable[[], object]) -> None:
        self.composed = False  # per invocation: tests may run several in one process
        try:
            app()
        except SystemExit as e:
            if e.code == 1 and not self.composed:
                sys.exit(CONFIG_ERROR_EXIT_CODE)
            raise


setup()
register_help()
ENTRY = HydraEntry()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def _app(cfg: DictConfig) -> None:
    from llm.evaluate.generation import run_generate

    ENTRY.composed = True
    exit_on_config_error(run_generate, cfg)


def main() -> None:
    ENTRY.run(_app)


if __name__ == "__main__":
    main()
