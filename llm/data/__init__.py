"""Data: corpora of text documents, cached token arrays, and the batches a model trains on.

Names are imported on first use (PEP 562): a tokenizing worker process imports
llm.data.token_shards and must not pay for torch and Lightning, which the datamodules need.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {
    "SPLITS": "llm.data.corpus",
    "BlockStream": "llm.data.blocks",
    "Corpus": "llm.data.corpus",
    "HFCorpus": "llm.data.hf",
    "LMDataModule": "llm.data.datamodule",
    "StdlibCorpus": "llm.data.stdlib",
    "SyntheticCorpus": "llm.data.synthetic",
    "TextCorpus": "llm.data.text",
    "TokenCache": "llm.data.token_cache",
    "build_token_cache": "llm.data.token_cache",
    "split_inputs_targets": "llm.data.blocks",
    "validation_batches": "llm.data.blocks",
}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:
    from llm.data.blocks import BlockStream, split_inputs_targets, validation_batches
    from llm.data.corpus import SPLITS, Corpus
    from llm.data.datamodule import LMDataModule
    from llm.data.hf import HFCorpus
    from llm.data.stdlib import StdlibCorpus
    from llm.data.synthetic import SyntheticCorpus
    from llm.data.text import TextCorpus
    from llm.data.token_cache import TokenCache, build_token_cache
