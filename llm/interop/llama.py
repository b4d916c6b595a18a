"""The Llama family (transformers' LlamaConfig / LlamaForCausalLM) <-> our Transformer.

Covers RoPE + RMSNorm + pre-norm + SwiGLU with MHA, GQA or MQA, tied or untied embeddings,
optional q/k/v/o biases (`attention_bias`) and MLP biases (`mlp_bias`, on gate, up and down
alike, as ours). Our RoPE uses the same rotate-half layout as transformers' Llama, so every
tensor maps 1:1 under a new name: no permutation of the q/k rows.
"""

from __future__ import annotations

from typing import Any

from llm.interop.common import (
    llama_like_config,
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

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"

# Our name -> transformers' name, per block (under `model.layers.{i}.`) and outside the blocks.
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.{t}": f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{p}.{t}": f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "bias")},
}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Buffers that old checkpoints saved; recomputed from the config, so never needed.
_IGNORED = ("rotary_emb.inv_freq",)


def module_name(ours: str) -> str:
    """transformers' name of one of our linear layers (`blocks.3.attn.q` -> `model.layers.3.self_attn.q_proj`)."""
    if ours.startswith("blocks."):
        _, index, rest = ours.split(".", 2)
        return f"model.layers.{index}." + _BLOCK[f"{rest}.weight"].removesuffix(".weight")
    return _TOP[f"{ours}.weight"].removesuffix(".weight")


def problems(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of the Llama family; empty when it exports exactly."""
    found = shared_problems(cfg)
    if cfg.position.kind != "rope":
        found.append(f"{POSITION_NAMES[cfg.position.kind]} (the Llama family uses RoPE)")
    if cfg.norm != "rmsnorm":
        found.append(f"{NORM_NAMES[cfg.norm]} (the Llama family uses RMSNorm)")
    if cfg.mlp != "swiglu":
        found.append(f"{MLP_NAMES[cfg.mlp]} (the Llama family uses SwiGLU)")
    if cfg.d_model % cfg.n_heads:
        # transformers >= 5 validates this even when head_dim is given explicitly.
        found.append(f"d_model={cfg.d_model} not a multiple of n_heads={cfg.n_heads} (LlamaConfig rejects it)")
    return found


def to_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields (special token ids and dtype are added by the caller)."""
    return {
        **llama_like_config(cfg, ARCHITECTURE, MODEL_TYPE, cfg.hidden_size),
        "attention_bias": cfg.attention.bias,
        "attention_dropout": 0.0,
        "mlp_bias": cfg.bias,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
    }


def to_state(state: Tensors, cfg: ModelConfig) -> Tensors:
    """Our state dict in transformers' names; a tied head is stored once, as the embedding."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name in _TOP:
            out[_TOP[name]] = tensor
        else:  # blocks.{i}.<rest>
            _, i, rest = name.split(".", 2)
            out[f"model.layers.{i}.{_BLOCK[rest]}"] = tensor
    return out


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base; any scaling (linear, dynamic, llama3, yarn, ...) is a different position scheme."""
    if hf.get("rope_scaling"):
        raise ValueError(f"unsupported config.json rope_scaling={hf['rope_scaling']!r}: our RoPE has no scaling")
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported config.json rope_parameters.rope_type={rope_type!r}: our RoPE has no scaling")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("unsupported config.json partial_rotary_factor: our RoPE rotates the whole head")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def from_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a Llama config.json; vocab_size is the model's (the caller may refine it).
    Missing keys take LlamaConfig's defaults."""
    reject(hf, "hidden_act", ("silu", None), "our SwiGLU uses SiLU")
    d_model, n_heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    return simplified(ModelConfig(
        n_layers=required(hf, "num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        vocab_size=required(hf, "vocab_size"),
        pad_vocab_to=1,
        attention=AttentionConfig(
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, bias=bool(hf.get("attention_bias"))
        ),
        position=PositionConfig(kind="rope", rope_base=_rope_theta(hf)),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        mlp_hidden=required(hf, "intermediate_size"),
        bias=bool(hf.get("mlp_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    ))


def from_state(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """transformers' tensors in our names. Accepts a bare LlamaModel's keys (no `model.` prefix)."""
    tensors = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in tensors.items()}
    take = TensorTaker(tensors, ignore=_IGNORED)
    state = {ours: take(theirs) for ours, theirs in _TOP.items() if ours != "lm_head.weight"}
    head = take.optional("lm_head.weight")
    if head is not None and not cfg.tie_embeddings:
        state["lm_head.weight"] = head
    elif not cfg.tie_embeddings:
        raise ValueError("the checkpoint has no 'lm_head.weight' and tie_word_embeddings is false")
    biased = {"attn": cfg.attention.bias, "mlp": cfg.bias}
    for i in range(cfg.n_layers):
        for ours, theirs in _BLOCK.items():
            if ours.endswith(".bias") and not biased[ours.split(".")[0]]:
                continue
            state[f"blocks.{i}.{ours}"] = take(f"model.layers.{i}.{theirs}")
    take.check_all_used()
    return state
