"""`llm-hf`: move models between this framework and Hugging Face transformers folders.

  llm-hf export runs/<id> out/hf                 # a run's last checkpoint + its tokenizer
  llm-hf export model.ckpt out/hf --family gpt2  # a checkpoint file (tokenizer.json beside it, if any)
  llm-hf import out/hf imported/model.ckpt       # writes model.ckpt, imported/tokenizer.json (and chat_template.jinja)

Exported folders load offline with `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` (left padding, the run's chat template, generation_config.json
with our EOS/PAD); a LoRA run adds its adapters as a PEFT folder, <out_dir>/adapter. Families: llama (RoPE, RMSNorm, SwiGLU, MHA/GQA/MQA),
gpt2 (learned positions, LayerNorm, GELU/ReLU MLP, MHA), and for MoE models mixtral (every layer
MoE, no shared experts) and ernie4_5_moe (shared experts, dense layers, router bias); anything
else is refused with the feature named. Imported checkpoints load with `llm.checkpoint.load_network` (and as checkpoint=,
init_from= of the other commands, which also take a transformers folder directly); sharded (FSDP/TP)
checkpoints are read whole in this one process (no llm-consolidate step needed).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("llm.cli.hf")  # not __name__: that is __main__ under `python -m`


def _refuse_file_as_folder(path: Path, key: str) -> None:
    """An output folder that is an existing file (or a link to nothing) cannot be written into."""
    from llm.files import InputError

    if path.is_symlink() and not path.exists():
        raise InputError(f"{key}: {path} is a broken symbolic link; remove it or give another folder")
    if path.exists() and not path.is_dir():
        raise InputError(f"{key}: {path} is a file, not a folder; give a folder to write (created if missing)")


def export(args: argparse.Namespace) -> None:
    from llm.interop import export_checkpoint

    _refuse_file_as_folder(args.out_dir, "out_dir")  # before the checkpoint is read
    out = export_checkpoint(args.source, args.out_dir, args.family)
    log.info(f"exported -> {out}")


def import_(args: argparse.Namespace) -> None:
    from llm.checkpoint.save import save_network
    from llm.data.chat import read_chat_template
    from llm.files import InputError, write_text
    from llm.interop import import_hf
    from llm.run.layout import CHAT_TEMPLATE_FILE

    if args.out_file.is_dir():  # checked first: nothing is read, nothing half-written
        raise InputError(f"out_file: {args.out_file} is a directory; give the checkpoint file to write, e.g. "
                         f"{args.out_file / 'model.ckpt'}")
    _refuse_file_as_folder(args.out_file.parent, "out_file")
    model, tokenizer = import_hf(args.folder)
    save_network(model, args.out_file)  # an ordinary checkpoint: llm-generate, llm-eval, init_from read it
    log.info(f"imported -> {args.out_file}")
    if tokenizer is not None:
        tokenizer.save(args.out_file.parent / "tokenizer.json")
        log.info(f"tokenizer -> {args.out_file.parent / 'tokenizer.json'}")
    template = read_chat_template(args.folder, "folder")
    if template is not None:  # beside the tokenizer, where posttrain.data.chat_template=tokenizer looks
        write_text(args.out_file.parent / CHAT_TEMPLATE_FILE, template)
        log.info(f"chat template -> {args.out_file.parent / CHAT_TEMPLATE_FILE}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")

    p = commands.add_parser("export", help="write a run or checkpoint as a transformers folder",
                            description="Write a run directory's last checkpoint (or a checkpoint file) as a "
                                        "transformers folder: config.json, model.safetensors and tokenizer files.")
    p.add_argument("source", type=Path, help="a run directory (uses checkpoints/last.ckpt and tokenizer.json) "
                                             "or a checkpoint file")
    p.add_argument("out_dir", type=Path, help="the folder to write (created if missing)")
    p.add_argument("--family", choices=("llama", "gpt2", "mixtral", "ernie4_5_moe"),
                   help="transformers family (default: llama for RoPE models, gpt2 for learned positions; MoE "
                        "models: mixtral when it can represent them, else ernie4_5_moe)")
    p.set_defaults(run=export)

    p = commands.add_parser("import", help="read a transformers folder into a checkpoint file",
                            description="Read a local Llama-, GPT-2-, Mixtral- or ERNIE-4.5-MoE-family transformers "
                                        "folder into a checkpoint file that llm-generate, llm-eval and init_from read; its tokenizer "
                                        "(with our special tokens) is written as tokenizer.json beside it.")
    p.add_argument("folder", type=Path, help="a transformers model folder (config.json + weights)")
    p.add_argument("out_file", type=Path, help="the checkpoint file to write, e.g. imported/model.ckpt")
    p.set_defaults(run=import_)
    return parser


def main(argv: list[str] | None = None) -> None:
    from llm.tracking.console import setup_console_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console_logging()
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:  # a user's input: one line, no traceback
        parser.exit(2, f"llm-hf {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
