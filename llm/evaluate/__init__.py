"""Using a trained checkpoint (found and loaded by `llm.checkpoint`): completing prompts with it
(`llm-generate`) and measuring it (`llm-eval`: perplexity on a held-out split, task accuracy,
int8 vs fp32)."""

from llm.evaluate.completion import Completer, Completion, DecodeSettings, cut_at_stop
from llm.evaluate.perplexity import Perplexity, perplexity
from llm.evaluate.tasks import Task, TaskResult, read_tasks, task_accuracy

__all__ = [
    "Completer",
    "Completion",
    "DecodeSettings",
    "Perplexity",
    "Task",
    "TaskResult",
    "cut_at_stop",
    "perplexity",
    "read_tasks",
    "task_accuracy",
]
