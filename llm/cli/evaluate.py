r"""llm-eval: perplexity and task accuracy of a trained checkpoint.

  llm-eval checkpoint=runs/<run id>                          # perplexity on the run's own val split
  llm-eval checkpoint=<run id> max_batches=8 quantize=int4   # also an int4 copy: size, perplexity, tokens/s
  llm-eval checkpoint=<run id> tasks_file=tasks.jsonl perplexity=false
  llm-eval checkpoint=<run id> data=text data.corpus.paths='/data/books/*.txt' seq_len=256
  llm-eval checkpoint=path/to/model.ckpt tokenizer.path=path/to/tokenizer.json data=stdlib logger=wandb

Perplexity: mean next-token NLL (nats/token) over the held-out (val) split of the run's data
config (its run.json) or of data=<option> (any option of llm-train's data group), cut into the
same blocks as training's validation; with the run's seq_len, micro batch size and
max_batches=<its data.val_batches>, the loss is the run's final val/loss. Bits per byte use the
split's tokens per UTF-8 byte. Tasks: a JSONL file with "prompt" and "answer" per line; greedy
completion, exact match after stripping whitespace. Results: a table, <out_dir>/eval.json, and
eval/* lines (eval/loss, eval/ppl, eval/bits_per_byte, eval/accuracy; eval/int8/* or eval/int4/*
for the quantised copy) appended to the run's metrics.jsonl at the checkpoint's step; logger=wandb adds a W&B run.
Everything is checked before a model is loaded; a bad setting exits with code 2, naming the key.

  llm-eval harness checkpoint=<run id> builtin=[addition,copying]          # built-in tasks, no hub
  llm-eval harness checkpoint=<run id> tasks=[my_task] include_path=my_tasks/ compare_hf=out/hf
  llm-eval harness checkpoint=<run id> tasks=[hellaswag] limit=100         # the harness's own (hub data)

`harness` runs lm-evaluation-harness (pip install '.[eval]') with the checkpoint as its `llm`
model (llm.evaluate.harness): a task x metric table, <out_dir>/harness.json, eval/<task>/<metric>
in the run's metrics.jsonl; compare_hf=<llm-hf export folder> adds the harness's `hf` model's
scores beside ours. `llm-eval harness --help` lists its keys.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import llm.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from llm.cli.common import exit_on_config_error, setup
from llm.cli.generate import HydraEntry, register_help
from llm.cli.train import CONF_DIR

setup()
register_help()
ENTRY = HydraEntry()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _app(cfg: DictConfig) -> None:
    from llm.evaluate.evaluation import run_eval

    ENTRY.composed = True
    exit_on_config_error(run_eval, cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval_harness")
def _harness_app(cfg: DictConfig) -> None:
    from llm.evaluate.harness_run import run_harness

    ENTRY.composed = True
    exit_on_config_error(run_harness, cfg)


def main() -> None:
    if sys.argv[1:2] == ["harness"]:  # a mode with its own keys (conf/eval_harness.yaml)
        del sys.argv[1]
        ENTRY.run(_harness_app)
    else:
        ENTRY.run(_app)


if __name__ == "__main__":
    main()
