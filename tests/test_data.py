"""Data: corpora, their splits and fingerprints, the token cache, and block batching."""

from __future__ import annotations

import logging
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llm.data import (
    BlockStream,
    Corpus,
    HFCorpus,
    LMDataModule,
    StdlibCorpus,
    SyntheticCorpus,
    TextCorpus,
    build_token_cache,
    split_inputs_targets,
    validation_batches,
)
from llm.data.corpus import hash_fraction
from llm.data.stream import ShardedStream, stream_index
from llm.tokenizer import build_tokenizer, bytes_per_token

# ---------------------------------------------------------------- StdlibCorpus


def _fake_stdlib(root: Path) -> None:
    files = {
        "a.py": "A = 1\n",
        "pkg/b.py": "B = 2\n",
        "pkg/test_b.py": "skip\n",
        "test/c.py": "skip\n",
        "pkg/tests/d.py": "skip\n",
        "idlelib/idle_test/e.py": "skip\n",
        "site-packages/f.py": "skip\n",
        "dist-packages/g.py": "skip\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8


def test_stdlib_exclusions_on_a_fake_root(tmp_path):
    _fake_stdlib(tmp_path)
    corpus = StdlibCorpus(val_fraction=0.0, max_bytes=None, root=str(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in corpus.files("train")] == ["a.py", "pkg/b.py"]
    assert list(corpus.documents("train")) == ["A = 1\n", "B = 2\n"]
    assert corpus.files("val") == []


def test_stdlib_excludes_tests_and_splits_deterministically():
    corpus = StdlibCorpus(max_bytes=None)
    train, val = corpus.files("train"), corpus.files("val")
    assert len(train) > 100 and len(val) > 0
    assert not set(train) & set(val)
    for path in train + val:
        rel = path.relative_to(corpus.root)
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(rel.parts)
        assert not rel.name.startswith("test_") and rel.suffix == ".py"
        assert (hash_fraction(rel.as_posix()) < 0.05) == (path in val)
    assert train == sorted(train, key=lambda p: p.relative_to(corpus.root).as_posix())
    again = StdlibCorpus(max_bytes=None)
    assert again.files("train") == train and again.files("val") == val


def test_stdlib_cap_and_fingerprint():
    small = StdlibCorpus(max_bytes=300_000)
    train_bytes = sum(len(d.encode()) for d in small.documents("train"))
    val_bytes = sum(len(d.encode()) for d in small.documents("val"))
    assert 0.9 * 285_000 < train_bytes <= 285_000
    assert 0 < val_bytes <= 15_000
    assert set(small.files("val")) <= set(StdlibCorpus(max_bytes=None).files("val"))

    assert small.fingerprint() == StdlibCorpus(max_bytes=300_000).fingerprint()
    assert small.fingerprint() != StdlibCorpus(max_bytes=400_000).fingerprint()
    assert small.fingerprint() != StdlibCorpus(max_bytes=300_000, val_fraction=0.1).fingerprint()
    assert isinstance(small, Corpus)
    with pytest.raises(ValueError, match="test"):
        list(small.documents("test"))


# ---------------------------------------------------------------- TextCorpus


def _write_texts(root: Path, n: int = 40) -> None:
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(f"document {i}\n" * (i + 1))


def test_text_corpus_glob_and_split(tmp_path):
    _write_texts(tmp_path / "data")
    corpus = TextCorpus(str(tmp_path / "data" / "**" / "*.txt"), val_fraction=0.2)
    train, val = corpus.files("train"), corpus.files("val")
    assert len(train) + len(val) == 40 and val and not set(train) & set(val)
    # Two patterns overlapping: each file once.
    both = TextCorpus([str(tmp_path / "data" / "part0" / "*.txt"),
                       str(tmp_path / "data" / "**" / "*.txt")], val_fraction=0.2)
    assert sorted(both.files("train") + both.files("val")) == sorted(train + val)
    # The same files elsewhere: same split and fingerprint.
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    moved = TextCorpus(str(tmp_path / "moved" / "**" / "*.txt"), val_fraction=0.2)
    assert [p.name for p in moved.files("val")] == [p.name for p in val]
    assert moved.fingerprint() == corpus.fingerprint()
    (tmp_path / "moved" / "part0" / "doc00.txt").write_text("changed\n")
    assert TextCorpus(str(tmp_path / "moved" / "**" / "*.txt"), val_fraction=0.2).fingerprint() != corpus.fingerprint()


def test_text_corpus_missing_pattern(tmp_path):
    _write_texts(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        TextCorpus([str(tmp_path / "**" / "*.txt"), str(tmp_path / "nothing_here*.md")])


def test_text_corpus_single_file_splits_by_characters(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    corpus = TextCorpus(str(tmp_path / "one.txt"), val_fraction=0.1)
    (train,), (val,) = list(corpus.documents("train")), list(corpus.documents("val"))
    assert train + val == text
    assert len(val) == len(text) // 10
    (tmp_path / "tiny.txt").write_text("ab")
    assert list(TextCorpus(str(tmp_path / "tiny.txt")).documents("val")) == ["b"]


def test_text_corpus_few_files_get_a_val_file(tmp_path):
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(name * 10)
    corpus = TextCorpus(str(tmp_path / "*.txt"), val_fraction=0.01)
    assert len(corpus.files("val")) == 1 and len(corpus.files("train")) == 2


# ---------------------------------------------------------------- HFCorpus


def test_hf_corpus_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'llm\[hf\]'"):
        HFCorpus("some/dataset")


class _FakeDataset:
    column_names = ["id", "text"]

    def __iter__(self):
        return iter({"id": i, "text": f"row {i}"} for i in range(200))


def test_hf_corpus_with_a_fake_datasets_module(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *args, **kwargs: calls.append((args, kwargs)) or _FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)

    with pytest.raises(ValueError, match=r"content.*\['id', 'text'\]"):
        HFCorpus("org/name", column="content")
    corpus = HFCorpus("org/name", config_name="cfg", val_fraction=0.1, max_documents=150)
    assert calls[-1] == (("org/name", "cfg"), {"split": "train", "streaming": False})
    train, val = list(corpus.documents("train")), list(corpus.documents("val"))
    assert len(train) + len(val) == 150 and 0 < len(val) < 40
    assert not set(train) & set(val)
    assert val == [f"row {i}" for i in range(150) if hash_fraction(str(i)) < 0.1]
    assert corpus.fingerprint() == HFCorpus("org/name", config_name="cfg", val_fraction=0.1,
                                            max_documents=150).fingerprint()


# ---------------------------------------------------------------- SyntheticCorpus


def test_synthetic_chain_is_well_formed():
    corpus = SyntheticCorpus(n_symbols=12, branching=4, seed=3)
    p, pi = corpus.transition_matrix, corpus.stationary
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert ((p > 0).sum(axis=1) == 4).all()
    assert (np.diag(p) > 0).all() and (np.diag(np.roll(p, -1, axis=1)) > 0).all()
    np.testing.assert_allclose(pi @ p, pi, atol=1e-12)
    assert pi.min() > 0 and abs(pi.sum() - 1) < 1e-12


@pytest.mark.parametrize("n_symbols,branching,seed", [(16, 3, 0), (40, 6, 1)])
def test_synthetic_entropy_rate_matches_monte_carlo(n_symbols, branching, seed):
    corpus = SyntheticCorpus(n_symbols=n_symbols, branching=branching, n_documents=100,
                             doc_length=4000, seed=seed)
    lookup = np.zeros(128, dtype=np.int64)
    lookup[np.frombuffer(corpus.symbols.encode(), dtype=np.uint8)] = np.arange(n_symbols)
    p = corpus.transition_matrix
    nll = []
    for doc in corpus.documents("train"):
        states = lookup[np.frombuffer(doc.encode(), dtype=np.uint8)]
        nll.append(-np.log(p[states[:-1], states[1:]]))
    estimate = np.concatenate(nll).mean()
    assert estimate == pytest.approx(corpus.entropy_rate, rel=0.02)
    # Documents start from the stationary distribution.
    firsts = lookup[[ord(d[0]) for d in corpus.documents("train")]]
    assert np.isfinite(np.log(corpus.stationary[firsts])).all()


def test_synthetic_documents(tmp_path):
    corpus = SyntheticCorpus(n_symbols=10, n_documents=5, doc_length=300, val_documents=2, seed=7)
    train, val = list(corpus.documents("train")), list(corpus.documents("val"))
    assert len(train) == 5 and len(val) == 2
    assert all(len(d) == 300 and set(d) <= set("abcdefghij") for d in train + val)
    assert train == list(SyntheticCorpus(n_symbols=10, n_documents=5, doc_length=300,
                                         val_documents=2, seed=7).documents("train"))
    assert train != list(SyntheticCorpus(n_symbols=10, n_documents=5, doc_length=300,
                                         val_documents=2, seed=8).documents("train"))
    assert corpus.fingerprint() != SyntheticCorpus(n_symbols=10, n_documents=5, doc_length=300,
                                                   val_documents=2, seed=8).fingerprint()
    byte = build_tokenizer(corpus, tmp_path, kind="byte")
    assert all(len(byte.encode(d)) == len(d) for d in train)
    with pytest.raises(ValueError):
        SyntheticCorpus(branching=1)


# ---------------------------------------------------------------- token cache


@pytest.fixture()
def small_corpus():
    return SyntheticCorpus(n_symbols=20, n_documents=30, doc_length=500, val_documents=4)


def _cache_files(cache_dir: Path) -> dict[str, Path]:
    return {p.suffix: p for p in (cache_dir / "tokens").iterdir()}


def test_token_cache_round_trip(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llm")
    corpus = StdlibCorpus(max_bytes=150_000)
    tok = build_tokenizer(corpus, tmp_path, kind="bpe", vocab_size=512)
    caplog.clear()
    cache = build_token_cache(corpus, tok, "val", tmp_path)
    assert "tokens" in caplog.text
    docs = list(corpus.documents("val"))
    assert cache.dtype == np.uint16 and cache.tokens.dtype == np.uint16
    assert cache.n_documents == len(docs) and cache.n_tokens == len(cache.tokens)
    ends = [*cache.doc_offsets[1:], cache.n_tokens]
    for doc, start, end in zip(docs, cache.doc_offsets, ends):
        ids = cache.tokens[start:end].tolist()
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.decode(ids) == doc
    # The cache counts the bytes it tokenised: its bytes/token is the tokenizer's on the same text.
    assert cache.bytes_per_token == pytest.approx(bytes_per_token(tok, docs))
    with pytest.raises(ValueError):
        cache.tokens[0] = 1  # read-only


def test_token_cache_reuse_and_corruption(tmp_path, small_corpus, caplog):
    caplog.set_level(logging.INFO, logger="llm")
    tok = build_tokenizer(small_corpus, tmp_path, kind="byte")
    first = build_token_cache(small_corpus, tok, "train", tmp_path)
    reference = np.array(first.tokens)
    assert reference.size == 30 * 501
    files = _cache_files(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in files.values()}
    caplog.clear()

    again = build_token_cache(small_corpus, tok, "train", tmp_path)
    assert caplog.text == ""  # reused: nothing built, nothing said
    assert {p: p.stat().st_mtime_ns for p in files.values()} == mtimes
    np.testing.assert_array_equal(again.tokens, reference)

    with open(files[".bin"], "r+b") as f:  # an interrupted write: too short
        f.truncate(files[".bin"].stat().st_size - 10)
    rebuilt = build_token_cache(small_corpus, tok, "train", tmp_path)
    assert "tokens" in caplog.text
    np.testing.assert_array_equal(rebuilt.tokens, reference)

    caplog.clear()
    files[".json"].unlink()  # a .bin without an index is not trusted
    rebuilt = build_token_cache(small_corpus, tok, "train", tmp_path)
    assert "tokens" in caplog.text
    np.testing.assert_array_equal(rebuilt.tokens, reference)
    assert sorted(p.suffix for p in (tmp_path / "tokens").iterdir()) == [".bin", ".json"]

    val = build_token_cache(small_corpus, tok, "val", tmp_path)
    assert val.path != first.path and val.n_documents == 4


def test_token_cache_dtype_follows_vocab(tmp_path, small_corpus):
    class WideTokenizer:  # a tokenizer whose ids do not fit uint16
        vocab_size, eos_id = 70_000, 69_999

        def encode_batch(self, texts):
            return [[60_000 + ord(c) for c in t] for t in texts]

        def content_hash(self):
            return "wide"

    cache = build_token_cache(small_corpus, WideTokenizer(), "val", tmp_path)
    assert cache.dtype == np.uint32
    assert cache.tokens[0] >= 60_000 and cache.tokens[500] == 69_999


def test_token_cache_empty_split(tmp_path):
    corpus = SyntheticCorpus(n_documents=2, doc_length=10, val_documents=0)
    tok = build_tokenizer(corpus, tmp_path, kind="byte")
    with pytest.raises(ValueError, match="synthetic.*val"):
        build_token_cache(corpus, tok, "val", tmp_path)
    assert list((tmp_path / "tokens").iterdir()) == []


# ---------------------------------------------------------------- batching


def _tokens(n: int = 1001) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)


def _block_ids(batch: torch.Tensor, seq_len: int) -> list[int]:
    return (batch[:, 0] // seq_len).tolist()


def test_block_stream_contents_and_determinism():
    stream = BlockStream(_tokens(), seq_len=10, micro_batch_size=4, seed=1)
    assert stream.n_blocks == 100
    batch = next(iter(stream))
    assert batch.shape == (4, 11) and batch.dtype == torch.long
    for row in batch:  # each row is one contiguous block starting at a block boundary
        assert row[0] % 10 == 0
        assert torch.equal(row, row[0] + torch.arange(11))
    again = BlockStream(_tokens(), seq_len=10, micro_batch_size=4, seed=1)
    other = BlockStream(_tokens(), seq_len=10, micro_batch_size=4, seed=2)
    assert all(torch.equal(stream.batch(m), again.batch(m)) for m in range(60))
    assert not all(torch.equal(stream.batch(m), other.batch(m)) for m in range(5))


def test_block_stream_resume_equivalence():
    it = iter(BlockStream(_tokens(), seq_len=10, micro_batch_size=3, seed=5))
    uninterrupted = [next(it) for _ in range(80)]  # crosses epoch boundaries (100 blocks)
    resumed = iter(BlockStream(_tokens(), seq_len=10, micro_batch_size=3, seed=5, start=37))
    for expected in uninterrupted[37:]:
        assert torch.equal(next(resumed), expected)


def test_block_stream_epochs_cover_every_block_once():
    stream = BlockStream(_tokens(), seq_len=10, micro_batch_size=5, seed=0)
    for epoch in range(3):
        blocks = [b for m in range(epoch * 20, (epoch + 1) * 20) for b in _block_ids(stream.batch(m), 10)]
        assert sorted(blocks) == list(range(100))
    assert not np.array_equal(stream.permutation(0), stream.permutation(1))


def test_block_stream_ranks_are_disjoint():
    ranks = [BlockStream(_tokens(), seq_len=10, micro_batch_size=5, seed=4, rank=r, world_size=2)
             for r in range(2)]
    per_rank = [[b for m in range(10) for b in _block_ids(s.batch(m), 10)] for s in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(100))
    single = BlockStream(_tokens(), seq_len=10, micro_batch_size=5, seed=4)
    # Rank r's micro-batch m is the single-process micro-batch m * world + r.
    assert torch.equal(ranks[0].batch(3), single.batch(6))
    assert torch.equal(ranks[1].batch(3), single.batch(7))


def test_block_stream_with_workers_keeps_order():
    stream = BlockStream(_tokens(), seq_len=10, micro_batch_size=2, seed=3, start=7)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == 6:
            break
    assert all(torch.equal(g, stream.batch(7 + i)) for i, g in enumerate(got))


def test_too_little_data():
    with pytest.raises(ValueError, match=r"50 tokens.*seq_len=64"):
        BlockStream(_tokens(50), seq_len=64, micro_batch_size=2)
    with pytest.raises(ValueError, match="50"):
        validation_batches(_tokens(50), seq_len=64, micro_batch_size=2, max_batches=None)


def test_validation_batches():
    batches = validation_batches(_tokens(), seq_len=10, micro_batch_size=8, max_batches=None)
    assert len(batches) == 12 and all(b.shape == (8, 11) for b in batches)  # 100 blocks, 4 dropped
    assert _block_ids(torch.cat(batches), 10) == list(range(96))
    assert len(validation_batches(_tokens(), 10, 8, max_batches=3)) == 3
    (small,) = validation_batches(_tokens(), seq_len=10, micro_batch_size=128, max_batches=4)
    assert small.shape == (100, 11)


def test_split_inputs_targets():
    batch = torch.arange(12).view(2, 6)
    inputs, targets = split_inputs_targets(batch)
    assert inputs.shape == targets.shape == (2, 5)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_datamodule_without_and_with_a_trainer():
    dm = LMDataModule(_tokens(), _tokens(401), seq_len=10, micro_batch_size=4, seed=9, val_batches=8)
    train = iter(dm.train_dataloader())
    reference = BlockStream(_tokens(), 10, 4, seed=9)
    assert all(torch.equal(next(train), reference.batch(m)) for m in range(3))
    val = list(dm.val_dataloader())
    assert len(val) == 8 and all(b.shape == (4, 11) for b in val)

    # A resumed rank 1 of 2 after 3 optimizer steps of 2 micro-batches each.
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"rank": 1, "num_replicas": 2}),
                                 global_rank=1, world_size=2, global_step=3, accumulate_grad_batches=2)
    first = next(iter(dm.train_dataloader()))
    assert torch.equal(first, BlockStream(_tokens(), 10, 4, seed=9, rank=1, world_size=2).batch(6))
    sharded = list(dm.val_dataloader())
    assert len(sharded) == 4 and all(torch.equal(a, b) for a, b in zip(sharded, val[1::2]))


def test_tensor_parallel_ranks_share_their_data_parallel_ranks_batches():
    # Under fsdp_tp the 2 ranks of a tensor-parallel group hold halves of one model: they must see
    # the same batches (their data-parallel rank's), while data-parallel ranks see different ones.
    # The stand-in trainer carries what Lightning's strategies report (distributed_sampler_kwargs).
    from llm.data.datamodule import LMDataModule

    tokens = np.arange(4000, dtype=np.int64) % 97

    def first_batches(global_rank: int, sampler: dict | None) -> list[torch.Tensor]:
        dm = LMDataModule(tokens, tokens, seq_len=16, micro_batch_size=2, seed=3)
        strategy = SimpleNamespace(distributed_sampler_kwargs=sampler) if sampler else SimpleNamespace()
        dm.trainer = SimpleNamespace(strategy=strategy, global_rank=global_rank, world_size=2, global_step=0,
                                     accumulate_grad_batches=1)
        loader = iter(dm.train_dataloader())
        return [next(loader) for _ in range(3)]

    tp = [first_batches(r, {"rank": 0, "num_replicas": 1}) for r in (0, 1)]  # tensor_parallel=2, 1 data rank
    assert all(torch.equal(a, b) for a, b in zip(*tp))
    dp = [first_batches(r, {"rank": r, "num_replicas": 2}) for r in (0, 1)]  # ddp on 2 ranks
    assert not any(torch.equal(a, b) for a, b in zip(*dp))
    assert all(torch.equal(a, b) for a, b in zip(dp[0], first_batches(0, None)))  # no strategy: by global rank


@pytest.mark.parametrize("position, skip, index", [
    (0, [], 0), (5, [], 5),
    (0, [0], 1), (0, [1], 0), (1, [1], 2),
    (2, [0, 1], 4), (2, [0, 2], 4), (2, [3, 7], 2), (3, [3, 7], 4), (6, [3, 7], 8),
])
def test_stream_index_counts_past_the_skipped_batches_by_hand(position, skip, index):
    """The `position`-th batch not skipped: each skipped index at or before it pushes it one on."""
    assert stream_index(position, skip) == index


class _Items(ShardedStream):
    """The bare stream: a batch is the list of its item indices."""

    def collate(self, items: list[int]) -> list[int]:
        return items


def test_a_stream_of_one_item_repeats_it_and_of_none_is_refused():
    assert _Items(1, micro_batch_size=3).batch(0) == [0, 0, 0]
    with pytest.raises(ValueError, match="at least one item"):
        _Items(0, micro_batch_size=1)
    assert _Items(3, micro_batch_size=1).batch(4) == [_Items(3, 1).permutation(1)[1]]  # one item per batch
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        _Items(3, micro_batch_size=0)
    assert _Items(4, 1, rank=1, world_size=2).batch(0) == [_Items(4, 1).permutation(0)[1]]  # the last rank
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        _Items(4, 1, rank=2, world_size=2)


def test_a_stream_s_defaults_are_one_rank_from_the_start_with_seed_0():
    default, explicit = _Items(7, 2), _Items(7, 2, seed=0, rank=0, world_size=1, start=0, skip=())
    assert [default.batch(m) for m in range(10)] == [explicit.batch(m) for m in range(10)]
    assert next(iter(default)) == explicit.batch(0)
    assert sorted(default.batch(0) + default.batch(1) + default.batch(2) + default.batch(3)[:1]) == list(range(7))
