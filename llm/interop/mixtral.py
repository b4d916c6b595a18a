"""The Mixtral family (transformers' MixtralConfig / MixtralForCausalLM) <-> our MoE Transformer.

Mixtral is Llama (RoPE, RMSNorm, pre-norm, MHA/GQA/MQA, no biases) with every MLP a sparse MoE of
SwiGLU experts and no shared expert. Its router is ours with `router=topk_softmax`: transformers
takes the top-k of the softmax over all experts and divides them by their sum, which is the
softmax of the k chosen logits. Names (per block, under `model.layers.{i}.`):

    mlp.router.weight       (E, d)      block_sparse_moe.gate.weight
    mlp.experts.gate[j]     (hidden, d) block_sparse_moe.experts.{j}.w1.weight
    mlp.experts.up[j]       (hidden, d) block_sparse_moe.experts.{j}.w3.weight
    mlp.experts.down[j]     (d, hidden) block_sparse_moe.experts.{j}.w2.weight

the per-expert layout that every transformers version reads and save_pretrained writes
(transformers 5 fuses the experts in memory as `mlp.experts.gate_up_proj` (E, 2 hidden, d) and
`mlp.experts.down_proj`; imports accept that too). Not represented, so refused: shared experts,
dense layers (moe.every, moe.first_dense), a sliding window, biases, and a router bias
(moe.bias_update_rate) that has moved from zero: Mixtral selects by the probabilities alone, so a
nonzero bias would route differently (the ernie4_5_moe family holds it exactly).
Training settings travel as far as transformers has them: the aux-loss coefficient is converted
(`common.hf_aux_loss_coef`); z-loss, capacity factor and bias updates have no Mixtral form and
are left out (an exported model is for inference; evaluation is dropless on both sides).
"""

from __future__ import annotations

from typing import Any

import torch

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

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}  # ours -> Mixtral's per-expert names
# Buffers that old checkpoints saved; recomputed from the config, so never needed.
_IGNORED = ("rotary_emb.inv_freq",)


def module_name(ours: str) -> str:
    """transformers' name of one of our linear layers, for PEFT adapters: attention only (the
    router and the experts are not nn.Linear layers in transformers' Mixtral)."""
    parts = ours.split(".", 2)  # blocks.{i}.attn.q
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("attn.q", "attn.k", "attn.v", "attn.o"):
        return f"model.layers.{parts[1]}." + LLAMA_LIKE_BLOCK[f"{parts[2]}.weight"].removesuffix(".weight")
    raise ValueError(f"{ours}: Mixtral has no PEFT-adaptable linear layer for it (adapters on attention only)")


def problems(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of the Mixtral family; empty when it exports exactly (given a zero
    router bias: `state_problems`)."""
    found = moe_problems(cfg, "Mixtral")
    moe = cfg.moe
    if moe.enabled and moe.n_shared_experts:
        found.append(f"shared experts (moe.n_shared_experts={moe.n_shared_experts}; Mixtral has none: export to "
                     "ernie4_5_moe)")
    if moe.enabled and (moe.first_dense or moe.every != 1):
        found.append(f"dense layers (moe.first_dense={moe.first_dense}, moe.every={moe.every}; every Mixtral layer is "
                     "MoE: export to ernie4_5_moe)")
    return found


def state_problems(state: Tensors, cfg: ModelConfig) -> list[str]:
    """What the weights add to `problems`: a router bias moved away from zero."""
    moved = [k for k, v in state.items() if k.endswith("mlp.router_bias") and bool(v.any())]
    if not moved:
        return []
    return [f"a nonzero router bias ({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}, moved by "
            f"moe.bias_update_rate={cfg.moe.bias_update_rate}; Mixtral selects experts by the router probabilities "
            "alone, so it would route differently: export to ernie4_5_moe, whose e_score_correction_bias is this bias)"]


def to_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields (special token ids and dtype are added by the caller)."""
    return {
        **llama_like_config(cfg, ARCHITECTURE, MODEL_TYPE, cfg.expert_hidden_size),
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": cfg.moe.n_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": hf_aux_loss_coef(cfg),
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
    }


def to_state(state: Tensors, cfg: ModelConfig) -> Tensors:
    """Our state dict in transformers' names; a tied head is stored once, as the embedding.
    The router bias is left out (`state_problems` has checked it is zero)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name in LLAMA_LIKE_TOP:
            out[LLAMA_LIKE_TOP[name]] = tensor
            continue
        _, i, rest = name.split(".", 2)  # blocks.{i}.<rest>
        block = f"model.layers.{i}."
        if rest in LLAMA_LIKE_BLOCK:
            out[block + LLAMA_LIKE_BLOCK[rest]] = tensor
        elif rest == "mlp.router.weight":
            out[block + "block_sparse_moe.gate.weight"] = tensor
        elif rest.startswith("mlp.experts."):
            continue  # all three at once, below
        elif rest != "mlp.router_bias":
            raise ValueError(f"{name}: no Mixtral tensor for it")
    for i in range(cfg.n_layers):
        experts = {kind: state[f"blocks.{i}.mlp.experts.{kind}"] for kind in EXPERT_NAMES}
        out.update(split_experts(experts, f"model.layers.{i}.block_sparse_moe.experts", EXPERT_NAMES))
    return out


def from_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a Mixtral config.json; vocab_size is the model's (the caller may refine it).
    Missing keys take MixtralConfig's defaults."""
    reject(hf, "hidden_act", ("silu", None), "our SwiGLU uses SiLU")
    reject(hf, "sliding_window", (None,), "our attention attends to the whole prefix (set it to null)")
    d_model, n_heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    n_layers = required(hf, "num_hidden_layers")
    top_k = hf.get("num_experts_per_tok", 2)
    return simplified(ModelConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        max_seq_len=hf.get("max_position_embeddings", 4096 * 32),
        vocab_size=required(hf, "vocab_size"),
        pad_vocab_to=1,
        attention=AttentionConfig(n_kv_heads=hf.get("num_key_value_heads") or n_heads),
        position=PositionConfig(kind="rope", rope_base=llama._rope_theta({"rope_theta": 1e6, **hf})),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        mlp="swiglu",
        moe=MoEConfig(
            n_experts=hf.get("num_local_experts", 8), top_k=top_k, expert_hidden=required(hf, "intermediate_size"),
            router="topk_softmax",
            # transformers trains with this load balance only (router_jitter_noise, training noise, has no form here)
            aux_loss_coef=our_aux_loss_coef(hf.get("router_aux_loss_coef", 0.001), n_layers, top_k), z_loss_coef=0.0,
        ),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    ))


def from_state(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """transformers' tensors in our names: the per-expert layout (under `block_sparse_moe.` as
    saved, or `mlp.` as transformers 5 renames it) or transformers 5's fused experts. Accepts a
    bare MixtralModel's keys (no `model.` prefix)."""
    take = TensorTaker(with_model_prefix(tensors), ignore=_IGNORED)
    state = top_from_state(take, cfg)
    for i in range(cfg.n_layers):
        block = f"model.layers.{i}."
        for ours, theirs in LLAMA_LIKE_BLOCK.items():
            state[f"blocks.{i}.{ours}"] = take(block + theirs)
        router = take.optional(block + "block_sparse_moe.gate.weight")
        state[f"blocks.{i}.mlp.router.weight"] = router if router is not None else take(block + "mlp.gate.weight")
        experts = take_experts(take, (block + "block_sparse_moe.experts", block + "mlp.experts"), EXPERT_NAMES,
                               block + "mlp.experts", cfg.moe.n_experts)
        state.update({f"blocks.{i}.mlp.experts.{kind}": w for kind, w in experts.items()})
        state[f"blocks.{i}.mlp.router_bias"] = torch.zeros(cfg.moe.n_experts)  # Mixtral has none
    take.check_all_used()
    return state
