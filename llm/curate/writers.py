"""Writes kept documents as the data group reads them: one UTF-8 text file per document."""

from __future__ import annotations

import re

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep

UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


def file_name(doc_id: str) -> str:
    """A relative file name for a document id: path separators kept (ids such as `train/0000012`
    make folders), other characters outside [A-Za-z0-9._-] and any `..` replaced by `_`."""
    parts = [UNSAFE.sub("_", part) for part in str(doc_id).split("/") if part]
    parts = ["_" if part in (".", "..") else part for part in parts] or ["_"]
    return "/".join(parts) + ".txt"


class TextFileWriter(PipelineStep):
    """Each document as `<output_folder>/<id>.txt`, so that
    `llm-train data=text data.corpus.paths='<output_folder>/**/*.txt'` trains on them (a file is
    a document there, split train/val by a hash of its path)."""

    type = "💽 - WRITER"
    name = "📄 Text files"

    def __init__(self, output_folder: DataFolderLike):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for document in data:
            with self.track_time():
                with self.output_folder.open(file_name(document.id), "wt", encoding="utf-8") as f:
                    f.write(document.text)
                self.stat_update("total")
            yield document
