"""The fast paths of the model (issue 21) compute what the plain ones do: fused Q/K/V and
gate/up matmuls, RoPE and SwiGLU as single autograd nodes, the unmasked decoding step. The
parameters, and so the checkpoint keys, stay as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llm.model.layers as layers
from llm.generate.cache import KVCache
from llm.model import AttentionConfig, ModelConfig, Transformer
from llm.model.layers import swiglu
from llm.model.lora import apply_lora
from llm.model.position import RotaryPosition, apply_rotary, rotate_heads

KEYS = {  # the checkpoint keys of one block, as before the fast paths
    "attn_norm.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
    "mlp_norm.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight",
}


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, attention=AttentionConfig(n_kv_heads=2), vocab_size=64,
                max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def loss_and_grads(model: Transformer, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("opts", [{}, {"attention": AttentionConfig(n_kv_heads=2, bias=True), "bias": True},
                                  {"position": {"kind": "alibi"}}, {"mlp": "gelu"}])
def test_fused_projections_give_the_unfused_outputs_and_gradients(opts, monkeypatch):
    if "position" in opts:
        from llm.model import PositionConfig

        opts = {**opts, "position": PositionConfig(**opts["position"])}
    torch.manual_seed(0)
    model = Transformer(tiny(**opts))
    x = torch.randint(0, 64, (2, 40))  # 80 rows >= d_model: the fused path
    fused_logits, fused_grads = loss_and_grads(model, x)
    monkeypatch.setattr(layers, "FUSE_PROJECTIONS", False)
    logits, grads = loss_and_grads(model, x)
    torch.testing.assert_close(fused_logits, logits, atol=1e-6, rtol=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_the_fused_path_is_taken_and_only_where_it_may_be(monkeypatch):
    model = Transformer(tiny())
    calls = []
    monkeypatch.setattr(layers, "fused_linear", lambda x, *m: calls.append(len(m)) or _fused(x, *m))
    monkeypatch.setattr("llm.model.attention.fused_linear", layers.fused_linear)
    model(torch.randint(0, 64, (2, 40)))
    assert calls == [3, 2, 3, 2]  # q/k/v and gate/up of each block
    calls.clear()
    model(torch.randint(0, 64, (1, 4)))  # 4 rows < d_model: copying the weights would cost more
    assert calls == []
    apply_lora(model, rank=2, targets=["q", "up"])  # adapted projections run one by one
    model(torch.randint(0, 64, (2, 40)))
    assert calls == []


_fused = layers.fused_linear


def test_state_dict_keys_are_unchanged_and_an_old_checkpoint_loads():
    model = Transformer(tiny())
    keys = set(model.state_dict())
    assert {k.split(".", 2)[2] for k in keys if k.startswith("blocks.0.")} == KEYS
    old = {k: torch.randn_like(v) for k, v in model.state_dict().items()}  # a checkpoint of the same keys
    fresh = Transformer(tiny())
    fresh.load_state_dict(old)
    x = torch.randint(0, 64, (2, 40))
    assert torch.equal(fresh(x), fresh(x))
    assert torch.equal(fresh.blocks[1].attn.k.weight, old["blocks.1.attn.k.weight"])


def test_rotate_heads_equals_apply_rotary_on_the_transposed_layout_with_its_gradient():
    rope = RotaryPosition(tiny(head_dim=None))
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64, requires_grad=True)  # (B, T, heads, D)
    cos, sin = (t.double() for t in rope.rotary(torch.arange(7)))
    cos, sin = cos[:, :8], sin[:, :8]
    expected = apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(rotate_heads(x, cos, sin), expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda t: rotate_heads(t, cos, sin), (x,))
    per_row = (cos.expand(2, 7, 8), sin.expand(2, 7, 8))  # left-padded batches: (B, T, D)
    torch.testing.assert_close(rotate_heads(x, *per_row), expected, atol=1e-12, rtol=0)


def test_swiglu_equals_silu_gate_times_up_with_its_gradient():
    h = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    gate, up = h.chunk(2, dim=-1)
    assert torch.equal(swiglu(h), F.silu(gate) * up)
    assert torch.autograd.gradcheck(swiglu, (h,))
    with torch.no_grad():
        assert torch.equal(swiglu(h), F.silu(gate) * up)


@pytest.mark.parametrize("window", [None, 3])
def test_unmasked_decoding_step_equals_the_masked_one(window):
    torch.manual_seed(0)
    model = Transformer(tiny(attention=AttentionConfig(n_kv_heads=2, window=window))).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(x)[:, -1]
        cache = KVCache.for_model(model, 2, 9)
        model(x[:, :8], cache=cache)
        assert not cache.padded
        step = model(x[:, 8:], cache=cache)[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_rmsnorm_equals_torchs_with_its_gradient():
    from llm.model.layers import RMSNorm, _RMSNorm

    torch.manual_seed(0)
    ours, reference = RMSNorm(16, eps=1e-5), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        reference.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y, expected = ours(x), reference(x)
    assert torch.equal(y, expected)  # the forward is the same ops: exports compare exactly with transformers
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, ours.weight), g), torch.autograd.grad(expected, (x, reference.weight), g)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    x64, w64 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-5), (x64, w64))


@pytest.mark.slow  # 15 s of Dynamo tracing on a 2-core CPU
def test_the_training_forward_compiles_to_one_graph():
    """The hand-written autograd nodes step aside under torch.compile (inductor fuses the plain
    ops itself): no graph break, so `torch.compile(model)` is one graph."""
    model = Transformer(tiny())
    explained = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 40)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
