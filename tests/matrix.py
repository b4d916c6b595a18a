"""The combination matrix (issue 13): every composition a user can make from the groups either
trains or is refused before any work, with a message naming the keys.

The matrix is the product stage x parallelism x LoRA x schedule, and each of its combinations
takes one row of a pairwise covering array over the architecture groups (tokenizer, attention,
position, norm, MLP), in turn, so that every pair of architecture choices appears. Post-training
takes its architecture and tokenizer from its parent (`init_from`), so a post-training
combination starts from a parent pretrained with its row's architecture.

    python -m tests.matrix                  # the refused combinations, as the README's table
    python -m tests.matrix --write-readme   # rewrite that table in README.md (between the markers)

tests/test_matrix.py checks every combination and that the README's table is current.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START_MARKER = "<!-- matrix:refused:start -->"
END_MARKER = "<!-- matrix:refused:end -->"

PRETRAIN = "none"  # posttrain=none is pretraining
STAGES = (PRETRAIN, "sft", "reward", "dpo", "ppo", "grpo", "distill")
PARALLELISMS = ("single", "ddp", "fsdp", "fsdp_tp", "hsdp", "pp", "pp_fsdp", "pp_fsdp_tp")
SCHEDULES = ("cosine", "wsd")
# The architecture groups and keys, in the order the covering array is built.
ARCHITECTURE: dict[str, tuple[str, ...]] = {
    "tokenizer": ("bpe", "unigram", "wordpiece", "byte"),
    "attention": ("mha", "mqa", "gqa"),
    "position": ("rope", "alibi", "learned", "sinusoidal", "none"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.mlp": ("swiglu", "gelu", "relu"),
}

STEPS = 2
# Seconds, not minutes: the smallest model on ~100 kB of the stdlib corpus, 2 steps of 4 x 32 tokens.
TINY = ["data.seq_len=32", "data.micro_batch_size=4", "data.val_batches=2", f"budget.steps={STEPS}",
        f"trainer.val_every={STEPS}", "trainer.log_every=1", "logger=none", "trainer.progress_bar=false"]
# Pretraining only: post-training takes the model (nano, from its parent) and its data from elsewhere.
PRETRAIN_DATA = ["model=nano", "data.corpus.max_bytes=100000"]
TRAINED_TOKENIZER_VOCAB = 1024  # bpe, unigram, wordpiece: small and quick to train (wordpiece needs >= 768)
# 8 held-out rows: a validation batch of 4 for each of 2 ranks (with 4, the second rank has none).
POSTTRAIN_DATA = ["posttrain.data.n_train=32", "posttrain.data.n_val=8", "posttrain.data.eval_prompts=2",
                  "posttrain.data.eval_max_new_tokens=4"]
# Short rollouts: 2 completions of 4 tokens.
METHOD_ARGS = {
    "grpo": ["posttrain.num_generations=2", "posttrain.max_new_tokens=4"],
    "ppo": ["posttrain.max_new_tokens=4", "posttrain.num_ppo_epochs=1"],
    "distill": ["posttrain.max_new_tokens=4"],  # the row's parent is also the teacher (self-distillation)
}
DEVICES = 2  # every multi-process layout runs on 2 ranks (fsdp_tp: 1 x 2; hsdp: 2 replicas of 1; pp*: 2 stages)
# 2 stages x 2 ranks each: pipeline x FSDP (dp 2), pipeline x tensor parallel (tp 2).
WIDE_LAYOUTS = {"pp_fsdp": 4, "pp_fsdp_tp": 4}
# A pipeline splits the embedding from the head: pretraining under one unties them (tied: refused, test_pipeline).
PIPELINE_MODEL = ["model.tie_embeddings=false"]
WSD_BRANCHES = "schedule.branches=[0.5]"


# ---------------------------------------------------------------- covering array


def covering_array(factors: dict[str, tuple[str, ...]]) -> list[dict[str, str]]:
    """Rows of values in which every pair of values of any two factors appears at least once
    (a pairwise covering array), built greedily and deterministically: each new row is the
    candidate that covers the most pairs not yet covered (the first such in product order)."""
    names = list(factors)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]
    rows: list[dict[str, str]] = []
    while uncovered:
        def gain(row: dict[str, str]) -> int:
            return sum(((a, row[a]), (b, row[b])) in uncovered for a, b in itertools.combinations(names, 2))

        best = max(candidates, key=gain)  # max keeps the first of equals: deterministic
        rows.append(best)
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
    return rows


ROWS = covering_array(ARCHITECTURE)


def architecture_overrides(row: dict[str, str]) -> list[str]:
    """The command-line overrides that pretrain a model of this architecture."""
    out = [f"{key}={value}" for key, value in row.items()]
    if row["tokenizer"] != "byte":
        out.append(f"tokenizer.vocab_size={TRAINED_TOKENIZER_VOCAB}")
    return out


def row_label(row: dict[str, str]) -> str:
    return "/".join(row[k] for k in ARCHITECTURE)


# ---------------------------------------------------------------- combinations


@dataclass(frozen=True)
class Combination:
    """One composition: a stage, a layout, LoRA (None: pretraining has no LoRA key), a schedule
    and the index of its architecture row."""

    stage: str
    parallelism: str
    lora: Optional[bool]
    schedule: str
    row: int

    @property
    def architecture(self) -> dict[str, str]:
        return ROWS[self.row]

    @property
    def is_posttrain(self) -> bool:
        return self.stage != PRETRAIN

    @property
    def id(self) -> str:
        lora = "" if self.lora is None else ("-lora" if self.lora else "-full")
        return f"{self.stage}{lora}-{self.parallelism}-{self.schedule}-r{self.row:02d}"

    @property
    def devices(self) -> int:
        return 1 if self.parallelism == "single" else WIDE_LAYOUTS.get(self.parallelism, DEVICES)

    def overrides(self, parent: Optional[Path] = None) -> list[str]:
        """The command line of this combination; post-training needs its row's `parent` run."""
        out = [*TINY, f"parallelism={self.parallelism}", f"schedule={self.schedule}"]
        if self.devices > 1:
            out.append(f"trainer.devices={self.devices}")
        if self.schedule == "wsd":
            out.append(WSD_BRANCHES)
        if not self.is_posttrain:
            untied = PIPELINE_MODEL if self.parallelism.startswith("pp") else []
            return [*out, *PRETRAIN_DATA, *untied, *architecture_overrides(self.architecture)]
        if parent is None:
            raise ValueError(f"{self.id}: post-training needs the parent run of row {self.row}")
        teacher = [f"posttrain.teacher={parent}"] if self.stage == "distill" else []
        return [*out, f"posttrain={self.stage}", f"init_from={parent}", *teacher, *POSTTRAIN_DATA,
                *METHOD_ARGS.get(self.stage, []), f"posttrain.lora.enabled={str(self.lora).lower()}"]

    def command_line(self) -> str:
        """The overrides as a user would type them (the parent shown as <parent>)."""
        return " ".join(o if not o.startswith(("init_from=", "posttrain.teacher=")) else o.split("=")[0] + "=<parent>"
                        for o in self.overrides(Path("-")))


def combinations() -> list[Combination]:
    """The whole matrix, each combination with the next row of the covering array."""
    keys = [(stage, lora, parallelism, schedule)
            for stage in STAGES
            for lora in ((None,) if stage == PRETRAIN else (False, True))
            for parallelism in PARALLELISMS
            for schedule in SCHEDULES]
    return [Combination(stage, parallelism, lora, schedule, i % len(ROWS))
            for i, (stage, lora, parallelism, schedule) in enumerate(keys)]


def ci_real_runs(matrix: list[Combination]) -> list[Combination]:
    """The combinations CI trains for real (the rest train under `-m slow`): pairwise over
    stage x LoRA x schedule on one process (each post-training stage with LoRA off and on, and
    both schedules; the four LoRA x schedule pairs all occur), plus each multi-process layout
    once, on stages chosen so that the layouts meet different methods (plain `pp` is the
    pipeline of `pp_fsdp` without FSDP: tests/test_pipeline.py runs it on 2 ranks in CI)."""
    wanted: list[tuple[str, Optional[bool], str, str]] = [(PRETRAIN, None, "single", "cosine"),
                                                          (PRETRAIN, None, "single", "wsd")]
    for i, stage in enumerate(STAGES[1:]):
        first, second = ("cosine", "wsd") if i % 2 == 0 else ("wsd", "cosine")
        wanted += [(stage, False, "single", first), (stage, True, "single", second)]
    wanted += [(PRETRAIN, None, "fsdp_tp", "cosine"), ("sft", True, "ddp", "wsd"), ("dpo", False, "fsdp", "cosine"),
               ("grpo", True, "hsdp", "cosine"), (PRETRAIN, None, "pp_fsdp", "cosine"),
               (PRETRAIN, None, "pp_fsdp_tp", "wsd")]
    by_key = {(c.stage, c.lora, c.parallelism, c.schedule): c for c in matrix}
    return [by_key[key] for key in wanted]


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What one combination did: `refused` with the message (and where: compose or validation),
    `valid` (validated, not run), `completed` (trained), or `crashed` (a traceback: a bug)."""

    combination: Combination
    status: str
    message: str = ""
    where: str = ""

    @property
    def refused(self) -> bool:
        return self.status == "refused"


KEY_PATTERN = re.compile(r"\b(?:init_from|resume|seed|tokenizer|model|attention|position|data|optim|schedule|trainer"
                         r"|budget|parallelism|posttrain|logger|paths)(?:\.[A-Za-z_][\w.]*)?(?==)"
                         r"|\b(?:tokenizer|model|data|optim|schedule|trainer|budget|parallelism|posttrain|logger|paths)"
                         r"\.[A-Za-z_][\w.]*")


def named_keys(message: str) -> list[str]:
    """The config keys a refusal names (`group.key` or `key=`), in order, without repeats."""
    return list(dict.fromkeys(m.group(0) for m in KEY_PATTERN.finditer(message)))


def problem_lines(message: str) -> list[str]:
    """A ConfigError's problems (its `  - ` lines), or the message's first line."""
    lines = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    return lines or [message.strip().splitlines()[0] if message.strip() else ""]


def compose(overrides: list[str], root: Path, cache: Path) -> Any:
    """Compose as llm-train does, with the run directory under `root` and a shared cache."""
    from tests.conftest import compose_train

    return compose_train([*overrides, f"paths.cache_dir={cache}"], root)


def check(combination: Combination, root: Path, cache: Path, parents: dict[int, Path], real: bool) -> Outcome:
    """Compose and validate (a dry run: the model on the meta device, no data, no run directory);
    with `real`, train the combination's 2 steps when it validates. A refusal and a dry run must
    leave nothing behind under `root` (a refusal also the cache unchanged); anything else that
    raises is a crash."""
    import traceback

    from llm.cli.common import config_error_in
    from llm.train import train

    overrides = combination.overrides(parents.get(combination.row))  # (may train the parent, into the cache)
    cache_before = sorted(cache.rglob("*")) if cache.exists() else []
    root.mkdir(parents=True, exist_ok=True)

    def refused(error: BaseException, where: str) -> Outcome:
        left = sorted(p.relative_to(root) for p in root.rglob("*"))
        cache_after = sorted(cache.rglob("*")) if cache.exists() else []
        message = str(error)
        if left or cache_after != cache_before:
            return Outcome(combination, "crashed", f"refused after work started (left {left[:5]}, cache "
                                                   f"{'changed' if cache_after != cache_before else 'unchanged'}): {message}",
                           where)
        return Outcome(combination, "refused", message, where)

    try:
        cfg = compose(overrides, root, cache)
    except Exception as e:  # Hydra/OmegaConf refuse a bad choice or value while composing
        return refused(e, "compose")
    try:
        cfg.dry_run = True
        train(cfg)
    except Exception as e:
        cause = config_error_in(e)
        if cause is not None:
            return refused(cause, "validation")
        return Outcome(combination, "crashed", traceback.format_exc(limit=-8), "dry run")
    left = sorted(p.relative_to(root) for p in root.rglob("*"))
    if left:  # a dry run reads no data and leaves no run directory
        return Outcome(combination, "crashed", f"the dry run left {left[:5]} behind", "dry run")
    if not real:
        return Outcome(combination, "valid")
    try:
        summary = train(compose(overrides, root, cache))
    except Exception as e:
        cause = config_error_in(e)
        what = f"refused only when run ({cause})" if cause is not None else traceback.format_exc(limit=-8)
        return Outcome(combination, "crashed", what + ranks_error(root), "run")
    if summary.get("status") != "completed":
        return Outcome(combination, "crashed", f"summary status {summary.get('status')!r}: {summary.get('error')}", "run")
    return Outcome(combination, "completed")


def ranks_error(root: Path) -> str:
    """The error the ranks of a multi-process run recorded in its summary (the launcher only
    knows their exit codes)."""
    import json

    from llm.run.layout import RunDir

    summary = RunDir(root / "run").summary
    try:
        error = json.loads(summary.read_text()).get("error") if summary.is_file() else None
    except ValueError:
        return ""
    return f"\nsummary.json error: {error[-3000:]}" if error else ""


def make_parent(row: int, root: Path, cache: Path) -> Path:
    """A tiny pretraining run of architecture row `row`, for post-training to start from."""
    from llm.train import train

    run_root = root / f"parent-r{row:02d}"
    cfg = compose([*TINY, "budget.steps=1", "trainer.val_every=1", *PRETRAIN_DATA, *architecture_overrides(ROWS[row])],
                  run_root, cache)
    summary = train(cfg)
    if summary.get("status") != "completed":
        raise RuntimeError(f"parent of row {row} did not train: {summary}")
    return run_root / "run"


def refusal_table(outcomes: list[Outcome]) -> str:
    """The README's table: the refused combinations grouped by reason (the refusal's problems,
    with this machine's parent paths left out), the keys it names, and which combinations."""
    refused = [o for o in outcomes if o.refused]
    crashed = [o for o in outcomes if o.status == "crashed"]
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in refused:
        groups[reason(outcome.message)].append(outcome)
    runs = len(outcomes) - len(refused) - len(crashed)
    lines = [f"{len(outcomes)} combinations: {runs} run, {len(refused)} refused before any work"
             + (f", {len(crashed)} crash (a bug)" if crashed else "") + ".", "",
             "| Refused | Keys named | Why (the message) |", "| --- | --- | --- |"]
    for why, members in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        keys = named_keys(why)
        lines.append(f"| {describe(members, keys)} | {', '.join(f'`{k}`' for k in keys)} | {escape(why)} |")
    return "\n".join(lines)


def escape(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def reason(message: str) -> str:
    """A refusal's problems in one line, without the paths of this machine's temporary runs."""
    text = "; ".join(problem_lines(message))
    return re.sub(r"'?(?:/[\w.+-]+)+/parent-r\d+/run(?:/[\w./-]*)?'?", "<parent>", text)


# The keys that belong to each architecture group (a refusal that names one depends on it).
ARCHITECTURE_KEYS = {"tokenizer": ("tokenizer",), "attention": ("attention", "model.attention"),
                     "position": ("position", "model.position"), "model.norm": ("model.norm",),
                     "model.mlp": ("model.mlp",)}


def describe(members: list[Outcome], keys: list[str]) -> str:
    """Which combinations one reason refuses, in few words: the stages, layouts, LoRA settings
    and schedules they span (a factor left out: all of its values), and the architecture choices
    they had for the architecture groups the message names."""
    combos = [m.combination for m in members]
    parts = []
    stages = [s for s in STAGES if s in {c.stage for c in combos}]
    if len(stages) < len(STAGES):
        parts.append("posttrain=" + "/".join(stages) if stages != list(STAGES[1:]) else "post-training")
    layouts = [p for p in PARALLELISMS if p in {c.parallelism for c in combos}]
    if len(layouts) < len(PARALLELISMS):
        parts.append("parallelism=" + "/".join(layouts))
    lora = {c.lora for c in combos} - {None}
    if len(lora) == 1:
        parts.append("LoRA " + ("on" if lora == {True} else "off"))
    schedules = [s for s in SCHEDULES if s in {c.schedule for c in combos}]
    if len(schedules) < len(SCHEDULES):
        parts.append("schedule=" + "/".join(schedules))
    for group, prefixes in ARCHITECTURE_KEYS.items():
        if any(k == p or k.startswith(f"{p}.") for k in keys for p in prefixes):
            values = sorted({c.architecture[group] for c in combos}, key=ARCHITECTURE[group].index)
            if len(values) < len(ARCHITECTURE[group]):
                parts.append(f"{group}=" + "/".join(values))
    return f"{len(members)}: " + (", ".join(parts) if parts else "any")


def replace_table(text: str, table: str) -> str:
    """`text` with the part between the markers replaced by `table`."""
    start, end = text.index(START_MARKER) + len(START_MARKER), text.index(END_MARKER)
    return f"{text[:start]}\n{table}\n{text[end:]}"


def readme_table(text: str) -> str:
    """The table now between the markers of `text`."""
    start, end = text.index(START_MARKER) + len(START_MARKER), text.index(END_MARKER)
    return text[start:end].strip()


def run_matrix(work: Path, real: Callable[[Combination], bool] = lambda c: False,
               only: Optional[Callable[[Combination], bool]] = None) -> list[Outcome]:
    """Every combination's outcome (parents trained first, in `work`)."""
    matrix = [c for c in combinations() if only is None or only(c)]
    cache = work / "cache"
    parents = {row: make_parent(row, work / "parents", cache) for row in sorted({c.row for c in matrix if c.is_posttrain})}
    outcomes = []
    for combination in matrix:
        outcome = check(combination, work / "runs" / combination.id, cache, parents, real(combination))
        logger.info("%s: %s %s", combination.id, outcome.status, reason(outcome.message) if outcome.message else "")
        outcomes.append(outcome)
    return outcomes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--real", action="store_true", help="also train every combination that validates (slow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="llm-matrix-"))
    try:
        outcomes = run_matrix(work, real=lambda c: args.real)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    crashed = [o for o in outcomes if o.status == "crashed"]
    for o in crashed:
        logger.error("CRASH %s (%s): %s\n  %s", o.combination.id, o.where, o.combination.command_line(), o.message)
    table = refusal_table(outcomes)
    if args.write_readme:
        README.write_text(replace_table(README.read_text(), table))
        logger.info("wrote the table to %s", README)
    else:
        sys.stdout.write(table + "\n")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
