"""Weight-only int8/int4 quantisation and quantisation-aware training (llm.generate.quantize): the
quantiser against hand-computed values and its error bound, the int4 packing, the weight a quantised
layer computes with, the bytes a quantised model stores, a quantised model's logits and
generation, the fake-quantised Linear (forward = dequant(quant(w)), straight-through gradient), and
a post-training run with posttrain.qat=int4 whose checkpoint keeps its keys. The perplexity of
quantised copies of a trained run is in test_evaluate.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ConfigError, validate
from llm.generate.decode import generate
from llm.generate.quantize import (GROUP_SIZE, FakeQuantLinear, QuantLinear, fake_quantize, fake_quantize_linears,
                                   int4_dequantize, int4_quantize, int8_dequantize, int8_quantize, model_bytes,
                                   pack_int4, quantize, unpack_int4)
from llm.model import ModelConfig, Transformer
from llm.recipes import recipe_for
from tests.conftest import compose_train
from tests.test_posttrain import TINY, build_stage, fit, model_config, parent, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")


def outlier_weight(rows: int = 48, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few large ones, a constant group and an all-zero row: the cases a
    quantiser gets wrong."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 7], w[10, 100] = 0.9, -1.3
    w[5, :GROUP_SIZE] = 0.25  # one constant int4 group
    w[7] = 0.0
    return w


# --- the quantiser ------------------------------------------------------------------------------


def test_int8_matches_hand_computed_values_and_stays_within_half_a_step():
    w = torch.tensor([[0.5, -1.27, 0.01, 1.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = int8_quantize(w)
    # Row 0: scale = 1.27 / 127 = 0.01; values round(w / 0.01). Row 1 (all zero): scale 1, values 0.
    assert scale.tolist() == pytest.approx([0.01, 1.0])
    assert q.tolist() == [[50, -127, 1, 100], [0, 0, 0, 0]] and q.dtype == torch.int8
    w = outlier_weight()
    q, scale = int8_quantize(w)
    error = (int8_dequantize(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert q.abs().amax(1).tolist() == [127] * 7 + [0] + [127] * 40  # each row's largest |w| maps to +-127


def test_int4_matches_hand_computed_values_and_stays_within_half_a_step():
    # One row, groups of 4: [0, 1.5, 3, 0.7] -> min 0, scale 3/15 = 0.2, q = round(w / 0.2) = [0, 8, 15, 4];
    # [-1, -1, -1, -1] (constant) -> q = 0 and back exactly.
    w = torch.tensor([[0.0, 1.5, 3.0, 0.7, -1.0, -1.0, -1.0, -1.0]])
    q, scale, low = int4_quantize(w, group_size=4)
    assert q.tolist() == [[0, 8, 15, 4, 0, 0, 0, 0]] and q.dtype == torch.uint8
    assert scale[0, 0].item() == pytest.approx(0.2) and 0 < scale[0, 1] < 1e-30 and low[0].tolist() == [0.0, -1.0]
    back = int4_dequantize(q, scale, low)
    assert back[0, :4].tolist() == pytest.approx([0.0, 1.6, 3.0, 0.8], abs=1e-6)
    assert back[0, 4:].tolist() == pytest.approx([-1.0] * 4, abs=1e-6)
    w = outlier_weight()
    q, scale, low = int4_quantize(w)
    step = scale.repeat_interleave(GROUP_SIZE, dim=1)
    assert q.max() == 15 and ((int4_dequantize(q, scale, low) - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(int4_dequantize(q, scale, low)[5, :GROUP_SIZE], w[5, :GROUP_SIZE])
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        int4_quantize(torch.zeros(4, 40))


def test_int4_packing_puts_the_first_half_of_a_row_in_the_low_nibbles():
    q = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x41, 0xF2, 0x03]]  # (1, 4), (2, 15), (3, 0): low nibble first
    many = torch.randint(0, 16, (9, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(many)), many)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantised_layer_computes_with_the_quantised_weight(scheme):
    linear = nn.Linear(128, 40)
    with torch.no_grad():
        linear.weight.copy_(outlier_weight(40, 128))
    layer = QuantLinear(linear, scheme)
    expected = int8_dequantize(*int8_quantize(linear.weight)) if scheme == "int8" else \
        int4_dequantize(*int4_quantize(linear.weight))
    assert torch.equal(layer.dequantized(), expected)
    # The fake-quantised weight w + (deq - w).detach() is deq up to one float rounding.
    torch.testing.assert_close(fake_quantize(linear.weight, scheme).detach(), expected, rtol=1e-6, atol=1e-9)
    x = torch.randn(2, 5, 128)
    assert torch.allclose(layer(x), x @ expected.t() + linear.bias.detach(), atol=1e-5)
    assert layer(x).shape == (2, 5, 40)


# --- whole models -------------------------------------------------------------------------------


def nano(tie: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=512, tie_embeddings=tie)).eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("tie", [True, False])
def test_model_bytes_are_the_stored_bytes(scheme, tie):
    model = nano(tie)
    float_bytes = model_bytes(model)
    assert float_bytes == 4 * sum(p.numel() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not (tie and name == "lm_head")]
    quantized = quantize(copy.deepcopy(model), scheme)
    # Each quantised (N, K) weight: 4 N K float bytes become N K (int8) + 4 N (scales), or
    # N K / 2 (int4, two per byte) + 8 N K / 32 (a float32 scale and minimum per group of 32).
    saved = sum(4 * m.out_features * m.in_features - (
        m.out_features * m.in_features + 4 * m.out_features if scheme == "int8"
        else m.out_features * m.in_features // 2 + 8 * m.out_features * m.in_features // GROUP_SIZE) for m in linears)
    assert model_bytes(quantized) == float_bytes - saved
    assert isinstance(quantized.lm_head, QuantLinear) != tie  # a tied head stays the float embedding
    assert quantized.lm_head.weight is quantized.embed.weight if tie else True
    assert not any(type(m) is nn.Linear for m in quantized.blocks.modules())


@pytest.mark.parametrize("scheme, max_kl", [("int8", 1e-5), ("int4", 1e-3)])
def test_a_quantised_model_stays_close_to_float_and_generates(scheme, max_kl):
    model = nano(tie=False)
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens)
        quantized = quantize(copy.deepcopy(model), scheme)
        logits = quantized(tokens)
    # Measured: KL 5e-7 (int8) and 1e-4 (int4) nats/token on this random model.
    p, q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert 0 < kl < max_kl
    prompts = [tokens[0, :5].tolist(), tokens[1, :9].tolist()]
    out = generate(quantized, prompts, 12)  # no EOS: every row takes all 12 steps
    assert [len(row) for row in out] == [12, 12] and all(0 <= t < 512 for row in out for t in row)


# --- quantisation-aware training ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fake_quantised_forward_is_the_quantised_weight_and_the_gradient_passes_straight_through(scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    assert fake_quantize_linears(model, scheme) == 1
    fake = model[0]
    assert isinstance(fake, FakeQuantLinear)
    x = torch.randn(6, 64)
    target = torch.randn(6, 32)
    deq = QuantLinear(fake, scheme).dequantized()
    assert not torch.allclose(deq, fake.weight)  # quantisation does change the weight
    out = fake(x)
    assert torch.allclose(out, x @ deq.t() + fake.bias, atol=1e-6)
    F.mse_loss(out, target).backward()
    # Straight through: the weight's gradient is the one a float layer holding the dequantised
    # weight gets (d loss / d deq), as if quant-dequant were the identity.
    plain = nn.Linear(64, 32)
    with torch.no_grad():
        plain.weight.copy_(deq)
        plain.bias.copy_(fake.bias)
    F.mse_loss(plain(x), target).backward()
    assert torch.allclose(fake.weight.grad, plain.weight.grad, atol=1e-6) and fake.weight.grad.abs().sum() > 0


def test_fake_quantised_layers_keep_the_keys_and_quantise_to_what_training_saw():
    model = nano(tie=True)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    fake_quantize_linears(model, "int4")
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())  # shared, not copied
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seen = model(tokens)
        quantized = quantize(copy.deepcopy(model), "int4")(tokens)
    assert torch.allclose(seen, quantized, atol=1e-4)


def test_sft_with_qat_int4_trains_fake_quantised_and_saves_the_float_keys(parent, tmp_path):  # noqa: F811
    plain = build_stage("sft", parent, tmp_path / "plain")
    stage = build_stage("sft", parent, tmp_path / "qat", ("posttrain.qat=int4",))
    module = stage["module"]
    module.configure_model()
    fakes = [m for m in module.model.modules() if isinstance(m, FakeQuantLinear)]
    assert fakes and all(m.scheme == "int4" for m in fakes)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = fit(module, stage["datamodule"], tmp_path / "qat")
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    saved = torch.load(tmp_path / "qat.ckpt", weights_only=False)["state_dict"]
    plain["module"].configure_model()
    assert list(saved) == list(plain["module"].state_dict())  # the keys of a run without QAT
    assert all(v.dtype == torch.float32 for v in saved.values())


def test_qat_is_refused_with_lora(parent, tmp_path):  # noqa: F811
    overrides = ["posttrain=sft", f"init_from={parent}", *TINY, "posttrain.qat=int4", "posttrain.lora.enabled=true"]
    recipe = recipe_for(compose_train(overrides, tmp_path))
    cfg = recipe.prepare(compose_train(overrides, tmp_path), overrides)
    with pytest.raises(ConfigError, match="posttrain.qat=int4 with posttrain.lora.enabled=true"):
        validate(cfg, world_size=1)
