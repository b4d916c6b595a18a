"""Data: corpora of text documents, cached token arrays, and the batches a model trains on."""

from llm.data.blocks import BlockStream, split_inputs_targets, validation_batches
from llm.data.corpus import SPLITS, Corpus
from llm.data.datamodule import LMDataModule
from llm.data.hf import HFCorpus
from llm.data.stdlib import StdlibCorpus
from llm.data.synthetic import SyntheticCorpus
from llm.data.text import TextCorpus
from llm.data.token_cache import TokenCache, build_token_cache

__all__ = [
    "SPLITS",
    "BlockStream",
    "Corpus",
    "HFCorpus",
    "LMDataModule",
    "StdlibCorpus",
    "SyntheticCorpus",
    "TextCorpus",
    "TokenCache",
    "build_token_cache",
    "split_inputs_targets",
    "validation_batches",
]
