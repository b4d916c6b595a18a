"""PostTrainDataModule: post-training examples in, rank-sharded resumable Lightning dataloaders out."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from torch.utils.data import DataLoader

from llm.data.stream import ShardedStream, StreamDataModule

Collate = Callable[[Sequence[Any]], Any]


class ExampleStream(ShardedStream):
    """An endless stream of collated micro-batches of examples, the post-training BlockStream: a
    `ShardedStream` (llm/data/stream.py) whose items are the examples."""

    def __init__(self, examples: Sequence[Any], collate_fn: Collate, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start: int = 0, skip: Iterable[int] = ()):
        if not examples:
            raise ValueError("an ExampleStream needs at least one example")
        super().__init__(len(examples), micro_batch_size, seed, rank, world_size, start, skip)
        self.examples = examples
        self.collate_fn = collate_fn

    def example_indices(self, m: int) -> list[int]:
        """Indices into `examples` of this rank's micro-batch m."""
        return self.item_indices(m)

    def collate(self, items: list[int]) -> Any:
        return self.collate_fn([self.examples[i] for i in items])


def validation_batches(examples: Sequence[Any], collate_fn: Collate, micro_batch_size: int,
                       max_batches: int | None = None) -> list[Any]:
    """The examples in order, collated in groups of micro_batch_size; the last group may be
    smaller, so every held-out example is evaluated (unless max_batches stops earlier)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    starts = range(0, len(examples), micro_batch_size)
    if max_batches is not None:
        starts = starts[:max(max_batches, 0)]
    return [collate_fn(list(examples[s:s + micro_batch_size])) for s in starts]


class PostTrainDataModule(StreamDataModule):
    """Training batches from an ExampleStream, validation batches from `val_examples` in order.

    `examples` are whatever `collate_fn` takes: tokenised examples, packs, preference pairs or
    prompts (llm.data.posttrain). The trainer runs with use_distributed_sampler=False: this module
    shards by rank itself. The training stream starts at micro-batch global_step *
    accumulate_grad_batches, so a resumed run continues the exact batch sequence (dataloaders are
    built after Lightning restores the step); batches the loss guard found bad are skipped (see
    `StreamDataModule`). Validation batch j goes to rank j % world_size.
    """

    def __init__(self, train_examples: Sequence[Any], val_examples: Sequence[Any], collate_fn: Collate,
                 micro_batch_size: int, seed: int = 0, val_batches: int | None = None):
        super().__init__()
        if not train_examples:
            raise ValueError("PostTrainDataModule needs at least one training example")
        self.train_examples = train_examples
        self.val_examples = val_examples
        self.collate_fn = collate_fn
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.val_batches = val_batches

    def train_dataloader(self) -> DataLoader:
        rank, world_size, start = self._placement()
        stream = ExampleStream(self.train_examples, self.collate_fn, self.micro_batch_size, seed=self.seed,
                               rank=rank, world_size=world_size, start=start, skip=self.skipped)
        # batch_size=None and the identity: the stream already yields whole, collated batches.
        return DataLoader(stream, batch_size=None, num_workers=0, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        rank, world_size, _ = self._placement()
        batches = validation_batches(self.val_examples, self.collate_fn, self.micro_batch_size, self.val_batches)
        return DataLoader(batches[rank::world_size], batch_size=None, num_workers=0, collate_fn=_identity)


def _identity(batch: Any) -> Any:
    return batch


def build_posttrain_data(data_cfg: Any, kind: str, tokenizer: Any, seq_len: int, micro_batch_size: int,
               val_batches: Optional[int], template: Any = None) -> tuple[Any, list[dict], str]:
    """The method's datamodule, the held-out prompts with answers (for the before/after
    evaluation; only the tasks have them), and a line saying what was read and kept. `template`
    renders conversations (llm.data.chat); None: the one data_cfg asks for."""
    from llm.data.chat import build_chat_template
    from llm.data.formats import read_examples
    from llm.data.posttrain import collator, pack, tokenize_preferences, tokenize_prompts, tokenize_sft
    from llm.data.tasks import TaskMix

    template = template or build_chat_template(data_cfg)
    eval_rows: list[dict] = []
    if data_cfg.source == "tasks":
        mix = TaskMix(data_cfg.tasks, seed=data_cfg.seed, val_fraction=data_cfg.val_fraction)
        rows = {"sft": mix.sft_rows, "preference": mix.preference_rows, "prompt": mix.prompt_rows}[kind]
        train_source, val_source = rows(data_cfg.n_train, "train"), rows(data_cfg.n_val, "val")
        eval_rows = mix.prompt_rows(data_cfg.eval_prompts, "val")
    else:
        train_source, val_source = data_cfg.source, data_cfg.val_source
    read = dict(kind=kind, format=data_cfg.format, template=template, hf_split=data_cfg.hf_split)
    train = read_examples(train_source, key="posttrain.data.source", **read)
    if val_source is not None:
        val = read_examples(val_source, key="posttrain.data.val_source", **read)
    else:  # a deterministic held-out share of the one source
        from llm.data.corpus import hash_fraction

        held_out = [hash_fraction(str(i) + repr(e)) < data_cfg.val_fraction for i, e in enumerate(train)]
        val = [e for e, h in zip(train, held_out) if h]
        train = [e for e, h in zip(train, held_out) if not h]

    def tokenize(examples: list, what: str) -> Any:
        if kind == "sft":
            result = tokenize_sft(examples, tokenizer, seq_len)
        elif kind == "preference":
            result = tokenize_preferences(examples, tokenizer, seq_len)
        else:
            result = tokenize_prompts(examples, tokenizer, data_cfg.max_prompt_length)
        return result.require_some(what)

    train_tok, val_tok = tokenize(train, "posttrain.data.source"), tokenize(val, "held-out rows")
    train_examples, val_examples = train_tok.examples, val_tok.examples
    if data_cfg.packing:  # SFT rows only (validation refuses packing for the other methods)
        train_examples, val_examples = pack(train_examples, seq_len), pack(val_examples, seq_len)
    datamodule = PostTrainDataModule(train_examples, val_examples, collator(kind, tokenizer.pad_id), micro_batch_size,
                                     seed=data_cfg.seed, val_batches=val_batches)
    line = (f"{kind} data from {data_cfg.source}: train {train_tok.summary()}; val {val_tok.summary()}"
            + (f"; packed into {len(train_examples)} rows" if data_cfg.packing else ""))
    return datamodule, eval_rows, line
