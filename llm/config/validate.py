"""One validation pass over the composed config, before any data is read.

Every problem names the key, the value and what is allowed; all problems are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm.config.schema import (
    LOGGERS,
    PRECISIONS,
    SCHEMAS,
    TARGET_NODES,
    TOP_LEVEL_KEYS,
    WANDB_MODES,
)
from llm.model.config import KERNELS, MLPS, NORM_PLACEMENTS, NORMS, POSITIONS, ModelConfig

TOKENIZER_KINDS = ("bpe", "unigram", "wordpiece", "byte", "pretrained")
BYTE_VOCAB = 256 + 3  # raw bytes + BOS/EOS/PAD
HYDRA_KEYWORDS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


class ConfigError(ValueError):
    """A config that cannot work. `problems` lists one line per offending key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def _allowed(options) -> str:
    return ", ".join(str(o) for o in options)


def _unknown(key: str, name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{key}: unknown key.{hint} Allowed keys: {_allowed(sorted(allowed))}"


def check_schema(node: Any, schema: type, prefix: str) -> list[str]:
    """Unknown keys (recursively), then types, of a plain node against its dataclass schema."""
    if not isinstance(node, DictConfig):
        return [f"{prefix}={node!r}: expected a mapping with keys {_allowed(f.name for f in dataclasses.fields(schema))}"]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    problems = [_unknown(f"{prefix}.{name}", str(name), list(fields)) for name in node.keys() if name not in fields]
    # Nested sections (model.attention, model.position) are the fields built by a dataclass factory.
    for name, f in fields.items():
        if name in node and isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            problems += check_schema(node[name], f.default_factory, f"{prefix}.{name}")
    if problems:
        return problems
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        key = f"{prefix}.{e.full_key}" if getattr(e, "full_key", None) else prefix
        return [f"{key}: {str(e).splitlines()[0]}"]
    return []


def plain(node: DictConfig, drop: tuple[str, ...] = ()) -> DictConfig:
    """A detached copy of a node with its interpolations resolved in the context of the whole
    config, minus the `drop` keys."""
    container = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in container.items() if k not in drop})


def typed(node: DictConfig, schema: type, drop: tuple[str, ...] = ()) -> Any:
    """The node as an instance of its schema dataclass (after `check_schema` passed)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain(node, drop)))


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is `???` (the Hydra app's own `hydra` node aside)."""
    found = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if full == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            found.append(full)
        elif isinstance(node._get_node(key), DictConfig):
            found += missing_keys(node[key], f"{full}.")
    return found


def _import(target: str) -> Callable:
    module, _, name = target.rpartition(".")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def check_target(node: Any, key: str) -> list[str]:
    """A `_target_` node: the target imports, and every key is one of its parameters."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return [f"{key}: expected a mapping with a `_target_` (the class or function it builds)"]
    target = node["_target_"]
    try:
        fn = _import(target)
    except (ImportError, AttributeError) as e:
        return [f"{key}._target_={target!r}: cannot be imported ({e})"]
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    allowed = [n for n in params if n != "self"]
    return [_unknown(f"{key}.{n}", str(n), allowed) for n in node.keys() if n not in HYDRA_KEYWORDS and n not in allowed]


def _choice(problems: list[str], key: str, value: Any, allowed) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r}: not allowed. Choose one of: {_allowed(allowed)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_model(m: ModelConfig, problems: list[str], seq_len: int) -> None:
    _choice(problems, "model.norm", m.norm, NORMS)
    _choice(problems, "model.norm_placement", m.norm_placement, NORM_PLACEMENTS)
    _choice(problems, "model.mlp", m.mlp, MLPS)
    _choice(problems, "model.position.kind", m.position.kind, POSITIONS)
    _choice(problems, "model.attention.kernel", m.attention.kernel, KERNELS)
    for key, value in (("model.n_layers", m.n_layers), ("model.d_model", m.d_model), ("model.n_heads", m.n_heads)):
        if value < 1:
            problems.append(f"{key}={value}: must be a positive integer")
    if m.n_heads < 1 or m.d_model < 1:
        return
    if m.head_dim is None and m.d_model % m.n_heads:
        problems.append(
            f"model.n_heads={m.n_heads}: must divide model.d_model={m.d_model} "
            f"(allowed: {_allowed(_divisors(m.d_model))}), or set model.head_dim"
        )
    kv = m.attention.n_kv_heads
    if kv is not None and (kv < 1 or m.n_heads % kv):
        problems.append(
            f"model.attention.n_kv_heads={kv}: must divide model.n_heads={m.n_heads} "
            f"(allowed: {_allowed(_divisors(m.n_heads))}; 1 = MQA, {m.n_heads} = MHA)"
        )
    if m.position.kind == "rope" and m.head_size % 2:
        problems.append(f"model.head_dim={m.head_size}: RoPE rotates pairs of channels, so the head dim must be even")
    if m.position.kind == "sinusoidal" and m.d_model % 2:
        problems.append(f"model.d_model={m.d_model}: the sinusoidal table needs an even model width")
    if m.position.kind in ("learned", "sinusoidal") and seq_len > m.max_seq_len:
        problems.append(
            f"data.seq_len={seq_len}: longer than the {m.position.kind} position table "
            f"(model.max_seq_len={m.max_seq_len}); allowed: <= {m.max_seq_len}"
        )
    if m.attention.window is not None and m.attention.window < 1:
        problems.append(f"model.attention.window={m.attention.window}: must be >= 1, or null for full attention")
    if m.attention.kernel == "flash" and (m.position.kind == "alibi" or m.attention.window):
        problems.append(
            "model.attention.kernel='flash': the flash kernel takes no additive mask, so it cannot do "
            f"{'ALiBi' if m.position.kind == 'alibi' else 'a sliding window'}; allowed: sdpa, flex"
        )
    if not 0.0 <= m.dropout < 1.0:
        problems.append(f"model.dropout={m.dropout}: must be in [0, 1)")


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


def validate(cfg: DictConfig, world_size: Optional[int] = None) -> None:
    """Check the whole composed config; raise ConfigError listing every problem."""
    problems: list[str] = []
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS and key != "hydra":
            problems.append(_unknown(str(key), str(key), list(TOP_LEVEL_KEYS)))
    for key in missing_keys(cfg):
        problems.append(f"{key}: required but not set (`???`); give it on the command line: {key}=...")
    if problems:
        raise ConfigError(problems)
    for group, schema in SCHEMAS.items():
        if group not in cfg:
            problems.append(f"{group}: missing (select an option of the `{group}` group)")
            continue
        node = cfg[group]
        if isinstance(node, DictConfig):
            try:
                node = plain(node, drop=("corpus",) if group == "data" else ())
            except OmegaConfBaseException as e:
                problems.append(f"{group}.{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}")
                continue
        problems += check_schema(node, schema, group)
    for key in TARGET_NODES:
        node = OmegaConf.select(cfg, key)
        problems += check_target(node, key) if node is not None else [f"{key}: missing"]
    if problems:  # types are wrong: the cross-field rules below would only add noise
        raise ConfigError(problems)

    model: ModelConfig = typed(cfg.model, ModelConfig)
    data = typed(cfg.data, SCHEMAS["data"], drop=("corpus",))
    trainer, budget, logger = (typed(cfg[g], SCHEMAS[g]) for g in ("trainer", "budget", "logger"))
    check_model(model, problems, data.seq_len)
    _choice(problems, "trainer.precision", trainer.precision, PRECISIONS)
    _choice(problems, "logger.kind", logger.kind, LOGGERS)
    _choice(problems, "logger.mode", logger.mode, WANDB_MODES)
    tok_kind = cfg.tokenizer.get("kind")
    _choice(problems, "tokenizer.kind", tok_kind, TOKENIZER_KINDS)

    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not _cuda_available())
    for key in ("param_dtype", "reduce_dtype"):
        value = cfg.parallelism.get(key)
        if value not in (None, "float32") and on_cpu:
            problems.append(f"parallelism.{key}={value!r}: FSDP mixed precision needs CUDA (gloo's 16-bit "
                            "collectives deadlock on CPUs); allowed here: float32")
    if model.attention.kernel in ("flash", "flex") and on_cpu:
        problems.append(
            f"model.attention.kernel={model.attention.kernel!r}: needs a CUDA device "
            f"(trainer.accelerator={trainer.accelerator!r}); allowed here: sdpa"
        )

    # Vocabulary: a fixed model vocabulary must hold every token id the tokenizer can emit.
    tok_vocab = tokenizer_vocab_size(cfg.tokenizer)
    if model.vocab_size is not None and tok_vocab and tok_vocab > model.vocab_size:
        problems.append(
            f"model.vocab_size={model.vocab_size}: smaller than the tokenizer's vocabulary ({tok_vocab}); "
            f"allowed: >= {tok_vocab}, or null to take it from the tokenizer"
        )
    if "Synthetic" in str(cfg.data.corpus.get("_target_")) and tok_kind != "byte":
        problems.append(
            f"tokenizer.kind={tok_kind!r}: data=synthetic emits one character per symbol, so its entropy "
            "floor is per token only with tokenizer=byte; allowed: byte"
        )

    # Layout: world = devices x nodes = data-parallel ranks x tensor-parallel ranks.
    world = world_size or total_ranks(cfg)
    tp = int(cfg.parallelism.get("tensor_parallel", 1) or 1)
    replicate = cfg.parallelism.get("replicate")
    if world > 1 and "Single" in str(cfg.parallelism.get("_target_")):
        problems.append(f"parallelism=single: runs one process, but trainer.devices x trainer.num_nodes = {world}; "
                        "allowed: parallelism=ddp, fsdp, fsdp_tp or hsdp, or trainer.devices=1")
    if tp < 1 or world % tp:
        problems.append(f"parallelism.tensor_parallel={tp}: must divide the {world} ranks (trainer.devices x "
                        f"trainer.num_nodes); allowed: {_allowed(_divisors(world))}")
        tp = 1
    elif tp > 1:
        for key, heads in (("model.n_heads", model.n_heads), ("model.attention.n_kv_heads", model.kv_heads)):
            if heads % tp:
                problems.append(f"parallelism.tensor_parallel={tp}: must divide {key}={heads} (each rank takes whole "
                                f"heads); allowed: {_allowed([d for d in _divisors(heads) if world % d == 0])}")
    ranks = world // tp
    if replicate is not None and (replicate < 1 or ranks % replicate):
        problems.append(f"parallelism.replicate={replicate}: must divide the {ranks} data-parallel ranks; "
                        f"allowed: {_allowed(_divisors(ranks))}")

    # Batch arithmetic: global batch = micro batch x data-parallel ranks x accumulation.
    if data.seq_len < 1:
        problems.append(f"data.seq_len={data.seq_len}: must be >= 1")
    if data.micro_batch_size < 1:
        problems.append(f"data.micro_batch_size={data.micro_batch_size}: must be >= 1")
    elif data.global_batch_size is not None and data.global_batch_size % (data.micro_batch_size * ranks):
        unit = data.micro_batch_size * ranks
        problems.append(
            f"data.global_batch_size={data.global_batch_size}: must be a multiple of data.micro_batch_size x "
            f"data-parallel ranks = {data.micro_batch_size} x {ranks} = {unit} (e.g. {unit}, {2 * unit}, {4 * unit})"
        )
    if data.val_batches is not None and 0 < data.val_batches < ranks:  # Lightning stops a rank with none
        problems.append(f"data.val_batches={data.val_batches}: the {ranks} data-parallel ranks take validation "
                        f"batches in turn and each needs one; allowed: >= {ranks}, or null (the whole split)")

    set_fields = [f.name for f in dataclasses.fields(budget) if getattr(budget, f.name) is not None]
    if len(set_fields) != 1:
        problems.append(
            f"budget: exactly one of steps, tokens, flops, tokens_per_param must be set (got {set_fields or 'none'}); "
            "e.g. budget=steps budget.steps=500"
        )
    for name in set_fields:
        if getattr(budget, name) <= 0:
            problems.append(f"budget.{name}={getattr(budget, name)}: must be > 0")
    for key in ("val_every", "log_every", "checkpoint_every"):
        if getattr(trainer, key) < 1:
            problems.append(f"trainer.{key}={getattr(trainer, key)}: must be >= 1 (steps)")
    problems += _reliability_problems(trainer)
    if "lr" in cfg.optim and not cfg.optim.lr > 0:
        problems.append(f"optim.lr={cfg.optim.lr}: must be > 0")
    if problems:
        raise ConfigError(problems)


def _reliability_problems(trainer: Any) -> list[str]:
    """Checkpoint retention and the loss guard (llm.tracking.checkpoints, llm.tracking.guard)."""
    problems = []
    guard = trainer.guard
    if trainer.keep_last < 1:
        problems.append(f"trainer.keep_last={trainer.keep_last}: must be >= 1 (last.ckpt is always kept)")
    if guard.max_rollbacks < 0:
        problems.append(f"trainer.guard.max_rollbacks={guard.max_rollbacks}: must be >= 0 (0: stop at the first bad step)")
    if guard.warmup_steps < 0:
        problems.append(f"trainer.guard.warmup_steps={guard.warmup_steps}: must be >= 0 (steps)")
    if guard.window < 1:
        problems.append(f"trainer.guard.window={guard.window}: must be >= 1 (steps)")
    if guard.spike_threshold is not None and not guard.spike_threshold > 0:
        problems.append(f"trainer.guard.spike_threshold={guard.spike_threshold}: must be > 0 (moving deviations), "
                        "or null to judge only non-finite losses")
    if any(i < 0 for i in guard.skip_batches):
        problems.append(f"trainer.guard.skip_batches={list(guard.skip_batches)}: micro-batch indices must be >= 0")
    return problems


def check_input_files(cfg: DictConfig) -> None:
    """The files a valid config names (a tokenizer.json, text corpus patterns) exist and read:
    ConfigError otherwise, before any work. Separate from `validate`, which reads no files."""
    problems = []
    tokenizer = cfg.tokenizer
    if tokenizer.get("kind") == "pretrained" and tokenizer.get("path"):
        from llm.tokenizer.tokenizer import load_backend

        try:
            load_backend(tokenizer.path)
        except (OSError, ValueError) as e:
            problems.append(f"tokenizer.path={tokenizer.path!r}: {e}; give a tokenizer.json (or the folder holding one)")
    corpus = OmegaConf.select(cfg, "data.corpus")
    if isinstance(corpus, DictConfig) and str(corpus.get("_target_", "")).endswith("TextCorpus"):
        from llm.data.text import match_files

        paths = corpus.get("paths")
        patterns = [paths] if isinstance(paths, str) else list(paths or [])
        try:
            if not patterns:
                raise FileNotFoundError("no pattern given")
            match_files(patterns)
        except FileNotFoundError as e:
            problems.append(f"data.corpus.paths={paths if isinstance(paths, str) else patterns!r}: {e}; give text files "
                            "or a glob that matches some (quote globs for the shell: 'data/**/*.txt')")
    if problems:
        raise ConfigError(problems)


def total_ranks(cfg: DictConfig) -> int:
    """Processes in the run: devices per node x nodes."""
    devices = cfg.trainer.devices
    per_node = devices if isinstance(devices, int) and devices > 0 else 1
    return per_node * int(cfg.trainer.num_nodes)
