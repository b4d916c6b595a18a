"""Using a trained checkpoint: finding and loading it, completing prompts with it (`llm-generate`)
and measuring it (`llm-eval`: perplexity on a held-out split, task accuracy, int8 vs fp32)."""

from llm.evaluate.checkpoint import CheckpointRef, load_model, load_tokenizer, resolve_checkpoint
from llm.evaluate.completion import Completer, Completion, DecodeSettings, cut_at_stop
from llm.evaluate.perplexity import Perplexity, perplexity
from llm.evaluate.tasks import Task, TaskResult, read_tasks, task_accuracy

__all__ = [
    "CheckpointRef",
    "Completer",
    "Completion",
    "DecodeSettings",
    "Perplexity",
    "Task",
    "TaskResult",
    "cut_at_stop",
    "load_model",
    "load_tokenizer",
    "perplexity",
    "read_tasks",
    "resolve_checkpoint",
    "task_accuracy",
]
