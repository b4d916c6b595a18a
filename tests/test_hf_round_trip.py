"""The round trip a user makes with Hugging Face: a run exported, imported back, fine-tuned from
what the import wrote or from the transformers folder itself, exported again; a LoRA run's
adapters loaded by peft onto the exported base; what an exported folder carries for generation
(left padding, generation_config.json, the run's chat template). Logits are compared with
transformers', tokens with our generator. Tiny random models; nothing comes from the Hub."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from llm.checkpoint import load_network, load_parent  # noqa: E402
from llm.data.chat import read_chat_template  # noqa: E402
from llm.generate import generate  # noqa: E402
from llm.model import AttentionConfig, ModelConfig, Transformer  # noqa: E402
from llm.run.layout import CHAT_TEMPLATE_FILE  # noqa: E402
from llm.tokenizer import Tokenizer, build_tokenizer  # noqa: E402
from tests.conftest import llm_cli  # noqa: E402
from tests.test_posttrain import TINY, save_run  # noqa: E402

log = logging.getLogger(__name__)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return build_tokenizer(None, tmp_path_factory.mktemp("cache"), kind="byte")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer) -> Path:
    """A 'pretraining' run as llm-train leaves it: GQA Llama-family model, untied head."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, max_seq_len=64, tie_embeddings=False, init_std=0.1,
                      attention=AttentionConfig(n_kv_heads=2), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    return save_run(tmp_path_factory.mktemp("runs") / "base", Transformer(cfg), cfg, tokenizer, "pretrain")


def hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(x).logits


def our_logits(source: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_network(source)(x)


def cli(command: str, args: list[str], cwd: Path, monkeypatch, capsys) -> str:
    code, stderr = llm_cli(command, args, cwd, monkeypatch, capsys)
    assert code == 0, stderr[-3000:]
    return stderr


def sft(init_from: Path, run_dir: Path, monkeypatch, capsys, *extra: str) -> Path:
    cli("train", ["posttrain=sft", f"init_from={init_from}", *TINY, "budget.steps=2", "optim.lr=1e-2",
                  f"hydra.run.dir={run_dir}", *extra], run_dir.parent, monkeypatch, capsys)
    return run_dir


def test_export_import_init_from_export_keeps_the_logits(base_run, tokenizer, tmp_path, monkeypatch, capsys,
                                                         single_thread):
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    cli("hf", ["export", str(base_run), str(tmp_path / "hf")], tmp_path, monkeypatch, capsys)
    first = (hf_logits(tmp_path / "hf", x) - our_logits(base_run, x)).abs().max().item()
    cli("hf", ["import", str(tmp_path / "hf"), str(tmp_path / "imported" / "model.ckpt")], tmp_path, monkeypatch,
        capsys)

    # Fine-tuned from the folder llm-hf import wrote, and from the transformers folder itself.
    from_import = sft(tmp_path / "imported", tmp_path / "sft_import", monkeypatch, capsys)
    from_hf = sft(tmp_path / "hf", tmp_path / "sft_hf", monkeypatch, capsys)
    moved = (our_logits(from_hf, x) - our_logits(base_run, x)).abs().max().item()
    assert moved > 1e-2  # two real steps: the comparison below is not of two copies of the base
    # The same start, seed and data: the same model, whichever way the parent was given.
    assert torch.equal(our_logits(from_import, x), our_logits(from_hf, x))

    cli("hf", ["export", str(from_hf), str(tmp_path / "hf2")], tmp_path, monkeypatch, capsys)
    last = (hf_logits(tmp_path / "hf2", x) - our_logits(from_hf, x)).abs().max().item()
    log.warning(f"HF round trip: |logits diff| {first:.2e} after export, {last:.2e} after export -> import -> "
                f"init_from -> export (logits moved {moved:.2f} by fine-tuning)")
    assert first <= 1e-5 and last <= 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "hf2")("héllo")["input_ids"] == tokenizer.encode("héllo")


def test_a_lora_run_exports_a_peft_adapter_equal_to_its_merged_model(base_run, tmp_path, monkeypatch, capsys,
                                                                     single_thread):
    peft = pytest.importorskip("peft")
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    cli("hf", ["export", str(base_run), str(tmp_path / "base")], tmp_path, monkeypatch, capsys)
    run = sft(tmp_path / "base", tmp_path / "lora", monkeypatch, capsys, "posttrain.lora.enabled=true",
              "posttrain.lora.rank=4", "posttrain.lora.alpha=8", "posttrain.lora.targets=[q,v,mlp.down]")
    cli("hf", ["export", str(run), str(tmp_path / "out")], tmp_path, monkeypatch, capsys)
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    assert len(config["target_modules"]) == 6  # q, v and mlp.down of each of 2 layers

    merged = hf_logits(tmp_path / "out", x)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        before = base(x).logits
        adapted = peft.PeftModel.from_pretrained(base, adapter).eval()(x).logits
    assert (merged - before).abs().max() > 1e-2  # the adapters changed the model
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, our_logits(run, x), atol=1e-5, rtol=0)


def test_an_exported_folder_pads_left_stops_at_eos_and_keeps_the_chat_template(base_run, tokenizer, tmp_path,
                                                                               monkeypatch, capsys, single_thread):
    (base_run / CHAT_TEMPLATE_FILE).write_text(CHATML)  # as a post-training run on conversations leaves it
    try:
        cli("hf", ["export", str(base_run), str(tmp_path / "hf")], tmp_path, monkeypatch, capsys)
    finally:
        (base_run / CHAT_TEMPLATE_FILE).unlink()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == \
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"

    # Imported back, the template travels with the tokenizer (where posttrain.data.chat_template=tokenizer looks).
    cli("hf", ["import", str(tmp_path / "hf"), str(tmp_path / "imported" / "model.ckpt")], tmp_path, monkeypatch,
        capsys)
    assert (tmp_path / "imported" / CHAT_TEMPLATE_FILE).read_text() == CHATML
    # ... and so it does when the folder is init_from itself: beside the converted tokenizer.
    parent = load_parent(str(tmp_path / "hf"), tmp_path, cache_dir=tmp_path / "cache")
    assert read_chat_template(parent.tokenizer_path.parent) == CHATML

    generation = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (generation.eos_token_id, generation.pad_token_id, generation.do_sample) == (
        tokenizer.eos_id, tokenizer.pad_id, False)
    # The embedding's padding rows (259 tokens padded to 320) name no token: never generated.
    assert generation.suppress_tokens == list(range(tokenizer.vocab_size, 320))

    # Batched prompts of different lengths: padded on the left by the tokenizer itself, and
    # transformers' generate (settings from generation_config.json) gives our greedy tokens.
    prompts = ["def f(x):", "ab"]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    assert hf_tok.padding_side == "left" and batch["input_ids"][1, 0] == tokenizer.pad_id
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8)
    ours = generate(load_network(base_run), [tokenizer.encode(p) for p in prompts], 8, use_cache=True,
                    pad_id=tokenizer.pad_id)
    assert out[:, batch["input_ids"].shape[1]:].tolist() == ours
