"""Bad inputs (files, data, checkpoints, config keys) through the real entry points: each exits with
its documented code, says what is wrong and how to fix it, and leaves nothing a later run or
tool could mistake for good output. Configs alone are covered by tests/test_config.py's table.

Every file a command reads is here in its bad shapes: not UTF-8, empty, cut short, a directory, a
broken link, JSON of the wrong type or of something else; and every numeric key of data.*, optim.*,
schedule.*, budget.*, model.*, each post-training method and llm-generate / llm-eval with the values a
user gets wrong (nan, inf, -1, 0, huge, a word). Refusals happen before any training, so a case
takes a fraction of a second.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import pytest
import tokenizers
import torch

from llm.checkpoint.meta import CheckpointMeta
from llm.interop import export_checkpoint
from llm.model.value import build_network
from llm.tokenizer import build_tokenizer
from llm.tracking.metrics import read_metrics
from llm.train import train
from tests.conftest import TINY_RUN, compose_train, llm_cli

BYTES = ["model=nano", "tokenizer=byte", "data.seq_len=64", "data.micro_batch_size=8", "logger=none",
         "trainer.progress_bar=false", "budget.steps=2", "trainer.val_every=2"]
TEXT = [*BYTES, "data=text"]
PRETRAINED = [*BYTES, "tokenizer=pretrained"]
PROSE = "The quick brown fox jumps over the lazy dog. " * 400  # ~18 kB of plain ASCII
# Post-training from the finished run of the fixture (validation reads no file: any init_from will do there).
POST = ["logger=none", "trainer.progress_bar=false", "data.seq_len=32", "data.micro_batch_size=4", "budget.steps=1",
        "init_from={in}/good/run"]
SFT, DPO, REWARD = [*POST, "posttrain=sft"], [*POST, "posttrain=dpo"], [*POST, "posttrain=reward"]
GRPO = [*POST, "posttrain=grpo", "posttrain.reward_model={in}/reward/model.ckpt"]
GENERATE = ["checkpoint={in}/good/run", "prompt=x"]
EVAL = ["checkpoint={in}/good/run", "perplexity=false", "tasks_file={in}/tasks.jsonl"]
LATIN1 = "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1")
HF_FIX = "give a transformers model folder"


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The files the cases point at: a finished run to damage, exported as a transformers folder too,
    a checkpoint of another architecture, and a reward model to score prompts with."""
    root = tmp_path_factory.mktemp("inputs")
    files: dict[str, str | bytes] = {
        "empty.txt": "", "latin1.txt": LATIN1 * 500, "tiny.txt": "too short\n", "short_val.txt": PROSE[:1000],
        "mixed/a.txt": PROSE, "mixed/b.txt": PROSE, "mixed/c.txt": LATIN1,  # one bad file among good ones
        "not_json.json": "{this is not json", "empty.json": "", "list.json": "[1, 2]", "latin1.json": b'{"a": "\xe9"}',
        "not_a_tokenizer.json": '{"vocab": ["a", "b"]}',
        # JSON lines: prompts, tasks and post-training rows, good and bad
        "tasks.jsonl": jsonl({"prompt": "1+1=", "answer": "2"}),
        "sft.jsonl": jsonl({"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}),
        "latin1.jsonl": b'{"prompt": "caf\xe9", "completion": "x"}\n',
        "empty.jsonl": "",
        "bad_line.jsonl": jsonl({"prompt": "1+1=", "completion": "2"}) + '{"prompt": "2+2=", "completion": \n',
        "list_line.jsonl": '["1+1=", "2"]\n',
        "number.jsonl": jsonl({"prompt": 3, "answer": 4}),
        "no_format.jsonl": jsonl({"question": "1+1=", "reply": "2"}),
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    (root / "binaries").mkdir()
    for i in range(3):
        (root / "binaries" / f"blob{i}.txt").write_bytes(bytes(range(128, 256)) * 40)
    for name in ("a_directory.txt", "a_directory.jsonl", "empty_dir"):
        (root / name).mkdir()
    for name in ("dangling.txt", "dangling.jsonl", "dangling.json", "dangling.ckpt"):
        (root / name).symlink_to(root / "nowhere")
    byte = build_tokenizer(None, root, kind="byte")
    byte.save(root / "byte_tokenizer.json")
    (root / "cut_tokenizer.json").write_text((root / "byte_tokenizer.json").read_text()[:300])
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(root / "plain_tokenizer.json"))  # a real tokenizer, without our special tokens
    (root / "garbage.ckpt").write_bytes(bytes(range(256)) * 64)
    (root / "notes.ckpt").write_text("not a checkpoint\n")
    (root / "empty.ckpt").write_bytes(b"")
    summary = train(compose_train([*TINY_RUN, "budget.steps=2", "trainer.val_every=2", "trainer.checkpoint_every=1"],
                                  root / "good"))
    assert summary["status"] == "completed"
    last = root / "good" / "run" / "checkpoints" / "last.ckpt"
    # The checkpoint of another architecture (it says 1 layer): what a resume must refuse to load.
    other = torch.load(last, map_location="cpu", weights_only=True)
    other["llm"]["model_config"]["n_layers"] = 1
    torch.save(other, root / "other.ckpt")
    (root / "cut.ckpt").write_bytes(last.read_bytes()[:5000])
    export_checkpoint(root / "good" / "run", root / "hf")
    # A reward model (an untrained value head on the run's architecture): GRPO with prompt files needs one.
    meta = CheckpointMeta.read(last)
    (root / "reward").mkdir()
    network = build_network(meta.model_config, True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in network.state_dict().items()}, "global_step": 0,
                "llm": {"stage": "reward", "model_config": asdict(meta.model_config), "value_head": True}},
               root / "reward" / "model.ckpt")
    shutil.copyfile(root / "good" / "run" / "tokenizer.json", root / "reward" / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def one_composition():
    """Hydra composes every command line twice: once only to read `hydra.mode` (run or multirun),
    then for the run. No case here is a multirun, so the first pass is skipped (Hydra then runs
    the app as a single run, as it does when that pass finds no mode): the same config reaches the
    same app, and a case takes a third less time."""
    from hydra._internal.hydra import Hydra

    get_mode = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: None
    yield
    Hydra.get_mode = get_mode


def snapshot(*roots: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*") if p.is_file()}


# What commands write as their results: none may appear (or change) when a command refuses its input.
RESULTS = {"eval.json", "bench.json", "bench_parallel.json", "samples.jsonl", "config.json", "model.safetensors",
           "tokenizer.json", "out.jsonl", "run.json"}


def assert_nothing_mistakable(before: dict[Path, tuple[int, int]], *roots: Path) -> None:
    """No new or changed checkpoint, result file or metrics, no summary claiming a finished run."""
    for path, stamp in snapshot(*roots).items():
        if before.get(path) == stamp:
            continue
        assert not path.name.endswith(".ckpt"), f"a checkpoint was written: {path}"
        assert path.name not in RESULTS, f"a result was written: {path}"
        assert path.name != "metrics.jsonl" or not read_metrics(path), f"metrics were written: {path}"
        if path.name == "summary.json":
            assert json.loads(path.read_text())["status"] not in ("completed", "running"), path


def damaged_copy(source: Path, tmp: Path, damage: Callable[[Path], None]) -> Path:
    copy = tmp / "damaged" / source.name
    shutil.copytree(source, copy, symlinks=True)
    damage(copy)
    return copy


def cut_every_checkpoint(run: Path) -> None:
    for path in (run / "checkpoints").glob("*.ckpt"):
        if not path.is_symlink():
            path.write_bytes(path.read_bytes()[:1000])


def foreign_checkpoint(run: Path, inputs: Path) -> None:
    shutil.copyfile(inputs / "other.ckpt", run / "checkpoints" / "last.ckpt")


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    """Damage: replace the file `name` of the copy by `content`."""
    def damage(copy: Path) -> None:
        (copy / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return damage


def cut(name: str, keep: int) -> Callable[[Path], None]:
    """Damage: cut the file `name` of the copy to its first `keep` bytes."""
    return lambda copy: (copy / name).write_bytes((copy / name).read_bytes()[:keep])


def edit_json(name: str, **changes: object) -> Callable[[Path], None]:
    """Damage: change keys of the JSON object file `name` of the copy."""
    return lambda copy: (copy / name).write_text(json.dumps({**json.loads((copy / name).read_text()), **changes}))


def remove(name: str) -> Callable[[Path], None]:
    return lambda copy: (copy / name).unlink()


def named(keys: dict[str, str]) -> tuple[list[str], list[str]]:
    """Overrides setting each key, and the phrases saying each was refused ("key=...: must be")."""
    return [f"{k}={v}" for k, v in keys.items()], [f"{k}=" for k in keys] + ["must be"]


def every(stage: list[str], keys: dict[str, str], extra: tuple[str, ...] = ()) -> tuple:
    """(arguments, phrases) of a case giving every key its bad value in one command line: one
    validation pass reports them all."""
    overrides, phrases = named(keys)
    return [*stage, *overrides], [*phrases, *extra]


def composing(stage: list[str], key: str, value: str, kind: str) -> tuple:
    """(arguments, phrases) of a value of the wrong type, which Hydra refuses while composing."""
    return [*stage, f"{key}={value}"], [f"full_key: {key}", f"could not be converted to {kind}"]


# (id, command, arguments, damage, exit code, phrases the message must contain). In the arguments
# {in} is the inputs folder, {tmp} the case's own folder, {run} a damaged copy of the finished run
# and {hf} a damaged copy of its transformers folder (damage: what is done to the copy).
Case = tuple[str, str, list[str], Optional[Callable], int, list[str]]
FILE_CASES: list[Case] = [
    # -- text corpora --
    ("text file missing", "train", [*TEXT, "data.corpus.paths={in}/missing.txt"], None, 2,
     ["data.corpus.paths:", "missing.txt does not exist", "give text files"]),
    ("text glob matching nothing", "train", [*TEXT, "data.corpus.paths={in}/binaries/*.md"], None, 2,
     ["no file matches the pattern", "*.md"]),
    ("text path is a directory", "train", [*TEXT, "data.corpus.paths={in}/a_directory.txt"], None, 2,
     ["a_directory.txt is a directory, not a file", "give the files inside it", "a_directory.txt/**/*.txt"]),
    ("text path is a dangling symlink", "train", [*TEXT, "data.corpus.paths={in}/dangling.txt"], None, 2,
     ["dangling.txt is a broken symbolic link"]),
    ("text paths empty", "train", [*TEXT, "data.corpus.paths=[]"], None, 2, ["data.corpus.paths", "no pattern given"]),
    ("text file empty", "train", [*TEXT, "data.corpus.paths={in}/empty.txt"], None, 2,
     ["data.corpus.paths:", "empty.txt is empty", "give a text file"]),
    ("text file not UTF-8", "train", [*TEXT, "data.corpus.paths={in}/latin1.txt"], None, 2,
     ["data.corpus.paths:", "latin1.txt is not UTF-8 text (byte 3 is 0xe9)", "convert it to UTF-8"]),
    ("text files all binary", "train", [*TEXT, "data.corpus.paths='{in}/binaries/*.txt'"], None, 2,
     ["blob0.txt is not UTF-8 text (byte 0 is 0x80)"]),
    ("one text file not UTF-8 among good ones", "train", [*TEXT, "data.corpus.paths='{in}/mixed/*.txt'"], None, 2,
     ["mixed/c.txt is not UTF-8 text", "or leave it out of data.corpus.paths"]),
    ("text too short for one block", "train", [*TEXT, "data.corpus.paths={in}/tiny.txt"], None, 2,
     ["data.seq_len=64", "the train split has only", "too few for one block", "smaller data.seq_len"]),
    ("val split too short for one block", "train", [*TEXT, "data.corpus.paths={in}/short_val.txt"], None, 2,
     ["data.seq_len=64", "the val split has only 51 tokens"]),
    # -- tokenizer files --
    ("tokenizer file missing", "train", [*PRETRAINED, "tokenizer.path={in}/nope.json"], None, 2,
     ["tokenizer.path:", "tokenizer file not found", "nope.json"]),
    ("tokenizer folder without tokenizer.json", "train", [*PRETRAINED, "tokenizer.path={in}/binaries"], None, 2,
     ["tokenizer file not found", "binaries/tokenizer.json"]),
    ("tokenizer not JSON", "train", [*PRETRAINED, "tokenizer.path={in}/not_json.json"], None, 2,
     ["tokenizer.path:", "not_json.json is not JSON", "give a tokenizer.json"]),
    ("tokenizer JSON of something else", "train", [*PRETRAINED, "tokenizer.path={in}/not_a_tokenizer.json"], None, 2,
     ["not_a_tokenizer.json is not a valid tokenizer.json"]),
    ("tokenizer not UTF-8", "train", [*PRETRAINED, "tokenizer.path={in}/latin1.json"], None, 2,
     ["tokenizer.path:", "latin1.json is not UTF-8 text (byte 7 is 0xe9)"]),
    ("tokenizer a JSON list", "train", [*PRETRAINED, "tokenizer.path={in}/list.json"], None, 2,
     ["list.json holds list, not a JSON object"]),
    ("tokenizer cut short", "train", [*PRETRAINED, "tokenizer.path={in}/cut_tokenizer.json"], None, 2,
     ["cut_tokenizer.json is not JSON", "cut short?"]),
    ("tokenizer vocabulary larger than the model's", "train",
     [*PRETRAINED, "tokenizer.path={in}/byte_tokenizer.json", "model.vocab_size=100"], None, 2,
     ["model.vocab_size=100", "smaller than the tokenizer's vocabulary (259)", "null to take it from the tokenizer"]),
    # -- post-training datasets (JSON lines in TRL's formats) --
    ("sft rows missing", "train", [*SFT, "posttrain.data.source={in}/missing.jsonl"], None, 2,
     ["posttrain.data.source:", "missing.jsonl does not exist", "give a JSONL file"]),
    ("sft rows not UTF-8", "train", [*SFT, "posttrain.data.source={in}/latin1.jsonl"], None, 2,
     ["posttrain.data.source:", "latin1.jsonl is not UTF-8 text (byte 15 is 0xe9)", "one JSON object per line"]),
    ("sft rows empty", "train", [*SFT, "posttrain.data.source={in}/empty.jsonl"], None, 2,
     ["Invalid dataset posttrain.data.source", "empty.jsonl: no rows", "fix: give a UTF-8 JSONL file"]),
    ("sft rows with a line cut short", "train", [*SFT, "posttrain.data.source={in}/bad_line.jsonl"], None, 2,
     ["Invalid dataset posttrain.data.source", "bad_line.jsonl:2: not valid JSON"]),
    ("sft row a JSON list", "train", [*SFT, "posttrain.data.source={in}/list_line.jsonl"], None, 2,
     ["list_line.jsonl:1: expected a JSON object, got list"]),
    ("sft rows of no known format", "train", [*SFT, "posttrain.data.source={in}/no_format.jsonl"], None, 2,
     ["no_format.jsonl:1: cannot tell the format from the keys ['question', 'reply']", "prompt_completion (prompt, "]),
    ("sft held-out rows not UTF-8", "train", [*SFT, "posttrain.data.source={in}/sft.jsonl",
                                              "posttrain.data.val_source={in}/latin1.jsonl"], None, 2,
     ["posttrain.data.val_source:", "latin1.jsonl is not UTF-8 text"]),
    ("dpo pairs not UTF-8", "train", [*DPO, "posttrain.data.source={in}/latin1.jsonl"], None, 2,
     ["posttrain.data.source:", "latin1.jsonl is not UTF-8 text"]),
    ("grpo prompts not UTF-8", "train", [*GRPO, "posttrain.data.source={in}/latin1.jsonl"], None, 2,
     ["posttrain.data.source:", "latin1.jsonl is not UTF-8 text"]),
    # -- runs and checkpoints --
    ("resume of a missing directory", "train", ["resume={in}/no_such_run"], None, 2,
     ["not a run directory", "run.json"]),
    ("resume with run.json not JSON", "train", ["resume={run}"], write("run.json", "{oops"), 2,
     ["run.json is damaged", "start a new run"]),
    ("resume with run.json not UTF-8", "train", ["resume={run}"], write("run.json", LATIN1), 2,
     ["run.json is damaged", "not UTF-8"]),
    ("resume with run.json without a config", "train", ["resume={run}"], write("run.json", '{"run_id": "x"}'), 2,
     ["run.json is damaged", "no config or choices"]),
    ("resume with every checkpoint corrupt", "train", ["resume={run}"], cut_every_checkpoint, 2,
     ["no checkpoint of the run loads", "last.ckpt", "set aside as *.corrupt", "start over from step 0"]),
    ("resume from another architecture's checkpoint", "train", ["resume={run}"], "foreign", 2,
     ["another architecture", "model.n_layers=1 there, 2 here", "start a new run"]),
    ("resume with a changed architecture", "train", ["resume={run}", "model.n_layers=3"], lambda run: None, 2,
     ["another architecture", "model.n_layers=2 there, 3 here"]),
    ("init_from a run whose tokenizer is not UTF-8", "train", [*SFT, "init_from={run}"],
     write("tokenizer.json", LATIN1), 2, ["tokenizer.json is not UTF-8 text"]),
    ("resume of a run whose tokenizer is not UTF-8", "train", ["resume={run}"], write("tokenizer.json", LATIN1), 2,
     ["tokenizer.json is not UTF-8 text"]),
    # -- llm-generate: prompts, tokenizers, checkpoints --
    ("generate from garbage", "generate", ["checkpoint={in}/garbage.ckpt", "prompt=x",
                                           "tokenizer.path={in}/byte_tokenizer.json"], None, 2,
     ["garbage.ckpt: not a readable checkpoint", "not a whole checkpoint archive"]),
    ("generate from a text file", "generate", ["checkpoint={in}/notes.ckpt", "prompt=x",
                                               "tokenizer.path={in}/byte_tokenizer.json"], None, 2,
     ["notes.ckpt: not a readable checkpoint"]),
    ("generate from a checkpoint cut short", "generate", ["checkpoint={in}/cut.ckpt", "prompt=x",
                                                          "tokenizer.path={in}/byte_tokenizer.json"], None, 2,
     ["cut.ckpt: not a readable checkpoint", "cut short"]),
    ("generate from a dangling symlink", "generate", ["checkpoint={in}/dangling.ckpt", "prompt=x"], None, 2,
     ["checkpoint=", "dangling.ckpt", "no such checkpoint file"]),
    ("generate from an empty directory", "generate", ["checkpoint={in}/empty_dir", "prompt=x"], None, 2,
     ["empty_dir is a directory without checkpoints/last.ckpt"]),
    ("prompts file not UTF-8", "generate", [*GENERATE[:1], "prompts_file={in}/latin1.jsonl",
                                            "output_file={tmp}/out.jsonl"], None, 2,
     ["prompts_file:", "latin1.jsonl is not UTF-8 text", 'e.g. {"prompt": "..."}']),
    ("prompts file with a line cut short", "generate", [*GENERATE[:1], "prompts_file={in}/bad_line.jsonl",
                                                        "output_file={tmp}/out.jsonl"], None, 2,
     ["prompts_file=", "bad_line.jsonl", "line 2 is not JSON", "one JSON object per line"]),
    ("prompts file line a JSON list", "generate", [*GENERATE[:1], "prompts_file={in}/list_line.jsonl"], None, 2,
     ["line 1 needs a string field 'prompt' (it holds a list, not an object)"]),
    ("prompts file prompt not a string", "generate", [*GENERATE[:1], "prompts_file={in}/number.jsonl"], None, 2,
     ["line 1 needs a string field 'prompt' ('prompt' is a number)"]),
    ("prompts file without prompts", "generate", [*GENERATE[:1], "prompts_file={in}/no_format.jsonl"], None, 2,
     ["line 1 needs a string field 'prompt' (it has no 'prompt')"]),
    ("prompts file empty", "generate", [*GENERATE[:1], "prompts_file={in}/empty.jsonl"], None, 2,
     ["prompts_file:", "empty.jsonl is empty"]),
    ("prompts file a directory", "generate", [*GENERATE[:1], "prompts_file={in}/a_directory.jsonl"], None, 2,
     ["prompts_file:", "a_directory.jsonl is a directory, not a file"]),
    ("prompts file a dangling symlink", "generate", [*GENERATE[:1], "prompts_file={in}/dangling.jsonl"], None, 2,
     ["dangling.jsonl is a broken symbolic link"]),
    ("prompts file missing", "generate", [*GENERATE[:1], "prompts_file={in}/missing.jsonl"], None, 2,
     ["prompts_file=", "missing.jsonl': no such file"]),
    ("generate tokenizer not UTF-8", "generate", [*GENERATE, "tokenizer.path={in}/latin1.json"], None, 2,
     ["tokenizer.path:", "latin1.json is not UTF-8 text"]),
    ("generate tokenizer a JSON list", "generate", [*GENERATE, "tokenizer.path={in}/list.json"], None, 2,
     ["list.json holds list, not a JSON object"]),
    ("generate tokenizer of something else", "generate", [*GENERATE, "tokenizer.path={in}/not_a_tokenizer.json"], None,
     2, ["not_a_tokenizer.json is not a valid tokenizer.json"]),
    ("generate tokenizer without our special tokens", "generate",
     [*GENERATE, "tokenizer.path={in}/plain_tokenizer.json"], None, 2,
     ["plain_tokenizer.json lacks the special tokens", "<|bos|>"]),
    ("generate tokenizer a dangling symlink", "generate", [*GENERATE, "tokenizer.path={in}/dangling.json"], None, 2,
     ["tokenizer.path=", "dangling.json", "no such tokenizer file"]),
    ("generate tokenizer folder without one", "generate", [*GENERATE, "tokenizer.path={in}/empty_dir"], None, 2,
     ["tokenizer.path=", "empty_dir", "no such tokenizer file"]),
    ("generate with the run's tokenizer not UTF-8", "generate", ["checkpoint={run}", "prompt=x"],
     write("tokenizer.json", LATIN1), 2, ["tokenizer.json is not UTF-8 text"]),
    ("generate with the run's tokenizer cut short", "generate", ["checkpoint={run}", "prompt=x"],
     cut("tokenizer.json", 200), 2, ["tokenizer.json is not JSON", "cut short?"]),
    ("generate from a folder with config.json not UTF-8", "generate", ["checkpoint={hf}", "prompt=x"],
     write("config.json", LATIN1), 2, ["checkpoint:", "config.json is not UTF-8 text", HF_FIX]),
    ("generate from a folder with config.json a list", "generate", ["checkpoint={hf}", "prompt=x"],
     write("config.json", "[]"), 2, ["config.json holds list, not a JSON object"]),
    ("generate from a folder of another model type", "generate", ["checkpoint={hf}", "prompt=x"],
     edit_json("config.json", model_type="bert"), 2, ["unsupported config.json model_type='bert'"]),
    ("generate from a folder with weights cut short", "generate", ["checkpoint={hf}", "prompt=x"],
     cut("model.safetensors", 500), 2, ["model.safetensors does not load as weights", "cut short?"]),
    ("generate from a folder with tokenizer.json cut short", "generate", ["checkpoint={hf}", "prompt=x"],
     cut("tokenizer.json", 100), 2, ["checkpoint:", "tokenizer.json is not JSON"]),
    ("generate from a folder with tokenizer_config.json not JSON", "generate", ["checkpoint={hf}", "prompt=x"],
     write("tokenizer_config.json", "{oops"), 2, ["tokenizer_config.json is not JSON"]),
    ("generate from a folder without weights", "generate", ["checkpoint={hf}", "prompt=x"],
     remove("model.safetensors"), 2, ["has no weights"]),
    ("speculative draft whose tokenizer is not UTF-8", "generate",
     [*GENERATE, "strategy=speculative", "draft_checkpoint={run}"], write("tokenizer.json", LATIN1), 2,
     ["draft_checkpoint:", "tokenizer.json is not UTF-8 text"]),
    ("generate key that does not exist", "generate", [*GENERATE, "prompts=x"], None, 2,
     ["Could not override 'prompts'", "Key 'prompts' is not in struct"]),
    # -- llm-eval: tasks, run.json, data --
    ("tasks file not UTF-8", "evaluate", [*EVAL[:2], "tasks_file={in}/latin1.jsonl"], None, 2,
     ["tasks_file:", "latin1.jsonl is not UTF-8 text", '"answer": "..."']),
    ("tasks file with a line cut short", "evaluate", [*EVAL[:2], "tasks_file={in}/bad_line.jsonl"], None, 2,
     ["tasks_file=", "line 2 is not JSON"]),
    ("tasks file answer not a string", "evaluate", [*EVAL[:2], "tasks_file={in}/number.jsonl"], None, 2,
     ["line 1 needs a string field 'prompt' ('prompt' is a number)"]),
    ("tasks file without answers", "evaluate", [*EVAL[:2], "tasks_file={in}/sft.jsonl"], None, 2,
     ["line 1 needs a string field 'answer' (it has no 'answer')"]),
    ("tasks file empty", "evaluate", [*EVAL[:2], "tasks_file={in}/empty.jsonl"], None, 2, ["empty.jsonl is empty"]),
    ("tasks file a dangling symlink", "evaluate", [*EVAL[:2], "tasks_file={in}/dangling.jsonl"], None, 2,
     ["tasks_file:", "dangling.jsonl is a broken symbolic link"]),
    ("tasks file a directory", "evaluate", [*EVAL[:2], "tasks_file={in}/a_directory.jsonl"], None, 2,
     ["a_directory.jsonl is a directory, not a file"]),
    ("eval of a run whose run.json is not UTF-8", "evaluate", ["checkpoint={run}"], write("run.json", LATIN1), 2,
     ["run.json is damaged", "not UTF-8"]),
    ("eval of a run whose run.json is a list", "evaluate", ["checkpoint={run}"], write("run.json", "[1]"), 2,
     ["run.json is damaged", "holds list"]),
    ("eval of a run whose run.json is cut short", "evaluate", ["checkpoint={run}"], cut("run.json", 40), 2,
     ["run.json is damaged", "not JSON"]),
    ("eval of a corrupt run", "evaluate", ["checkpoint={run}"], cut_every_checkpoint, 2,
     ["last.ckpt: not a readable checkpoint"]),
    ("eval on text not UTF-8", "evaluate", ["checkpoint={in}/good/run", "data=text",
                                            "data.corpus.paths={in}/latin1.txt"], None, 2,
     ["data.corpus.paths:", "latin1.txt is not UTF-8 text"]),
    ("eval on text files that are not there", "evaluate", ["checkpoint={in}/good/run", "data=text",
                                                           "data.corpus.paths='{in}/nothing/*.txt'"], None, 2,
     ["data.corpus.paths:", "no file matches the pattern"]),
    ("eval of a folder with config.json cut short", "evaluate", ["checkpoint={hf}", "data=stdlib"],
     cut("config.json", 30), 2, ["checkpoint:", "config.json is not JSON", "cut short?"]),
    ("eval key that does not exist", "evaluate", [*EVAL, "task_file=x"], None, 2, ["Could not override 'task_file'"]),
    # -- llm-hf: transformers folders in, checkpoints and folders out --
    ("import a folder that is not there", "hf", ["import", "{in}/nowhere", "{tmp}/out/model.ckpt"], None, 2,
     ["folder:", "nowhere does not exist", HF_FIX]),
    ("import a file as a folder", "hf", ["import", "{in}/notes.ckpt", "{tmp}/out/model.ckpt"], None, 2,
     ["notes.ckpt is a file, not a directory"]),
    ("import a folder without config.json", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"], remove("config.json"), 2,
     ["has no config.json: not a transformers model folder"]),
    ("import config.json not UTF-8", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"], write("config.json", LATIN1), 2,
     ["folder:", "config.json is not UTF-8 text"]),
    ("import config.json cut short", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"], cut("config.json", 50), 2,
     ["config.json is not JSON", "cut short?"]),
    ("import config.json a list", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"], write("config.json", "[1, 2]"), 2,
     ["config.json holds list, not a JSON object"]),
    ("import config.json empty", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"], write("config.json", ""), 2,
     ["config.json is empty"]),
    ("import config.json a directory", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     lambda hf: ((hf / "config.json").unlink(), (hf / "config.json").mkdir()), 2,
     ["config.json is a directory, not a file"]),
    ("import a size given as a string", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     edit_json("config.json", hidden_size="64"), 2, ["config.json holds a value of the wrong type"]),
    ("import zero attention heads", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     edit_json("config.json", num_attention_heads=0), 2, ["config.json holds a value of the wrong type or range"]),
    ("import a million layers", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     edit_json("config.json", num_hidden_layers=10**6), 2,
     ["describes a model outside what we can build", "n_layers=1000000: must be in [1, 1024]"]),
    ("import a config.json the weights do not fit", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     edit_json("config.json", intermediate_size=96), 2, ["do not fit its config.json", "size mismatch"]),
    ("import weights cut short", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"], cut("model.safetensors", 500), 2,
     ["model.safetensors does not load as weights"]),
    ("import weights of text", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     write("model.safetensors", "not weights\n"), 2, ["model.safetensors does not load as weights"]),
    ("import a folder without weights", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     remove("model.safetensors"), 2, ["has no model.safetensors or pytorch_model.bin"]),
    ("import a shard index not JSON", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     lambda hf: ((hf / "model.safetensors").rename(hf / "shard-1.safetensors"),
                 (hf / "model.safetensors.index.json").write_text('{"weight_map": ')), 2,
     ["model.safetensors.index.json is not JSON"]),
    ("import a shard index naming a missing shard", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     lambda hf: ((hf / "model.safetensors").unlink(),
                 (hf / "model.safetensors.index.json").write_text('{"weight_map": {"w": "gone.safetensors"}}')), 2,
     ["gone.safetensors does not exist"]),
    ("import tokenizer.json not UTF-8", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     write("tokenizer.json", LATIN1), 2, ["tokenizer.json is not UTF-8 text"]),
    ("import tokenizer.json a list", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"], write("tokenizer.json", "[]"), 2,
     ["tokenizer.json holds list, not a JSON object"]),
    ("import tokenizer.json of something else", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     write("tokenizer.json", '{"vocab": 1}'), 2, ["tokenizer.json is not a valid tokenizer.json"]),
    ("import special_tokens_map.json a list", "hf", ["import", "{hf}", "{tmp}/out/model.ckpt"],
     write("special_tokens_map.json", "[]"), 2, ["special_tokens_map.json holds list"]),
    ("import into a directory", "hf", ["import", "{in}/hf", "{in}/empty_dir"], None, 2,
     ["out_file:", "empty_dir is a directory", "give the checkpoint file to write"]),
    ("import under a file", "hf", ["import", "{in}/hf", "{in}/notes.ckpt/model.ckpt"], None, 2,
     ["out_file:", "notes.ckpt is a file, not a folder"]),
    ("export into a file", "hf", ["export", "{in}/good/run", "{in}/notes.ckpt"], None, 2,
     ["out_dir:", "notes.ckpt is a file, not a folder"]),
    ("export a run that is not there", "hf", ["export", "{in}/nowhere", "{tmp}/out"], None, 2,
     ["source=", "no such checkpoint file, run directory, or run id"]),
    ("export a checkpoint cut short", "hf", ["export", "{in}/cut.ckpt", "{tmp}/out"], None, 2,
     ["cut.ckpt: not a readable checkpoint"]),
    ("export a run whose tokenizer is not UTF-8", "hf", ["export", "{run}", "{tmp}/out"],
     write("tokenizer.json", LATIN1), 2, ["tokenizer.json is not UTF-8 text"]),
    # -- llm-bench: the files it reads, its own keys --
    ("bench with a tokenizer not UTF-8", "bench", ["model=nano", "tokenizer=pretrained",
                                                   "tokenizer.path={in}/latin1.json", "paths.runs_dir={tmp}/runs"],
     None, 2, ["tokenizer.path:", "latin1.json is not UTF-8 text"]),
    ("bench steps a word", "bench", ["model=nano", "bench.steps=many", "paths.runs_dir={tmp}/runs"], None, 2,
     ["bench.steps='many'", "could not be converted to Integer"]),
    ("bench nothing to time", "bench", ["model=nano", "bench.steps=0", "bench.repeats=-1", "paths.runs_dir={tmp}/runs"],
     None, 2, ["bench.steps=0: must be in [1, 1000000]", "bench.repeats=-1: must be in [1, 1000]"]),
    ("bench key that does not exist", "bench", ["model=nano", "bench.step=3", "paths.runs_dir={tmp}/runs"], None, 2,
     ["Could not override 'bench.step'"]),
]

# Every numeric key of the training groups with the values users get wrong. A number out of range
# is refused by validation, every key of a command line at once: one command line per value covers
# a whole stage. A value of the wrong type (a word, or nan / inf / 1e30 for an integer) is refused
# by Hydra while it composes, one key at a time: a key of each group stands for the rest.
HUGE = "1099511627776"  # 2^40: past every declared maximum (sizes, lengths, counts)
SIZES = ("n_layers", "d_model", "n_heads", "head_dim", "max_seq_len", "vocab_size", "mlp_hidden",
         "attention.n_kv_heads")


def pretraining(value: str, floats: bool = True, ints: bool = True, huge: bool = False) -> dict[str, str]:
    """Every numeric key of data.*, optim.*, schedule.* (wsd), budget.* and model.* set to `value`
    (floats: the float keys; ints: the integer ones; huge: no budget key, a huge budget is only long)."""
    keys = {}
    if ints:
        keys.update({f"data.{k}": value for k in ("seq_len", "micro_batch_size", "global_batch_size")})
        keys.update({f"model.{k}": value for k in SIZES})
        keys.update({} if huge else {"budget.steps": value})
    if floats:
        keys.update({"optim.lr": value, "optim.eps": value, "optim.betas": f"[0.9,{value}]"})
        keys.update({f"schedule.{k}": value for k in ("warmup", "decay_fraction", "min_lr_ratio")})
        keys["schedule.branches"] = f"[{value}]"
        keys.update({} if huge else {f"budget.{k}": value for k in ("tokens", "flops", "tokens_per_param")})
        keys.update({f"model.{k}": value for k in ("norm_eps", "dropout", "init_std", "position.rope_base")})
    return keys


def alternating(values: tuple[str, ...], *keys: str) -> dict[str, str]:
    """The keys given the values in turn (nan, inf, nan, ...): each key one bad value per command line."""
    return {key: values[i % len(values)] for i, key in enumerate(keys)}


WSD = [*BYTES, "schedule=wsd"]
ZERO_ALLOWED = {"schedule.warmup", "schedule.decay_fraction", "schedule.min_lr_ratio", "model.dropout", "optim.betas"}
PPO, PPO_FLOATS = [*POST, "posttrain=ppo"], ("temperature", "kl_coef", "kl_target", "cliprange", "cliprange_value",
                                              "vf_coef", "gamma", "lam")
PPO_INTS = ("max_new_tokens", "samples_every_n_steps", "num_ppo_epochs", "num_mini_batches", "kl_horizon")
SFT_DATA = ("n_train", "n_val", "max_prompt_length", "eval_max_new_tokens")
NUMERIC_CASES: list[Case] = [
    (name, "train", args, None, 2, phrases) for name, args, phrases in [
        # pretraining: data.*, optim.*, schedule.*, budget.*, model.*
        ("pretraining numbers nan and inf", *every(WSD, {k: v.replace("nan", "inf") if i % 2 else v for i, (k, v)
                                                         in enumerate(pretraining("nan", ints=False).items())},
                                                    ("must be finite",))),
        ("pretraining numbers -1", *every(WSD, {**pretraining("-1"), "data.val_batches": "-1",
                                                "optim.weight_decay": "-1"})),
        ("pretraining numbers 0", *every(WSD, {k: v for k, v in pretraining("0").items() if k not in ZERO_ALLOWED})),
        ("pretraining numbers huge", *every(WSD, {**pretraining(HUGE, floats=False, huge=True),
                                                  **pretraining("1e30", ints=False, huge=True)})),
        ("model size nan on the ladder", [*BYTES[1:], "model=ladder", "model.size=nan"],
         ["  - model.size=nan: must be a number of non-embedding parameters"]),
        ("optim weight decay huge", [*BYTES, "optim.weight_decay=1e30"],
         ["optim.weight_decay=1e+30", "1 - lr x weight_decay"]),
        ("schedule warmup longer than the run", [*BYTES, "schedule.warmup=5"],
         ["schedule.warmup=5", "longer than the run (budget.steps=2)", "1..2 steps"]),
        ("data.seq_len nan", *composing(BYTES, "data.seq_len", "nan", "Integer")),
        ("optim.lr a word", *composing(BYTES, "optim.lr", "fast", "Float")),
        ("budget.steps 1e30", *composing(BYTES, "budget.steps", "1e30", "Integer")),
        # model=ladder derives its shape from model.size: the message names model.size, not n_layers
        ("model size huge on the ladder", [*BYTES, "model=ladder", "model.size=1e30"], ["model.size=1e+30: must be"]),
        # post-training: each method's keys (posttrain.*, its data and LoRA)
        ("sft numbers nan and inf", *every(SFT, alternating(("nan", "inf"), "posttrain.data.val_fraction",
                                                            "posttrain.lora.alpha", "posttrain.lora.dropout"))),
        ("sft numbers -1 and 0", *every(SFT, {
            **alternating(("-1", "0"), *(f"posttrain.data.{k}" for k in SFT_DATA), "posttrain.lora.rank",
                          "posttrain.data.val_fraction"),
            "posttrain.data.seed": "-1", "posttrain.data.eval_prompts": "-1", "posttrain.lora.alpha": "-1",
            "posttrain.lora.dropout": "-1"})),
        ("sft numbers huge", *every(SFT, {**{f"posttrain.data.{k}": HUGE for k in (*SFT_DATA, "eval_prompts")},
                                          "posttrain.lora.rank": HUGE, "posttrain.data.val_fraction": "1e30",
                                          "posttrain.lora.dropout": "1e30", "posttrain.lora.alpha": "1e30"})),
        ("posttrain.data.n_train a word", *composing(SFT, "posttrain.data.n_train", "many", "Integer")),
        ("dpo numbers nan and inf", *every(DPO, alternating(("nan", "inf"), "posttrain.beta",
                                                            "posttrain.label_smoothing", "posttrain.rpo_alpha"))),
        ("dpo numbers 0, -1 and huge", *every(DPO, {"posttrain.beta": "0", "posttrain.rpo_alpha": "-1",
                                                    "posttrain.label_smoothing": "1e30"})),
        ("dpo numbers huge", *every(DPO, {"posttrain.beta": "1e30", "posttrain.rpo_alpha": "1e30"})),
        ("reward numbers nan and inf", *every(REWARD, {"posttrain.margin": "nan",
                                                       "posttrain.center_rewards_coefficient": "inf"})),
        ("reward numbers -inf and -1", *every(REWARD, {"posttrain.margin": "-inf",
                                                       "posttrain.center_rewards_coefficient": "-1"})),
        ("ppo numbers nan and inf", *every(PPO, alternating(("nan", "inf"), *(f"posttrain.{k}" for k in PPO_FLOATS)))),
        ("ppo numbers -1 and 0", *every(PPO, {**{f"posttrain.{k}": "-1" for k in PPO_FLOATS},
                                              **{f"posttrain.{k}": "0" for k in PPO_INTS}})),
        ("ppo numbers huge", *every(PPO, {"posttrain.gamma": "1e30", "posttrain.lam": "1e30",
                                          **{f"posttrain.{k}": HUGE for k in ("max_new_tokens", "num_ppo_epochs",
                                                                              "num_mini_batches")}})),
        ("grpo numbers nan and inf", *every(GRPO, alternating(("nan", "inf", "inf", "nan"), "posttrain.temperature",
                                                              "posttrain.beta", "posttrain.epsilon",
                                                              "posttrain.epsilon_high"))),
        ("grpo numbers -1, 0 and 1", *every(GRPO, {"posttrain.temperature": "0", "posttrain.beta": "-1",
                                                   "posttrain.epsilon": "0", "posttrain.epsilon_high": "-1",
                                                   "posttrain.num_generations": "1", "posttrain.num_iterations": "0",
                                                   "posttrain.max_new_tokens": "-1"})),
        ("ppo coefficients huge", *every(PPO, {f"posttrain.{k}": "1e30" for k in (
            "kl_coef", "kl_target", "cliprange", "cliprange_value", "vf_coef", "temperature")})),
        ("grpo coefficients huge", *every(GRPO, {"posttrain.beta": "1e30", "posttrain.epsilon_high": "1e30"})),
        ("grpo numbers huge", *every(GRPO, {"posttrain.epsilon": "1e30", "posttrain.num_generations": HUGE,
                                            "posttrain.num_iterations": HUGE, "posttrain.max_new_tokens": HUGE})),
        ("posttrain.num_generations inf", *composing(GRPO, "posttrain.num_generations", "inf", "Integer")),
    ]
]

# llm-generate's and llm-eval's own numbers, checked before any model is loaded.
GENERATION_CASES: list[Case] = [(name, command, args, None, 2, phrases) for name, command, args, phrases in [
    ("generate numbers -1", "generate", *every(GENERATE, {
        "max_new_tokens": "-1", "temperature": "-1", "top_k": "-1", "top_p": "-1", "beam_width": "-1",
        "speculative_k": "-1", "batch_size": "-1"})),
    ("generate numbers 0", "generate", *every(GENERATE, {
        "max_new_tokens": "0", "top_k": "0", "top_p": "0", "beam_width": "0", "speculative_k": "0",
        "batch_size": "0"})),
    ("generate numbers nan and inf", "generate", *every(GENERATE, {"temperature": "nan", "top_p": "inf"},
                                                        ("must be finite",))),
    ("generate top_p above 1", "generate", *every(GENERATE, {"top_p": "1.5"}, ("must be in (0, 1]",))),
    ("sampling at temperature 0", "generate", [*GENERATE, "strategy=sample", "temperature=0"],
     ["temperature=0: strategy=sample needs temperature > 0"]),
    ("max_new_tokens 1e30", "generate", [*GENERATE, "max_new_tokens=1e30"],
     ["max_new_tokens=", "could not be converted to Integer"]),
    ("top_k a word", "generate", [*GENERATE, "top_k=ten"], ["top_k='ten'", "could not be converted"]),
    ("temperature a word", "generate", [*GENERATE, "temperature=hot"],
     ["temperature='hot'", "could not be converted to Float"]),
    ("batch_size inf", "generate", [*GENERATE, "batch_size=inf"],
     ["batch_size=", "could not be converted to Integer"]),
    ("generate numbers huge", "generate", *every(GENERATE, {"max_new_tokens": "1099511627776",
                                                            "beam_width": "1099511627776", "top_p": "1e30"})),
    ("an empty stop string", "generate", [*GENERATE, "stop=['']"], ["stop[0]='': a stop string must be non-empty"]),
    ("eval numbers -1", "evaluate", *every(EVAL, {"seq_len": "-1", "batch_size": "-1", "max_batches": "-1",
                                                  "task_max_new_tokens": "-1"})),
    ("eval numbers 0", "evaluate", *every(EVAL, {"seq_len": "0", "batch_size": "0", "max_batches": "0",
                                                 "task_max_new_tokens": "0"})),
    ("eval seq_len nan", "evaluate", [*EVAL, "seq_len=nan"], ["seq_len=", "could not be converted to Integer"]),
    ("eval batch_size a word", "evaluate", [*EVAL, "batch_size=big"],
     ["batch_size='big'", "could not be converted to Integer"]),
    ("eval seq_len longer than the val split", "evaluate", [*EVAL, "perplexity=true", "seq_len=100000"],
     ["seq_len=100000: the val split of", "too few for one block of 100001", "give a seq_len <="]),
    ("eval numbers huge", "evaluate", *every(EVAL, {"seq_len": "1099511627776",
                                                    "task_max_new_tokens": "1099511627776"})),
]]

CASES: list[Case] = [*FILE_CASES, *NUMERIC_CASES, *GENERATION_CASES]


@pytest.mark.parametrize("name,command,args,damage,code,phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_writes_nothing_mistakable(name, command, args, damage, code, phrases, inputs,
                                                               one_composition, tmp_path, monkeypatch, capsys,
                                                               single_thread):
    copies = {}
    for mark, source in (("{run}", inputs / "good" / "run"), ("{hf}", inputs / "hf")):
        if any(mark in a for a in args):
            how = (lambda r: foreign_checkpoint(r, inputs)) if damage == "foreign" else damage
            copies[mark] = str(damaged_copy(source, tmp_path, how))
    args = [a.replace("{in}", str(inputs)).replace("{tmp}", str(tmp_path)) for a in args]
    for mark, copy in copies.items():
        args = [a.replace(mark, copy) for a in args]
    before = snapshot(tmp_path, inputs)
    exit_code, stderr = llm_cli(command, args, tmp_path, monkeypatch, capsys)
    assert exit_code == code, stderr[-3000:]
    for phrase in phrases:
        assert phrase in stderr, f"{phrase!r} not in: {stderr[-2000:]}"
    assert "Traceback" not in stderr
    assert_nothing_mistakable(before, tmp_path, inputs)


def test_the_table_covers_every_reader_and_every_numeric_group():
    assert len(CASES) > 100 and len({c[0] for c in CASES}) == len(CASES)
    ids = " ".join(c[0] for c in CASES)
    for reader in ("text file", "tokenizer", "sft rows", "dpo pairs", "grpo prompts", "prompts file", "tasks file",
                   "config.json", "tokenizer.json", "run.json", "held-out rows", "run's tokenizer"):
        assert f"{reader} not UTF-8" in ids or f"{reader} is not UTF-8" in ids, reader
    numeric = [c[0] for c in [*NUMERIC_CASES, *GENERATION_CASES]]
    for group in ("pretraining", "sft", "dpo", "reward", "ppo", "grpo", "generate", "eval"):
        # (reward's two keys have no upper bound: no huge value is wrong for them)
        for value in ("nan", "-1", "huge") if group != "reward" else ("nan", "-1"):
            assert any(name.startswith(group) and value in name for name in numeric), (group, value)
