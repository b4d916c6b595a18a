r"""llm-data: curate a corpus with datatrove (Hugging Face's data-processing library).

  llm-data                                                   # the embedded corpus -> curated/
  llm-data data=text data.corpus.paths='/data/**/*.txt' curate/quality=web output_dir=out/books
  llm-data data=hf data.corpus.name=roneneldan/TinyStories curate/quality=web executor.tasks=8 executor.workers=2
  llm-data curate/executor=slurm executor.tasks=64 executor.slurm.partition=cpu   # submits dependent job arrays
  llm-data decontamination.files=[my_eval.jsonl] minhash.enabled=false logger=wandb

Reads the source (any option of llm-train's data group), then: length filter, Gopher repetition
and quality rules, C4's rules, n-gram decontamination against the evaluation sets the project
ships (the built-in tasks' held-out prompts, and JSONL files of prompts), exact and MinHash
near-duplicate removal. Kept documents go to <output_dir>/documents, one text file each, which
llm-train reads back: data=text data.corpus.paths='<output_dir>/documents/**/*.txt'
(format=jsonl writes datatrove's JSONL shards instead). What each filter removed is in
<output_dir>/curation.json (and a W&B run with logger=wandb). curate/quality=code (the default:
thresholds for source code) or web (Gopher's and C4's published ones). Everything is checked
before a document is read; a bad setting exits with code 2, naming the key.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # datatrove's bars (before anything imports tqdm); `TQDM_DISABLE=0 llm-data` shows them

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import llm.config  # noqa: F401,E402  (registers the schemas in Hydra's ConfigStore)
from llm.cli.common import exit_on_config_error, setup  # noqa: E402
from llm.cli.generate import HydraEntry, register_help  # noqa: E402
from llm.cli.train import CONF_DIR  # noqa: E402

setup()
register_help()
ENTRY = HydraEntry()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="curate")
def _app(cfg: DictConfig) -> None:
    from llm.curate.run import run_curate

    ENTRY.composed = True
    exit_on_config_error(run_curate, cfg)


def main() -> None:
    ENTRY.run(_app)


if __name__ == "__main__":
    main()
