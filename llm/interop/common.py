"""What the family modules (`llama`, `gpt2`, `mixtral`, `ernie4_5_moe`) share: feature names for
error messages, small helpers for reading Hugging Face configs and state dicts strictly, and the
MoE families' common ground (what they refuse, how expert weights are laid out)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from llm.model import ModelConfig

Tensors = dict[str, Tensor]

# How an unsupported feature is named in errors: the words a user would search the config for.
POSITION_NAMES = {
    "rope": "RoPE positions",
    "alibi": "ALiBi positions",
    "learned": "learned positions",
    "sinusoidal": "sinusoidal positions",
    "none": "no positions (NoPE)",
}
MLP_NAMES = {"swiglu": "SwiGLU MLP", "gelu": "GELU MLP", "gelu_tanh": "tanh-GELU MLP", "relu": "ReLU MLP"}
NORM_NAMES = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}


def base_problems(cfg: ModelConfig) -> list[str]:
    """Features no family has: all are pre-norm and attend to the whole prefix."""
    problems = []
    if cfg.norm_placement != "pre":
        problems.append("post-norm (transformers' Llama, GPT-2 and MoE families are pre-norm)")
    if cfg.attention.window is not None:
        problems.append(f"sliding window (attention.window={cfg.attention.window})")
    return problems


def shared_problems(cfg: ModelConfig) -> list[str]:
    """What the dense families (`llama`, `gpt2`) refuse alike: `base_problems` and MoE MLPs."""
    problems = base_problems(cfg)
    if cfg.moe.n_experts:
        problems.append(f"mixture-of-experts MLPs (moe.n_experts={cfg.moe.n_experts}; this family's MLPs are dense: "
                        "MoE models export to the mixtral or ernie4_5_moe family)")
    return problems


def required(hf: dict[str, Any], key: str) -> Any:
    """A config.json value the conversion cannot guess."""
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}")
    return hf[key]


def reject(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    """Raise, naming the key, when a config value (missing: None) is not one we can represent."""
    value = hf.get(key)
    if value not in allowed:
        raise ValueError(f"unsupported config.json {key}={value!r}: {why}")


class TensorTaker:
    """Pops named tensors off a checkpoint's state dict, so that whatever the conversion did not
    use can be reported: a silently ignored tensor would be a silently wrong model."""

    def __init__(self, tensors: Tensors, ignore: tuple[str, ...] = ()):
        self.tensors = {k: v for k, v in tensors.items() if not k.endswith(ignore)}

    def __call__(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return self.tensors.pop(name)

    def optional(self, name: str) -> Tensor | None:
        return self.tensors.pop(name, None)

    def check_all_used(self) -> None:
        if self.tensors:
            raise ValueError(f"the checkpoint has tensors this architecture does not use: {sorted(self.tensors)[:5]}")


def simplified(cfg: ModelConfig) -> ModelConfig:
    """Leave derived fields (head_dim, n_kv_heads, mlp_hidden, moe.expert_hidden) unset where our defaults give the
    same number, so an imported config reads like one written by hand."""
    if cfg.head_dim == cfg.d_model // cfg.n_heads:
        cfg = replace(cfg, head_dim=None)
    if cfg.attention.n_kv_heads == cfg.n_heads:
        cfg = replace(cfg, attention=replace(cfg.attention, n_kv_heads=None))
    if cfg.mlp_hidden is not None and replace(cfg, mlp_hidden=None).hidden_size == cfg.mlp_hidden:
        cfg = replace(cfg, mlp_hidden=None)
    if cfg.moe.expert_hidden is not None and cfg.moe.expert_hidden == cfg.hidden_size:
        cfg = replace(cfg, moe=replace(cfg.moe, expert_hidden=None))
    return cfg


# ---- The MoE families (`mixtral`, `ernie4_5_moe`): Llama's attention, norms and names around MoE MLPs.

# Our name -> transformers' name, per block (under `model.layers.{i}.`) and outside the blocks; no biases.
def llama_like_config(cfg: ModelConfig, architecture: str, model_type: str, intermediate_size: int) -> dict[str, Any]:
    """The config.json fields the Llama-shaped families (llama, mixtral, ernie4_5_moe) share:
    sizes, heads, SwiGLU, RMSNorm and RoPE; each family adds its own."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,  # always explicit: transformers < 4.45 would derive it otherwise
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 4.x reads rope_theta, 5.x rope_parameters.
        "rope_theta": cfg.position.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.position.rope_base},
    }


LLAMA_LIKE_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
}
LLAMA_LIKE_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def moe_problems(cfg: ModelConfig, family: str) -> list[str]:
    """What every MoE family refuses: anything but a pre-norm RoPE + RMSNorm model with SwiGLU
    experts, no biases, and the router that renormalises the top-k weights (ours `topk_softmax`)."""
    found = base_problems(cfg)
    if not cfg.moe.enabled:
        found.append(f"a dense model (moe.n_experts=0; the {family} family is MoE: export to llama)")
    if cfg.position.kind != "rope":
        found.append(f"{POSITION_NAMES[cfg.position.kind]} (the {family} family uses RoPE)")
    if cfg.norm != "rmsnorm":
        found.append(f"{NORM_NAMES[cfg.norm]} (the {family} family uses RMSNorm)")
    if cfg.mlp != "swiglu":
        found.append(f"{MLP_NAMES[cfg.mlp]} (the {family} family's experts are SwiGLU)")
    if cfg.attention.bias or cfg.bias:
        found.append(f"biases (attention.bias={cfg.attention.bias}, bias={cfg.bias}; the {family} family has none on "
                     "attention or experts)")
    if cfg.moe.enabled and cfg.moe.router != "topk_softmax":
        found.append(f"router={cfg.moe.router} (the {family} family renormalises the top-k weights to sum to 1: "
                     "router=topk_softmax)")
    if cfg.d_model % cfg.n_heads:  # transformers >= 5 validates this even when head_dim is given explicitly
        found.append(f"d_model={cfg.d_model} not a multiple of n_heads={cfg.n_heads} (transformers' config rejects it)")
    return found


def n_moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def _tidy(x: float) -> float:
    """12 significant digits: a converted coefficient reads as written and survives the way back."""
    return float(f"{x:.12g}")


# The load-balance coefficient, both ways. Our loss is per MoE layer, n_experts x sum_i f_i P_i
# with f_i the fraction of token-ASSIGNMENTS (summing to 1: the loss is 1 at balance), and the
# layers' losses are summed. transformers' (Mixtral, Ernie 4.5, Qwen2-MoE alike) is one loss over
# the router logits of all MoE layers pooled, with f_i the fraction of TOKENS (summing to top_k:
# top_k at balance, top_k times ours for one layer). Equal losses at balance, and equal gradients
# whenever the layers route alike, need router_aux_loss_coef = aux_loss_coef x MoE layers / top_k.
def hf_aux_loss_coef(cfg: ModelConfig) -> float:
    """transformers' router_aux_loss_coef for our moe.aux_loss_coef (see above)."""
    return _tidy(cfg.moe.aux_loss_coef * n_moe_layers(cfg) / cfg.moe.top_k)


def our_aux_loss_coef(router_aux_loss_coef: float, moe_layers: int, top_k: int) -> float:
    """Our moe.aux_loss_coef for transformers' router_aux_loss_coef (the inverse of `hf_aux_loss_coef`)."""
    return _tidy(router_aux_loss_coef * top_k / max(moe_layers, 1))


def split_experts(experts: dict[str, Tensor], prefix: str, names: dict[str, str]) -> Tensors:
    """Our stacked experts {"gate", "up", "down"}: (E, ., .) as one tensor per expert and
    projection, `{prefix}.{j}.{names[kind]}.weight`: the layout save_pretrained writes (transformers
    5 fuses them in memory and splits them again on saving; 4.x knows only this one)."""
    out = {}
    for kind, stacked in experts.items():
        for j in range(stacked.shape[0]):
            out[f"{prefix}.{j}.{names[kind]}.weight"] = stacked[j].clone()  # safetensors refuses shared storage
    return out


def take_experts(take: TensorTaker, prefixes: tuple[str, ...], names: dict[str, str], fused_prefix: str,
                 n_experts: int) -> dict[str, Tensor]:
    """Stacked {"gate", "up", "down"} (E, ., .) from per-expert tensors under any of `prefixes`
    (as `split_experts` names them), or from transformers 5's fused `{fused_prefix}.gate_up_proj`
    (E, 2 hidden, d: gate rows first, as its loader concatenates [gate, up]) and `.down_proj`."""
    fused = take.optional(f"{fused_prefix}.gate_up_proj")
    if fused is not None:
        if fused.dim() != 3 or fused.shape[1] % 2:
            raise ValueError(f"{fused_prefix}.gate_up_proj has shape {tuple(fused.shape)}: not (experts, 2 x hidden, d)")
        gate, up = fused.chunk(2, dim=1)
        return {"gate": gate.contiguous(), "up": up.contiguous(), "down": take(f"{fused_prefix}.down_proj")}
    prefix = next((p for p in prefixes if f"{p}.0.{names['gate']}.weight" in take.tensors), prefixes[0])
    return {kind: torch.stack([take(f"{prefix}.{j}.{name}.weight") for j in range(n_experts)])
            for kind, name in names.items()}


def top_from_state(take: TensorTaker, cfg: ModelConfig) -> Tensors:
    """Embedding, final norm and (untied) head, as Llama names them."""
    state = {ours: take(theirs) for ours, theirs in LLAMA_LIKE_TOP.items() if ours != "lm_head.weight"}
    head = take.optional("lm_head.weight")
    if head is not None and not cfg.tie_embeddings:
        state["lm_head.weight"] = head
    elif not cfg.tie_embeddings:
        raise ValueError("the checkpoint has no 'lm_head.weight' and tie_word_embeddings is false")
    return state


def with_model_prefix(tensors: Tensors) -> Tensors:
    """A bare decoder's keys (no `model.` prefix) as the causal LM's."""
    return {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in tensors.items()}


def placement(hf_layers: list[int], n_layers: int, every: int, first_dense: int,
              key: str) -> Optional[str]:
    """Why transformers' MoE layers `hf_layers` differ from ours for (every, first_dense), naming
    `key`; None when they are the same layers."""
    ours = [i for i in range(n_layers) if i >= first_dense and (i + 1) % every == 0]
    if ours == hf_layers:
        return None
    return (f"unsupported config.json {key}: its MoE layers {hf_layers} are not ours for every={every}, "
            f"first_dense={first_dense} ({ours}; layer i is MoE when i >= first_dense and (i + 1) % every == 0)")
