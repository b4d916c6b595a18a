"""`llm-generate` on a tiny run trained by the real `llm-train`: the console script in subprocesses
where the process matters (printing, exit codes), the same Hydra app composed in-process elsewhere
(each subprocess pays seconds of imports)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from llm.config import ConfigError
from llm.evaluate.completion import cut_at_stop
from llm.evaluate.generation import run_generate
from llm.evaluate.options import EvalSettings, GenerateSettings, check_eval, check_generate
from llm.tracking.console import StderrHandler
from tests.conftest import TINY_RUN, compose_train, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU

PROMPTS = ["import os\n", "def parse(text):\n    return", "x"]  # three lengths, for left padding


def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained run per test session (this file and test_evaluate.py share it)."""
    root = tmp_path_factory.getbasetemp() / "tiny-run-root"
    if not (root / "runs").is_dir():
        root.mkdir(exist_ok=True)
        result = run_cli([*TINY_RUN, "budget.steps=30", "trainer.val_every=30"], cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)




def generate(run: Path, overrides: list[str], capsys) -> tuple[list[dict], str, str]:
    """llm-generate composed in-process: (completion records, stdout, stderr)."""
    cfg = compose_train([f"checkpoint={run}", *overrides], root=run.parent.parent, config_name="generate")
    console = StderrHandler()  # llm-generate's console: messages on stderr (conf/hydra/job_logging/llm_stderr.yaml)
    logging.getLogger().addHandler(console)
    try:
        completions = run_generate(cfg)
    finally:
        logging.getLogger().removeHandler(console)
    out = capsys.readouterr()
    return [c.record() for c in completions], out.out, out.err


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    return path


def test_single_prompt_greedy_prints_a_deterministic_completion(run, tmp_path):
    args = [f"checkpoint={run.name}", "prompt='import os'", "max_new_tokens=16"]  # a run id, under runs/
    first = run_cli([*args, f"output_file={tmp_path / 'a.jsonl'}"], cwd=run.parent.parent, command="generate")
    second = run_cli(args, cwd=run.parent.parent, command="generate")
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert record["prompt"] == "import os" and 0 < record["n_tokens"] <= 16 and record["completion"]
    assert first.stdout == second.stdout == record["completion"] + "\n"  # stdout holds the completion alone
    assert "step 30" in first.stderr and "tokens/s" in first.stderr


def test_bad_values_exit_2_naming_key_value_and_allowed(run, tmp_path):
    result = run_cli([f"checkpoint={tmp_path / 'nowhere'}", "strategy=nucleus", "quantize=int2", "prompt=x",
                      f"prompts_file={tmp_path / 'p.jsonl'}", "top_p=1.5"], cwd=tmp_path, command="generate")
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr
    assert "strategy='nucleus': not allowed. Choose one of: greedy, sample, beam, speculative" in err
    assert "quantize='int2': not allowed. Choose one of: none, int8, int4" in err
    assert "give exactly one of them (both are set)" in err
    assert f"prompts_file='{tmp_path / 'p.jsonl'}': no such file" in err
    assert f"checkpoint='{tmp_path / 'nowhere'}': no such checkpoint file, run directory, or run id" in err
    assert "top_p=1.5: must be in (0, 1]" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("overrides, phrase", [
    ([], "prompt=None, prompts_file=None: give exactly one of them (neither is set)"),
    (["prompt=x", "strategy=sample", "temperature=0"], "temperature=0: strategy=sample needs temperature > 0"),
    (["prompt=x", "strategy=speculative"], "draft_checkpoint: required with strategy=speculative"),
    (["prompt=x", "strategy=beam", "stream=true"], "stream=true: strategy=beam does not emit tokens one at a time"),
    (["prompt=x", "max_new_tokens=0"], "max_new_tokens=0: must be >= 1"),
    (["prompt=x", "device=tpu"], "device='tpu': not a device"),
    (["prompt=x", "max_new_tokens=many"], "max_new_tokens='many'"),
    (["prompt=x", "stop=['']"], "stop[0]='': a stop string must be non-empty"),
])
def test_bad_settings_are_refused_before_loading(run, overrides, phrase, capsys):
    with pytest.raises(ConfigError) as e:
        generate(run, overrides, capsys)
    assert phrase in str(e.value)


# A key the chosen strategy does not use: refused, naming the key, its value, the strategy and the fix.
UNUSED_KEYS = [
    (dict(temperature=0.7), "temperature=0.7: has no effect with strategy=greedy (only sample and speculative use "
                            "it); drop temperature, or set strategy=sample"),
    (dict(top_k=50), "top_k=50: has no effect with strategy=greedy"),
    (dict(top_p=0.9), "top_p=0.9: has no effect with strategy=greedy"),
    (dict(beam_width=8), "beam_width=8: has no effect with strategy=greedy (only beam uses it); drop beam_width, "
                         "or set strategy=beam"),
    (dict(draft_checkpoint="small"), "draft_checkpoint='small': has no effect with strategy=greedy (only "
                                     "speculative uses it); drop draft_checkpoint, or set strategy=speculative"),
    (dict(speculative_k=2), "speculative_k=2: has no effect with strategy=greedy"),
    (dict(strategy="beam", temperature=0.0), "temperature=0.0: has no effect with strategy=beam"),
    (dict(strategy="beam", top_k=5), "top_k=5: has no effect with strategy=beam"),
    (dict(strategy="beam", top_p=0.5), "top_p=0.5: has no effect with strategy=beam"),
    (dict(strategy="beam", speculative_k=8), "speculative_k=8: has no effect with strategy=beam"),
    (dict(strategy="sample", beam_width=2), "beam_width=2: has no effect with strategy=sample"),
    (dict(strategy="beam", compile=True), "compile=true: has no effect with strategy=beam (only greedy and sample "
                                          "use it)"),
    (dict(strategy="sample", draft_checkpoint="small"), "draft_checkpoint='small': has no effect with strategy=sample"),
    (dict(strategy="speculative", draft_checkpoint="small", beam_width=1),
     "beam_width=1: has no effect with strategy=speculative"),
    (dict(strategy="speculative", draft_checkpoint="small", temperature=0, top_k=5),
     "top_k=5: has no effect with strategy=speculative at temperature=0 (it decodes greedily); drop top_k, or set "
     "temperature > 0"),
    (dict(strategy="speculative", draft_checkpoint="small", temperature=0, top_p=0.5),
     "top_p=0.5: has no effect with strategy=speculative at temperature=0"),
]


@pytest.mark.parametrize("keys, phrase", UNUSED_KEYS, ids=[" ".join(map(str, k.items())) for k, _ in UNUSED_KEYS])
def test_keys_the_strategy_does_not_use_are_refused(keys, phrase):
    (problem,) = check_generate(GenerateSettings(prompt="x", **keys))
    assert problem.startswith(phrase), problem


def test_keys_the_strategy_uses_or_left_at_their_defaults_pass(caplog):
    for keys in [dict(), dict(temperature=1.0, top_k=None, top_p=None, beam_width=4, speculative_k=4),
                 dict(temperature=0),  # greedy is temperature 0: redundant, not contradictory
                 dict(strategy="sample", temperature=0.7, top_k=50, top_p=0.9),
                 dict(strategy="beam", beam_width=8),
                 dict(strategy="speculative", draft_checkpoint="small", speculative_k=2, temperature=0.7, top_k=5,
                      top_p=0.9),
                 dict(strategy="speculative", draft_checkpoint="small", temperature=0)]:
        assert check_generate(GenerateSettings(prompt="x", **keys)) == [], keys
    assert not caplog.records


def test_a_seed_or_batch_size_that_changes_nothing_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, "llm.evaluate.options")
    assert check_generate(GenerateSettings(prompt="x", strategy="beam", seed=3, batch_size=2)) == []
    assert check_generate(GenerateSettings(prompt="x", strategy="sample", seed=3, batch_size=2)) == []
    assert [r.getMessage() for r in caplog.records] == [
        "seed=3: strategy=beam draws no random numbers; the seed changes nothing",
        "batch_size=2: strategy=beam completes prompts one by one; batch_size changes nothing",
    ]


def test_eval_task_keys_without_tasks_file_are_refused(tmp_path):
    keys = dict(task_max_new_tokens=8, task_stop=["x"], add_bos=True)
    assert check_eval(EvalSettings(**keys), "none") == [
        "task_max_new_tokens=8: has no effect without tasks_file (it shapes the task completions only); give "
        "tasks_file=<file.jsonl>, or drop task_max_new_tokens",
        "task_stop=['x']: has no effect without tasks_file (it shapes the task completions only); give "
        "tasks_file=<file.jsonl>, or drop task_stop",
        "add_bos=true: has no effect without tasks_file (it shapes the task completions only); give "
        "tasks_file=<file.jsonl>, or drop add_bos",
    ]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert check_eval(EvalSettings(tasks_file=str(tasks), **keys), "none") == []
    assert check_eval(EvalSettings(task_stop=["\\n"]), "none") == []  # conf/eval.yaml's default, as Hydra gives it


def test_a_key_the_strategy_does_not_use_exits_2(run, monkeypatch, capsys):
    from llm.cli.generate import main

    monkeypatch.chdir(run.parent.parent)
    monkeypatch.setattr(sys, "argv", ["llm-generate", f"checkpoint={run}", "prompt=x", "strategy=beam",
                                      "temperature=0.7"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    assert "temperature=0.7: has no effect with strategy=beam (only sample and speculative use it); drop " \
           "temperature, or set strategy=sample" in err
    assert "Traceback" not in err


def test_checkpoint_forms_and_their_errors(run, tmp_path, capsys):
    sharded = tmp_path / "fsdp-run" / "checkpoints" / "last.ckpt"
    sharded.mkdir(parents=True)
    (sharded / "meta.pt").write_bytes(b"")  # a sharded checkpoint whose metadata is torn
    (sharded.parent.parent / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    with pytest.raises(ConfigError, match=r"checkpoint: .*last.ckpt: not a readable checkpoint"):
        generate(run, [f"checkpoint={sharded.parent.parent}", "prompt=x"], capsys)
    bare = tmp_path / "model.ckpt"
    bare.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="tokenizer.path: required, as .* is not inside a run directory"):
        generate(run, [f"checkpoint={bare}", "prompt=x"], capsys)
    from_file, _, _ = generate(run, [f"checkpoint={bare}", f"tokenizer.path={run / 'tokenizer.json'}", "prompt=x",
                                     "max_new_tokens=8"], capsys)
    from_run, _, _ = generate(run, ["prompt=x", "max_new_tokens=8"], capsys)
    from_id, _, _ = generate(run, [f"checkpoint={run.name}", "prompt=x", "max_new_tokens=8"], capsys)
    assert from_file == from_run == from_id


def test_batch_mode_equals_one_by_one(run, tmp_path, capsys):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out" / "completions.jsonl"
    batched, stdout, stderr = generate(run, [f"prompts_file={prompts_file}", f"output_file={out}", "batch_size=3",
                                             "max_new_tokens=12"], capsys)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == batched and stdout == "" and f"written: {out} (3 completions)" in stderr
    assert [r["prompt"] for r in written] == PROMPTS and set(written[0]) == {"prompt", "completion", "n_tokens"}
    singles = [generate(run, [f"prompt={json.dumps(p)}", "max_new_tokens=12"], capsys)[0][0] for p in PROMPTS]
    assert written == singles
    # Without output_file, batch mode prints the same records as JSON lines.
    _, stdout, _ = generate(run, [f"prompts_file={prompts_file}", "max_new_tokens=12"], capsys)
    assert [json.loads(line) for line in stdout.splitlines()] == written


def test_compiled_decoding_writes_the_same_completions(run, tmp_path, capsys):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    args = [f"prompts_file={prompts_file}", "batch_size=3", "max_new_tokens=12"]
    eager, _, _ = generate(run, args, capsys)
    compiled, _, _ = generate(run, [*args, "compile=true"], capsys)
    assert compiled == eager and len(compiled) == 3


def test_sampling_with_a_seed_is_reproducible(run, capsys):
    args = ["prompt=def", "strategy=sample", "temperature=1.0", "top_k=100", "top_p=0.95", "max_new_tokens=24"]
    a, _, _ = generate(run, [*args, "seed=1"], capsys)
    b, _, _ = generate(run, [*args, "seed=1"], capsys)
    c, _, _ = generate(run, [*args, "seed=2"], capsys)
    assert a == b and a != c


def test_stop_string_truncates(run, capsys):
    args = ["prompt=def", "strategy=sample", "seed=3", "max_new_tokens=40"]
    (free,), _, _ = generate(run, args, capsys)
    text = free["completion"]
    # A stop string the seeded sample surely reaches, well before its end (and whole characters).
    stop = next(text[i : i + 2] for i in range(len(text) // 3, len(text) // 2)
                if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2])
    as_override = f"stop=[{json.dumps(stop, ensure_ascii=False)}]"
    (stopped,), stdout, _ = generate(run, [*args, as_override], capsys)
    assert stopped["completion"] == text[: text.index(stop)] == cut_at_stop(text, [stop])[0]
    assert stop not in stopped["completion"] and stdout == stopped["completion"] + "\n"
    assert stopped["n_tokens"] < free["n_tokens"]
    # Streaming prints the same text as it comes, holding back what could begin the stop string.
    (streamed,), stdout, _ = generate(run, [*args, as_override, "stream=true"], capsys)
    assert streamed == stopped and stdout == stopped["completion"] + "\n"


def test_newline_escape_in_stop_strings(run, capsys):
    args = ["prompt=x", "strategy=sample", "seed=0", "max_new_tokens=64"]
    (free,), _, _ = generate(run, args, capsys)
    (cut,), _, _ = generate(run, [*args, "stop=['\\n']"], capsys)  # Hydra passes the backslash through
    assert "\n" in free["completion"] and cut["completion"] == free["completion"].split("\n")[0]


def test_beam_and_speculative_decoding(run, capsys):
    (greedy,), _, _ = generate(run, ["prompt=def", "max_new_tokens=16"], capsys)
    (beam,), _, _ = generate(run, ["prompt=def", "max_new_tokens=16", "strategy=beam", "beam_width=3"], capsys)
    assert 0 < beam["n_tokens"] <= 16
    (spec,), _, stderr = generate(run, ["prompt=def", "max_new_tokens=16", "strategy=speculative", "temperature=0",
                                        f"draft_checkpoint={run}", "speculative_k=3"], capsys)
    assert "speculative: acceptance rate 1.000" in stderr
    assert spec == greedy  # at temperature 0 speculative decoding is exactly the target's greedy output
    (sampled,), _, stderr = generate(run, ["prompt=def", "max_new_tokens=16", "strategy=speculative", "seed=1",
                                           f"draft_checkpoint={run}"], capsys)
    assert "speculative: acceptance rate 1.000" in stderr and sampled["n_tokens"] > 0  # draft = target: all accepted


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_generation_reports_memory_and_speed(run, capsys, scheme):
    (record,), _, stderr = generate(run, ["prompt=def", "max_new_tokens=8", f"quantize={scheme}"], capsys)
    before, after = map(float, re.search(rf"{scheme} weights: ([\d.]+) MiB -> ([\d.]+) MiB", stderr).groups())
    assert after < 0.45 * before and record["n_tokens"] > 0
    assert re.search(r"generated \d+ tokens .* tokens/s", stderr)


def test_help_shows_the_docstring_and_keys(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path, command="generate")
    assert result.returncode == 0
    assert "llm-generate: complete prompts with a trained checkpoint." in result.stdout
    assert "strategy: greedy" in result.stdout and "speculative_k: 4" in result.stdout
