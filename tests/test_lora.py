"""LoRA adapters (`llm.model.lora`) on a tiny real `Transformer`: identity at init, only adapters
train, merging folds them into ordinary linear layers, adapter state dicts round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from llm.model import ModelConfig, Transformer
from llm.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    find_targets,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
)
from llm.model.value import ValueModel

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, D_MODEL, LAYERS = 50, 32, 2


def tiny_config(**kw) -> ModelConfig:
    base = dict(n_layers=LAYERS, d_model=D_MODEL, n_heads=4, vocab_size=VOCAB, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw))


TOKENS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


def train_steps(model: nn.Module, steps: int = 3) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        logits = model(TOKENS[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_linear_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    layer = LoRALinear(6, 5, bias=True, rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_b)
    x = torch.randn(3, 6)
    expected = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_a.shape == (2, 6) and layer.lora_b.shape == (5, 2)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_b @ layer.lora_a)
    with pytest.raises(ValueError, match="rank=0"):
        LoRALinear(6, 5, rank=0)


def test_adapted_model_equals_the_base_model_at_init_and_only_adapters_train():
    model = tiny_model().eval()
    before = model(TOKENS)
    n_trainable = apply_lora(model, rank=4, alpha=8, targets=["q", "v"])
    assert torch.equal(model(TOKENS), before)  # B = 0: the update is exactly zero
    assert not model.training and not model.blocks[0].attn.q.training  # eval mode survives the swap

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {f"blocks.{i}.attn.{m}.{ab}" for i in range(LAYERS) for m in "qv" for ab in ("lora_a", "lora_b")}
    assert trainable == adapters
    assert n_trainable == LAYERS * 2 * 4 * (D_MODEL + D_MODEL)  # rank x (in + out) per adapted layer
    assert isinstance(model.blocks[0].attn.q, nn.Linear)  # still a Linear, weight under its name
    assert "blocks.0.attn.q.weight" in model.state_dict()


def test_a_few_optimizer_steps_change_only_the_adapters():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets="all-linear")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, start[key])
        assert changed == (key.endswith("lora_a") or key.endswith("lora_b")), key


def test_merged_model_is_a_plain_transformer_with_base_plus_scaled_update():
    model = tiny_model(tie_embeddings=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, targets=["q", "mlp.down", "lm_head"])
    train_steps(model)
    model.eval()
    adapted_out = model(TOKENS)
    deltas = {f"{name}.weight": module.delta_weight().detach().clone() for name, module in lora_modules(model).items()}
    assert len(deltas) == 2 * LAYERS + 1

    merged = merge_lora(model)
    assert not lora_modules(merged)
    assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
    assert set(merged.state_dict()) == set(base)  # the base model's keys, nothing else
    for key, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, base[key] + deltas[key] if key in deltas else base[key])
    torch.testing.assert_close(merged(TOKENS), adapted_out, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in merged.parameters())

    fresh = tiny_model(seed=1, tie_embeddings=False)
    fresh.load_state_dict(merged.state_dict())  # strict: an ordinary Transformer checkpoint
    torch.testing.assert_close(fresh.eval()(TOKENS), adapted_out, atol=1e-5, rtol=1e-4)


def test_adapter_state_dict_round_trips_onto_the_same_base():
    trained = tiny_model()
    apply_lora(trained, rank=4, alpha=8, targets=["q", "v", "up"])
    train_steps(trained)
    adapters = lora_state_dict(trained)
    assert adapters and all(k.endswith(("lora_a", "lora_b")) for k in adapters)
    assert len(adapters) == LAYERS * 3 * 2

    restored = tiny_model()  # the same base weights (same seed), fresh adapters
    apply_lora(restored, rank=4, alpha=8, targets=["q", "v", "up"])
    assert not torch.equal(restored.eval()(TOKENS), trained.eval()(TOKENS))
    load_lora_state_dict(restored, {k: v.clone() for k, v in adapters.items()})
    torch.testing.assert_close(restored(TOKENS), trained(TOKENS))

    other = tiny_model()
    apply_lora(other, rank=4, alpha=8, targets=["q"])
    with pytest.raises(ValueError, match="unexpected: blocks.0.attn.v.lora_a"):
        load_lora_state_dict(other, adapters)


def test_a_base_checkpoint_loads_into_an_adapted_model():
    base = tiny_model(seed=3)
    model = tiny_model()
    apply_lora(model, targets="all-linear")
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.endswith(("lora_a", "lora_b")) for k in result.missing_keys)
    torch.testing.assert_close(model.eval()(TOKENS), base.eval()(TOKENS))


def test_targets_by_name_suffix_glob_and_all_linear():
    model = tiny_model()
    assert find_targets(model, ["attn.q"]) == [f"blocks.{i}.attn.q" for i in range(LAYERS)]
    assert find_targets(model, "blocks.0.mlp.*") == ["blocks.0.mlp.gate", "blocks.0.mlp.up", "blocks.0.mlp.down"]
    every = find_targets(model, "all-linear")
    assert len(every) == LAYERS * 7 and "lm_head" not in every  # q k v o gate up down; never the head


def test_unknown_target_names_the_layers_there_are():
    with pytest.raises(ValueError, match=r"'attn' matches no linear layer.*down, gate, k, lm_head, o, q, up, v"):
        apply_lora(tiny_model(), targets=["attn"])
    with pytest.raises(ValueError, match="'p' matches no linear layer"):  # whole names only, not the tail of "up"
        apply_lora(tiny_model(), targets=["p"])
    with pytest.raises(ValueError, match="targets is empty"):
        apply_lora(tiny_model(), targets=[])


def test_tied_head_and_double_application_are_refused():
    with pytest.raises(ValueError, match="lm_head.*shared with embed.weight"):
        apply_lora(tiny_model(tie_embeddings=True), targets=["lm_head"])
    model = tiny_model()
    apply_lora(model, targets=["q"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, targets=["q"])


def test_value_model_head_trains_in_full_beside_the_adapters():
    torch.manual_seed(0)
    model = ValueModel(tiny_config())
    n_trainable = apply_lora(model, rank=2, alpha=4, targets="all-linear", train_modules=["head"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert not isinstance(model.head, LoRALinear)  # all-linear leaves output heads alone
    assert n_trainable == sum(model.get_parameter(n).numel() for n in trainable)
    assert {"head.weight", "head.bias"} <= set(lora_state_dict(model))  # saved with the adapters
    with pytest.raises(ValueError, match="train_modules entry 'value_head' matches no module"):
        apply_lora(ValueModel(tiny_config()), targets=["q"], train_modules=["value_head"])


def test_lora_config_is_a_structured_config_section():
    section = OmegaConf.structured(LoRAConfig)
    defaults = (section.rank, section.alpha, section.dropout, list(section.targets), section.enabled)
    assert defaults == (8, 16.0, 0.0, ["q", "v"], False)
    section = OmegaConf.merge(section, OmegaConf.from_dotlist(["rank=4", "targets=[all-linear]"]))
    model = tiny_model()
    n = apply_lora(model, section.rank, section.alpha, section.dropout, section.targets, section.train_modules)
    assert n == 4 * sum(m.in_features + m.out_features for m in lora_modules(model).values())
    with pytest.raises(Exception, match="rank"):
        OmegaConf.merge(OmegaConf.structured(LoRAConfig), OmegaConf.from_dotlist(["rank=eight"]))
