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


def tokenize_settings(cfg: DictConfig) -> dict[str, Any]:
    """data.tokenize as build_token_cache's arguments (workers, shard_mb); its defaults where unset."""
    tokenize = cfg.data.get("tokenize") or {}
    return {name: tokenize[name] for name in ("workers", "shard_mb") if tokenize.get(name) is not None}


class Pretrain(Recipe):
    def data(self, cfg: DictConfig, settings: Settings, run_dir: RunDir) -> StageData:
        """Corpus, tokenizer (trained once per corpus and settings, cached; a resumed run's own) and
        token caches."""
        from llm.data import LMDataModule
        from llm.data.token_files import split_tokens

        cache = Path(cfg.paths.cache_dir)
        if cfg.data.get("sources"):
            return self.mixture_data(cfg, settings, run_dir)
        corpus = instantiate(cfg.data.corpus)
        tokenizer = self.tokenizer(cfg, corpus, run_dir)
        train = split_tokens(corpus, tokenizer, "train", cache, **tokenize_settings(cfg))
        val = split_tokens(corpus, tokenizer, "val", cache, **tokenize_settings(cfg))
        data = settings.data
        datamodule = LMDataModule(train.tokens, val.tokens, data.seq_len, data.micro_batch_size, seed=cfg.seed,
                                  val_batches=data.val_batches)
        facts = {"data_fingerprint": corpus.fingerprint(), "train_tokens": train.n_tokens, "val_tokens": val.n_tokens,
                 "bytes_per_token": val.bytes_per_token, "entropy_floor": getattr(corpus, "entropy_rate", None)}
        return StageData(tokenizer, datamodule, facts)

    @staticmethod
    def tokenizer(cfg: DictConfig, corpus: Any, run_dir: RunDir) -> Any:
        """The tokenizer the run's embeddings were trained with when resuming, else the configured one
        (a trained kind learns from `corpus`, a mixture's sources alike)."""
        if cfg.resume and run_dir.tokenizer.is_file():
            from llm.tokenizer import Tokenizer

            return Tokenizer.load(run_dir.tokenizer, "resume")
        return instantiate(cfg.tokenizer)(corpus=corpus, cache_dir=Path(cfg.paths.cache_dir))

    def mixture_data(self, cfg: DictConfig, settings: Settings, run_dir: RunDir) -> StageData:
        """data=mixture: one tokenizer for all sources, a token cache per source and split."""
        from llm.data.mixture import MixtureDataModule, mixture_of
        from llm.data.token_files import split_tokens

        cache = Path(cfg.paths.cache_dir)
        mixture = mixture_of(cfg.data.sources, instantiate)
        tokenizer = self.tokenizer(cfg, mixture, run_dir)
        tokenize = tokenize_settings(cfg)
        train = [split_tokens(s.corpus, tokenizer, "train", cache, f"data.sources.{s.name}.corpus", **tokenize)
                 for s in mixture.sources]
        val = [split_tokens(s.corpus, tokenizer, "val", cache, f"data.sources.{s.name}.corpus", **tokenize)
               for s in mixture.sources]
        data = settings.data
        datamodule = MixtureDataModule(mixture.names, mixture.weights, [t.tokens for t in train],
                                       [v.tokens for v in val], data.seq_len, data.micro_batch_size, seed=cfg.seed,
                                       val_batches=data.val_batches)
        shares = datamodule.schedule.shares
        text = all(v.n_bytes is not None for v in val)  # pre-tokenised sources have no bytes to count
        facts = {"data_fingerprint": mixture.fingerprint(), "train_tokens": sum(t.n_tokens for t in train),
                 "val_tokens": sum(v.n_tokens for v in val),
                 "bytes_per_token": sum(v.n_bytes for v in val) / max(1, sum(v.n_tokens - v.n_documents for v in val))
                 if text else None,
                 "entropy_floor": None,
                 "mixture": {name: {"weight": float(share), "train_tokens": t.n_tokens, "val_tokens": v.n_tokens,
                                    "bytes_per_token": v.bytes_per_token}
                             for name, share, t, v in zip(mixture.names, shares, train, val)}}
        return StageData(tokenizer, datamodule, facts)

    def module_arguments(self, data: StageData) -> dict[str, Any]:
        """A mixture's validation dataloaders, one per source, in order (val/loss/<name>)."""
        names = getattr(data.datamodule, "val_names", None)
        return {"val_sources": list(names)} if names else {}

    def finish(self, cfg: DictConfig, run_dir: RunDir, data: StageData, summary: dict[str, Any]) -> dict[str, Any]:
        """A mixture's last per-source validation losses and epochs consumed, into summary.json."""
        if not getattr(data.datamodule, "val_names", None):
            return {}
        from llm.tracking.metrics import last_values

        return {k: v for k, v in last_values(run_dir.metrics).items() if k.startswith(("val/loss/", "data/epochs/"))}

    def done_line(self, summary: dict[str, Any]) -> str:
        ppl = summary.get("val/ppl", math.nan)
        return f"val/loss {summary['val/loss']:.4f} (ppl {ppl:.1f})"
