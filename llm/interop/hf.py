"""Hugging Face `transformers` interoperability: export our models as Llama-, GPT-2-, Mixtral- or
ERNIE-4.5-MoE-family folders that `from_pretrained` loads, and import such folders back.

    from llm.interop import export_hf, import_hf
    export_hf(model, "out/hf", tokenizer)                 # family picked from the architecture
    model, tokenizer = import_hf("out/hf")

A folder holds config.json, model.safetensors and (with a tokenizer) tokenizer.json,
tokenizer_config.json (left padding, the chat template), special_tokens_map.json and
generation_config.json. Everything here reads and writes those files
directly: neither direction imports transformers (only `safetensors`), and nothing is fetched
from the Hub. The tensor layouts of each family live in `llm.interop.llama`, `.gpt2`, `.mixtral`
and `.ernie4_5_moe`.

The exported vocab_size is our PADDED vocab (the embedding's rows); the tokenizer may have fewer
tokens. On import, our vocab_size is the tokenizer's size where one comes along (padding chosen
so the embedding keeps the checkpoint's exact row count), else the checkpoint's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from llm import fields
from llm.files import InputError, checked_path, read_input_json, write_json
from llm.interop import ernie4_5_moe, gpt2, llama, mixtral
from llm.interop.common import POSITION_NAMES, Tensors
from llm.interop.hf_tokenizer import read_tokenizer, write_tokenizer_files
from llm.model import ModelConfig, Transformer
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {"llama": llama, "gpt2": gpt2, "mixtral": mixtral, "ernie4_5_moe": ernie4_5_moe}
DEFAULT_FAMILY = {"rope": "llama", "learned": "gpt2"}  # dense models: by position scheme, the one that decides
# MoE models: the first of these that represents the model exactly. Mixtral, the most widely read,
# takes all-MoE models without shared experts; ERNIE 4.5 MoE also has shared experts, dense layers
# and a router bias.
MOE_FAMILIES = ("mixtral", "ernie4_5_moe")


def _problems(module: ModuleType, cfg: ModelConfig, state: Optional[Tensors]) -> list[str]:
    """What keeps `cfg` (and its weights, when given) out of a family."""
    found = module.problems(cfg)
    if state is not None and hasattr(module, "state_problems"):  # a value in the weights, e.g. Mixtral's router bias
        found += module.state_problems(state, cfg)
    return found


def choose_family(cfg: ModelConfig, family: Optional[str] = None, state: Optional[Tensors] = None) -> ModuleType:
    """The family module `cfg` exports to; ValueError naming every feature it cannot represent.
    `state` (the model's state dict) lets the choice see weights no config describes: a router
    bias moved from zero (by moe.bias_update_rate) rules Mixtral out."""
    if family is None and cfg.moe.enabled and cfg.position.kind == "rope":
        found = {name: _problems(FAMILIES[name], cfg, state) for name in MOE_FAMILIES}
        family = next((name for name in MOE_FAMILIES if not found[name]), None)
        if family is None:
            raise ValueError("no transformers MoE family represents this model: "
                             + "; ".join(f"not {name}: " + ", ".join(p) for name, p in found.items()))
    if family is None:
        family = DEFAULT_FAMILY.get(cfg.position.kind)
        if family is None:
            raise ValueError(f"no transformers family represents {POSITION_NAMES[cfg.position.kind]}: "
                             "Llama and the MoE families need RoPE, GPT-2 learned positions")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    problems = _problems(FAMILIES[family], cfg, state)
    if problems:
        raise ValueError(f"cannot export to the {family} family: " + "; ".join(problems))
    return FAMILIES[family]


def _state(model: Transformer) -> Tensors:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def hf_config(model: Transformer, tokenizer: Optional[Tokenizer] = None, family: Optional[str] = None) -> dict:
    """The config.json contents for `model` (also used to build transformers models in memory)."""
    config = choose_family(model.cfg, family, model.state_dict()).to_config(model.cfg)
    for role in ("bos", "eos", "pad"):  # null without a tokenizer: HF generate then never stops early
        config[f"{role}_token_id"] = getattr(tokenizer, f"{role}_id", None)
    config["torch_dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    return config


def hf_state_dict(model: Transformer, family: Optional[str] = None) -> Tensors:
    """The model's tensors in the family's names and layouts (CPU, contiguous)."""
    state = _state(model)
    return choose_family(model.cfg, family, state).to_state(state, model.cfg)


def generation_config(tokenizer: Tokenizer, padded_vocab_size: int) -> dict:
    """generation_config.json: our special tokens, greedy decoding (`llm-generate`'s default), and
    the padded vocabulary rows suppressed (they name no token; `llm.generate` masks them too), so
    `model.generate(ids)` decodes as `llm-generate` does without being told."""
    padding = list(range(tokenizer.vocab_size, padded_vocab_size))
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
            "do_sample": False, **({"suppress_tokens": padding} if padding else {})}


def export_hf(
    model: Transformer, out_dir: str | Path, tokenizer: Optional[Tokenizer] = None, family: Optional[str] = None,
    chat_template: Optional[str] = None,
) -> Path:
    """Write `model` (and `tokenizer`, with `chat_template` when given) as a transformers folder;
    returns the folder.

    `family` is "llama", "gpt2", "mixtral" or "ernie4_5_moe"; None picks by architecture: a dense
    model by position scheme (RoPE -> llama, learned -> gpt2), an MoE model mixtral when it can
    (no shared experts, every layer MoE, zero router bias), else ernie4_5_moe. ValueError, naming
    the feature, for anything the family cannot represent exactly; nothing is written then.
    """
    from safetensors.torch import save_file

    cfg = model.cfg
    config = hf_config(model, tokenizer, family)  # validates first: nothing is written for a bad model
    if tokenizer is not None and tokenizer.vocab_size > cfg.padded_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.padded_vocab_size}")
    tensors = hf_state_dict(model, family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The "format" metadata is what transformers checks to accept a safetensors file as PyTorch's.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", config)
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, cfg.max_seq_len, chat_template)
        write_json(out / "generation_config.json", generation_config(tokenizer, cfg.padded_vocab_size))
    return out


FOLDER_FIX = "give a transformers model folder (config.json, model.safetensors or pytorch_model.bin) as saved by " \
             "save_pretrained or llm-hf export"


def read_hf_tensors(folder: Path, key: str = "folder") -> Tensors:
    """All tensors of a folder: model.safetensors or pytorch_model.bin, whole or sharded
    (an *.index.json naming the shards). Pickles are read with weights_only=True. A weights file
    that does not load (cut short, not weights) is an InputError naming it and `key`."""

    def load(file: Path) -> Tensors:
        checked_path(file, key, "file", FOLDER_FIX)
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors and torch raise several kinds on a torn or foreign file
            raise InputError(f"{key}: {file} does not load as weights ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}; cut short?); {FOLDER_FIX}") from e

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return load(folder / name)
        index = folder / f"{name}.index.json"
        if index.exists():
            weight_map = read_input_json(index, key, FOLDER_FIX).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InputError(f"{key}: {index} has no weight_map of tensor names to shard files; {FOLDER_FIX}")
            return {k: v for shard in sorted(set(weight_map.values())) for k, v in load(folder / shard).items()}
    raise FileNotFoundError(f"{key}: {folder} has no model.safetensors or pytorch_model.bin (whole or sharded); "
                            f"{FOLDER_FIX}")


def _vocab_fields(model_rows: int, tokenizer_size: Optional[int]) -> dict[str, int]:
    """vocab_size and pad_vocab_to such that the padded vocab is exactly `model_rows` (or, when the
    tokenizer has more tokens than that, its size padded to 64: the embedding grows)."""
    if tokenizer_size is None:
        tokenizer_size = model_rows
    if tokenizer_size > model_rows:
        return {"vocab_size": tokenizer_size, "pad_vocab_to": 64}
    # Our usual padding when it gives the checkpoint's rows, else padding to exactly that many.
    fits = 64 * math.ceil(tokenizer_size / 64) == model_rows
    return {"vocab_size": tokenizer_size, "pad_vocab_to": 64 if fits else model_rows}


def _grow_vocab(state: Tensors, rows: int) -> Tensors:
    """New embedding (and head) rows set to the mean of the old ones: a neutral start for tokens
    the tokenizer gained on import. The old rows, and so every old logit, are unchanged."""
    for name in ("embed.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] < rows:
            old = state[name]
            extra = old.float().mean(0, keepdim=True).to(old.dtype).expand(rows - old.shape[0], -1)
            state[name] = torch.cat([old, extra])
    return state


def read_hf_config(folder: Path, key: str = "folder") -> tuple[dict, ModuleType, ModelConfig]:
    """A transformers folder's config.json, its family module and our config for it, read through
    the checked path: InputError naming `key` for a folder or config.json that is not one, ValueError
    naming the config key for a model we cannot represent."""
    checked_path(folder, key, "dir", FOLDER_FIX)
    config_file = folder / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        raise FileNotFoundError(f"{key}: {folder} has no config.json: not a transformers model folder; {FOLDER_FIX}")
    hf = read_input_json(config_file, key, FOLDER_FIX)
    families = {module.MODEL_TYPE: module for module in FAMILIES.values()}
    family = families.get(hf.get("model_type"))
    if family is None:
        raise ValueError(f"unsupported config.json model_type={hf.get('model_type')!r}: "
                         f"expected one of {', '.join(families)}")
    try:
        cfg = family.from_config(hf)
    except (TypeError, ArithmeticError, KeyError) as e:  # a value of the wrong type (a string for a size), a 0
        raise InputError(f"{key}: {config_file} holds a value of the wrong type or range ({type(e).__name__}: {e}); "
                         f"{FOLDER_FIX}") from e
    problems = fields.problems(cfg)
    if problems:
        raise InputError(f"{key}: {config_file} describes a model outside what we can build ({'; '.join(problems)}); "
                         f"{FOLDER_FIX}")
    return hf, family, cfg


def check_hf_folder(folder: str | Path, key: str = "checkpoint") -> None:
    """What a command checks of a transformers folder before loading its weights: config.json (and
    tokenizer.json, when there is one) read and understood; InputError naming `key` otherwise."""
    folder = Path(folder)
    try:
        hf, _, _ = read_hf_config(folder, key)
        if (folder / "tokenizer.json").exists() or (folder / "tokenizer.json").is_symlink():
            read_tokenizer(folder, hf, key)
    except InputError:
        raise
    except (ValueError, FileNotFoundError) as e:  # a model we cannot represent: named by its config key
        raise InputError(f"{key}: {folder}: {e}") from e


def import_hf(path: str | Path, key: str = "folder") -> tuple[Transformer, Optional[Tokenizer]]:
    """Our Transformer (fp32) and Tokenizer (None without tokenizer.json) for a local Llama-,
    GPT-2-, Mixtral- or ERNIE-4.5-MoE-family folder. ValueError naming the config key for anything
    we cannot represent (rope_scaling, another model_type, a sliding window, ...); InputError naming `key` (the
    argument or config key that gave the folder) for files that are damaged or not what their name
    says. See `llm.interop.hf_tokenizer` for how the HF special tokens become ours."""
    folder = Path(path)
    hf, family, cfg = read_hf_config(folder, key)
    has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "tokenizer.json").is_symlink()
    tokenizer = read_tokenizer(folder, hf, key) if has_tokenizer else None
    state = family.from_state(read_hf_tensors(folder, key), cfg)
    cfg = replace(cfg, **_vocab_fields(cfg.vocab_size, tokenizer.vocab_size if tokenizer else None))
    state = _grow_vocab(state, cfg.padded_vocab_size)
    model = Transformer(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than config.json says: not this model's weights
        why = str(e).splitlines()[-1].strip()
        raise InputError(f"{key}: the weights in {folder} do not fit its config.json ({why}); {FOLDER_FIX}") from e
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:  # a mapping bug, not a user error: say exactly what
        raise ValueError(f"{folder}: converted state does not fit the model "
                         f"(missing {missing}, unexpected {unexpected})")
    return model, tokenizer


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, family: Optional[str] = None) -> Path:
    """Export a trained language model: anything `llm.checkpoint.resolve` accepts (a run
    directory, a checkpoint file, a sharded FSDP/TP checkpoint directory, read whole in this one
    process), with the run's tokenizer (or the tokenizer.json beside the file) and the chat
    template it was trained with, when there are. For a LoRA run the merged model is exported,
    and its adapters beside it as a PEFT folder (`adapter/`, `llm.interop.peft`). ConfigError for
    a reference that names no loadable language model."""
    from llm.checkpoint import load_network, load_tokenizer, resolve, tokenizer_file
    from llm.config import ConfigError
    from llm.data.chat import read_chat_template
    from llm.interop.peft import ADAPTER_DIR, export_adapter, lora_checkpoint

    ref = resolve(str(checkpoint), ".", key="source")
    model = load_network(ref, key="source", value_head=False)
    try:
        tokenizer = load_tokenizer(tokenizer_file(ref))
    except ConfigError:  # none to be found: the folder gets the weights only
        tokenizer = None
    near = [ref.path] if ref.kind == "hf" else [d for d in (ref.run_dir, ref.path.parent) if d is not None]
    template = next((t for t in (read_chat_template(d, "source") for d in near) if t is not None), None)
    out = export_hf(model, out_dir, tokenizer, family, template)
    adapters = lora_checkpoint(ref.path, ref.run_dir) if ref.kind != "hf" else None
    if adapters is not None:
        try:
            chosen = choose_family(model.cfg, family, model.state_dict())
            log.info(f"PEFT adapter -> {export_adapter(*adapters, chosen, out / ADAPTER_DIR)}")
        except ValueError as e:  # the merged model is exported all the same
            log.warning(f"no PEFT adapter: {e}")
    return out
