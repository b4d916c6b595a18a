"""Distillation (posttrain=distill): the divergences against their formulas on hand-computed
distributions, temperature, TRL's beta convention, top-k teachers; the stage (gradients reach only
the student, the teacher never changes, the on-policy fraction lmbda, one step lowers the
divergence); a real `llm-train posttrain=distill` run and its refusals (exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm.model import ModelConfig, Transformer
from llm.model.config import PositionConfig
from llm.stages.distill import DistillModule, on_policy_step, prompts_of
from llm.stages.objectives import (IGNORE_INDEX, distillation_loss, forward_kl, generalized_jsd, reverse_kl,
                                   teacher_log_probs, total_variation)
from llm.tokenizer import Tokenizer, build_tokenizer
from tests.conftest import run_cli
from tests.test_posttrain import CLI_TINY, TINY, build_stage, completed_run, save_run

pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")

# A hand-computed pair over 2 tokens: student p = (1/2, 1/2), teacher q = (1/4, 3/4).
P = torch.tensor([0.5, 0.5])
Q = torch.tensor([0.25, 0.75])
LOG_P, LOG_Q = P.log(), Q.log()
# KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2); KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3).
FORWARD = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
REVERSE = 0.5 * math.log(2.0) + 0.5 * math.log(2 / 3)
# JSD(1/2): M = (3/8, 5/8); 1/2 KL(q || M) + 1/2 KL(p || M).
M = (0.375, 0.625)
JSD_HALF = 0.5 * (0.25 * math.log(0.25 / M[0]) + 0.75 * math.log(0.75 / M[1])) + \
    0.5 * (0.5 * math.log(0.5 / M[0]) + 0.5 * math.log(0.5 / M[1]))
TV = 0.25  # 1/2 (|1/2 - 1/4| + |1/2 - 3/4|)


# ---------------------------------------------------------------- the divergences


def test_each_divergence_equals_its_formula_on_a_hand_computed_pair():
    assert forward_kl(LOG_P, LOG_Q).item() == pytest.approx(FORWARD, abs=1e-6)  # 0.0589
    assert reverse_kl(LOG_P, LOG_Q).item() == pytest.approx(REVERSE, abs=1e-6)  # 0.1438
    assert generalized_jsd(LOG_P, LOG_Q, 0.5).item() == pytest.approx(JSD_HALF, abs=1e-6)  # 0.0338
    assert total_variation(LOG_P, LOG_Q).item() == pytest.approx(TV, abs=1e-6)
    # beta = 0.25: M = 0.25 q + 0.75 p = (7/16, 9/16); 0.25 KL(q || M) + 0.75 KL(p || M).
    m = (7 / 16, 9 / 16)
    expected = 0.25 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])) + \
        0.75 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert generalized_jsd(LOG_P, LOG_Q, 0.25).item() == pytest.approx(expected, abs=1e-6)
    # The direction matters: these two KLs differ on this pair.
    assert FORWARD < REVERSE


def test_beta_0_and_1_are_the_forward_and_reverse_kl_as_in_trl():
    assert generalized_jsd(LOG_P, LOG_Q, 0.0).item() == pytest.approx(FORWARD, abs=1e-6)
    assert generalized_jsd(LOG_P, LOG_Q, 1.0).item() == pytest.approx(REVERSE, abs=1e-6)


def test_every_divergence_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.full((2, 5), 3)
    labels[:, 0] = IGNORE_INDEX
    for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("tv", 0.5)):
        loss, ratio = distillation_loss(logits, logits.clone(), labels, divergence, beta, temperature=0.7)
        assert abs(loss.item()) < 1e-6, divergence
        assert int(ratio.count) == 8  # 2 rows x 4 scored positions


def test_temperature_divides_both_logits_and_the_loss_is_a_mean_over_completion_tokens():
    # Logits (0, 0) and (0, ln 3): at T = 1 the pair above (p = 1/2 1/2, q = 1/4 3/4).
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[0.0, math.log(3.0)], [-5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1]])  # only position 0 is scored (it predicts labels[:, 1])
    loss, ratio = distillation_loss(student, teacher, labels, "forward_kl", temperature=1.0)
    assert loss.item() == pytest.approx(FORWARD, abs=1e-6) and int(ratio.count) == 1
    # T = 2: the teacher's logits become (0, ln 3 / 2), so q = (1, sqrt 3) / (1 + sqrt 3); p stays uniform.
    q = torch.tensor([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))
    expected = float((q * (q.log() - math.log(0.5))).sum())
    loss, _ = distillation_loss(student, teacher, labels, "forward_kl", temperature=2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # 0.0150, not 0.0589
    # Two scored positions: the mean of the two per-position divergences.
    both = torch.tensor([[IGNORE_INDEX, 1, 0]])
    s3 = torch.cat([student, torch.zeros(1, 1, 2)], 1)
    t3 = torch.cat([teacher, torch.zeros(1, 1, 2)], 1)
    second = float(forward_kl(F.log_softmax(student[0, 1], -1), F.log_softmax(teacher[0, 1], -1)))
    loss, ratio = distillation_loss(s3, t3, both, "forward_kl")
    assert loss.item() == pytest.approx((FORWARD + second) / 2, abs=1e-5) and int(ratio.count) == 2
    # A prompt or padding label (IGNORE_INDEX) after the first position leaves its position out.
    padded = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    loss, ratio = distillation_loss(s3, t3, padded, "forward_kl")
    assert loss.item() == pytest.approx(FORWARD, abs=1e-6) and int(ratio.count) == 1


def test_a_top_k_teacher_keeps_k_tokens_renormalised_and_k_equal_to_vocab_is_the_full_teacher():
    logits = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.2)])
    top2 = teacher_log_probs(logits, top_k=2).exp()
    assert top2.tolist() == pytest.approx([0.625, 0.375, 0.0], abs=1e-6)  # 0.5 / 0.8, 0.3 / 0.8
    student = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(1))
    teacher = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(3))
    for divergence in ("forward_kl", "jsd", "tv"):
        full, _ = distillation_loss(student, teacher, labels, divergence, top_k=None)
        same, _ = distillation_loss(student, teacher, labels, divergence, top_k=9)
        fewer, _ = distillation_loss(student, teacher, labels, divergence, top_k=2)
        assert same.item() == pytest.approx(full.item(), abs=1e-6)
        assert fewer.item() != pytest.approx(full.item(), abs=1e-4)
        assert math.isfinite(fewer.item())


def test_gradients_reach_the_student_logits_only():
    student = torch.randn(1, 4, 7, requires_grad=True)
    teacher = torch.randn(1, 4, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, 4]])
    loss, _ = distillation_loss(student, teacher, labels, "jsd")
    loss.backward()
    assert student.grad is not None and student.grad[:, :3].abs().sum() > 0
    assert student.grad[:, 3].abs().sum() == 0  # the last position predicts nothing
    assert teacher.grad is None


# ---------------------------------------------------------------- on-policy fraction


def test_lmbda_sets_the_seeded_share_of_on_policy_steps():
    assert not any(on_policy_step(0, step, 0.0) for step in range(200))
    assert all(on_policy_step(0, step, 1.0) for step in range(200))
    draws = [on_policy_step(7, step, 0.5) for step in range(400)]
    assert draws == [on_policy_step(7, step, 0.5) for step in range(400)]  # seeded: the same again
    assert 180 <= sum(draws) <= 220  # 0.5 of 400 (a binomial's 2 sigma is 20)
    assert draws != [on_policy_step(8, step, 0.5) for step in range(400)]  # another seed, other steps
    assert 30 <= sum(on_policy_step(7, step, 0.1) for step in range(400)) <= 50


def test_prompts_are_the_tokens_before_the_first_trained_label():
    batch = {"tokens": torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]]),
             "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX],
                                     [IGNORE_INDEX, 10, 11, IGNORE_INDEX, IGNORE_INDEX]])}
    assert prompts_of(batch) == [[5, 6], [9]]


# ---------------------------------------------------------------- the stage

from llm.config import validate  # noqa: E402
from llm.recipes import recipe_for  # noqa: E402
from llm.run import RunDir  # noqa: E402
from llm.run.plan import Settings, plan  # noqa: E402
from tests.conftest import compose_train  # noqa: E402
from tests.test_posttrain import fit, logged_names, model_config, parent, snapshot, tokenizer  # noqa: E402,F401

# The teacher: another architecture (1 layer, 48 wide) on the student's byte tokenizer.
TEACHER_SHAPE = dict(n_layers=1, d_model=48, n_heads=4, max_seq_len=64)
DISTILL_ARGS = ["posttrain.max_new_tokens=4", "posttrain.temperature=1.0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(5)
    config = ModelConfig(**TEACHER_SHAPE, vocab_size=tokenizer.vocab_size)
    return save_run(tmp_path_factory.mktemp("runs") / "teacher", Transformer(config), config, tokenizer, "sft")


def build_distill(parent: Path, teacher: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> dict:
    """What llm.train.train does before fitting: the recipe prepares, reads the data, builds the module."""
    overrides = ["posttrain=distill", f"init_from={parent}", f"posttrain.teacher={teacher}", *TINY, *DISTILL_ARGS,
                 *extra]
    recipe = recipe_for(compose_train(overrides, run_dir))
    cfg = recipe.prepare(compose_train(overrides, run_dir), overrides)
    validate(cfg, world_size=1)
    settings = Settings.of(cfg)
    data = recipe.data(cfg, settings, RunDir(run_dir))
    module = recipe.module(cfg, settings, plan(settings, data.tokenizer.vocab_size), data, RunDir(run_dir))
    return {"module": module, "datamodule": data.datamodule, "teacher": recipe.teacher}


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_only_the_student_trains_and_the_teacher_never_changes(lmbda, parent, teacher, tmp_path, single_thread):
    """Off-policy (lmbda 0) and on-policy (lmbda 1, the student samples) fits of 4 steps: every student
    weight moves; the teacher's weights stay its checkpoint's, without gradients, in eval mode, and
    outside the checkpoint's state_dict."""
    built = build_distill(parent, teacher, tmp_path, (f"posttrain.lmbda={lmbda}", "posttrain.nll_weight=0.5"))
    module = built["module"]
    module.configure_model()
    before = snapshot(module.model)
    fit(module, built["datamodule"], tmp_path)
    assert {n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])} == set(before)
    for name, weight in module.teacher.state_dict().items():
        torch.testing.assert_close(weight, built["teacher"].state[name], rtol=0, atol=0)
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())
    assert not module.teacher.training and module.model.training
    assert not any(k.startswith("teacher") or "_teacher" in k for k in module.state_dict())
    names = logged_names(tmp_path)
    assert {"train/loss", "train/distill_loss", "train/nll_loss", "train/on_policy_fraction", "train/num_tokens",
            "val/loss", "val/nll_loss", "val/ppl", "val/distill_loss"} <= names, names
    assert ("completions/mean_length" in names) == (lmbda == 1.0)  # only on-policy steps sample
    from llm.tracking.metrics import read_metrics

    fractions = [r["train/on_policy_fraction"] for r in read_metrics(tmp_path / "metrics.jsonl")
                 if "train/on_policy_fraction" in r]
    assert fractions == [lmbda] * 4
    assert module.on_policy_steps == (4 if lmbda == 1.0 else 0)


def test_one_optimizer_step_on_the_student_lowers_the_divergence(parent, teacher, tmp_path, single_thread):
    """Random tiny models start close (KL ~0.017): a gradient step of size 2 on the student shrinks it
    by over 5%; the teacher gets no gradient."""
    built = build_distill(parent, teacher, tmp_path, ("posttrain.divergence=forward_kl",))
    module, datamodule = built["module"], built["datamodule"]
    module.configure_model()
    module.eval()  # no dropout, metrics computed (no trainer needed)
    batch = next(iter(datamodule.train_dataloader()))
    loss, _ = module.step(batch)
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    with torch.no_grad():
        for p in module.model.parameters():
            p -= 2.0 * p.grad
    after, _ = module.step(batch)
    assert after.item() < 0.95 * loss.item(), (loss.item(), after.item())  # 0.0175 -> 0.0153


# ---------------------------------------------------------------- through the command line

from tests.test_posttrain import CLI_TINY, reward_parent  # noqa: E402,F401


def test_llm_train_distills_a_teacher_into_its_student(parent, teacher, tmp_path, single_thread):
    """`llm-train posttrain=distill` in a subprocess: 2 steps (lmbda 0.5: the seeded draw makes
    step 0 on-policy and step 1 off-policy), summary and lineage of both parents, the held-out
    answers of student and teacher."""
    result = run_cli(["posttrain=distill", f"init_from={parent}", f"posttrain.teacher={teacher}", *CLI_TINY,
                      *DISTILL_ARGS, "posttrain.lmbda=0.5", "posttrain.top_k=16", "posttrain.nll_weight=0.1"],
                     cwd=tmp_path)
    run, summary = completed_run(result, tmp_path)
    assert [on_policy_step(0, s, 0.5) for s in range(2)] == [True, False]
    assert (summary["stage"], summary["steps_done"]) == ("distill", 2)
    assert summary["parent_checkpoint"] == str(parent / "checkpoints" / "last.ckpt")
    assert summary["teacher_checkpoint"] == str(teacher / "checkpoints" / "last.ckpt")
    last = summary["last_metrics"]
    assert last["train/on_policy_fraction"] == 0.5 and last["completions/mean_length"] > 0
    assert {"train/distill_loss", "train/nll_loss", "val/loss", "val/nll_loss", "val/distill_loss"} <= set(last)
    assert summary["eval/prompts"] == 2 and 0 <= summary["eval_teacher/accuracy"] <= 1
    # val/ppl is the student's next-token perplexity, not exp of the divergence (val/loss).
    assert summary["val/ppl"] == pytest.approx(math.exp(summary["val/nll_loss"]), rel=1e-4)
    assert summary["val/ppl"] > 10 * math.exp(summary["val/loss"])  # random tiny models: ppl ~ vocab size
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("model.") for k in checkpoint["state_dict"])  # the teacher is not saved
    assert checkpoint["llm"]["stage"] == "distill"


def test_a_fresh_student_takes_the_teachers_tokenizer_and_the_model_group(teacher, tmp_path, monkeypatch, capsys,
                                                                          single_thread):
    from tests.test_bad_inputs import llm_cli  # the real llm-train main, in this process

    code, err = llm_cli("train", ["posttrain=distill", f"posttrain.teacher={teacher}", "model=nano", *CLI_TINY,
                                  *DISTILL_ARGS, "posttrain.lmbda=0"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    summary = json.loads(next(tmp_path.glob("runs/*/summary.json")).read_text())
    assert summary["status"] == "completed" and summary["parent_checkpoint"] is None
    assert summary["choices"]["model"] == "nano" and summary["choices"]["tokenizer"] == "pretrained"
    assert "eval_before/accuracy" not in summary and "eval/accuracy" in summary


@pytest.fixture(scope="module")
def other_tokenizer_teacher(tmp_path_factory, tokenizer) -> Path:
    """A teacher whose tokenizer has one more token than the student's."""
    other = Tokenizer(tokenizer.backend.from_str(tokenizer.backend.to_str()))
    other.backend.add_tokens(["<extra>"])
    config = ModelConfig(**TEACHER_SHAPE, vocab_size=other.vocab_size)
    return save_run(tmp_path_factory.mktemp("runs") / "other", Transformer(config), config, other, "sft")


def test_bad_values_and_mismatched_teachers_exit_2_naming_the_key(parent, teacher, reward_parent,
                                                                  other_tokenizer_teacher, tmp_path, monkeypatch,
                                                                  capsys, single_thread):
    from tests.test_bad_inputs import llm_cli

    base = ["posttrain=distill", f"init_from={parent}", *CLI_TINY]
    with_teacher = [*base, f"posttrain.teacher={teacher}"]
    cases = [
        (base, ["posttrain.teacher: posttrain=distill learns from a teacher"]),
        ([*with_teacher, "posttrain.beta=nan"], ["posttrain.beta=nan"]),
        ([*with_teacher, "posttrain.lmbda=1.5"], ["posttrain.lmbda=1.5: must be in [0, 1]"]),
        ([*with_teacher, "posttrain.temperature=-1"], ["posttrain.temperature=-1"]),
        ([*with_teacher, "posttrain.temperature=inf"], ["posttrain.temperature=inf"]),
        ([*with_teacher, "posttrain.nll_weight=-0.5"], ["posttrain.nll_weight=-0.5"]),
        ([*with_teacher, "posttrain.top_k=1000000000000"], ["posttrain.top_k=1000000000000"]),
        ([*with_teacher, "posttrain.divergence=kl"], ["posttrain.divergence", "forward_kl"]),
        ([*with_teacher, "posttrain.divergence=reverse_kl", "posttrain.top_k=8"],
         ["posttrain.top_k=8: a top-k teacher gives the other tokens probability 0"]),
        ([*base, f"posttrain.teacher={other_tokenizer_teacher}"],
         ["posttrain.teacher=", "its tokenizer", "differs from the student's"]),
        ([*base, f"posttrain.teacher={reward_parent}"], ["is a reward model (stage reward); a teacher is a language"]),
        ([*base, f"posttrain.teacher={tmp_path / 'nowhere'}"], ["posttrain.teacher"]),
    ]
    for overrides, phrases in cases:
        code, stderr = llm_cli("train", overrides, tmp_path, monkeypatch, capsys)
        assert code == 2, (overrides, stderr[-3000:])
        assert "Traceback" not in stderr
        for phrase in phrases:
            assert phrase in stderr, (phrase, stderr[-3000:])
    assert not list(tmp_path.glob("runs/*/checkpoints/*"))


@pytest.mark.slow  # ~35 s each on 2 CPU cores (checked by hand when added: both completed)
@pytest.mark.parametrize("parallelism,lmbda", [("ddp", 1.0), ("fsdp", 0.5)])
def test_distill_runs_on_two_processes_sampling_in_lockstep(parallelism, lmbda, parent, teacher, tmp_path):
    """On-policy steps under DDP and FSDP: every rank draws the same steps, so their sampling (and,
    under FSDP, its weight gathers) and the metrics' all-reduces line up; the teacher stays whole."""
    result = run_cli(["posttrain=distill", f"init_from={parent}", f"posttrain.teacher={teacher}",
                      f"parallelism={parallelism}", "trainer.devices=2", *CLI_TINY, *DISTILL_ARGS,
                      f"posttrain.lmbda={lmbda}"], cwd=tmp_path)
    _, summary = completed_run(result, tmp_path)
    assert (summary["world_size"], summary["steps_done"]) == (2, 2)
    assert summary["last_metrics"]["train/on_policy_fraction"] == lmbda


def test_a_hugging_face_folder_teaches_and_a_differently_padded_vocabulary_is_refused(parent, tokenizer, tmp_path,
                                                                                     single_thread):
    """A transformers folder (weights and tokenizer) is a teacher like a run; a teacher on the same
    tokenizer whose logits have another width (pad_vocab_to=1: 259 entries, not 320) is refused."""
    pytest.importorskip("safetensors")
    from llm.config import ConfigError
    from llm.interop import export_hf

    torch.manual_seed(6)
    model = Transformer(ModelConfig(**TEACHER_SHAPE, vocab_size=tokenizer.vocab_size))
    folder = export_hf(model, tmp_path / "hf", tokenizer)
    built = build_distill(parent, folder, tmp_path / "a")
    module = built["module"]
    module.configure_model()
    for name, weight in module.teacher.state_dict().items():
        torch.testing.assert_close(weight, model.state_dict()[name], rtol=0, atol=0)
    module.eval()
    loss, _ = module.step(next(iter(built["datamodule"].train_dataloader())))
    assert loss.item() > 0 and math.isfinite(loss.item())

    narrow = ModelConfig(**TEACHER_SHAPE, vocab_size=tokenizer.vocab_size, pad_vocab_to=1)
    other = save_run(tmp_path / "runs" / "narrow", Transformer(narrow), narrow, tokenizer, "sft")
    with pytest.raises(ConfigError, match=r"posttrain.teacher=.*its logits have 259 entries .* the student's 320"):
        build_distill(parent, other, tmp_path / "b")


# ---------------------------------------------------------------- on the pretraining corpus

from llm.stages.distill import on_policy_count  # noqa: E402
from llm.stages.pretrain import next_token_loss  # noqa: E402
from llm.tracking.metrics import read_metrics  # noqa: E402

# posttrain.corpus=true: a fresh nano student on 60 kB of the embedded corpus (byte tokens, the teacher's).
CORPUS = ["posttrain=distill", "posttrain.corpus=true", "posttrain.lmbda=0", "model=nano", "data.corpus.max_bytes=60000",
          "data.seq_len=32", "data.micro_batch_size=2", "data.val_batches=2", "optim.lr=1e-3", "schedule=constant",
          "schedule.warmup=0", "budget.steps=4", "logger=none", "trainer.progress_bar=false"]
# The same data as a pretraining run (posttrain=none) would read with the teacher's tokenizer.
CORPUS_DATA = [o for o in CORPUS if o.startswith(("data.", "model=", "budget.", "logger=", "trainer."))]


def build_stage_from(overrides: list[str], run_dir: Path) -> tuple:
    """What llm.train.train does before fitting: (recipe, data, module)."""
    recipe = recipe_for(compose_train(overrides, run_dir))
    cfg = recipe.prepare(compose_train(overrides, run_dir), overrides)
    validate(cfg, world_size=1)
    settings = Settings.of(cfg)
    data = recipe.data(cfg, settings, RunDir(run_dir))
    return recipe, data, recipe.module(cfg, settings, plan(settings, data.tokenizer.vocab_size), data, RunDir(run_dir))


def test_corpus_distillation_is_the_divergence_at_every_position_of_pretrainings_blocks(teacher, tmp_path,
                                                                                        single_thread):
    """One micro-batch: the batches are a pretraining run's (same tokens, same order, same validation
    blocks); the loss is KL(teacher || student) at T = 2, averaged over all B x T positions, plus
    nll_weight x the plain next-token loss, computed here by hand."""
    recipe, data, module = build_stage_from([*CORPUS, f"posttrain.teacher={teacher}", "posttrain.divergence=forward_kl",
                                             "posttrain.temperature=2.0", "posttrain.nll_weight=0.5"], tmp_path / "d")
    _, pretraining, _ = build_stage_from([*CORPUS_DATA, "tokenizer=pretrained",
                                          f"tokenizer.path={teacher / 'tokenizer.json'}"], tmp_path / "p")
    assert type(recipe).__name__ == "Distill" and data.facts["teacher_checkpoint"].endswith("last.ckpt")
    batches = [b for _, b in zip(range(3), data.datamodule.train_dataloader())]
    same = [torch.equal(b, p) for b, p in zip(batches, pretraining.datamodule.train_dataloader())]
    assert same == [True] * 3
    assert all(torch.equal(b, p) for b, p in zip(data.datamodule.val_dataloader(), pretraining.datamodule.val_dataloader()))
    assert {k: data.facts[k] for k in ("data_fingerprint", "train_tokens", "val_tokens")} == \
        {k: pretraining.facts[k] for k in ("data_fingerprint", "train_tokens", "val_tokens")}

    module.configure_model()
    module.eval()
    batch = batches[0]
    assert batch.shape == (2, 33)  # micro_batch_size x (seq_len + 1)
    loss, metrics = module.corpus_step(batch)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        student = module.model(inputs)
        q = F.softmax(module.teacher(inputs) / 2.0, dim=-1)  # (2, 32, V)
        log_p = F.log_softmax(student / 2.0, dim=-1)
        kl = (q * (q.log() - log_p)).sum(-1)  # at each of the 64 positions
        nll = F.cross_entropy(student.reshape(-1, student.shape[-1]), targets.reshape(-1))
    assert kl.shape == (2, 32) and bool((kl > 0).all())
    assert metrics["distill_loss"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert loss.item() == pytest.approx(kl.mean().item() + 0.5 * nll.item(), rel=1e-5)


def test_corpus_distillation_trains_only_the_student_and_val_loss_is_its_next_token_loss(teacher, tmp_path,
                                                                                         single_thread):
    """4 steps on the corpus: every student weight moves, the teacher stays its checkpoint; val/loss
    is the student's plain next-token loss over the validation blocks (recomputed here), not the
    divergence; nothing samples (no on-policy fraction)."""
    recipe, data, module = build_stage_from([*CORPUS, f"posttrain.teacher={teacher}"], tmp_path)
    module.configure_model()
    before = snapshot(module.model)
    fit(module, data.datamodule, tmp_path)
    assert {n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])} == set(before)
    for name, weight in module.teacher.state_dict().items():
        torch.testing.assert_close(weight, recipe.teacher.state[name], rtol=0, atol=0)
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())
    rows = read_metrics(tmp_path / "metrics.jsonl")
    names = set().union(*rows)
    assert {"train/loss", "train/distill_loss", "train/nll_loss", "train/num_tokens", "val/loss", "val/nll_loss",
            "val/distill_loss", "val/ppl", "val/mean_token_accuracy"} <= names, names
    assert "train/on_policy_fraction" not in names and "completions/mean_length" not in names
    assert [r["train/num_tokens"] for r in rows if "train/num_tokens" in r] == [64, 128, 192, 256]  # 2 x 32 a step
    (val,) = [r for r in rows if "val/loss" in r]
    module.eval()
    with torch.no_grad():
        by_hand = [next_token_loss(module.model(b[:, :-1]), b[:, 1:]).item() for b in data.datamodule.val_dataloader()]
    assert len(by_hand) == 2
    assert val["val/loss"] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert val["val/nll_loss"] == pytest.approx(val["val/loss"], rel=1e-6)
    assert val["val/ppl"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-4)
    assert abs(val["val/distill_loss"] - val["val/loss"]) > 0.1  # the divergence is another number


def wandb_ready_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a saved run whose run.json says how it logged (as llm-train writes it): W&B, with
    its checkpoints as artifacts, so the lineage of a stage that reads it names its artifact."""
    import shutil

    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta["config"] = {"logger": {"kind": "wandb", "project": "llm", "log_checkpoints": True}}
    (copy / "run.json").write_text(json.dumps(meta))
    return copy


def test_llm_train_distills_on_the_corpus_and_wandb_records_both_parents(parent, teacher, tmp_path, monkeypatch,
                                                                         capsys, single_thread):
    """`llm-train posttrain=distill posttrain.corpus=true` with init_from and logger=wandb offline:
    job_type distill; the student's parent and the teacher in the W&B config (online: both input
    artifacts); summary.json's val/loss is the next-token loss, val/ppl its exponential."""
    from tests.test_wandb_conventions import OfflineRun, clean_env, offline_runs

    for key, value in clean_env(tmp_path / "wandb").items():
        monkeypatch.setenv(key, value)
    student, master = wandb_ready_run(parent, tmp_path / "parents"), wandb_ready_run(teacher, tmp_path / "parents")
    code, err = llm_cli_here(["init_from=" + str(student), f"posttrain.teacher={master}", *CORPUS[:3], *CORPUS[4:],
                              "budget.steps=2", "trainer.val_every=2", "logger=wandb", "logger.mode=offline"],
                             tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    summary = json.loads(next(tmp_path.glob("runs/*/summary.json")).read_text())
    assert summary["status"] == "completed" and summary["stage"] == "distill" and summary["steps_done"] == 2
    assert summary["val/loss"] == pytest.approx(summary["val/nll_loss"]) and summary["val/loss"] != summary.get(
        "last_metrics", {}).get("val/distill_loss")
    assert summary["val/ppl"] == pytest.approx(math.exp(summary["val/loss"]), rel=1e-4)
    assert summary["teacher_checkpoint"] == str(master / "checkpoints" / "last.ckpt")
    (run,) = [OfflineRun(d) for d in offline_runs(tmp_path / "runs")]
    assert run.run.job_type == "distill"
    config = run.config
    assert config["parent"]["run_id"] == student.name and config["teacher"]["run_id"] == master.name
    assert config["teacher"]["artifact"] == f"llm/model-{master.name}:step-0"
    assert config["parent"]["checkpoint"].startswith(str(student)) and config["teacher"]["checkpoint"].startswith(str(master))


def llm_cli_here(args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    from tests.test_bad_inputs import llm_cli

    return llm_cli("train", ["posttrain=distill", *args], tmp_path, monkeypatch, capsys)


def test_the_distil_vs_scratch_presets_read_the_same_tokens_with_the_same_model(tmp_path):
    """experiments/distill/scratch and student: the same model, data, budget, seed, optimizer and
    tokenizer (the teacher's); they differ only in the stage."""
    from omegaconf import OmegaConf

    def resolved(arm: str) -> dict:
        cfg = compose_train([f"experiment=distill/{arm}"], tmp_path)
        return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra"}

    scratch, student = resolved("scratch"), resolved("student")
    for key in ("model", "data", "budget", "seed", "optim", "schedule", "trainer", "experiment_name"):
        assert scratch[key] == student[key], key
    teacher_dir = str(tmp_path / "runs" / "distill" / "teacher")
    assert scratch["tokenizer"]["path"] == teacher_dir + "/tokenizer.json" and student["posttrain"]["teacher"] == teacher_dir
    assert scratch["posttrain"]["_target_"].endswith("PretrainModule")
    assert student["posttrain"]["corpus"] is True and student["posttrain"]["lmbda"] == 0
    assert scratch["optim"]["lr"] == 3e-3  # pretraining's, not distill's TRL default (2e-5)


def test_corpus_distillation_refuses_what_makes_no_sense(teacher, tmp_path, monkeypatch, capsys, single_thread):
    """Exit 2 before any work: on-policy steps (the corpus has no prompts), posttrain.data keys it
    would ignore, a teacher whose position table is shorter than the student's rows."""
    base = [*CORPUS[:2], *CORPUS[3:], f"posttrain.teacher={teacher}"]
    learned = ModelConfig(**{**TEACHER_SHAPE, "max_seq_len": 16}, vocab_size=320, position=PositionConfig(kind="learned"))
    short = save_run(tmp_path / "short", Transformer(learned), learned, Tokenizer.load(teacher / "tokenizer.json"),
                     "pretrain")
    cases = [
        (base, ["posttrain.lmbda=0.5 with posttrain.corpus=true", "allowed: posttrain.lmbda=0"]),
        ([*base, "posttrain.lmbda=0", "posttrain.data.n_train=8", "posttrain.data.source=rows.jsonl"],
         ["posttrain.data.source: set with posttrain.corpus=true", "posttrain.data.n_train"]),
        ([*base[:-1], "posttrain.lmbda=0", f"posttrain.teacher={short}"],
         ["data.seq_len=32: the teacher", "learned position table of 16 rows"]),
    ]
    for overrides, phrases in cases:
        code, stderr = llm_cli_here(overrides[1:], tmp_path, monkeypatch, capsys)
        assert code == 2, (overrides, stderr[-3000:])
        assert "Traceback" not in stderr
        for phrase in phrases:
            assert phrase in stderr, (phrase, stderr[-3000:])
    assert not list(tmp_path.glob("runs/*/checkpoints/*"))


# ---------------------------------------------------------------- the on-policy fraction across a resume


def test_the_on_policy_fraction_goes_on_after_a_resume(parent, teacher, tmp_path, monkeypatch, capsys, single_thread):
    """lmbda 0.5, seed 0 draws steps (0, 1, 2) = on, off, off. One step, then resumed to 3: the fraction
    logged at steps 2 and 3 is 1/2 and 1/3 (a counter restarted at the resume would say 0 and 0). A
    checkpoint without the counts (an older run) derives them from the seeded draws."""
    import shutil

    assert [on_policy_step(0, s, 0.5) for s in range(3)] == [True, False, False]
    assert on_policy_count(0, 3, 0.5) == 1 and on_policy_count(0, 3, 0.0) == 0 and on_policy_count(0, 3, 1.0) == 3
    args = [f"init_from={parent}", f"posttrain.teacher={teacher}", *CLI_TINY, *DISTILL_ARGS, "posttrain.lmbda=0.5",
            "posttrain.data.eval_prompts=0"]
    code, err = llm_cli_here([*args, "budget.steps=1"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["llm"]["on_policy"] == {"steps": 1, "on_policy_steps": 1}
    old = tmp_path / "runs" / "old"  # the same run as an older version saved it: no counts
    shutil.copytree(run, old)
    del saved["llm"]["on_policy"]
    torch.save(saved, old / "checkpoints" / "last.ckpt")
    for resumed in (run, old):
        code, err = llm_cli_here([f"resume={resumed}", "budget.steps=3"], tmp_path, monkeypatch, capsys)
        assert code == 0, err[-3000:]
        fractions = [(r["step"], r["train/on_policy_fraction"])
                     for r in read_metrics(resumed / "metrics.jsonl") if "train/on_policy_fraction" in r]
        assert fractions == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))], (resumed.name, fractions)
