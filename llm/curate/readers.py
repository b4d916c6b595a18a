"""A datatrove reader over any corpus of the data group (llm.data: the embedded stdlib corpus,
text files, Hugging Face datasets, synthetic and task corpora)."""

from __future__ import annotations

from typing import Any, Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseReader


class CorpusReader(BaseReader):
    """The documents of `splits` of the corpus that `corpus` (a data.corpus config node, as a
    dict with its `_target_`) builds, in order. Document i (counted over the splits, empty ones
    included) goes to task i % world_size, with the id `<split>/<i>` and its split in the metadata.

    The corpus is built inside each task, so the pipeline pickles a few settings, not documents.
    Every task walks the whole corpus (each keeps its share): fine for corpora a node reads in
    minutes; shard big sources into files first.
    """

    name = "📚 Corpus"

    def __init__(self, corpus: dict[str, Any], splits: Sequence[str] = ("train", "val"),
                 max_documents: int | None = None):
        super().__init__()
        self.corpus = dict(corpus)
        self.splits = tuple(splits)
        self.max_documents = max_documents

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from hydra.utils import instantiate

        corpus = instantiate(self.corpus)
        index = 0
        for split in self.splits:
            for text in corpus.documents(split):
                if self.max_documents is not None and index >= self.max_documents:
                    return
                if index % world_size == rank:
                    self.stat_update("documents")
                    document = Document(text=text, id=f"{split}/{index:07d}",
                                        metadata={"split": split, "source": corpus.name})
                    self.update_doc_stats(document)
                    yield document
                index += 1


class ShardReader(JsonlReader):
    """The JSONL shards one stage hands the next. No shard at all is no document (every document
    removed before), where datatrove's reader stops the pipeline with an error."""

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if not self.data_folder.isdir("") or not self.data_folder.list_files(glob_pattern=self.glob_pattern):
            return
        yield from super().run(data, rank, world_size)
