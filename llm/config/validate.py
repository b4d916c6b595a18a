"""One validation pass over the composed config, before any data is read.

First every group is typed by its schema (llm.config.schema, llm.config.methods): unknown keys,
wrong types, choices outside an enumeration and numbers outside their declared ranges
(llm.fields). Then the rules that span keys and groups. Every problem names the key, the value and
what is allowed; all problems of a stage are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm import fields
from llm.config.pipeline import pipeline_degree, pipeline_problems
from llm.config.methods import METHODS, DistillConfig, OnPolicyConfig, PostTrainConfig, PretrainConfig, SFTConfig
from llm.config.schema import (
    SCHEMAS,
    TARGET_NODES,
    TARGET_SCHEMAS,
    TOP_LEVEL_KEYS,
    AdamWSchema,
    BudgetSchema,
    DataSchema,
    DDPSchema,
    RunSchema,
    SingleSchema,
    SyntheticCorpusSchema,
    TokenizerSchema,
    TrainerSchema,
)
from llm.model.config import ModelConfig

BYTE_VOCAB = 256 + 3  # raw bytes + BOS/EOS/PAD
HYDRA_KEYWORDS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
ABSOLUTE_POSITIONS = ("learned", "sinusoidal")  # position tables of model.max_seq_len rows


class ConfigError(ValueError):
    """A config that cannot work. `problems` lists one line per offending key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def _allowed(options: Any) -> str:
    return ", ".join(str(o) for o in options)


def _unknown(key: str, name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{key}: unknown key.{hint} Allowed keys: {_allowed(sorted(allowed))}"


# --- typing a node by its schema -----------------------------------------------------------------


def plain(node: DictConfig, drop: tuple[str, ...] = ()) -> DictConfig:
    """A detached copy of a node with its interpolations resolved in the context of the whole
    config, minus the `drop` keys."""
    container = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in container.items() if k not in drop})


def _assign_each(target: DictConfig, values: DictConfig, prefix: str) -> list[str]:
    """Set every key of `values` on the structured `target`, one at a time, so that every unknown
    key and wrong type is reported (OmegaConf stops at the first). Nested schemas recurse; any
    other value replaces the default whole (a dict of tasks is not merged into the default tasks)."""
    problems = []
    known = set(target.keys())  # (`in` says False for a key whose value is ???)
    for name in values.keys():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            if name not in HYDRA_KEYWORDS:
                problems.append(_unknown(key, str(name), [str(k) for k in target.keys()]))
            continue
        if OmegaConf.is_missing(values, name):
            problems.append(f"{key}: required but not set (`???`); give it on the command line: {key}=...")
            continue
        value = values[name]
        nested = target._get_node(name)
        if isinstance(nested, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(nested)) \
                and isinstance(value, DictConfig):
            problems += _assign_each(nested, value, key)
            continue
        try:
            target[name] = value
        except OmegaConfBaseException as e:
            shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            problems.append(f"{key}={shown!r}: {str(e).splitlines()[0]}")
    return problems


class LadderSizeError(ValueError):
    """model=ladder's model.size that no shape can be made for (raised by its shape resolver):
    reported under its own key, not under the derived n_layers it failed to resolve."""


def _ladder_error(error: BaseException) -> Optional[LadderSizeError]:
    """The LadderSizeError behind an interpolation error (OmegaConf chains its own errors)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LadderSizeError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def schema_problems(node: Any, schema: type, prefix: str, drop: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """(instance, problems): the node as an instance of its schema (Choices as plain strings), and
    every unknown key, wrong type, bad choice and out-of-range number, one line each."""
    if not isinstance(node, DictConfig):
        names = [f.name for f in dataclasses.fields(schema)]
        return None, [f"{prefix}={node!r}: expected a mapping with keys {_allowed(names)}"]
    try:
        values = plain(node, drop)
    except OmegaConfBaseException as e:
        ladder = _ladder_error(e)
        if ladder is not None:  # the shape's keys are derived: name the one that was given
            return None, [str(ladder)]
        full = str(getattr(e, "full_key", None) or "")
        # a node of a composed config names its keys from the root already; a detached one does not
        key = full if full.startswith(f"{prefix}.") or not prefix else f"{prefix}.{full}" if full else prefix
        return None, [f"{key}: {str(e).splitlines()[0]}"]
    target = OmegaConf.structured(schema)
    problems = _assign_each(target, values, prefix)
    if problems:
        return None, problems
    try:
        instance = OmegaConf.to_object(target)
    except OmegaConfBaseException as e:  # a required key left at ??? (reported by `validate` first)
        return None, [f"{prefix}.{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}"]
    return fields.plain_choices(instance), fields.problems(instance, prefix)


def typed(node: DictConfig, schema: type, drop: tuple[str, ...] = ()) -> Any:
    """The node as an instance of its schema dataclass, Choices as plain strings; ConfigError
    naming every key whose type, choice or range is wrong."""
    instance, problems = schema_problems(node, schema, _prefix_of(node), drop)
    if problems:
        raise ConfigError(problems)
    return instance


def _prefix_of(node: Any) -> str:
    """A node's dotted key in its config (`trainer`, `posttrain.data`), or '' for a root."""
    try:
        key = node._get_full_key(None)
    except (AttributeError, OmegaConfBaseException):
        return ""
    return str(key or "")


def checked(schema: type, values: Mapping[str, Any], prefix: str) -> Any:
    """`values` (plain Python, e.g. a constructor's arguments) as an instance of `schema`, with the
    same checks as a composed config; ConfigError naming every bad key."""
    instance, problems = schema_problems(OmegaConf.create(dict(values)), schema, prefix)
    if problems:
        raise ConfigError(problems)
    return instance


def method_schema(target: str) -> type:
    """The config dataclass of the post-training method (or pretraining) that `target` builds."""
    for schema in METHODS.values():
        if schema._target_ == target:
            return schema
    allowed = ", ".join(f"{name} ({s._target_})" for name, s in METHODS.items())
    raise ConfigError([f"posttrain._target_={target!r}: not a training method; allowed: {allowed}"])


def method_config(cfg: DictConfig) -> Any:
    """The run's typed `posttrain` config: an SFTConfig, DPOConfig, PPOConfig, ... (PretrainConfig
    for posttrain=none), nested data and lora sections included."""
    return typed(cfg.posttrain, method_schema(str(cfg.posttrain._target_)))


def method_arguments(schema: type, kwargs: dict[str, Any], **own: Any) -> Any:
    """For a stage constructor: its own arguments (`own`) plus the method keys among `kwargs`
    (`data`, `lora`, shared on-policy keys), checked against the method's config; ConfigError
    naming every bad key. `kwargs`' data and lora are replaced by their checked plain dicts.
    Returns the typed config."""
    names = {f.name for f in dataclasses.fields(schema)}
    values = {k: v for k, v in kwargs.items() if k in names and not (k in ("data", "lora") and v is None)}
    config = checked(schema, {**values, **own}, "posttrain")
    for section in ("data", "lora"):
        if section in kwargs:
            kwargs[section] = dataclasses.asdict(getattr(config, section))
    return config


# --- `_target_` nodes whose target has no schema (a user's own class) ---------------------------


def _import(target: str) -> Callable:
    module, _, name = target.rpartition(".")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def check_target(node: Any, key: str) -> list[str]:
    """A `_target_` node: typed by its schema when the target is one of our options', else the
    target imports and every key is one of its parameters."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return [f"{key}: expected a mapping with a `_target_` (the class or function it builds)"]
    target = node["_target_"]
    if target in TARGET_SCHEMAS:  # (keys left at ??? are the caller's to report, with its advice)
        return [p for p in schema_problems(node, TARGET_SCHEMAS[target], key)[1] if "required but not set" not in p]
    try:
        fn = _import(target)
    except (ImportError, AttributeError) as e:
        return [f"{key}._target_={target!r}: cannot be imported ({e})"]
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    allowed = [n for n in params if n != "self"]
    return [_unknown(f"{key}.{n}", str(n), allowed) for n in node.keys() if n not in HYDRA_KEYWORDS and n not in allowed]


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is `???` (the Hydra app's own `hydra` node aside)."""
    found: set[str] = set()
    for key in node.keys():
        if f"{prefix}{key}" == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            found.add(f"{prefix}{key}")
        elif isinstance(node._get_node(key), DictConfig):
            try:
                found |= OmegaConf.missing_keys(node[key])  # full keys
            except OmegaConfBaseException:  # a broken interpolation: the typing pass reports it
                pass
    return sorted(found)


# --- the pass ------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tokenizer_vocab_size(tokenizer: DictConfig, load: bool = False) -> Optional[int]:
    """The vocabulary a tokenizer config will produce, without training anything: the byte
    tokenizer's fixed size, a trained kind's `vocab_size`, or (load=True) a pretrained file's."""
    kind = tokenizer.get("kind")
    if kind == "byte":
        return BYTE_VOCAB
    if kind == "pretrained":
        if not load:
            return None
        from llm.tokenizer import Tokenizer

        return Tokenizer.load(tokenizer.path).vocab_size
    return int(tokenizer.vocab_size) if tokenizer.get("vocab_size") else None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def total_ranks(cfg: DictConfig) -> int:
    """Processes in the run: devices per node x nodes."""
    devices = cfg.trainer.devices
    per_node = devices if isinstance(devices, int) and devices > 0 else 1
    nodes = cfg.trainer.num_nodes
    return per_node * (nodes if isinstance(nodes, int) and nodes > 0 else 1)


@dataclasses.dataclass
class Typed:
    """The typed groups of a config (what the cross-group rules read)."""

    model: ModelConfig
    data: DataSchema
    trainer: TrainerSchema
    budget: BudgetSchema
    tokenizer: Optional[TokenizerSchema]
    optim: Any
    parallelism: Any
    corpus: Any
    method: Any
    run: RunSchema
    schedule: Any = None


def type_groups(cfg: DictConfig) -> tuple[Optional[Typed], list[str]]:
    """Every group typed by its schema, or the problems of those that are not."""
    problems: list[str] = []
    typed_groups: dict[str, Any] = {}
    for group, schema in SCHEMAS.items():
        if group not in cfg:
            problems.append(f"{group}: missing (select an option of the `{group}` group)")
            continue
        typed_groups[group], found = schema_problems(cfg[group], schema, group, ("corpus",) if group == "data" else ())
        problems += found
    for key in TARGET_NODES:
        node = OmegaConf.select(cfg, key)
        if node is None and key == "data.corpus" and OmegaConf.select(cfg, "data.sources"):
            typed_groups[key] = None  # a mixture: its sources' corpora are typed by source_problems
            continue
        if node is None:
            problems.append(f"{key}: missing")
            continue
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        schema = TARGET_SCHEMAS.get(str(target))
        if schema is None:  # no schema: the signature of the target is the schema
            problems += check_target(node, key)
            typed_groups[key] = None
            continue
        typed_groups[key], found = schema_problems(node, schema, key)
        problems += found
    try:  # resolved here: init_from may interpolate paths.runs_dir
        run_keys = OmegaConf.create({f.name: cfg[f.name] for f in dataclasses.fields(RunSchema) if f.name in cfg})
    except OmegaConfBaseException as e:
        run_keys, problems = None, [*problems, f"{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}"]
    if run_keys is not None:
        typed_groups["run"], found = schema_problems(run_keys, RunSchema, "")
        problems += found
    problems += source_problems(cfg)
    if problems:
        return None, problems
    return Typed(model=typed_groups["model"], data=typed_groups["data"], trainer=typed_groups["trainer"],
                 budget=typed_groups["budget"], tokenizer=typed_groups["tokenizer"], optim=typed_groups["optim"],
                 parallelism=typed_groups["parallelism"], corpus=typed_groups["data.corpus"],
                 method=typed_groups["posttrain"], run=typed_groups["run"], schedule=typed_groups["schedule"]), []


def source_problems(cfg: DictConfig) -> list[str]:
    """data.sources (data=mixture): names usable in metric names, weights finite, >= 0 and not all
    zero, each source a corpus node typed by its schema, and no data.corpus beside them."""
    sources = OmegaConf.select(cfg, "data.sources")
    if not sources:
        return []
    from llm.data.mixture import NAME

    problems = []
    if OmegaConf.select(cfg, "data.corpus") is not None:
        problems.append("data.corpus: a run reads one corpus or a mixture of data.sources, not both; choose "
                        "data=mixture (data.corpus null) or a single data option without data.sources")
    weights = []
    for name, source in sources.items():
        key = f"data.sources.{name}"
        if not NAME.match(str(name)):
            problems.append(f"{key}: the source's name is part of its metric names (val/loss/{name}); allowed: "
                            "letters, digits, '_', '-', '.'")
        weight = source.get("weight") if isinstance(source, DictConfig) else None
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            problems.append(f"{key}.weight={weight!r}: a source's share of the training tokens; allowed: a finite "
                            "number >= 0 (0 leaves the source out of training, still validated)")
        else:
            weights.append(float(weight))
        node = source.get("corpus") if isinstance(source, DictConfig) else None
        if node is None:
            problems.append(f"{key}.corpus: missing; give the source a corpus, e.g. +data@{key}=text "
                            f"{key}.corpus.paths=...")
            continue
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        schema = TARGET_SCHEMAS.get(str(target))
        if schema is None:
            problems += check_target(node, f"{key}.corpus")
        else:
            problems += [p for p in schema_problems(node, schema, f"{key}.corpus")[1] if "required but not set" not in p]
    if len(weights) == len(sources) and sum(weights) <= 0:
        problems.append(f"data.sources: every weight is 0 ({', '.join(f'{n}.weight' for n in sources)}); give at "
                        "least one source a positive weight")
    return problems


def validate(cfg: DictConfig, world_size: Optional[int] = None) -> None:
    """Check the whole composed config; raise ConfigError listing every problem."""
    problems: list[str] = multi_select_problems()
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS and key != "hydra":
            problems.append(_unknown(str(key), str(key), list(TOP_LEVEL_KEYS)))
    for key in missing_keys(cfg):
        problems.append(f"{key}: required but not set (`???`); give it on the command line: {key}=...")
    if problems:
        raise ConfigError(problems)
    t, problems = type_groups(cfg)
    if t is None or problems:  # a value is wrong on its own: rules across keys would only add noise
        raise ConfigError(problems)
    world = world_size or total_ranks(cfg)
    problems += model_problems(t.model, t.data.seq_len)
    problems += device_problems(t, planning=bool(cfg.get("dry_run")))
    problems += downstream_problems(t)
    problems += tokenizer_problems(cfg, t)
    problems += layout_problems(cfg, t, world)
    problems += pipeline_problems(t, world)
    problems += budget_problems(t.budget)
    problems += schedule_problems(t.schedule, t.budget)
    problems += optim_problems(t.optim)
    problems += data_problems(cfg, t)
    problems += method_problems(cfg, t, world)
    if problems:
        raise ConfigError(problems)


def multi_select_problems() -> list[str]:
    """`group=[a,b]` on the command line is Hydra's multi-select: both option files merged into one
    node, the last one's values winning, so `logger=[wandb,tensorboard]` would log to TensorBoard
    only, silently. Every group of ours but `experiment` (presets may be stacked on purpose) is a
    single choice: refuse the list and say what to do."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from llm.resources import CONF_DIR

    if not HydraConfig.initialized():
        return []
    problems = []
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        group = override.key_or_group
        if (isinstance(override.value(), list) and not override.is_sweep_override() and group != "experiment"
                and (Path(CONF_DIR) / group).is_dir()):
            text = override.input_line
            if group == "logger":
                first, *rest = override.value()
                problems.append(f"{text}: one logger group option at a time (Hydra would merge them, the last winning); "
                                f"for several loggers: logger={first} logger.also=[{','.join(map(str, rest))}]")
            else:
                problems.append(f"{text}: {group} takes one option (Hydra would merge the files, the last one's values "
                                f"winning); choose one, or sweep them with -m {group}={','.join(map(str, override.value()))}")
    return problems


def model_problems(m: ModelConfig, seq_len: int) -> list[str]:
    """The architecture's own arithmetic: heads, kv heads, position tables, kernels."""
    problems = []
    if m.head_dim is None and m.d_model % m.n_heads:
        problems.append(f"model.n_heads={m.n_heads}: must divide model.d_model={m.d_model} "
                        f"(allowed: {_allowed(_divisors(m.d_model))}), or set model.head_dim")
    kv = m.attention.n_kv_heads
    if kv is not None and m.n_heads % kv:
        problems.append(f"model.attention.n_kv_heads={kv}: must divide model.n_heads={m.n_heads} "
                        f"(allowed: {_allowed(_divisors(m.n_heads))}; 1 = MQA, {m.n_heads} = MHA)")
    if m.position.kind == "rope" and m.head_size % 2:
        problems.append(f"model.head_dim={m.head_size}: RoPE rotates pairs of channels, so the head dim must be even")
    if m.position.kind == "sinusoidal" and m.d_model % 2:
        problems.append(f"model.d_model={m.d_model}: the sinusoidal table needs an even model width")
    if m.position.kind in ABSOLUTE_POSITIONS and seq_len > m.max_seq_len:
        problems.append(f"data.seq_len={seq_len}: longer than the {m.position.kind} position table "
                        f"(model.max_seq_len={m.max_seq_len}); allowed: <= {m.max_seq_len}")
    if m.attention.kernel == "flash" and (m.position.kind == "alibi" or m.attention.window):
        problems.append("model.attention.kernel='flash': the flash kernel takes no additive mask, so it cannot do "
                        f"{'ALiBi' if m.position.kind == 'alibi' else 'a sliding window'}; allowed: sdpa, flex")
    problems += m.moe.problems(m.n_layers)  # top_k vs n_experts, which layers are MoE (llm.model.config)
    return problems


def _on_cpu(trainer: TrainerSchema) -> bool:
    return trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not _cuda_available())


def downstream_problems(t: Typed) -> list[str]:
    """In-training evaluation names built-in tasks (harness task names are the harness's to check)."""
    from llm.data.tasks import TASKS

    unknown = [task for task in t.trainer.downstream.tasks if task not in TASKS]
    return [f"trainer.downstream.tasks: unknown built-in task(s) {unknown}; allowed: {list(TASKS)} "
            "(harness tasks go in trainer.downstream.harness)"] if unknown else []


def device_problems(t: Typed, planning: bool = False) -> list[str]:
    """What needs CUDA: a GPU accelerator (unless `planning`: a dry run of a GPU layout needs no
    GPU), 16-bit FSDP collectives, the flash and flex attention kernels."""
    problems = []
    if t.trainer.accelerator in ("gpu", "cuda") and not _cuda_available() and not planning:
        return [f"trainer.accelerator={t.trainer.accelerator!r}: no CUDA GPU on this machine (trainer=gpu sets it); "
                "allowed here: cpu or auto, e.g. drop trainer=gpu, or trainer.accelerator=cpu "
                "model.attention.kernel=sdpa parallelism.compile=false to try its other settings on a CPU"]
    if not _on_cpu(t.trainer):
        return problems
    for key in ("param_dtype", "reduce_dtype"):
        value = getattr(t.parallelism, key, None)
        if value not in (None, "float32"):
            problems.append(f"parallelism.{key}={value!r}: FSDP mixed precision needs CUDA (gloo's 16-bit "
                            "collectives deadlock on CPUs); allowed here: float32")
    if t.model.attention.kernel in ("flash", "flex"):
        problems.append(f"model.attention.kernel={t.model.attention.kernel!r}: needs a CUDA device "
                        f"(trainer.accelerator={t.trainer.accelerator!r}); allowed here: sdpa")
    return problems


def tokenizer_problems(cfg: DictConfig, t: Typed) -> list[str]:
    """A trained tokenizer's vocabulary; the model's vocabulary holds every id the tokenizer emits."""
    problems = []
    tok = t.tokenizer
    if tok is not None and tok.kind in ("bpe", "unigram", "wordpiece"):
        from llm.tokenizer.kinds import MIN_VOCAB

        low = MIN_VOCAB[tok.kind]
        if tok.vocab_size is None or tok.vocab_size < low:
            problems.append(f"tokenizer.vocab_size={tok.vocab_size}: a {tok.kind} tokenizer needs at least {low} "
                            f"tokens (its alphabet and special tokens); allowed: >= {low}")
    if tok is not None and tok.kind == "pretrained" and not tok.path:
        problems.append("tokenizer.path=None: tokenizer=pretrained reads a tokenizer.json; give tokenizer.path=...")
    tok_vocab = tokenizer_vocab_size(cfg.tokenizer) if not problems else None
    vocab = t.model.vocab_size
    if vocab is not None and tok_vocab and tok_vocab > vocab:
        problems.append(f"model.vocab_size={vocab}: smaller than the tokenizer's vocabulary ({tok_vocab}); "
                        f"allowed: >= {tok_vocab}, or null to take it from the tokenizer")
    if isinstance(t.corpus, SyntheticCorpusSchema) and tok is not None and tok.kind != "byte":
        problems.append(f"tokenizer.kind={tok.kind!r}: data=synthetic emits one character per symbol, so its entropy "
                        "floor is per token only with tokenizer=byte; allowed: byte")
    return problems


def expert_parallel_problems(p: Any, model: ModelConfig, ranks: int, tp: int, inherited: bool = False) -> list[str]:
    """parallelism.expert_parallel: EP groups are data-parallel ranks that split an MoE model's experts.
    `inherited`: the model will be the init_from parent's, which the first validation pass has not
    read yet (a dense parent is refused when the experts are split, `llm.parallel.expert`)."""
    ep = getattr(p, "expert_parallel", 1) or 1
    if ep == 1:
        return []
    key = f"parallelism.expert_parallel={ep}"
    if not model.moe.enabled and inherited:
        return []
    if not model.moe.enabled:
        return [f"{key}: splits the experts of an MoE model, and this model is dense (model.moe.n_experts=0); "
                "allowed: 1, or an MoE model (model.moe.n_experts=8 ...)"]
    if tp > 1:
        return [f"{key} with parallelism.tensor_parallel={tp}: expert parallelism takes its ranks from the "
                "data-parallel axis, and tensor parallelism has no plan for MoE layers (refused with MoE); allowed: "
                "parallelism=ddp, fsdp or hsdp with tensor_parallel=1"]
    problems = []
    n = model.moe.n_experts
    if n % ep:
        problems.append(f"{key}: must divide model.moe.n_experts={n} (each rank holds n_experts / expert_parallel "
                        f"experts); allowed: {_allowed(_divisors(n))}")
    if ranks % ep:
        problems.append(f"{key}: must divide the {ranks} data-parallel ranks (trainer.devices x trainer.num_nodes); "
                        f"allowed: {_allowed(_divisors(ranks))}")
    return problems


def layout_problems(cfg: DictConfig, t: Typed, world: int) -> list[str]:
    """world = devices x nodes = data-parallel ranks x tensor-parallel ranks; the batch arithmetic."""
    problems = []
    p, data, model = t.parallelism, t.data, t.model
    tp = getattr(p, "tensor_parallel", 1) or 1
    replicate = getattr(p, "replicate", None)
    if world > 1 and type(p) is SingleSchema:
        problems.append(f"parallelism=single: runs one process, but trainer.devices x trainer.num_nodes = {world}; "
                        "allowed: parallelism=ddp, fsdp, fsdp_tp or hsdp, or trainer.devices=1")
    if world % tp:
        problems.append(f"parallelism.tensor_parallel={tp}: must divide the {world} ranks (trainer.devices x "
                        f"trainer.num_nodes); allowed: {_allowed(_divisors(world))}")
        tp = 1
    elif tp > 1:
        if model.moe.enabled:
            problems.append(f"parallelism.tensor_parallel={tp} with model.moe.n_experts={model.moe.n_experts}: the "
                            "tensor-parallel plan shards dense MLPs, not stacked experts (to split the experts over "
                            "ranks, use parallelism.expert_parallel); allowed: MoE with parallelism=single, ddp, fsdp "
                            "or hsdp (tensor_parallel=1), or model.moe.n_experts=0")
        for key, heads in (("model.n_heads", model.n_heads), ("model.attention.n_kv_heads", model.kv_heads)):
            if heads % tp:
                problems.append(f"parallelism.tensor_parallel={tp}: must divide {key}={heads} (each rank takes whole "
                                f"heads); allowed: {_allowed([d for d in _divisors(heads) if world % d == 0])}")
    ranks = world // tp // (pipeline_degree(p) if world % (tp * pipeline_degree(p)) == 0 else 1)  # data parallel
    problems += expert_parallel_problems(p, model, ranks, tp, inherited=bool(t.run.init_from))
    if replicate is not None and ranks % replicate:
        problems.append(f"parallelism.replicate={replicate}: must divide the {ranks} data-parallel ranks; "
                        f"allowed: {_allowed(_divisors(ranks))}")
    unit = data.micro_batch_size * ranks  # global batch = micro batch x data-parallel ranks x accumulation
    if data.global_batch_size is not None and data.global_batch_size % unit:
        problems.append(f"data.global_batch_size={data.global_batch_size}: must be a multiple of data.micro_batch_size "
                        f"x data-parallel ranks = {data.micro_batch_size} x {ranks} = {unit} (e.g. {unit}, {2 * unit}, "
                        f"{4 * unit})")
    if data.val_batches is not None and 0 < data.val_batches < ranks:  # Lightning stops a rank with none
        problems.append(f"data.val_batches={data.val_batches}: the {ranks} data-parallel ranks take validation "
                        f"batches in turn and each needs one; allowed: >= {ranks}, 0 (no validation) or null "
                        "(the whole split)")
    return problems


def budget_problems(budget: BudgetSchema) -> list[str]:
    given = {f.name: getattr(budget, f.name) for f in dataclasses.fields(budget) if getattr(budget, f.name) is not None}
    if len(given) == 1:
        return []
    shown = ", ".join(f"budget.{k}={v!r}" for k, v in given.items()) or "none"
    return [f"budget: exactly one of steps, tokens, flops, tokens_per_param must be set (got {shown}); "
            "e.g. budget=steps budget.steps=500, or budget.steps=null budget.tokens=1e6"]


def schedule_problems(schedule: Any, budget: BudgetSchema) -> list[str]:
    """A warmup given in steps (>= 1) must end within a run of budget.steps: the lr would otherwise
    never reach optim.lr (with a token or FLOP budget the steps are known only when planned)."""
    warmup = getattr(schedule, "warmup", None)
    if warmup is None or warmup < 1 or budget.steps is None or warmup <= budget.steps:
        return []
    return [f"schedule.warmup={warmup:g}: a warmup of {warmup:g} steps is longer than the run (budget.steps="
            f"{budget.steps}), so the lr would never reach optim.lr; allowed: a fraction of the run < 1, or "
            f"1..{budget.steps} steps"]


def optim_problems(optim: Any) -> list[str]:
    if not isinstance(optim, AdamWSchema):
        return []
    problems = []
    if len(optim.betas) != 2:
        problems.append(f"optim.betas={optim.betas}: AdamW takes two (beta1, beta2), e.g. [0.9, 0.95]")
    if optim.lr * optim.weight_decay >= 1:
        problems.append(f"optim.weight_decay={optim.weight_decay}: with optim.lr={optim.lr} each step would scale the "
                        f"weights by 1 - lr x weight_decay = {1 - optim.lr * optim.weight_decay:.3g}; allowed: "
                        f"< {1 / optim.lr:.3g} (1 / lr)")
    return problems


def _task_problems(tasks: Any, key: str) -> list[str]:
    """Each task's knobs, checked by building the task (llm.data.tasks owns their meaning)."""
    from llm.data.tasks import make_task

    problems = []
    for name, knobs in dict(tasks or {}).items():
        try:
            make_task(str(name), **dict(knobs or {}))
        except (TypeError, ValueError, KeyError) as e:
            problems.append(f"{key}.{name}={dict(knobs or {})}: {e}")
    if tasks is not None and not tasks:
        problems.append(f"{key}={{}}: give at least one task (addition, sorting, copying, counting)")
    return problems


def token_file_problems(cfg: DictConfig, t: Typed) -> list[str]:
    """Pre-tokenised sources (data=tokens, or one in a mixture) keep the ids of the tokenizer that
    made them: a tokenizer trained here would give the same text other ids."""
    sources = OmegaConf.select(cfg, "data.sources") or {}
    nodes = [("data.corpus", OmegaConf.select(cfg, "data.corpus")),
             *((f"data.sources.{n}.corpus", s.get("corpus")) for n, s in sources.items())]
    tok = t.tokenizer
    if tok is None or tok.kind not in ("bpe", "unigram", "wordpiece"):
        return []
    return [f"tokenizer.kind={tok.kind!r} with pre-tokenised {key} ({node.get('train')}): its ids come from the "
            "tokenizer that wrote them, which a tokenizer trained here would not reproduce; allowed: "
            "tokenizer=pretrained tokenizer.path=<that tokenizer.json>, or tokenizer=byte for byte ids"
            for key, node in nodes
            if isinstance(node, DictConfig) and str(node.get("_target_")) == "llm.data.token_files.TokenFiles"]


def data_problems(cfg: DictConfig, t: Typed) -> list[str]:
    problems = token_file_problems(cfg, t)
    corpus = t.corpus
    if isinstance(corpus, SyntheticCorpusSchema) and corpus.branching > corpus.n_symbols:
        problems.append(f"data.corpus.branching={corpus.branching}: at most data.corpus.n_symbols="
                        f"{corpus.n_symbols} successors per symbol; allowed: 2..{corpus.n_symbols}")
    if hasattr(corpus, "tasks"):
        found = _task_problems(corpus.tasks, "data.corpus.tasks")
        if not found and corpus.weights:
            from llm.data.tasks import TaskMix

            try:
                TaskMix(corpus.tasks, weights=corpus.weights)
            except ValueError as e:
                found.append(f"data.corpus.weights={dict(corpus.weights)}: {e}")
        problems += found
    return problems


def method_problems(cfg: DictConfig, t: Typed, world: int) -> list[str]:
    """Post-training: where it starts from, what its data and adapters allow."""
    method = t.method
    problems = []
    if method is None:  # a target of the user's own: its signature was the check
        return problems
    if isinstance(method, PretrainConfig):
        if t.run.init_from:
            problems.append(f"init_from={t.run.init_from!r}: only a post-training method starts from a trained model "
                            "(posttrain=none pretrains from scratch); allowed: null, or choose posttrain=sft, reward, "
                            "dpo, ppo or grpo")
        return problems
    if not isinstance(method, PostTrainConfig):
        return problems
    stage = {schema: name for name, schema in METHODS.items()}[type(method)]
    if not t.run.init_from and not isinstance(method, DistillConfig):  # a student may start fresh
        problems.append(f"init_from: posttrain={stage} starts from a trained model; give "
                        "init_from=<run directory | run id | checkpoint file> (e.g. a pretraining run)")
    tp = getattr(t.parallelism, "tensor_parallel", 1) or 1
    if method.lora.enabled and tp > 1:
        problems.append(f"posttrain.lora.enabled=true with parallelism.tensor_parallel={tp}: LoRA adapters have no "
                        "tensor-parallel plan; allowed: LoRA with single, ddp, fsdp or hsdp (tensor_parallel=1)")
    if method.qat != "none" and method.lora.enabled:
        problems.append(f"posttrain.qat={method.qat} with posttrain.lora.enabled=true: the merged model is what gets "
                        "quantised, but training would fake-quantise the frozen base alone; allowed: qat=none with LoRA")
    if method.qat != "none" and tp > 1:
        problems.append(f"posttrain.qat={method.qat} with parallelism.tensor_parallel={tp}: a tensor-parallel rank holds "
                        "part of a weight row, not its whole quantisation groups; allowed: tensor_parallel=1")
    samples = isinstance(method, OnPolicyConfig) or (isinstance(method, DistillConfig) and method.lmbda > 0)
    if samples and tp > 1:
        what, fix = (f"posttrain={stage}", "") if isinstance(method, OnPolicyConfig) else \
            (f"posttrain.lmbda={method.lmbda} (on-policy distillation)", "posttrain.lmbda=0 (off-policy only), or ")
        problems.append(f"{what} with parallelism.tensor_parallel={tp}: rollouts decode with a KV cache of "
                        f"every K/V head, which a tensor-parallel rank does not hold; allowed: {fix}parallelism=single, "
                        "ddp, fsdp or hsdp (tensor_parallel=1)")
    ep = getattr(t.parallelism, "expert_parallel", 1) or 1
    if samples and ep > 1 and isinstance(t.parallelism, DDPSchema):
        problems.append(f"posttrain={stage}{' (lmbda > 0)' if stage == 'distill' else ''} with parallelism=ddp and parallelism.expert_parallel={ep}: each decoding "
                        "step exchanges tokens between the ranks, so the ranks must decode in lockstep, which "
                        "rollouts do only under FSDP; allowed: parallelism=fsdp with expert_parallel, or "
                        "expert_parallel=1")
    data = method.data
    if data.packing and not isinstance(method, SFTConfig):
        problems.append(f"posttrain.data.packing=true: packing is for SFT rows; posttrain={stage} does not pack; "
                        "allowed: false")
    if data.format is not None:
        from llm.data.formats import KINDS

        module_kind = {"sft": "sft", "distill": "sft", "reward": "preference", "dpo": "preference"}.get(stage, "prompt")
        if data.format not in KINDS[module_kind]:
            problems.append(f"posttrain.data.format={data.format!r}: posttrain={stage} reads {module_kind} rows; "
                            f"allowed: {_allowed(KINDS[module_kind])}, or null (detected from the rows)")
    if data.source == "tasks":
        problems += _task_problems(data.tasks, "posttrain.data.tasks")
    if isinstance(method, OnPolicyConfig):
        problems += _on_policy_problems(method, stage, t)
    if isinstance(method, DistillConfig):
        problems += _distill_problems(method)
    return problems


def _distill_problems(method: Any) -> list[str]:
    problems = []
    if not method.teacher:
        problems.append("posttrain.teacher: posttrain=distill learns from a teacher; give posttrain.teacher=<run "
                        "directory | run id | checkpoint file | Hugging Face folder> sharing the student's tokenizer")
    reverse = method.divergence == "reverse_kl" or (method.divergence == "jsd" and method.beta == 1.0)
    if method.top_k is not None and reverse:
        what = "divergence=reverse_kl" if method.divergence == "reverse_kl" else "divergence=jsd with beta=1"
        problems.append(f"posttrain.top_k={method.top_k}: a top-k teacher gives the other tokens probability 0, where "
                        f"the reverse KL (posttrain.{what}) is infinite; allowed: null with it, or "
                        "divergence=forward_kl, tv, or jsd with beta < 1")
    if method.corpus:
        problems += _corpus_distill_problems(method)
    return problems


def _corpus_distill_problems(method: Any) -> list[str]:
    """posttrain.corpus=true: the student reads the `data` group's corpus, not rows."""
    from llm.config.methods import PostTrainDataSchema

    problems = []
    if method.lmbda > 0:
        problems.append(f"posttrain.lmbda={method.lmbda} with posttrain.corpus=true: on-policy steps sample completions "
                        "of the rows' prompts, and the corpus's blocks have none; allowed: posttrain.lmbda=0")
    default = dataclasses.asdict(PostTrainDataSchema())
    unused = [k for k, v in dataclasses.asdict(method.data).items() if v != default[k]]
    if unused:
        problems.append(f"posttrain.data.{unused[0]}: set with posttrain.corpus=true, which reads the data group's "
                        f"corpus instead of posttrain.data (unused: {', '.join(f'posttrain.data.{k}' for k in unused)}); "
                        "allowed: posttrain.data at its defaults, or posttrain.corpus=false to distil on those rows")
    return problems


def _on_policy_problems(method: Any, stage: str, t: Typed) -> list[str]:
    problems = []
    if method.reward_model is None and method.data.source != "tasks":
        problems.append(f"posttrain.reward_model: required for prompts from {method.data.source!r} (the built-in "
                        "reward checks the synthetic tasks' answers); give posttrain.reward_model=<reward run>")
    rows = t.data.micro_batch_size  # completions per rollout and rank (PPO: one per prompt)
    if stage == "ppo" and method.num_mini_batches > rows:
        problems.append(f"posttrain.num_mini_batches={method.num_mini_batches}: a rollout holds data.micro_batch_size="
                        f"{rows} completions per rank, split into minibatches; allowed: 1..{rows}")
    m = t.model
    longest = method.data.max_prompt_length + method.max_new_tokens
    if m.position.kind in ABSOLUTE_POSITIONS and longest > m.max_seq_len:
        problems.append(f"posttrain.max_new_tokens={method.max_new_tokens}: a prompt of up to "
                        f"posttrain.data.max_prompt_length={method.data.max_prompt_length} tokens plus the completion "
                        f"must fit the {m.position.kind} position table (model.max_seq_len={m.max_seq_len}); allowed: "
                        f"<= {max(1, m.max_seq_len - method.data.max_prompt_length)}")
    return problems


def check_input_files(cfg: DictConfig) -> None:
    """The files a valid config names (a tokenizer.json, text corpus patterns, post-training JSONL
    files) exist and read, and a pretrained tokenizer fits model.vocab_size: ConfigError otherwise,
    before any work (and before a run directory is made). Separate from `validate`, which reads no
    files; the contents of data files are checked as they are read."""
    from llm.files import InputError, checked_path

    problems = []
    tokenizer = cfg.tokenizer
    if tokenizer.get("kind") == "pretrained" and tokenizer.get("path"):
        from llm.tokenizer.tokenizer import Tokenizer

        try:
            vocab = Tokenizer.load(tokenizer.path).vocab_size
        except InputError as e:
            problems.append(str(e))
        else:
            if cfg.model.get("vocab_size") is not None and vocab > cfg.model.vocab_size:
                problems.append(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's vocabulary "
                                f"({vocab}) in {tokenizer.path}; allowed: >= {vocab}, or null to take it from the "
                                "tokenizer")
    sources = OmegaConf.select(cfg, "data.sources") or {}
    corpora = [("data.corpus", OmegaConf.select(cfg, "data.corpus")),
               *((f"data.sources.{n}.corpus", s.get("corpus")) for n, s in sources.items())]
    for key, corpus in corpora:
        if isinstance(corpus, DictConfig) and str(corpus.get("_target_", "")).endswith("TextCorpus"):
            from llm.data.text import KEY, match_files

            paths = corpus.get("paths")
            try:
                match_files([paths] if isinstance(paths, str) else list(paths or []))
            except InputError as e:
                problems.append(str(e).replace(KEY, f"{key}.paths", 1))
    data = OmegaConf.select(cfg, "posttrain.data")
    for key in ("source", "val_source"):
        source = data.get(key) if isinstance(data, DictConfig) else None
        if isinstance(source, str) and source != "tasks" and not source.startswith("hf:"):
            try:  # read (and each row checked) with the rest of the data
                checked_path(source, f"posttrain.data.{key}", "file", "give a JSONL file of rows in one of TRL's "
                             "formats, hf:NAME for a Hugging Face dataset, or tasks (the built-in tasks)")
            except InputError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError(problems)
