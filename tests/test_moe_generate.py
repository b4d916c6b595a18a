"""Generation with mixture-of-experts models (`llm.generate` on `model.moe.*`): sampling, left
padding, beam search and speculative decoding, each against its exact expectation from the dense
path (batched == one by one, cached == uncached, beam width 1 == greedy, speculative at
temperature 0 == the target's greedy, a model drafting for itself accepts every token) and beam
search against transformers' Mixtral on the same weights.

Evaluation routing is dropless (a capacity factor only drops in training), so a token's output
never depends on which other tokens share its forward: the properties hold for MoE as for dense
models, and these tests would catch a router that let them differ (a capacity applied in
generation, a router bias ignored by cached steps, a stale cache after speculative rollbacks)."""

from __future__ import annotations

import os

import pytest
import torch

from llm.generate import beam_search, generate, speculative_generate
from llm.model import AttentionConfig, ModelConfig, MoEConfig, Transformer
from llm.model.moe import moe_layers

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU

VOCAB = 61  # padded to 64 in the model: ids 61..63 exist but must never be produced


def moe_model(seed: int = 0, n_layers: int = 2, **moe) -> Transformer:
    """A tiny MoE model with peaked logits, a capacity factor (that generation must ignore) and a
    router bias moved from zero (that selection must use in every forward)."""
    moe = {"n_experts": 4, "top_k": 2, "n_shared_experts": 1, "capacity_factor": 0.5, "bias_update_rate": 0.01,
           **moe}
    cfg = ModelConfig(n_layers=n_layers, d_model=32, n_heads=4, vocab_size=VOCAB, max_seq_len=64, init_std=0.2,
                      attention=AttentionConfig(n_kv_heads=2), moe=MoEConfig(**moe))
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router_bias.normal_(std=0.5)
    return model


def dense_model(seed: int = 1) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=VOCAB, max_seq_len=64,
                                   init_std=0.2)).eval()


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_left_padded_batch_equals_one_prompt_at_a_time():
    model = moe_model()
    prompts = random_prompts([2, 7, 4], seed=1)
    batched = generate(model, prompts, 12)
    assert batched == [generate(model, [p], 12)[0] for p in prompts]
    assert len({t for row in batched for t in row}) > 5  # sanity: not one repeated token


def test_sampling_cached_equals_uncached_and_samples():
    model = moe_model()
    prompts = random_prompts([5, 5], seed=2)
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95)
    cached = generate(model, prompts, 16, generator=seeded(0), **kwargs)
    assert cached == generate(model, prompts, 16, generator=seeded(0), use_cache=False, **kwargs)
    assert cached != generate(model, prompts, 16)  # sanity: sampling is not greedy here
    assert all(t < VOCAB for row in cached for t in row)  # never a padded vocabulary id


def test_generation_ignores_the_capacity_and_uses_the_router_bias():
    model = moe_model()
    prompt = random_prompts([6], seed=3)[0]
    greedy = generate(model, [prompt], 10)[0]
    dropless = moe_model()
    for layer in moe_layers(dropless):
        layer.capacity_factor = None
    assert generate(dropless, [prompt], 10)[0] == greedy  # capacity 0.5 drops nothing in generation
    unbiased = moe_model()
    with torch.no_grad():
        for layer in moe_layers(unbiased):
            layer.router_bias.zero_()
    assert generate(unbiased, [prompt], 10)[0] != greedy  # sanity: the bias routes differently


def test_beam_width_one_is_greedy():
    model = moe_model()
    for prompt in random_prompts([3, 6], seed=4):
        assert beam_search(model, prompt, 1, 12) == generate(model, [prompt], 12)[0]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("moe_side", ["target", "draft"])
def test_speculative_greedy_is_the_targets_greedy(moe_side, k):
    target, draft = (moe_model(), dense_model()) if moe_side == "target" else (dense_model(2), moe_model(n_layers=1))
    for prompt in random_prompts([1, 5], seed=5):
        tokens, stats = speculative_generate(target, draft, prompt, 20, k=k, temperature=0.0)
        assert tokens == generate(target, [prompt], 20)[0]
        assert stats.drafted > 0 and stats.acceptance_rate < 1.0  # sanity: rejections (and rollbacks) happened


def test_speculative_with_itself_accepts_everything():
    """The target scores k + 1 tokens in one forward, the draft one at a time: with MoE layers
    (routing per token) both see the same distributions, so every draft is accepted."""
    model = moe_model()
    prompt = random_prompts([5], seed=6)[0]
    tokens, stats = speculative_generate(model, model, prompt, 30, k=4, temperature=1.0, generator=seeded(0))
    assert len(tokens) == 30 and stats.acceptance_rate == 1.0 and stats.rounds == 6


def test_beam_search_matches_transformers_mixtral(tmp_path):
    """48 cases (~1 s after importing transformers) as tests/test_beam_hf.py runs them on Llama: widths 1-4, length penalties
    0-2, an EOS that competes; on a random transformers Mixtral imported with its weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="the reference beam search is transformers' generate")
    pytest.importorskip("safetensors")
    from tests.test_beam_hf import VOCAB as HF_VOCAB
    from tests.test_beam_hf import check, imported

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        torch.manual_seed(0)
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, num_local_experts=4,
            num_experts_per_tok=2))
        ours, hf = imported(hf, tmp_path / "mixtral")
        assert ours.cfg.moe.n_experts == 4 and ours.cfg.moe.top_k == 2
        assert check(ours, hf, 48, seed=0) == 48
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
