"""Tokens/s of building a token cache (llm.data.token_shards) with 1, 2, ... workers, against one
`tokenizers` encode_batch call over the same text with the same tokenizer.

    python -m llm.data.tokenize_bench --mb 16 --workers 1 2 --repeat 3

The text is read into memory first (the standard library's source, or --text files) and a BPE
tokenizer trained on it (or --tokenizer given), so every measurement tokenises the same documents
and none includes reading them from disk. A cache build is timed whole: shard files written, index
written, worker processes started and stopped. The encode_batch call is timed alone: its ids stay
in Python objects and nothing is written. Each figure is the best of --repeat runs (the machine may
be busy); tokens are counted without the EOS tokens a cache adds between documents, so every row
counts the same tokens. CPU seconds (this process's threads and the workers) say what a row costs
whatever else the machine runs. A second encode_batch row calls it on a few hundred documents at a time,
as a cache build does. Every row starts from a fresh copy of the tokenizer, as a worker does (a
BPE tokenizer caches the words it has seen, which would favour the rows after the first).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger("llm.data.tokenize_bench")


class MemoryCorpus:
    """Documents held in memory: what every row of the benchmark reads."""

    def __init__(self, documents: list[str], name: str):
        self.name = name
        self.docs = documents
        self._fingerprint: Optional[str] = None

    def documents(self, split: str) -> Iterator[str]:
        return iter(self.docs if split == "train" else [])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from llm.data.corpus import fingerprint

            self._fingerprint = fingerprint({"corpus": self.name}, self.docs)
        return self._fingerprint


def load_documents(mb: float, text: Optional[list[str]]) -> tuple[list[str], str]:
    """About `mb` MiB of non-empty documents: --text files (by glob), else the standard library."""
    limit = int(mb * 2**20)
    if text:
        from llm.data.text import TextCorpus

        corpus: Any = TextCorpus(text, val_fraction=0.0, max_bytes=limit)
    else:
        from llm.data.stdlib import StdlibCorpus

        corpus = StdlibCorpus(val_fraction=0.0, max_bytes=limit)
    return [d for d in corpus.documents("train") if d], corpus.name


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(documents: list[str], tokenizer: Any, workers: list[int], shard_mb: float, repeat: int,
            work_dir: Path) -> list[dict[str, Any]]:
    """One row per method: seconds (the best of `repeat` rounds, each round running every method
    once, so a load that comes and goes weighs on all alike), tokens, tokens/s, and speed relative
    to the single encode_batch call."""
    from llm.data.token_cache import build_token_cache
    from llm.data.token_shards import ENCODE_DOCUMENTS

    def encode(batch: int) -> Any:
        def run(tok: Any) -> dict[str, Any]:
            n = 0
            for i in range(0, len(documents), batch):
                n += sum(len(e.ids) for e in tok.backend.encode_batch(documents[i:i + batch], add_special_tokens=False))
            return {"tokens": n}
        return run

    corpus = MemoryCorpus(documents, "bench")

    def build(n: int) -> Any:
        def run(tok: Any) -> dict[str, Any]:
            directory = Path(tempfile.mkdtemp(dir=work_dir))
            try:
                cache = build_token_cache(corpus, tok, "train", directory, workers=n, shard_mb=shard_mb)
                return {"tokens": cache.n_tokens - cache.n_documents, "shards": len(cache.shards)}
            finally:
                shutil.rmtree(directory)
        return run

    def fresh() -> Any:
        """A copy of the tokenizer with an empty word cache (BPE keeps one per tokenizer): every row
        starts cold, as a worker process does, instead of finding the words of an earlier row."""
        import tokenizers

        from llm.tokenizer.tokenizer import Tokenizer

        return Tokenizer(tokenizers.Tokenizer.from_str(tokenizer.backend.to_str()))

    methods = [("tokenizers encode_batch, one call", None, encode(len(documents))),
               (f"tokenizers encode_batch, {ENCODE_DOCUMENTS} documents a call", None, encode(ENCODE_DOCUMENTS))]
    methods += [(f"token cache, {n} worker{'s' * (n > 1)}", n, build(n)) for n in workers]
    rows = [{"method": name, "workers": n, "seconds": float("inf"), "cpu_seconds": float("inf")}
            for name, n, _ in methods]
    for _ in range(repeat):
        for row, (_, _, run) in zip(rows, methods):
            tok = fresh()
            cpu, start = cpu_seconds(), time.perf_counter()
            row.update(run(tok))
            row["seconds"] = min(row["seconds"], time.perf_counter() - start)
            row["cpu_seconds"] = min(row["cpu_seconds"], cpu_seconds() - cpu)
    for row in rows:
        if row["tokens"] != rows[0]["tokens"]:
            raise RuntimeError(f"{row['method']}: {row['tokens']} tokens, encode_batch gave {rows[0]['tokens']}")
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["vs_encode_batch"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | seconds | tokens/s | vs encode_batch | CPU seconds |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['seconds']:.2f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['vs_encode_batch']:.2f} | {row['cpu_seconds']:.2f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm.data.tokenize_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=16.0, help="MiB of text to tokenise (default 16)")
    p.add_argument("--text", nargs="+", metavar="GLOB", help="text files to use instead of the standard library")
    p.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json to use instead of training one")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the BPE tokenizer trained (8192)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts of the cache rows (1 2)")
    p.add_argument("--shard-mb", type=float, default=1.0, help="MiB of text per shard (1; several per worker)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each row; the best counts (3)")
    p.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.mb <= 0 or args.shard_mb <= 0 or args.repeat < 1 or min(args.workers) < 1 or args.vocab_size < 259:
        parser().error("--mb and --shard-mb must be > 0, --repeat and --workers >= 1, --vocab-size >= 259")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet = logging.getLogger("llm.data.token_cache")  # a line per build would drown the table
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return run(args)
    finally:
        quiet.setLevel(level)


def run(args: argparse.Namespace) -> int:
    from llm.data.token_shards import available_cores
    from llm.files import InputError
    from llm.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as work:
        try:
            documents, name = load_documents(args.mb, args.text)
            if not documents:
                raise InputError(f"no text to tokenise in {name}")
            corpus = MemoryCorpus(documents, name)
            if args.tokenizer:
                tokenizer = build_tokenizer(None, work, kind="pretrained", path=args.tokenizer)
            else:
                tokenizer = build_tokenizer(corpus, work, kind="bpe", vocab_size=args.vocab_size)
        except (InputError, ValueError) as e:
            log.error("error: %s", e)
            return 2
        text_mb = sum(len(d.encode("utf-8")) for d in documents) / 2**20
        log.info(f"{text_mb:.1f} MiB of {name} in {len(documents):,} documents; {tokenizer}; "
                 f"{available_cores()} cores; best of {args.repeat}")
        rows = measure(documents, tokenizer, args.workers, args.shard_mb, args.repeat, Path(work))
    sys.stdout.write(table(rows) + "\n")  # the command's output, on stdout
    if args.json:
        Path(args.json).write_text(json.dumps({"text_mb": text_mb, "documents": len(documents),
                                               "cores": available_cores(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
