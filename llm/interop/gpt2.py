"""The GPT-2 family (transformers' GPT2Config / GPT2LMHeadModel) <-> our Transformer.

Covers learned positions + LayerNorm + pre-norm + a plain GELU or ReLU MLP, MHA only. Two
layout differences from ours:
- GPT-2's linear layers are `Conv1D`, which stores the weight as (in, out): ours transposed;
- its attention projects q, k and v with one fused `c_attn` (their outputs concatenated).
GPT-2 always has biases (LayerNorm, attention, MLP); a model of ours without them exports with
zero biases, which computes exactly the same function (and imports back with bias=True).
Our `gelu` is the exact (erf) GELU ("gelu" in config.json); `gelu_tanh` is GPT-2's own tanh
approximation ("gelu_new", what real GPT-2 checkpoints use; "gelu_pytorch_tanh" and "gelu_fast"
are the same function written differently and import as it).
"""

from __future__ import annotations

from typing import Any

import torch

from llm.interop.common import (
    MLP_NAMES,
    NORM_NAMES,
    POSITION_NAMES,
    Tensors,
    TensorTaker,
    reject,
    required,
    shared_problems,
    simplified,
)
from llm.model import AttentionConfig, ModelConfig, PositionConfig

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}  # our mlp -> transformers' name
# transformers' other spellings of the tanh approximation (equal to float rounding).
TANH_ALIASES = ("gelu_pytorch_tanh", "gelu_fast")
# Causal-mask buffers that older checkpoints saved (not parameters): `h.{i}.attn.bias`, `.masked_bias`.
_IGNORED = (".attn.bias", ".attn.masked_bias")


def problems(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of the GPT-2 family; empty when it exports exactly."""
    found = shared_problems(cfg)
    if cfg.position.kind != "learned":
        found.append(f"{POSITION_NAMES[cfg.position.kind]} (the GPT-2 family uses learned positions)")
    if cfg.norm != "layernorm":
        found.append(f"{NORM_NAMES[cfg.norm]} (the GPT-2 family uses LayerNorm)")
    if cfg.mlp not in ACTIVATIONS:
        found.append(f"{MLP_NAMES[cfg.mlp]} (the GPT-2 family has a plain GELU, tanh-GELU or ReLU MLP)")
    if cfg.kv_heads != cfg.n_heads:
        kind = "MQA" if cfg.kv_heads == 1 else "GQA"
        where = " with learned positions" if cfg.position.kind == "learned" else ""
        found.append(f"{kind} (n_kv_heads={cfg.kv_heads}){where} (GPT-2 has MHA only)")
    if cfg.head_size * cfg.n_heads != cfg.d_model:
        found.append(f"head_dim={cfg.head_size} with d_model={cfg.d_model}, n_heads={cfg.n_heads} "
                     "(GPT-2's head_dim is always d_model / n_heads)")
    return found


def to_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields (special token ids and dtype are added by the caller)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.padded_vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,  # read by old transformers versions
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.hidden_size,
        "activation_function": ACTIVATIONS[cfg.mlp],
        "resid_pdrop": 0.0,  # dropout is a training setting: an exported model is for inference
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
    }


def to_state(state: Tensors, cfg: ModelConfig) -> Tensors:
    """Our state dict as GPT-2 tensors: Conv1D weights transposed, q/k/v fused, zero biases
    where ours has none."""
    d = cfg.d_model

    def bias(name: str, size: int) -> torch.Tensor:
        return state[name] if name in state else state["embed.weight"].new_zeros(size)

    def conv1d(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:  # (weight (in, out), bias (out,))
        weight = state[f"{prefix}.weight"]
        return weight.t().contiguous(), bias(f"{prefix}.bias", weight.shape[0])

    out = {
        "transformer.wte.weight": state["embed.weight"],
        "transformer.wpe.weight": state["position.table.weight"],
        "transformer.ln_f.weight": state["norm.weight"],
        "transformer.ln_f.bias": bias("norm.bias", d),
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{theirs}.{ln}.weight"] = state[f"{ours}.{norm}.weight"]
            out[f"{theirs}.{ln}.bias"] = bias(f"{ours}.{norm}.bias", d)
        qkv = [conv1d(f"{ours}.attn.{p}") for p in "qkv"]
        out[f"{theirs}.attn.c_attn.weight"] = torch.cat([w for w, _ in qkv], dim=1)
        out[f"{theirs}.attn.c_attn.bias"] = torch.cat([b for _, b in qkv])
        for ours_name, theirs_name in (("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[f"{theirs}.{theirs_name}.weight"], out[f"{theirs}.{theirs_name}.bias"] = conv1d(f"{ours}.{ours_name}")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def from_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a GPT-2 config.json; vocab_size is the model's (the caller may refine it).
    Missing keys take GPT2Config's defaults (so a missing activation_function is "gelu_new")."""
    activation = hf.get("activation_function", "gelu_new")
    activation = "gelu_new" if activation in TANH_ALIASES else activation
    reject({"activation_function": activation}, "activation_function", tuple(ACTIVATIONS.values()),
           "our MLP has exact GELU (gelu), its tanh approximation (gelu_new) or ReLU")
    reject(hf, "scale_attn_weights", (True, None), "our attention always scales by 1/sqrt(head_dim)")
    reject(hf, "scale_attn_by_inverse_layer_idx", (False, None), "our attention does not scale by layer")
    reject(hf, "add_cross_attention", (False, None), "ours is a decoder-only model")
    d_model = required(hf, "n_embd")
    return simplified(ModelConfig(
        n_layers=required(hf, "n_layer"),
        d_model=d_model,
        n_heads=required(hf, "n_head"),
        max_seq_len=hf.get("n_positions", 1024),
        vocab_size=required(hf, "vocab_size"),
        pad_vocab_to=1,
        attention=AttentionConfig(bias=True),
        position=PositionConfig(kind="learned"),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp={v: k for k, v in ACTIVATIONS.items()}[activation],
        mlp_hidden=hf.get("n_inner") or 4 * d_model,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=hf.get("initializer_range", 0.02),
    ))


def from_state(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """GPT-2 tensors in our names: Conv1D weights transposed back, c_attn split into q, k, v.
    Accepts OpenAI's original keys (no `transformer.` prefix) too."""
    tensors = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in tensors.items()}
    take = TensorTaker(tensors, ignore=_IGNORED)
    state = {
        "embed.weight": take("transformer.wte.weight"),
        "position.table.weight": take("transformer.wpe.weight"),
        "norm.weight": take("transformer.ln_f.weight"),
        "norm.bias": take("transformer.ln_f.bias"),
    }
    head = take.optional("lm_head.weight")
    if not cfg.tie_embeddings:
        if head is None:
            raise ValueError("the checkpoint has no 'lm_head.weight' and tie_word_embeddings is false")
        state["lm_head.weight"] = head
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            state[f"{ours}.{norm}.weight"] = take(f"{theirs}.{ln}.weight")
            state[f"{ours}.{norm}.bias"] = take(f"{theirs}.{ln}.bias")
        weights = take(f"{theirs}.attn.c_attn.weight").t().chunk(3, dim=0)
        biases = take(f"{theirs}.attn.c_attn.bias").chunk(3)
        for p, w, b in zip("qkv", weights, biases):
            state[f"{ours}.attn.{p}.weight"], state[f"{ours}.attn.{p}.bias"] = w.contiguous(), b.contiguous()
        for ours_name, theirs_name in (("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            state[f"{ours}.{ours_name}.weight"] = take(f"{theirs}.{theirs_name}.weight").t().contiguous()
            state[f"{ours}.{ours_name}.bias"] = take(f"{theirs}.{theirs_name}.bias")
    take.check_all_used()
    return state
