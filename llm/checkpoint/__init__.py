"""Checkpoints: find them, read them, write them, gather them. Every command that reads what runs
leave behind (llm-generate, llm-eval, llm-hf, init_from, resume) goes through this package.

    ref = resolve("runs/my-run", runs_dir, key="checkpoint")  # run dir | run id | file | shards | HF folder
    model = load_network(ref)                                 # a plain Transformer or ValueModel, eval mode
    tokenizer = load_tokenizer(tokenizer_file(ref))

- refs:        CheckpointRef, resolve, tokenizer_file (which checkpoint a value names)
- meta:        CheckpointMeta, load_meta, checkpoint_step, checkpoint_problem, require_same_model
- find:        a run's checkpoints newest first, the newest that loads (resume)
- load:        load_network, read_weights, fold_lora, load_trained_network, load_tokenizer
- parent:      Parent, load_parent (where a post-training stage starts)
- save:        atomic_torch_save, save_network, AtomicCheckpointIO (Lightning's plugin)
- consolidate: a sharded FSDP/TP checkpoint -> one file (`llm-consolidate`)
- safe_reader: torch's sharded-checkpoint reader and planners, unpickling nothing but its metadata

Nothing here unpickles more than tensors and plain types (`torch.load(weights_only=True)`) and,
in a sharded directory's index, torch's checkpoint metadata types (`safe_reader`); every file is
written atomically (`llm.files.atomic_write`). `save`, `consolidate` and `safe_reader` are imported
from their modules (they bring Lightning and torch.distributed along).
"""

from llm.checkpoint.find import checkpoint_candidates, last_checkpoint, newest_loadable_checkpoint
from llm.checkpoint.load import fold_lora, load_network, load_tokenizer, load_trained_network, read_weights
from llm.checkpoint.meta import (
    CheckpointMeta,
    checkpoint_problem,
    checkpoint_step,
    is_sharded,
    load_meta,
    require_same_model,
)
from llm.checkpoint.parent import Parent, load_parent
from llm.checkpoint.refs import CheckpointRef, resolve, tokenizer_file

__all__ = [
    "CheckpointMeta",
    "CheckpointRef",
    "Parent",
    "checkpoint_candidates",
    "checkpoint_problem",
    "checkpoint_step",
    "fold_lora",
    "is_sharded",
    "last_checkpoint",
    "load_meta",
    "load_network",
    "load_parent",
    "load_tokenizer",
    "load_trained_network",
    "newest_loadable_checkpoint",
    "read_weights",
    "require_same_model",
    "resolve",
    "tokenizer_file",
]
