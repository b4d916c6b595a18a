"""Every option of every group composes, validates and instantiates; bad configs fail early,
naming the key, the value and what is allowed."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from llm.config import ConfigError, typed, validate
from llm.config.validate import tokenizer_vocab_size
from llm.model import ModelConfig, Transformer
from llm.scaling.flops import model_size
from tests.conftest import REPO, compose_train, llm_cli_output

CONF = REPO / "conf"
# (bench: llm-bench's own presets, not llm-train groups; tests/test_bench.py composes them)
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment", "bench"))
# Options that need a value no default can supply (a user's file or dataset).
REQUIRED = {
    ("tokenizer", "pretrained"): ["tokenizer.path=/nonexistent/tokenizer.json"],
    ("data", "text"): ["data.corpus.paths=/nonexistent/*.txt"],
    ("data", "hf"): ["data.corpus.name=some/dataset"],
    ("data", "synthetic"): ["tokenizer=byte"],
    ("data", "tokens"): ["data.corpus.train=/nonexistent/train.bin", "data.corpus.val=/nonexistent/val.bin",
                         "tokenizer=byte"],
    ("parallelism", "fsdp_tp"): ["trainer.devices=2"],  # tensor parallel over 2 ranks
    # trainer=gpu without a GPU is refused (test_bench); its other keys validate on the CPU
    ("trainer", "gpu"): [] if torch.cuda.is_available() else ["trainer.accelerator=cpu", "model.attention.kernel=sdpa"],
    ("parallelism", "hsdp"): ["trainer.devices=2"],  # 2 replicas
    # the cluster sweep's jobs use trainer=gpu: without CUDA they validate as their dry run does
    ("sweep", "isoflop_cluster"): [] if torch.cuda.is_available() else ["dry_run=true"],
    # pipeline stages: 2 ranks (x 2 data-parallel, x 2 tensor-parallel), untied embedding and head
    ("parallelism", "pp"): ["trainer.devices=2", "model.tie_embeddings=false"],
    ("parallelism", "pp_fsdp"): ["trainer.devices=4", "model.tie_embeddings=false"],
    ("parallelism", "pp_fsdp_tp"): ["trainer.devices=8", "model.tie_embeddings=false"],
    # Post-training starts from a trained model (validate reads no files: any path will do here).
    **{("posttrain", m): ["init_from=runs/base"] for m in ("sft", "reward", "dpo", "ppo", "grpo")},
    ("posttrain", "distill"): ["posttrain.teacher=runs/teacher"],  # a fresh student needs no init_from
}
# A GPU cluster's experiment validates here as its dry run does (trainer=gpu without CUDA is refused otherwise).
EXPERIMENT_REQUIRED = {"pp_fsdp_slurm": [] if torch.cuda.is_available() else ["dry_run=true"]}
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def build_on_meta(cfg) -> tuple[ModelConfig, Transformer]:
    model_cfg = typed(cfg.model, ModelConfig)
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = tokenizer_vocab_size(cfg.tokenizer) or 2048  # pretrained: no file here
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return model_cfg, model


def test_every_group_has_options():
    assert {"tokenizer", "model", "attention", "position", "data", "optim", "schedule", "trainer", "budget",
            "parallelism", "posttrain", "logger", "paths"} <= set(GROUPS)
    assert len(EXPERIMENTS) >= 3


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_instantiates(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}", *REQUIRED.get((group, option), [])], tmp_path)
    assert cfg.hydra.runtime.choices[group] == option
    validate(cfg)
    model_cfg, model = build_on_meta(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == model_size(model_cfg).params
    # Instantiate the group's object: the real target with the config's arguments.
    if group == "tokenizer":
        assert callable(instantiate(cfg.tokenizer))
    elif group == "data" and option != "hf":  # hf would download; its constructor is tested in test_data
        if option == "text":
            with pytest.raises(Exception, match="no file matches the pattern '/nonexistent"):
                instantiate(cfg.data.corpus)
        elif option == "mixture":  # no data.corpus: each source's corpus
            assert all(hasattr(instantiate(s.corpus), "documents") for s in cfg.data.sources.values())
        else:
            assert hasattr(instantiate(cfg.data.corpus), "documents")
    elif group in ("optim",):
        optimizer = instantiate(cfg.optim, _convert_="all")([torch.nn.Parameter(torch.zeros(2))])
        assert optimizer.defaults["lr"] == cfg.optim.lr
    elif group == "schedule":
        schedule = instantiate(cfg.schedule)
        assert 0 < schedule(0, 100) <= 1 and 0 <= schedule(99, 100) <= 1
    elif group == "parallelism":
        option_object = instantiate(cfg.parallelism)
        assert option_object.strategy() is not None
        if option in ("single", "ddp"):  # the sharding options need a process group (tests/test_parallel.py)
            assert option_object.parallelize(Transformer(ModelConfig(vocab_size=64, n_layers=1))) is not None
    elif group == "posttrain":
        assert callable(instantiate(cfg.posttrain))


def test_model_ladder_spans_tiny_to_one_billion(tmp_path):
    sizes = {}
    for option in [o for g, o in OPTIONS if g == "model"]:
        model_cfg, _ = build_on_meta(compose_train([f"model={option}"], tmp_path))
        sizes[option] = model_size(model_cfg).non_embedding
    assert min(sizes.values()) < 150_000, sizes
    assert 0.9e9 < max(sizes.values()) < 1.2e9, sizes
    assert 70e6 < sizes["gpt2_small"] < 100e6


def pairwise(factors: dict[str, list[str]]) -> list[dict[str, str]]:
    """A greedy covering array: every pair of values of every two factors appears in some row."""
    names = list(factors)
    candidates = [dict(zip(names, row)) for row in itertools.product(*factors.values())]

    def pairs(row: dict) -> set:
        return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(r) for r in candidates))
    rows = []
    while uncovered:  # take the row that covers most of what is still uncovered
        best = max(candidates, key=lambda r: len(pairs(r) & uncovered))
        rows.append(best)
        uncovered -= pairs(best)
    return rows


PAIRWISE = pairwise({
    "tokenizer": ["bpe", "unigram", "wordpiece", "byte"],
    "attention": ["mha", "mqa", "gqa"],
    "position": ["rope", "alibi", "learned", "sinusoidal", "none"],
    "model.norm": ["rmsnorm", "layernorm"],
    "model.mlp": ["swiglu", "gelu", "relu"],
})


@pytest.mark.parametrize("combo", PAIRWISE, ids=lambda c: "-".join(c.values()))
def test_pairwise_combinations_build_and_run(combo, tmp_path):
    cfg = compose_train([f"{k}={v}" for k, v in combo.items()] + ["model=nano"], tmp_path)
    validate(cfg)
    model_cfg = typed(cfg.model, ModelConfig)
    model_cfg.vocab_size = 64
    model = Transformer(model_cfg)
    assert sum(p.numel() for p in model.parameters()) == model_size(model_cfg).params
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()


def test_pairwise_covers_every_pair():
    assert 20 <= len(PAIRWISE) <= 30  # 4 tokenizers x 5 positions is the floor
    seen = {(a, r[a], b, r[b]) for r in PAIRWISE for a, b in itertools.combinations(r, 2)}
    assert ("tokenizer", "byte", "position", "alibi") in seen and ("attention", "mqa", "model.mlp", "relu") in seen


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_train([f"experiment={name}", *EXPERIMENT_REQUIRED.get(name, [])], tmp_path)
    validate(cfg)
    assert cfg.experiment_name == name
    build_on_meta(cfg)


def test_ablation_experiments_sweep_their_group(tmp_path):
    cfg = compose_train(["experiment=attention_ablation"], tmp_path)
    assert cfg.hydra.sweeper.params.attention == "mha,mqa,gqa"
    assert cfg.budget.flops is not None and cfg.budget.steps is None  # equal compute, not equal steps


BAD = [
    (["model.n_heads=6", "model.d_model=96", "attention=gqa", "model.attention.n_kv_heads=4"],
     ["model.attention.n_kv_heads=4", "must divide model.n_heads=6", "1, 2, 3, 6"]),
    (["model.n_heads=3"], ["model.n_heads=3", "must divide model.d_model=128"]),
    (["position=learned", "data.seq_len=512"], ["data.seq_len=512", "model.max_seq_len=256", "<= 256"]),
    (["model.head_dim=15"], ["model.head_dim=15", "even"]),
    (["data.global_batch_size=20"], ["data.global_batch_size=20", "multiple", "16"]),
    (["model.vocab_size=100"], ["model.vocab_size=100", ">= 2048"]),
    (["+model.n_head=4"], ["model.n_head", "unknown key", "Did you mean 'n_heads'"]),
    (["budget.tokens=1e6"], ["budget", "exactly one", "steps", "tokens"]),
    (["position=alibi", "model.attention.kernel=flash", "trainer.accelerator=cpu"], ["flash", "ALiBi"]),
    (["model.attention.kernel=flex", "trainer.accelerator=cpu"], ["model.attention.kernel='flex'", "CUDA"]),
    (["model.attention.window=0"], ["model.attention.window=0", ">= 1"]),
    (["data=synthetic"], ["tokenizer.kind='bpe'", "byte"]),
    (["optim.lr=-1"], ["optim.lr=-1", "in (0, 1]"]),
    (["+optim.momentum=0.9"], ["optim.momentum", "unknown key", "lr"]),
    (["posttrain=ppo", "+posttrain.kl_penalty=0.1"], ["posttrain.kl_penalty", "unknown key", "kl_coef"]),
    (["+lr=0.1"], ["lr: unknown key", "optim"]),
    (["model.dropout=1.5"], ["model.dropout=1.5", "[0, 1)"]),
    (["trainer.val_every=0"], ["trainer.val_every=0", ">= 1"]),
    (["budget.steps=-5"], ["budget.steps=-5", ">= 1"]),
    (["tokenizer=pretrained"], ["tokenizer.path=None", "tokenizer.path=..."]),
    (["data=text"], ["data.corpus.paths: required but not set"]),
    (["+model.attention.foo=1"], ["model.attention.foo", "unknown key", "n_kv_heads"]),
    (["+data.corpus.max_files=3"], ["data.corpus.max_files", "unknown key", "max_bytes"]),
    (["parallelism=ddp", "trainer.devices=3", "data.global_batch_size=32"], ["data.global_batch_size=32", "16 x 3 = 48"]),
    (["parallelism=fsdp_tp", "trainer.devices=2", "model.n_heads=3", "model.d_model=96"],
     ["parallelism.tensor_parallel=2: must divide model.n_heads=3"]),
    (["parallelism=fsdp_tp", "trainer.devices=4", "attention=mqa"],
     ["parallelism.tensor_parallel=2: must divide model.attention.n_kv_heads=1"]),
    (["parallelism=fsdp_tp", "trainer.devices=3"], ["parallelism.tensor_parallel=2: must divide the 3 ranks", "1, 3"]),
    (["parallelism=hsdp", "trainer.devices=2", "parallelism.replicate=4"], ["parallelism.replicate=4", "2 data-parallel"]),
    (["trainer.devices=2"], ["parallelism=single: runs one process", "ddp"]),
    (["parallelism=fsdp", "parallelism.param_dtype=bfloat16", "trainer.accelerator=cpu"],
     ["parallelism.param_dtype='bfloat16'", "needs CUDA"]),
    (["trainer.downstream.tasks=[adition]"], ["trainer.downstream.tasks: unknown built-in task(s) ['adition']",
                                               "addition"]),
    # Hydra's multi-select would merge both option files, the last one's values winning
    (["logger=[wandb,tensorboard]"], ["logger=[wandb,tensorboard]", "logger=wandb logger.also=[tensorboard]"]),
    (["attention=[mha,gqa]"], ["attention=[mha,gqa]: attention takes one option", "-m attention=mha,gqa"]),
    (["schedule.warmups=3"], None),  # a typo of an existing key: Hydra refuses it while composing
    (["model.n_heads=four"], None),  # a wrong type: refused while composing (typed schema)
]


@pytest.mark.parametrize("overrides,phrases", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configs_fail_naming_the_key(overrides, phrases, tmp_path):
    if phrases is None:
        with pytest.raises(ConfigCompositionException) as e:
            compose_train(overrides, tmp_path)
        key = overrides[0].split("=")[0]
        assert key in str(e.value) + str(e.value.__cause__)
        return
    cfg = compose_train(overrides, tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for phrase in phrases:
        assert phrase in str(e.value), str(e.value)


def test_all_problems_reported_at_once(tmp_path):
    cfg = compose_train(["model.dropout=2", "optim.lr=-1", "trainer.log_every=0", "trainer.guard.window=0"], tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert len(e.value.problems) == 4, e.value.problems


# The llm-train command lines below run in this process (tests.conftest.llm_cli_output): a
# subprocess would show nothing more, for seconds of CI each.

def test_cli_bad_config_exits_before_reading_data(tmp_path, monkeypatch, capsys):
    code, _, stderr = llm_cli_output("train", ["model.n_heads=6", "model.d_model=96", "attention=gqa",
                                               "model.attention.n_kv_heads=4"], tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    assert "model.attention.n_kv_heads=4" in stderr and "must divide" in stderr
    assert not (tmp_path / ".cache").exists()  # no tokenizer trained, no data tokenised
    assert not list(tmp_path.glob("runs/*/summary.json"))  # nothing a later run could take for output


def test_cli_help_lists_groups(tmp_path, monkeypatch, capsys):
    code, stdout, _ = llm_cli_output("train", ["--help"], tmp_path, monkeypatch, capsys)
    assert code == 0
    for group in ("attention: gqa, mha, mqa", "position: alibi, learned, none, rope, sinusoidal", "experiment:"):
        assert group in stdout, stdout


def test_cli_override_of_a_key_that_does_not_exist_names_it(tmp_path, monkeypatch, capsys):
    # Attention options live under model.attention; `attention.n_kv_heads` is not a key.
    code, _, stderr = llm_cli_output("train", ["model.n_heads=6", "attention.n_kv_heads=4"], tmp_path, monkeypatch, capsys)
    assert code != 0
    assert "attention.n_kv_heads" in stderr
    assert not (tmp_path / ".cache").exists()


# ---------------------------------------------------------------- typed schemas and declared ranges

# A wrong choice is refused while Hydra composes, with OmegaConf's list of the allowed values.
COMPOSE_REFUSED = [
    (["posttrain=ppo", "posttrain.kl_estimator=k2"], "[k1, k3]"),
    (["posttrain=dpo", "posttrain.loss_type=kto"], "[sigmoid, ipo, hinge]"),
    (["posttrain=grpo", "posttrain.scale_rewards=std"], "[group, batch, none]"),
    (["posttrain=grpo", "posttrain.loss_aggregation=mean"], "[token, sequence]"),
    (["posttrain=sft", "posttrain.data.format=csv"], "prompt_completion"),
    (["model.norm=batchnorm"], "[rmsnorm, layernorm]"),
    (["model.mlp=geglu"], "[swiglu, gelu, gelu_tanh, relu]"),
    (["model.norm_placement=sandwich"], "[pre, post]"),
    (["model.position.kind=xpos"], "[rope, alibi, learned, sinusoidal, none]"),
    (["model.attention.kernel=xformers"], "[sdpa, flash, flex]"),
    (["trainer.precision=fp8"], "bf16-mixed"),
    (["trainer.accelerator=npu"], "[auto, cpu, gpu, cuda, mps, tpu]"),
    (["trainer.matmul_precision=low"], "[highest, high, medium]"),
    (["logger.kind=mlflow"], "[wandb, csv, tensorboard, none]"),
    (["logger.mode=sometimes"], "[auto, online, offline, disabled]"),
    (["tokenizer.kind=sentencepiece"], "[bpe, unigram, wordpiece, byte, pretrained]"),
    (["schedule=wsd", "schedule.decay_shape=exponential"], "[linear, sqrt, cosine]"),
    (["parallelism.activation_checkpointing=some"], "[none, full, every_n]"),
    (["parallelism=fsdp", "parallelism.param_dtype=fp8"], "[float32, bfloat16, float16]"),
    (["parallelism=hsdp", "parallelism.reduce_dtype=int8"], "[float32, bfloat16, float16]"),
    (["trainer.devices=two"], "could not be converted to Integer"),
    (["model.n_layers=1.5"], "could not be converted to Integer"),
    (["optim.lr=fast"], "could not be converted to Float"),
]


@pytest.mark.parametrize("overrides,allowed", COMPOSE_REFUSED, ids=[" ".join(o) for o, _ in COMPOSE_REFUSED])
def test_wrong_choices_and_types_are_refused_while_composing(overrides, allowed, tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(overrides, tmp_path)
    message = f"{e.value}\n{e.value.__cause__}"
    key = overrides[-1].lstrip("+").split("=")[0]
    assert key in message and allowed in message, message


# Numbers outside their declared range: refused by validate, naming key, value and what is allowed.
OUT_OF_RANGE = [
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1.0: must be >= 0"),  # gradient ascent
    (["schedule.min_lr_ratio=-0.1"], "schedule.min_lr_ratio=-0.1: must be in [0, 1]"),
    (["optim.lr=inf"], "optim.lr=inf: must be finite (allowed: (0, 1])"),
    (["budget=flops", "budget.flops=nan"], "budget.flops=nan: must be finite"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0: must be in [1, 65536]"),
    (["trainer.devices=0"], "trainer.devices=0: must be in [1, 65536]"),
    (["model.mlp_hidden=-5"], "model.mlp_hidden=-5: must be in [1, 1048576]"),
    (["model.n_layers=1000000000000"], "model.n_layers=1000000000000: must be in [1, 1024]"),
    (["model.init_std=0"], "model.init_std=0.0: must be in (0, 1]"),
    (["model.norm_eps=-1e-5"], "model.norm_eps=-1e-05: must be in (0, 0.1]"),
    (["model.position.rope_base=nan"], "model.position.rope_base=nan: must be finite"),
    (["model.attention.n_kv_heads=0"], "model.attention.n_kv_heads=0: must be in [1, 1024]"),
    (["data.seq_len=0"], "data.seq_len=0: must be in [1, 4194304]"),
    (["data.micro_batch_size=-8"], "data.micro_batch_size=-8: must be in [1, 1048576]"),
    (["data.val_batches=-1"], "data.val_batches=-1: must be >= 0"),
    (["data.corpus.val_fraction=0"], "data.corpus.val_fraction=0.0: must be in (0, 1)"),
    (["data=synthetic", "tokenizer=byte", "data.corpus.n_symbols=1"], "data.corpus.n_symbols=1: must be in [2, 62]"),
    (["trainer.guard.spike_threshold=-inf"], "trainer.guard.spike_threshold=-inf: must be finite"),
    (["trainer.guard.skip_batches=[3,-1]"], "trainer.guard.skip_batches=[3, -1]: [1]=-1 must be >= 0"),
    (["trainer.keep_last=0"], "trainer.keep_last=0: must be >= 1"),
    (["trainer.guard.warmup_steps=0"], "trainer.guard.warmup_steps=0: must be >= 1"),  # every loss a spike
    (["budget=tokens", "budget.tokens=-1"], "budget.tokens=-1.0: must be > 0"),
    (["budget=chinchilla", "budget.tokens_per_param=0"], "budget.tokens_per_param=0.0: must be > 0"),
    (["tokenizer.min_frequency=-1"], "tokenizer.min_frequency=-1: must be >= 0"),
    (["tokenizer.vocab_size=-2048"], "tokenizer.vocab_size=-2048: must be in [1, 16777216]"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]: [1]=1.5 must be in [0, 1)"),
    (["optim.eps=0"], "optim.eps=0.0: must be in (0, 1]"),
    (["optim.eps=1e30"], "optim.eps=1e+30: must be in (0, 1]"),  # the update would vanish
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
    (["schedule.warmup=-1"], "schedule.warmup=-1.0: must be in [0, 1000000000]"),
    (["budget=tokens", "schedule.warmup=1e30"], "schedule.warmup=1e+30: must be in [0, 1000000000]"),
    (["schedule=wsd", "schedule.decay_fraction=1.5"], "schedule.decay_fraction=1.5: must be in [0, 1]"),
    (["schedule=wsd", "schedule.branches=[0.5,1.0]"], "schedule.branches=[0.5, 1.0]: [1]=1.0 must be in (0, 1)"),
    (["parallelism=ddp", "parallelism.checkpoint_every_n=0"], "parallelism.checkpoint_every_n=0: must be in [1, 1024]"),
    (["parallelism=fsdp", "parallelism.tensor_parallel=0"], "parallelism.tensor_parallel=0: must be in [1, 65536]"),
    (["parallelism=hsdp", "trainer.devices=2", "parallelism.replicate=-2"], "parallelism.replicate=-2: must be in [1, 65536]"),
    (["seed=-1"], "seed=-1: must be in [0, 4294967295]"),
    (["posttrain=dpo", "init_from=x", "posttrain.beta=0"], "posttrain.beta=0.0: must be in (0, 100]"),
    (["posttrain=dpo", "init_from=x", "posttrain.label_smoothing=0.5"], "posttrain.label_smoothing=0.5: must be in [0, 0.5)"),
    (["posttrain=ppo", "init_from=x", "posttrain.gamma=1.5"], "posttrain.gamma=1.5: must be in [0, 1]"),
    (["posttrain=ppo", "init_from=x", "posttrain.temperature=0"], "posttrain.temperature=0.0: must be in (0, 100]"),
    (["posttrain=grpo", "init_from=x", "posttrain.num_generations=1"], "posttrain.num_generations=1: must be in [2, 4096]"),
    (["posttrain=grpo", "init_from=x", "posttrain.epsilon_high=-0.2"], "posttrain.epsilon_high=-0.2: must be in (0, 100]"),
    (["posttrain=reward", "init_from=x", "posttrain.margin=inf"], "posttrain.margin=inf: must be finite"),
    (["posttrain=sft", "init_from=x", "posttrain.lora.rank=0"], "posttrain.lora.rank=0: must be in [1, 65536]"),
    (["posttrain=sft", "init_from=x", "posttrain.data.val_fraction=1"], "posttrain.data.val_fraction=1.0: must be in (0, 1)"),
    (["posttrain=sft", "init_from=x", "posttrain.data.n_train=0"], "posttrain.data.n_train=0: must be in [1, 16777216]"),
]


@pytest.mark.parametrize("overrides,phrase", OUT_OF_RANGE, ids=[" ".join(o) for o, _ in OUT_OF_RANGE])
def test_numbers_outside_their_declared_range_are_refused(overrides, phrase, tmp_path):
    cfg = compose_train(overrides, tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert any(p.startswith(phrase) for p in e.value.problems), e.value.problems


CROSS_GROUP = [
    (["init_from=runs/base"], ["init_from='runs/base': only a post-training method", "posttrain=none"]),
    (["posttrain=sft"], ["init_from: posttrain=sft starts from a trained model"]),
    (["posttrain=sft", "init_from=x", "posttrain.lora.enabled=true", "parallelism=fsdp_tp", "trainer.devices=2"],
     ["posttrain.lora.enabled=true with parallelism.tensor_parallel=2"]),
    (["posttrain=dpo", "init_from=x", "posttrain.data.packing=true"], ["posttrain.data.packing=true", "dpo"]),
    (["posttrain=dpo", "init_from=x", "posttrain.data.format=prompt_completion"],
     ["posttrain.data.format='prompt_completion'", "allowed: preference, implicit_preference"]),
    (["posttrain=ppo", "init_from=x", "posttrain.num_mini_batches=32"], ["posttrain.num_mini_batches=32", "1..16"]),
    (["posttrain=grpo", "init_from=x", "posttrain.data.source=rows.jsonl"], ["posttrain.reward_model: required"]),
    (["posttrain=grpo", "init_from=x", "position=learned", "posttrain.max_new_tokens=250"],
     ["posttrain.max_new_tokens=250", "model.max_seq_len=256", "<= 192"]),
    (["posttrain=sft", "init_from=x", "posttrain.data.tasks.addition.max_digits=0"],
     ["posttrain.data.tasks.addition={'max_digits': 0}"]),
    (["data=tasks", "tokenizer=byte", "+data.corpus.weights={addition: -1}"], ["data.corpus.weights={'addition': -1.0}"]),
    (["budget.tokens=1e6"], ["budget.steps=600, budget.tokens=1000000.0", "exactly one"]),
    (["optim.weight_decay=2000"], ["optim.weight_decay=2000.0", "1 - lr x weight_decay"]),
    (["optim.betas=[0.9]"], ["optim.betas=[0.9]", "two"]),
    (["schedule.warmup=700"], ["schedule.warmup=700", "longer than the run (budget.steps=600)", "1..600 steps"]),
    (["tokenizer=unigram", "tokenizer.vocab_size=300"], ["tokenizer.vocab_size=300", ">= 512"]),
    (["data=synthetic", "tokenizer=byte", "data.corpus.n_symbols=4", "data.corpus.branching=5"],
     ["data.corpus.branching=5", "2..4"]),
]


@pytest.mark.parametrize("overrides,phrases", CROSS_GROUP, ids=[" ".join(o) for o, _ in CROSS_GROUP])
def test_rules_across_keys_and_groups(overrides, phrases, tmp_path):
    cfg = compose_train(overrides, tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for phrase in phrases:
        assert phrase in str(e.value), str(e.value)


def test_value_model_under_tensor_parallelism_validates(tmp_path):
    # The TP plan shards the reward model too (tests/test_parallel.py runs it); on-policy methods
    # are refused under TP: their rollouts' KV cache holds every K/V head.
    validate(compose_train(["posttrain=reward", "init_from=x", "parallelism=fsdp_tp", "trainer.devices=2"], tmp_path))
    for method in ("ppo", "grpo"):
        with pytest.raises(ConfigError, match=f"posttrain={method} with parallelism.tensor_parallel=2: rollouts"):
            validate(compose_train([f"posttrain={method}", "init_from=x", "parallelism=fsdp_tp", "trainer.devices=2"],
                                   tmp_path))


def _numeric(annotation) -> bool:
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict:  # task knobs and weights: checked by building the tasks
        return False
    return annotation in (int, float) or any(_numeric(a) for a in args)


def test_every_numeric_key_of_every_schema_declares_its_range():
    import dataclasses
    import typing

    from llm.config.schema import SCHEMAS, TARGET_SCHEMAS, RunSchema
    from llm.fields import RANGE

    def walk(schema, prefix):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                yield from walk(kind, f"{prefix}.{f.name}")
            elif _numeric(kind):
                yield f"{prefix}.{f.name}", RANGE in f.metadata

    schemas = {**SCHEMAS, **{s.__name__: s for s in TARGET_SCHEMAS.values()}, "run": RunSchema}
    keys = dict(kv for name, s in schemas.items() for kv in walk(s, name))
    assert len(keys) > 100
    assert [k for k, declared in keys.items() if not declared] == []


def test_choices_are_the_values_the_code_accepts():
    from llm.config.methods import DataFormat, DPOLoss, KLEstimator, LossAggregation, RewardScaling
    from llm.config.schema import CheckpointMode, DecayShape, DType, TokenizerKind
    from llm.data.formats import FORMATS
    from llm.parallel.apply import CHECKPOINT_MODES
    from llm.parallel.fsdp import DTYPES
    from llm.stages.objectives import DPO_LOSSES, GRPO_AGGREGATIONS, GRPO_SCALES, KL_ESTIMATORS
    from llm.stages.schedule import WSD
    from llm.tokenizer import KINDS

    pairs = [(DPOLoss, DPO_LOSSES), (KLEstimator, KL_ESTIMATORS), (RewardScaling, GRPO_SCALES),
             (LossAggregation, GRPO_AGGREGATIONS), (DecayShape, WSD.SHAPES), (CheckpointMode, CHECKPOINT_MODES),
             (DType, DTYPES), (TokenizerKind, KINDS), (DataFormat, FORMATS)]
    for choice, accepted in pairs:
        assert set(choice.values()) == set(accepted), choice


def test_stage_code_gets_plain_strings_from_instantiate(tmp_path):
    from llm.parallel import Single
    from llm.stages.dpo import DPOModule

    runtime = dict(model_config=ModelConfig(vocab_size=64, n_layers=1, d_model=32), optimizer=None, schedule=None,
                   parallelism=Single(), total_steps=1, tokens_per_step=1, flops_per_token=1.0)
    cases = [(["posttrain=dpo", "posttrain.loss_type=ipo"], "loss_type", "ipo"),
             (["posttrain=ppo", "posttrain.kl_estimator=k3"], "kl_estimator", "k3"),
             (["posttrain=grpo", "posttrain.loss_aggregation=sequence"], "loss_aggregation", "sequence")]
    for overrides, attribute, value in cases:
        cfg = compose_train([*overrides, "init_from=x"], tmp_path)
        module = instantiate(cfg.posttrain, _convert_="all")(**runtime)
        assert getattr(module, attribute) == value and type(getattr(module, attribute)) is str
    schedule = instantiate(compose_train(["schedule=wsd", "schedule.decay_shape=sqrt"], tmp_path).schedule)
    assert 0 < schedule(9, 10) < 1  # the decay shape is looked up by its name
    # A constructor called directly checks its arguments against the same schema: exit code 2, not a traceback.
    with pytest.raises(ConfigError, match=r"posttrain.loss_type='kto'.*expected one of \[sigmoid, ipo, hinge\]"):
        DPOModule(loss_type="kto", **runtime)
    with pytest.raises(ConfigError, match=r"posttrain.beta=-1.0: must be in \(0, 100\]"):
        DPOModule(beta=-1.0, **runtime)
    with pytest.raises(ConfigError, match=r"posttrain.lora.rank=0: must be in \[1, 65536\]"):
        DPOModule(lora={"enabled": True, "rank": 0}, **runtime)


def test_typed_configs_hold_plain_strings_that_checkpoints_store(tmp_path):
    import dataclasses
    import io

    from llm.config import method_config, method_schema
    from llm.config.methods import PPOConfig
    from llm.config.schema import TrainerSchema

    cfg = compose_train(["posttrain=ppo", "init_from=x", "posttrain.kl_estimator=k3", "model.norm=layernorm",
                         "trainer.precision=bf16-mixed"], tmp_path)
    method = method_config(cfg)
    assert isinstance(method, PPOConfig) and method_schema("llm.stages.ppo.PPOModule") is PPOConfig
    assert type(method.kl_estimator) is str and method.data.source == "tasks" and method.lora.enabled is False
    assert type(typed(cfg.trainer, TrainerSchema).precision) is str
    model = typed(cfg.model, ModelConfig)
    assert type(model.norm) is str and type(model.position.kind) is str
    buffer = io.BytesIO()
    torch.save({"model_config": dataclasses.asdict(model)}, buffer)  # as checkpoints store it
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["model_config"]["norm"] == "layernorm"


def test_a_config_read_back_untyped_is_checked_the_same(tmp_path):
    # resume= rebuilds the config from run.json: plain data, no schema attached.
    from omegaconf import OmegaConf

    cfg = compose_train(["posttrain=ppo", "init_from=x"], tmp_path)
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    validate(plain)
    plain.posttrain.kl_estimator = "k2"
    plain.trainer.gradient_clip_val = -1
    with pytest.raises(ConfigError) as e:
        validate(plain)
    assert any("posttrain.kl_estimator='k2'" in p and "[k1, k3]" in p for p in e.value.problems), e.value.problems
    assert any(p.startswith("trainer.gradient_clip_val=-1.0: must be >= 0") for p in e.value.problems), e.value.problems
