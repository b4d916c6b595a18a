"""The analytic compute accounting (`llm.scaling.flops`) against PyTorch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llm.model import AttentionConfig, ModelConfig, PositionConfig, Transformer
from llm.scaling.flops import model_size

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU




L, D, H, SEQ, BATCH = 2, 64, 4, 128, 2
HD = D // H


def make_cfg(n_kv_heads=None, kind="rope", mlp="swiglu", window=None, **kw) -> ModelConfig:
    base = dict(n_layers=L, d_model=D, n_heads=H, vocab_size=64, max_seq_len=SEQ, mlp=mlp)
    base.update(kw)
    return ModelConfig(
        attention=AttentionConfig(n_kv_heads=n_kv_heads, window=window),
        position=PositionConfig(kind=kind),
        **base,
    )


def measured_flops_per_token(cfg: ModelConfig, seq_len: int = SEQ, batch: int = BATCH) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    # The MATH backend decomposes attention into matmuls the counter sees. FlopCounterMode has no
    # formula for the fused CPU SDPA kernel (_scaled_dot_product_flash_attention_for_cpu), so with
    # the default backend it silently misses the whole attention term (torch 2.13 CPU counts
    # exactly 6N per token then, ~23% short for these sizes).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("kind", ["rope", "learned"])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_flops_per_token_matches_counter(n_kv_heads, kind, mlp):
    cfg = make_cfg(n_kv_heads, kind, mlp, vocab_size=256)  # the LM head is > 5% too
    size = model_size(cfg, SEQ)
    measured = measured_flops_per_token(cfg)
    assert measured == size.flops_per_token  # exactly: every matmul the counter sees is in the formula
    # The check is only meaningful if attention is a real share of the compute, both in the
    # formula and in what the counter saw beyond the 6N weight matmuls.
    attention = size.flops_per_token - 6 * size.matmul_params
    assert attention == 12 * L * H * HD * SEQ
    assert attention > 0.05 * size.flops_per_token
    assert measured - 6 * size.matmul_params > 0.05 * measured


def test_matmul_params_counts_weights_in_matmuls():
    cfg = make_cfg()
    model = Transformer(cfg)
    weights = sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    )  # q, k, v, o, MLP and the (tied) LM head; embedding lookups and norms are no matmuls
    assert model_size(cfg).matmul_params == weights


@pytest.mark.parametrize("window", [1, 8, 32, 127, 128, 500])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_sliding_window_flops(window, n_kv_heads):
    cfg = make_cfg(n_kv_heads, window=window)
    full = model_size(make_cfg(n_kv_heads), SEQ)
    size = model_size(cfg, SEQ)
    assert size.matmul_params == full.matmul_params  # the window changes no weights
    assert size.flops_per_token == 6 * size.matmul_params + 12 * L * H * HD * min(window, SEQ)
    if window < SEQ:
        assert size.flops_per_token < full.flops_per_token
    else:
        assert size.flops_per_token == full.flops_per_token


def test_seq_len_defaults_to_max_seq_len():
    cfg = make_cfg(max_seq_len=96)
    assert model_size(cfg).flops_per_token == model_size(cfg, 96).flops_per_token
    assert model_size(cfg, 32).flops_per_token < model_size(cfg).flops_per_token


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_gqa_flops_lower_by_kv_weights(n_kv_heads, mlp):
    mha = model_size(make_cfg(None, mlp=mlp), SEQ)
    gqa = model_size(make_cfg(n_kv_heads, mlp=mlp), SEQ)
    kv_weight_diff = 2 * L * D * HD * (H - n_kv_heads)
    assert mha.flops_per_token - gqa.flops_per_token == 6 * kv_weight_diff
    assert mha.params - gqa.params == kv_weight_diff
    assert mha.matmul_params - gqa.matmul_params == kv_weight_diff
