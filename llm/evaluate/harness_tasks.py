"""The built-in tasks as lm-evaluation-harness tasks: a folder of task YAMLs and the JSONL files
they read (`dataset_path: json`, local files: no hub, loads with HF_DATASETS_OFFLINE=1).

For each built-in task (llm.data.tasks) three harness tasks, over the same held-out questions as
the in-training scoring (llm.evaluate.multiple_choice):

- `llm_<task>`: multiple_choice (acc, acc_norm): the answer among its corruptions;
- `llm_<task>_gen`: generate_until (exact_match): greedy completion up to a newline;
- `llm_<task>_text`: loglikelihood_rolling (word_perplexity, byte_perplexity, bits_per_byte) of
  the "prompt+answer" lines, the text a data=tasks model is trained on.

Writing them needs no lm_eval; `llm-eval harness builtin=[addition]` writes them under the cache
directory and points the harness there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from llm.evaluate.multiple_choice import Question, questions
from llm.files import write_text

MAX_GEN_TOKS = 16  # built-in answers are a few characters; a newline ends them


def task_names(task: str) -> list[str]:
    return [f"llm_{task}", f"llm_{task}_gen", f"llm_{task}_text"]


def _yaml(config: Mapping[str, Any]) -> str:
    # JSON is YAML: no quoting rules to get wrong for prompts with '=' or '{'.
    return json.dumps(config, indent=2) + "\n"


def task_configs(task: str, data_file: Path) -> dict[str, dict[str, Any]]:
    """The three harness task configs of one built-in task, reading `data_file`."""
    dataset = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
               "test_split": "test"}
    mean = {"aggregation": "mean", "higher_is_better": True}
    return {
        f"llm_{task}": {**dataset, "task": f"llm_{task}", "output_type": "multiple_choice",
                        "doc_to_text": "{{prompt}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
                        "target_delimiter": "", "metric_list": [{"metric": "acc", **mean},
                                                                {"metric": "acc_norm", **mean}]},
        f"llm_{task}_gen": {**dataset, "task": f"llm_{task}_gen", "output_type": "generate_until",
                            "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
                            "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
                            "metric_list": [{"metric": "exact_match", **mean}]},
        f"llm_{task}_text": {**dataset, "task": f"llm_{task}_text", "output_type": "loglikelihood_rolling",
                             "doc_to_text": "", "doc_to_target": "{{text}}",
                             "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                                             (("word_perplexity", "weighted_perplexity"),
                                              ("byte_perplexity", "weighted_perplexity"),
                                              ("bits_per_byte", "bits_per_byte"))]},
    }


def records(items: Sequence[Question]) -> list[dict[str, Any]]:
    """One JSONL row per question: what all three task configs read."""
    return [{**q.record(), "answer": q.choices[q.gold], "text": f"{q.prompt}{q.choices[q.gold]}\n"} for q in items]


def write_builtin_tasks(folder: str | Path, tasks: Sequence[str], knobs: Optional[Mapping[str, Any]] = None,
                        n: int = 64, n_choices: int = 4, seed: int = 0, val_fraction: float = 0.1) -> list[str]:
    """Write the harness tasks of the built-in `tasks` into `folder`; returns their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        items = questions(task, (knobs or {}).get(task), n, n_choices, seed, val_fraction)
        data_file = (folder / f"{task}.jsonl").resolve()
        write_text(data_file, "".join(json.dumps(r) + "\n" for r in records(items)))
        for name, config in task_configs(task, data_file).items():
            write_text(folder / f"{name}.yaml", _yaml(config))
            names.append(name)
    return names
