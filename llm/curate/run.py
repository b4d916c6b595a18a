"""`llm-data`'s work: settings -> checks -> stages -> executors -> counts (and W&B)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from llm.config import ConfigError
from llm.curate.config import COUNTS_FILE, CurateSettings, check, typed
from llm.curate.pipeline import DOCUMENTS, LOGS, WORK, build_stages, executors, run_stages

log = logging.getLogger(__name__)
SETTINGS_FILE = "curate.yaml"  # the settings a run in <output_dir> was started with


def corpus_node(cfg: DictConfig) -> dict[str, Any]:
    """The data group's corpus node, resolved, checked as llm-train checks it."""
    from llm.config.validate import check_target, missing_keys

    node = cfg.data.get("corpus") if cfg.get("data") is not None else None
    if node is None:
        raise ConfigError(["data: choose the source as llm-train takes it: data=stdlib | data=text "
                           "data.corpus.paths=... | data=hf data.corpus.name=... (a mixture: curate each source)"])
    problems = [f"data.corpus.{k}: required but not set (`???`); give it: data.corpus.{k}=..."
                for k in missing_keys(node)]
    problems += check_target(node, "data.corpus")
    if problems:
        raise ConfigError(problems)
    return OmegaConf.to_container(node, resolve=True)


def _settings_text(s: CurateSettings, corpus: dict[str, Any]) -> str:
    settings = OmegaConf.to_container(OmegaConf.structured(s), resolve=True)
    settings["executor"].pop("workers", None)  # how fast or how shown, not what: a resume may change them
    for key in ("overwrite", "datatrove_logs"):
        settings.pop(key, None)
    return OmegaConf.to_yaml({"data": {"corpus": corpus}, **settings})


def prepare_output(s: CurateSettings, text: str) -> None:
    """A fresh output directory, the one of an unfinished run with the same settings (datatrove
    resumes it), or with overwrite=true one cleared of what a run writes."""
    out = Path(s.output_dir)
    saved = out / SETTINGS_FILE
    if s.overwrite:
        for name in (DOCUMENTS, WORK, LOGS):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (COUNTS_FILE, SETTINGS_FILE):
            (out / name).unlink(missing_ok=True)
    elif (out / COUNTS_FILE).is_file():
        raise ConfigError([f"output_dir={str(out)!r}: already holds a finished curation ({COUNTS_FILE}); "
                           "choose another output_dir, or overwrite=true to replace it"])
    elif saved.is_file() and saved.read_text() != text:
        raise ConfigError([f"output_dir={str(out)!r}: holds an unfinished curation with other settings "
                           f"({saved}); rerun with those, choose another output_dir, or overwrite=true"])
    elif out.is_dir() and any(out.iterdir()) and not saved.is_file():
        raise ConfigError([f"output_dir={str(out)!r}: not empty and not a curation's; choose another output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(text)


def evaluation_items(s: CurateSettings) -> list:
    from llm.curate.decont import builtin_items, file_items

    d = s.decontamination
    if not d.enabled:
        return []
    return builtin_items(d.builtin, d.builtin_knobs, d.questions, d.seed, d.val_fraction) + file_items(d.files)


def collect(problems: list[str], fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args); None with its problems added when it raises ConfigError or InputError (all reported at once)."""
    from llm.files import InputError

    try:
        return fn(*args)
    except ConfigError as e:
        problems += e.problems
    except InputError as e:
        problems.append(str(e))
    return None


def run_curate(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """Curate data.corpus as the settings say; returns curation.json's content (None when the
    stages were submitted to SLURM, whose last job writes it)."""
    from llm.fields import plain_choices

    problems: list[str] = []
    s = collect(problems, typed, cfg)
    corpus = collect(problems, corpus_node, cfg)
    wandb_mode = None
    if cfg.logger.kind == "wandb":
        from llm.tracking.wandb import resolve_mode

        wandb_mode = collect(problems, resolve_mode, cfg.logger.mode)
    elif cfg.logger.kind != "none":
        problems.append(f"logger={cfg.logger.kind!r}: llm-data logs to none or wandb; curation.json is always written")
    if s is not None:
        problems += check(s)
    if problems:
        raise ConfigError(problems)
    plain_choices(s)
    s.output_dir = str(Path(s.output_dir).expanduser().resolve())
    from hydra.utils import instantiate

    source = instantiate(corpus)  # a source that cannot be read (no matching file, ...) fails here, before any stage
    if not callable(getattr(source, "documents", None)):
        raise ConfigError([f"data.corpus._target_={corpus['_target_']!r}: not a corpus of text documents (token ids "
                           "are curated before tokenisation); choose data=stdlib | text | hf | synthetic | tasks"])
    next(iter(source.documents(s.splits[0])), None)  # and its first document reads (text, not token ids, ...)
    items = evaluation_items(s)
    prepare_output(s, _settings_text(s, corpus))
    stages = build_stages(s, corpus, items)
    made = executors(stages, s, Path(s.output_dir) / LOGS)
    log.info(f"curating {corpus['_target_']} into {s.output_dir}: {len(stages)} stages "
             f"({', '.join(stage.name for stage in stages)}), {s.executor.kind} executor")
    if s.executor.kind == "slurm":
        made[-1].run()  # submits every stage, each depending on the one before
        log.info(f"submitted; {COUNTS_FILE} appears in {s.output_dir} when the last job ends")
        return None
    if not s.datatrove_logs:
        from loguru import logger

        logger.disable("datatrove")  # its INFO lines for every task and stage; ours say what runs
    run_stages(made, lambda number: log.info(f"stage {number + 1}/{len(stages)}: {stages[number].name}"))
    counts_file = Path(s.output_dir) / COUNTS_FILE
    if not counts_file.is_file():  # every stage marked done by an earlier run, its counts deleted since
        raise ConfigError([f"output_dir={s.output_dir!r}: its stages are done but {COUNTS_FILE} is gone; "
                           "overwrite=true to curate again"])
    result = json.loads(counts_file.read_text())
    log.info("\n" + table(result))
    if wandb_mode is not None and wandb_mode != "disabled":
        log_wandb(cfg.logger, wandb_mode, Path(s.output_dir), result, _settings_text(s, corpus))
    return result


def table(result: dict[str, Any]) -> str:
    """curation.json as a console table: each filter's documents seen and removed."""
    rows = [("filter", "seen", "removed")] + [(name, str(f["seen"]), str(f["removed"]))
                                               for name, f in result["filters"].items()]
    rows += [("documents in", str(result["documents_in"]), ""), ("documents out", str(result["documents_out"]), "")]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}" for a, b, c in rows)


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat W&B metrics: curate/documents_in, curate/documents_out, curate/<filter>/removed ..."""
    flat = {"curate/documents_in": result["documents_in"], "curate/documents_out": result["documents_out"]}
    for name, f in result["filters"].items():
        flat[f"curate/{name}/removed"] = f["removed"]
        flat[f"curate/{name}/seen"] = f["seen"]
        for reason, count in f.get("reasons", {}).items():
            flat[f"curate/{name}/{reason}"] = count
    return flat


def log_wandb(logger: Any, mode: str, out: Path, result: dict[str, Any], settings: str) -> None:
    """A W&B run of job type `curate`: the counts as metrics and summary, the settings as config."""
    import wandb
    import yaml

    from llm.tracking.run import redact_secrets, redacted_argv

    os.environ.setdefault("WANDB_SILENT", "true")
    with redacted_argv():
        run = wandb.init(project=logger.project, entity=logger.entity, mode=mode, dir=str(out), job_type="curate",
                         group=redact_secrets(logger.group or out.name), name=redact_secrets(f"curate {out.name}"),
                         tags=redact_secrets(["curate", *logger.tags]), notes=redact_secrets(logger.notes),
                         config=redact_secrets(yaml.safe_load(settings)))
    flat = metrics(result)
    run.log(flat)
    run.summary.update(flat)
    run.finish()
    if mode == "offline":
        log.info(f"W&B is offline; to upload: wandb sync {Path(run.dir).parent}")
