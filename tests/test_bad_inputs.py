"""Bad inputs (files, data, checkpoints, config keys) through the real entry points: each exits with
its documented code, says what is wrong and how to fix it, and leaves nothing a later run or
tool could mistake for good output. Configs alone are covered by tests/test_config.py's table."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

from llm.tokenizer import build_tokenizer
from llm.tracking.metrics import read_metrics
from llm.train import train
from tests.conftest import TINY_RUN, compose_train

BYTES = ["model=nano", "tokenizer=byte", "data.seq_len=64", "data.micro_batch_size=8", "logger=none",
         "trainer.progress_bar=false", "budget.steps=2", "trainer.val_every=2"]
TEXT = [*BYTES, "data=text"]
PROSE = "The quick brown fox jumps over the lazy dog. " * 400  # ~18 kB of plain ASCII


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The files the cases point at, and two finished runs (nano, and a 1-layer nano) to damage."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 500)
    (root / "binaries").mkdir()
    for i in range(3):
        (root / "binaries" / f"blob{i}.txt").write_bytes(bytes(range(128, 256)) * 40)
    (root / "tiny.txt").write_text("too short\n")
    (root / "short_val.txt").write_text(PROSE[:1000])  # val: the last 5% = 50 characters < one 65-token block
    (root / "a_directory.txt").mkdir()
    (root / "dangling.txt").symlink_to(root / "nowhere.txt")
    (root / "not_json.json").write_text("{this is not json")
    (root / "empty.json").write_text("")
    (root / "not_a_tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    build_tokenizer(None, root, kind="byte").save(root / "byte_tokenizer.json")
    (root / "garbage.ckpt").write_bytes(bytes(range(256)) * 64)
    (root / "notes.ckpt").write_text("not a checkpoint\n")
    for name, extra in (("good", []), ("other", ["model.n_layers=1"])):
        summary = train(compose_train([*TINY_RUN, "budget.steps=2", "trainer.val_every=2", "trainer.checkpoint_every=1",
                                       *extra], root / name))
        assert summary["status"] == "completed"
    return root


def llm_cli(command: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run `llm-<command> args` in this process, as from a shell in `cwd`: (exit code, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [f"llm-{command}", *args])
    module = importlib.import_module(f"llm.cli.{command}")
    code = 0
    try:
        module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def assert_nothing_mistakable(root: Path, before: dict[str, tuple[int, int]]) -> None:
    """No new or changed checkpoint, no metrics, no summary claiming a finished run."""
    for rel, stamp in snapshot(root).items():
        if before.get(rel) == stamp:
            continue
        path = root / rel
        assert not path.name.endswith(".ckpt"), f"a checkpoint was written: {rel}"
        assert path.name != "metrics.jsonl" or not read_metrics(path), f"metrics were written: {rel}"
        if path.name == "summary.json":
            assert json.loads(path.read_text())["status"] not in ("completed", "running"), rel


def run_copy(inputs: Path, tmp: Path, damage: Callable[[Path], None]) -> Path:
    run = tmp / "runs" / "damaged"
    shutil.copytree(inputs / "good" / "run", run, symlinks=True)
    damage(run)
    return run


def cut_every_checkpoint(run: Path) -> None:
    for path in (run / "checkpoints").glob("*.ckpt"):
        if not path.is_symlink():
            path.write_bytes(path.read_bytes()[:1000])


def foreign_checkpoint(run: Path, inputs: Path) -> None:
    shutil.copyfile(inputs / "other" / "run" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def damage_run_json(content: str) -> Callable[[Path], None]:
    return lambda run: (run / "run.json").write_text(content)


# (id, command, arguments ({in}: the inputs folder, {run}: a damaged copy of a finished run),
#  damage for {run}, exit code, phrases the message must contain)
CASES: list[tuple[str, str, list[str], Optional[Callable], int, list[str]]] = [
    # -- data files --
    ("text file missing", "train", [*TEXT, "data.corpus.paths={in}/missing.txt"], None, 2,
     ["data.corpus.paths=", "missing.txt", "no file matches", "give text files"]),
    ("text glob matching nothing", "train", [*TEXT, "data.corpus.paths={in}/binaries/*.md"], None, 2,
     ["no file matches the pattern", "*.md"]),
    ("text path is a directory", "train", [*TEXT, "data.corpus.paths={in}/a_directory.txt"], None, 2,
     ["no file matches", "a_directory.txt"]),
    ("text path is a dangling symlink", "train", [*TEXT, "data.corpus.paths={in}/dangling.txt"], None, 2,
     ["no file matches", "dangling.txt"]),
    ("text paths empty", "train", [*TEXT, "data.corpus.paths=[]"], None, 2, ["data.corpus.paths", "no pattern given"]),
    ("text file empty", "train", [*TEXT, "data.corpus.paths={in}/empty.txt"], None, 2,
     ["no documents in split 'train'", "empty, unreadable, or not UTF-8", "point data.corpus at text files"]),
    ("text file not UTF-8", "train", [*TEXT, "data.corpus.paths={in}/latin1.txt"], None, 2,
     ["latin1.txt", "no documents", "not UTF-8"]),
    ("text files all binary", "train", [*TEXT, "data.corpus.paths='{in}/binaries/*.txt'"], None, 2,
     ["no documents in split", "not UTF-8"]),
    ("text too short for one block", "train", [*TEXT, "data.corpus.paths={in}/tiny.txt"], None, 2,
     ["data.seq_len=64", "the train split has only", "too few for one block", "smaller data.seq_len"]),
    ("val split too short for one block", "train", [*TEXT, "data.corpus.paths={in}/short_val.txt"], None, 2,
     ["data.seq_len=64", "the val split has only 51 tokens"]),
    # -- tokenizer files --
    ("tokenizer file missing", "train", [*BYTES, "tokenizer=pretrained", "tokenizer.path={in}/nope.json"], None, 2,
     ["tokenizer.path=", "tokenizer file not found", "nope.json"]),
    ("tokenizer folder without tokenizer.json", "train", [*BYTES, "tokenizer=pretrained", "tokenizer.path={in}/binaries"],
     None, 2, ["tokenizer file not found", "binaries/tokenizer.json"]),
    ("tokenizer not JSON", "train", [*BYTES, "tokenizer=pretrained", "tokenizer.path={in}/not_json.json"], None, 2,
     ["not_json.json is not a valid tokenizer.json"]),
    ("tokenizer empty file", "train", [*BYTES, "tokenizer=pretrained", "tokenizer.path={in}/empty.json"], None, 2,
     ["empty.json is not a valid tokenizer.json"]),
    ("tokenizer JSON of something else", "train",
     [*BYTES, "tokenizer=pretrained", "tokenizer.path={in}/not_a_tokenizer.json"], None, 2,
     ["not_a_tokenizer.json is not a valid tokenizer.json"]),
    ("tokenizer vocabulary larger than the model's", "train",
     [*BYTES, "tokenizer=pretrained", "tokenizer.path={in}/byte_tokenizer.json", "model.vocab_size=100"], None, 2,
     ["model.vocab_size=100", "smaller than the tokenizer's vocabulary (259)", "null to take it from the tokenizer"]),
    # -- runs and checkpoints --
    ("resume of a missing directory", "train", ["resume={in}/no_such_run"], None, 2, ["not a run directory", "run.json"]),
    ("resume with run.json not JSON", "train", ["resume={run}"], damage_run_json("{oops"), 2,
     ["run.json is damaged", "start a new run"]),
    ("resume with run.json without a config", "train", ["resume={run}"], damage_run_json('{"run_id": "x"}'), 2,
     ["run.json is damaged", "no config or choices"]),
    ("resume with every checkpoint corrupt", "train", ["resume={run}"], cut_every_checkpoint, 2,
     ["no checkpoint of the run loads", "last.ckpt", "set aside as *.corrupt", "start over from step 0"]),
    ("resume from another architecture's checkpoint", "train", ["resume={run}"], "foreign", 2,
     ["another architecture", "model.n_layers=1 there, 2 here", "start a new run"]),
    ("resume with a changed architecture", "train", ["resume={run}", "model.n_layers=3"], lambda run: None, 2,
     ["another architecture", "model.n_layers=2 there, 3 here"]),
    ("generate from garbage", "generate", ["checkpoint={in}/garbage.ckpt", "prompt=x",
                                           "tokenizer.path={in}/byte_tokenizer.json"], None, 2,
     ["garbage.ckpt: not a readable checkpoint", "not a whole checkpoint archive"]),
    ("generate from a text file", "generate", ["checkpoint={in}/notes.ckpt", "prompt=x",
                                               "tokenizer.path={in}/byte_tokenizer.json"], None, 2,
     ["notes.ckpt: not a readable checkpoint"]),
    ("eval of a corrupt run", "evaluate", ["checkpoint={run}"], cut_every_checkpoint, 2,
     ["last.ckpt: not a readable checkpoint"]),
    # -- the reliability keys --
    ("keep no checkpoint", "train", [*BYTES, "trainer.keep_last=0"], None, 2, ["trainer.keep_last=0", "must be >= 1"]),
    ("negative rollbacks", "train", [*BYTES, "trainer.guard.max_rollbacks=-1"], None, 2,
     ["trainer.guard.max_rollbacks=-1", "must be >= 0"]),
    ("zero spike threshold", "train", [*BYTES, "trainer.guard.spike_threshold=0"], None, 2,
     ["trainer.guard.spike_threshold=0", "or null to judge only non-finite losses"]),
    ("empty guard window", "train", [*BYTES, "trainer.guard.window=0"], None, 2, ["trainer.guard.window=0", ">= 1"]),
    ("negative batch to skip", "train", [*BYTES, "trainer.guard.skip_batches=[3,-1]"], None, 2,
     ["trainer.guard.skip_batches=[3, -1]", ">= 0"]),
    ("guard switch not a bool", "train", [*BYTES, "trainer.guard.enabled=sometimes"], None, 2,
     ["trainer.guard.enabled", "sometimes", "not a valid bool"]),
    ("unknown guard key", "train", [*BYTES, "trainer.guard.threshold=3"], None, 2,
     ["trainer.guard.threshold", "not in 'GuardSchema'"]),
]


@pytest.mark.parametrize("name,command,args,damage,code,phrases", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_writes_nothing_mistakable(name, command, args, damage, code, phrases, inputs,
                                                               tmp_path, monkeypatch, capsys, single_thread):
    run = None
    if damage is not None:
        run = run_copy(inputs, tmp_path, (lambda r: foreign_checkpoint(r, inputs)) if damage == "foreign" else damage)
    args = [a.replace("{in}", str(inputs)).replace("{run}", str(run)) for a in args]
    before = snapshot(tmp_path)
    exit_code, stderr = llm_cli(command, args, tmp_path, monkeypatch, capsys)
    assert exit_code == code, stderr[-3000:]
    for phrase in phrases:
        assert phrase in stderr, f"{phrase!r} not in: {stderr[-2000:]}"
    assert "Traceback" not in stderr
    assert_nothing_mistakable(tmp_path, before)


def test_the_table_covers_at_least_fifteen_file_and_data_inputs():
    file_cases = [c for c in CASES if not c[2][-1].startswith("trainer.")]
    assert len(file_cases) >= 15 and len(CASES) >= 30
