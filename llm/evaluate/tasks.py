"""Task accuracy: a JSONL file of {"prompt": ..., "answer": ...}; the model's greedy completion of
each prompt counts as correct when it equals the answer, both stripped of surrounding whitespace."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm.evaluate.completion import Completer
from llm.evaluate.jsonl import read_records


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str


@dataclass
class TaskResult:
    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)  # prompt, completion, answer, reward (1 if correct)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "correct": float(self.correct), "count": float(self.total)}


def read_tasks(path: str | Path, key: str = "tasks_file") -> list[Task]:
    return [Task(r["prompt"], r["answer"]) for r in read_records(path, ("prompt", "answer"), key)]


def task_accuracy(completer: Completer, tasks: list[Task]) -> TaskResult:
    """Exact-match accuracy of the completer's completions (give it greedy settings)."""
    completions = completer.complete([t.prompt for t in tasks])
    samples = [{"prompt": t.prompt, "completion": c.completion, "answer": t.answer,
                "reward": float(c.completion.strip() == t.answer.strip())} for c, t in zip(completions, tasks)]
    return TaskResult(int(sum(s["reward"] for s in samples)), len(tasks), samples)
