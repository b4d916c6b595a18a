"""LMDataModule: token arrays in, Lightning dataloaders out."""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from llm.config import ConfigError
from llm.data.blocks import BlockStream, validation_batches
from llm.data.stream import StreamDataModule


class LMDataModule(StreamDataModule):
    """Training batches from a BlockStream, validation from the first blocks of `val_tokens`
    (batch j to rank j % world_size); resuming and skipping as `StreamDataModule`."""

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, seq_len: int,
                 micro_batch_size: int, seed: int = 0, val_batches: int | None = 8):
        super().__init__()
        for split, tokens in (("train", train_tokens), ("val", val_tokens)):
            if len(tokens) < seq_len + 1:  # an input problem, reported before any training
                raise ConfigError([f"data.seq_len={seq_len}: the {split} split has only {len(tokens)} tokens, too few "
                                   f"for one block of {seq_len + 1}; give more text or a smaller data.seq_len"])
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.val_batches = val_batches

    def train_dataloader(self) -> DataLoader:
        rank, world_size, start = self._placement()
        stream = BlockStream(self.train_tokens, self.seq_len, self.micro_batch_size, seed=self.seed,
                             rank=rank, world_size=world_size, start=start, skip=self.skipped)
        # batch_size=None: the stream already yields whole batches.
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        rank, world_size, _ = self._placement()
        batches = validation_batches(self.val_tokens, self.seq_len, self.micro_batch_size,
                                     self.val_batches)
        return DataLoader(batches[rank::world_size], batch_size=None, num_workers=0)
