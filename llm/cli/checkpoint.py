"""`llm-consolidate CHECKPOINT_DIR [-o FILE]`: gather a sharded FSDP/TP checkpoint into one file.

The file holds what a single-process run saves (weights, optimizer states, step, loop state, the
model config), so it resumes, exports (llm-hf) and loads (llm-generate, llm-eval, init_from) on
one device. Those commands also read the sharded directory itself; a single file is for moving
a checkpoint elsewhere or for tools that expect one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llm.cli.common import CONFIG_ERROR_EXIT_CODE

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="a sharded checkpoint directory, e.g. runs/<id>/checkpoints/last.ckpt")
    parser.add_argument("-o", "--out", type=Path,
                        help="output file (default: <name>.consolidated.ckpt beside it, e.g. last.consolidated.ckpt)")
    args = parser.parse_args(argv)

    from llm.checkpoint.consolidate import consolidate
    from llm.config import ConfigError
    from llm.files import InputError
    from llm.tracking.console import setup_console_logging

    setup_console_logging()
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + ".consolidated.ckpt")
    try:
        logger.info("consolidated -> %s", consolidate(args.checkpoint, out))
    except (ConfigError, InputError) as e:
        sys.stderr.write(f"llm-consolidate: error: {e}\n")
        sys.exit(CONFIG_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()
