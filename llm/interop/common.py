"""What the family modules (`llama`, `gpt2`) share: feature names for error messages and small
helpers for reading Hugging Face configs and state dicts strictly."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

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


def shared_problems(cfg: ModelConfig) -> list[str]:
    """Features neither family has: both are pre-norm and attend to the whole prefix."""
    problems = []
    if cfg.norm_placement != "pre":
        problems.append("post-norm (transformers' Llama and GPT-2 are pre-norm)")
    if cfg.attention.window is not None:
        problems.append(f"sliding window (attention.window={cfg.attention.window})")
    if cfg.moe.n_experts:
        problems.append(f"mixture-of-experts MLPs (moe.n_experts={cfg.moe.n_experts}; no MoE family exports yet)")
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
    """Leave derived fields (head_dim, n_kv_heads, mlp_hidden) unset where our defaults give the
    same number, so an imported config reads like one written by hand."""
    if cfg.head_dim == cfg.d_model // cfg.n_heads:
        cfg = replace(cfg, head_dim=None)
    if cfg.attention.n_kv_heads == cfg.n_heads:
        cfg = replace(cfg, attention=replace(cfg.attention, n_kv_heads=None))
    if cfg.mlp_hidden is not None and replace(cfg, mlp_hidden=None).hidden_size == cfg.mlp_hidden:
        cfg = replace(cfg, mlp_hidden=None)
    return cfg
