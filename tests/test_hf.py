"""Hugging Face transformers interop (`llm.interop`, `llm-hf`): exported folders load in
transformers with the same logits, imports round-trip, tokenizers agree, and what transformers
cannot represent is refused by name. Tiny random models built here; nothing comes from the Hub."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, replace

import pytest
import tokenizers
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, whatever a test does
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import (  # noqa: E402
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llm.checkpoint import load_network  # noqa: E402
from llm.cli.hf import main as llm_hf  # noqa: E402
from llm.config import ConfigError  # noqa: E402
from llm.generate import generate  # noqa: E402
from llm.interop import export_checkpoint, export_hf, import_hf  # noqa: E402
from llm.interop.hf_tokenizer import read_tokenizer  # noqa: E402
from llm.model import AttentionConfig, ModelConfig, PositionConfig, Transformer  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402
from llm.tokenizer.kinds import train_bpe  # noqa: E402

TEXT = "def greet(name):\n    return f'hello {name}!'  # ☃ héllo\n\n\tprint(greet('world'))  "


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    """Tiny tensors: one thread is as fast and far steadier on a shared 2-core machine."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # no "Loading weights" bars or init notices
    transformers.logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)
    transformers.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [TEXT * 3, "hello world, hello there. " * 20, "for i in range(10):\n    print(i)\n" * 10]
    return Tokenizer(train_bpe(texts, vocab_size=300, min_frequency=2))


def llama_cfg(**kw) -> ModelConfig:
    # vocab 100 pads to 128: the padded rows are exported too. init_std 0.1 makes logits spread
    # widely, so agreement to 1e-4 means something.
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=100, max_seq_len=64, init_std=0.1)
    return ModelConfig(**{**base, **kw})


def gpt2_cfg(**kw) -> ModelConfig:
    base = dict(position=PositionConfig(kind="learned"), norm="layernorm", mlp="gelu", bias=True,
                attention=AttentionConfig(bias=True))
    return llama_cfg(**{**base, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1 and 0: randomise them, or they test nothing
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(n: int = 24, vocab: int = 100, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: Transformer, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = ours(x), theirs(x).logits
    assert got.shape == expected.shape
    assert expected.std() > 0.5  # a meaningful comparison, not two near-constant outputs
    torch.testing.assert_close(got, expected, atol=4e-6, rtol=0)  # float32 rounding: 5e-7 measured here


LLAMA_VARIANTS = {
    "mha-tied": llama_cfg(),
    "gqa-untied": llama_cfg(attention=AttentionConfig(n_kv_heads=2), tie_embeddings=False),
    "mqa-tied": llama_cfg(attention=AttentionConfig(n_kv_heads=1)),
    "gqa-attn-and-mlp-bias": llama_cfg(attention=AttentionConfig(n_kv_heads=2, bias=True), bias=True),
    # head_dim 16 != d_model / n_heads = 8, and a non-default RoPE base
    "head-dim-16": llama_cfg(head_dim=16, attention=AttentionConfig(n_kv_heads=2),
                             position=PositionConfig(rope_base=500.0)),
}


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_export_matches_transformers(variant, tmp_path):
    model = build(LLAMA_VARIANTS[variant])
    folder = export_hf(model, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    assert hf.config.num_key_value_heads == model.cfg.kv_heads
    assert hf.config.head_dim == model.cfg.head_size
    assert hf.config.vocab_size == model.cfg.padded_vocab_size == 128
    assert_same_logits(model, hf, tokens())


GPT2_VARIANTS = {
    "gelu-tied": gpt2_cfg(),
    "gelu-untied": gpt2_cfg(tie_embeddings=False),
    "relu": gpt2_cfg(mlp="relu"),
    "gelu-tanh": gpt2_cfg(mlp="gelu_tanh"),  # real GPT-2's "gelu_new"
    "no-biases": gpt2_cfg(bias=False, attention=AttentionConfig(bias=False)),  # exported as zero biases
}


@pytest.mark.parametrize("variant", list(GPT2_VARIANTS))
def test_gpt2_export_matches_transformers(variant, tmp_path):
    model = build(GPT2_VARIANTS[variant])
    folder = export_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    # exact GELU is "gelu", the tanh approximation GPT-2's own "gelu_new"
    assert hf.config.activation_function == {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[model.cfg.mlp]
    assert_same_logits(model, hf, tokens())


@pytest.mark.parametrize("cfg", [llama_cfg(attention=AttentionConfig(n_kv_heads=2), bias=True), gpt2_cfg()],
                         ids=["llama", "gpt2"])
def test_import_round_trip(cfg, tokenizer, tmp_path):
    model = build(replace(cfg, vocab_size=tokenizer.vocab_size))
    back, tok = import_hf(export_hf(model, tmp_path / "hf", tokenizer))
    assert back.cfg == model.cfg  # vocab_size comes back from the tokenizer, padding from the rows
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = tokens(vocab=tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))
    assert tok.content_hash() == tokenizer.content_hash()


def test_tokenizer_loads_in_auto_tokenizer(tokenizer, tmp_path):
    model = build(llama_cfg(vocab_size=tokenizer.vocab_size))
    folder = export_hf(model, tmp_path / "hf", tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    assert hf_tok(TEXT)["input_ids"] == tokenizer.encode(TEXT)  # no BOS/EOS added, as ours
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert hf_tok.decode(tokenizer.encode(TEXT), skip_special_tokens=True) == TEXT
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def test_greedy_generate_matches_transformers(tmp_path):
    model = build(llama_cfg(vocab_size=128, attention=AttentionConfig(n_kv_heads=2)))
    hf = LlamaForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf")).eval()
    assert_same_greedy_tokens(model, hf)


def assert_same_greedy_tokens(model: Transformer, hf: torch.nn.Module) -> None:
    """20 greedy tokens for two prompts of different lengths (left padding on both sides) agree."""
    prompts = [[5, 17, 99, 3, 42, 8], [7, 1, 64]]  # different lengths: left padding on both sides
    ours = generate(model, prompts, 20, use_cache=True, pad_id=0)
    padded = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        out = hf.generate(padded, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                          use_cache=True, pad_token_id=0, eos_token_id=None)
    assert out[:, 6:].tolist() == ours
    assert len(set(ours[0])) > 1  # not a degenerate repeat of one token


@pytest.mark.parametrize(
    "cfg, feature",
    [
        (llama_cfg(position=PositionConfig(kind="alibi")), "ALiBi positions"),
        (llama_cfg(attention=AttentionConfig(window=16)), "sliding window"),
        (llama_cfg(norm_placement="post"), "post-norm"),
        (llama_cfg(mlp="relu"), "ReLU MLP"),
        (gpt2_cfg(attention=AttentionConfig(n_kv_heads=2, bias=True)), "GQA (n_kv_heads=2) with learned positions"),
        (gpt2_cfg(norm="rmsnorm"), "RMSNorm"),
        (llama_cfg(norm="layernorm"), "LayerNorm"),
        (llama_cfg(position=PositionConfig(kind="sinusoidal")), "sinusoidal positions"),
    ],
    ids=["alibi", "window", "post-norm", "relu", "gqa-learned", "gpt2-rmsnorm", "llama-layernorm", "sinusoidal"],
)
def test_unsupported_features_are_named(cfg, feature, tmp_path):
    with pytest.raises(ValueError, match=re.escape(feature)):
        export_hf(build(cfg), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_family_argument(tmp_path):
    with pytest.raises(ValueError, match=re.escape("RoPE positions (the GPT-2 family uses learned positions)")):
        export_hf(build(llama_cfg()), tmp_path / "a", family="gpt2")
    with pytest.raises(ValueError, match="unknown family"):
        export_hf(build(llama_cfg()), tmp_path / "b", family="mistral")


@pytest.mark.parametrize(
    "family, edit, key",
    [
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
        ("llama", {"model_type": "mistral"}, "model_type"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("gpt2", {"activation_function": "quick_gelu"}, "activation_function"),
    ],
)
def test_import_refuses_unsupported_configs(family, edit, key, tmp_path):
    cfg = llama_cfg() if family == "llama" else gpt2_cfg()
    folder = export_hf(build(cfg), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=key):
        import_hf(folder)


def test_import_folders_written_by_transformers(tmp_path):
    """Not only our own exports: folders that transformers' save_pretrained writes (sharded
    safetensors), and a plain pytorch_model.bin."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
        tie_word_embeddings=False,
    )).eval()
    llama.save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    ours, tok = import_hf(tmp_path / "llama")
    assert tok is None and ours.cfg.mlp_hidden == 80 and ours.cfg.padded_vocab_size == 96
    assert_same_logits(ours.eval(), llama, tokens(vocab=96))

    # GPT2Config's default activation, as in every real GPT-2 checkpoint: "gelu_new" (tanh GELU).
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      initializer_range=0.1)).eval()
    assert gpt2.config.activation_function == "gelu_new"
    (tmp_path / "gpt2").mkdir()
    gpt2.config.save_pretrained(tmp_path / "gpt2")
    torch.save(gpt2.state_dict(), tmp_path / "gpt2" / "pytorch_model.bin")
    ours, _ = import_hf(tmp_path / "gpt2")
    assert ours.cfg.mlp == "gelu_tanh"
    assert_same_logits(ours.eval(), gpt2, tokens(vocab=96))
    ours.blocks[0].mlp.activation = torch.nn.functional.gelu  # the exact GELU is measurably another model
    with torch.no_grad():
        assert (ours(tokens(vocab=96)) - gpt2(tokens(vocab=96)).logits).abs().max() > 1e-4


def hf_style_tokenizer(specials: list[str]) -> tokenizers.Tokenizer:
    """A byte-level BPE with another library's special tokens (none of ours)."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT * 5], trainer)
    return backend


def test_import_maps_hf_special_tokens(tmp_path):
    """Llama-style <s>/</s> become our BOS/EOS (same ids); PAD, absent, is appended, and the
    embedding grows by a row without changing any other logit."""
    backend = hf_style_tokenizer(["<unk>", "<s>", "</s>"])
    size = backend.get_vocab_size()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, initializer_range=0.1, tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "hf")
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours, tok = import_hf(tmp_path / "hf")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, size)
    assert tok.encode(TEXT) == backend.encode(TEXT, add_special_tokens=False).ids
    assert ours.cfg.vocab_size == size + 1 and ours.embed.weight.shape[0] >= size + 1
    x = tokens(vocab=size)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x)[..., :size], hf(x).logits, atol=4e-6, rtol=0)


def test_import_gpt2_style_shared_bos_eos(tmp_path):
    """GPT-2 names <|endoftext|> for both BOS and EOS: it becomes our EOS, BOS and PAD are new."""
    backend = hf_style_tokenizer(["<|endoftext|>"])
    folder = tmp_path / "hf"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                                "eos_token": "<|endoftext|>"}))
    tok = read_tokenizer(folder, {})
    size = backend.get_vocab_size()
    assert tok.eos_id == 0 and {tok.bos_id, tok.pad_id} == {size, size + 1}
    assert tok.backend.token_to_id("<|endoftext|>") is None


def lightning_like_checkpoint(model: Transformer, path) -> None:
    """What a training run saves, as far as load_network reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "llm": {"model_config": asdict(model.cfg)}, "global_step": 7}, path)


def test_cli_export_import_round_trip(tokenizer, tmp_path, capsys):
    model = build(llama_cfg(vocab_size=tokenizer.vocab_size, attention=AttentionConfig(n_kv_heads=1)))
    run = tmp_path / "run"
    lightning_like_checkpoint(model, run / "checkpoints" / "last.ckpt")
    tokenizer.save(run / "tokenizer.json")

    llm_hf(["export", str(run), str(tmp_path / "hf")])
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXT)["input_ids"] == tokenizer.encode(TEXT)
    assert_same_logits(model, LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval(), tokens())

    llm_hf(["import", str(tmp_path / "hf"), str(tmp_path / "imported" / "model.ckpt")])
    back = load_network(tmp_path / "imported" / "model.ckpt")
    assert back.cfg == model.cfg
    x = tokens()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert Tokenizer.load(tmp_path / "imported" / "tokenizer.json").encode(TEXT) == tokenizer.encode(TEXT)

    # ... and the imported file exports again, finding the tokenizer beside it.
    llm_hf(["export", str(tmp_path / "imported" / "model.ckpt"), str(tmp_path / "hf2"), "--family", "llama"])
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()
    assert "exported ->" in capsys.readouterr().out


def test_export_checkpoint_errors(tmp_path):
    sharded = tmp_path / "run" / "checkpoints" / "last.ckpt"
    sharded.mkdir(parents=True)
    (sharded / "meta.pt").write_bytes(b"")  # a sharded checkpoint whose metadata is torn
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf")
    with pytest.raises(ConfigError, match="no such checkpoint file, run directory, or run id"):
        export_checkpoint(tmp_path / "missing", tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line and status 2, no traceback
        llm_hf(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
