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
from tests.conftest import REPO, compose_train, run_cli

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))
# Options that need a value no default can supply (a user's file or dataset).
REQUIRED = {
    ("tokenizer", "pretrained"): ["tokenizer.path=/nonexistent/tokenizer.json"],
    ("data", "text"): ["data.corpus.paths=/nonexistent/*.txt"],
    ("data", "hf"): ["data.corpus.name=some/dataset"],
    ("data", "synthetic"): ["tokenizer=byte"],
    ("parallelism", "fsdp_tp"): ["trainer.devices=2"],  # tensor parallel over 2 ranks
    ("parallelism", "hsdp"): ["trainer.devices=2"],  # 2 replicas
}
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
    cfg = compose_train([f"experiment={name}"], tmp_path)
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
    (["model.norm=batchnorm"], ["model.norm='batchnorm'", "rmsnorm, layernorm"]),
    (["model.mlp=geglu"], ["model.mlp='geglu'", "swiglu, gelu, relu"]),
    (["position=learned", "data.seq_len=512"], ["data.seq_len=512", "model.max_seq_len=256", "<= 256"]),
    (["model.head_dim=15"], ["model.head_dim=15", "even"]),
    (["data.global_batch_size=20"], ["data.global_batch_size=20", "multiple", "16"]),
    (["model.vocab_size=100"], ["model.vocab_size=100", ">= 2048"]),
    (["+model.n_head=4"], ["model.n_head", "unknown key", "Did you mean 'n_heads'"]),
    (["budget.tokens=1e6"], ["budget", "exactly one", "steps", "tokens"]),
    (["position=alibi", "model.attention.kernel=flash", "trainer.accelerator=cpu"], ["flash", "ALiBi"]),
    (["model.attention.kernel=flex", "trainer.accelerator=cpu"], ["model.attention.kernel='flex'", "CUDA"]),
    (["model.attention.window=0"], ["model.attention.window=0", ">= 1"]),
    (["trainer.precision=fp8"], ["trainer.precision='fp8'", "bf16-mixed"]),
    (["logger.mode=sometimes"], ["logger.mode='sometimes'", "offline"]),
    (["tokenizer.kind=sentencepiece"], ["tokenizer.kind='sentencepiece'", "unigram"]),
    (["data=synthetic"], ["tokenizer.kind='bpe'", "byte"]),
    (["optim.lr=-1"], ["optim.lr=-1", "> 0"]),
    (["+optim.momentum=0.9"], ["optim.momentum", "unknown key", "lr"]),
    (["+lr=0.1"], ["lr: unknown key", "optim"]),
    (["model.dropout=1.5"], ["model.dropout=1.5", "[0, 1)"]),
    (["trainer.val_every=0"], ["trainer.val_every=0", ">= 1"]),
    (["budget.steps=-5"], ["budget.steps=-5", "> 0"]),
    (["tokenizer=pretrained"], ["tokenizer.path: required but not set", "tokenizer.path=..."]),
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
    cfg = compose_train(["model.norm=x", "model.mlp=y", "trainer.log_every=0"], tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert len(e.value.problems) == 3


def test_cli_bad_config_exits_before_reading_data(tmp_path):
    result = run_cli(["model.n_heads=6", "model.d_model=96", "attention=gqa", "model.attention.n_kv_heads=4"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "model.attention.n_kv_heads=4" in result.stderr and "must divide" in result.stderr
    assert not (tmp_path / ".cache").exists()  # no tokenizer trained, no data tokenised
    assert not list(tmp_path.glob("runs/*/summary.json"))  # nothing a later run could take for output


def test_cli_help_lists_groups(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    for group in ("attention: gqa, mha, mqa", "position: alibi, learned, none, rope, sinusoidal", "experiment:"):
        assert group in result.stdout, result.stdout


def test_cli_override_of_a_key_that_does_not_exist_names_it(tmp_path):
    # Attention options live under model.attention; `attention.n_kv_heads` is not a key.
    result = run_cli(["model.n_heads=6", "attention.n_kv_heads=4"], cwd=tmp_path)
    assert result.returncode != 0
    assert "attention.n_kv_heads" in result.stderr
    assert not (tmp_path / ".cache").exists()
