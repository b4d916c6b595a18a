"""Downstream evaluation: our checkpoints as an lm-evaluation-harness model (log-likelihood,
rolling log-likelihood, generate-until) against direct computations from the logits and against
the harness's own `hf` model on the exported folder; multiple-choice scoring of the built-in tasks
by hand; `llm-eval harness`; the in-training evaluation. Tiny random models; task definitions and
data are written here (no hub: HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from llm.evaluate.harness import HarnessLM, evaluate, scores  # noqa: E402
from llm.evaluate.harness_tasks import write_builtin_tasks  # noqa: E402
from llm.evaluate.loglikelihood import encode_pair  # noqa: E402
from llm.evaluate.multiple_choice import Question, choose, questions, score_questions  # noqa: E402
from llm.generate import generate  # noqa: E402
from llm.model import AttentionConfig, ModelConfig, Transformer  # noqa: E402
from llm.tokenizer import Tokenizer, build_tokenizer  # noqa: E402
from tests.conftest import llm_cli  # noqa: E402
from tests.test_posttrain import save_run  # noqa: E402

MAX_LEN = 64
# A local task of the usual harness shape: question, a space before each choice (target_delimiter).
LOCAL_TASK = {"task": "local_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
              "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
LOCAL_ROWS = [{"q": "2+2", "choices": ["4", "five", "22"], "gold": 0},
              {"q": "copy ab", "choices": ["ab", "ba"], "gold": 0},
              {"q": "sort 3,1", "choices": ["3,1", "1,3", "1,1,3"], "gold": 1}]


def instance(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return build_tokenizer(None, tmp_path_factory.mktemp("cache"), kind="byte")


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    """Llama family (RoPE, GQA, untied head), max_seq_len 64 so the rolling windows roll."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, max_seq_len=MAX_LEN, tie_embeddings=False, init_std=0.1,
                      attention=AttentionConfig(n_kv_heads=2), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def lm(model, tokenizer) -> HarnessLM:
    return HarnessLM(model, tokenizer, batch_size=3)


def direct_logprob(model, ids: list[int], n_continuation: int) -> tuple[float, bool]:
    """Sum of log p of the last n tokens of `ids`, from one forward pass over all of them."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
    targets = torch.tensor(ids[1:])
    picked = logprobs[-n_continuation:].gather(1, targets[-n_continuation:, None])
    greedy = bool((logprobs[-n_continuation:].argmax(-1) == targets[-n_continuation:]).all())
    return float(picked.sum()), greedy


def test_loglikelihood_equals_the_logits_and_says_when_greedy(lm, model, tokenizer):
    context = "def add(a, b):\n    return"
    requests = [(context, " a + b"), ("", "hello"), ("Q: 2+2\nA: ", "4")]
    got = lm.loglikelihood([instance("loglikelihood", *r) for r in requests])
    for (ctx, cont), (logprob, is_greedy) in zip(requests, got):
        if ctx:
            ctx_ids, cont_ids = encode_pair(tokenizer, ctx, cont)
        else:  # an empty context is the BOS token
            ctx_ids, cont_ids = [tokenizer.bos_id], tokenizer.encode(cont)
        want, want_greedy = direct_logprob(model, ctx_ids + cont_ids, len(cont_ids))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert is_greedy == want_greedy
    # is_greedy: the model's own greedy tokens are; the same with one token changed are not. Argmax
    # over the whole padded vocabulary, as transformers' logits of the export are (HFLM's is_greedy).
    ctx_ids, greedy_ids = tokenizer.encode(context), []
    for _ in range(3):
        with torch.no_grad():
            greedy_ids.append(int(model(torch.tensor([ctx_ids + greedy_ids]))[0, -1].argmax()))
    changed = [*greedy_ids[:2], (greedy_ids[2] + 1) % tokenizer.vocab_size]
    (_, yes), (_, no) = lm._loglikelihood_tokens([(None, ctx_ids, greedy_ids), (None, ctx_ids, changed)])
    assert yes is True and no is False
    # The trailing space of a context moves to the continuation, as the harness's HFLM does it.
    assert encode_pair(tokenizer, "A: ", "4") == (tokenizer.encode("A:"), tokenizer.encode(" 4"))


def test_rolling_loglikelihood_is_the_whole_text_after_bos_and_rolls_past_max_length(lm, model, tokenizer):
    short = "the quick brown fox"
    ids = tokenizer.encode(short)
    (got,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", short)])
    assert got == pytest.approx(direct_logprob(model, [tokenizer.bos_id, *ids], len(ids))[0], abs=1e-4)
    long = "abcdefghij" * 15  # 150 tokens: three windows of the 64-token model
    ids = tokenizer.encode(long)
    (got,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", long)])
    # The harness's disjoint windows: BOS + the first 64 tokens, then each next <= 64 tokens read
    # after the 64 before them (the model's whole window).
    want = direct_logprob(model, [tokenizer.bos_id, *ids[:MAX_LEN]], MAX_LEN)[0]
    done = MAX_LEN
    while done < len(ids):
        end = min(done + MAX_LEN, len(ids))
        want += direct_logprob(model, ids[end - MAX_LEN - 1:end], end - done)[0]
        done = end
    assert got == pytest.approx(want, abs=1e-3)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm, model, tokenizer):
    prompts = ["x = 1\n", "import"]
    out = lm.generate_until([instance("generate_until", p, {"until": ["\n"], "max_gen_toks": 12, "do_sample": False})
                             for p in prompts])
    for prompt, text in zip(prompts, out):
        full = tokenizer.decode(generate(model, [tokenizer.encode(prompt)], 12)[0])
        assert text == full.split("\n")[0].split("<|eos|>")[0]
        assert "\n" not in text


# ------------------------------------------------------------- multiple choice, by hand


def test_choose_takes_the_likeliest_choice_and_acc_norm_divides_by_length():
    assert choose([-3.0, -1.0, -2.0], ["a", "b", "c"]) == (1, 1)
    # -3 over 1 character vs -4 over 4: the sum prefers the first, per character the second.
    assert choose([-3.0, -4.0], ["x", "abcd"]) == (0, 1)


def test_multiple_choice_scoring_follows_the_model_likelihoods(model, tokenizer):
    items = questions("addition", {"max_digits": 2}, n=6, n_choices=3)
    assert all(len(q.choices) == 3 and len(set(q.choices)) == 3 for q in items)
    assert all(str(sum(map(int, q.prompt[:-1].split("+")))) == q.choices[q.gold] for q in items)
    # Each question with its gold swapped to the model's favourite choice: acc 1; to its least liked: 0.
    favourite, least = [], []
    for q in items:
        lls = [direct_logprob(model, ctx + cont, len(cont))[0]
               for ctx, cont in (encode_pair(tokenizer, q.prompt, c) for c in q.choices)]
        favourite.append(Question(q.prompt, q.choices, max(range(3), key=lls.__getitem__)))
        least.append(Question(q.prompt, q.choices, min(range(3), key=lls.__getitem__)))
    assert score_questions(model, tokenizer, favourite, batch_size=4).acc == 1.0
    assert score_questions(model, tokenizer, least, batch_size=4).acc == 0.0


# ------------------------------------------------------------- through the harness, ours and HF


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    """A folder with one local task: its YAML and its JSONL data."""
    folder = tmp_path_factory.mktemp("local_tasks")
    data = folder / "local_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in LOCAL_ROWS))
    (folder / "local_mc.yaml").write_text(json.dumps({**LOCAL_TASK, "dataset_kwargs": {"data_files": {"test": str(data)}}}))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, local_dir) -> list[Path]:
    builtin = tmp_path_factory.mktemp("builtin_tasks")
    write_builtin_tasks(builtin, ["addition"], {"addition": {"max_digits": 2}}, n=6, n_choices=3)
    return [local_dir, builtin]


TASKS = ["local_mc", "llm_addition", "llm_addition_gen", "llm_addition_text"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, tokenizer) -> tuple[Path, Path]:
    """The model as a run directory and as its `llm-hf export` folder."""
    from llm.interop import export_checkpoint

    run = save_run(tmp_path_factory.mktemp("runs") / "tiny", model, model.cfg, tokenizer, "pretrain")
    return run, export_checkpoint(run, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def harness_scores(exported, model, tokenizer, task_dir) -> dict:
    """One harness run of every task on our model and on its export through the harness's `hf` model."""
    from lm_eval.models.huggingface import HFLM

    ours = scores(evaluate(HarnessLM(model, tokenizer, batch_size=4), TASKS, task_dir))
    hf = scores(evaluate(HFLM(pretrained=str(exported[1]), device="cpu", batch_size=4, dtype="float32"), TASKS,
                         task_dir))
    return {"llm": ours, "hf": hf}


@pytest.mark.slow  # about a minute on a loaded 2-core CPU; CI compares the two through llm-eval harness below
def test_our_model_and_its_hf_export_score_the_same_through_the_harness(harness_scores):
    ours, hf = harness_scores["llm"], harness_scores["hf"]
    assert set(ours) == set(hf) == set(TASKS)
    assert set(ours["llm_addition_text"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for task in TASKS:
        assert set(ours[task]) == set(hf[task])
        for metric, value in ours[task].items():
            assert value == pytest.approx(hf[task][metric], rel=1e-5, abs=1e-6), (task, metric)


@pytest.mark.slow
def test_builtin_scoring_without_the_harness_gives_the_harness_scores(harness_scores, model, tokenizer):
    items = questions("addition", {"max_digits": 2}, n=6, n_choices=3)
    result = score_questions(model, tokenizer, items)
    assert (result.acc, result.acc_norm) == pytest.approx(
        (harness_scores["llm"]["llm_addition"]["acc"], harness_scores["llm"]["llm_addition"]["acc_norm"]))
    # And local_mc by hand: the rows' choices after " " (the harness's default target_delimiter).
    local = [Question(f"Q: {r['q']}\nA:", tuple(r["choices"]), r["gold"]) for r in LOCAL_ROWS]
    result = score_questions(model, tokenizer, local, delimiter=" ")
    assert result.acc == pytest.approx(harness_scores["llm"]["local_mc"]["acc"])
    assert result.acc_norm == pytest.approx(harness_scores["llm"]["local_mc"]["acc_norm"])


# ------------------------------------------------------------- llm-eval harness


def test_llm_eval_harness_scores_ours_and_the_hf_export_alike_and_writes_json_and_metrics(
        exported, model, tokenizer, local_dir, tmp_path, monkeypatch, capsys):
    run, folder = exported
    code, err = llm_cli("evaluate", ["harness", f"checkpoint={run}", "tasks=[local_mc]", f"include_path={local_dir}",
                                     "builtin=[addition]", "builtin_questions=3", "builtin_choices=3", "batch_size=4",
                                     f"compare_hf={folder}", f"paths.cache_dir={tmp_path / 'cache'}"],
                        tmp_path, monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((run / "harness.json").read_text())
    ours, hf = report["results"]["llm"], report["results"]["hf"]
    assert set(ours) == set(hf) == {"local_mc", "llm_addition", "llm_addition_gen", "llm_addition_text"}
    assert set(ours["llm_addition_text"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for task in ours:  # multiple choice, generate-until and rolling log-likelihood: the same scores
        assert ours[task].keys() == hf[task].keys()
        for metric, value in ours[task].items():
            assert value == pytest.approx(hf[task][metric], rel=1e-5, abs=1e-6), (task, metric)
    assert report["max_abs_difference"] < 1e-5
    # The harness's local_mc by hand: each row's choices after " " (its default target_delimiter).
    local = [Question(f"Q: {r['q']}\nA:", tuple(r["choices"]), r["gold"]) for r in LOCAL_ROWS]
    by_hand = score_questions(model, tokenizer, local, delimiter=" ")
    assert (ours["local_mc"]["acc"], ours["local_mc"]["acc_norm"]) == pytest.approx((by_hand.acc, by_hand.acc_norm))
    # The built-in questions are the run's held-out ones (default knobs: the run.json has no data=tasks).
    by_hand = score_questions(model, tokenizer, questions("addition", None, n=3, n_choices=3))
    assert ours["llm_addition"]["acc"] == pytest.approx(by_hand.acc)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 0 and logged[-1]["eval/local_mc/acc"] == ours["local_mc"]["acc"]
    assert "eval/llm_addition_text/bits_per_byte" in logged[-1] and "eval/hf" not in str(logged[-1])


def test_llm_eval_harness_refuses_bad_settings_before_loading_anything(tmp_path, monkeypatch, capsys):
    code, err = llm_cli("evaluate", ["harness", "checkpoint=nowhere", "builtin=[adition]", "include_path=nofolder"],
                        tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "builtin=['adition']: unknown built-in task" in err and "include_path='nofolder'" in err
    assert "checkpoint" in err
    code, err = llm_cli("evaluate", ["harness", "checkpoint=nowhere"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "nothing to evaluate" in err


# ------------------------------------------------------------- in-training evaluation


def test_training_logs_downstream_scores_against_tokens_at_step_zero_and_every_n(tmp_path, monkeypatch, capsys):
    args = ["model=nano", "data=tasks", "tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=4",
            "data.corpus.n_documents=4", "data.corpus.val_documents=2", "data.corpus.samples_per_document=8",
            "data.val_batches=1", "budget=steps", "budget.steps=4", "logger=none", "trainer.progress_bar=false",
            "trainer.downstream.every=2", "trainer.downstream.tasks=[addition,counting]",
            "trainer.downstream.questions=4", f"paths.runs_dir={tmp_path}/runs", f"hydra.run.dir={tmp_path}/run",
            f"paths.cache_dir={tmp_path}/cache"]
    code, err = llm_cli("train", args, tmp_path, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/addition/acc" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    tokens_per_step = 4 * 32
    assert [r["trainer/tokens"] for r in evals] == [0, 2 * tokens_per_step, 4 * tokens_per_step]
    assert all(r["trainer/flops"] > 0 for r in evals[1:])
    assert all(0 <= r[f"eval/{t}/{m}"] <= 1 for r in evals for t in ("addition", "counting") for m in ("acc", "acc_norm"))


@pytest.mark.slow  # the harness in the training loop: 11 s on 2 cores; CI covers its parts above
def test_training_runs_harness_tasks_too(local_dir, tmp_path, monkeypatch, capsys):
    args = ["model=nano", "data=tasks", "tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=4",
            "data.corpus.n_documents=4", "data.corpus.val_documents=2", "data.corpus.samples_per_document=8",
            "data.val_batches=1", "budget=steps", "budget.steps=2", "logger=none", "trainer.progress_bar=false",
            "trainer.downstream.every=2", "trainer.downstream.harness=[local_mc]",
            f"trainer.downstream.harness_include={local_dir}", f"paths.runs_dir={tmp_path}/runs",
            f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"]
    code, err = llm_cli("train", args, tmp_path, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/local_mc/acc" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(r["eval/local_mc/acc"] in (0, 1 / 3, 2 / 3, 1) for r in evals)


def test_wandb_plots_each_downstream_metric_against_tokens():
    from llm.tracking.wandb import define_token_axis

    class Run:  # records what W&B's run.define_metric is told
        def __init__(self):
            self.defined = []

        def define_metric(self, name, step_metric=None):
            self.defined.append((name, step_metric))

    run = Run()
    define_token_axis(run, ["eval/addition/acc", "eval/addition/acc_norm", "trainer/tokens", "trainer/flops"])
    assert run.defined == [("eval/addition/acc", "trainer/tokens"), ("eval/addition/acc_norm", "trainer/tokens")]


def test_the_score_table_keeps_its_columns_apart_for_huge_perplexities():
    """An untrained model's word perplexity reaches 1e11: the columns must not run together."""
    from llm.evaluate.harness_run import table

    text = table({"llm": {"t_text": {"word_perplexity": 282801528712.71, "bits_per_byte": 7.879}},
                  "hf": {"t_text": {"word_perplexity": 282801579281.57, "bits_per_byte": 7.879}}})
    header, huge, small = text.splitlines()
    assert header.split() == ["task", "metric", "llm", "hf"]
    assert huge.split() == ["t_text", "word_perplexity", "2.828015e+11", "2.828016e+11"]
    assert small.split() == ["t_text", "bits_per_byte", "7.8790", "7.8790"]
