"""Our model against Hugging Face transformers running the very same weights: greedy decoding
speed and training-step speed, interleaved in one process so machine noise hits both alike.

    from llm.bench.hf import decode_vs_transformers, train_step_vs_transformers
    decode_vs_transformers(model, tokenizer)                       # tokens/s, ratio, identical ids
    train_step_vs_transformers(ModelConfig(vocab_size=2048), batch=16, seq_len=128)   # vs Llama
    train_step_vs_transformers(ModelConfig(vocab_size=8192, moe=MoEConfig(n_experts=8)), 8, 256)  # vs Mixtral

`llm-bench bench.against=transformers <overrides>` runs the training-step comparison on a
composed config.

Not a test: figures depend on the machine (and on whoever else is using it). Needs transformers.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.evaluate.speed import timed
from llm.generate import generate
from llm.interop.hf import export_hf
from llm.model import ModelConfig, Transformer
from llm.tokenizer import Tokenizer


@contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block (None: left as it is)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _dtype_kwarg() -> str:
    """from_pretrained's `torch_dtype` is `dtype` since transformers 4.56 (the old name warns)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def decode_vs_transformers(
    model: Transformer,
    tokenizer_or_vocab: Tokenizer | int | None = None,
    prompt_len: int = 16,
    new_tokens: int = 512,
    threads: Optional[int] = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Greedy decoding of one random prompt (ids below the tokenizer's vocab, or the int given;
    default: model.cfg.vocab_size), prefill included, with our KV-cache `generate` and with
    transformers' `generate` on the exported model. Both produce exactly `new_tokens` tokens:
    the export carries no EOS id, and padded vocab ids are barred on both sides.

    Returns best-of-`repeats` tokens/s for each, the ratio ours / HF, and whether the token ids
    are identical (with the first differing position, if any).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    model.eval()
    cfg = model.cfg
    vocab = tokenizer_or_vocab.vocab_size if isinstance(tokenizer_or_vocab, Tokenizer) else tokenizer_or_vocab
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab or cfg.vocab_size, (prompt_len,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)  # no tokenizer: no EOS id, so transformers never stops early
        hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", **{_dtype_kwarg(): torch.float32})
    device = model.embed.weight.device
    hf.to(device).eval()
    barred = list(range(cfg.vocab_size, cfg.padded_vocab_size)) or None  # ours masks these ids too
    ids = torch.tensor([prompt], device=device)

    def ours(n: int = new_tokens) -> list[int]:
        return generate(model, [prompt], n, use_cache=True)[0]

    @torch.no_grad()
    def theirs(n: int = new_tokens) -> list[int]:
        config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                  eos_token_id=None, pad_token_id=0, suppress_tokens=barred)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, prompt_len:].tolist()

    runs = {"ours": ours, "hf": theirs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, object] = {}
    with _threads(threads):
        for fn in runs.values():  # warm-up: one-off allocations and lazy initialisation are not timed
            fn(8)
        for r in range(repeats):
            for name in list(runs)[:: 1 if r % 2 == 0 else -1]:  # alternate who goes first
                seconds, outputs[name] = timed(runs[name], device)
                times[name].append(seconds)
        used_threads = torch.get_num_threads()
    ours_tokens, hf_tokens = outputs["ours"], outputs["hf"]
    mismatch = next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b), None)
    ours_rate, hf_rate = new_tokens / min(times["ours"]), new_tokens / min(times["hf"])
    return {
        "ours_tokens_per_s": ours_rate,
        "hf_tokens_per_s": hf_rate,
        "ratio": ours_rate / hf_rate,
        "identical": ours_tokens == hf_tokens,
        "first_mismatch": mismatch,
        "new_tokens": new_tokens,
        "prompt_len": prompt_len,
        "threads": used_threads,
    }


def _hf_twin(model: Transformer, experts_implementation: Optional[str] = None) -> nn.Module:
    """transformers' model of `model`'s family (LlamaForCausalLM for a dense model, MixtralForCausalLM
    for an MoE one, ...; SDPA attention) holding exactly its weights, loaded as a user loads an
    exported folder (from_pretrained converts the per-expert tensors to transformers 5's fused
    layout). `experts_implementation`: transformers' MoE kernel choice (None: its default)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kwargs = {"attn_implementation": "sdpa", _dtype_kwarg(): torch.float32}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar between the benchmark's lines
    try:
        with tempfile.TemporaryDirectory() as folder:
            export_hf(model, folder)
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def train_step_vs_transformers(
    model_cfg: ModelConfig,
    batch: int,
    seq_len: int,
    steps: int = 10,
    warmup: int = 3,
    repeats: int = 3,
    lr: float = 1e-3,
    threads: Optional[int] = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    experts_implementation: Optional[str] = None,
) -> dict:
    """Tokens/s of a plain training loop (forward, cross-entropy, backward, AdamW step) over our
    Transformer and over its transformers twin built from the same weights (`_hf_twin`: Llama
    for a dense model, Mixtral for an MoE one), on the same batches: `warmup` untimed steps each,
    then `repeats` interleaved rounds of `steps` timed steps; best round of each, and the ratio
    ours / HF. An MoE model trains with its router losses on both sides, as each library does:
    ours `model.router_loss()` (aux and z-loss), transformers' `output_router_logits=True` and
    `router_aux_loss_coef` times its aux loss. The first language-model losses of the two are
    returned too: equal (to float noise) when the twin really computes the same function.
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    ours = Transformer(model_cfg)
    hf = _hf_twin(ours, experts_implementation)
    ours.to(device)
    hf.to(device)
    moe = model_cfg.moe.enabled
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
               for _ in range(steps)]

    def ours_forward(x: Tensor) -> tuple[Tensor, Tensor | float]:
        return ours(x), ours.router_loss()

    def hf_forward(x: Tensor) -> tuple[Tensor, Tensor | float]:
        out = hf(input_ids=x, use_cache=False, **({"output_router_logits": True} if moe else {}))
        return out.logits, hf.config.router_aux_loss_coef * out.aux_loss if moe else 0.0

    def make_step(model: nn.Module, forward: Callable[[Tensor], tuple[Tensor, Tensor | float]]
                  ) -> Callable[[Tensor], float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()

        def step(tokens: Tensor) -> float:
            logits, router = forward(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            (loss + router).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return step

    runners = {"ours": make_step(ours, ours_forward), "hf": make_step(hf, hf_forward)}
    with _threads(threads):
        first = {name: step(batches[0]) for name, step in runners.items()}
        for i in range(1, warmup):
            for step in runners.values():
                step(batches[i % steps])
        best = {name: float("inf") for name in runners}
        for r in range(repeats):
            for name in list(runners)[:: 1 if r % 2 == 0 else -1]:  # alternate who goes first
                seconds, _ = timed(lambda step=runners[name]: [step(b) for b in batches], device)
                best[name] = min(best[name], seconds)
        used_threads = torch.get_num_threads()
    tokens = steps * batch * seq_len
    ours_rate, hf_rate = tokens / best["ours"], tokens / best["hf"]
    return {
        "hf_model": type(hf).__name__,
        "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None) if moe else None,
        "ours_tokens_per_s": ours_rate,
        "hf_tokens_per_s": hf_rate,
        "ratio": ours_rate / hf_rate,
        "first_loss_ours": first["ours"],
        "first_loss_hf": first["hf"],
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "repeats": repeats,
        "threads": used_threads,
    }
