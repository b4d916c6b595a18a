"""LMDataModule: token arrays in, Lightning dataloaders out."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from llm.config import ConfigError
from llm.data.blocks import BlockStream, stream_index, validation_batches


class LMDataModule(pl.LightningDataModule):
    """Training batches from a BlockStream, validation from the first blocks of `val_tokens`.

    The training stream starts at micro-batch position global_step * accumulate_grad_batches, so
    a run resumed from a checkpoint continues the exact batch sequence (dataloaders are built
    after Lightning restores the step). Validation batch j goes to rank j % world_size.

    Micro-batches the loss guard found bad are left out of the stream (`skip`); the set is saved
    in every checkpoint, so a resumed run leaves out the same ones.
    """

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
        """(rank, world_size, first micro-batch position) from the trainer, or a fresh single process."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return (trainer.global_rank, trainer.world_size,
                trainer.global_step * trainer.accumulate_grad_batches)

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
