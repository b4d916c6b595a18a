"""Tokenizers: every kind trains (or loads), round-trips text, and trained kinds are cached."""

from __future__ import annotations

import json
import os

import pytest
import tokenizers

from llm.data import StdlibCorpus, TextCorpus
from llm.tokenizer import KINDS, SPECIAL_TOKENS, Tokenizer, build_tokenizer, bytes_per_token

# Unicode off the training alphabet, tabs, runs of spaces, trailing whitespace, and text that
# looks like markup used inside tokenizers ("##", "<0x41>").
TRICKY = "def f(x):\n\tréturn  x ** 2  # ☃ 🎉 ## <0x41>\n\n        pass   \n" + " " * 120 + "y"


@pytest.fixture(scope="module")
def corpus() -> StdlibCorpus:
    return StdlibCorpus(max_bytes=200_000)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(corpus, cache_dir) -> dict[str, Tokenizer]:
    return {kind: build_tokenizer(corpus, cache_dir, kind=kind, vocab_size=1024)
            for kind in ("bpe", "unigram", "wordpiece", "byte")}


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece", "byte"])
def test_round_trip(trained, corpus, kind):
    tok = trained[kind]
    for text in [TRICKY, "", " ", "\n", *corpus.documents("val")]:
        assert tok.decode(tok.encode(text)) == text
    batch = ["a = 1\n", TRICKY]
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_vocab_size_and_specials(trained, kind):
    tok = trained[kind]
    assert tok.vocab_size <= 1024
    if kind != "wordpiece":  # wordpiece keeps slots for continuation bytes and may use fewer
        assert tok.vocab_size == 1024
    ids = [tok.bos_id, tok.eos_id, tok.pad_id]
    assert len(set(ids)) == 3
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert [tok.backend.id_to_token(i) for i in ids] == list(SPECIAL_TOKENS)
    # encode adds no specials; decode drops them
    assert not set(ids) & set(tok.encode("import os\n"))
    assert tok.decode([tok.bos_id, *tok.encode("x = 1"), tok.eos_id, tok.pad_id]) == "x = 1"


def test_byte_tokenizer_ids_are_utf8_bytes(trained):
    tok = trained["byte"]
    assert tok.vocab_size == 259
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    text = "héllo ☃\x00\x7f\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    every_byte = bytes(range(256)).decode("latin-1")
    assert tok.encode(every_byte) == list(every_byte.encode("utf-8"))
    assert tok.decode(list(b"plain ascii")) == "plain ascii"


def test_bytes_per_token(trained, corpus):
    code = list(corpus.documents("val"))
    assert bytes_per_token(trained["bpe"], code) > 2.0
    assert bytes_per_token(trained["byte"], ["print('hello world')\n", "x = 1"]) == 1.0
    with pytest.raises(ValueError):
        bytes_per_token(trained["byte"], [""])


def test_cache_reused_and_keyed(corpus, cache_dir, trained):
    first = trained["bpe"]
    files = sorted((cache_dir / "tokenizers").glob("*.json"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    again = build_tokenizer(corpus, cache_dir, kind="bpe", vocab_size=1024)
    assert again.cached and not first.cached
    assert again.content_hash() == first.content_hash()
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes  # nothing rewritten

    other = build_tokenizer(corpus, cache_dir, kind="bpe", vocab_size=600)
    assert not other.cached and other.vocab_size == 600
    capped = build_tokenizer(corpus, cache_dir, kind="bpe", vocab_size=1024, max_training_bytes=50_000)
    assert not capped.cached
    assert len(list((cache_dir / "tokenizers").glob("*.json"))) == len(files) + 2
    assert not [p for p in (cache_dir / "tokenizers").iterdir() if p.suffix != ".json"]  # no temp files


def test_cache_key_follows_corpus(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("the cat sat on the mat\n" * 50)
    one = build_tokenizer(TextCorpus(str(tmp_path / "data" / "*.txt")), tmp_path, vocab_size=300)
    (tmp_path / "data" / "a.txt").write_text("a different text entirely\n" * 50)
    two = build_tokenizer(TextCorpus(str(tmp_path / "data" / "*.txt")), tmp_path, vocab_size=300)
    assert not two.cached
    assert one.content_hash() != two.content_hash()


def test_save_load_and_hash(trained, tmp_path):
    tok = trained["unigram"]
    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.content_hash() == tok.content_hash()
    assert loaded.encode(TRICKY) == tok.encode(TRICKY)
    tok.save(tmp_path)  # a directory means <dir>/tokenizer.json
    assert Tokenizer.load(tmp_path).content_hash() == tok.content_hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json", "tokenizer.json"]


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(None, tmp_path, kind="pretrained", path=str(missing))

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)

    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="plain.json"):
        Tokenizer.load(tmp_path / "plain.json")


def test_pretrained(trained, tmp_path):
    trained["bpe"].save(tmp_path / "bpe.json")
    tok = build_tokenizer(None, tmp_path, kind="pretrained", path=str(tmp_path / "bpe.json"))
    assert tok.encode(TRICKY) == trained["bpe"].encode(TRICKY)
    assert tok.content_hash() == trained["bpe"].content_hash()

    # A foreign tokenizer.json without our specials gets them added.
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "foreign.json"))
    tok = build_tokenizer(None, tmp_path, kind="pretrained", path=str(tmp_path / "foreign.json"))
    assert tok.vocab_size == 6
    assert sorted([tok.bos_id, tok.eos_id, tok.pad_id]) == [3, 4, 5]
    assert tok.encode("a b a") == [0, 1, 0]


def test_bad_arguments(corpus, tmp_path):
    with pytest.raises(ValueError, match="sentencepiece.*bpe, unigram, wordpiece, byte, pretrained"):
        build_tokenizer(corpus, tmp_path, kind="sentencepiece")
    with pytest.raises(ValueError, match="path"):
        build_tokenizer(None, tmp_path, kind="pretrained")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(corpus, tmp_path, kind="bpe", vocab_size=100)
    assert set(KINDS) == {"bpe", "unigram", "wordpiece", "byte", "pretrained"}


def test_save_is_atomic_and_readable(trained, tmp_path):
    path = tmp_path / "t.json"
    trained["byte"].save(path)
    trained["bpe"].save(path)  # overwrite in place
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    assert os.listdir(tmp_path) == ["t.json"]
    assert path.stat().st_mode & 0o777 == 0o644
