"""N-gram decontamination against the evaluation sets the project ships, on datatrove's parts
(its text normalisation and n-grams, its pipeline steps), in two steps as datatrove's own: an
index stage writes the word sequences of the evaluation items, a filter removes documents that
contain any.

Why not datatrove's NGramsDecontIndexer/NGramsDecontFilter as they are: the indexer takes its
items from lighteval's task registry (the hub, and lighteval with its dependencies), and an item
shorter than n words gives no n-gram, so the built-in tasks ("12+34=" -> "46", a few words)
would never match. Here an item of fewer than n words is matched whole (as GPT-3's
decontamination did), punctuation and digits are kept (normalising numbers would make every
addition alike), an item's prompt alone counts too (`prompts_alone`), and the index holds the
word sequences themselves (evaluation sets are small): exact matches, looked up only where a
document's word starts one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text

from llm.curate.words import RegexWordTokenizer

# Lowercase, whitespace and diacritics normalised; punctuation and digits kept (see above).
NORM = TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=False,
                      norm_unicode_diacritics=True, norm_numbers=False)
MIN_ITEM_WORDS = 4  # shorter items ("copy t=" alone) match ordinary code by chance
INDEX_SUFFIX = ".grams.jsonl"


@dataclass(frozen=True)
class EvalItem:
    """One evaluation item: the model sees `prompt` and should write `answer` ("" if unknown)."""

    task: str
    prompt: str
    answer: str = ""


def builtin_items(tasks: Sequence[str], knobs: dict[str, Any], n: int, seed: int,
                  val_fraction: float) -> list[EvalItem]:
    """The held-out prompts of the built-in tasks, drawn as llm-eval harness builtin=[...] and
    trainer.downstream draw their questions (llm.evaluate.multiple_choice.questions)."""
    from llm.data.tasks import TaskMix

    items = []
    for task in tasks:
        mix = TaskMix({task: dict(knobs.get(task) or {})}, seed=seed, val_fraction=val_fraction)
        items += [EvalItem(task, s.prompt, s.answer) for s in mix.samples(n, "val")]
    return items


def file_items(paths: Iterable[str]) -> list[EvalItem]:
    """Items of JSONL files with a "prompt" (and optionally "answer") per line; the task is the file's stem."""
    from llm.config import ConfigError

    items = []
    for number, path in enumerate(paths):
        for line_number, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError([f"decontamination.files[{number}]={path!r}: line {line_number} is not JSON ({e.msg})"]) \
                    from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError([f"decontamination.files[{number}]={path!r}: line {line_number} has no \"prompt\" "
                                   "string; each line needs {\"prompt\": ..., \"answer\": ...}"])
            answer = row.get("answer", "")
            items.append(EvalItem(Path(path).stem, row["prompt"], answer if isinstance(answer, str) else str(answer)))
    return items


def words(text: str, tokenizer: RegexWordTokenizer) -> list[str]:
    return tokenizer.word_tokenize(simplify_text(text, NORM))


def item_grams(item: EvalItem, n: int, prompts_alone: bool, tokenizer: RegexWordTokenizer) -> list[tuple[str, ...]]:
    """The word sequences whose presence in a document means the item leaked: the n-grams of
    prompt+answer that hold some of the answer (all of them without an answer), or the whole
    item when it is shorter than n; with `prompts_alone`, the prompt's own as well."""
    grams: list[tuple[str, ...]] = []
    full = words(item.prompt + item.answer, tokenizer)
    n_prompt = len(words(item.prompt, tokenizer)) if item.answer else 0
    if len(full) < n:
        if len(full) >= MIN_ITEM_WORDS:
            grams.append(tuple(full))
    else:
        first = max(0, n_prompt - n + 1)  # the first n-gram that reaches into the answer
        grams += list(ngrams(full, n))[first:]
    if prompts_alone and item.answer:
        prompt = words(item.prompt, tokenizer)
        if len(prompt) >= n:
            grams += list(ngrams(prompt, n))
        elif len(prompt) >= MIN_ITEM_WORDS:
            grams.append(tuple(prompt))
    return grams


class EvalIndexer(PipelineStep):
    """Writes `<output_folder>/<task>.grams.jsonl`: the word sequences of each task's items
    (llm.curate.decont.item_grams), one JSON list per line."""

    type = "🦠 - DECONT"
    name = "📇 Evaluation n-grams index"

    def __init__(self, output_folder: DataFolderLike, items: Sequence[EvalItem], n_grams: int = 13,
                 prompts_alone: bool = True):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)
        self.items = list(items)
        self.n_grams = n_grams
        self.prompts_alone = prompts_alone

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != 1:
            raise ValueError("the evaluation index is built by one task")
        tokenizer = RegexWordTokenizer()
        grams: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        for item in self.items:
            self.stat_update("items")
            grams[item.task].update(item_grams(item, self.n_grams, self.prompts_alone, tokenizer))
        for task, values in sorted(grams.items()):
            self.stat_update("grams", value=len(values))
            with self.output_folder.open(f"{task}{INDEX_SUFFIX}", "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(list(gram)) + "\n" for gram in sorted(values))
        return
        yield  # a generator, as every step


class DecontaminationFilter(BaseFilter):
    """Removes documents holding any word sequence of the index EvalIndexer wrote; the removed
    document's metadata names the task and the matching words."""

    type = "🦠 - DECONT"
    name = "🧽 Decontamination"

    def __init__(self, index_folder: DataFolderLike):
        super().__init__()
        self.index_folder = get_datafolder(index_folder)
        self._grams: dict[tuple[str, ...], str] | None = None
        self._starts: dict[str, set[int]] = {}

    def _load(self) -> None:
        self._grams = {}
        for name in self.index_folder.list_files(glob_pattern=f"*{INDEX_SUFFIX}"):
            task = name[: -len(INDEX_SUFFIX)]
            with self.index_folder.open(name, "rt", encoding="utf-8") as f:
                for line in f:
                    gram = tuple(json.loads(line))
                    self._grams[gram] = task
                    self._starts.setdefault(gram[0], set()).add(len(gram))
        self._tokenizer = RegexWordTokenizer()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        try:
            yield from super().run(data, rank, world_size)
        finally:  # the executor saves its steps as JSON afterwards: not the index
            self._grams, self._starts = None, {}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._grams is None:
            self._load()
        tokens = words(doc.text, self._tokenizer)
        for i, token in enumerate(tokens):
            for length in self._starts.get(token, ()):
                task = self._grams.get(tuple(tokens[i:i + length]))
                if task is not None:
                    doc.metadata["contaminated_ngram"] = " ".join(tokens[i:i + length])
                    doc.metadata["contaminated_task"] = task
                    self.stat_update(f"contaminated_{task}")
                    return False, "contaminated"
        return True
