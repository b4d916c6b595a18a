"""Beam search (`llm.generate.beam_search`) against transformers' `generate(num_beams=W,
do_sample=False, early_stopping=True)` on the same weights: tiny random transformers models,
imported with `llm.interop.import_hf`, many random prompts, beam widths 1-4, length penalties 0, 1
and 2, and an EOS that competes (a 12-token vocabulary, EOS one of the four likeliest first
tokens), so that about half the answers end on EOS and half run to max_new_tokens."""

from __future__ import annotations

import logging
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub
transformers = pytest.importorskip("transformers", reason="the reference beam search is transformers' generate")
pytest.importorskip("safetensors", reason="import_hf reads the safetensors that save_pretrained writes")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from llm.generate import beam_search  # noqa: E402
from llm.interop import import_hf  # noqa: E402

log = logging.getLogger(__name__)
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU

VOCAB = 12  # small, so that EOS is often among the best candidates
PENALTIES = (0.0, 1.0, 2.0)


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # no generation-flag notices for num_beams=1
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(verbosity)
    transformers.logging.enable_progress_bar()


def imported(hf: torch.nn.Module, folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, theirs): the transformers model and ours imported from its save_pretrained folder."""
    hf.eval().save_pretrained(folder)
    ours, _ = import_hf(folder)
    return ours.eval(), hf


def llama(folder, std: float, tied: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return imported(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=std, tie_word_embeddings=tied,
    )), folder)


def gpt2(folder, std: float, seed: int = 0):
    torch.manual_seed(seed)
    return imported(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                               initializer_range=std)), folder)


def cases(model: torch.nn.Module, n: int, seed: int) -> list[tuple[list[int], int, float, int, int]]:
    """n (prompt, beam_width, length_penalty, max_new_tokens, eos_id), every width with every
    penalty in turn. EOS is one of the four likeliest first tokens: it competes from the start."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        with torch.no_grad():
            likeliest = model(torch.tensor([prompt]))[0, -1, :VOCAB].topk(4).indices.tolist()
        out.append((prompt, 1 + i % 4, PENALTIES[i // 4 % 3], rng.randint(2, 10), rng.choice(likeliest)))
    return out


def reference(hf: torch.nn.Module, prompt: list[int], width: int, penalty: float, new: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, do_sample=False,
                      early_stopping=True, length_penalty=penalty, max_new_tokens=new, eos_token_id=eos,
                      pad_token_id=eos, num_return_sequences=1)
    return out[0, len(prompt):].tolist()


def compare(ours, hf, n: int, seed: int) -> tuple[int, int, list]:
    """(cases that agree, of those how many end on EOS, the cases that differ)."""
    agree, on_eos, differ = 0, 0, []
    for prompt, width, penalty, new, eos in cases(ours, n, seed):
        theirs = reference(hf, prompt, width, penalty, new, eos)
        mine = beam_search(ours, prompt, width, new, eos_id=eos, length_penalty=penalty, vocab_size=VOCAB)
        if mine == theirs:
            agree += 1
            on_eos += theirs[-1] == eos
        else:
            differ.append(dict(prompt=prompt, beam_width=width, length_penalty=penalty, max_new_tokens=new,
                               eos=eos, ours=mine, transformers=theirs))
    return agree, on_eos, differ


def check(ours, hf, n: int, seed: int) -> int:
    agree, on_eos, differ = compare(ours, hf, n, seed)
    log.info(f"beam search: {agree}/{n} cases agree with transformers, {on_eos} of them end on EOS")
    assert not differ, f"{len(differ)} of {n} differ, e.g. {differ[:3]}"
    # Both endings are exercised: EOS finishing hypotheses, and the max_new_tokens cut.
    assert 0.25 * n <= on_eos <= 0.75 * n, on_eos
    return agree


def test_beam_search_matches_transformers(tmp_path):
    """48 cases (~1 s): every width 1-4 with every length penalty, four times."""
    ours, hf = llama(tmp_path / "llama", std=0.3)
    assert check(ours, hf, 48, seed=0) == 48


@pytest.mark.slow
def test_beam_search_matches_transformers_many(tmp_path):
    """600 cases on three models: peaked and flat logits, tied embeddings, GPT-2's layout."""
    models = [llama(tmp_path / "a", std=0.3, seed=1), llama(tmp_path / "b", std=1.0, tied=True, seed=2),
              gpt2(tmp_path / "c", std=0.3, seed=3)]
    assert sum(check(ours, hf, 200, seed=seed) for seed, (ours, hf) in enumerate(models, start=1)) == 600
