"""Generation (`llm.generate`): the KV cache against full forwards, left padding, sampling filters,
stopping, beam search and speculative decoding. Tiny random models with peaked logits."""

from __future__ import annotations

import math

import pytest
import torch

from llm.generate import (
    KVCache,
    beam_search,
    generate,
    mask_padded_vocab,
    probabilities,
    sample,
    speculative_generate,
    top_k_filter,
    top_p_filter,
)
from llm.generate.sampling import filter_logits
from llm.generate.static import StaticKVCache, bucketed
from llm.generate.speculative import accept_or_resample
from llm.model import AttentionConfig, ModelConfig, PositionConfig, Transformer
from llm.model.attention import attention_bias
from llm.model.position import alibi_slopes

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU




KINDS = ["rope", "alibi", "learned", "sinusoidal", "none"]
KV_HEADS = [None, 2, 1]  # MHA, GQA, MQA with n_heads = 4
KV_IDS = ["mha", "gqa", "mqa"]
VOCAB = 61  # padded to 64 in the model: ids 61..63 exist but must never be produced


def make_cfg(kind: str = "rope", n_kv_heads: int | None = None, window: int | None = None, **kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, max_seq_len=64, init_std=0.2)
    base.update(kw)
    return ModelConfig(
        attention=AttentionConfig(n_kv_heads=n_kv_heads, window=window), position=PositionConfig(kind=kind), **base
    )


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# KV cache: prefill + steps reproduce the full forward
# --------------------------------------------------------------------------------------------

CACHE_CASES = [(kind, kv, None) for kind in KINDS for kv in KV_HEADS] + [
    ("rope", 2, 4),
    ("alibi", None, 4),
    ("learned", 1, 3),
]
CACHE_IDS = [f"{kind}-{kv or 'mha'}-w{window}" for kind, kv, window in CACHE_CASES]


@pytest.mark.parametrize("kind, n_kv_heads, window", CACHE_CASES, ids=CACHE_IDS)
def test_prefill_then_steps_match_full_forward(kind, n_kv_heads, window):
    model = build(make_cfg(kind, n_kv_heads, window))
    tokens = torch.randint(0, VOCAB, (2, 14), generator=seeded(1))
    cache = KVCache.for_model(model, batch=2, max_len=14)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :6], cache=cache)]  # prefill
        parts += [model(tokens[:, t : t + 1], cache=cache) for t in range(6, 14)]  # one token at a time
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, n_kv_heads, window", CACHE_CASES, ids=CACHE_IDS)
def test_cached_decoding_equals_uncached(kind, n_kv_heads, window):
    model = build(make_cfg(kind, n_kv_heads, window))
    prompts = random_prompts([6, 6], seed=2)
    greedy = generate(model, prompts, 12)
    assert greedy == generate(model, prompts, 12, use_cache=False)
    # Sampling visits many more tokens than (repetitive) greedy output: same seed, same tokens.
    sampled = generate(model, prompts, 12, temperature=1.0, generator=seeded(3))
    assert sampled == generate(model, prompts, 12, temperature=1.0, generator=seeded(3), use_cache=False)
    assert len(set(sampled[0] + sampled[1])) > 4  # sanity: the comparison covers varied tokens


@pytest.mark.parametrize("kind, n_kv_heads, window", CACHE_CASES, ids=CACHE_IDS)
def test_static_cache_steps_match_full_forward(kind, n_kv_heads, window):
    """The fixed-shape cache of compiled decoding, run eagerly: every step attends over all slots,
    the empty ones masked, and reproduces the full forward (left-padded rows too)."""
    model = build(make_cfg(kind, n_kv_heads, window))
    tokens = torch.randint(0, VOCAB, (2, 14), generator=seeded(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # row 1: two padding tokens before its prompt
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = StaticKVCache.for_model(model, batch=2, max_len=20)  # 6 slots more than needed: never seen
    with torch.no_grad():
        parts = [model(tokens[:, :6], positions, cache, mask)]
        for t in range(6, 14):
            parts.append(model(tokens[:, t : t + 1], positions[:, -1:] + t - 5, cache))
        # the reference: the same left-padded rows through the ordinary cache
        ref_cache = KVCache.for_model(model, batch=2, max_len=14)
        ref = [model(tokens[:, :6], positions, ref_cache, mask)]
        ref += [model(tokens[:, t : t + 1], positions[:, -1:] + t - 5, ref_cache) for t in range(6, 14)]
    assert cache.length == 14 and bool(cache.valid[1, :2].any()) is False and bool(cache.valid[:, 14:].any()) is False
    cache.truncate(10)  # forgets slots 10.. (what speculative decoding does with rejected tokens)
    assert cache.length == 10 and bool(cache.valid[:, 10:].any()) is False and bool(cache.valid[0, :10].all())
    torch.testing.assert_close(torch.cat(parts, dim=1)[0], torch.cat(ref, dim=1)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(parts, dim=1)[1, 2:], torch.cat(ref, dim=1)[1, 2:], atol=1e-5, rtol=0)
    with torch.no_grad():  # row 0 has no padding: its steps equal one full forward
        torch.testing.assert_close(torch.cat(parts, dim=1)[0], model(tokens[:1])[0], atol=1e-5, rtol=0)


def test_compiled_decoding_equals_eager_and_compiles_once_per_shape():
    """generate(compile=True): the same tokens as eager decoding (padded and not, greedy and
    sampled), one graph per batch size and cache length, reused by later calls; the step reads
    column-major copies of the Linear weights (the same values)."""
    from llm.generate.static import decoding_weights

    from torch._dynamo.utils import counters

    model = build(make_cfg("rope", 2, window=5))
    padded, single = random_prompts([3, 7, 5], seed=4), random_prompts([6], seed=5)
    eager = generate(model, padded, 12, pad_id=VOCAB - 1)
    before = counters["stats"]["unique_graphs"]
    assert generate(model, padded, 12, pad_id=VOCAB - 1, compile=True) == eager
    assert generate(model, padded, 12, pad_id=VOCAB - 1, compile=True) == eager
    assert generate(model, single, 12, compile=True) == generate(model, single, 12)
    sampled = generate(model, single, 12, temperature=1.0, generator=seeded(3))
    assert generate(model, single, 12, temperature=1.0, generator=seeded(3), compile=True) == sampled
    assert counters["stats"]["unique_graphs"] - before == 2  # batch 3 and batch 1, each once
    with pytest.raises(ValueError, match="needs use_cache=True"):
        generate(model, single, 4, use_cache=False, compile=True)
    weights = decoding_weights(model)
    assert set(weights) == {name for name, p in model.named_parameters(remove_duplicate=False)
                            if name.endswith(".weight") and "norm" not in name and name != "embed.weight"}
    head = weights["lm_head.weight"]
    assert torch.equal(head, model.lm_head.weight) and head.t().is_contiguous() and not head.is_contiguous()


@pytest.mark.slow  # one compilation per model: ~5-20 s each on a CPU
@pytest.mark.parametrize("kind, n_kv_heads, window, tied", [("alibi", None, 4, True), ("learned", 1, None, True),
                                                            ("sinusoidal", 2, 3, True), ("none", None, None, True),
                                                            ("rope", 2, None, False)])
def test_compiled_decoding_equals_eager_for_every_position_scheme(kind, n_kv_heads, window, tied):
    model = build(make_cfg(kind, n_kv_heads, window, tie_embeddings=tied))
    prompts = random_prompts([3, 7, 5], seed=4)
    assert generate(model, prompts, 12, pad_id=VOCAB - 1, compile=True) == generate(model, prompts, 12,
                                                                                    pad_id=VOCAB - 1)


@pytest.mark.slow  # MoE routing has data-dependent shapes: ~45 s of compilation for a 2-layer toy
def test_compiled_decoding_of_moe_and_quantized_models_equals_eager():
    from llm.generate.quantize import quantize
    from llm.model import MoEConfig

    prompts = random_prompts([4, 2], seed=6)
    moe = build(make_cfg(moe=MoEConfig(n_experts=4, top_k=2)))
    assert generate(moe, prompts, 10, compile=True) == generate(moe, prompts, 10)
    int8 = quantize(build(make_cfg(d_model=64)), "int8")
    assert generate(int8, prompts, 10, compile=True) == generate(int8, prompts, 10)


def test_bucketed_cache_lengths_and_a_full_static_cache_raises():
    lengths = [1, 32, 33, 128, 129, 144, 300, 1000, 5000]
    assert [bucketed(n) for n in lengths] == [32, 32, 64, 128, 160, 160, 320, 1024, 5120]
    for n in range(1, 5000):  # never shorter, less than a quarter (or one MIN_BUCKET of 32) longer; few graphs
        assert n <= bucketed(n) < n + max(32, n / 4)
    assert len({bucketed(n) for n in range(129, 257)}) == 4 and len({bucketed(n) for n in range(2049, 4097)}) == 4
    model = build(make_cfg())
    cache = StaticKVCache.for_model(model, batch=1, max_len=4)
    with torch.no_grad(), pytest.raises(IndexError, match="out of bounds"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_cache_full_raises():
    model = build(make_cfg())
    cache = KVCache.for_model(model, batch=1, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_gqa_cache_is_n_heads_over_kv_heads_smaller():
    def cache_bytes(n_kv_heads):
        cfg = make_cfg("rope", n_kv_heads, n_layers=3, d_model=64, n_heads=8)
        return KVCache.for_model(Transformer(cfg), batch=2, max_len=40).nbytes

    mha, gqa, mqa = cache_bytes(None), cache_bytes(2), cache_bytes(1)
    assert mha == 2 * 3 * 2 * 8 * 40 * 8 * 4  # k and v x layers x batch x heads x slots x head_dim x fp32
    assert mha == 4 * gqa  # n_heads / n_kv_heads = 8 / 2
    assert mha == 8 * mqa


# --------------------------------------------------------------------------------------------
# Left padding
# --------------------------------------------------------------------------------------------

PAD_KINDS = ["rope", "alibi", "learned", "sinusoidal"]


@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
@pytest.mark.parametrize("kind", PAD_KINDS)
def test_left_padded_batch_equals_one_by_one(kind, window):
    model = build(make_cfg(kind, 2, window))
    prompts = random_prompts([3, 7, 5], seed=4)
    alone = [generate(model, [p], 10)[0] for p in prompts]
    assert generate(model, prompts, 10, pad_id=VOCAB - 1) == alone
    assert generate(model, prompts, 10, use_cache=False, pad_id=VOCAB - 1) == alone


@pytest.mark.parametrize("kind", PAD_KINDS)
def test_left_padded_logits_equal_unpadded(kind):
    """Stronger than token equality: every real position's logits, prefill and steps."""
    model = build(make_cfg(kind, 2))
    short, long = random_prompts([3, 7], seed=5)
    tokens = torch.tensor([[0] * 4 + short, long])
    mask = tokens.new_ones(tokens.shape, dtype=torch.bool)
    mask[0, :4] = False
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache.for_model(model, batch=2, max_len=10)
    step = torch.tensor([[11], [12]])
    with torch.no_grad():
        prefill = model(tokens, positions, cache, mask)
        after = model(step, positions[:, -1:] + 1, cache)
        want_short = model(torch.tensor([short + [11]]))
        want_long = model(torch.tensor([long + [12]]))
    assert torch.isfinite(prefill).all()  # padded queries must not produce NaN
    torch.testing.assert_close(prefill[0, 4:], want_short[0, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill[1], want_long[0, :7], atol=1e-5, rtol=0)
    torch.testing.assert_close(after[:, 0], torch.stack([want_short[0, 3], want_long[0, 7]]), atol=1e-5, rtol=0)


def test_padding_bias_hides_padded_keys_but_no_row_is_empty():
    """Real queries never see padding; a padded query still sees something (an all -inf softmax
    row is NaN on some SDPA backends, and NaN values leak through zero attention weights)."""
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    # Padding at positions of its own (generate puts it at 0, with the first real token): a
    # padded query then has no real key at or before its position, only other padding.
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    bias = attention_bias(pos, pos, 2, alibi_slopes(4), torch.float32, mask, mask)  # (2, 4, 5, 5)
    visible = torch.isfinite(bias)
    assert visible.any(-1).all()  # every query row sees at least one key
    assert not visible[0][:, 2:, :2].any()  # real queries of row 0 never see its padding
    causal_window = torch.tensor([[i - 2 < j <= i for j in range(5)] for i in range(5)])
    assert torch.equal(visible[1, 0], causal_window)  # the unpadded row is plain causal + window 2
    assert torch.equal(visible[0, 0, 2:, 2:], causal_window[:3, :3])


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

LOGITS = torch.tensor([1.0, 3.0, -1.0, 2.5, 0.0, 2.0, -3.0, 1.5])  # order: 1, 3, 5, 7, 0, 4, 2, 6
N_DRAWS = 4000


def draws(logits: torch.Tensor, seed: int = 0, **kw) -> torch.Tensor:
    """N_DRAWS seeded samples from the same logits, in one batched call."""
    return sample(logits.expand(N_DRAWS, -1), generator=seeded(seed), **kw)


def test_temperature():
    torch.testing.assert_close(probabilities(LOGITS, temperature=0.5), (LOGITS / 0.5).softmax(-1))
    assert torch.equal(probabilities(LOGITS, temperature=0.0), torch.eye(8)[1])  # greedy: one-hot argmax
    hot, cold = draws(LOGITS, temperature=2.0), draws(LOGITS, temperature=0.25)
    assert (cold == 1).float().mean() > 0.8 > (hot == 1).float().mean()  # (1 - 0.8 = 3x the noise)
    with pytest.raises(ValueError):
        sample(LOGITS[None], temperature=-1.0)


def test_top_k_filter_keeps_exactly_the_k_largest():
    kept = torch.isfinite(top_k_filter(LOGITS, 3)).nonzero().view(-1).tolist()
    assert kept == [1, 3, 5]
    assert torch.equal(top_k_filter(LOGITS, 3)[kept], LOGITS[kept])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_never_samples_outside_top_k(k):
    seen = set(draws(LOGITS, temperature=1.5, top_k=k).tolist())
    assert seen == set(LOGITS.topk(k).indices.tolist())  # inside, and every one of them reachable


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(top_p_filter(logits, 0.75)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.85)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.4)).tolist() == [True, False, False, False]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


@pytest.mark.parametrize("p, nucleus", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.3, {0})])
def test_top_p_never_samples_outside_the_nucleus(p, nucleus):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[torch.tensor([2, 0, 3, 1])]  # shuffled ids
    ids = {0: 1, 1: 3, 2: 0, 3: 2}  # rank -> id after the shuffle
    seen = set(draws(logits, temperature=1.0, top_p=p).tolist())
    assert seen == {ids[r] for r in nucleus}


def test_top_p_at_an_exact_boundary_and_at_one():
    # Four equal logits: exactly 0.25 each. A nucleus of 0.5 is the first two, whose mass reaches
    # p exactly (the third's preceding mass is 0.5, not below it).
    assert torch.isfinite(top_p_filter(torch.zeros(4), 0.5)).tolist() == [True, True, False, False]
    # top_p=1 filters nothing, not even a token whose preceding mass rounds to 1 in float32.
    logits = torch.tensor([20.0, 0.0])
    assert probabilities(logits, temperature=1.0, top_p=1.0)[1] == logits.softmax(-1)[1] > 0


def test_filter_defaults_are_the_identity_and_temperature_zero_is_refused():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert torch.equal(filter_logits(logits), logits)
    torch.testing.assert_close(probabilities(logits), logits.softmax(-1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        filter_logits(logits, temperature=0.0)


def test_top_k_then_top_p():
    # top-k 4 leaves ids 1, 3, 5, 7; top-p then takes the nucleus of those four renormalised.
    probs = probabilities(LOGITS, temperature=1.0, top_k=4, top_p=0.6)
    assert (probs > 0).nonzero().view(-1).tolist() == [1, 3]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_temperature_is_applied_before_top_p_by_hand():
    # Logits [2, 1, 0, -1] at T = 0.5 are [4, 2, 0, -2]: probabilities 0.865, 0.117, 0.016, 0.002,
    # so the 0.9 nucleus is {0, 1}, renormalised to softmax([4, 2]) = (sigmoid(2), 1 - sigmoid(2)).
    # Filtered at T = 1 first (0.644, 0.237, 0.087, 0.032) the nucleus would be {0, 1, 2}.
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    kept = 1 / (1 + math.exp(-2.0))
    expected = torch.tensor([kept, 1 - kept, 0.0, 0.0])
    torch.testing.assert_close(probabilities(logits, temperature=0.5, top_p=0.9), expected)
    # The sampler draws from that distribution: token 2 never (it would come ~64 times in 4000
    # draws from the wrong nucleus), token 0 within 4 standard errors of sigmoid(2).
    drawn = draws(logits, temperature=0.5, top_p=0.9)
    assert set(drawn.tolist()) == {0, 1}
    assert abs(float((drawn == 0).float().mean()) - kept) < 4 * math.sqrt(kept * (1 - kept) / N_DRAWS)


def test_padded_vocab_ids_never_sampled():
    logits = LOGITS.clone()
    logits[6:] = 50.0  # ids 6 and 7 are padding, and by far the most likely
    assert set(draws(logits, temperature=2.0, vocab_size=6).tolist()) <= set(range(6))
    assert int(sample(logits[None], vocab_size=6)) == 1  # greedy too
    assert torch.equal(torch.isfinite(mask_padded_vocab(logits, 6)), torch.arange(8) < 6)


def test_generate_never_emits_padded_vocab_ids():
    model = build(make_cfg())
    with torch.no_grad():  # make the padded rows of the tied embedding win every argmax
        model.embed.weight[VOCAB:] = 5.0
    prompts = random_prompts([4, 4], seed=6)
    out = generate(model, prompts, 20, temperature=1.0, generator=seeded(0))
    assert max(max(row) for row in out) < VOCAB
    # Sanity: without the mask, those ids are produced.
    unmasked = generate(model, prompts, 20, temperature=1.0, generator=seeded(0), vocab_size=64)
    assert max(max(row) for row in unmasked) >= VOCAB


def test_seeded_sampling_is_reproducible():
    model = build(make_cfg())
    prompts = random_prompts([3, 5], seed=7)
    kw = dict(temperature=1.0, top_k=20, top_p=0.95)
    a = generate(model, prompts, 15, generator=seeded(42), **kw)
    assert a == generate(model, prompts, 15, generator=seeded(42), **kw)
    assert a != generate(model, prompts, 15, generator=seeded(43), **kw)


# --------------------------------------------------------------------------------------------
# Stopping and streaming
# --------------------------------------------------------------------------------------------


def cut_after(tokens: list[int], stop: list[int]) -> list[int]:
    """Tokens up to and including the first occurrence of `stop`."""
    for end in range(len(stop), len(tokens) + 1):
        if tokens[end - len(stop) : end] == stop:
            return tokens[:end]
    return tokens


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "nocache"])
def test_eos_stops_only_its_row(use_cache):
    model = build(make_cfg())
    prompts = random_prompts([4, 6, 5], seed=8)
    kw = dict(temperature=1.0, use_cache=use_cache)
    free = generate(model, prompts, 16, generator=seeded(1), **kw)
    eos = next(t for t in free[0][1:] if t not in free[0][:1] and t not in free[1])  # ends row 0 early
    out = generate(model, prompts, 16, generator=seeded(1), eos_id=eos, **kw)
    assert out == [cut_after(row, [eos]) for row in free]
    assert out[0][-1] == eos and len(out[0]) < 16  # stopped, EOS included
    assert out[1] == free[1] and len(out[1]) == 16  # untouched by row 0 stopping


def test_stop_sequences():
    model = build(make_cfg())
    prompts = random_prompts([4, 6], seed=9)
    kw = dict(temperature=1.0)
    free = generate(model, prompts, 16, generator=seeded(2), **kw)
    stop = free[1][5:7]
    never = [VOCAB - 1, VOCAB - 1, VOCAB - 1]  # too unlikely to match by chance
    out = generate(model, prompts, 16, generator=seeded(2), stop_sequences=[never, stop], **kw)
    assert out == [cut_after(row, stop) for row in free]
    assert out[1][-2:] == stop and len(out[1]) <= 7


def test_stream_sees_every_token_in_order():
    model = build(make_cfg())
    prompts = random_prompts([3, 5], seed=10)
    seen: list[tuple[int, int]] = []
    out = generate(model, prompts, 8, stream=lambda row, token: seen.append((row, token)))
    for row in range(2):
        assert [t for r, t in seen if r == row] == out[row]


# --------------------------------------------------------------------------------------------
# Position limits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_absolute_positions_past_max_seq_len_raise(kind):
    model = build(make_cfg(kind, max_seq_len=16))
    draft = build(make_cfg(kind, max_seq_len=16), seed=1)
    prompt = list(range(10))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate(model, [prompt], 7)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        beam_search(model, prompt, 2, 7)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        speculative_generate(model, draft, prompt, 7)
    assert len(generate(model, [prompt], 6)[0]) == 6  # exactly max_seq_len tokens is fine


def test_rope_has_no_length_limit():
    model = build(make_cfg("rope", max_seq_len=16))
    assert len(generate(model, [list(range(10))], 20)[0]) == 20


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------


def sequence_log_prob(model: Transformer, prompt: list[int], new: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1]
    log_probs = mask_padded_vocab(logits, VOCAB).log_softmax(-1)
    return log_probs.gather(-1, torch.tensor(new)[:, None]).sum().item()


@pytest.mark.parametrize("kind", ["rope", "alibi", "learned"])
def test_beam_width_one_is_greedy(kind):
    model = build(make_cfg(kind, 2))
    for prompt in random_prompts([3, 6], seed=11):
        assert beam_search(model, prompt, 1, 12) == generate(model, [prompt], 12)[0]


def test_beam_search_scores_at_least_greedy():
    model = build(make_cfg("rope", init_std=0.1))  # flatter logits: greedy is often not optimal
    better = 0
    for prompt in random_prompts([3, 4, 5, 6], seed=12):
        greedy = sequence_log_prob(model, prompt, generate(model, [prompt], 8)[0])
        beam = sequence_log_prob(model, prompt, beam_search(model, prompt, 4, 8))
        assert beam >= greedy - 1e-5
        better += beam > greedy + 1e-4
    assert better > 0  # sanity: beam search does find better sequences


def test_exhaustive_beam_search_finds_the_most_likely_sequence():
    """A beam as wide as vocab^(n-1) keeps every prefix, so it must return the argmax over all
    vocab^n sequences (brute force, full forwards). Catches stale cache rows after reordering."""
    vocab, n = 8, 3
    model = build(make_cfg("rope", 2, vocab_size=vocab, pad_vocab_to=8))
    prompt = [1, 5, 2]
    every = torch.cartesian_prod(*[torch.arange(vocab)] * n)  # (vocab^n, n)
    with torch.no_grad():
        logits = model(torch.cat([torch.tensor(prompt).expand(len(every), -1), every], dim=1))
    log_probs = logits[:, len(prompt) - 1 : -1].log_softmax(-1).gather(-1, every[..., None]).sum((1, 2))
    best = every[log_probs.argmax()].tolist()
    assert beam_search(model, prompt, vocab ** (n - 1), n) == best
    assert generate(model, [prompt], n)[0] != best  # sanity: greedy misses it


def bigram(probs: list[list[float]]) -> Transformer:
    """A model whose next-token distribution is probs[last token]: blocks that add nothing to the
    residual, a one-hot embedding, and a head that maps the normed one-hot to the log-probs."""
    vocab = len(probs)
    model = build(make_cfg("rope", vocab_size=vocab, pad_vocab_to=vocab, tie_embeddings=False))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.weight.zero_()
            block.mlp.down.weight.zero_()
        model.embed.weight.zero_()
        model.embed.weight[:, :vocab] = torch.eye(vocab)
        scale = (1 / model.cfg.d_model + model.cfg.norm_eps) ** -0.5  # RMSNorm of a one-hot row
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :vocab] = torch.tensor(probs).log().T / scale
    return model


def test_beam_search_returns_only_finished_hypotheses():
    """Hand-computed, as transformers' early_stopping=True does it. Width 2, EOS=0, prompt [1]:
    step 1 finishes [0] (log 0.5 = -0.693) and keeps [2] (log 0.4) and [3]; step 2's best are
    [2, 3] (-1.609) and [2, 0] (-1.833), so a second hypothesis finishes and the search stops.
    With length_penalty 2 the running [2, 3] would score -1.609 / 2^2 = -0.402, above
    [2, 0]'s -0.458, but it never finished: [2, 0] wins. At max_new_tokens=2 the step's two best
    both finish, EOS or not, and [2, 3] wins."""
    uniform = [1 / 8] * 8
    model = bigram([uniform,
                    [.5, .01, .4, .03, .025, .02, .01, .005],  # after 1: EOS, or 2
                    [.4, .01, .01, .5, .03, .025, .015, .01],  # after 2: 3, or EOS
                    *[uniform] * 5])
    assert model(torch.tensor([[1, 2]]))[0].log_softmax(-1).exp()[:, 0].tolist() == pytest.approx([.5, .4])
    assert beam_search(model, [1], 2, 5, eos_id=0, length_penalty=2.0) == [2, 0]
    assert beam_search(model, [1], 2, 2, eos_id=0, length_penalty=2.0) == [2, 3]
    assert beam_search(model, [1], 2, 5, eos_id=0, length_penalty=1.0) == [0]  # -0.693 > -1.833 / 2
    assert beam_search(model, [1], 2, 5, eos_id=0, length_penalty=0.0) == [0]


def test_beam_search_eos():
    model = build(make_cfg("rope"))
    prompt = random_prompts([4], seed=13)[0]
    free = beam_search(model, prompt, 3, 10)
    eos = free[2]
    out = beam_search(model, prompt, 3, 10, eos_id=eos)
    assert eos not in out[:-1]
    assert out[-1] == eos or len(out) == 10


# --------------------------------------------------------------------------------------------
# Speculative decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("kind", ["rope", "learned", "alibi"])
def test_speculative_greedy_is_target_greedy(kind, k):
    target = build(make_cfg(kind, 2))
    draft = build(make_cfg(kind, 1, n_layers=1), seed=1)  # a different, smaller random model
    for prompt in random_prompts([1, 5], seed=14):
        tokens, stats = speculative_generate(target, draft, prompt, 20, k=k, temperature=0.0)
        assert tokens == generate(target, [prompt], 20)[0]
        assert stats.drafted > 0 and stats.acceptance_rate < 1.0  # sanity: rejections happened


def test_speculative_with_itself_accepts_everything():
    model = build(make_cfg("rope"))
    prompt = random_prompts([5], seed=15)[0]
    tokens, stats = speculative_generate(model, model, prompt, 30, k=4, temperature=1.0, generator=seeded(0))
    assert len(tokens) == 30
    assert stats.acceptance_rate == 1.0
    assert stats.rounds == 6  # 4 drafts + 1 bonus token per target pass


def test_speculative_eos():
    target, draft = build(make_cfg()), build(make_cfg(), seed=1)
    prompt = random_prompts([4], seed=16)[0]
    free, _ = speculative_generate(target, draft, prompt, 12, temperature=0.0)
    out, _ = speculative_generate(target, draft, prompt, 12, temperature=0.0, eos_id=free[3])
    assert out == cut_after(free, [free[3]])


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a - b).abs().sum().item()


def test_acceptance_rule_samples_the_target_distribution():
    """The rejection step alone, on fixed p and q: its output is distributed as p."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.3])
    g, counts = seeded(0), torch.zeros(5)
    for _ in range(20000):
        x = int(torch.multinomial(q, 1, generator=g))
        ok, other = accept_or_resample(p, q, x, g)
        counts[x if ok else other] += 1
    assert counts[4] == 0  # p(4) = 0: never produced
    assert total_variation(counts / counts.sum(), p) < 0.015  # sampling noise ~0.005
    assert total_variation(q, p) > 0.3  # sanity: returning the draft would fail


def test_speculative_sampling_matches_target_distribution():
    """Thousands of seeded 2-token generations from one prompt: both tokens' distributions match
    the target's, though the draft's differs a lot. Tolerance: total variation 0.05, where 8-way
    sampling noise at 2500 draws is ~0.02."""
    vocab = 8
    cfg = dict(vocab_size=vocab, pad_vocab_to=8, init_std=0.5)
    target = build(make_cfg("rope", **cfg))
    draft = build(make_cfg("rope", n_layers=1, **cfg), seed=3)
    prompt = [1, 5, 2]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
        # The second token's marginal: sum over the first token a of p(a) p(b | a).
        after = target(torch.tensor([prompt + [a] for a in range(vocab)]))[:, -1].softmax(-1)
        p2 = p1 @ after
    assert total_variation(p1, q1) > 0.2  # sanity: the draft alone would fail the test
    g, n = seeded(0), 2500
    counts = torch.zeros(2, vocab)
    accepted = drafted = 0
    for _ in range(n):
        tokens, stats = speculative_generate(target, draft, prompt, 2, k=2, temperature=1.0, generator=g)
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert total_variation(counts[0] / n, p1) < 0.05
    assert total_variation(counts[1] / n, p2) < 0.05
    assert 0.1 < accepted / drafted < 0.95  # both branches (accept and resample) were exercised
