"""Our model against Hugging Face transformers running the very same weights: greedy decoding
speed and training-step speed, interleaved in one process so machine noise hits both alike.

    from llm.bench.hf import decode_vs_transformers, train_step_vs_transformers
    decode_vs_transformers(model, tokenizer)                       # tokens/s, ratio, identical ids
    train_step_vs_transformers(ModelConfig(vocab_size=2048), batch=16, seq_len=128)   # vs Llama
    train_step_vs_transformers(ModelConfig(vocab_size=8192, moe=MoEConfig(n_experts=8)), 8, 256)  # vs Mixtral

`llm-bench bench.against=transformers <overrides>` runs the training-step comparison on a
composed config; `llm-bench bench.peer=transformers` runs `peer_vs_transformers`: every case of
issue 21 (training eager at two shapes and compiled, decoding at batch 1 and 8) as one table.

Not a test: figures depend on the machine (and on whoever else is using it). Needs transformers.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from llm.bench.profile import CATEGORIES, OPTIMIZER, bound, shared_ms, step_splits
from llm.evaluate.speed import timed
from llm.generate import generate
from llm.generate.decode import left_pad
from llm.generate.static import STEP_OPTIONS
from llm.interop.hf import export_hf
from llm.model import ModelConfig, Transformer
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
    batch: int = 1,
    compile: bool = False,
    hf_compile: bool = False,
) -> dict:
    """Greedy decoding of random prompts (ids below the tokenizer's vocab, or the int given;
    default: model.cfg.vocab_size), prefill included, with our KV-cache `generate` and with
    transformers' `generate` on the exported model. Both produce exactly `new_tokens` tokens per
    row: the export carries no EOS id, and padded vocab ids are barred on both sides.

    `batch` > 1: rows of different lengths (`prompt_len` down to `prompt_len - batch + 1`, at
    least 1), left-padded, with the attention mask on both sides (transformers derives the
    positions from it, as `generate` does).

    `compile`: ours decodes with `generate(compile=True)` (a compiled step over a fixed-shape
    cache); transformers' `generate` stays as a user calls it (eager, its dynamic cache) unless
    `hf_compile`: then its static cache and its own compilation of the forward (`compile_config`,
    with our Inductor options; transformers compiles only on accelerators unless told otherwise).
    The untimed warm-up (a full-length run of each) pays for the compilation; its seconds are returned.

    Returns best-of-`repeats` tokens/s for each (all rows' new tokens), the ratio ours / HF,
    their best seconds, and whether the token ids are identical (with the first differing
    (row, position), if any).
    """
    import transformers
    from transformers import GenerationConfig
    from transformers.generation import CompileConfig

    if hf_compile and not hasattr(CompileConfig, "_compile_all_devices"):
        raise ValueError(f"transformers {transformers.__version__} has no CompileConfig._compile_all_devices: "
                         "its generate would not compile on a CPU, so there is no compiled side to compare with")
    model.eval()
    cfg = model.cfg
    vocab = tokenizer_or_vocab.vocab_size if isinstance(tokenizer_or_vocab, Tokenizer) else tokenizer_or_vocab
    g = torch.Generator().manual_seed(seed)
    lengths = [max(1, prompt_len - row) for row in range(batch)]
    prompts = [torch.randint(0, vocab or cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    hf = _hf_twin(model)  # exported without a tokenizer: no EOS id, so transformers never stops early
    device = model.embed.weight.device
    hf.to(device).eval()
    barred = list(range(cfg.vocab_size, cfg.padded_vocab_size)) or None  # ours masks these ids too
    ids, mask = left_pad(prompts, 0, device)
    longest = ids.shape[1]

    def ours(n: int = new_tokens) -> list[list[int]]:
        return generate(model, prompts, n, use_cache=True, compile=compile)

    @torch.no_grad()
    def theirs(n: int = new_tokens) -> list[list[int]]:
        static = {}
        if hf_compile:
            compile_config = CompileConfig(mode=None, options=dict(STEP_OPTIONS))
            compile_config._compile_all_devices = True  # transformers' switch for compiling off accelerators
            static = {"cache_implementation": "static", "compile_config": compile_config}
        config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                  eos_token_id=None, pad_token_id=0, suppress_tokens=barred, **static)
        out = hf.generate(ids, attention_mask=mask.long(), generation_config=config)
        return out[:, longest:].tolist()

    runs = {"ours": ours, "hf": theirs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[list[int]]] = {}
    with _threads(threads):
        # Warm-up at full length (a compiled step is compiled for its cache length): one-off
        # allocations, lazy initialisation and compilation are not timed.
        warmup = {name: timed(fn, device)[0] for name, fn in runs.items()}
        for r in range(repeats):
            for name in list(runs)[:: 1 if r % 2 == 0 else -1]:  # alternate who goes first
                seconds, outputs[name] = timed(runs[name], device)
                times[name].append(seconds)
        used_threads = torch.get_num_threads()
    mismatch = first_mismatch(outputs["ours"], outputs["hf"])
    tokens = batch * new_tokens
    best = {name: min(seconds) for name, seconds in times.items()}
    return {
        **rates(tokens, best["ours"], best["hf"]),
        "median_ratio": statistics.median(times["hf"]) / statistics.median(times["ours"]),
        "ours_seconds": times["ours"],
        "hf_seconds": times["hf"],
        "identical": mismatch is None,
        "first_mismatch": mismatch,
        "compiled": compile,
        "hf_compiled": hf_compile,
        "warmup_seconds": warmup,
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_lens": lengths,
        "prompt_len": prompt_len,
        "threads": used_threads,
    }


def first_mismatch(ours: list[list[int]], theirs: list[list[int]]) -> Optional[tuple[int, int]]:
    """(row, position) of the first token where the two outputs differ (a missing or extra row
    or token counts), or None when they are identical."""
    for row in range(max(len(ours), len(theirs))):
        a = ours[row] if row < len(ours) else []
        b = theirs[row] if row < len(theirs) else []
        for position in range(max(len(a), len(b))):
            if position >= len(a) or position >= len(b) or a[position] != b[position]:
                return row, position
    return None


def rates(tokens: int, ours_seconds: float, hf_seconds: float) -> dict[str, float]:
    """Tokens/s of each side for `tokens` processed in the given seconds, and the ratio
    ours / transformers (above 1: ours is faster)."""
    ours_rate, hf_rate = tokens / ours_seconds, tokens / hf_seconds
    return {"ours_tokens_per_s": ours_rate, "hf_tokens_per_s": hf_rate, "ratio": ours_rate / hf_rate}


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
    compile: bool = False,
    profile: bool = False,
) -> dict:
    """Tokens/s of a plain training loop (forward, cross-entropy, backward, AdamW step) over our
    Transformer and over its transformers twin built from the same weights (`_hf_twin`: Llama
    for a dense model, Mixtral for an MoE one), on the same batches: `warmup` untimed steps each,
    then `repeats` rounds of `steps` timed steps, the two sides alternating step by step (ABBA);
    best round of each, and the ratio ours / HF. An MoE model trains with its router losses on both sides, as each library does:
    ours `model.router_loss()` (aux and z-loss), transformers' `output_router_logits=True` and
    `router_aux_loss_coef` times its aux loss. The first language-model losses of the two are
    returned too: equal (to float noise) when the twin really computes the same function.

    `compile`: both models through `torch.compile` (the whole model, as a user of either library
    would; the warm-up steps pay for the compilation, so `warmup` must be at least 1).
    `profile`: after the timing, three profiled steps of each side split into what both share and
    what is each model's own (`llm.bench.profile`): `split` {ours, hf} in ms and the `bound` on
    ours / transformers that the shared part leaves.
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

    ours_call: Callable[..., Tensor] = torch.compile(ours) if compile else ours
    hf_call: Callable[..., object] = torch.compile(hf) if compile else hf

    def ours_forward(x: Tensor) -> tuple[Tensor, Tensor | float]:
        return ours_call(x), ours.router_loss()

    def hf_forward(x: Tensor) -> tuple[Tensor, Tensor | float]:
        out = hf_call(input_ids=x, use_cache=False, **({"output_router_logits": True} if moe else {}))
        return out.logits, hf.config.router_aux_loss_coef * out.aux_loss if moe else 0.0

    def make_step(model: nn.Module, forward: Callable[[Tensor], tuple[Tensor, Tensor | float]]
                  ) -> Callable[[Tensor], float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()

        def step(tokens: Tensor) -> float:
            logits, router = forward(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            (loss + router).backward()
            with record_function(OPTIMIZER):  # timed as one by llm.bench.profile
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
        # Interleaved step by step (ABBA), each side's round the sum of its steps' times: a shared
        # machine's load comes and goes within seconds, and so hits both sides alike.
        times: dict[str, list[float]] = {name: [0.0] * repeats for name in runners}
        for r in range(repeats):
            for i, b in enumerate(batches):
                for name in list(runners)[:: 1 if (r * steps + i) % 2 == 0 else -1]:
                    seconds, _ = timed(lambda step=runners[name]: step(b), device)
                    times[name][r] += seconds
        split = step_splits({name: lambda step=step: step(batches[0]) for name, step in runners.items()}) if profile else None
        used_threads = torch.get_num_threads()
    tokens = steps * batch * seq_len
    return {
        "split": split,
        "bound": bound(split["ours"], split["hf"]) if split else None,
        "hf_model": type(hf).__name__,
        "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None) if moe else None,
        **rates(tokens, min(times["ours"]), min(times["hf"])),
        "median_ratio": statistics.median(times["hf"]) / statistics.median(times["ours"]),
        "ours_seconds": times["ours"],
        "hf_seconds": times["hf"],
        "compiled": compile,
        "first_loss_ours": first["ours"],
        "first_loss_hf": first["hf"],
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "repeats": repeats,
        "threads": used_threads,
    }


# Issue 21's goals: ours / transformers at least this, per case kind.
GOALS = {"train_eager": 1.2, "train_compiled": 1.0, "decode": 1.5}


def arch_label(cfg: ModelConfig) -> str:
    """`4L d256 8/2h ff688 V8192`: layers, width, query/KV heads, MLP hidden size, vocabulary."""
    return f"{cfg.n_layers}L d{cfg.d_model} {cfg.n_heads}/{cfg.kv_heads}h ff{cfg.hidden_size} V{cfg.vocab_size}"


def peer_model(base: ModelConfig, shape: dict, min_seq_len: int, key: str) -> ModelConfig:
    """`base` with the `shape` fields given (n_layers, d_model, n_heads, n_kv_heads, mlp_hidden,
    vocab_size; the rest of the architecture kept) and room for `min_seq_len` positions, checked
    as a dense model transformers' Llama can hold. ConfigError naming `key` otherwise."""
    import dataclasses

    from llm.config import ConfigError
    from llm.interop.hf import choose_family

    shape = dict(shape)
    attention = dataclasses.replace(base.attention, n_kv_heads=shape.pop("n_kv_heads", base.attention.n_kv_heads))
    cfg = dataclasses.replace(base, **shape, attention=attention, max_seq_len=max(base.max_seq_len, min_seq_len))
    problems = []
    if cfg.n_heads % cfg.kv_heads:
        problems.append(f"{key}.n_kv_heads={cfg.kv_heads}: must divide {key}.n_heads={cfg.n_heads}")
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        problems.append(f"{key}.d_model={cfg.d_model}: must be a multiple of {key}.n_heads={cfg.n_heads}")
    if cfg.moe.enabled:
        problems.append(f"{key}: bench.peer=transformers compares dense models (model.moe.n_experts=0); for an MoE "
                        "model use bench.against=transformers")
    if not problems:
        try:
            choose_family(cfg)
        except ValueError as e:
            problems.append(f"{key}: {e}")
    if problems:
        raise ConfigError(problems)
    return cfg


def peer_vs_transformers(
    shapes: dict[str, tuple[ModelConfig, int, int]],
    compile_shape: Optional[str],
    decode_shape: str,
    steps: int = 10,
    warmup: int = 3,
    repeats: int = 3,
    decode_tokens: int = 128,
    decode_batches: tuple[int, ...] = (1, 8),
    prompt_len: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    profile: bool = False,
) -> list[dict]:
    """Every comparison of issue 21 in one run, each an interleaved side-by-side with the same
    weights and inputs: the eager training step at each of `shapes` ({name: (model config, batch,
    seq_len)}), the compiled one at `shapes[compile_shape]` (None: skipped), and greedy decoding
    of the `decode_shape` model at each of `decode_batches` (batch > 1 left-padded), eager and (unless
    compile_shape is None) compiled; the decoding goal applies to the fastest of ours, the compiled row.

    One row per case: {case, shape, goal, ratio (of the best rounds), median_ratio, met (ratio >= goal),
    ours/hf tokens/s and seconds, check, ok; with `profile`, eager training rows also `split` and
    `bound` (`llm.bench.profile`)}:
    `check` says how the two sides were shown to compute the same thing (first losses within
    1e-3, or identical token ids) and `ok` whether it held."""
    rows = []

    def train_row(kind: str, name: str, compiled: bool) -> dict:
        cfg, batch, seq_len = shapes[name]
        log.info(f"training step {'compiled' if compiled else 'eager'}, {name}: {arch_label(cfg)}, {batch}x{seq_len} ...")
        result = train_step_vs_transformers(cfg, batch, seq_len, steps=steps, warmup=max(warmup, 2 if compiled else 1),
                                            repeats=repeats, seed=seed, device=device, compile=compiled,
                                            profile=profile and not compiled)
        same = abs(result["first_loss_ours"] - result["first_loss_hf"]) <= 1e-3
        return {**result, "case": f"train {'compiled' if compiled else 'eager'}, {name}", "shape_name": name,
                "shape": f"{arch_label(cfg)}, {batch}x{seq_len}", "goal": GOALS[kind],
                "check": f"first loss {result['first_loss_ours']:.4f} vs {result['first_loss_hf']:.4f}", "ok": same}

    for name in shapes:
        rows.append(train_row("train_eager", name, compiled=False))
    if compile_shape is not None:
        rows.append(train_row("train_compiled", compile_shape, compiled=True))
    cfg, _, _ = shapes[decode_shape]
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    # (ours compiled, transformers compiled, label): the goal is for decoding as fast as this library
    # can (compiled: it pays) against transformers' generate as users call it; the other rows are
    # context: what compilation adds to ours, and both libraries compiled.
    variants = [(False, False, "eager"), (True, False, "compiled"), (True, True, "both compiled")]
    for batch in decode_batches:
        for compiled, hf_compiled, kind in variants if compile_shape is not None else variants[:1]:
            log.info(f"greedy decoding {kind}, batch {batch}, {decode_shape} ...")
            try:
                result = decode_vs_transformers(model, None, prompt_len=prompt_len, new_tokens=decode_tokens,
                                                repeats=repeats, seed=seed, batch=batch, compile=compiled,
                                                hf_compile=hf_compiled)
            except ValueError as e:  # a context row this transformers cannot run: said, not faked
                log.warning(f"decode {kind} b{batch} skipped: {e}")
                continue
            mismatch = result["first_mismatch"]
            goal = GOALS["decode"] if (compiled and not hf_compiled) or compile_shape is None else None
            rows.append({**result, "shape_name": decode_shape,
                         "case": f"decode {kind} b{batch}" + (" left-padded" if batch > 1 else "") + f", {decode_shape}",
                         "shape": f"{arch_label(cfg)}, {batch}x{prompt_len}+{decode_tokens}", "goal": goal,
                         "check": "tokens equal" if mismatch is None else f"tokens differ at row {mismatch[0]}, "
                                                                          f"position {mismatch[1]}",
                         "ok": mismatch is None})
    for row in rows:
        row["met"] = None if row["goal"] is None else row["ratio"] >= row["goal"]
    return rows


def _goal_cell(row: dict) -> str:
    if row["goal"] is None:
        return "-"
    return f"{'>=' if row['met'] else 'below'} {row['goal']:.1f}x"


def peer_table(rows: list[dict]) -> list[str]:
    """The rows as a Markdown table (what the README's performance table is)."""
    lines = ["| case | shape | ours tokens/s | transformers tokens/s | ours / transformers (of medians) | goal "
             "| same result |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['shape']} | {row['ours_tokens_per_s']:,.0f} | "
                     f"{row['hf_tokens_per_s']:,.0f} | **{row['ratio']:.2f}x** ({row['median_ratio']:.2f}x) | "
                     f"{_goal_cell(row)} | "
                     f"{row['check']}{'' if row['ok'] else ' (NOT the same)'} |")
    return lines


def split_table(rows: list[dict]) -> list[str]:
    """Where each profiled training row's step goes (ms, ours and transformers'), what both share,
    and the bound that leaves on ours / transformers (`llm.bench.profile`). [] without profiles."""
    profiled = [row for row in rows if row.get("split")]
    if not profiled:
        return []
    lines = ["| case | side | " + " | ".join(CATEGORIES) + " | step | shared | bound on ours / transformers |",
             "|---|---|" + "---:|" * (len(CATEGORIES) + 3)]
    for row in profiled:
        for side, label in (("ours", "ours"), ("hf", "transformers")):
            split = row["split"][side]
            cells = " | ".join(f"{split[name]:,.1f}" for name in CATEGORIES)
            last = f"**{row['bound']:.2f}x**" if side == "ours" else ""
            lines.append(f"| {row['case']} | {label} | {cells} | {split['total']:,.1f} | {shared_ms(split):,.1f} | {last} |")
    return lines
