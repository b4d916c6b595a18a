"""Our checkpoints as an lm-evaluation-harness model (`lm_eval`, the `eval` extra).

`HarnessLM` (registered as the harness model `llm`) answers the harness's three request types
with our plain-PyTorch model and tokenizer, batched:

- loglikelihood: (context, continuation) split as the harness's HFLM splits it (TemplateLM:
  trailing whitespace moves to the continuation, the continuation is what follows the context's
  own encoding; an empty context is the BOS token), one right-padded forward per batch
  (llm.evaluate.loglikelihood);
- loglikelihood_rolling: the harness's disjoint rolling windows of max_length tokens, BOS first;
- generate_until: our KV-cache decoding (llm.generate.generate), left-padded batches, greedy
  unless the task samples, stopping at `until` strings or EOS, at most max_gen_toks tokens, the
  context cut from the left to max_length - max_gen_toks tokens (HFLM's rule).

So the harness scores our model and its Hugging Face export (`llm-hf export`, the harness's `hf`
model) the same. This module imports lm_eval at the top: import it only where the harness is used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the `eval` extra is not installed
    from llm.files import InputError

    raise InputError("lm-evaluation-harness is not installed: pip install 'llm[eval]' (or pip install lm-eval)") from e

from llm.evaluate.completion import cut_at_stop
from llm.evaluate.loglikelihood import score_continuations
from llm.generate import generate

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's, when a task does not say


@register_model("llm")
class HarnessLM(TemplateLM):
    """A `Transformer` and its `Tokenizer` as a harness model. Built from objects (`model=`,
    `tokenizer=`) or, through the harness's model_args, from `checkpoint=` (anything llm-eval's
    checkpoint= takes) and optionally `tokenizer_path=`."""

    def __init__(self, model: Optional[nn.Module] = None, tokenizer: Optional[Tokenizer] = None,
                 checkpoint: Optional[str] = None, tokenizer_path: Optional[str] = None, batch_size: Any = 16,
                 max_length: Optional[int] = None, device: Optional[str] = None, seed: int = 0, **_: Any):
        super().__init__()
        if model is None:
            model, tokenizer = load_checkpoint(checkpoint, tokenizer_path, device or "auto")
        self.model, self.tokenizer = model, tokenizer
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" is not measured here
        self._max_length = int(max_length or model.cfg.max_seq_len)
        self.generator = torch.Generator(device=model.embed.weight.device).manual_seed(int(seed))

    # ---- what TemplateLM asks of a model -------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # HFLM's choice when the tokenizer has a BOS token (the export has)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)  # never adds BOS/EOS, as the exported tokenizer is told

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scored = score_continuations(self.model, [(context, continuation) for _, context, continuation in requests],
                                     self._batch_size, self._max_length)
        return [(s.logprob, s.is_greedy) for s in scored]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self._max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, scored in zip(owner, score_continuations(self.model, windows, self._batch_size, self._max_length)):
            totals[i] += scored.logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings decode together
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tok_decode([self.eot_token_id])
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self._max_length:
                raise ValueError(f"max_gen_toks={max_gen} must be less than the model's max_length={self._max_length}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            contexts = [self.tok_encode(requests[i].args[0])[-(self._max_length - max_gen):] or [self.prefix_token_id]
                        for i in members]
            stops = [ids for ids in (self.tok_encode(s) for s in until if s and s != eos) if ids]
            order = sorted(range(len(members)), key=lambda k: -len(contexts[k]))  # similar lengths batch together
            for start in range(0, len(order), self._batch_size):
                batch = order[start:start + self._batch_size]
                new = generate(self.model, [contexts[k] for k in batch], max_gen, temperature=temperature,
                               top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), eos_id=self.eot_token_id,
                               stop_sequences=stops, pad_id=self.tokenizer.pad_id, generator=self.generator,
                               vocab_size=self.tokenizer.vocab_size)
                for k, tokens in zip(batch, new):
                    if tokens and tokens[-1] == self.eot_token_id:
                        tokens = tokens[:-1]
                    out[members[k]] = cut_at_stop(self.tok_decode(tokens), [s for s in until if s])[0]
        return out  # type: ignore[return-value]


def load_checkpoint(checkpoint: Optional[str], tokenizer_path: Optional[str], device: str,
                    runs_dir: str = "runs") -> tuple[nn.Module, Tokenizer]:
    """Model (eval mode) and tokenizer of a run directory, run id, checkpoint file or HF folder."""
    from llm.checkpoint import load_network, load_tokenizer, resolve, tokenizer_file
    from llm.evaluate.device import resolve_device

    if not checkpoint:
        from llm.files import InputError

        raise InputError("the `llm` harness model needs checkpoint=<run dir | run id | checkpoint file | HF folder>")
    ref = resolve(checkpoint, runs_dir, "checkpoint")
    model = load_network(ref, resolve_device(device), value_head=False).eval()
    return model, load_tokenizer(tokenizer_file(ref, tokenizer_path))


def task_manager(include_path: Optional[str | Path | Sequence[str | Path]] = None, defaults: bool = True) -> Any:
    """The harness's tasks: its own (`defaults`; indexing them takes seconds) and folders of ours."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=defaults)


def evaluate(lm: Any, tasks: Sequence[str], include_path: Optional[str | Path | Sequence[str | Path]] = None,
             limit: Optional[int] = None, num_fewshot: Optional[int] = None, defaults: Optional[bool] = None,
             seed: int = 0) -> dict[str, Any]:
    """Run harness tasks on `lm` (ours or any harness model, e.g. its `hf`); returns the harness's
    output (its "results": task -> {"acc,none": ...}). `defaults` None: the harness's own tasks
    are indexed only when `include_path` does not hold every named task."""
    from lm_eval import simple_evaluate

    if defaults is None:
        defaults = include_path is None or not set(tasks) <= set(task_manager(include_path, False).all_tasks)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(include_path, defaults),
                           limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def evaluate_model(model: nn.Module, tokenizer: Tokenizer, tasks: Sequence[str], include_path: Optional[str] = None,
                   limit: Optional[int] = None, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Scores of our model on harness tasks: task -> metric -> value."""
    return scores(evaluate(HarnessLM(model, tokenizer, batch_size=batch_size), tasks, include_path, limit))


def scores(output: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The harness's results as task -> metric -> value: "acc,none" becomes "acc", another filter
    than "none" is kept as "exact_match/<filter>"; standard errors and aliases are left out."""
    out: dict[str, dict[str, float]] = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            out.setdefault(task, {})[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
    return out


def flat_scores(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """task -> metric -> value as eval/<task>/<metric>."""
    return {f"eval/{task}/{metric}": value for task, metrics in table.items() for metric, value in metrics.items()}
