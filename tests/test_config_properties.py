"""A property of every numeric config key: whatever number (or non-number) a user gives it, the
run either trains, or `llm-train` exits with code 2 naming the key, with no traceback.

Keys come from the schemas' declared ranges (llm.fields.numeric_keys), for pretraining and for
every post-training method; values are negative, zero, nan, +-inf, huge or not numbers at all.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from llm.config import ConfigError
from llm.config.methods import METHODS
from llm.config.schema import (SCHEMAS, AdamWSchema, CosineSchema, RunSchema, SingleSchema, StdlibCorpusSchema,
                               TokenizerSchema)
from llm.fields import numeric_keys
from llm.model import ModelConfig, Transformer
from llm.tokenizer import build_tokenizer
from llm.train import train
from tests.conftest import compose_train

FAST = ["logger=none", "trainer.progress_bar=false", "budget.steps=1", "data.val_batches=1"]
PRETRAIN = [*FAST, "model=nano", "tokenizer=byte", "data.corpus.max_bytes=60000", "data.seq_len=32",
            "data.micro_batch_size=4"]
POSTTRAIN = [*FAST, "data.seq_len=48", "data.micro_batch_size=4", "posttrain.data.n_train=16", "posttrain.data.n_val=4",
             "posttrain.data.eval_prompts=2", "posttrain.data.eval_max_new_tokens=4"]
METHOD_ARGS = {"sft": [], "reward": [], "dpo": [], "grpo": ["posttrain.num_generations=2", "posttrain.max_new_tokens=4"],
               "ppo": ["posttrain.max_new_tokens=4", "posttrain.num_ppo_epochs=1"]}

# Every numeric key, by the stage whose config holds it (pretraining's groups as composed by PRETRAIN).
PRETRAIN_SCHEMAS = {**{group: SCHEMAS[group] for group in ("model", "data", "trainer", "budget")},
                    "tokenizer": TokenizerSchema, "optim": AdamWSchema, "schedule": CosineSchema,
                    "parallelism": SingleSchema, "data.corpus": StdlibCorpusSchema, "": RunSchema}
KEYS = sorted({("none", key) for prefix, schema in PRETRAIN_SCHEMAS.items() for key in numeric_keys(schema, prefix)}
              | {(m, key) for m in METHOD_ARGS for key in numeric_keys(METHODS[m], "posttrain")})
LIST_KEYS = {"optim.betas", "schedule.branches", "trainer.guard.skip_batches"}
# In range at any size, but a huge value means a long run: drawn with the other values only.
RUN_LENGTH = {"budget.steps", "data.corpus.max_bytes"}
VALUES = {"negative": "-1", "zero": "0", "nan": "nan", "inf": "inf", "-inf": "-inf", "huge": "1000000000000",
          "word": "two", "bool": "true", "mapping": "{a: 1}"}


def test_the_keys_cover_every_group():
    groups = {key.split(".")[0] for _, key in KEYS}
    assert {"model", "data", "trainer", "budget", "tokenizer", "optim", "schedule", "parallelism", "posttrain",
            "seed"} <= groups
    assert len(KEYS) > 100
    assert ("ppo", "posttrain.kl_coef") in KEYS and ("none", "trainer.gradient_clip_val") in KEYS


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A run directory as llm-train leaves it, of a freshly initialised tiny byte-level model."""
    run = tmp_path_factory.mktemp("parent")
    tokenizer = build_tokenizer(None, run, kind="byte")
    config = ModelConfig(n_layers=1, d_model=32, n_heads=4, max_seq_len=64, vocab_size=tokenizer.vocab_size)
    (run / "checkpoints").mkdir()
    tokenizer.save(run / "tokenizer.json")
    torch.save({"state_dict": {f"model.{k}": v for k, v in Transformer(config).state_dict().items()},
                "global_step": 0, "llm": {"stage": "pretrain", "model_config": asdict(config), "value_head": False}},
               run / "checkpoints" / "last.ckpt")
    (run / "run.json").write_text(json.dumps({"run_id": "parent", "choices": {"posttrain": "pretrain"}}))
    return run


def llm_train(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`llm-train args` in this process, as from a shell in `cwd`: (exit code, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["llm-train", *args])
    capsys.readouterr()
    cli = importlib.import_module("llm.cli.train")
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from(KEYS), kind=st.sampled_from(sorted(VALUES)))
# Values in range are rarer draws; these always run, so that both outcomes are exercised.
@example(case=("none", "trainer.gradient_clip_val"), kind="zero")  # no clipping
@example(case=("none", "optim.eps"), kind="huge")
@example(case=("dpo", "posttrain.label_smoothing"), kind="zero")
@example(case=("reward", "posttrain.margin"), kind="negative")
@example(case=("grpo", "posttrain.temperature"), kind="huge")
def test_any_number_for_any_key_trains_or_exits_2_naming_the_key(case, kind, parent, tmp_path, monkeypatch, capsys,
                                                                    single_thread):
    method, key = case
    assume(not (kind == "huge" and key in RUN_LENGTH))
    value = VALUES[kind]
    override = f"{key}=[{value}]" if key in LIST_KEYS else f"{key}={value}"
    stage = PRETRAIN if method == "none" else [*POSTTRAIN, f"posttrain={method}", f"init_from={parent}",
                                               *METHOD_ARGS[method]]
    args = [*stage, override]  # the drawn value last: it wins over the stage's own settings
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))  # shared by the examples
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        cfg = compose_train(args, root)
    except ConfigCompositionException:
        cfg = None  # refused while composing
    if cfg is not None:
        try:
            summary = train(cfg)
        except ConfigError:
            pass  # refused by validation: the command line must say so
        else:
            assert summary["status"] == "completed" and summary["steps_done"] == 1, (override, summary)
            return
    code, err = llm_train(args, root, monkeypatch, capsys)
    assert code == 2, (override, err[-3000:])
    assert key in err, (override, err[-3000:])
    assert "Traceback" not in err, (override, err[-3000:])
