"""From a budget to a run: the compute-optimal N and D for given FLOPs (or tokens, or parameters),
and the `llm-train` overrides that realise it.

The law used, in order of preference: a fit's Approach 3 (it also predicts the loss), its Approach
2, its Approach 1; with no fit, the published Chinchilla parameters (`laws.CHINCHILLA`). C, N and D
are tied by C = 6 N D, so giving any one of them fixes the other two.

The ladder's rules, one function each, reusable by any parametric preset (`model=ladder`, whose
`model.size` is the target non-embedding N):
  - shape (`shape_for_params`): width d_model is a multiple of 64 and heads are 64 wide (n_heads =
    d_model / 64), as in GPT-2, Kaplan et al. and OLMo; below 64 wide (targets under ~5e4), a
    multiple of 16 with one head, so the smallest CPU sizes step by 16 in width rather than jump;
  - depth follows the aspect ratio d_model / n_layers ~ 64 (Kaplan et al. found the loss flat for
    ratios of about 20 to 200; GPT-2 small has 64, OLMo and Llama 7B 128): the ideal width solves
    12 n_layers d_model^2 = N with n_layers = d_model / 64, the ~12 d^2 per block being 4 d^2 of
    attention and 8 d^2 of MLP (4 d hidden GELU, or ModelConfig's default SwiGLU with 3 matrices of
    ~8/3 d hidden); of the two allowed widths around that ideal, the one whose exact count
    (`llm.scaling.flops.model_size` of `ModelConfig` defaults) after rounding n_layers is nearest
    to N wins, with n_layers at most d_model / 16 (Kaplan et al.'s flat range starts near 20; on the
    CPU sweep 6 layers of width 64, aspect 11, lost 0.15 nats to its neighbours' trend);
  - learning rate (`ladder_lr`): lr = base x (N / reference)^(-exponent), capped. The defaults
    (4e-3 at N = 1e5, exponent 1/2, cap 1e-2) are our CPU calibration on the embedded corpus (README,
    "Scaling laws"); OLMo's ladder uses 4.7e-3 at 1.08e8 with exponent 1/3 (sweeps/isoflop_cluster);
  - batch size (`ladder_batch`): OLMo's ladder rule, 160 sequences of 2048 tokens at N = 1.08e8,
    growing as N^(2/3), in sequences of data.seq_len, rounded to a multiple of a micro-batch
    step (the sweeps pass micro_batch_size x devices x nodes) and at least one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm.model.config import ModelConfig
from llm.scaling.fit import FitResult, law_from_params, read_fit
from llm.scaling.flops import model_size
from llm.scaling.laws import CHINCHILLA, FLOPS_PER_PARAM_TOKEN, ComputeLaw, Frontier, ParametricLaw

ASPECT_RATIO = 64.0  # d_model / n_layers
HEAD_DIM = 64
WIDTH_MULTIPLE = 64
SMALL_WIDTH_MULTIPLE = 16  # below one 64-wide head
MIN_ASPECT_RATIO = 16  # d_model / n_layers: no deeper than this for the width
PLACEHOLDER_VOCAB = 64  # non-embedding counts do not depend on the vocabulary; ModelConfig needs one
LAW_PARAMS = {"3": ("E", "A", "B", "alpha", "beta"), "2": ("k_N", "a"), "1": ("k_N", "a"), "kaplan": ("C_c", "alpha_C")}


def shape_for_params(n_target: float, kind: str = "non_embedding", vocab_size: Optional[int] = None,
                     aspect_ratio: float = ASPECT_RATIO) -> dict[str, int]:
    """{'n_layers', 'd_model', 'n_heads'} of a model with about `n_target` parameters (rule: module docstring).

    kind="non_embedding" counts the blocks only; kind="total" adds the (tied) token embedding,
    which needs `vocab_size`. The keys are ModelConfig fields: ModelConfig(**shape, ...) works."""
    if n_target <= 0:
        raise ValueError(f"n_target={n_target}: must be > 0")
    if kind not in ("non_embedding", "total"):
        raise ValueError(f"kind={kind!r}: allowed non_embedding, total")
    if kind == "total" and not vocab_size:
        raise ValueError("kind='total' counts the embedding: give vocab_size")
    vocab = vocab_size if kind == "total" else 0

    # Ideal continuous width: 12 (d / r) d^2 + vocab d = N, increasing in d, so bisect in log d.
    lo, hi = 1.0, 1e6
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if 12 * mid**3 / aspect_ratio + vocab * mid < n_target else (lo, mid)
    ideal = math.sqrt(lo * hi)
    # Below one 64-wide head, widths step by 16 (one head): the smallest CPU sweep sizes.
    multiple = WIDTH_MULTIPLE if ideal >= WIDTH_MULTIPLE else SMALL_WIDTH_MULTIPLE
    widths = {max(multiple, multiple * math.floor(ideal / multiple)),
              max(multiple, multiple * math.ceil(ideal / multiple))}

    best, best_error = None, math.inf
    for d in sorted(widths):
        one, two = (shape_params(_shape(layers, d), kind, vocab_size) for layers in (1, 2))
        per_layer, fixed = two - one, 2 * one - two
        layers = min(max(1, round((n_target - fixed) / per_layer)), max(1, d // MIN_ASPECT_RATIO))
        error = abs(math.log(shape_params(_shape(layers, d), kind, vocab_size) / n_target))
        if error < best_error:
            best, best_error = _shape(layers, d), error
    return best


def _shape(n_layers: int, d_model: int) -> dict[str, int]:
    return {"n_layers": int(n_layers), "d_model": int(d_model), "n_heads": max(1, d_model // HEAD_DIM)}


def ladder_lr(size: float, base: float = 4e-3, reference: float = 1e5, exponent: float = 0.5,
              cap: float = 1e-2) -> float:
    """Learning rate for `size` non-embedding parameters: min(cap, base x (size / reference)^(-exponent))."""
    if size <= 0:
        raise ValueError(f"model.size={size}: must be > 0")
    return min(cap, base * (float(size) / reference) ** (-exponent))


def ladder_batch(size: float, seq_len: int, multiple: int, tokens: float = 160 * 2048, reference: float = 1.08e8,
                 exponent: float = 2 / 3) -> int:
    """Global batch in sequences of `seq_len` for `size` non-embedding parameters: tokens x (size /
    reference)^exponent tokens, rounded to a multiple of `multiple` sequences (at least one)."""
    if size <= 0 or seq_len <= 0 or multiple <= 0:
        raise ValueError(f"size={size}, seq_len={seq_len}, multiple={multiple}: all must be > 0")
    sequences = tokens * (float(size) / reference) ** exponent / seq_len
    return int(multiple * max(1, round(sequences / multiple)))


def shape_params(shape: dict[str, int], kind: str = "non_embedding", vocab_size: Optional[int] = None) -> int:
    """Exact parameter count of a shape with the other ModelConfig fields at their defaults."""
    cfg = ModelConfig(**shape, vocab_size=vocab_size or PLACEHOLDER_VOCAB)
    size = model_size(cfg)
    return size.params if kind == "total" else size.non_embedding


def config_overrides(N: float, D: float, n_kind: str = "non_embedding", vocab_size: Optional[int] = None) -> list[str]:
    """`llm-train` overrides for a model of about N parameters (of kind n_kind) trained on D tokens."""
    shape = shape_for_params(N, n_kind, vocab_size)
    return [f"model.{k}={v}" for k, v in shape.items()] + ["budget=tokens", f"budget.tokens={int(round(D))}"]


def resolve_law(fit: Any = None) -> dict[str, Any]:
    """What `plan` plans with: {'frontier', 'loss' (callable (N, D, C) -> loss, or None), 'name', 'n_kind'}.

    `fit` may be None (published Chinchilla), a ParametricLaw, a Frontier, a FitResult, the dict
    of a fit.json, or the path of a fit.json."""
    if fit is None:
        fit = CHINCHILLA
    if isinstance(fit, (str, Path)):
        fit = read_fit(fit)
    if isinstance(fit, ParametricLaw):
        name = "Chinchilla (Hoffmann et al. 2022, Approach 3)" if fit == CHINCHILLA else "L(N, D) = E + A/N^alpha + B/D^beta"
        return {"frontier": fit.frontier(), "loss": lambda N, D, C: float(fit.loss(N, D)), "name": name,
                "n_kind": "total", "law": fit}
    if isinstance(fit, Frontier):
        return {"frontier": fit, "loss": None, "name": "N_opt = k_N C^a", "n_kind": "total", "law": fit}
    if isinstance(fit, FitResult):
        fit = {"approaches": {fit.approach: fit.as_dict()}}
    if not isinstance(fit, dict) or "approaches" not in fit:
        raise ValueError(f"cannot plan with {type(fit).__name__}: expected a fit.json (path or dict), FitResult, "
                         "ParametricLaw or Frontier")
    approaches = fit["approaches"]
    # A value the fit could not represent (inf, nan) is null in fit.json: that approach cannot plan.
    values = {k: {p: e["value"] for p, e in r["params"].items()} for k, r in approaches.items()}
    usable = {k: v for k, v in values.items() if all(v.get(p) is not None for p in LAW_PARAMS[k])}
    n_kind = fit.get("n_kind", "total")
    kaplan = law_from_params("kaplan", usable["kaplan"]) if "kaplan" in usable else None
    for approach in ("3", "2", "1"):
        if approach not in usable:
            continue
        law = law_from_params(approach, usable[approach])
        name = f"fit, Approach {approach}: {approaches[approach].get('form', '')}".rstrip(": ")
        if isinstance(law, ParametricLaw):
            return {"frontier": law.frontier(), "loss": lambda N, D, C, law=law: float(law.loss(N, D)),
                    "name": name, "n_kind": n_kind, "law": law}
        loss = (lambda N, D, C, k=kaplan: float(k.loss(C))) if isinstance(kaplan, ComputeLaw) else None
        return {"frontier": law, "loss": loss, "name": name + (" (loss from the Kaplan L(C) fit)" if loss else ""),
                "n_kind": n_kind, "law": law}
    raise ValueError("the fit has none of Approaches 3, 2, 1 with all its parameters (needed to allocate compute "
                     f"between N and D); it has: {', '.join(approaches) or 'nothing'}"
                     + "".join(f"; {k} lacks a value for {', '.join(p for p in LAW_PARAMS[k] if v.get(p) is None)}"
                               for k, v in values.items() if k not in usable))


def plan(flops: Optional[float] = None, tokens: Optional[float] = None, params: Optional[float] = None,
         fit: Any = None) -> dict[str, Any]:
    """Compute-optimal {'C', 'N', 'D', 'tokens_per_param', 'loss', 'law', 'n_kind'} from exactly one of
    flops (C), tokens (D) or params (N). `fit`: see `resolve_law` (None: published Chinchilla).
    'loss' is None when the law does not predict one."""
    given = {k: v for k, v in (("flops", flops), ("tokens", tokens), ("params", params)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of flops, tokens, params; got {', '.join(given) or 'none'}")
    (what, value), = given.items()
    if not value > 0:
        raise ValueError(f"{what}={value}: must be > 0")
    law = resolve_law(fit)
    frontier: Frontier = law["frontier"]
    try:
        with np.errstate(all="ignore"):  # a degenerate fitted law gives inf or nan, refused below
            if what == "flops":
                C = float(value)
            elif what == "tokens":
                C = float(frontier.flops_for_tokens(value))
            else:
                C = float(frontier.flops_for_params(value))
            N = float(frontier.params(C))
            D = float(np.float64(C) / (FLOPS_PER_PARAM_TOKEN * N))
    except ZeroDivisionError:  # an exponent a of 0 or 1
        C = N = D = math.nan
    # Echo the given quantity exactly rather than its round trip through floating point.
    N, D = (float(value), D) if what == "params" else (N, float(value)) if what == "tokens" else (N, D)
    if not all(math.isfinite(x) and x > 0 for x in (C, N, D)):
        # e.g. a fit.json whose frontier has k_N <= 0 or an exponent a outside (0, 1)
        raise ValueError(f"the law {law['name']!r} gives no usable allocation for {what}={value:g} "
                         f"(C = {C:g}, N = {N:g}, D = {D:g}): its parameters are not those of a compute-optimal "
                         "frontier; refit with more runs, or plan without --fit (the published Chinchilla law)")
    loss = law["loss"](N, D, C) if law["loss"] else None
    return {"C": C, "N": N, "D": D, "tokens_per_param": D / N, "loss": loss, "law": law["name"],
            "n_kind": law["n_kind"]}
