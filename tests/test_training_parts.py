"""The pieces a training step is made of: schedules, optimizer groups, activation checkpointing,
precision, and the benchmark entry point."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm.model import ModelConfig, Transformer
from llm.parallel import Single
from llm.stages.optim import build_optimizer, param_groups
from llm.stages.pretrain import next_token_loss
from llm.stages.schedule import WSD, Constant, Cosine
from tests.conftest import TINY_RUN, compose_train, run_cli

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def tiny(**kw) -> ModelConfig:
    return ModelConfig(n_layers=3, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32, **kw)


def test_cosine_warms_up_then_decays_to_the_floor():
    s = Cosine(warmup=10, min_lr_ratio=0.1)
    assert s(0, 100) == pytest.approx(0.1) and s(9, 100) == pytest.approx(1.0)
    assert s(10, 100) == pytest.approx(1.0)
    assert s(55, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(100, 100) == pytest.approx(0.1)
    values = [s(i, 100) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_flat_then_decays_over_its_last_fraction():
    s = WSD(warmup=0.1, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [s(i, 100) for i in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert s(90, 100) == pytest.approx(0.5) and s(100, 100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="decay_shape='cubic'"):
        WSD(decay_shape="cubic")
    assert Constant(warmup=0.0)(0, 10) == 1.0


def test_wsd_branch_points_by_hand():
    """Each branch leaves the stable phase decay_fraction of its length before its own end."""
    s = WSD(decay_fraction=0.2, branches=[0.5, 0.25, 0.004])
    # sorted: 0.004 of 100 rounds to 0 steps, so that branch ends after step 1 with no decay phase
    assert s.branch_points(100) == [(1, 1), (25 - 5, 25), (50 - 10, 50)]
    assert s.branch_points(1000) == [(4, 4), (250 - 50, 250), (500 - 100, 500)]


def test_weight_decay_only_on_matrices_not_embeddings_norms_or_biases():
    model = Transformer(tiny(bias=True, norm="layernorm", tie_embeddings=False, position=__import__(
        "llm.model", fromlist=["PositionConfig"]).PositionConfig(kind="learned")))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "lm_head.weight" in decayed and "blocks.0.attn.q.weight" in decayed
    assert not any("embed" in n or "norm" in n or n.endswith("bias") or "position" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_tied_embedding_appears_once_in_the_optimizer():
    model = Transformer(tiny())
    opt = build_optimizer(lambda groups, **kw: torch.optim.AdamW(groups, **kw), model)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["full", "every_n"])
def test_activation_checkpointing_gives_identical_gradients(mode):
    torch.manual_seed(0)
    plain = Transformer(tiny())
    wrapped = Transformer(tiny())
    wrapped.load_state_dict(plain.state_dict())
    Single(activation_checkpointing=mode, checkpoint_every_n=2).parallelize(wrapped)
    wrapped_blocks = [type(b).__name__ for b in wrapped.blocks]
    assert wrapped_blocks.count("CheckpointWrapper") == (3 if mode == "full" else 2)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    tokens = torch.randint(0, 64, (2, 17))
    for model in (plain, wrapped):
        next_token_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in wrapped.named_parameters():
        assert torch.allclose(p.grad, grads[n.replace("._checkpoint_wrapped_module.", ".")], atol=1e-6), n


def test_unknown_activation_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing='some'.*none, full, every_n"):
        Single(activation_checkpointing="some")


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    from llm.train import train

    cfg = compose_train([*TINY_RUN, "trainer.precision=bf16-mixed", "budget.steps=20", "trainer.val_every=10"], tmp_path)
    summary = train(cfg)
    assert summary["status"] == "completed" and math.isfinite(summary["val/loss"])
    assert summary["val/loss"] < math.log(512)


def test_llm_bench_compares_framework_with_bare_loop(tmp_path):
    result = run_cli(["model=nano", "data.seq_len=32", "data.micro_batch_size=4", "bench.steps=3", "bench.warmup=1",
                      "bench.repeats=1", f"paths.runs_dir={tmp_path}/runs"], cwd=tmp_path, command="bench")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio framework / bare" in result.stdout
    (bench_json,) = (tmp_path / "runs" / "bench").glob("*/bench.json")
    figures = json.loads(bench_json.read_text())
    assert figures["bare_tokens_per_s"] > 0 and figures["framework_tokens_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["framework_tokens_per_s"] / figures["bare_tokens_per_s"])
    assert figures["tokens_per_step"] == 4 * 32


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "flex"])
def test_gpu_attention_kernels_match_sdpa(kernel):
    torch.manual_seed(0)
    ref = Transformer(tiny()).cuda().to(torch.bfloat16)
    fast = Transformer(tiny(attention=__import__("llm.model", fromlist=["AttentionConfig"]).AttentionConfig(kernel=kernel)))
    fast = fast.cuda().to(torch.bfloat16)
    fast.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 64, (2, 32), device="cuda")
    assert torch.allclose(ref(tokens).float(), fast(tokens).float(), atol=3e-2)


@CUDA
@pytest.mark.gpu
def test_bf16_mixed_trains_on_gpu(tmp_path):
    from llm.train import train

    cfg = compose_train([*TINY_RUN, "trainer=gpu", "budget.steps=20", "trainer.val_every=10"], tmp_path)
    assert train(cfg)["status"] == "completed"


@pytest.mark.slow  # four 2-process runs; llm-bench's step benchmark runs in CI (test_llm_bench_compares_...)
def test_llm_bench_parallel_compares_options_with_single(tmp_path):
    result = run_cli([*TINY_RUN, "bench.parallel=[ddp]", "bench.steps=4", "bench.warmup=1",
                      f"paths.runs_dir={tmp_path}/runs"], cwd=tmp_path, command="bench", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (tmp_path / "runs" / "bench").glob("*/bench_parallel.json")
    rows = json.loads(out.read_text())
    assert [r["option"] for r in rows] == ["single", "ddp"] and rows[1]["ranks"] == 2
    assert rows[0]["vs_single"] == 1.0 and rows[1]["tokens_per_s"] > 0
