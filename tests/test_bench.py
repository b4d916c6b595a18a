"""llm-bench against transformers (bench.peer=transformers: every ratio of issue 21 in one run),
MFU against Lightning's device peaks, the trainer=gpu preset and the bench=gpu MFU run.

Cheap: tiny shapes and one training step, on the CPU. The GPU-only checks are marked and skip
here with the reason."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from tests.conftest import compose_train, llm_cli

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

# A one-layer model for bench.peer_shape, and nano at 2 x 16 for the config's shape.
PEER_TINY = ["model=nano", "data.seq_len=16", "data.micro_batch_size=2", "bench.peer=transformers", "bench.steps=1",
             "bench.warmup=1", "bench.repeats=2", "bench.peer_shape.n_layers=1", "bench.peer_shape.d_model=32",
             "bench.peer_shape.n_heads=4", "bench.peer_shape.n_kv_heads=2", "bench.peer_shape.mlp_hidden=64",
             "bench.peer_shape.vocab_size=128", "bench.peer_shape.batch=2", "bench.peer_shape.seq_len=16",
             "bench.decode_tokens=4", "bench.decode_batches=[1,3]", "bench.prompt_len=5"]


# -- the ratio's arithmetic -------------------------------------------------------------------

def test_rates_put_ours_over_transformers():
    from llm.bench.hf import rates

    # ours took 1 s and transformers 2 s for the same 100 tokens: ours is twice as fast
    assert rates(100, 1.0, 2.0) == {"ours_tokens_per_s": 100.0, "hf_tokens_per_s": 50.0, "ratio": 2.0}
    assert rates(100, 4.0, 1.0)["ratio"] == 0.25


def test_first_mismatch_names_row_and_position():
    from llm.bench.hf import first_mismatch

    assert first_mismatch([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert first_mismatch([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == (1, 1)
    assert first_mismatch([[1, 2]], [[1, 2, 7]]) == (0, 2)  # a missing token counts
    assert first_mismatch([[1]], [[1], [2]]) == (1, 0)  # so does a missing row


def test_peer_table_marks_goals_and_differences():
    from llm.bench.hf import peer_table

    row = {"case": "decode b1", "shape": "s", "ours_tokens_per_s": 300.0, "hf_tokens_per_s": 100.0, "ratio": 3.0,
           "median_ratio": 2.5, "goal": 1.5, "met": True, "check": "tokens equal", "ok": True}
    slow = {**row, "ratio": 0.5, "met": False, "ok": False, "check": "tokens differ at row 0, position 3"}
    lines = peer_table([row, slow])
    assert lines[2] == "| decode b1 | s | 300 | 100 | **3.00x** (2.50x) | >= 1.5x | tokens equal |"
    assert "| **0.50x** (2.50x) | below 1.5x | tokens differ at row 0, position 3 (NOT the same) |" in lines[3]
    shown = peer_table([{**row, "goal": None, "met": None}])  # a row shown for context: no goal to meet
    assert "| **3.00x** (2.50x) | - | tokens equal |" in shown[2]


# -- where a training step's time goes (llm.bench.profile) --------------------------------------

def test_profiler_ops_fall_into_the_shared_categories_or_the_model_s_own():
    from llm.bench.profile import category

    assert category("aten::mm") == category("aten::addmm") == category("aten::bmm") == "matmuls"
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention kernel"
    assert category("aten::_log_softmax_backward_data") == category("aten::nll_loss_forward") == "loss"
    for own in ("aten::add", "aten::mul", "aten::cat", "autograd::engine::evaluate_function: MulBackward0"):
        assert category(own) == "model's other ops"


def test_step_split_counts_the_optimizer_once_and_the_model_s_own_ops_apart():
    from torch.profiler import record_function

    from llm.bench.profile import CATEGORIES, OPTIMIZER, bound, shared_ms, step_splits

    a, b, w = torch.randn(256, 256), torch.randn(256, 256), torch.randn(1024, 1024)

    def lean():
        a @ b
        with record_function(OPTIMIZER):  # elementwise ops inside the optimizer: its time, not the model's
            for _ in range(10):
                w.mul_(1.0)

    def heavy():  # the same, plus elementwise work of the model's own
        lean()
        x = a
        for _ in range(200):
            x = x * 1.0001

    splits = step_splits({"lean": lean, "heavy": heavy}, repeats=2)
    for split in splits.values():
        assert split["total"] == pytest.approx(sum(split[name] for name in CATEGORIES))
        assert split["matmuls"] > 0 and split[OPTIMIZER] > 0 and split["attention kernel"] == split["loss"] == 0
    assert splits["heavy"]["model's other ops"] > 5 * splits["lean"]["model's other ops"]
    assert splits["lean"]["model's other ops"] < 0.5 * splits["lean"][OPTIMIZER]  # its mul_s counted once
    assert shared_ms(splits["heavy"]) == pytest.approx(splits["heavy"]["total"] - splits["heavy"]["model's other ops"])
    # the bound: their whole step over our shared part (above 1: room to be faster)
    assert bound({"total": 100.0, "model's other ops": 20.0}, {"total": 100.0, "model's other ops": 20.0}) == 1.25
    assert bound({"total": 90.0, "model's other ops": 10.0}, {"total": 120.0, "model's other ops": 40.0}) == 1.5


def test_the_both_compiled_row_is_refused_when_transformers_cannot_compile_on_a_cpu(monkeypatch):
    pytest.importorskip("transformers")
    from transformers.generation import CompileConfig

    from llm.bench.hf import decode_vs_transformers
    from llm.model import ModelConfig, Transformer

    monkeypatch.delattr(CompileConfig, "_compile_all_devices")
    model = Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=64))
    with pytest.raises(ValueError, match="no compiled side to compare with"):
        decode_vs_transformers(model, None, new_tokens=2, compile=True, hf_compile=True)


# -- bench.peer=transformers end to end ---------------------------------------------------------

def test_peer_mode_prints_every_ratio_with_the_same_results(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", [*PEER_TINY, "bench.peer_compile=false", f"paths.runs_dir={tmp_path}/runs"],
                           tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    (out,) = (tmp_path / "runs" / "bench").glob("*/bench_peer.json")
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["train eager, bench.peer_shape", "train eager, model=nano",
                                         "decode eager b1, bench.peer_shape",
                                         "decode eager b3 left-padded, bench.peer_shape"]
    assert [r["shape"] for r in rows] == ["1L d32 4/2h ff64 V128, 2x16", "2L d64 4/4h ff192 V2048, 2x16",
                                          "1L d32 4/2h ff64 V128, 1x5+4", "1L d32 4/2h ff64 V128, 3x5+4"]
    assert [r["goal"] for r in rows] == [1.2, 1.2, 1.5, 1.5]
    # the same weights compute the same function: equal first losses, identical greedy tokens
    # (batch 3: prompts of 5, 4 and 3 tokens, left-padded on both sides)
    assert all(r["ok"] for r in rows), [r["check"] for r in rows]
    assert rows[3]["prompt_lens"] == [5, 4, 3]
    for r in rows:  # tokens/s from the best (shortest) round of each, and ours / theirs
        tokens = (r["steps"] * r["batch"] * r["seq_len"]) if "steps" in r else r["batch"] * r["new_tokens"]
        assert r["ours_tokens_per_s"] == pytest.approx(tokens / min(r["ours_seconds"]))
        assert r["hf_tokens_per_s"] == pytest.approx(tokens / min(r["hf_seconds"]))
        assert r["ratio"] == pytest.approx(min(r["hf_seconds"]) / min(r["ours_seconds"]))
        assert r["median_ratio"] == pytest.approx(statistics.median(r["hf_seconds"]) / statistics.median(r["ours_seconds"]))
        assert r["met"] == (r["ratio"] >= r["goal"])
        assert len(r["ours_seconds"]) == len(r["hf_seconds"]) == 2
    for r in rows[:2]:  # eager training rows: where the step goes, and the bound the shared part leaves
        ours, hf = r["split"]["ours"], r["split"]["hf"]
        assert r["bound"] == pytest.approx(hf["total"] / (ours["total"] - ours["model's other ops"]))
        assert ours["matmuls"] > 0 and ours["optimizer"] > 0 and ours["loss"] > 0
    assert "split" not in rows[2]  # decoding rows are not profiled
    table = out.with_name("bench_peer.md").read_text()  # what stdout showed, to paste
    assert "| train eager, bench.peer_shape | ours |" in table and f"**{rows[0]['bound']:.2f}x**" in table
    assert table.splitlines()[2].startswith("| case | shape | ours tokens/s | transformers tokens/s | ours / transformers")
    assert f"**{rows[2]['ratio']:.2f}x**" in table and "tokens equal" in table
    assert ("`llm-bench " + " ".join([*PEER_TINY, "bench.peer_compile=false", f"paths.runs_dir={tmp_path}/runs"])
            + "`\n") in table


def test_peer_mode_refuses_a_peer_shape_that_cannot_be_built(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", [*PEER_TINY, "bench.peer_shape.n_kv_heads=3", "bench.decode_batches=[]",
                                     f"paths.runs_dir={tmp_path}/runs"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "bench.peer_shape.n_kv_heads=3: must divide bench.peer_shape.n_heads=4" in stderr
    assert "bench.decode_batches=[]" in stderr
    code, stderr = llm_cli("bench", [*PEER_TINY, "model.moe.n_experts=4", f"paths.runs_dir={tmp_path}/runs"],
                           tmp_path, monkeypatch, capsys)
    assert code == 2 and "compares dense models" in stderr and "bench.against=transformers" in stderr


@pytest.mark.slow  # torch.compile of both models on a CPU: minutes on 2 cores
def test_peer_mode_compiled_step_matches_transformers(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", [*PEER_TINY, "bench.decode_batches=[1]", f"paths.runs_dir={tmp_path}/runs"],
                           tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    (out,) = (tmp_path / "runs" / "bench").glob("*/bench_peer.json")
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    compiled = rows["train compiled, bench.peer_shape"]
    assert compiled["compiled"] and compiled["goal"] == 1.0 and compiled["ok"]
    # decoding: the goal is on ours compiled (against transformers' generate as called); the eager row is context
    eager, fast = rows["decode eager b1, bench.peer_shape"], rows["decode compiled b1, bench.peer_shape"]
    assert (eager["goal"], eager["met"], eager["compiled"]) == (None, None, False)
    assert fast["goal"] == 1.5 and fast["compiled"] and fast["ok"] and fast["met"] == (fast["ratio"] >= 1.5)
    assert not fast["hf_compiled"]  # against transformers' generate as a user calls it
    both = rows["decode both compiled b1, bench.peer_shape"]  # context: transformers' static cache, compiled
    assert both["compiled"] and both["hf_compiled"] and both["goal"] is None and both["ok"]


@CUDA
@pytest.mark.gpu
def test_peer_mode_on_a_gpu(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", [*PEER_TINY, "trainer.accelerator=gpu", f"paths.runs_dir={tmp_path}/runs"],
                           tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    assert "NVIDIA" in json.loads(next((tmp_path / "runs" / "bench").glob("*/bench_peer.json")).read_text())["header"]


# -- MFU: peaks from Lightning for the dtype in use, measured on a CPU ---------------------------

def test_compute_dtype_of_each_precision():
    from llm.tracking.throughput import compute_dtype

    assert compute_dtype("bf16-mixed") == compute_dtype("bf16-true") == torch.bfloat16
    assert compute_dtype("16-mixed") == torch.float16
    assert compute_dtype("32-true") == torch.float32


def test_cpu_peak_is_measured_and_says_so():
    from llm.tracking.throughput import device_peak

    peak = device_peak(torch.device("cpu"))
    assert 1e8 < peak.flops < 1e14
    assert peak.source.startswith("measured: best float32 2048x2048 matmul on this CPU")


def test_gpu_peak_is_lightnings_for_the_dtype(monkeypatch):
    # No GPU here: only the device name is stood in; the peak is Lightning's own table.
    from lightning_fabric.utilities.throughput import _CUDA_FLOPS

    from llm.tracking.throughput import device_peak

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    bf16 = device_peak(torch.device("cuda", 0), torch.bfloat16)
    assert bf16.flops == _CUDA_FLOPS["h100 sxm"][torch.bfloat16] > 5e14
    assert bf16.source == "Lightning get_available_flops: NVIDIA H100 80GB HBM3, bfloat16"
    assert device_peak(torch.device("cuda", 0), torch.float16).flops == _CUDA_FLOPS["h100 sxm"][torch.float16]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    unknown = device_peak(torch.device("cuda", 0), torch.bfloat16)
    assert unknown.flops != unknown.flops and unknown.source.startswith("unknown: Lightning has no bfloat16 peak")


@pytest.mark.slow  # two training loops with Lightning set-up: ~30 s on 2 loaded cores
def test_llm_bench_mfu_is_against_the_peak_of_the_precision_in_use(tmp_path, monkeypatch, capsys):
    # bf16-mixed on a CPU: both loops autocast, and MFU is against a measured bf16 matmul peak
    code, stderr = llm_cli("bench", ["model=nano", "data.seq_len=16", "data.micro_batch_size=2", "bench.steps=1",
                                     "bench.warmup=1", "bench.repeats=1", "trainer.precision=bf16-mixed", "logger=none",
                                     f"paths.runs_dir={tmp_path}/runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    result = json.loads(next((tmp_path / "runs" / "bench").glob("*/bench.json")).read_text())
    assert result["peak_source"].startswith("measured: best bfloat16 1024x1024 matmul on this CPU")
    assert result["framework_mfu"] == pytest.approx(result["framework_tokens_per_s"] * result["flops_per_token"]
                                                    / result["peak_flops"])


def test_mfu_measure_times_after_warmup_and_divides_by_every_rank():
    from llm.bench.mfu import measure
    from llm.tracking.throughput import Peak

    metrics = [{"step": 1, "perf/tokens_per_s": 10.0}, {"step": 2, "perf/tokens_per_s": 20.0},  # warm-up
               {"step": 3, "perf/tokens_per_s": 1000.0}, {"step": 4, "train/loss": 3.0},
               {"step": 4, "perf/tokens_per_s": 1200.0}, {"step": 5, "perf/tokens_per_s": 1100.0}]
    summary = {"world_size": 2, "flops_per_token": 6e9, "N": 10**9, "tokens_per_step": 8192, "peak_memory_mib": 1.0}
    row = measure(metrics, summary, warmup=2, peak=Peak(1e15, "test"))
    assert row["tokens_per_s"] == 1100.0 and row["tokens_per_s_per_device"] == 550.0 and row["steps_timed"] == 3
    assert row["mfu"] == pytest.approx(1100.0 * 6e9 / (2 * 1e15))


@pytest.mark.slow  # a real llm-train run in a subprocess (~35 s on 2 loaded cores)
def test_mfu_mode_runs_llm_train_and_prints_a_markdown_block(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", ["bench.mfu=true", "bench.train=['model=nano','data=synthetic','tokenizer=byte']",
                                     "data.seq_len=32", "data.micro_batch_size=2", "bench.steps=3", "bench.warmup=2",
                                     f"paths.runs_dir={tmp_path}/runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    row = json.loads(next((tmp_path / "runs" / "bench").glob("*/bench_mfu.json")).read_text())
    assert row["ranks"] == 1 and row["steps_timed"] == 3 and row["tokens_per_step"] == 64
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / row["peak_flops_per_device"])
    assert row["peak_source"].startswith("measured:")
    out = next((tmp_path / "runs" / "bench").glob("*/bench_mfu.md")).read_text()  # what stdout showed
    assert "#### Training MFU on 1x" in out and f"**{row['mfu']:.1%}**" in out


def test_mfu_mode_passes_llm_trains_refusal_on_as_exit_2(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", ["bench.mfu=true", "bench.train=['model.n_heads=3']", "model=nano",
                                     f"paths.runs_dir={tmp_path}/runs"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "model.n_heads=3: must divide model.d_model=64" in stderr
    assert not list((tmp_path / "runs" / "bench").iterdir())  # nothing left behind, its log included


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: bench=gpu would run: the CPU refusal cannot happen")
def test_bench_gpu_on_a_cpu_machine_exits_2_saying_why(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", ["bench=gpu", f"paths.runs_dir={tmp_path}/runs"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "trainer.accelerator='gpu': no CUDA GPU on this machine" in stderr


@pytest.mark.slow  # a real 1-rank FSDP llm-train run in a subprocess (~30 s on 2 loaded cores)
def test_bench_gpu_preset_runs_on_a_cpu_with_its_gpu_keys_overridden(tmp_path, monkeypatch, capsys):
    # The preset's path end to end without a GPU: its groups (FSDP, trainer=gpu's bf16-mixed, synthetic
    # data) reach llm-train, then bench.train's values, then the command line's (which win).
    code, stderr = llm_cli("bench", ["bench=gpu", "trainer.accelerator=cpu", "model.attention.kernel=sdpa",
                                     "parallelism.compile=false", "parallelism.param_dtype=float32", "model=nano",
                                     "data.seq_len=64", "data.micro_batch_size=2", "model.vocab_size=512",
                                     "data.corpus.n_documents=50", "bench.steps=2", "bench.warmup=1",
                                     f"paths.runs_dir={tmp_path}/runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    row = json.loads(next((tmp_path / "runs" / "bench").glob("*/bench_mfu.json")).read_text())
    assert {"parallelism=fsdp", "trainer=gpu", "data=synthetic", "model=nano"} <= set(row["choices"])
    assert row["precision"] == "bf16-mixed" and row["tokens_per_step"] == 2 * 64 and row["params"] < 200_000
    assert row["peak_source"].startswith("measured: best bfloat16")
    config = (tmp_path / "runs" / "bench").glob("*/run/.hydra/config.yaml")
    assert "param_dtype: float32" in next(config).read_text()  # the command line won over bench.train's bfloat16


@CUDA
@pytest.mark.gpu
def test_bench_gpu_reports_mfu_against_the_bf16_peak(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("bench", ["bench=gpu", "model=small", "bench.steps=5", "bench.warmup=5",
                                     f"paths.runs_dir={tmp_path}/runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    row = json.loads(next((tmp_path / "runs" / "bench").glob("*/bench_mfu.json")).read_text())
    assert row["precision"] == "bf16-mixed" and row["peak_source"].endswith("bfloat16") and 0 < row["mfu"] < 1


# -- trainer=gpu -------------------------------------------------------------------------------

def test_trainer_gpu_selects_bf16_fused_adamw_flash_and_compile(tmp_path):
    cfg = compose_train(["trainer=gpu", "parallelism=fsdp", "attention=gqa"], tmp_path)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    assert cfg.optim.fused is True and cfg.model.attention.kernel == "flash" and cfg.parallelism.compile is True
    assert cfg.trainer.guard.enabled  # the rest of trainer/default is kept
    # the command line still wins over the preset
    cfg = compose_train(["trainer=gpu", "model.attention.kernel=flex", "parallelism.compile=false"], tmp_path)
    assert cfg.model.attention.kernel == "flex" and cfg.parallelism.compile is False
    assert compose_train([], tmp_path).model.attention.kernel == "sdpa"  # the default trainer changes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the CPU refusal cannot happen")
def test_trainer_gpu_on_a_cpu_machine_is_refused_before_any_work(tmp_path):
    from llm.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"trainer.accelerator='gpu': no CUDA GPU on this machine"):
        validate(compose_train(["trainer=gpu"], tmp_path))


def test_fused_adamw_of_the_gpu_preset_also_steps_on_a_cpu():
    # optim.fused=true is CUDA's fast path, and PyTorch >= 2.4 has a fused CPU kernel too: the
    # preset's optimizer is usable with trainer.accelerator=cpu, and gives AdamW's update.
    from functools import partial

    from llm.stages.optim import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(8, 4)
    for model, fused in zip(models, (True, False)):
        opt = build_optimizer(partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, fused=fused), model)
        assert opt.defaults["fused"] is fused
        model(x).square().mean().backward()
        opt.step()
    assert torch.allclose(models[0].weight, models[1].weight, atol=1e-6)
