r"""A corpus with known faults, to measure curation: documents of the embedded corpus (the Python
standard library) untouched, their exact copies, their near copies (a few words changed), planted
low-quality documents and documents holding evaluation items. `score` says what a curation kept.

  python -m llm.curate.planted build planted/              # planted/corpus/**/*.txt, planted/planted.json
  llm-data data=text data.corpus.paths='planted/corpus/**/*.txt' data.corpus.val_fraction=0 output_dir=planted/curated
  python -m llm.curate.planted score planted/              # the table: planted, removed, kept per kind
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from llm.curate.decont import EvalItem

logger = logging.getLogger(__name__)

CORPUS, LABELS = "corpus", "planted.json"
KINDS = ("untouched", "exact_duplicate", "near_duplicate", "low_quality", "contaminated")
LOW_QUALITY = ("repeated_lines", "symbol_spam", "too_short", "lorem_ipsum")
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
         "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut "
         "aliquip ex ea commodo consequat.")
IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z_0-9]{2,}\b")
REPLACEMENTS = ("value", "result", "item", "buffer", "record", "handle", "entry", "payload")
MIN_CHARS, MAX_CHARS = 1_000, 60_000  # base documents: long enough for a few edits to be small
# The codecs (encodings/, one template per character map) and the turtle demos (one header).
NATURAL_DUPLICATES = {"encodings", "turtledemo"}


@dataclass(frozen=True)
class Planted:
    """One file of the planted corpus: its kind, its text, and the untouched file it copies."""

    name: str
    kind: str
    text: str
    source: str = ""
    detail: str = ""


def base_documents(n: int, seed: int) -> list[str]:
    """n distinct documents of the embedded corpus between MIN_CHARS and MAX_CHARS characters,
    drawn by seed, outside the directories of generated near-identical files (NATURAL_DUPLICATES):
    those are near duplicates of each other already, and curation rightly keeps one of each."""
    from llm.data import StdlibCorpus
    from llm.data.files import read_text

    corpus = StdlibCorpus(max_bytes=None)
    seen, eligible = set(), []
    for split in ("train", "val"):
        for path in corpus.files(split):
            text = read_text(path)
            if (text is None or NATURAL_DUPLICATES.intersection(path.relative_to(corpus.root).parts[:-1])
                    or not MIN_CHARS <= len(text.strip()) <= MAX_CHARS or text in seen):
                continue
            seen.add(text)
            eligible.append(text)
    if len(eligible) < n:
        raise ValueError(f"the embedded corpus has {len(eligible)} documents of {MIN_CHARS}-{MAX_CHARS} characters; "
                         f"asked for {n}")
    order = np.random.default_rng(seed).permutation(len(eligible))[:n]
    return [eligible[i] for i in order]


def near_copy(text: str, rng: np.random.Generator) -> str:
    """A few identifiers replaced (one per 200 words, at least 2) and a comment line added on top."""
    matches = list(IDENTIFIER.finditer(text))
    k = max(2, len(text.split()) // 200)
    chosen = sorted(rng.choice(len(matches), size=min(k, len(matches)), replace=False).tolist())
    pieces, last = [], 0
    for i in chosen:
        m = matches[i]
        pieces += [text[last:m.start()], REPLACEMENTS[int(rng.integers(len(REPLACEMENTS)))] + "_" + m.group()]
        last = m.end()
    return "# vendored copy\n" + "".join(pieces) + text[last:]


def low_quality(kind: str, number: int, base: str, rng: np.random.Generator) -> str:
    if kind == "repeated_lines":
        lines = [line for line in base.splitlines() if len(line.strip()) > 20] or ["print('hello, world')"]
        line = lines[int(rng.integers(len(lines)))]
        return f"# generated {number}\n" + (line + "\n") * 80
    if kind == "symbol_spam":
        symbols = list("!@#$%^&*()[]{}<>~|;:+-=/\\")
        return " ".join("".join(rng.choice(symbols, size=int(rng.integers(2, 7)))) for _ in range(150))
    if kind == "too_short":
        return f"x = {number}\n"
    if kind == "lorem_ipsum":
        return f'"""{LOREM}"""\n\n' + "\n".join(f"def section_{number}_{i}():\n    return {i}\n" for i in range(10))
    raise ValueError(f"unknown low-quality kind {kind!r}")


def contaminate(text: str, items: Sequence[EvalItem], number: int) -> tuple[str, str]:
    """The text with an evaluation item in a comment half-way, and what was planted: the tasks in
    turn, each item with its answer, or every other round its prompt alone (unless the prompt is
    too short to be matched alone: llm.curate.decont.MIN_ITEM_WORDS)."""
    from llm.curate.decont import MIN_ITEM_WORDS, words
    from llm.curate.words import RegexWordTokenizer

    tasks = list(dict.fromkeys(item.task for item in items))
    task_items = [item for item in items if item.task == tasks[number % len(tasks)]]
    rounds = number // len(tasks)
    item = task_items[rounds % len(task_items)]
    alone = rounds % 2 == 1 and len(words(item.prompt, RegexWordTokenizer())) >= MIN_ITEM_WORDS
    leaked = item.prompt if alone else item.prompt + item.answer
    lines = text.splitlines(keepends=True)
    middle = len(lines) // 2
    return "".join(lines[:middle]) + f"# example: {leaked}\n" + "".join(lines[middle:]), f"{item.task}: {leaked}"


def copy_name(folder: str, number: int, original: str, val_fraction: float) -> str:
    """A name for a copy of `original` that `data=text` puts in the same split: a curation reads
    train before val, and MinHash keeps the first document of a cluster it reads, so a copy
    sorting after its original in the same split is the one removed."""
    from llm.data.corpus import hash_fraction

    in_val = hash_fraction(original) < val_fraction
    for attempt in range(10_000):
        name = f"{folder}/{number:05d}-{attempt}.txt"
        if (hash_fraction(name) < val_fraction) == in_val:
            return name
    raise ValueError(f"no name for a copy of {original} in its split")


def plant(items: Sequence[EvalItem], untouched: int = 100, exact: int = 20, near: int = 20, low: int = 12,
          contaminated: int = 8, seed: int = 0, val_fraction: float = 0.05) -> list[Planted]:
    """The planted corpus: `untouched` documents, `exact` exact and `near` near copies of some of
    them, `low` low-quality documents (cycling through LOW_QUALITY) and `contaminated` other
    documents of the embedded corpus with an evaluation item planted (llm.curate.decont.EvalItem).
    Copies are named to land in their original's split of `data=text` with `val_fraction`."""
    rng = np.random.default_rng([seed, 1])
    bases = base_documents(untouched + contaminated, seed)
    originals, spare = bases[:untouched], bases[untouched:]
    files = [Planted(f"a-untouched/{i:05d}.txt", "untouched", text) for i, text in enumerate(originals)]
    copied = rng.choice(untouched, size=exact + near, replace=exact + near > untouched).tolist()
    for i, source in enumerate(copied[:exact]):
        files.append(Planted(copy_name("b-exact", i, files[source].name, val_fraction), "exact_duplicate",
                             originals[source], files[source].name))
    for i, source in enumerate(copied[exact:]):
        files.append(Planted(copy_name("c-near", i, files[source].name, val_fraction), "near_duplicate",
                             near_copy(originals[source], rng), files[source].name))
    for i in range(low):
        kind = LOW_QUALITY[i % len(LOW_QUALITY)]
        files.append(Planted(f"d-low/{i:05d}.txt", "low_quality", low_quality(kind, i, originals[i % untouched], rng),
                             detail=kind))
    for i, text in enumerate(spare):
        planted_text, leaked = contaminate(text, items, i)
        files.append(Planted(f"e-contaminated/{i:05d}.txt", "contaminated", planted_text, detail=leaked))
    return files


def write(folder: str | Path, files: Sequence[Planted]) -> Path:
    """The files under <folder>/corpus and their labels in <folder>/planted.json."""
    folder = Path(folder)
    for f in files:
        path = folder / CORPUS / f.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.text, encoding="utf-8")
    labels = [{"name": f.name, "kind": f.kind, "source": f.source, "detail": f.detail} for f in files]
    (folder / LABELS).write_text(json.dumps(labels, indent=1) + "\n")
    return folder / CORPUS


def kept_texts(documents: str | Path) -> Counter:
    """The texts of a curation's kept documents (format=text), with their multiplicities."""
    return Counter(p.read_text(encoding="utf-8") for p in sorted(Path(documents).rglob("*.txt")))


def score(files: Sequence[Planted], kept: Counter) -> dict[str, dict[str, int]]:
    """Per kind: planted, removed, kept. A copy counts as removed when its text is kept no more
    often than once for it and its original together; the others, when their text is not kept."""
    result = {kind: {"planted": 0, "removed": 0, "kept": 0} for kind in KINDS}
    left = Counter(kept)
    for f in files:  # untouched first: an exact copy's text kept once is the original's
        counts = result[f.kind]
        counts["planted"] += 1
        if left[f.text] > 0:
            left[f.text] -= 1
            counts["kept"] += 1
        else:
            counts["removed"] += 1
    return result


def table(result: dict[str, dict[str, int]]) -> str:
    """A Markdown table of score()'s result."""
    lines = ["| planted | documents | removed | kept |", "|---|---:|---:|---:|"]
    for kind, c in result.items():
        lines.append(f"| {kind.replace('_', ' ')} | {c['planted']} | {c['removed']} | {c['kept']} |")
    return "\n".join(lines)


def read_labels(folder: str | Path) -> list[Planted]:
    folder = Path(folder)
    rows = json.loads((folder / LABELS).read_text())
    return [Planted(r["name"], r["kind"], (folder / CORPUS / r["name"]).read_text(encoding="utf-8"), r["source"],
                    r["detail"]) for r in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm.curate.planted", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("build", "score"))
    parser.add_argument("folder")
    parser.add_argument("--untouched", type=int, default=400)
    parser.add_argument("--exact", type=int, default=100)
    parser.add_argument("--near", type=int, default=100)
    parser.add_argument("--low", type=int, default=40)
    parser.add_argument("--contaminated", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curated", default=None, help="the curation's output_dir (default: <folder>/curated)")
    args = parser.parse_args(argv)
    if args.action == "build":
        from omegaconf import OmegaConf

        from llm.curate.decont import builtin_items
        from llm.resources import conf_dir

        # The evaluation items llm-data removes by default: conf/curate.yaml's decontamination settings.
        d = OmegaConf.to_container(OmegaConf.load(conf_dir() / "curate.yaml").decontamination)
        items = builtin_items(d["builtin"], d["builtin_knobs"], d["questions"], d["seed"], d["val_fraction"])
        write(args.folder, plant(items, args.untouched, args.exact, args.near, args.low, args.contaminated, args.seed))
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logger.info("wrote %s", Path(args.folder) / CORPUS)
    else:
        curated = Path(args.curated or Path(args.folder) / "curated")
        scores = score(read_labels(args.folder), kept_texts(curated / "documents"))
        sys.stdout.write(table(scores) + "\n")  # the command's output


if __name__ == "__main__":
    main()
