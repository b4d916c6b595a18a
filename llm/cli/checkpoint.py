"""`llm-consolidate CHECKPOINT_DIR [-o FILE]`: gather a sharded FSDP/TP checkpoint into one file."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-consolidate", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a sharded checkpoint directory, e.g. runs/<id>/checkpoints/last.ckpt")
    parser.add_argument("-o", "--out", type=Path, help="output file (default: <checkpoint>.consolidated.ckpt beside it)")
    args = parser.parse_args(argv)
    from llm.tracking.checkpoints import consolidate

    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + ".consolidated.ckpt")
    try:
        print(f"consolidated -> {consolidate(args.checkpoint, out)}")
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
