"""HFCorpus: one text column of a Hugging Face dataset (the optional `datasets` dependency)."""

from __future__ import annotations

from typing import Any, Iterator

from llm.data.corpus import check_split, fingerprint, hash_fraction, split_documents


class HFCorpus:
    """Documents from `datasets.load_dataset(name, config_name, split=split)[column]`.

    Our train/val split is made inside that one dataset split, by a hash of each document's
    index, so it holds whatever order the dataset yields. `max_documents` caps how many rows
    are read (before splitting). Empty or non-string cells are skipped.
    """

    def __init__(self, name: str, column: str = "text", split: str = "train",
                 config_name: str | None = None, val_fraction: float = 0.05,
                 streaming: bool = False, max_documents: int | None = None):
        try:
            import datasets  # imported here: it is optional and slow to import
        except ImportError as e:
            raise ImportError(
                f"HFCorpus({name!r}) needs the `datasets` package: pip install 'llm[hf]'"
            ) from e
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.name = f"hf:{name}" + (f"/{config_name}" if config_name else "")
        self.column = column
        self.val_fraction = val_fraction
        self.max_documents = max_documents
        self._dataset = datasets.load_dataset(name, config_name, split=split, streaming=streaming)
        columns = self._columns()
        if column not in columns:
            raise ValueError(f"dataset {name!r} has no column {column!r}; its columns: {columns}")
        self._settings: dict[str, Any] = {
            "corpus": "hf", "name": name, "config_name": config_name, "split": split,
            "column": column, "val_fraction": val_fraction, "max_documents": max_documents,
        }
        self._fingerprint: str | None = None

    def _columns(self) -> list[str]:
        columns = getattr(self._dataset, "column_names", None)
        if columns is None:  # a streamed dataset may not know its columns until it is read
            first = next(iter(self._dataset), {})
            columns = list(first)
        return list(columns)

    def documents(self, split: str) -> Iterator[str]:
        want_val = check_split(split) == "val"
        for index, row in enumerate(self._dataset):
            if self.max_documents is not None and index >= self.max_documents:
                return
            text = row[self.column]
            if isinstance(text, str) and text and (hash_fraction(str(index)) < self.val_fraction) == want_val:
                yield text

    def fingerprint(self) -> str:
        """Hashes the settings and every document (one pass over the data, then cached)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._settings, split_documents(self))
        return self._fingerprint
