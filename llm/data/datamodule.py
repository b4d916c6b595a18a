"""LMDataModule: token arrays in, Lightning dataloaders out."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from llm.data.blocks import BlockStream, validation_batches


class LMDataModule(pl.LightningDataModule):
    """Training batches from a BlockStream, validation from the first blocks of `val_tokens`.

    The training stream starts at micro-batch global_step * accumulate_grad_batches, so a run
    resumed from a checkpoint continues the exact batch sequence (dataloaders are built after
    Lightning restores the step). Validation batch j goes to rank j % world_size.
    """

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, seq_len: int,
                 micro_batch_size: int, seed: int = 0, val_batches: int | None = 8):
        super().__init__()
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.seq_len = seq_len
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
        stream = BlockStream(self.train_tokens, self.seq_len, self.micro_batch_size, seed=self.seed,
                             rank=rank, world_size=world_size, start=start)
        # batch_size=None: the stream already yields whole batches.
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        rank, world_size, _ = self._placement()
        batches = validation_batches(self.val_tokens, self.seq_len, self.micro_batch_size,
                                     self.val_batches)
        return DataLoader(batches[rank::world_size], batch_size=None, num_workers=0)
