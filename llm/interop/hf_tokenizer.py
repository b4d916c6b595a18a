"""Tokenizer files of a Hugging Face model folder <-> our Tokenizer.

Export writes our `tokenizer.json` unchanged, plus `tokenizer_config.json` and
`special_tokens_map.json` naming <|bos|>, <|eos|> and <|pad|>, so `AutoTokenizer.from_pretrained`
works offline, pads on the left (for batched generation) and carries the run's chat template. It is told not to add BOS/EOS itself (`add_bos_token=False`): like our
`Tokenizer.encode`, `hf_tokenizer(text)` then gives exactly the text's tokens.

Import needs our three special tokens (`Tokenizer` finds them by name). For each of them that
the HF tokenizer lacks:
1. if the HF folder names a token for that role (tokenizer_config.json, special_tokens_map.json,
   else config.json's *_token_id), that token is RENAMED to ours: it keeps its id and so what the
   pretrained model learned about it (GPT-2's "<|endoftext|>" becomes <|eos|>, Llama's "<s>"
   <|bos|>). A token serves one role only: where HF uses one token for two roles (GPT-2's
   bos = eos), the second role falls to rule 2;
2. otherwise ours is appended as a new special token, after the vocabulary (the importer grows
   the embedding for it if needed: an untrained token).
Rules run for EOS first (generation stops on it; documents are separated by it), then BOS, PAD.
A renamed token no longer matches its old spelling in raw text; our pipeline never relies on
that (it inserts special ids itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from llm.files import InputError, read_input_json
from llm.tokenizer import BOS, EOS, PAD, Tokenizer

FIX = "give the folder as save_pretrained or llm-hf export wrote it (tokenizer.json from Hugging Face tokenizers)"

ROLES = (("eos", EOS), ("bos", BOS), ("pad", PAD))  # the order rules are applied in


def write_tokenizer_files(tokenizer: Tokenizer, out: Path, max_length: int, chat_template: str | None = None) -> None:
    """tokenizer.json plus the two small files transformers' AutoTokenizer reads; the chat
    template (Jinja, as `apply_chat_template` renders it) when the model was trained on one."""
    tokenizer.save(out / "tokenizer.json")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        # The generic fast tokenizer: a model-specific class (LlamaTokenizerFast) would rebuild
        # the pipeline or add BOS on its own.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,  # would change decoded text (" ." -> ".")
        # A decoder-only model continues the last position: batched prompts are padded on the left.
        "padding_side": "left",
        **({"chat_template": chat_template} if chat_template is not None else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def _content(token: Any) -> str | None:
    """A special token as transformers saves it: a string, or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _json(path: Path, key: str) -> dict[str, Any]:
    """An optional JSON object file of the folder: {} when absent, InputError when damaged."""
    return read_input_json(path, key, FIX) if path.exists() or path.is_symlink() else {}


def hf_special_tokens(folder: Path, model_config: dict[str, Any], backend: tokenizers.Tokenizer,
                      key: str = "folder") -> dict[str, str]:
    """role ("bos", "eos", "pad") -> token string, as the HF folder declares them."""
    tokenizer_config = _json(folder / "tokenizer_config.json", key)
    tokens_map = _json(folder / "special_tokens_map.json", key)
    roles = {}
    for role, _ in ROLES:
        token = _content(tokenizer_config.get(f"{role}_token")) or _content(tokens_map.get(f"{role}_token"))
        token_id = model_config.get(f"{role}_token_id")
        if token is None and isinstance(token_id, int):  # a list (several EOS ids) names no single token
            token = backend.id_to_token(token_id)
        if token is not None and backend.token_to_id(token) is not None:
            roles[role] = token
    return roles


def _rename(node: Any, old: str, new: str) -> Any:
    """Every string equal to `old`, as a value or a key, anywhere in tokenizer.json (added
    tokens, the model's vocab, post-processor templates) becomes `new`."""
    if isinstance(node, dict):
        return {(new if k == old else k): _rename(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename(v, old, new) for v in node]
    return new if node == old else node


def read_tokenizer(folder: Path, model_config: dict[str, Any], key: str = "folder") -> Tokenizer:
    """Our Tokenizer for a HF folder's tokenizer.json, with our special tokens (module docstring).
    Files that are damaged or not a tokenizer's are an InputError naming `key` and the file."""
    path = folder / "tokenizer.json"
    spec = read_input_json(path, key, FIX)
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises a bare Exception on JSON that is not a tokenizer
        raise InputError(f"{key}: {path} is not a valid tokenizer.json ({str(e).splitlines()[0]}); {FIX}") from e
    roles = hf_special_tokens(folder, model_config, backend, key)
    used = set()
    for role, ours in ROLES:
        if backend.token_to_id(ours) is not None:
            continue
        theirs = roles.get(role)
        if theirs is not None and theirs not in used and theirs not in (BOS, EOS, PAD):
            spec = _rename(spec, theirs, ours)
            used.add(theirs)
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    missing = [t for _, t in ROLES if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens(missing)
    return Tokenizer(backend)
