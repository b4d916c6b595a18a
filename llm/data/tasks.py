"""Synthetic tasks with verifiable answers: the embedded data of every post-training method.

Four seeded task families, each a short prompt ending in "=" and a short answer a tiny byte-level
model can learn:

    addition   "12+345="            -> "357"
    sorting    "sort 3,1,2="        -> "1,2,3"
    copying    "copy hello="        -> "hello"
    counting   "count a in abca="   -> "2"

A `TaskMix` draws samples from a weighted mix of them and turns them into rows of TRL's formats:
SFT pairs (prompt/completion), preference pairs (chosen = the answer, rejected = a plausible
corruption of it) and prompt-only rows whose extra keys (`task`, `answer`) are what the reward
function `score` reads. `TaskCorpus` renders samples as plain "prompt+answer" lines for
pretraining a base model on the same mix. A prompt's split is a hash of its text, so the held-out
prompts are never trained on, whatever the seed or the knobs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from llm.data.corpus import SPLITS, check_split, fingerprint, hash_fraction, split_documents
from llm.tokenizer.tokenizer import EOS


@dataclass(frozen=True)
class TaskSample:
    """One task instance: the model sees `prompt` and should write `answer`."""

    task: str
    prompt: str
    answer: str

    @property
    def meta(self) -> dict[str, str]:
        """What the reward function needs: the task's name and the correct answer."""
        return {"task": self.task, "answer": self.answer}


def _check_range(name: str, low: int, high: int, minimum: int) -> None:
    if not minimum <= low <= high:
        raise ValueError(f"{name}: need {minimum} <= min <= max, got min={low}, max={high}")


def _check_alphabet(alphabet: str) -> None:
    if len(set(alphabet)) < 2 or any(c.isspace() or c in "=,\n" for c in alphabet):
        raise ValueError(f"alphabet must hold >= 2 distinct characters, none of them whitespace, "
                         f"'=' or ',', got {alphabet!r}")


def char_accuracy(completion: str, answer: str) -> float:
    """Fraction of positions where the two strings agree, over the longer length."""
    longest = max(len(completion), len(answer))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(completion, answer)) / longest


class Task(ABC):
    """A family of samples. Subclasses set `name` and implement `sample` and `corrupt`."""

    name: ClassVar[str] = "task"

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> TaskSample:
        """One seeded instance of the task."""

    @abstractmethod
    def corrupt(self, answer: str, rng: np.random.Generator) -> str:
        """A plausible wrong answer, never equal to `answer`."""

    @staticmethod
    def partial_credit(completion: str, answer: str) -> float:
        """Credit in [0, 1) for a wrong completion; by default the fraction of correct characters."""
        return char_accuracy(completion, answer)


class Addition(Task):
    """"a+b=" -> the sum; each operand has between min_digits and max_digits digits."""

    name = "addition"

    def __init__(self, max_digits: int = 3, min_digits: int = 1):
        _check_range("addition digits", min_digits, max_digits, 1)
        self.min_digits, self.max_digits = min_digits, max_digits

    def _number(self, rng: np.random.Generator) -> int:
        digits = int(rng.integers(self.min_digits, self.max_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def sample(self, rng: np.random.Generator) -> TaskSample:
        a, b = self._number(rng), self._number(rng)
        return TaskSample(self.name, f"{a}+{b}=", str(a + b))

    def corrupt(self, answer: str, rng: np.random.Generator) -> str:
        # Off by one in one digit (a dropped or spurious carry), the mistake a model makes.
        value, step = int(answer), 10 ** int(rng.integers(len(answer)))
        shortest = 10 ** (len(answer) - 1) if len(answer) > 1 else 0  # keep the digit count
        return str(value - step if value - step >= shortest and rng.random() < 0.5 else value + step)


class Sorting(Task):
    """"sort 3,1,2=" -> "1,2,3": between min_length and max_length integers in [0, max_value]."""

    name = "sorting"

    def __init__(self, max_length: int = 5, min_length: int = 2, max_value: int = 9):
        _check_range("sorting length", min_length, max_length, 1)
        if max_value < 1:
            raise ValueError(f"sorting max_value must be >= 1, got {max_value}")
        self.min_length, self.max_length, self.max_value = min_length, max_length, max_value

    def sample(self, rng: np.random.Generator) -> TaskSample:
        n = int(rng.integers(self.min_length, self.max_length + 1))
        items = [int(x) for x in rng.integers(0, self.max_value + 1, size=n)]
        return TaskSample(self.name, f"sort {','.join(map(str, items))}=", ",".join(map(str, sorted(items))))

    def corrupt(self, answer: str, rng: np.random.Generator) -> str:
        items = answer.split(",")
        unequal = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
        if unequal and rng.random() < 0.5:  # two neighbours swapped
            i = unequal[int(rng.integers(len(unequal)))]
            items[i], items[i + 1] = items[i + 1], items[i]
        else:  # one item off by one
            i = int(rng.integers(len(items)))
            value = int(items[i])
            items[i] = str(value - 1 if value == self.max_value or (value > 0 and rng.random() < 0.5) else value + 1)
        return ",".join(items)

    @staticmethod
    def partial_credit(completion: str, answer: str) -> float:
        """Fraction of list positions holding the right item, over the longer list."""
        got, want = completion.split(","), answer.split(",")
        return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


class Copying(Task):
    """"copy abc=" -> "abc": a random string of min_length..max_length letters of `alphabet`."""

    name = "copying"

    def __init__(self, max_length: int = 8, min_length: int = 1, alphabet: str = "abcdefghijklmnopqrstuvwxyz"):
        _check_range("copying length", min_length, max_length, 1)
        _check_alphabet(alphabet)
        self.min_length, self.max_length, self.alphabet = min_length, max_length, alphabet

    def sample(self, rng: np.random.Generator) -> TaskSample:
        n = int(rng.integers(self.min_length, self.max_length + 1))
        text = "".join(rng.choice(list(self.alphabet), size=n))
        return TaskSample(self.name, f"copy {text}=", text)

    def corrupt(self, answer: str, rng: np.random.Generator) -> str:
        i = int(rng.integers(len(answer)))
        others = [c for c in self.alphabet if c != answer[i]]
        return answer[:i] + others[int(rng.integers(len(others)))] + answer[i + 1:]


class Counting(Task):
    """"count a in abca=" -> "2": occurrences of one letter in a random string of `alphabet`."""

    name = "counting"

    def __init__(self, max_length: int = 8, min_length: int = 1, alphabet: str = "abc"):
        _check_range("counting length", min_length, max_length, 1)
        _check_alphabet(alphabet)
        self.min_length, self.max_length, self.alphabet = min_length, max_length, alphabet

    def sample(self, rng: np.random.Generator) -> TaskSample:
        n = int(rng.integers(self.min_length, self.max_length + 1))
        text = "".join(rng.choice(list(self.alphabet), size=n))
        letter = self.alphabet[int(rng.integers(len(self.alphabet)))]
        return TaskSample(self.name, f"count {letter} in {text}=", str(text.count(letter)))

    def corrupt(self, answer: str, rng: np.random.Generator) -> str:
        count = int(answer)
        return str(count - 1 if count > 0 and rng.random() < 0.5 else count + 1)

    @staticmethod
    def partial_credit(completion: str, answer: str) -> float:
        """1 - |error| / (answer + 1): closer counts earn more; a non-number earns 0."""
        if not completion.isdigit():
            return 0.0
        return max(0.0, 1.0 - abs(int(completion) - int(answer)) / (int(answer) + 1))


TASKS: dict[str, type[Task]] = {task.name: task for task in (Addition, Sorting, Copying, Counting)}


def make_task(name: str, **knobs: Any) -> Task:
    """The task called `name` with its difficulty knobs (e.g. make_task("addition", max_digits=2))."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    try:
        return TASKS[name](**knobs)
    except TypeError as e:  # an unknown knob: say which task it was meant for
        raise ValueError(f"task {name!r}: {e}") from e


# ------------------------------------------------------------------ reward functions


def cut_completion(completion: str) -> str:
    """The answer part of a generated completion: up to the first newline or EOS, trimmed."""
    for stop in ("\n", EOS):
        completion = completion.split(stop, 1)[0]
    return completion.strip()


def exact_match(completion: str, answer: str) -> bool:
    """Whether the completion, cut at its first newline/EOS and trimmed, equals the answer."""
    return cut_completion(completion) == answer.strip()


def score(completion: str, meta: Mapping[str, Any], partial: bool = False) -> float:
    """The reward of a completion: 1.0 on an exact match with meta["answer"], else 0.0.

    With `partial`, a wrong answer earns the task's partial credit in [0, 1) instead (the fraction
    of correct characters, or list items for sorting, or closeness for counting), looked up by
    meta["task"]; an unknown task falls back to the fraction of correct characters.
    """
    if "answer" not in meta:
        raise ValueError(f"score() needs meta with an 'answer' (and 'task' for partial credit); "
                         f"got keys {sorted(meta)}")
    answer = str(meta["answer"])
    if exact_match(completion, answer):
        return 1.0
    if not partial:
        return 0.0
    return float(TASKS.get(str(meta.get("task")), Task).partial_credit(cut_completion(completion), answer.strip()))


# ------------------------------------------------------------------ mixes and rows

DEFAULT_TASKS = {"addition": {}, "sorting": {}, "copying": {}, "counting": {}}


class TaskMix:
    """Seeded samples from a weighted mix of tasks, split into train and held-out prompts.

    `tasks` maps task names to their knobs ({"addition": {"max_digits": 2}, "copying": {}}) or
    lists names (default knobs); `weights` (default uniform) maps names to relative frequencies.
    A prompt belongs to the val split when hash(prompt) < val_fraction: the splits are disjoint
    for any seed. samples(n, split) is a pure function of (tasks, seed, split), and samples(n)
    is a prefix of samples(n + k).
    """

    def __init__(self, tasks: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
                 seed: int = 0, val_fraction: float = 0.1, weights: Mapping[str, float] | None = None):
        if tasks is None:
            tasks = DEFAULT_TASKS
        if isinstance(tasks, str):
            tasks = [tasks]
        specs = ({name: {} for name in tasks} if not isinstance(tasks, Mapping)
                 else {str(name): dict(knobs or {}) for name, knobs in tasks.items()})
        if not specs:
            raise ValueError("a TaskMix needs at least one task")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.specs: dict[str, dict[str, Any]] = specs
        self.tasks = [make_task(name, **knobs) for name, knobs in specs.items()]
        self.seed = seed
        self.val_fraction = val_fraction
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(specs))
        if unknown:
            raise ValueError(f"weights name tasks not in the mix: {unknown}; the mix has {list(specs)}")
        w = np.array([float(weights.get(name, 1.0)) for name in specs])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"task weights must be >= 0 and not all 0, got {dict(zip(specs, w.tolist()))}")
        self.probabilities = w / w.sum()

    def split_of(self, prompt: str) -> str:
        """"val" or "train": a hash of the prompt, so a prompt is held out in every run."""
        return "val" if hash_fraction(prompt) < self.val_fraction else "train"

    def _rng(self, split: str, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(check_split(split)), stream])

    def samples(self, n: int, split: str) -> list[TaskSample]:
        """The first n samples of `split` (duplicates possible when a task has few prompts)."""
        rng = self._rng(split, 0)
        drawn: list[TaskSample] = []
        attempts, max_attempts = 0, 1000 + 200 * n
        while len(drawn) < n:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(f"drew only {len(drawn)} of {n} {split} samples in {max_attempts} tries: "
                                 f"the tasks {list(self.specs)} have too few prompts in this split "
                                 f"(val_fraction={self.val_fraction}); raise their difficulty knobs")
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]
            sample = task.sample(rng)
            if self.split_of(sample.prompt) == split:
                drawn.append(sample)
        return drawn

    def sft_rows(self, n: int, split: str) -> list[dict[str, str]]:
        """prompt/completion rows (TRL's format), with the meta keys `task` and `answer`."""
        return [{"prompt": s.prompt, "completion": s.answer, **s.meta} for s in self.samples(n, split)]

    def preference_rows(self, n: int, split: str) -> list[dict[str, str]]:
        """prompt/chosen/rejected rows: chosen is the answer, rejected a corruption of it."""
        rng = self._rng(split, 1)  # its own stream: the prompts are those of samples(n, split)
        by_name = {task.name: task for task in self.tasks}
        rows = []
        for s in self.samples(n, split):
            rejected = by_name[s.task].corrupt(s.answer, rng)
            assert rejected != s.answer, f"{s.task}.corrupt returned the answer {s.answer!r}"
            rows.append({"prompt": s.prompt, "chosen": s.answer, "rejected": rejected, **s.meta})
        return rows

    def prompt_rows(self, n: int, split: str) -> list[dict[str, str]]:
        """prompt-only rows; the other keys (`task`, `answer`) are the reward function's meta."""
        return [{"prompt": s.prompt, **s.meta} for s in self.samples(n, split)]

    def pretraining_text(self, n: int, split: str) -> str:
        """n samples as plain text, one "prompt+answer" line each (e.g. "12+345=357\\n")."""
        return render_lines(self.samples(n, split))


def render_lines(samples: Sequence[TaskSample]) -> str:
    """Task samples as pretraining text: one line per sample, the prompt followed by its answer."""
    return "".join(f"{s.prompt}{s.answer}\n" for s in samples)


class TaskCorpus:
    """A Corpus (llm.data.Corpus) of task lines, to pretrain a base model on the task mix.

    Each document is `samples_per_document` lines "prompt+answer"; the train documents hold only
    train-split prompts, so held-out prompts stay unseen. Use with `data.corpus._target_:
    llm.data.tasks.TaskCorpus` and tokenizer=byte.
    """

    def __init__(self, tasks: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
                 seed: int = 0, val_fraction: float = 0.1, weights: Mapping[str, float] | None = None,
                 n_documents: int = 200, val_documents: int = 20, samples_per_document: int = 64):
        if n_documents < 0 or val_documents < 0 or samples_per_document < 1:
            raise ValueError("document counts must be >= 0 and samples_per_document >= 1")
        self.name = "tasks"
        self.mix = TaskMix(tasks, seed=seed, val_fraction=val_fraction, weights=weights)
        self.n_documents = {"train": n_documents, "val": val_documents}
        self.samples_per_document = samples_per_document
        self._settings = {"corpus": "tasks", "tasks": self.mix.specs, "seed": seed, "val_fraction": val_fraction,
                          "weights": dict(weights or {}), "n_documents": n_documents,
                          "val_documents": val_documents, "samples_per_document": samples_per_document}
        self._fingerprint: str | None = None

    def documents(self, split: str) -> Iterator[str]:
        k = self.samples_per_document
        samples = self.mix.samples(self.n_documents[check_split(split)] * k, split)
        for start in range(0, len(samples), k):
            yield render_lines(samples[start:start + k])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._settings, split_documents(self))
        return self._fingerprint
