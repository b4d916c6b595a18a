"""`llm-eval` and its weight-only int8/int4 copies, on the tiny run trained once per session by the real `llm-train`
(shared with test_generate_cli.py): the console script in a subprocess for the files it leaves,
the same Hydra app composed in-process for the rest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llm.config import ConfigError
from llm.evaluate.evaluation import run_eval
from llm.evaluate.generation import run_generate
from llm.tracking.metrics import read_metrics
from tests.conftest import compose_train, run_cli
from tests.test_generate_cli import tiny_run

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU

# The tiny run's validation: data.val_batches=8 batches of data.micro_batch_size=8 x data.seq_len=64.
VAL_BATCHES = 8
TASK_PROMPTS = ["import os\n", "def parse(text):\n    return", "x", "class Foo:\n    def", "    ", "#"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)




def evaluate(run: Path, overrides: list[str], out_dir: Path, checkpoint: Path | None = None) -> dict:
    """llm-eval composed in-process, started in the run's root (its caches); returns the report it
    also wrote to out_dir/eval.json."""
    cfg = compose_train([f"checkpoint={checkpoint or run}", f"out_dir={out_dir}", "log_metrics=false", *overrides],
                        root=run.parent.parent, config_name="eval")
    report = run_eval(cfg)
    assert json.loads((out_dir / "eval.json").read_text()) == json.loads(json.dumps(report, default=str))
    return report


def test_cli_perplexity_equals_the_runs_val_loss_and_int8_changes_it_a_little(run, tmp_path):
    summary = json.loads((run / "summary.json").read_text())
    lines_before = len(read_metrics(run / "metrics.jsonl"))
    result = run_cli([f"checkpoint={run}", f"max_batches={VAL_BATCHES}", "quantize=int8", f"out_dir={tmp_path}"],
                     cwd=run.parent.parent, command="evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    fp32, int8 = report["results"]["fp32"], report["results"]["int8"]
    # The same 8 batches as the run's validation: the same loss, up to float32 summation order.
    assert fp32["loss"] == pytest.approx(summary["val/loss"], abs=1e-4)
    assert fp32["ppl"] == pytest.approx(math.exp(fp32["loss"]), rel=1e-12)
    assert fp32["tokens"] == VAL_BATCHES * 8 * 64 and report["step"] == 30 == summary["steps_done"]
    data = report["data"]
    assert data["corpus"] == "stdlib" and data["config"]["max_bytes"] == 300000  # the run's own data config
    tokens_per_byte = data["split_tokens"] / data["split_bytes"]
    assert fp32["bits_per_byte"] == pytest.approx(fp32["loss"] / math.log(2) * tokens_per_byte)
    # int8: less memory, nearly the same perplexity; both numbers are reported.
    assert int8["model_bytes"] < 0.6 * fp32["model_bytes"]
    assert abs(int8["loss"] - fp32["loss"]) < 0.01 and int8["ppl"] != fp32["ppl"]
    assert report["int8_vs_fp32"]["ppl_change"] == pytest.approx(int8["ppl"] / fp32["ppl"] - 1)
    assert "int8 vs fp32: perplexity" in result.stdout and "int8 vs fp32: weights" in result.stdout
    # Tokens/s side by side, measured alike (best of speed_repeats): numbers, not quality metrics.
    for values in (fp32, int8):
        assert values["decode_tokens_per_s"] > 0 and values["forward_tokens_per_s"] > 0
    assert report["int8_vs_fp32"]["decode_speedup"] == pytest.approx(
        int8["decode_tokens_per_s"] / fp32["decode_tokens_per_s"])
    assert "decode tokens/s" in result.stdout and "int8 vs fp32: tokens/s" in result.stdout
    print(f"\nint8 vs fp32 on the tiny run: weights {fp32['model_bytes']:,.0f} -> {int8['model_bytes']:,.0f} bytes, "
          f"ppl {fp32['ppl']:.5f} -> {int8['ppl']:.5f} ({report['int8_vs_fp32']['ppl_change']:+.4%})")
    # Appended to the run's metrics.jsonl at the checkpoint's step, as the training metrics are.
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == lines_before + 1
    assert records[-1]["step"] == 30 and records[-1]["eval/loss"] == fp32["loss"]
    assert records[-1]["eval/ppl"] == fp32["ppl"] and records[-1]["eval/int8/loss"] == int8["loss"]
    assert "eval/bits_per_byte" in records[-1] and not any("tokens_per_s" in key for key in records[-1])


# The tolerance of a quantised copy's perplexity on the trained tiny run (nano, 30 steps, val loss
# 5.17): measured +0.0001% for int8 and +0.03% for int4 (groups of 32); the bounds leave 10x room.
PPL_TOLERANCE = {"int8": 1e-4, "int4": 3e-3}  # relative perplexity change, |ppl_q / ppl_fp32 - 1|


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantised_copy_keeps_the_trained_models_perplexity_within_tolerance(run, tmp_path, scheme):
    report = evaluate(run, [f"max_batches={VAL_BATCHES}", f"quantize={scheme}", "speed_repeats=1",
                            "speed_new_tokens=4"], tmp_path)
    fp32, quant = report["results"]["fp32"], report["results"][scheme]
    change = report[f"{scheme}_vs_fp32"]
    print(f"\n{scheme} vs fp32 on the tiny run: weights {fp32['model_bytes']:,.0f} -> {quant['model_bytes']:,.0f} "
          f"bytes, loss {fp32['loss']:.5f} -> {quant['loss']:.5f}, ppl {change['ppl_change']:+.4%}")
    assert quant["ppl"] != fp32["ppl"] and abs(change["ppl_change"]) < PPL_TOLERANCE[scheme]
    assert quant["model_bytes"] < (0.45 if scheme == "int8" else 0.4) * fp32["model_bytes"]
    assert report["metrics"][f"eval/{scheme}/loss"] == quant["loss"]


def test_whole_split_and_an_explicit_data_option(run, tmp_path):
    summary = json.loads((run / "summary.json").read_text())
    whole = evaluate(run, [], tmp_path / "whole")
    fp32 = whole["results"]["fp32"]
    assert whole["data"]["batches"] > VAL_BATCHES  # the whole split, not only the first 8 batches
    assert abs(fp32["loss"] - summary["val/loss"]) < 0.3 and fp32["ppl"] == pytest.approx(math.exp(fp32["loss"]))
    # data=<option> composes llm-train's data group instead of the run's own config: the same corpus
    # settings give the same numbers.
    chosen = evaluate(run, ["data=stdlib", "data.corpus.max_bytes=300000"], tmp_path / "chosen")
    assert chosen["results"]["fp32"]["loss"] == fp32["loss"]


def test_task_accuracy_is_one_on_the_models_own_answers_and_zero_on_corrupted_ones(run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TASK_PROMPTS))
    answers = tmp_path / "answers.jsonl"
    # The model's own greedy answers, from llm-generate with the settings llm-eval uses for tasks.
    run_generate(compose_train([f"checkpoint={run}", f"prompts_file={prompts}", f"output_file={answers}",
                                "max_new_tokens=32", "stop=['\\n']"], root=run.parent.parent, config_name="generate"))
    completions = [json.loads(line) for line in answers.read_text().splitlines()]
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    right.write_text("".join(json.dumps({"prompt": c["prompt"], "answer": f"  {c['completion']}\n"}) + "\n"
                             for c in completions))  # surrounding whitespace does not count
    wrong.write_text("".join(json.dumps({"prompt": c["prompt"], "answer": c["completion"].strip() + "!"}) + "\n"
                             for c in completions))
    good = evaluate(run, [f"tasks_file={right}", "perplexity=false"], tmp_path / "right")
    bad = evaluate(run, [f"tasks_file={wrong}", "perplexity=false", "quantize=int8"], tmp_path / "wrong")
    assert good["results"]["fp32"]["accuracy"] == 1.0 and good["results"]["fp32"]["count"] == len(TASK_PROMPTS)
    assert bad["results"]["fp32"]["accuracy"] == 0.0 and bad["results"]["int8"]["accuracy"] == 0.0
    assert good["metrics"] == {"eval/accuracy": 1.0} and good["data"] is None
    assert "task accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, phrase", [
    (["quantize=int2"], "quantize='int2': not allowed. Choose one of: none, int8, int4"),
    (["speed_repeats=-1"], "speed_repeats=-1: must be in [0, 1000]"),
    (["logger=csv"], "logger='csv': not allowed. Choose one of: none, wandb"),
    (["perplexity=false"], "nothing to evaluate"),
    (["max_batches=0"], "max_batches=0: must be >= 1"),
    (["tasks_file=missing.jsonl"], "tasks_file='missing.jsonl': no such file"),
    (["data=text"], "data.corpus.paths: required but not set"),
])
def test_bad_settings_are_refused_before_loading(run, tmp_path, overrides, phrase):
    with pytest.raises(ConfigError) as e:
        evaluate(run, overrides, tmp_path)
    assert phrase in str(e.value)


def test_a_bare_checkpoint_file_needs_a_tokenizer_and_a_data_option(run, tmp_path):
    bare = tmp_path / "model.ckpt"
    bare.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(ConfigError) as e:
        evaluate(run, [], tmp_path, checkpoint=bare)
    assert "tokenizer.path: required" in str(e.value) and "data: the checkpoint has no run.json" in str(e.value)
    report = evaluate(run, [f"tokenizer.path={run / 'tokenizer.json'}", "data=stdlib", "data.corpus.max_bytes=300000",
                            "seq_len=64", "batch_size=8", f"max_batches={VAL_BATCHES}"], tmp_path, checkpoint=bare)
    summary = json.loads((run / "summary.json").read_text())
    assert report["results"]["fp32"]["loss"] == pytest.approx(summary["val/loss"], abs=1e-4)


def test_a_run_json_may_only_build_allowed_objects(run, tmp_path):
    fake = tmp_path / "runs" / "crafted"
    (fake / "checkpoints").mkdir(parents=True)
    (fake / "checkpoints" / "last.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    (fake / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    saved = json.loads((run / "run.json").read_text())
    saved["config"]["data"]["corpus"]["_target_"] = "os.system"
    (fake / "run.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"data.corpus._target_='os.system' \(in .*run.json\).*refused"):
        evaluate(run, [], tmp_path, checkpoint=fake)
