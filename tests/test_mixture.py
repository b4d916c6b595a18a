"""data=mixture: weights by tokens on a fixed schedule, exact resume, rank sharding, per-source
validation (val/loss/<source>), epochs per source, and refused weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.config import ConfigError, validate
from llm.data.mixture import PERIOD, Mixture, MixtureStream, Schedule, Source, slot_counts
from llm.tracking.metrics import read_metrics
from tests.conftest import compose_train, llm_cli

SEQ = 4


def source_arrays(sizes: list[int]) -> list[np.ndarray]:
    """Token arrays whose values say their source and block: source s, block b starts at
    s * 1_000_000 + b * SEQ (one more token than SEQ per block, shared with the next one)."""
    return [s * 1_000_000 + np.arange(n * SEQ + 1, dtype=np.int64) for s, n in enumerate(sizes)]


def items(batch: torch.Tensor) -> list[tuple[int, int]]:
    """(source, block) of each row, read back from the token values."""
    first = batch[:, 0].tolist()
    return [(v // 1_000_000, (v % 1_000_000) // SEQ) for v in first]


def test_slot_counts_round_to_the_period_and_keep_every_source_asked_for():
    assert slot_counts([0.7, 0.3]).tolist() == [7000, 3000]
    assert slot_counts([1, 1, 1]).sum() == PERIOD  # largest remainder: 3334, 3333, 3333
    assert sorted(slot_counts([1, 1, 1]).tolist()) == [3333, 3333, 3334]
    assert slot_counts([1, 0, 1e-9]).tolist() == [PERIOD - 1, 0, 1]  # a tiny weight still gets a slot, 0 none
    for bad in ([0, 0], [-1, 2], [math.nan, 1], [math.inf, 1], []):
        with pytest.raises(ValueError):
            slot_counts(bad)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.01, 0.99], [3, 1, 1, 0]])
def test_weights_are_honoured_within_a_block_over_any_window_of_a_long_stream(weights):
    """Each source's share of the first K samples is its weight to within one block, for every K
    (and so to within two in any window): a smooth round-robin, where iid draws would stray by
    sqrt(K) blocks. The stream's batches carry exactly the schedule's sources."""
    schedule = Schedule(weights)
    share = np.asarray(weights, dtype=float) / sum(weights)
    k = np.arange(0, 3 * PERIOD + 1)
    counts = np.stack([schedule.taken(k, s) for s in range(len(weights))], axis=1)  # (K, sources)
    assert np.abs(counts - k[:, None] * share).max() < 1.0 + 1e-9
    assert (counts.sum(axis=1) == k).all()

    stream = MixtureStream(source_arrays([50] * len(weights)), weights, SEQ, micro_batch_size=8)
    seen = np.zeros(len(weights))
    for m in range(500):  # 4000 samples, each source repeating its 50 blocks many times
        for s, _ in items(stream.batch(m)):
            seen[s] += 1
    assert np.abs(seen - 4000 * share).max() <= 1.0, (seen, share)
    if weights == [0.7, 0.3]:
        assert seen[0] == 2800 and seen[1] == 1200  # the heavier source gets more, exactly


def test_each_source_goes_through_all_its_blocks_once_per_epoch_in_its_own_order():
    sizes = [7, 13]
    stream = MixtureStream(source_arrays(sizes), [1, 2], SEQ, micro_batch_size=3, seed=5)
    drawn: dict[int, list[int]] = {0: [], 1: []}
    for m in range(60):
        for s, b in items(stream.batch(m)):
            drawn[s].append(b)
    for s, n in enumerate(sizes):
        epochs = [drawn[s][i:i + n] for i in range(0, len(drawn[s]) - n + 1, n)]
        assert len(epochs) >= 3
        assert all(sorted(e) == list(range(n)) for e in epochs)  # every block once a pass
        assert epochs[0] != epochs[1]  # a fresh permutation each pass
    assert stream.epochs(60 * 3).tolist() == pytest.approx([len(drawn[0]) / 7, len(drawn[1]) / 13])
    other = MixtureStream(source_arrays(sizes), [1, 2], SEQ, micro_batch_size=3, seed=6)
    assert [items(other.batch(m)) for m in range(5)] != [items(stream.batch(m)) for m in range(5)]


def test_a_resumed_stream_continues_exactly_and_ranks_split_the_stream_disjointly_and_completely():
    arrays, weights = source_arrays([11, 29, 5]), [0.5, 0.3, 0.2]
    straight = MixtureStream(arrays, weights, SEQ, micro_batch_size=4, seed=3)
    it = iter(straight)
    first = [next(it) for _ in range(20)]
    resumed = iter(MixtureStream(arrays, weights, SEQ, micro_batch_size=4, seed=3, start=12))  # killed after 12
    assert all(torch.equal(next(resumed), first[m]) for m in range(12, 20))
    # two ranks: their micro-batch m together are the single stream's samples 8m .. 8m + 7
    single = MixtureStream(arrays, weights, SEQ, micro_batch_size=8, seed=3)
    ranks = [MixtureStream(arrays, weights, SEQ, micro_batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for m in range(10):
        a, b = items(ranks[0].batch(m)), items(ranks[1].batch(m))
        assert a + b == items(single.batch(m))
    # skipped micro-batches are left out, and a resume after them lands on the same batch
    skipping = iter(MixtureStream(arrays, weights, SEQ, micro_batch_size=4, seed=3, skip=[2, 5]))
    assert torch.equal([next(skipping) for _ in range(5)][-1], first[6])


def test_a_mixture_as_a_tokenizer_corpus_gives_each_source_in_turn_and_ignores_the_weights():
    class Docs:
        def __init__(self, name, docs):
            self.name, self.docs = name, docs

        def documents(self, split):
            return iter(self.docs)

        def fingerprint(self):
            return self.name

    a, b = Docs("a", ["a1", "a2", "a3"]), Docs("b", ["b1"])
    mixture = Mixture([Source("code", a, 0.9), Source("web", b, 0.1)])
    assert list(mixture.documents("train")) == ["a1", "b1", "a2", "a3"]
    assert mixture.fingerprint() == Mixture([Source("code", a, 0.1), Source("web", b, 5)]).fingerprint()
    assert mixture.fingerprint() != Mixture([Source("code", b, 0.1), Source("web", a, 5)]).fingerprint()
    with pytest.raises(ValueError, match="source name"):
        Mixture([Source("a/b", a, 1)])


def _problems(overrides: list[str], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(compose_train(["data=mixture", *overrides], root=tmp_path))
    return e.value.problems


def test_bad_weights_and_sources_are_refused_naming_the_key(tmp_path, monkeypatch, capsys):
    problems = _problems(["data.sources.code.weight=-0.5", "data.sources.markov.weight=nan",
                          "data.sources.code.corpus.max_bytes=-3", "+data@data.sources.web=synthetic", "data.sources.web.corpus=null"], tmp_path)
    for start in ("data.sources.code.weight=-0.5:", "data.sources.markov.weight=nan:", "data.sources.code.corpus.max_bytes",
                  "data.sources.web.corpus: missing"):
        assert any(p.startswith(start) for p in problems), (start, problems)
    zero = _problems(["data.sources.code.weight=0", "data.sources.markov.weight=0"], tmp_path)
    assert zero == ["data.sources: every weight is 0 (code.weight, markov.weight); give at least one source a positive weight"]
    assert _problems(["+data@data.sources.books=text"], tmp_path)[0].startswith(
        "data.sources.books.corpus.paths: required but not set")
    with pytest.raises(ConfigError, match="data.corpus: a run reads one corpus or a mixture"):
        validate(compose_train(["data=stdlib", "+data@data.sources.extra=synthetic"], root=tmp_path))
    # from the command line: exit 2, one line naming the key, no traceback
    code, err = llm_cli("train", ["data=mixture", "data.sources.code.weight=inf", "logger=none"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "data.sources.code.weight=inf" in err and "Traceback" not in err


def test_a_source_is_added_from_the_command_line_with_the_data_options(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    cfg = compose_train(["data=mixture", "+data@data.sources.books=text", f"data.sources.books.corpus.paths={tmp_path}/a.txt",
                         "data.sources.books.weight=0.5", "data.sources.code.weight=0"], root=tmp_path)
    validate(cfg)  # one weight 0 is fine: that source is validated only
    assert list(cfg.data.sources) == ["code", "markov", "books"]
    assert cfg.data.sources.books.corpus._target_ == "llm.data.TextCorpus" and cfg.data.sources.code.weight == 0
    assert cfg.data.corpus is None


def test_the_mixture_weight_sweep_preset_composes(tmp_path):
    cfg = compose_train(["experiment=mixture_weights"], root=tmp_path)
    validate(cfg)
    assert cfg.hydra.sweeper.params["data.sources.code.weight"] == "0.25,1,4"
    assert set(cfg.data.sources) == {"code", "markov"} and cfg.tokenizer.kind == "byte"


TINY_MIXTURE = ["model=nano", "data=mixture", "tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=4",
                "data.sources.code.corpus.max_bytes=40000", "data.sources.markov.corpus.n_documents=4",
                "data.sources.markov.corpus.doc_length=512", "data.sources.markov.corpus.val_documents=1",
                "data.sources.code.weight=3", "data.sources.markov.weight=1", "data.val_batches=3",
                "logger=none", "trainer.progress_bar=false"]


def test_a_mixture_run_logs_each_sources_val_loss_and_the_token_weighted_mixed_one(tmp_path, monkeypatch, capsys,
                                                                                     single_thread):
    code, err = llm_cli("train", [*TINY_MIXTURE, "budget.steps=2", "trainer.val_every=2", "trainer.log_every=1",
                                  f"hydra.run.dir={tmp_path}/run"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    val = [r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in val] == [2]
    record = val[0]
    summary = json.loads((run / "summary.json").read_text())
    blocks = {s: (summary["mixture"][s]["val_tokens"] - 1) // 32 for s in ("code", "markov")}
    # validation tokens of each source: up to 3 whole batches of 4 blocks (all blocks if fewer than 4)
    tokens = {s: (min(3, n // 4) * 4 if n >= 4 else n) * 32 for s, n in blocks.items()}
    assert blocks["markov"] == 16 and tokens["markov"] == 3 * 4 * 32  # one 512-symbol document + EOS
    mixed = sum(record[f"val/loss/{s}"] * n for s, n in tokens.items()) / sum(tokens.values())
    assert record["val/loss"] == pytest.approx(mixed, rel=1e-6)
    assert record["val/loss/code"] != pytest.approx(record["val/loss/markov"], rel=1e-3)
    assert record["val/ppl"] == pytest.approx(math.exp(record["val/loss"]), rel=1e-5)
    # epochs: 2 steps x 4 samples = 8 samples, 6 of code and 2 of the chain (weights 3:1)
    caches = {s: summary["mixture"][s]["train_tokens"] for s in ("code", "markov")}
    assert summary["data/epochs/code"] == pytest.approx(6 / ((caches["code"] - 1) // 32))
    assert summary["data/epochs/markov"] == pytest.approx(2 / ((caches["markov"] - 1) // 32))
    assert summary["mixture"]["code"]["weight"] == 0.75 and summary["val/loss/code"] == record["val/loss/code"]
    assert summary["val/loss"] == record["val/loss"]


def test_one_source_logs_val_loss_as_a_single_corpus_does(tmp_path, monkeypatch, capsys, single_thread):
    """A mixture of one source and that source alone: the same val/loss (next to val/loss/<name>)."""
    args = ["model=nano", "tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=4", "data.val_batches=3",
            "logger=none", "trainer.progress_bar=false", "budget.steps=2", "trainer.val_every=2"]
    chain = ["n_documents=4", "doc_length=512", "val_documents=1"]
    code, err = llm_cli("train", [*args, "data=synthetic", *(f"data.corpus.{c}" for c in chain),
                                  f"hydra.run.dir={tmp_path}/single"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    code, err = llm_cli("train", [*args, "data=mixture", "~data.sources.code", *(f"data.sources.markov.corpus.{c}" for c in chain),
                                  f"hydra.run.dir={tmp_path}/mixture"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    single = [r for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if "val/loss" in r][-1]
    mixture = [r for r in read_metrics(tmp_path / "mixture" / "metrics.jsonl") if "val/loss" in r][-1]
    assert mixture["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
    assert mixture["val/loss/markov"] == pytest.approx(single["val/loss"], rel=1e-5)
    # llm-eval measures one corpus: a mixture run's is named with a data option, not guessed
    code, err = llm_cli("evaluate", [f"checkpoint={tmp_path}/mixture"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "the run trained on a mixture (data.sources: markov)" in err and "data=stdlib" in err, err
    code, err = llm_cli("evaluate", [f"checkpoint={tmp_path}/mixture", "data=synthetic",
                                     *(f"data.corpus.{c}" for c in chain)], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_a_killed_mixture_run_resumes_to_the_uninterrupted_curve(tmp_path):
    from tests.conftest import run_cli
    from tests.test_train import _train_until_killed, records

    args = [*TINY_MIXTURE, "budget.steps=40", "trainer.val_every=10", "trainer.checkpoint_every=10",
            "trainer.log_every=2"]
    straight = run_cli([*args, f"hydra.run.dir={tmp_path}/straight"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    _train_until_killed(args, killed, kill_after_step=24)
    assert 10 <= torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 40
    resumed = run_cli([f"resume={killed}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("train/loss", "val/loss", "val/loss/code", "val/loss/markov", "data/epochs/code"):
        a, b = records(tmp_path / "straight", key), records(killed, key)
        assert [s for s, _ in a] == [s for s, _ in b], key
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-5), key
