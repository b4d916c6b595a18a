"""data=tokens: pre-tokenised ids other tools write (nanoGPT/OLMo raw, llm.c .bin, .npy), read in
place, alone or as a source of a mixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm.config import ConfigError, validate
from llm.data.token_files import LLMC_HEADER_INTS, TokenFiles, read_token_file
from llm.files import InputError
from llm.tokenizer.build import build_tokenizer
from llm.tracking.metrics import read_metrics
from tests.conftest import compose_train, llm_cli

IDS = np.array([5, 70, 300, 65535, 0, 7], dtype=np.int64)


def write_llmc(path: Path, ids: np.ndarray, magic: int = 20240520, dtype=np.uint16, n: int | None = None) -> None:
    header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
    header[:3] = [magic, 1, len(ids) if n is None else n]
    path.write_bytes(header.tobytes() + ids.astype(dtype).tobytes())


def test_each_layout_reads_back_its_ids(tmp_path):
    raw = tmp_path / "train.bin"
    IDS.astype(np.uint16).tofile(raw)  # nanoGPT: np.array(ids, dtype=np.uint16).tofile(...)
    assert read_token_file(raw, "uint16", "k").tolist() == IDS.tolist()
    wide = tmp_path / "wide.bin"
    (IDS + 70_000).astype(np.uint32).tofile(wide)
    (tmp_path / "wide.bin.json").write_text('{"dtype": "uint32"}')  # a sidecar gives the width
    assert read_token_file(wide, None, "k").tolist() == (IDS + 70_000).tolist()
    llmc = tmp_path / "fineweb_train_000001.bin"
    write_llmc(llmc, IDS)
    assert read_token_file(llmc, None, "k").tolist() == IDS.tolist()
    write_llmc(llmc, IDS + 70_000, magic=20240801, dtype=np.uint32)
    assert read_token_file(llmc, "uint16", "k").tolist() == (IDS + 70_000).tolist()  # the header wins
    npy = tmp_path / "ids.npy"
    np.save(npy, IDS.astype(np.uint32))
    assert read_token_file(npy, None, "k").tolist() == IDS.tolist()


def test_unreadable_layouts_are_input_errors_naming_the_key(tmp_path):
    raw = tmp_path / "train.bin"
    IDS.astype(np.uint16).tofile(raw)
    with pytest.raises(InputError, match=r"data.corpus.train='.*train.bin': raw token ids need their width"):
        read_token_file(raw, None, "data.corpus.train")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(InputError, match="not a whole number of uint16 ids"):
        read_token_file(odd, "uint16", "k")
    cut = tmp_path / "cut.bin"
    write_llmc(cut, IDS, n=len(IDS) + 1)
    with pytest.raises(InputError, match="truncated"):
        read_token_file(cut, None, "k")
    with pytest.raises(InputError, match="no such file"):
        read_token_file(tmp_path / "missing.bin", "uint16", "k")
    np.save(tmp_path / "m.npy", np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(InputError, match="expected 1-D integer token ids"):
        read_token_file(tmp_path / "m.npy", None, "k")


def byte_shards(tmp_path: Path) -> tuple[Path, Path]:
    """nanoGPT-style train.bin / val.bin of byte-tokenizer ids (documents separated by EOS)."""
    tokenizer = build_tokenizer(None, tmp_path, kind="byte")
    text = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)]
    ids = [t for row in tokenizer.encode_batch(text) for t in (*row, tokenizer.eos_id)]
    cut = int(len(ids) * 0.9)
    train, val = tmp_path / "train.bin", tmp_path / "val.bin"
    np.array(ids[:cut], dtype=np.uint16).tofile(train)
    np.array(ids[cut:], dtype=np.uint16).tofile(val)
    return train, val


ARGS = ["model=nano", "tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=4", "data.val_batches=2",
        "logger=none", "trainer.progress_bar=false", "budget.steps=2", "trainer.val_every=2"]


def test_pre_tokenised_files_train_a_run(tmp_path, monkeypatch, capsys, single_thread):
    train, val = byte_shards(tmp_path)
    corpus = TokenFiles(str(train), str(val), dtype="uint16")
    assert corpus.fingerprint() == TokenFiles(str(train), str(val), dtype="uint16").fingerprint()
    code, err = llm_cli("train", [*ARGS, "data=tokens", f"data.corpus.train={train}", f"data.corpus.val={val}",
                                  "data.corpus.dtype=uint16", f"hydra.run.dir={tmp_path}/alone"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "alone" / "metrics.jsonl") if "val/loss" in r] == [2]


@pytest.mark.slow  # a second short run; the mixture path itself is in tests/test_mixture.py
def test_pre_tokenised_files_are_a_source_of_a_mixture(tmp_path, monkeypatch, capsys, single_thread):
    train, val = byte_shards(tmp_path)
    mixture = ["data=mixture", "~data.sources.code", "data.sources.markov.corpus.n_documents=4",
               "data.sources.markov.corpus.doc_length=256", "data.sources.markov.corpus.val_documents=1",
               "+data@data.sources.shards=tokens", f"data.sources.shards.corpus.train={train}",
               f"data.sources.shards.corpus.val={val}", "data.sources.shards.corpus.dtype=uint16"]
    code, err = llm_cli("train", [*ARGS, *mixture, f"hydra.run.dir={tmp_path}/mixed"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    record = [r for r in read_metrics(tmp_path / "mixed" / "metrics.jsonl") if "val/loss" in r][-1]
    assert {"val/loss/shards", "val/loss/markov", "data/epochs/shards"} <= set(record)


def test_ids_need_the_tokenizer_that_wrote_them(tmp_path, monkeypatch, capsys):
    train, val = byte_shards(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.kind='bpe' with pre-tokenised data.corpus"):
        validate(compose_train(["data=tokens", f"data.corpus.train={train}", f"data.corpus.val={val}"], root=tmp_path))
    big = tmp_path / "big.bin"
    np.array([1, 2, 3000] * 50, dtype=np.uint16).tofile(big)  # 3000: beyond the byte tokenizer's 259 ids
    code, err = llm_cli("train", [*ARGS, "data=tokens", f"data.corpus.train={big}", f"data.corpus.val={val}",
                                  "data.corpus.dtype=uint16"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "data.corpus.train=" in err and "holds id 3000" in err and "Traceback" not in err
