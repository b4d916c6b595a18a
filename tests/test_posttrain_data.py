"""Post-training data: synthetic tasks and rewards, TRL formats, tokenisation, packing, collation,
and the resumable rank-sharded PostTrainDataModule."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from llm.cli.common import exit_on_config_error
from llm.config import ConfigError
from llm.data.corpus import hash_fraction
from llm.data.formats import (
    FORMATS,
    ChatTemplate,
    DatasetError,
    Message,
    PreferenceExample,
    PromptExample,
    SFTExample,
    detect_format,
    load_rows,
    parse_rows,
    read_examples,
)
from llm.data.posttrain import (
    IGNORE_INDEX,
    TokenizedExample,
    collate_preferences,
    collate_prompts,
    collate_sft,
    collator,
    pack,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from llm.data.posttrain_datamodule import ExampleStream, PostTrainDataModule, validation_batches
from llm.data.tasks import (
    TASKS,
    TaskCorpus,
    TaskMix,
    cut_completion,
    exact_match,
    make_task,
    score,
)
from llm.tokenizer import build_tokenizer
from llm.tokenizer.tokenizer import EOS


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(None, tmp_path_factory.mktemp("cache"), kind="byte")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))  # the byte tokenizer's ids


# ---------------------------------------------------------------- synthetic tasks


def true_answer(prompt: str) -> str:
    """Each task's answer recomputed from its prompt, independently of llm.data.tasks."""
    if m := re.fullmatch(r"(\d+)\+(\d+)=", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"sort ([\d,]+)=", prompt):
        return ",".join(map(str, sorted(int(x) for x in m[1].split(","))))
    if m := re.fullmatch(r"copy (\w+)=", prompt):
        return m[1]
    if m := re.fullmatch(r"count (\w) in (\w+)=", prompt):
        return str(m[2].count(m[1]))
    raise AssertionError(f"unexpected prompt {prompt!r}")


def test_task_samples_are_correct_short_and_follow_the_knobs():
    mix = TaskMix({"addition": {"max_digits": 2}, "sorting": {"max_length": 4, "max_value": 5},
                   "copying": {"max_length": 6, "alphabet": "xyz"}, "counting": {"max_length": 7}}, seed=3)
    samples = mix.samples(800, "train")
    assert {s.task for s in samples} == set(TASKS)
    for s in samples:
        assert s.answer == true_answer(s.prompt), s
        assert s.meta == {"task": s.task, "answer": s.answer}
        assert len(s.prompt) <= 20 and "\n" not in s.prompt + s.answer
    additions = [re.fullmatch(r"(\d+)\+(\d+)=", s.prompt) for s in samples if s.task == "addition"]
    assert max(max(len(m[1]), len(m[2])) for m in additions) == 2
    sorts = [s.answer.split(",") for s in samples if s.task == "sorting"]
    assert max(map(len, sorts)) == 4 and max(int(x) for items in sorts for x in items) == 5
    assert set("".join(s.answer for s in samples if s.task == "copying")) == set("xyz")


def test_task_mix_is_seeded_and_weighted():
    a, b = TaskMix(seed=1).samples(300, "train"), TaskMix(seed=1).samples(300, "train")
    assert a == b
    assert TaskMix(seed=1).samples(100, "train") == a[:100]  # a prefix: n does not change the draw
    assert TaskMix(seed=2).samples(300, "train") != a
    rows = TaskMix(seed=1).preference_rows(300, "train")
    assert [r["prompt"] for r in rows] == [s.prompt for s in a]  # every generator draws the same prompts
    assert [r["prompt"] for r in TaskMix(seed=1).prompt_rows(300, "train")] == [s.prompt for s in a]
    weighted = TaskMix(["addition", "copying"], seed=0, weights={"addition": 3}).samples(2000, "train")
    share = sum(s.task == "addition" for s in weighted) / len(weighted)
    assert share == pytest.approx(0.75, abs=0.04)


def test_train_and_held_out_prompts_are_disjoint():
    train = {s.prompt for s in TaskMix(seed=0, val_fraction=0.2).samples(3000, "train")}
    val = {s.prompt for s in TaskMix(seed=0, val_fraction=0.2).samples(600, "val")}
    other_seed_val = {s.prompt for s in TaskMix(seed=7, val_fraction=0.2).samples(600, "val")}
    assert len(val) > 300 and not train & val and not train & other_seed_val
    assert all(hash_fraction(p) < 0.2 for p in val) and all(hash_fraction(p) >= 0.2 for p in train)
    # A tiny task space that holds no val prompt is an error, not a hang.
    with pytest.raises(ValueError, match="too few prompts"):
        TaskMix({"addition": {"max_digits": 1}}, val_fraction=0.005).samples(5, "val")  # 100 prompts, none < 0.005


def test_score_exact_match_and_partial_credit():
    meta = {"task": "addition", "answer": "357"}
    for right in ("357", " 357 ", "357\n12+1=13", f"357{EOS}junk"):
        assert score(right, meta) == 1.0 and exact_match(right, "357")
    for wrong in ("358", "35", "3570", "", "\n357"):
        assert score(wrong, meta) == 0.0
    assert cut_completion("1,2\n3") == "1,2"
    assert score("358", meta, partial=True) == pytest.approx(2 / 3)  # two of three characters
    assert score("357", meta, partial=True) == 1.0
    assert score("0,1,3,2", {"task": "sorting", "answer": "0,1,2,3"}, partial=True) == 0.5  # two of four items
    assert score("4", {"task": "counting", "answer": "3"}, partial=True) == pytest.approx(0.75)
    assert score("x", {"task": "counting", "answer": "3"}, partial=True) == 0.0
    assert score("ab", {"task": "my-task", "answer": "abc"}, partial=True) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="answer"):
        score("1", {"task": "addition"})


@pytest.mark.parametrize("name", list(TASKS))
def test_preference_pairs_reject_a_plausible_wrong_answer(name):
    rows = TaskMix([name], seed=5).preference_rows(500, "train")
    for row in rows:
        assert row["chosen"] == row["answer"] == true_answer(row["prompt"])
        assert row["rejected"] != row["chosen"]
        assert score(row["chosen"], row) == 1.0 and score(row["rejected"], row) == 0.0
        assert 0.0 <= score(row["rejected"], row, partial=True) < 1.0
    # Plausible: shaped like a valid answer, close to the right one (length give or take one,
    # mostly right characters).
    shape = {"addition": r"0|[1-9]\d*", "sorting": r"\d(,\d)*", "copying": r"[a-z]+", "counting": r"\d+"}[name]
    assert all(re.fullmatch(shape, r["rejected"]) for r in rows)
    close = [abs(len(r["rejected"]) - len(r["chosen"])) <= 1 for r in rows]
    assert all(close)
    assert sum(score(r["rejected"], r, partial=True) for r in rows) / len(rows) > 0.3


def test_task_knobs_are_checked():
    with pytest.raises(ValueError, match="unknown task 'division'"):
        make_task("division")
    with pytest.raises(ValueError, match="task 'addition'.*max_length"):
        make_task("addition", max_length=3)
    with pytest.raises(ValueError, match="min <= max"):
        make_task("sorting", min_length=4, max_length=2)
    with pytest.raises(ValueError, match="alphabet"):
        make_task("copying", alphabet="a")
    with pytest.raises(ValueError, match="not in the mix"):
        TaskMix(["addition"], weights={"sorting": 1.0})


def test_task_corpus_renders_lines_of_its_split():
    corpus = TaskCorpus(["addition", "counting"], seed=0, n_documents=3, val_documents=2, samples_per_document=10)
    train, val = list(corpus.documents("train")), list(corpus.documents("val"))
    assert len(train) == 3 and len(val) == 2
    lines = [line for doc in train for line in doc.splitlines()]
    assert len(lines) == 30
    for line in lines:
        prompt, answer = line.split("=")
        assert answer == true_answer(prompt + "=") and hash_fraction(prompt + "=") >= 0.1
    assert all(hash_fraction(line.split("=")[0] + "=") < 0.1 for doc in val for line in doc.splitlines())
    assert train[0] == TaskMix(["addition", "counting"], seed=0).pretraining_text(10, "train")
    fp = corpus.fingerprint()
    assert fp == TaskCorpus(["addition", "counting"], seed=0, n_documents=3, val_documents=2,
                            samples_per_document=10).fingerprint()
    assert fp != TaskCorpus(["addition", "counting"], seed=1, n_documents=3, val_documents=2,
                            samples_per_document=10).fingerprint()


# ---------------------------------------------------------------- formats


CHAT = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
ROWS = {
    "text": {"text": "12+3=15"},
    "prompt_completion": {"prompt": "12+3=", "completion": "15"},
    "messages": {"messages": CHAT},
    "preference": {"prompt": "12+3=", "chosen": "15", "rejected": "16"},
    "implicit_preference": {"chosen": "Q: 12+3= 15", "rejected": "Q: 12+3= 25"},
    "prompt_only": {"prompt": "12+3=", "task": "addition", "answer": "15"},
}
KIND = {"text": "sft", "prompt_completion": "sft", "messages": "sft", "preference": "preference",
        "implicit_preference": "preference", "prompt_only": "prompt"}
EXPECTED = {
    "text": SFTExample((("12+3=15", True),)),
    "prompt_completion": SFTExample((("12+3=", False), ("15", True))),
    "messages": SFTExample((("user: 2+2=\nassistant: ", False), ("4\n", True))),
    "preference": PreferenceExample("12+3=", "15", "16"),
    "implicit_preference": PreferenceExample("Q: 12+3=", " 15", " 25"),  # TRL's split: the space goes with the answers
    "prompt_only": PromptExample("12+3=", {"task": "addition", "answer": "15"}),
}


def _plain(example):
    """An example without its `where`, segments as (text, trained) pairs."""
    if isinstance(example, SFTExample):
        return SFTExample(tuple((s.text, s.trained) for s in example.segments))
    return type(example)(**{k: v for k, v in vars(example).items() if k != "where"})


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_is_detected_and_read_from_jsonl(tmp_path, fmt):
    assert detect_format(ROWS[fmt]) == fmt
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[fmt], "", ROWS[fmt]])  # a blank line is skipped
    examples = read_examples(path, KIND[fmt])
    assert [_plain(e) for e in examples] == [EXPECTED[fmt]] * 2
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:3"]
    assert [_plain(e) for e in read_examples(path, KIND[fmt], format=fmt)] == [EXPECTED[fmt]] * 2


def test_conversational_rows_and_a_custom_chat_template():
    template = ChatTemplate("<{role}>{content}</{role}>\n", generation_prompt="<assistant>")
    convo = [{"role": "system", "content": "be brief"}, *CHAT, {"role": "user", "content": "3+3="},
             {"role": "assistant", "content": "6"}]
    [example] = parse_rows(load_rows([{"messages": convo}]), "sft", template=template)
    assert [(s.text, s.trained) for s in example.segments] == [
        ("<system>be brief</system>\n<user>2+2=</user>\n<assistant>", False), ("4</assistant>\n", True),
        ("<user>3+3=</user>\n<assistant>", False), ("6</assistant>\n", True)]
    # Conversational prompt/completion trains only the completion's assistant turns.
    [pc] = parse_rows(load_rows([{"prompt": convo[:2], "completion": convo[2:3]}]), "sft", template=template)
    assert [(s.text, s.trained) for s in pc.segments] == [
        ("<system>be brief</system>\n<user>2+2=</user>\n<assistant>", False), ("4</assistant>\n", True)]
    # Conversational preferences (explicit and implicit prompt) and prompts end at the generation prompt.
    prompt_text = "<user>2+2=</user>\n<assistant>"
    explicit = {"prompt": CHAT[:1], "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}]}
    implicit = {"chosen": CHAT, "rejected": [CHAT[0], {"role": "assistant", "content": "5"}]}
    for row in (explicit, implicit):
        [pair] = parse_rows(load_rows([row]), "preference", template=template)
        assert (pair.prompt, pair.chosen, pair.rejected) == (prompt_text, "4</assistant>\n", "5</assistant>\n")
    [prompt] = parse_rows(load_rows([{"prompt": CHAT[:1], "answer": "4"}]), "prompt", template=template)
    assert (prompt.prompt, prompt.meta) == (prompt_text, {"answer": "4"})
    assert ChatTemplate().generation_prompt == "assistant: "  # derived from the turn by default
    # A generation prompt of its own opens every assistant turn, in training as in generation.
    alpaca = ChatTemplate("### {role}\n{content}\n", generation_prompt="### Response\n")
    assert [(s.text, s.trained) for s in alpaca.segments([Message("user", "2+2="), Message("assistant", "4")])] == [
        ("### user\n2+2=\n### Response\n", False), ("4\n", True)]
    assert alpaca.prompt([Message("user", "2+2=")]) == "### user\n2+2=\n### Response\n"
    for bad in ("{role}: no content", "{content}{content}", "{who}: {content}"):
        with pytest.raises(ConfigError, match="chat_turn"):
            ChatTemplate(bad)


def test_hugging_face_dataset_in_memory():
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    dataset = datasets.Dataset.from_list([ROWS["preference"], ROWS["preference"]])
    examples = read_examples(dataset, "preference")
    assert [_plain(e) for e in examples] == [EXPECTED["preference"]] * 2
    assert examples[1].where == "Dataset[1]"


def test_hugging_face_hub_source_reads_through_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config_name=None, split=None):  # the one call `hf:NAME` makes
        calls.append((name, config_name, split))
        return [ROWS["prompt_only"], {"prompt": ""}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DatasetError) as error:
        read_examples("hf:org/tasks", "prompt", hf_split="test", hf_config="small")
    assert calls == [("org/tasks", "small", "test")]
    assert error.value.problems == ["hf:org/tasks[1]: 'prompt' is empty: there is nothing to generate from "
                                    "(format prompt_only)"]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        read_examples("hf:org/tasks", "prompt")


def test_task_rows_read_as_their_formats():
    mix = TaskMix(seed=0)
    sft = parse_rows(load_rows(mix.sft_rows(5, "train")), "sft")
    assert [e.text for e in sft] == [s.prompt + s.answer for s in mix.samples(5, "train")]
    prompts = parse_rows(load_rows(mix.prompt_rows(5, "val")), "prompt")
    assert [p.meta for p in prompts] == [s.meta for s in mix.samples(5, "val")]
    pairs = parse_rows(load_rows(mix.preference_rows(5, "train")), "preference")
    assert all(p.chosen != p.rejected for p in pairs)


def test_malformed_rows_are_reported_with_file_and_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "x.jsonl", [
        ROWS["prompt_completion"],
        {"prompt": "1+1="},
        "{not json",
        ROWS["prompt_completion"],
    ])
    with pytest.raises(DatasetError) as error:
        read_examples(path, "sft")
    assert isinstance(error.value, ConfigError)
    assert f"{path}:3: not valid JSON" in str(error.value)
    path.write_text(path.read_text().replace("{not json\n", '{"prompt": "2+2=", "completion": 4}\n'))
    with pytest.raises(DatasetError) as error:
        read_examples(path, "sft")
    assert error.value.problems == [f"{path}:2: missing key 'completion' (format prompt_completion)",
                                    f"{path}:3: 'completion' must be a string or a list of messages, got int "
                                    f"(format prompt_completion)"]
    with pytest.warns(UserWarning, match=r"skipped 2 malformed rows"):
        kept = read_examples(path, "sft", skip_malformed=True)
    assert [e.where for e in kept] == [f"{path}:1", f"{path}:4"]
    # The CLI helper turns it into a message on stderr and exit status 2.
    with pytest.raises(SystemExit) as exit_info:
        exit_on_config_error(lambda _: read_examples(path, "sft"), None)
    assert exit_info.value.code == 2 and f"{path}:2: missing key 'completion'" in capsys.readouterr().err


@pytest.mark.parametrize("row,problem", [
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "'chosen' equals 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]},
     "'prompt', 'chosen', 'rejected' must all be strings or all lists of messages"),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}, "prompt[0] must be"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "'chosen' must start with an assistant message"),
])
def test_bad_preference_rows(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:1: {problem}")):
        read_examples(path, "preference", format="preference")


def test_empty_or_unusable_datasets_are_errors(tmp_path, tok):
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DatasetError, match="no rows"):
        read_examples(empty, "sft")
    with pytest.raises(DatasetError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl", "sft")
    junk = write_jsonl(tmp_path / "junk.jsonl", [{"question": "?"}])
    with pytest.raises(DatasetError, match=r"junk.jsonl:1: cannot tell the format from the keys \['question'\]"):
        read_examples(junk, "sft")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no usable rows"):
        read_examples(write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}]), "sft", skip_malformed=True)
    with pytest.raises(DatasetError, match="format preference .* cannot feed sft"):
        read_examples(write_jsonl(tmp_path / "pref.jsonl", [ROWS["preference"]]), "sft")
    examples = read_examples(write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "completion": "y"}]), "sft")
    with pytest.raises(DatasetError, match="no usable rows after tokenisation.*prompt alone"):
        tokenize_sft(examples, tok, seq_len=16).require_some("long.jsonl")


# ---------------------------------------------------------------- tokenisation and collation


def test_sft_labels_are_masked_exactly_on_prompt_and_padding(tok):
    examples = parse_rows(load_rows([{"prompt": "12+345=", "completion": "357"},
                                     {"prompt": "1+1=", "completion": "2"}]), "sft")
    tokenized = tokenize_sft(examples, tok, seq_len=32)
    batch = collate_sft(tokenized.examples, tok.pad_id)
    eos, pad, x = tok.eos_id, tok.pad_id, IGNORE_INDEX
    assert batch["tokens"].tolist() == [ids("12+345=357") + [eos], ids("1+1=2") + [eos] + [pad] * 5]
    assert batch["labels"].tolist() == [[x] * 7 + ids("357") + [eos], [x] * 4 + ids("2") + [eos] + [x] * 5]
    assert batch["positions"].tolist() == [list(range(11)), list(range(6)) + [0] * 5]
    assert batch["documents"].tolist() == [[0] * 11, [0] * 6 + [-1] * 5]
    assert batch["mask"].tolist() == [[True] * 11, [True] * 6 + [False] * 5]
    assert all(v.dtype == (torch.bool if k == "mask" else torch.long) for k, v in batch.items())
    # What the loss trains on: the targets of logits[:, :-1] are labels[:, 1:], the completion and EOS.
    targets = batch["labels"][:, 1:]
    assert [tok.decode(row[row != x].tolist()) for row in targets] == ["357", "2"]
    assert [(row == eos).sum().item() for row in targets] == [1, 1]


def test_truncation_policy_counts_what_it_does(tok):
    examples = parse_rows(load_rows([
        {"prompt": "copy abcdefgh=", "completion": "abcdefgh"},  # 14 + 8 + EOS = 23 > 16: cut, no EOS
        {"prompt": "copy abcdefghijklmnopq=", "completion": "x"},  # prompt alone >= 16: dropped
        {"prompt": "copy ab=", "completion": "ab"},  # fits
    ]), "sft")
    tokenized = tokenize_sft(examples, tok, seq_len=16)
    assert [len(e) for e in tokenized.examples] == [16, 11]
    cut = tokenized.examples[0]
    assert cut.tokens == tuple(ids("copy abcdefgh=ab")) and cut.trained == (False,) * 14 + (True,) * 2
    assert tokenized.examples[1].tokens[-1] == tok.eos_id and tokenized.examples[1].trained[-1]
    assert (tokenized.rows, tokenized.truncated, sum(tokenized.dropped.values())) == (3, 1, 1)
    assert tokenized.summary() == ("kept 2 of 3 rows (1 dropped: prompt alone has >= seq_len=16 tokens); "
                                   "1 completions truncated")


def test_messages_train_assistant_turns_only(tok):
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    [example] = tokenize_sft(parse_rows(load_rows([{"messages": convo}]), "sft"), tok, 64).examples
    batch = collate_sft([example], tok.pad_id)
    trained = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert trained == ids("yo\n") + ids("2\n") + [tok.eos_id]
    assert tok.decode(batch["tokens"][0].tolist()) == "user: hi\nassistant: yo\nuser: 1+1=\nassistant: 2\n"


def test_packing_restarts_positions_and_marks_documents(tok):
    rows = [{"prompt": f"copy {'abcdefg'[:n]}=", "completion": "abcdefg"[:n]} for n in (1, 7, 3, 5, 2, 6, 4)]
    tokenized = tokenize_sft(parse_rows(load_rows(rows), "sft"), tok, seq_len=24).examples
    packs = pack(tokenized, seq_len=24)
    lengths = sorted(len(e) for e in tokenized)  # 9 .. 21 tokens
    assert sorted(len(e) for p in packs for e in p) == lengths  # every example exactly once
    assert all(sum(map(len, p)) <= 24 for p in packs)
    assert len(packs) == 5 and math.ceil(sum(lengths) / 24) == 5  # best fit reaches the bound here
    assert pack(tokenized, 24) == packs  # deterministic
    batch = collate_sft(packs, tok.pad_id)
    for row, p in enumerate(packs):
        start = 0
        for d, example in enumerate(p):
            span = slice(start, start + len(example))
            assert batch["positions"][row, span].tolist() == list(range(len(example)))
            assert batch["documents"][row, span].tolist() == [d] * len(example)
            assert batch["tokens"][row, span].tolist() == list(example.tokens)
            labels = batch["labels"][row, span].tolist()
            assert labels[0] == IGNORE_INDEX
            assert labels[1:] == [t if f else IGNORE_INDEX for t, f in zip(example.tokens[1:], example.trained[1:])]
            start += len(example)
        assert (batch["documents"][row, start:] == -1).all() and not batch["mask"][row, start:].any()
    # A trained first token (plain text) is never learnt from the previous document's tokens.
    text = tokenize_sft(parse_rows(load_rows([{"text": "ab"}, {"text": "cd"}]), "sft"), tok, 8).examples
    packed = collate_sft(pack(text, 8), tok.pad_id)
    assert packed["labels"].tolist() == [[IGNORE_INDEX, ord("b"), tok.eos_id, IGNORE_INDEX, ord("d"), tok.eos_id]]
    with pytest.raises(ValueError, match="does not fit"):
        pack([TokenizedExample((1,) * 9, (True,) * 9)], 8)


def test_preference_batches_are_paired(tok):
    rows = TaskMix(seed=0).preference_rows(16, "train")
    tokenized = tokenize_preferences(parse_rows(load_rows(rows), "preference"), tok, seq_len=64)
    assert len(tokenized.examples) == 16
    batch = collate_preferences(tokenized.examples, tok.pad_id)
    chosen, rejected = batch["chosen"], batch["rejected"]
    assert chosen["tokens"].shape == rejected["tokens"].shape and chosen["tokens"].shape[0] == 16
    x = IGNORE_INDEX
    for i, row in enumerate(rows):
        n = len(row["prompt"])
        assert chosen["tokens"][i, :n].tolist() == rejected["tokens"][i, :n].tolist() == ids(row["prompt"])
        for side, key in ((chosen, "chosen"), (rejected, "rejected")):
            labels = side["labels"][i]
            assert labels[:n].tolist() == [x] * n
            assert labels[labels != x].tolist() == ids(row[key]) + [tok.eos_id]
        assert not torch.equal(chosen["tokens"][i], rejected["tokens"][i])
    # A pair that truncation makes identical is dropped and counted.
    same_start = parse_rows(load_rows([{"prompt": "p=", "chosen": "aaaa1", "rejected": "aaaa2"}]), "preference")
    cut = tokenize_preferences(same_start, tok, seq_len=4)
    assert cut.examples == [] and "identical" in cut.summary()


def test_prompt_batches_keep_ids_and_meta(tok):
    rows = TaskMix(seed=0).prompt_rows(6, "val") + [{"prompt": "count a in aaaaaaaaaaaaaaaaaaaaa=", "answer": "21"}]
    tokenized = tokenize_prompts(parse_rows(load_rows(rows), "prompt"), tok, max_prompt_length=24)
    assert len(tokenized.examples) == 6 and "max_prompt_length=24" in tokenized.summary()
    batch = collator("prompt", tok.pad_id)(tokenized.examples)
    assert batch["prompts"] == [ids(r["prompt"]) for r in rows[:6]]
    assert batch["meta"] == [{"task": r["task"], "answer": r["answer"]} for r in rows[:6]]
    assert collate_prompts(tokenized.examples) == batch


# ---------------------------------------------------------------- the datamodule


def ident(batch):
    return list(batch)


def test_stream_batches_are_a_pure_function_of_seed_step_rank_and_world():
    examples = [f"e{i}" for i in range(30)]
    stream = ExampleStream(examples, ident, micro_batch_size=4, seed=3, rank=1, world_size=2)
    first = [stream.batch(m) for m in range(20)]
    # A fresh stream, batches asked in another order: the same batches.
    other = ExampleStream(examples, ident, micro_batch_size=4, seed=3, rank=1, world_size=2)
    assert [other.batch(m) for m in reversed(range(20))] == first[::-1]
    # A resumed stream starts at its micro-batch and continues the sequence.
    resumed = iter(ExampleStream(examples, ident, micro_batch_size=4, seed=3, rank=1, world_size=2, start=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    assert ExampleStream(examples, ident, 4, seed=4, rank=1, world_size=2).batch(0) != first[0]
    assert ExampleStream(examples, ident, 4, seed=3, rank=0, world_size=2).batch(0) != first[0]


def test_ranks_never_share_an_example_within_an_epoch_and_epochs_reshuffle():
    examples = list(range(24))
    ranks = [ExampleStream(examples, ident, micro_batch_size=3, seed=0, rank=r, world_size=2) for r in (0, 1)]
    orders = []
    for epoch in range(3):  # 24 examples = 4 micro-batches of 3 on each of 2 ranks
        seen = [[x for m in range(4 * epoch, 4 * epoch + 4) for x in s.batch(m)] for s in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == examples
        orders.append(seen[0] + seen[1])
    assert orders[0] != orders[1] != orders[2]  # each epoch its own shuffle
    with pytest.raises(ValueError, match="rank"):
        ExampleStream(examples, ident, 3, rank=2, world_size=2)


def test_validation_batches_keep_every_example_and_split_by_rank():
    batches = validation_batches(list(range(10)), ident, micro_batch_size=4)
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert validation_batches(list(range(10)), ident, 4, max_batches=1) == [[0, 1, 2, 3]]
    dm = PostTrainDataModule(list(range(8)), list(range(10)), ident, micro_batch_size=4, seed=1)
    assert list(dm.val_dataloader()) == batches
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"rank": 1, "num_replicas": 2}),
                                 global_rank=1, world_size=2, global_step=3, accumulate_grad_batches=2)
    assert list(dm.val_dataloader()) == [[4, 5, 6, 7]]
    train = iter(dm.train_dataloader())
    expected = ExampleStream(list(range(8)), ident, 4, seed=1, rank=1, world_size=2)
    assert [next(train) for _ in range(3)] == [expected.batch(m) for m in (6, 7, 8)]


class _Recorder(pl.LightningModule):
    """Records the example ids of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["ids"].tolist())
        return (self.weight - batch["ids"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _ids(batch):
    return {"ids": torch.tensor(batch)}


def _trainer(tmp_path, max_steps):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2,
                      use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=tmp_path)


def test_a_resumed_lightning_run_continues_the_batch_sequence(tmp_path, single_thread):
    examples = list(range(11))
    stream = ExampleStream(examples, _ids, micro_batch_size=3, seed=5)
    module = _Recorder()
    first = _trainer(tmp_path, max_steps=3)
    first.fit(module, datamodule=PostTrainDataModule(examples, [], _ids, micro_batch_size=3, seed=5))
    assert module.seen == [stream.batch(m)["ids"].tolist() for m in range(6)]  # 3 steps x 2 micro-batches
    first.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = _Recorder()
    _trainer(tmp_path, max_steps=5).fit(resumed, datamodule=PostTrainDataModule(examples, [], _ids, 3, seed=5),
                                        ckpt_path=tmp_path / "step3.ckpt")
    assert resumed.seen == [stream.batch(m)["ids"].tolist() for m in range(6, 10)]
