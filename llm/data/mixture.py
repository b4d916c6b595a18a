"""Mixtures: several named sources trained on in proportions of tokens, each validated on its own.

Every block holds seq_len + 1 tokens whatever its source, so a share of blocks is a share of
tokens. Which source global sample k comes from is a fixed schedule, not a random draw: the
weights are rounded to counts n_s out of PERIOD slots, and the slots of one period are ordered by
smooth weighted round-robin (each slot goes to the source furthest behind its share), so every
window of the stream, not only its long-run average, holds each source in proportion (to within
about one block per source), where iid draws would be off by sqrt(window) blocks. Sample k is
then source s's own sample j = (number of earlier samples from s), taken from s's own seeded
permutation of its blocks, one permutation per pass (epoch) over them.

Both are pure functions of k, so `MixtureStream` keeps everything `ShardedStream` promises: rank r
gets samples (m * world_size + r) * B + i as before (disjoint ranks, nothing left out), a resumed
run continues at its micro-batch exactly, and each source's epochs consumed after K samples is
count_s(K) / blocks_s, with no state of its own to save.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from llm.config import ConfigError
from llm.data.blocks import gather_blocks, n_blocks_of, validation_batches
from llm.data.stream import ShardedStream, StreamDataModule

PERIOD = 10_000  # schedule slots per period: weights are honoured to 1 / PERIOD
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a source's name is a part of its metric names


def slot_counts(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """Integer slots per source out of `period`, proportional to `weights` (largest remainder),
    every source of positive weight getting at least one."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {list(weights)}")
    if np.count_nonzero(w) > period:
        raise ValueError(f"at most {period} sources of positive weight")
    exact = w / w.sum() * period
    counts = np.floor(exact).astype(np.int64)
    counts[(w > 0) & (counts == 0)] = 1  # a source asked for is never silently dropped
    while counts.sum() < period:  # hand out what rounding down left, largest remainder first
        counts[np.argmax(np.where(w > 0, exact - counts, -np.inf))] += 1
    while counts.sum() > period:  # only after the minimum of one: take back from the largest
        counts[np.argmax(np.where(counts > 1, counts - exact, -np.inf))] -= 1
    return counts


class Schedule:
    """Which source each global sample comes from, and how many samples each source gave before it."""

    def __init__(self, weights: Sequence[float], period: int = PERIOD):
        self.counts = slot_counts(weights, period)
        self.period = period
        n = len(self.counts)
        order = np.empty(period, dtype=np.int64)
        credit = np.zeros(n, dtype=np.int64)
        for slot in range(period):  # smooth weighted round-robin (as nginx balances upstreams)
            credit += self.counts
            s = int(np.argmax(credit))  # ties: the first source
            credit[s] -= period
            order[slot] = s
        self.order = order
        # before[r, s]: slots of source s among the first r slots of a period
        self.before = np.zeros((period + 1, n), dtype=np.int64)
        np.add.at(self.before[1:], (np.arange(period), order), 1)
        self.before = np.cumsum(self.before, axis=0)

    @property
    def shares(self) -> np.ndarray:
        """Each source's exact long-run share of samples (its rounded weight)."""
        return self.counts / self.period

    def source(self, k: np.ndarray) -> np.ndarray:
        """The source of each global sample index."""
        return self.order[np.asarray(k) % self.period]

    def taken(self, k: np.ndarray | int, source: np.ndarray | int) -> np.ndarray:
        """How many of the samples before index k came from `source` (so: its own sample index)."""
        k = np.asarray(k)
        return (k // self.period) * self.counts[source] + self.before[k % self.period, source]

    def taken_all(self, k: int) -> np.ndarray:
        """Samples of every source among the first k."""
        return (k // self.period) * self.counts + self.before[k % self.period]


def _seed(seed: int, source: int, epoch: int) -> int:
    return (seed * 1_000_003 + source * 7_919 + epoch * 104_729) % 2**63


class MixtureStream(ShardedStream):
    """An endless stream of (micro_batch_size, seq_len + 1) batches mixing the sources' blocks by
    the schedule; rank sharding, resuming and skipping as `ShardedStream` (llm/data/stream.py)."""

    def __init__(self, tokens: Sequence[np.ndarray], weights: Sequence[float], seq_len: int, micro_batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0, skip: Iterable[int] = ()):
        if len(tokens) != len(weights):
            raise ValueError(f"{len(tokens)} token arrays for {len(weights)} weights")
        self.n_blocks = np.array([n_blocks_of(t, seq_len) for t in tokens], dtype=np.int64)
        super().__init__(int(self.n_blocks.sum()), micro_batch_size, seed, rank, world_size, start, skip)
        self.tokens = list(tokens)
        self.seq_len = seq_len
        self.schedule = Schedule(weights)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def order(self, source: int, epoch: int) -> np.ndarray:
        """Source s's block order in its pass `epoch` (the last few kept: a batch spans few)."""
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4 * len(self.tokens):
                self._orders.pop(next(iter(self._orders)))
            generator = torch.Generator().manual_seed(_seed(self.seed, source, epoch))
            self._orders[key] = torch.randperm(int(self.n_blocks[source]), generator=generator).numpy()
        return self._orders[key]

    def item_indices(self, m: int) -> list[tuple[int, int]]:
        """(source, block) of each sample of this rank's micro-batch m."""
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {m}")
        k = np.arange(self.sample_indices(m).start, self.sample_indices(m).stop)
        sources = self.schedule.source(k)
        own = self.schedule.taken(k, sources)
        blocks = self.n_blocks[sources]
        return [(int(s), int(self.order(int(s), int(j // n))[j % n])) for s, j, n in zip(sources, own, blocks)]

    def collate(self, items: list[tuple[int, int]]) -> Tensor:
        """A LongTensor (micro_batch_size, seq_len + 1): the blocks, in order, each from its source."""
        sources = np.array([s for s, _ in items])
        blocks = np.array([b for _, b in items])
        batch = torch.empty(len(items), self.seq_len + 1, dtype=torch.long)
        for s in np.unique(sources):  # one gather per source
            rows = np.flatnonzero(sources == s)
            batch[torch.from_numpy(rows)] = gather_blocks(self.tokens[s], blocks[rows], self.seq_len)
        return batch

    def epochs(self, samples: int) -> np.ndarray:
        """Passes over each source's blocks that the first `samples` global samples make."""
        return self.schedule.taken_all(samples) / self.n_blocks


@dataclass
class Source:
    """One named source of a mixture: its corpus and its weight (a share of the training tokens)."""

    name: str
    corpus: Any  # a Corpus
    weight: float


class Mixture:
    """Named sources with weights. As a `Corpus` (what a trained tokenizer learns from) it yields
    every source's documents in turn, so a capped tokenizer sample holds each source alike; its
    fingerprint leaves the weights out, so a sweep over weights shares one tokenizer (and per-token
    losses stay comparable across the sweep)."""

    def __init__(self, sources: Sequence[Source]):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        for source in sources:
            if not NAME.match(source.name):
                raise ValueError(f"source name {source.name!r}: use letters, digits, '_', '-' or '.'")
        slot_counts([s.weight for s in sources])  # refuses bad weights
        self.sources = list(sources)
        self.name = "mixture(" + ",".join(s.name for s in self.sources) + ")"
        self._fingerprint: str | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def documents(self, split: str) -> Iterator[str]:
        streams = [iter(s.corpus.documents(split)) for s in self.sources]
        while streams:
            for stream in list(streams):
                document = next(stream, None)
                if document is None:
                    streams.remove(stream)
                else:
                    yield document

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            parts = [[s.name, s.corpus.fingerprint()] for s in self.sources]
            self._fingerprint = hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()
        return self._fingerprint


def mixture_of(sources: Mapping[str, Any], build: Any) -> Mixture:
    """A Mixture from the `data.sources` config: name -> {weight, corpus}; `build` makes a corpus
    of its node (hydra's instantiate). Sources of weight 0 are kept: they are still validated."""
    return Mixture([Source(str(name), build(node["corpus"]), float(node["weight"])) for name, node in sources.items()])


class MixtureDataModule(StreamDataModule):
    """Training batches from a `MixtureStream`; one validation dataloader per source (the first
    blocks of its val split, batch j to rank j % world_size), named by `val_names`."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], train_tokens: Sequence[np.ndarray],
                 val_tokens: Sequence[np.ndarray], seq_len: int, micro_batch_size: int, seed: int = 0,
                 val_batches: int | None = 8):
        super().__init__()
        for name, train, val in zip(names, train_tokens, val_tokens):
            for split, tokens in (("train", train), ("val", val)):
                if len(tokens) < seq_len + 1:
                    raise ConfigError([f"data.sources.{name}: its {split} split has only {len(tokens)} tokens, too "
                                       f"few for one block of data.seq_len + 1 = {seq_len + 1}; give it more text or "
                                       "use a smaller data.seq_len"])
        self.val_names = list(names)
        self.weights = list(weights)
        self.train_tokens = list(train_tokens)
        self.val_tokens = list(val_tokens)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.val_batches = val_batches
        self.n_blocks = np.array([n_blocks_of(t, seq_len) for t in self.train_tokens])
        self.schedule = Schedule(self.weights)

    def stream(self, rank: int = 0, world_size: int = 1, start: int = 0) -> MixtureStream:
        return MixtureStream(self.train_tokens, self.weights, self.seq_len, self.micro_batch_size, seed=self.seed,
                             rank=rank, world_size=world_size, start=start, skip=self.skipped)

    def train_dataloader(self) -> DataLoader:
        rank, world_size, start = self._placement()
        return DataLoader(self.stream(rank, world_size, start), batch_size=None, num_workers=0)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world_size, _ = self._placement()
        return [DataLoader(validation_batches(tokens, self.seq_len, self.micro_batch_size, self.val_batches)
                           [rank::world_size], batch_size=None, num_workers=0) for tokens in self.val_tokens]

    def epochs_consumed(self, steps: int) -> dict[str, float]:
        """`data/epochs/<source>`: passes over each source's training blocks after `steps` optimizer
        steps of the attached trainer (all ranks, skipped micro-batches counted as consumed)."""
        _, world_size, _ = self._placement()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        batches = self.stream_index(steps * accumulate)  # micro-batch index reached, skipped ones included
        samples = batches * world_size * self.micro_batch_size
        epochs = self.schedule.taken_all(samples) / self.n_blocks
        return {f"data/epochs/{name}": float(e) for name, e in zip(self.val_names, epochs)}
