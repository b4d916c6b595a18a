"""The ERNIE 4.5 MoE family (transformers' Ernie4_5_MoeConfig / Ernie4_5_MoeForCausalLM) <->
our MoE Transformer with shared experts.

The shared-expert family that maps our MoE layer exactly, both ways. ERNIE 4.5 is Llama-like
(RoPE, RMSNorm, pre-norm, GQA) with MoE layers of SwiGLU experts where
- the router is ours with `router=topk_softmax`: softmax over all experts, top-k, the chosen
  probabilities divided by their sum (clamped below at moe_norm_min, which a sum of the k largest
  of E probabilities, at least k / E, never reaches);
- `e_score_correction_bias` is added to the probabilities for the choice only: our `router_bias`
  (DeepSeek-V3's auxiliary-loss-free bias, moved by moe.bias_update_rate), which therefore
  exports as it is, trained or not;
- the shared experts are one ungated MLP of moe_num_shared_experts x moe_intermediate_size, as
  ours (n_shared_experts x expert_hidden), added to the routed output;
- layer i is MoE when moe_layer_start_index <= i <= moe_layer_end_index and
  (i + 1) % moe_layer_interval == 0: ours with first_dense = start, every = interval, end = last.
The one layout difference: ERNIE rotates interleaved pairs (2i, 2i+1) of each head where ours
rotates halves (i, i + head_dim/2), so q and k rows are permuted within each head on the way out
(and back on the way in); attention scores, q.k summed over the head, are unchanged.

Why not Qwen2-MoE, the family the issue names first: its shared expert is scaled per token by
sigmoid(x . w), a gate ours does not have, so no trained Qwen2-MoE imports exactly (a zero gate
weight with a doubled down projection would export ours exactly, and only our own exports would
come back); it biases q, k, v but not o where ours biases all four or none. OLMoE has no shared
experts and normalises q and k, which ours does not. ERNIE's only loss is a router that always
renormalises: router=softmax_topk has no form in it (nor in Mixtral).

Names (per block, under `model.layers.{i}.`): attention and norms as Llama; an MoE layer's
mlp.router.weight -> mlp.gate.weight, mlp.router_bias (E,) -> mlp.moe_statics.e_score_correction_bias
(1, E), mlp.experts.{gate,up,down}[j] -> mlp.experts.{j}.{gate,up,down}_proj.weight (transformers 5's
fused mlp.experts.gate_up_proj / down_proj accepted on import), mlp.shared.* ->
mlp.shared_experts.*_proj; a dense layer's mlp.* -> mlp.*_proj. Not represented, so refused:
biases (ERNIE's use_bias puts them on attention, dense MLPs and the head but never on experts),
router=softmax_topk, and what no family has. Multi-token-prediction (MTP) tensors, a speculative
decoding add-on outside the model's own logits, are skipped on import. The aux-loss coefficient
is converted (`common.hf_aux_loss_coef`); z-loss, capacity factor and the bias update rate are
training settings transformers does not have, left out (evaluation is dropless on both sides).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm.interop import llama
from llm.interop.common import (
    llama_like_config,
    LLAMA_LIKE_BLOCK,
    LLAMA_LIKE_TOP,
    Tensors,
    TensorTaker,
    hf_aux_loss_coef,
    moe_problems,
    our_aux_loss_coef,
    placement,
    reject,
    required,
    simplified,
    split_experts,
    take_experts,
    top_from_state,
    with_model_prefix,
)
from llm.model import AttentionConfig, ModelConfig, PositionConfig
from llm.model.config import MoEConfig

MODEL_TYPE = "ernie4_5_moe"
ARCHITECTURE = "Ernie4_5_MoeForCausalLM"
PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # ours -> ERNIE's MLP and expert names
BIAS = "mlp.moe_statics.e_score_correction_bias"  # as saved (transformers 5 holds it under mlp.gate.)
# Recomputed buffers of old checkpoints, and the multi-token-prediction head (see the docstring).
_IGNORED = ("rotary_emb.inv_freq",)


def module_name(ours: str) -> str:
    """transformers' name of one of our linear layers, for PEFT adapters. Not q or k: their rows
    are permuted on export, so an adapter's B would need the same permutation."""
    if not ours.startswith("blocks."):
        raise ValueError(f"{ours}: no PEFT-adaptable ERNIE layer for it")
    _, index, rest = ours.split(".", 2)
    block = f"model.layers.{index}."
    if rest in ("attn.v", "attn.o"):
        return block + LLAMA_LIKE_BLOCK[f"{rest}.weight"].removesuffix(".weight")
    kind = rest.split(".")[-1]
    if rest.startswith("mlp.shared.") and kind in PROJ:
        return f"{block}mlp.shared_experts.{PROJ[kind]}"
    if rest.count(".") == 1 and rest.startswith("mlp.") and kind in PROJ:  # a dense layer's MLP
        return f"{block}mlp.{PROJ[kind]}"
    why = ("q and k rows are permuted for ERNIE's interleaved RoPE" if rest in ("attn.q", "attn.k")
           else "the router and experts are not nn.Linear layers in transformers' ERNIE")
    raise ValueError(f"{ours}: no PEFT form ({why})")


def problems(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of the ERNIE 4.5 MoE family; empty when it exports exactly."""
    found = moe_problems(cfg, "ernie4_5_moe")
    if cfg.head_size % 2:
        found.append(f"head_dim={cfg.head_size} odd (RoPE rotates pairs)")
    return found


def _interleave(w: Tensor, n_heads: int) -> Tensor:
    """q or k rows, ours (per head: halves i and i + head_dim/2 rotate together) -> ERNIE's
    (per head: rows 2i and 2i + 1 rotate together)."""
    return w.view(n_heads, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def _deinterleave(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of `_interleave`."""
    return w.view(n_heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def to_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields (special token ids and dtype are added by the caller)."""
    moe = cfg.moe
    return {
        **llama_like_config(cfg, ARCHITECTURE, MODEL_TYPE, cfg.hidden_size),
        "use_bias": False,
        "moe_num_experts": moe.n_experts,
        "moe_k": moe.top_k,
        "moe_num_shared_experts": moe.n_shared_experts,
        "moe_intermediate_size": cfg.expert_hidden_size,
        "moe_layer_start_index": moe.first_dense,
        "moe_layer_end_index": cfg.n_layers - 1,
        "moe_layer_interval": moe.every,
        "moe_norm_min": 1e-12,
        "router_aux_loss_coef": hf_aux_loss_coef(cfg),
        "output_router_logits": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
    }


def to_state(state: Tensors, cfg: ModelConfig) -> Tensors:
    """Our state dict in transformers' names; a tied head is stored once, as the embedding."""
    heads = {"attn.q.weight": cfg.n_heads, "attn.k.weight": cfg.kv_heads}
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name in LLAMA_LIKE_TOP:
            out[LLAMA_LIKE_TOP[name]] = tensor
            continue
        _, i, rest = name.split(".", 2)  # blocks.{i}.<rest>
        block = f"model.layers.{i}."
        if rest in heads:
            out[block + LLAMA_LIKE_BLOCK[rest]] = _interleave(tensor, heads[rest]).contiguous()
        elif rest in LLAMA_LIKE_BLOCK:
            out[block + LLAMA_LIKE_BLOCK[rest]] = tensor
        elif rest == "mlp.router.weight":
            out[block + "mlp.gate.weight"] = tensor
        elif rest == "mlp.router_bias":
            out[block + BIAS] = tensor.float().reshape(1, -1)  # ERNIE keeps one row per expert group (one)
        elif rest.startswith("mlp.experts."):
            continue  # all three at once, below
        elif rest.startswith("mlp.shared."):
            out[f"{block}mlp.shared_experts.{PROJ[rest.split('.')[2]]}.weight"] = tensor
        else:  # a dense layer's mlp.{gate,up,down}.weight
            out[f"{block}mlp.{PROJ[rest.split('.')[1]]}.weight"] = tensor
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            experts = {kind: state[f"blocks.{i}.mlp.experts.{kind}"] for kind in PROJ}
            out.update(split_experts(experts, f"model.layers.{i}.mlp.experts", PROJ))
    return out


def from_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for an ERNIE 4.5 MoE config.json; vocab_size is the model's (the caller may
    refine it). Missing keys take Ernie4_5_MoeConfig's defaults."""
    reject(hf, "hidden_act", ("silu", None), "our SwiGLU uses SiLU")
    reject(hf, "use_bias", (False, None), "ERNIE's biases sit on attention, dense MLPs and the head but not on the "
                                          "experts; ours are on all of them or none")
    d_model, n_heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    n_layers = required(hf, "num_hidden_layers")
    n_experts, top_k = hf.get("moe_num_experts", 64), hf.get("moe_k", 6)
    start, every = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_interval", 1)
    end = hf.get("moe_layer_end_index", -1)
    end = n_layers - 1 if end == -1 else end
    hf_layers = [i for i in range(n_layers) if start <= i <= end and (i + 1) % every == 0]
    why = placement(hf_layers, n_layers, every, start, "moe_layer_end_index")
    if why:
        raise ValueError(why)
    norm_min = hf.get("moe_norm_min", 1e-12)
    if norm_min > top_k / n_experts:  # the top-k probabilities sum to at least k / E
        raise ValueError(f"unsupported config.json moe_norm_min={norm_min}: above moe_k / moe_num_experts = "
                         f"{top_k / n_experts:g}, it could cap the routing weights' sum, which ours renormalise to 1")
    return simplified(ModelConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        max_seq_len=hf.get("max_position_embeddings", 131072),
        vocab_size=required(hf, "vocab_size"),
        pad_vocab_to=1,
        attention=AttentionConfig(n_kv_heads=hf.get("num_key_value_heads") or n_heads),
        position=PositionConfig(kind="rope", rope_base=llama._rope_theta({"rope_theta": 500000.0, **hf})),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        mlp="swiglu",
        mlp_hidden=hf.get("intermediate_size", 12288),
        moe=MoEConfig(
            n_experts=n_experts, top_k=top_k, n_shared_experts=hf.get("moe_num_shared_experts", 2),
            expert_hidden=hf.get("moe_intermediate_size", 1536), every=every, first_dense=start, router="topk_softmax",
            # transformers trains with this load balance only; its bias is not updated in training
            aux_loss_coef=our_aux_loss_coef(hf.get("router_aux_loss_coef", 0.001), len(hf_layers), top_k),
            z_loss_coef=0.0,
        ),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=hf.get("initializer_range", 0.02),
    ))


def from_state(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """transformers' tensors in our names: per-expert (as saved) or transformers 5's fused
    experts. Accepts a bare Ernie4_5_MoeModel's keys (no `model.` prefix); skips MTP tensors."""
    tensors = {k: v for k, v in with_model_prefix(tensors).items() if "mtp" not in k}
    take = TensorTaker(tensors, ignore=_IGNORED)
    state = top_from_state(take, cfg)
    heads = {"attn.q.weight": cfg.n_heads, "attn.k.weight": cfg.kv_heads}
    moe = cfg.moe
    for i in range(cfg.n_layers):
        block, ours = f"model.layers.{i}.", f"blocks.{i}."
        for name, theirs in LLAMA_LIKE_BLOCK.items():
            w = take(block + theirs)
            state[ours + name] = _deinterleave(w, heads[name]).contiguous() if name in heads else w
        if not cfg.is_moe_layer(i):
            state.update({f"{ours}mlp.{kind}.weight": take(f"{block}mlp.{proj}.weight") for kind, proj in PROJ.items()})
            continue
        state[ours + "mlp.router.weight"] = take(block + "mlp.gate.weight")
        bias = take.optional(block + BIAS)
        if bias is None:
            bias = take.optional(block + "mlp.gate.moe_statics.e_score_correction_bias")
        state[ours + "mlp.router_bias"] = torch.zeros(moe.n_experts) if bias is None else bias.float().reshape(-1)
        experts = take_experts(take, (block + "mlp.experts",), PROJ, block + "mlp.experts", moe.n_experts)
        state.update({f"{ours}mlp.experts.{kind}": w for kind, w in experts.items()})
        if moe.n_shared_experts:
            state.update({f"{ours}mlp.shared.{kind}.weight": take(f"{block}mlp.shared_experts.{proj}.weight")
                          for kind, proj in PROJ.items()})
    take.check_all_used()
    return state
