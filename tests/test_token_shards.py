"""Sharded token caches (llm.data.token_shards): written by worker processes, identical token for
token to the single-process cache, read back through memory maps, trusted only through an index
written last and checked before use."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from llm.config import ConfigError, validate
from llm.data import StdlibCorpus, SyntheticCorpus, build_token_cache
from llm.data.blocks import BlockStream, validation_batches
from llm.data.corpus import fingerprint
from llm.data.token_cache import TokenCache, cache_key
from llm.data.token_shards import CacheInvalid, ShardedTokens, write_shards
from llm.recipes.pretrain import tokenize_settings
from llm.tokenizer import build_tokenizer
from tests.conftest import compose_train, llm_cli

SMALL = 0.01  # MiB of text per shard: the ~190 kB train split below makes ~19 shards


class ListCorpus:
    """Documents held in lists; counts how many documents its readers have taken."""

    def __init__(self, train: list[str], val: list[str], name: str = "list"):
        self.name = name
        self.splits = {"train": train, "val": val}
        self.taken = 0

    def documents(self, split):
        for document in self.splits[split]:
            self.taken += 1
            yield document

    def fingerprint(self):
        return fingerprint({"corpus": self.name}, [d for s in ("train", "val") for d in self.splits[s]])


@pytest.fixture(scope="module")
def corpus():
    return StdlibCorpus(max_bytes=200_000)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return build_tokenizer(corpus, tmp_path_factory.mktemp("tok"), kind="bpe", vocab_size=512)


@pytest.fixture(scope="module")
def reference(corpus, tokenizer):
    """The split tokenised directly: every document's ids, then EOS (empty documents left out)."""
    ids = []
    for document in filter(None, corpus.documents("train")):
        ids += tokenizer.encode(document) + [tokenizer.eos_id]
    return np.array(ids, dtype=np.uint16)


def shard_files(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache_dir / "tokens").iterdir())}


def test_two_workers_write_the_single_process_cache_token_for_token(tmp_path, corpus, tokenizer, reference, caplog):
    caplog.set_level(logging.INFO, logger="llm")
    one = build_token_cache(corpus, tokenizer, "train", tmp_path / "one", workers=1, shard_mb=SMALL)
    two = build_token_cache(corpus, tokenizer, "train", tmp_path / "two", workers=2, shard_mb=SMALL)
    whole = build_token_cache(corpus, tokenizer, "train", tmp_path / "whole", shard_mb=1024)
    assert "by 2 workers" in caplog.text
    assert len(one.shards) > 4 and len(whole.shards) == 1
    np.testing.assert_array_equal(np.asarray(two.tokens), reference)
    np.testing.assert_array_equal(np.asarray(one.tokens), reference)
    np.testing.assert_array_equal(np.asarray(whole.tokens), reference)
    np.testing.assert_array_equal(two.doc_offsets, whole.doc_offsets)
    # Byte for byte the same files, index included: it does not say how many workers wrote it.
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "two")
    assert one.fingerprint == two.fingerprint != whole.fingerprint  # same tokens, other shard cuts
    assert one.n_bytes == two.n_bytes == whole.n_bytes and one.bytes_per_token == whole.bytes_per_token
    two.verify()

    # The key leaves the workers out: a cache two workers built is reused by a one-worker run.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "two" / "tokens").iterdir()}
    caplog.clear()
    again = build_token_cache(corpus, tokenizer, "train", tmp_path / "two", workers=1, shard_mb=1024)
    assert caplog.text == "" and len(again.shards) == len(two.shards)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "two" / "tokens").iterdir()} == mtimes


def test_memmapped_shards_read_as_one_array(tmp_path, corpus, tokenizer, reference):
    cache = build_token_cache(corpus, tokenizer, "train", tmp_path, shard_mb=SMALL)
    tokens = cache.tokens
    assert isinstance(tokens, ShardedTokens) and all(isinstance(m, np.memmap) for m in tokens.maps)
    assert all(m.mode == "r" for m in tokens.maps)
    assert len(tokens) == len(reference) == cache.n_tokens and tokens.dtype == np.uint16
    boundary = int(tokens.starts[3])
    for key in (slice(boundary - 5, boundary + 5), slice(0, len(reference)), slice(-7, None), slice(1, 900, 7),
                slice(boundary, boundary), slice(10, 20)):
        np.testing.assert_array_equal(tokens[key], reference[key])
    assert tokens[boundary] == reference[boundary] and tokens[-1] == reference[-1]
    index = np.random.default_rng(0).integers(0, len(reference), size=(4, 33))
    np.testing.assert_array_equal(tokens[index], reference[index])
    with pytest.raises(IndexError):
        tokens[len(reference)]
    with pytest.raises(IndexError):
        tokens[np.array([0, len(reference)])]
    with pytest.raises(ValueError):
        tokens[0] = 1  # read-only
    # The batches a run trains and validates on are the same as from one array.
    stream, plain = BlockStream(tokens, 64, 8, seed=3), BlockStream(reference, 64, 8, seed=3)
    for m in (0, 5, 17):
        assert stream.batch(m).equal(plain.batch(m))
    for a, b in zip(validation_batches(tokens, 64, 8, 4), validation_batches(reference, 64, 8, 4)):
        assert a.equal(b)
    # Pickled (a spawned rank), it carries file names and reopens the maps, never the tokens.
    data = pickle.dumps(tokens)
    assert len(data) < 10_000
    np.testing.assert_array_equal(pickle.loads(data)[index], reference[index])
    # Document offsets come from the shards.
    ends = [*cache.doc_offsets[1:], cache.n_tokens]
    assert cache.n_documents == len(list(filter(None, corpus.documents("train"))))
    assert all(reference[end - 1] == tokenizer.eos_id for end in ends)
    assert cache.doc_offsets[0] == 0 and np.all(np.diff(cache.doc_offsets) > 0)


def test_a_stream_is_read_one_shard_at_a_time(tmp_path, tokenizer):
    documents = [f"document {i} " * 40 for i in range(200)]  # ~500 bytes each
    corpus = ListCorpus(documents, ["held out"])
    seen = []

    class Watching:  # records how much of the corpus had been read at each encode_batch
        vocab_size, eos_id = tokenizer.vocab_size, tokenizer.eos_id

        def encode_batch(self, texts):
            seen.append((corpus.taken, len(texts)))
            return tokenizer.encode_batch(texts)

        def content_hash(self):
            return tokenizer.content_hash()

    cache = build_token_cache(corpus, Watching(), "train", tmp_path, shard_mb=0.002)  # ~4 documents a shard
    assert len(cache.shards) > 20
    encoded = 0
    for taken, n in seen:
        encoded += n
        assert taken <= encoded  # nothing read beyond the shard being encoded
    ids = [i for d in documents for i in tokenizer.encode(d) + [tokenizer.eos_id]]
    np.testing.assert_array_equal(np.asarray(cache.tokens), ids)


def test_shards_without_their_index_are_not_trusted(tmp_path, corpus, tokenizer, reference, caplog):
    caplog.set_level(logging.INFO, logger="llm")
    key = cache_key(corpus, tokenizer, "train")
    directory = tmp_path / "tokens"
    directory.mkdir()
    # A build killed after writing its shards, before the index: all shards there, no index.
    write_shards(corpus.documents("train"), tokenizer, directory, key, np.dtype("<u2"), 10_000)
    stale = sorted(directory.iterdir())
    assert stale and not (directory / f"{key}.json").exists()
    cache = build_token_cache(corpus, tokenizer, "train", tmp_path, shard_mb=SMALL)
    assert "token cache: stdlib/train" in caplog.text  # built, not reused
    np.testing.assert_array_equal(np.asarray(cache.tokens), reference)

    # A build that fails midway (a corpus file turns unreadable) leaves shards and no index.
    class Failing(ListCorpus):
        def documents(self, split):
            yield from list(super().documents(split))[:30]
            raise OSError("disk gone")

    failing = Failing([f"text {i} " * 100 for i in range(60)], ["x"])
    with pytest.raises(OSError, match="disk gone"):
        build_token_cache(failing, tokenizer, "train", tmp_path / "f", shard_mb=0.002)
    files = sorted(p.name for p in (tmp_path / "f" / "tokens").iterdir())
    assert files and not any(name.endswith(".json") for name in files)


def _corrupt_shard(directory: Path, index: dict, how: str) -> None:
    path = directory / index["shards"][1]["file"]
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 2)
    elif how == "longer":
        with open(path, "ab") as f:
            f.write(b"\0\0")
    elif how == "symlink":
        path.unlink()
        path.symlink_to(directory / index["shards"][0]["file"])


def _shard(field: str, value):
    def change(index: dict) -> None:
        index["shards"][1][field] = value
    return change


def _top(field: str, value):
    def change(index: dict) -> None:
        index[field] = value
    return change


# (what is done to the index, or to a shard; a phrase of the warning)
BROKEN = [
    ("missing", "is missing"),
    ("truncated", "cut short"),
    ("longer", "cut short"),
    ("symlink", "not a regular file"),
    (b"\xff\xfe{\"format\": 1}", "not UTF-8"),
    (b"{\"format\": ", "not JSON"),
    (b"[" * 100_000, "RecursionError"),
    (b"[1, 2, 3]", "not a JSON object"),
    (_top("format", "pickle"), "not a llm-token-shards index"),
    (_top("version", 99), "not a llm-token-shards index"),
    (_top("key", "0" * 64), "of key"),
    (_top("dtype", "object"), "dtype='object'"),
    (_top("dtype", "<f8"), "dtype='<f8'"),
    (_top("shards", []), "shards is not a list"),
    (_top("shards", {"0": "x"}), "shards is not a list"),
    (_top("n_tokens", 10**30), "n_tokens=1000000000000000000000000000000 is not a count"),
    (_top("n_tokens", 5), "not the sum over the shards"),
    (_top("fingerprint", "0" * 64), "fingerprint does not match"),
    (_shard("file", "../../../../etc/passwd"), "names file '../../../../etc/passwd'"),
    (_shard("file", "/etc/passwd"), "names file '/etc/passwd'"),
    (_shard("n_tokens", "123"), "n_tokens='123' is not a count"),
    (_shard("n_tokens", True), "n_tokens=True is not a count"),
    (_shard("n_tokens", -4), "n_tokens=-4 is not a count"),
    (_shard("n_tokens", 2**62), "is not a count"),
    (_shard("n_tokens", 12.5), "is not a count"),
    (_shard("n_documents", [1]), "n_documents=[1] is not a count"),
    (_shard("sha256", None), "is not a sha256"),
]


@pytest.mark.parametrize("damage,phrase", BROKEN, ids=[p for _, p in BROKEN])
def test_a_damaged_or_crafted_cache_is_rebuilt_saying_why(damage, phrase, tmp_path, caplog):
    corpus = SyntheticCorpus(n_symbols=20, n_documents=40, doc_length=300, val_documents=2)
    tok = build_tokenizer(corpus, tmp_path, kind="byte")
    first = build_token_cache(corpus, tok, "train", tmp_path, shard_mb=0.002)
    reference = np.asarray(first.tokens).copy()
    index = json.loads(first.path.read_text())
    assert len(index["shards"]) >= 3
    if isinstance(damage, str):
        _corrupt_shard(first.directory, index, damage)
    elif isinstance(damage, bytes):
        first.path.write_bytes(damage)
    else:
        damage(index)
        first.path.write_text(json.dumps(index))
    caplog.set_level(logging.INFO, logger="llm")
    again = build_token_cache(corpus, tok, "train", tmp_path, shard_mb=0.002)
    assert phrase in caplog.text and "rebuilding it" in caplog.text, caplog.text
    assert "Traceback" not in caplog.text
    np.testing.assert_array_equal(np.asarray(again.tokens), reference)
    assert not Path("/etc/passwd").is_relative_to(again.directory)
    assert all(p.parent == again.directory for p in again.shards)


def test_a_replaced_shard_is_found_by_verify(tmp_path):
    corpus = SyntheticCorpus(n_symbols=20, n_documents=10, doc_length=300, val_documents=2)
    tok = build_tokenizer(corpus, tmp_path, kind="byte")
    cache = build_token_cache(corpus, tok, "train", tmp_path, shard_mb=0.001)
    cache.verify()
    path = cache.shards[1]
    data = bytearray(path.read_bytes())
    data[0] ^= 1  # same size, other content: loads (sizes are checked on every load), fails verify
    path.write_bytes(bytes(data))
    with pytest.raises(CacheInvalid, match="shard 1"):
        build_token_cache(corpus, tok, "train", tmp_path, shard_mb=0.001).verify()


def test_wide_vocabularies_and_the_old_single_file_cache(tmp_path, caplog):
    corpus = SyntheticCorpus(n_symbols=20, n_documents=30, doc_length=200, val_documents=2)

    class Wide:  # ids beyond uint16, and no backend to send to worker processes
        vocab_size, eos_id = 70_000, 69_999

        def encode_batch(self, texts):
            return [[60_000 + ord(c) for c in t] for t in texts]

        def content_hash(self):
            return "wide"

    key = cache_key(corpus, Wide(), "train")
    old = tmp_path / "tokens" / f"{key}.bin"
    old.parent.mkdir()
    old.write_bytes(b"\0" * 64)  # the one-file format of before, with its index
    (tmp_path / "tokens" / f"{key}.json").write_text(json.dumps({"key": key, "dtype": "uint16", "n_tokens": 32}))
    caplog.set_level(logging.INFO, logger="llm")
    cache = build_token_cache(corpus, Wide(), "train", tmp_path, workers=2, shard_mb=0.001)
    assert "an older cache" in caplog.text and "cannot be sent to worker processes" in caplog.text
    assert cache.dtype == np.uint32 and len(cache.shards) > 2 and not old.exists()
    assert cache.tokens[0] >= 60_000 and cache.tokens[200] == 69_999


def test_fewer_shards_remove_the_rest(tmp_path):
    corpus = SyntheticCorpus(n_symbols=20, n_documents=30, doc_length=200, val_documents=2)
    tok = build_tokenizer(corpus, tmp_path, kind="byte")
    many = build_token_cache(corpus, tok, "train", tmp_path, shard_mb=0.001)
    many.path.unlink()  # a rebuild with another shard size
    few = build_token_cache(corpus, tok, "train", tmp_path, shard_mb=1)
    assert len(few.shards) == 1 < len(many.shards)
    assert sorted((tmp_path / "tokens").iterdir()) == sorted([few.path, *few.shards])


def test_a_failing_worker_is_reported(tmp_path, tokenizer):
    documents = ["fine text"] * 50
    with pytest.raises(RuntimeError, match="encoding shard 0 failed in a worker process: OverflowError"):
        # ids of a 512-token vocabulary do not fit uint8: each worker refuses its shard
        write_shards(documents, tokenizer, tmp_path, "k", np.dtype("u1"), 100, workers=2)


def test_a_worker_that_dies_is_named_with_the_keys_to_change(tmp_path, tokenizer):
    from llm.data.token_shards import _Workers

    pool = _Workers(2, tokenizer)
    try:
        pool.submit(0, ["some text"], tmp_path / "s0.bin", np.dtype("<u2"))
        assert pool.result(0)["n_documents"] == 1
        pool.procs[0].kill()  # as the kernel's OOM killer would
        pool.procs[0].wait()
        with pytest.raises(RuntimeError, match=r"shard 2 died \(exit code -9\); out of memory\? try fewer "
                                               "data.tokenize.workers"):
            pool.submit(2, ["more text"], tmp_path / "s2.bin", np.dtype("<u2"))
            pool.result(2)
    finally:
        pool.close()


# --- configuration ------------------------------------------------------------------------------


def test_tokenize_settings_reach_the_cache(tmp_path):
    cfg = compose_train(["data.tokenize.workers=3", "data.tokenize.shard_mb=0.5"], tmp_path)
    validate(cfg)
    assert tokenize_settings(cfg) == {"workers": 3, "shard_mb": 0.5}
    assert tokenize_settings(compose_train(["data=mixture"], tmp_path)) == {"workers": 1, "shard_mb": 16.0}


@pytest.mark.parametrize("override,phrase", [
    ("data.tokenize.workers=0", "data.tokenize.workers=0: must be in [1, 256]"),
    ("data.tokenize.workers=-2", "data.tokenize.workers=-2: must be in [1, 256]"),
    ("data.tokenize.workers=100000", "data.tokenize.workers=100000: must be in [1, 256]"),
    ("data.tokenize.shard_mb=0", "data.tokenize.shard_mb=0.0: must be in (0, 4096]"),
    ("data.tokenize.shard_mb=1e12", "data.tokenize.shard_mb=1000000000000.0: must be in (0, 4096]"),
])
def test_bad_tokenize_numbers_are_refused(override, phrase, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(compose_train([override], tmp_path))
    assert any(p.startswith(phrase) for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("override", ["data.tokenize.workers=two", "data.tokenize.workers=1.5",
                                      "data.tokenize.shard_mb=big", "data.tokenize.threads=2"])
def test_bad_tokenize_types_are_refused_while_composing(override, tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        compose_train([override], tmp_path)
    assert override.split("=")[0].split(".")[-1] in f"{e.value}\n{e.value.__cause__}"


def test_llm_train_exits_2_naming_the_key(tmp_path, monkeypatch, capsys):
    code, err = llm_cli("train", ["data.tokenize.workers=0", f"paths.root_dir={tmp_path}"], tmp_path, monkeypatch,
                        capsys)
    assert code == 2 and "data.tokenize.workers=0" in err and "Traceback" not in err, err
    code, err = llm_cli("train", ["data.tokenize.workers=many", f"paths.root_dir={tmp_path}"], tmp_path, monkeypatch,
                        capsys)
    assert code == 2 and "data.tokenize.workers" in err and "Traceback" not in err, err


@pytest.mark.slow  # two short runs; the cache itself is covered above, this is the path through llm-train
def test_a_run_trains_on_a_cache_two_workers_built_and_the_next_reuses_it(tmp_path, monkeypatch, capsys,
                                                                          single_thread):
    args = ["model=nano", "data.corpus.max_bytes=300000", "tokenizer.vocab_size=512", "data.seq_len=32",
            "data.micro_batch_size=4", "data.val_batches=2", "logger=none", "trainer.progress_bar=false",
            "budget.steps=2", "trainer.val_every=2", f"paths.root_dir={tmp_path}", "data.tokenize.shard_mb=0.05"]
    code, err = llm_cli("train", [*args, "data.tokenize.workers=2", f"hydra.run.dir={tmp_path}/a"], tmp_path,
                        monkeypatch, capsys)
    assert code == 0, err[-3000:]
    log = (tmp_path / "a" / "train.log").read_text()
    assert "shards by 2 workers" in log, log
    code, err = llm_cli("train", [*args, f"hydra.run.dir={tmp_path}/b"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert "token cache:" not in (tmp_path / "b" / "train.log").read_text()  # reused, not rebuilt
    a, b = (json.loads((tmp_path / run / "summary.json").read_text()) for run in "ab")
    assert a["train_tokens"] == b["train_tokens"] and a["val/loss"] == b["val/loss"]


def test_token_cache_is_exported():
    assert TokenCache.__module__ == "llm.data.token_cache"


def test_the_benchmark_runs_and_counts_the_same_tokens(tmp_path, capsys):
    from llm.data import tokenize_bench

    out = tmp_path / "bench.json"
    assert tokenize_bench.main(["--mb", "0.05", "--workers", "1", "--repeat", "1", "--vocab-size", "300",
                                "--shard-mb", "0.01", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["tokenizers encode_batch, one call",
                                           "tokenizers encode_batch, 256 documents a call", "token cache, 1 worker"]
    assert rows[0]["tokens"] == rows[2]["tokens"] > 1000 and rows[2]["shards"] > 2
    assert "| token cache, 1 worker |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tokenize_bench.main(["--workers", "0"])
