"""The path `llm-generate` takes: check every setting -> load the checkpoint, its tokenizer (and a
draft model) -> optionally quantise the weights (int8, int4) -> complete the prompts -> print or stream them, and
write them as JSONL.

The completions go to stdout (one prompt: the text; a prompts file: JSON lines unless
output_file is given) and everything else to stderr, so `llm-generate ... > out.txt` keeps only
the generated text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from llm.checkpoint import CheckpointRef, load_network, load_tokenizer, resolve, tokenizer_file
from llm.config import ConfigError
from llm.evaluate.completion import Completer, Completion, DecodeSettings, TextStream
from llm.evaluate.device import resolve_device
from llm.evaluate.jsonl import read_records, write_records
from llm.evaluate.options import GenerateSettings, check_generate, collect, typed_settings
from llm.interop.hf import check_hf_folder
from llm.run.layout import RunDir
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)  # llm-generate's logging goes to stderr (conf/hydra/job_logging/llm_stderr.yaml)


def run_generate(cfg: DictConfig) -> list[Completion]:
    """Complete `prompt` or every line of `prompts_file` as the config says; returns the completions."""
    s: GenerateSettings = typed_settings(cfg, GenerateSettings)
    problems = check_generate(s)
    runs_dir = cfg.paths.runs_dir
    ref: Optional[CheckpointRef] = collect(problems, resolve, s.checkpoint, runs_dir, "checkpoint")
    draft_ref = None
    if s.strategy == "speculative" and s.draft_checkpoint is not None:
        draft_ref = collect(problems, resolve, s.draft_checkpoint, runs_dir, "draft_checkpoint")
    for key, checked in (("checkpoint", ref), ("draft_checkpoint", draft_ref)):
        if checked is not None and checked.kind == "hf":  # its config.json and tokenizer, before any weights
            collect(problems, check_hf_folder, checked.path, key)
    tok_path = collect(problems, tokenizer_file, ref, s.tokenizer.path) if ref else None
    prompts = [s.prompt] if s.prompt is not None else None
    if s.prompts_file is not None and Path(s.prompts_file).expanduser().is_file():
        records = collect(problems, read_records, s.prompts_file, ("prompt",), "prompts_file")
        prompts = [r["prompt"] for r in records] if records else None
    if problems:
        raise ConfigError(problems)

    device = resolve_device(s.device)
    tokenizer = load_tokenizer(tok_path)
    draft_tokenizer = RunDir(draft_ref.run_dir).tokenizer if draft_ref and draft_ref.run_dir else None
    if draft_tokenizer is not None and (draft_tokenizer.exists() or draft_tokenizer.is_symlink()):
        # The draft run's own tokenizer, compared before either model is loaded.
        if Tokenizer.load(draft_tokenizer, "draft_checkpoint").content_hash() != tokenizer.content_hash():
            raise ConfigError([f"draft_checkpoint={s.draft_checkpoint!r}: trained with another tokenizer than "
                               f"{tok_path}; the draft must share the target's tokenizer"])
    model = _load(ref, device, tokenizer, s.quantize, "checkpoint")
    draft = _load(draft_ref, device, tokenizer, s.quantize, "draft_checkpoint") if draft_ref else None
    if draft is not None and draft.cfg.padded_vocab_size != model.cfg.padded_vocab_size:
        raise ConfigError([f"draft_checkpoint={s.draft_checkpoint!r}: its vocabulary ({draft.cfg.padded_vocab_size}) "
                           f"differs from the checkpoint's ({model.cfg.padded_vocab_size}); the draft must share the "
                           "target's tokenizer"])

    settings = DecodeSettings(
        strategy=s.strategy, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
        top_p=s.top_p, beam_width=s.beam_width, speculative_k=s.speculative_k, seed=s.seed, stop=list(s.stop),
        add_bos=s.add_bos, batch_size=s.batch_size, compile=s.compile,
    )
    completer = Completer(model, tokenizer, settings, draft)
    problems = completer.prompt_problems(prompts, "prompt" if s.prompt is not None else "prompts_file")
    if problems:
        raise ConfigError(problems)

    stream = TextStream(tokenizer.decode, settings.stop) if s.stream else None
    started = time.perf_counter()
    completions = completer.complete(prompts, stream)
    seconds = time.perf_counter() - started
    # The completions are the command's output: stdout, and nothing else there.
    if s.prompt is not None:
        if stream is not None:
            stream.close(completions[0].completion)
        else:
            sys.stdout.write(completions[0].completion + "\n")
    elif s.output_file is None:
        sys.stdout.writelines(json.dumps(c.record(), ensure_ascii=False) + "\n" for c in completions)
    sys.stdout.flush()
    if s.output_file is not None:
        log.info(f"written: {write_records(s.output_file, (c.record() for c in completions))} "
             f"({len(completions)} completion{'s' * (len(completions) != 1)})")
    n_tokens = sum(c.n_tokens for c in completions)
    log.info(f"generated {n_tokens:,} tokens for {len(completions)} prompt{'s' * (len(completions) != 1)} in "
         f"{seconds:.2f} s ({n_tokens / max(seconds, 1e-9):,.0f} tokens/s, strategy={s.strategy})")
    if s.strategy == "speculative":
        st = completer.stats
        log.info(f"speculative: acceptance rate {st.acceptance_rate:.3f} ({st.accepted:,} of {st.drafted:,} draft tokens "
             f"accepted; {st.tokens_per_round:.2f} tokens per target pass, k={s.speculative_k})")
    return completions


def _load(ref: CheckpointRef, device: torch.device, tokenizer: Tokenizer, scheme: str, key: str) -> nn.Module:
    """The model of `ref` on `device`, checked against the tokenizer, its weights quantised if asked
    (scheme: none | int8 | int4)."""
    from llm.generate.quantize import model_bytes, quantize

    model = load_network(ref, device, key, value_head=False)
    if model.cfg.padded_vocab_size < tokenizer.vocab_size:
        raise ConfigError([f"{key}={str(ref.path)!r}: the model's vocabulary ({model.cfg.padded_vocab_size}) is "
                           f"smaller than the tokenizer's ({tokenizer.vocab_size}); give the tokenizer it was "
                           "trained with"])
    n_params = sum(p.numel() for p in model.parameters())
    line = f"{key}: {ref.path} (step {ref.step}, {n_params:,} parameters, {device})"
    if scheme != "none":
        before = model_bytes(model)
        quantize(model, scheme)
        line += f"; {scheme} weights: {before / 2**20:.2f} MiB -> {model_bytes(model) / 2**20:.2f} MiB"
    log.info(line)
    return model
