"""PostTrainDataModule: post-training examples in, rank-sharded resumable Lightning dataloaders out."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

Collate = Callable[[Sequence[Any]], Any]


class ExampleStream(IterableDataset):
    """An endless stream of collated micro-batches of examples, the post-training BlockStream.

    Sample k of the global stream is example permutation_e[k % n] with e = k // n, each epoch's
    permutation drawn from its own seed; micro-batch m of rank r collates samples
    (m * world_size + r) * B + i, i < B. So batch m is a pure function of (seed, m, rank,
    world_size), a run resumed at micro-batch `start` sees what an uninterrupted one would, and
    ranks never share an example within an epoch. With DataLoader workers, worker w of W yields
    micro-batches start + w, start + w + W, ..., which the DataLoader puts back in order.
    """

    def __init__(self, examples: Sequence[Any], collate_fn: Collate, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        super().__init__()
        if not examples:
            raise ValueError("an ExampleStream needs at least one example")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.examples = examples
        self.collate_fn = collate_fn
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self._permutations: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        """The example order of `epoch`; the last two are kept, as a batch spans at most two
        (more only when one batch is bigger than the dataset, and then they are recomputed)."""
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = torch.randperm(len(self.examples), generator=generator).tolist()
        return self._permutations[epoch]

    def sample_indices(self, m: int) -> range:
        """Global sample indices that make up this rank's micro-batch m."""
        first = (m * self.world_size + self.rank) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def example_indices(self, m: int) -> list[int]:
        """Indices into `examples` of this rank's micro-batch m."""
        n = len(self.examples)
        return [self.permutation(k // n)[k % n] for k in self.sample_indices(m)]

    def batch(self, m: int) -> Any:
        """This rank's micro-batch m, collated."""
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {m}")
        return self.collate_fn([self.examples[i] for i in self.example_indices(m)])

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        m, step = (self.start, 1) if worker is None else (self.start + worker.id, worker.num_workers)
        while True:
            yield self.batch(m)
            m += step


def validation_batches(examples: Sequence[Any], collate_fn: Collate, micro_batch_size: int,
                       max_batches: int | None = None) -> list[Any]:
    """The examples in order, collated in groups of micro_batch_size; the last group may be
    smaller, so every held-out example is evaluated (unless max_batches stops earlier)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    starts = range(0, len(examples), micro_batch_size)
    if max_batches is not None:
        starts = starts[:max(max_batches, 0)]
    return [collate_fn(list(examples[s:s + micro_batch_size])) for s in starts]


class PostTrainDataModule(pl.LightningDataModule):
    """Training batches from an ExampleStream, validation batches from `val_examples` in order.

    `examples` are whatever `collate_fn` takes: tokenised examples, packs, preference pairs or
    prompts (llm.data.posttrain). The trainer runs with use_distributed_sampler=False: this module
    shards by rank itself. The training stream starts at micro-batch global_step *
    accumulate_grad_batches, so a resumed run continues the exact batch sequence (dataloaders are
    built after Lightning restores the step). Validation batch j goes to rank j % world_size.
    """

    def __init__(self, train_examples: Sequence[Any], val_examples: Sequence[Any], collate_fn: Collate,
                 micro_batch_size: int, seed: int = 0, val_batches: int | None = None):
        super().__init__()
        if not train_examples:
            raise ValueError("PostTrainDataModule needs at least one training example")
        self.train_examples = train_examples
        self.val_examples = val_examples
        self.collate_fn = collate_fn
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.val_batches = val_batches

    def _placement(self) -> tuple[int, int, int]:
        """(rank, world_size, first micro-batch) from the trainer, or a fresh single process."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return (trainer.global_rank, trainer.world_size,
                trainer.global_step * trainer.accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        rank, world_size, start = self._placement()
        stream = ExampleStream(self.train_examples, self.collate_fn, self.micro_batch_size, seed=self.seed,
                               rank=rank, world_size=world_size, start=start)
        # batch_size=None and the identity: the stream already yields whole, collated batches.
        return DataLoader(stream, batch_size=None, num_workers=0, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        rank, world_size, _ = self._placement()
        batches = validation_batches(self.val_examples, self.collate_fn, self.micro_batch_size, self.val_batches)
        return DataLoader(batches[rank::world_size], batch_size=None, num_workers=0, collate_fn=_identity)


def _identity(batch: Any) -> Any:
    return batch
