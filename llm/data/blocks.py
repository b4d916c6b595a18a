"""Cutting a token array into training blocks: a seeded, resumable, rank-sharded stream."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from llm.data.stream import ShardedStream


def n_blocks_of(tokens: np.ndarray, seq_len: int) -> int:
    """How many non-overlapping (seq_len + 1)-token blocks fit, neighbours sharing one token."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens hold no block of seq_len={seq_len} "
                         f"(a block needs {seq_len + 1} tokens)")
    return n


def gather_blocks(tokens: np.ndarray, blocks: np.ndarray, seq_len: int) -> Tensor:
    """Rows tokens[b*seq_len : b*seq_len + seq_len + 1] for each block b, as a LongTensor."""
    index = np.asarray(blocks, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


class BlockStream(ShardedStream):
    """An endless stream of (micro_batch_size, seq_len + 1) batches of random blocks: a
    `ShardedStream` (llm/data/stream.py) whose items are the token array's blocks."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start: int = 0, skip: Iterable[int] = ()):
        super().__init__(n_blocks_of(tokens, seq_len), micro_batch_size, seed, rank, world_size, start, skip)
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_blocks = self.n_items

    def collate(self, items: list[int]) -> Tensor:
        """A LongTensor (micro_batch_size, seq_len + 1) of the blocks."""
        return gather_blocks(self.tokens, np.array(items), self.seq_len)


def validation_batches(tokens: np.ndarray, seq_len: int, micro_batch_size: int,
                       max_batches: int | None) -> list[Tensor]:
    """The first blocks, in order, grouped into batches of micro_batch_size.

    A trailing partial batch is dropped, unless there are too few blocks for even one full
    batch: then they all form one smaller batch, so validation is never empty.
    """
    n_blocks = n_blocks_of(tokens, seq_len)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if max_batches is not None and max_batches <= 0:
        return []
    if n_blocks < micro_batch_size:
        return [gather_blocks(tokens, np.arange(n_blocks), seq_len)]
    n_batches = n_blocks // micro_batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return [
        gather_blocks(tokens, np.arange(i * micro_batch_size, (i + 1) * micro_batch_size), seq_len)
        for i in range(n_batches)
    ]


def split_inputs_targets(batch: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token prediction pairs: inputs are all but the last token, targets all but the first."""
    return batch[:, :-1], batch[:, 1:]
