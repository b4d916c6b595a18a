"""The training stream every datamodule shares: seeded, rank-sharded, resumable, and able to
leave out micro-batches (the loss guard's bad ones).

Sample k of the global stream is item permutation_e[k % n] with e = k // n, each epoch's
permutation drawn from its own seed; micro-batch m of rank r is samples (m * world_size + r) * B
+ i, i < B. Batch m is a pure function of (seed, m, rank, world_size), so a run resumed at
micro-batch `start` sees exactly what an uninterrupted one would, ranks never share an item
within an epoch, and each epoch uses every item once. `skip` leaves micro-batch indices out:
`start` then counts the batches yielded so far, and position p is the p-th micro-batch not
skipped. With DataLoader workers, worker w of W yields positions start + w, start + w + W, ...,
which the DataLoader's round-robin puts back in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import IterableDataset, get_worker_info


def stream_index(position: int, skip: list[int]) -> int:
    """The index of the `position`-th (0-based) micro-batch not in the sorted list `skip`."""
    index = position
    for skipped in skip:
        if skipped > index:
            break
        index += 1  # each skipped index at or before the candidate pushes it one further
    return index


class ShardedStream(IterableDataset, ABC):
    """An endless stream of micro-batches of `n_items` items; a subclass says what a batch of
    items is (`collate`)."""

    def __init__(self, n_items: int, micro_batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0, skip: Iterable[int] = ()):
        super().__init__()
        if n_items < 1:
            raise ValueError("a stream needs at least one item")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n_items = n_items
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.skip = sorted(set(skip))
        self._permutations: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        """The item order of `epoch`; the last two are kept, as a batch spans at most two (more
        only when one batch is bigger than the dataset, and then they are recomputed)."""
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = torch.randperm(self.n_items, generator=generator).tolist()
        return self._permutations[epoch]

    def sample_indices(self, m: int) -> range:
        """Global sample indices that make up this rank's micro-batch m."""
        first = (m * self.world_size + self.rank) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def item_indices(self, m: int) -> list[int]:
        """The items of this rank's micro-batch m."""
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {m}")
        n = self.n_items
        return [self.permutation(k // n)[k % n] for k in self.sample_indices(m)]

    def batch(self, m: int) -> Any:
        """This rank's micro-batch m."""
        return self.collate(self.item_indices(m))

    @abstractmethod
    def collate(self, items: list[int]) -> Any:
        """The batch made of these items."""

    def index_at(self, position: int) -> int:
        """The micro-batch index m at stream position `position`, stepping over skipped ones."""
        return stream_index(position, self.skip)

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        p, step = (self.start, 1) if worker is None else (self.start + worker.id, worker.num_workers)
        while True:
            yield self.batch(self.index_at(p))
            p += step


class StreamDataModule(pl.LightningDataModule):
    """What both datamodules share: where this rank's stream starts, and the skipped batches.

    The training stream starts at micro-batch position global_step * accumulate_grad_batches, so
    a run resumed from a checkpoint continues the exact batch sequence (dataloaders are built
    after Lightning restores the step). Micro-batches the loss guard found bad are left out
    (`skip`); the set is saved in every checkpoint, so a resumed run leaves out the same ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: set[int] = set()

    def skip(self, indices: Iterable[int]) -> None:
        """Leave these micro-batch indices out of the training stream from now on."""
        self.skipped.update(int(i) for i in indices)

    def stream_index(self, position: int) -> int:
        """The micro-batch index the stream yields at `position` (batches trained on so far)."""
        return stream_index(position, sorted(self.skipped))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": sorted(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A union, not a replacement: a rollback restores an older checkpoint, which does not yet
        # know the batches skipped since.
        self.skip(state.get("skipped_batches", ()))

    def _placement(self) -> tuple[int, int, int]:
        """(data-parallel rank, data-parallel size, first micro-batch position) from the trainer, or
        a fresh single process. The ranks of one tensor-parallel group share a data-parallel rank,
        so they see the same batches (Lightning's sampler arguments say which rank that is)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        sampler = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return (sampler.get("rank", trainer.global_rank), sampler.get("num_replicas", trainer.world_size),
                trainer.global_step * trainer.accumulate_grad_batches)
