"""The curation pipeline: datatrove stages built from the settings, run by datatrove's local
executor (or composed for its SLURM executor), and the counts of what each filter removed.

    read (corpus of the data group) -> length -> Gopher repetition -> Gopher quality -> C4
      -> decontamination -> exact dedup (signatures, find, filter)
      -> MinHash dedup (signatures, buckets, clusters, filter) -> writer -> counts

Each arrow into a new stage goes through JSONL shards under <output_dir>/work (removed at the
end); each stage logs under <output_dir>/logs/<stage> (datatrove's logs, stats and completion
marks: a run killed halfway resumes where it stopped when started again with the same settings).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep

from llm.curate.config import COUNTS_FILE, CurateSettings, filter_class

WORK = "work"
LOGS = "logs"
DOCUMENTS = "documents"

# The steps whose removals are counted: name in curation.json -> (stage, position in its pipeline).
FILTERS = ("length", "gopher_repetition", "gopher_quality", "c4", "decontamination", "exact_dedup", "minhash_dedup")


@dataclass
class Stage:
    """One datatrove executor's work: a pipeline run as `tasks` tasks; `counted` maps the names
    of the filters it holds to their positions in the pipeline."""

    name: str
    pipeline: list[PipelineStep]
    tasks: int
    counted: dict[str, int] = field(default_factory=dict)


def _jsonl_writer(folder: Path) -> PipelineStep:
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)


def _jsonl_reader(folder: Path) -> PipelineStep:
    from llm.curate.readers import ShardReader

    return ShardReader(str(folder), compression=None, glob_pattern="*.jsonl")


def _filter_stage(s: CurateSettings, corpus: dict[str, Any], out: Path, items: list) -> Stage:
    from llm.curate.decont import DecontaminationFilter
    from llm.curate.filters import C4DocumentFilter, LengthFilter
    from llm.curate.readers import CorpusReader
    from llm.curate.words import RegexWordTokenizer

    steps: list[PipelineStep] = [CorpusReader(corpus, s.splits, s.max_documents)]
    counted = {}

    def add(name: str, step: PipelineStep) -> None:
        counted[name] = len(steps)
        steps.append(step)

    add("length", LengthFilter(s.length.min_chars, s.length.max_chars))
    tokenizer = RegexWordTokenizer()
    for key in ("gopher_repetition", "gopher_quality", "c4"):
        kwargs = getattr(s.quality, key)
        if kwargs is None:
            continue
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        cls = C4DocumentFilter if key == "c4" and s.quality.c4_keep_text else filter_class(key)
        add(key, cls(language=tokenizer, **kwargs))
    if s.decontamination.enabled:
        add("decontamination", DecontaminationFilter(str(out / WORK / "decont_index")))
    steps.append(_jsonl_writer(out / WORK / "filtered"))
    return Stage("filter", steps, s.executor.tasks, counted)


def _plain(value: Any) -> Any:
    """YAML lists as tuples (datatrove's n-gram settings are tuples of pairs)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def build_stages(s: CurateSettings, corpus: dict[str, Any], items: list) -> list[Stage]:
    """Every stage of the pipeline, in order. `corpus` is the data.corpus node (with its
    _target_), `items` the evaluation items to decontaminate against (llm.curate.decont)."""
    from datatrove.pipeline.dedup import (ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                          MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.writers import JsonlWriter

    from llm.curate.decont import EvalIndexer
    from llm.curate.dedup import HASH, document_text
    from llm.curate.words import RegexWordTokenizer
    from llm.curate.writers import TextFileWriter

    out, work, tasks = Path(s.output_dir), Path(s.output_dir) / WORK, s.executor.tasks
    stages = []
    d = s.decontamination
    if d.enabled:
        stages.append(Stage("decont_index", [EvalIndexer(str(work / "decont_index"), items, d.n_grams,
                                                         d.prompts_alone)], 1))
    stages.append(_filter_stage(s, corpus, out, items))
    current = work / "filtered"
    if s.exact_dedup:
        config = ExactDedupConfig(content_getter=document_text, hash_config=HASH)
        stages += [
            Stage("exact_signatures", [_jsonl_reader(current), ExactDedupSignature(str(work / "exact_sigs"), config)],
                  tasks),
            Stage("exact_find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config)], 1),
            Stage("exact_filter", [_jsonl_reader(current), ExactDedupFilter(str(work / "exact_dups"), config),
                                   _jsonl_writer(work / "exact_deduped")], tasks, {"exact_dedup": 1}),
        ]
        current = work / "exact_deduped"
    writer = (TextFileWriter(str(out / DOCUMENTS)) if s.format == "text"
              else JsonlWriter(str(out / DOCUMENTS), output_filename="${rank}.jsonl.gz"))
    if s.minhash.enabled:
        m = s.minhash
        config = MinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket,
                               seed=m.seed, hash_config=HASH)
        stages += [
            Stage("minhash_signatures", [_jsonl_reader(current),
                                         MinhashDedupSignature(str(work / "minhash_sigs"), config,
                                                               language=RegexWordTokenizer())], tasks),
            Stage("minhash_buckets", [MinhashDedupBuckets(str(work / "minhash_sigs"), str(work / "minhash_buckets"),
                                                          config=config)], m.num_buckets),
            Stage("minhash_cluster", [MinhashDedupCluster(str(work / "minhash_buckets"),
                                                          str(work / "minhash_clusters"), config=config)], 1),
            Stage("write", [_jsonl_reader(current), MinhashDedupFilter(str(work / "minhash_clusters")), writer],
                  tasks, {"minhash_dedup": 1}),
        ]
    else:
        stages.append(Stage("write", [_jsonl_reader(current), writer], tasks))
    stages.append(Stage("count", [CountsWriter(str(out), str(out / LOGS), _layout(stages))], 1))
    return stages


def _layout(stages: list[Stage]) -> dict[str, Any]:
    """What CountsWriter needs to find the counts: each counted filter's stage and position."""
    return {"filters": {name: [stage.name, position] for stage in stages for name, position in stage.counted.items()},
            "reader": ["filter", 0], "writer": ["write", len(stages[-1].pipeline) - 1],
            "stages": [stage.name for stage in stages]}


def _total(value: Any) -> int:
    """A datatrove stat as a count (it saves 1 as 1 and richer stats as a dict with "total")."""
    if isinstance(value, dict):
        return int(value.get("total", 0))
    return int(value or 0)


def stage_stats(logs: DataFolderLike, stage: str) -> list[dict[str, Any]]:
    """The stats of every step of a stage, summed over its tasks (datatrove's stats/<rank>.json)."""
    folder = get_datafolder(logs)
    merged: Optional[list[dict[str, int]]] = None
    for name in sorted(folder.list_files(f"{stage}/stats")):
        with folder.open(name, "rt") as f:
            steps = json.load(f)
        counts = [{key: _total(value) for key, value in step["stats"].items()} for step in steps]
        if merged is None:
            merged = counts
        else:
            for total, step in zip(merged, counts):
                for key, value in step.items():
                    total[key] = total.get(key, 0) + value
    return merged or []


def counts(logs: DataFolderLike, layout: dict[str, Any]) -> dict[str, Any]:
    """curation.json's content: documents read and written, and for each filter (in pipeline
    order) the documents it saw and removed, and its reasons (datatrove's `dropped_<reason>`)."""
    stats = {stage: stage_stats(logs, stage) for stage in layout["stages"]}
    reader_stage, reader_position = layout["reader"]
    result: dict[str, Any] = {"documents_in": stats[reader_stage][reader_position].get("documents", 0)}
    filters = {}
    for name in FILTERS:
        if name not in layout["filters"]:
            continue
        stage, position = layout["filters"][name]
        step = stats[stage][position]
        reasons = {key.removeprefix("dropped_"): value for key, value in sorted(step.items())
                   if key.startswith("dropped_") or key.startswith("contaminated_")}
        filters[name] = {"seen": step.get("total", 0), "removed": step.get("dropped", 0),
                         **({"reasons": reasons} if reasons else {})}
    result["filters"] = filters
    result["removed"] = sum(f["removed"] for f in filters.values())
    writer_stage, writer_position = layout["writer"]
    result["documents_out"] = stats[writer_stage][writer_position].get("total", 0)
    return result


class CountsWriter(PipelineStep):
    """The last stage: sums the stats of the stages and writes <output_dir>/curation.json (a
    stage of its own so that a SLURM run writes it too, once everything before it has run)."""

    type = "📊 - STATS"
    name = "🧮 Curation counts"

    def __init__(self, output_dir: str, logs: str, layout: dict[str, Any]):
        super().__init__()
        self.output_dir = output_dir
        self.logs = logs
        self.layout = layout

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        result = counts(self.logs, self.layout)
        folder = get_datafolder(self.output_dir)
        with folder.open(COUNTS_FILE, "wt") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        if folder.is_local():  # intermediate shards are the size of the corpus; the logs stay
            shutil.rmtree(Path(self.output_dir) / WORK, ignore_errors=True)
        return
        yield


def executors(stages: list[Stage], s: CurateSettings, logs: Path) -> list[Any]:
    """One datatrove executor per stage, each depending on the one before: local (run here) or
    SLURM (`.run()` on the last submits them all as dependent job arrays)."""
    made: list[Any] = []
    for stage in stages:
        made.append(_executor(stage, s, str(logs / stage.name), made[-1] if made else None))
    return made


def _executor(stage: Stage, s: CurateSettings, logging_dir: str, depends: Any) -> Any:
    if s.executor.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(s.executor.workers, stage.tasks),
                                     logging_dir=logging_dir, depends=depends)
    from datatrove.executor import SlurmPipelineExecutor

    slurm = s.executor.slurm
    return SlurmPipelineExecutor(stage.pipeline, tasks=stage.tasks, time=slurm.time, partition=slurm.partition,
                                 cpus_per_task=slurm.cpus_per_task, mem_per_cpu_gb=slurm.mem_per_cpu_gb,
                                 qos=slurm.qos, job_name=f"{slurm.job_name}-{stage.name}",
                                 sbatch_args=dict(slurm.sbatch_args) or None, venv_path=slurm.venv_path,
                                 logging_dir=logging_dir, depends=depends)


def run_stages(made: list[Any], on_stage: Optional[Callable[[int], None]] = None) -> None:
    """Run local executors in order (each one's `depends` is already done when it starts)."""
    for number, executor in enumerate(made):
        if on_stage is not None:
            on_stage(number)
        executor.run()
