"""Hugging Face interop of MoE models (`llm.interop.mixtral`, `llm.interop.ernie4_5_moe`):
exports load in transformers with the same logits and greedy tokens, folders that transformers
saves import exactly, round trips keep every weight, the aux-loss coefficient converts as
documented, and what the families cannot represent is refused by name. Tiny random models built
here (2 layers, d 32, 4 experts, vocab 128); nothing comes from the Hub."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, whatever a test does
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

from tests.test_hf import assert_same_greedy_tokens  # noqa: E402
from llm.interop import export_hf, import_hf  # noqa: E402
from llm.interop import ernie4_5_moe, mixtral  # noqa: E402
from llm.model import AttentionConfig, ModelConfig, Transformer  # noqa: E402
from llm.model.config import MoEConfig  # noqa: E402
from llm.model.moe import moe_layers  # noqa: E402

VOCAB = 128
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5  # experts fused in memory
# ERNIE 4.5 MoE came with transformers 4.54; the project allows older ones.
needs_ernie = pytest.mark.skipif(not hasattr(transformers, "Ernie4_5_MoeForCausalLM"),
                                 reason="transformers < 4.54 has no ERNIE 4.5 MoE")


def ernie(variant: str):
    """A parameter that needs ERNIE 4.5 MoE in transformers."""
    return pytest.param(variant, marks=needs_ernie) if "ernie" in variant else variant


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    """Tiny tensors: one thread is as fast and far steadier on a shared 2-core machine."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)
    transformers.logging.enable_progress_bar()


def moe_cfg(moe: MoEConfig = MoEConfig(n_experts=4, top_k=2, expert_hidden=16), **kw) -> ModelConfig:
    # init_std 0.1 spreads logits widely, so agreement to 1e-4 means something; expert_hidden 16
    # != d_model 32, so a transposed expert weight cannot load.
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                attention=AttentionConfig(n_kv_heads=2), moe=moe)
    return ModelConfig(**{**base, **kw})


def build(cfg: ModelConfig, router_bias: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms start at 1: randomise them, or they test nothing
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if router_bias and name.endswith("router_bias"):  # as bias_update_rate leaves it: large enough to reroute
                b.copy_(torch.randn_like(b) * 0.3)
    return model


def tokens(n: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: Transformer, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = ours(x), theirs(x).logits
    assert got.shape == expected.shape
    assert expected.std() > 0.5  # a meaningful comparison, not two near-constant outputs
    torch.testing.assert_close(got, expected, atol=4e-6, rtol=0)  # float32 rounding: 5e-7 measured here


def max_diff(ours: Transformer, theirs: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - theirs(x).logits).abs().max().item()


# variant -> (our config, router bias moved from zero, the family chosen by default)
VARIANTS = {
    "mixtral-top2-untied": (moe_cfg(tie_embeddings=False), False, "mixtral"),
    "mixtral-top1-mqa": (moe_cfg(MoEConfig(n_experts=4, top_k=1, expert_hidden=16),
                                 attention=AttentionConfig(n_kv_heads=1)), False, "mixtral"),
    # shared experts after a dense first layer, with a trained (nonzero) router bias
    "ernie-shared-dense-first-bias": (moe_cfg(MoEConfig(n_experts=4, top_k=2, n_shared_experts=2, expert_hidden=16,
                                                        first_dense=1)), True, "ernie4_5_moe"),
    # every layer MoE, no shared experts, but a moved router bias: Mixtral cannot hold it
    "ernie-bias-only-head-dim-16": (moe_cfg(head_dim=16, tie_embeddings=False), True, "ernie4_5_moe"),
}


@pytest.mark.parametrize("variant", [ernie(v) for v in VARIANTS])
def test_export_matches_transformers(variant, tmp_path):
    cfg, bias, family = VARIANTS[variant]
    model = build(cfg, router_bias=bias)
    folder = export_hf(model, tmp_path / "hf")  # the default family
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.config.model_type == family
    assert type(hf).__name__ == ("MixtralForCausalLM" if family == "mixtral" else "Ernie4_5_MoeForCausalLM")
    assert hf.config.num_experts_per_tok == cfg.moe.top_k and hf.config.num_key_value_heads == cfg.kv_heads
    x = tokens()
    assert_same_logits(model, hf, x)
    # Both sides route: our experts see different loads, and the same model without its router's
    # renormalisation (softmax_topk) is measurably another model.
    assert all((m.load > 0).sum() > 1 for m in moe_layers(model))
    for m in moe_layers(model):
        m.kind = "softmax_topk"
    assert max_diff(model, hf, x) > 1e-3
    if bias:  # and the bias matters: without it transformers routes otherwise
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.zero_()
        for m in moe_layers(model):
            m.kind = "topk_softmax"
        assert max_diff(model, hf, x) > 1e-3


@pytest.mark.parametrize("variant", [ernie(v) for v in ("mixtral-top2-untied", "ernie-shared-dense-first-bias")])
def test_greedy_generate_matches_transformers(variant, tmp_path):
    cfg, bias, _ = VARIANTS[variant]
    model = build(cfg, router_bias=bias)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf")).eval()
    assert_same_greedy_tokens(model, hf)


def hf_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        initializer_range=0.1, rms_norm_eps=1e-6, router_aux_loss_coef=0.02, tie_word_embeddings=False,
    )).eval()


def hf_ernie(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    hf = transformers.Ernie4_5_MoeForCausalLM(transformers.Ernie4_5_MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_intermediate_size=16,
        moe_layer_start_index=1, moe_layer_interval=1, max_position_embeddings=64, initializer_range=0.1,
    )).eval()
    with torch.no_grad():  # transformers initialises the selection bias to zero: give it something to carry
        for name, p in hf.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p) * 0.3)
    return hf


@pytest.mark.parametrize("family", [ernie(f) for f in ("mixtral", "ernie4_5_moe")])
def test_import_folders_saved_by_transformers(family, tmp_path):
    """save_pretrained's per-expert layout, and the state_dict as transformers holds it in
    memory (5.x: fused `mlp.experts.gate_up_proj` / `down_proj`) in a pytorch_model.bin."""
    hf = hf_mixtral() if family == "mixtral" else hf_ernie()
    hf.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    ours, tok = import_hf(tmp_path / "saved")
    assert tok is None and ours.cfg.moe.n_experts == 4 and ours.cfg.padded_vocab_size == VOCAB
    if family == "ernie4_5_moe":
        assert (ours.cfg.n_layers, ours.cfg.moe.first_dense, ours.cfg.moe.n_shared_experts) == (3, 1, 1)
        assert ours.cfg.hidden_size == 40 and ours.cfg.expert_hidden_size == 16
        assert ours.blocks[1].mlp.router_bias.abs().sum() > 0
    assert_same_logits(ours.eval(), hf, tokens())

    in_memory = hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in in_memory) == TRANSFORMERS_5
    (tmp_path / "fused").mkdir()
    hf.config.save_pretrained(tmp_path / "fused")
    torch.save(in_memory, tmp_path / "fused" / "pytorch_model.bin")
    again, _ = import_hf(tmp_path / "fused")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.mark.parametrize("variant", [ernie(v) for v in ("mixtral-top1-mqa", "ernie-shared-dense-first-bias")])
def test_round_trip_keeps_every_weight(variant, tmp_path):
    cfg, bias, _ = VARIANTS[variant]
    cfg = replace(cfg, moe=replace(cfg.moe, aux_loss_coef=0.03, capacity_factor=1.25))
    model = build(cfg, router_bias=bias)
    folder = export_hf(model, tmp_path / "hf")
    back, _ = import_hf(folder)
    # The architecture comes back whole; the training settings as transformers trains: its load
    # balance (converted both ways), no z-loss, no capacity, no bias updates.
    assert back.cfg == replace(cfg, moe=replace(cfg.moe, z_loss_coef=0.0, capacity_factor=None))
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@needs_ernie
def test_aux_loss_coefficient_converts_to_transformers(tmp_path):
    """transformers' load-balance loss is top_k times ours for one MoE layer (it counts tokens
    per expert where ours counts assignments), and pools all MoE layers where ours sums them:
    router_aux_loss_coef = aux_loss_coef x MoE layers / top_k."""
    cfg = moe_cfg(MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, expert_hidden=16, first_dense=1,
                            aux_loss_coef=0.01))
    model = build(cfg)  # zero router bias: transformers' loss counts the unbiased top-k
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf")).eval()
    assert hf.config.router_aux_loss_coef == pytest.approx(0.01 * 1 / 2)
    x = tokens()
    with torch.no_grad():
        model(x)
        theirs = hf(x, output_router_logits=True).aux_loss
    (ours,) = [m.aux_loss for m in moe_layers(model)]
    assert ours > 1.0  # not at balance: the ratio is not a coincidence of both being at their floor
    torch.testing.assert_close(theirs, 2 * ours, atol=1e-6, rtol=0)

    mixtral_cfg = moe_cfg(MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.01), n_layers=3)
    assert mixtral.to_config(mixtral_cfg)["router_aux_loss_coef"] == pytest.approx(0.01 * 3 / 2)
    assert mixtral.from_config(mixtral.to_config(mixtral_cfg)).moe.aux_loss_coef == 0.01


@pytest.mark.parametrize(
    "cfg, bias, family, feature",
    [
        (moe_cfg(MoEConfig(n_experts=4, top_k=2, n_shared_experts=1)), False, "mixtral", "shared experts"),
        (moe_cfg(MoEConfig(n_experts=4, top_k=2, every=2)), False, "mixtral", "dense layers (moe.first_dense=0, "
                                                                              "moe.every=2"),
        (moe_cfg(), True, "mixtral", "a nonzero router bias (blocks.0.mlp.router_bias"),
        (moe_cfg(MoEConfig(n_experts=4, top_k=2, router="softmax_topk")), False, None, "router=softmax_topk"),
        (moe_cfg(attention=AttentionConfig(window=16)), False, None, "sliding window"),
        (moe_cfg(bias=True), False, "ernie4_5_moe", "biases (attention.bias=False, bias=True"),
        (moe_cfg(mlp="gelu"), False, "mixtral", "GELU MLP"),
        (moe_cfg(), False, "llama", "mixture-of-experts MLPs (moe.n_experts=4"),
        (moe_cfg(MoEConfig()), False, "ernie4_5_moe", "a dense model (moe.n_experts=0"),
    ],
    ids=["mixtral-shared", "mixtral-every-2", "mixtral-router-bias", "softmax-topk", "window", "biases", "gelu",
         "llama-moe", "ernie-dense"],
)
def test_unrepresentable_models_are_refused_by_name(cfg, bias, family, feature, tmp_path):
    with pytest.raises(ValueError, match=re.escape(feature)):
        export_hf(build(cfg, router_bias=bias), tmp_path / "hf", family=family)
    assert not (tmp_path / "hf").exists()  # nothing half-written


@pytest.mark.parametrize(
    "family, edit, key",
    [
        ("mixtral", {"sliding_window": 4096}, "sliding_window"),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
        ("mixtral", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
        ("ernie4_5_moe", {"use_bias": True}, "use_bias"),
        ("ernie4_5_moe", {"moe_layer_end_index": 0}, "moe_layer_end_index"),
        ("ernie4_5_moe", {"moe_norm_min": 0.9}, "moe_norm_min"),
    ],
)
def test_import_refuses_unsupported_configs(family, edit, key, tmp_path):  # (transformers not needed)
    cfg, bias, _ = VARIANTS["mixtral-top2-untied" if family == "mixtral" else "ernie-shared-dense-first-bias"]
    folder = export_hf(build(cfg, router_bias=bias), tmp_path / "hf", family=family)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=key):
        import_hf(folder)


@pytest.mark.parametrize("variant, expected", [
    ("mixtral-top2-untied", "model.layers.1.self_attn.q_proj"),
    pytest.param("ernie-shared-dense-first-bias", "model.layers.1.mlp.shared_experts.down_proj", marks=needs_ernie),
])
def test_peft_module_names_are_transformers_linear_layers(variant, expected):
    """Adapters export only onto layers transformers has as nn.Linear under that name (not
    ERNIE's q and k, whose rows the export permutes; not routers or experts)."""
    cfg, _, family = VARIANTS[variant]
    module = {"mixtral": mixtral, "ernie4_5_moe": ernie4_5_moe}[family]
    hf_cfg = dict(module.to_config(cfg))
    theirs = dict(AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg))
                  .named_modules())
    mapped = []
    for name, layer in build(cfg).named_modules():
        if isinstance(layer, torch.nn.Linear) and name != "lm_head":
            try:
                mapped.append(module.module_name(name))
            except ValueError:
                continue
            assert isinstance(theirs[mapped[-1]], torch.nn.Linear), name
    assert expected in mapped
    with pytest.raises(ValueError, match="interleaved RoPE" if family == "ernie4_5_moe" else "attention only"):
        module.module_name("blocks.0.attn.k" if family == "ernie4_5_moe" else "blocks.0.mlp.router")
