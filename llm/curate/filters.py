"""Filters of our own next to datatrove's: document length, and C4's rules that leave text as it is."""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.filters.base_filter import BaseFilter


class LengthFilter(BaseFilter):
    """Removes documents shorter than `min_chars` or longer than `max_chars` (None: no limit)
    characters, surrounding whitespace not counted."""

    name = "📏 Length"

    def __init__(self, min_chars: int = 0, max_chars: int | None = None):
        super().__init__()
        self.min_chars = min_chars
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text.strip())
        if n < self.min_chars:
            return False, "too_short"
        if self.max_chars is not None and n > self.max_chars:
            return False, "too_long"
        return True


class C4DocumentFilter(C4QualityFilter):
    """C4's rules as datatrove applies them, except that a kept document keeps its text: C4 drops
    lines (no terminal punctuation, too few words, "javascript", policy notices) and strips the
    rest, which would flatten source code; its document-level rules (lorem ipsum, curly
    brackets, too few sentences) still remove documents."""

    name = "⛰ C4 Quality (documents)"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        result = super().filter(doc)
        doc.text = text
        return result
