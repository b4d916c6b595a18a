"""Pretraining: next-token prediction on a corpus, with a tokenizer trained on it (or given)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from llm.recipes.base import Recipe, StageData

if TYPE_CHECKING:
    from llm.run.layout import RunDir
    from llm.run.plan import Settings


class Pretrain(Recipe):
    def data(self, cfg: DictConfig, settings: Settings, run_dir: RunDir) -> StageData:
        """Corpus, tokenizer (trained once per corpus and settings, cached; a resumed run's own) and
        token caches."""
        from llm.data import LMDataModule, build_token_cache

        cache = Path(cfg.paths.cache_dir)
        corpus = instantiate(cfg.data.corpus)
        if cfg.resume and run_dir.tokenizer.is_file():  # the tokenizer the run's embeddings were trained with
            from llm.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(run_dir.tokenizer, "resume")
        else:
            tokenizer = instantiate(cfg.tokenizer)(corpus=corpus, cache_dir=cache)
        train = build_token_cache(corpus, tokenizer, "train", cache)
        val = build_token_cache(corpus, tokenizer, "val", cache)
        data = settings.data
        datamodule = LMDataModule(train.tokens, val.tokens, data.seq_len, data.micro_batch_size, seed=cfg.seed,
                                  val_batches=data.val_batches)
        facts = {"data_fingerprint": corpus.fingerprint(), "train_tokens": train.n_tokens, "val_tokens": val.n_tokens,
                 "bytes_per_token": val.bytes_per_token, "entropy_floor": getattr(corpus, "entropy_rate", None)}
        return StageData(tokenizer, datamodule, facts)

    def done_line(self, summary: dict[str, Any]) -> str:
        ppl = summary.get("val/ppl", math.nan)
        return f"val/loss {summary['val/loss']:.4f} (ppl {ppl:.1f})"
