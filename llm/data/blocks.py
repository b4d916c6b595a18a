"""Cutting a token array into training blocks: a seeded, resumable, rank-sharded stream."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info


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


class BlockStream(IterableDataset):
    """An endless stream of (micro_batch_size, seq_len + 1) batches of random blocks.

    Sample k of the global stream is block permutation_e[k % n_blocks] with e = k // n_blocks,
    each epoch's permutation drawn from its own seed; micro-batch m of rank r is samples
    (m * world_size + r) * B + i, i < B. Batch m is a pure function of (seed, m, rank,
    world_size), so a run resumed at micro-batch `start` sees exactly what an uninterrupted one
    would, ranks never share a sample within an epoch, and each epoch uses every block once.
    With DataLoader workers, worker w of W yields micro-batches start + w, start + w + W, ...,
    which the DataLoader's round-robin puts back in order.

    `skip` leaves micro-batches out of the stream (the loss guard's bad batches): `start` then
    counts the batches yielded so far, and position p is the p-th micro-batch not skipped, so a
    resumed run that knows the same skip set continues exactly where the first one stopped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start: int = 0, skip: Iterable[int] = ()):
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.skip = sorted(set(skip))
        self.n_blocks = n_blocks_of(tokens, seq_len)
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The block order of `epoch`; the last two are kept, as a batch spans at most two."""
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = torch.randperm(self.n_blocks, generator=generator).numpy()
        return self._permutations[epoch]

    def sample_indices(self, m: int) -> range:
        """Global sample indices that make up this rank's micro-batch m."""
        first = (m * self.world_size + self.rank) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def batch(self, m: int) -> Tensor:
        """This rank's micro-batch m, a LongTensor (micro_batch_size, seq_len + 1)."""
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {m}")
        blocks = [self.permutation(k // self.n_blocks)[k % self.n_blocks] for k in self.sample_indices(m)]
        return gather_blocks(self.tokens, np.array(blocks), self.seq_len)

    def index_at(self, position: int) -> int:
        """The micro-batch index m at stream position `position`, stepping over skipped ones."""
        return stream_index(position, self.skip)

    def __iter__(self) -> Iterator[Tensor]:
        worker = get_worker_info()
        p, step = (self.start, 1) if worker is None else (self.start + worker.id, worker.num_workers)
        while True:
            yield self.batch(self.index_at(p))
            p += step


def stream_index(position: int, skip: list[int]) -> int:
    """The index of the `position`-th (0-based) micro-batch not in the sorted list `skip`."""
    index = position
    for skipped in skip:
        if skipped > index:
            break
        index += 1  # each skipped index at or before the candidate pushes it one further
    return index


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
