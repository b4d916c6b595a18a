"""`llm-data`: datatrove's curation on the embedded corpus with planted faults (exact and near
copies, low-quality documents, evaluation items), the counts it writes, the SLURM executor
composed (not run), and bad settings refused with exit code 2 before any document is read."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from llm.curate import planted
from llm.curate.decont import EvalItem, builtin_items, item_grams
from llm.curate.words import RegexWordTokenizer
from tests.conftest import compose_train, llm_cli

# conf/curate.yaml's decontamination defaults: the items the planted documents leak
KNOBS = {"addition": {"max_digits": 2}, "sorting": {"max_length": 4}, "copying": {"max_length": 5},
         "counting": {"max_length": 6}}
SMALL = {"untouched": 60, "exact": 10, "near": 10, "low": 8, "contaminated": 4}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """One curation of a small planted corpus by the real `llm-data` (in this process, W&B offline)."""
    root = tmp_path_factory.mktemp("curate")
    items = builtin_items(list(KNOBS), KNOBS, 64, 0, 0.1)
    files = planted.plant(items, **SMALL, seed=0)
    corpus = planted.write(root / "planted", files)
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_DIR", str(root))
    mp.setenv("WANDB_CONFIG_DIR", str(root / ".wandb-config"))
    mp.setenv("WANDB_CACHE_DIR", str(root / ".wandb-cache"))
    mp.setenv("WANDB_SILENT", "true")
    capsys = _Quiet()
    code, err = llm_cli("data", ["data=text", f"data.corpus.paths={corpus}/**/*.txt", "output_dir=out",
                                 "logger=wandb", "logger.mode=offline", "logger.project=curate-test"],
                        root, mp, capsys)
    mp.undo()
    assert code == 0, err
    return root / "out", files


class _Quiet:
    """capsys for a module fixture: llm_cli reads stderr back through readouterr()."""

    def readouterr(self):
        return type("Out", (), {"err": "", "out": ""})()


def test_planted_faults_removed_and_untouched_kept(curated):
    out, files = curated
    result = planted.score(files, planted.kept_texts(out / "documents"))
    duplicates = result["exact_duplicate"]["removed"] + result["near_duplicate"]["removed"]
    assert duplicates >= 0.99 * (SMALL["exact"] + SMALL["near"])
    assert result["untouched"]["kept"] >= 0.99 * SMALL["untouched"]
    assert result["contaminated"]["removed"] == SMALL["contaminated"]
    assert result["low_quality"]["removed"] == SMALL["low"]


def test_counts_written_next_to_the_output(curated):
    out, files = curated
    counts = json.loads((out / "curation.json").read_text())
    per_kind = SMALL["low"] // len(planted.LOW_QUALITY)  # each low-quality kind, caught by its own rule
    assert counts["documents_in"] == len(files)
    assert {name: f["removed"] for name, f in counts["filters"].items()} == {
        "length": per_kind, "gopher_repetition": per_kind, "gopher_quality": per_kind, "c4": per_kind,
        "decontamination": SMALL["contaminated"], "exact_dedup": SMALL["exact"], "minhash_dedup": SMALL["near"]}
    assert counts["filters"]["length"]["reasons"] == {"too_short": per_kind}
    assert counts["filters"]["gopher_repetition"]["reasons"] == {"dup_line_frac": per_kind}
    assert counts["filters"]["c4"]["reasons"] == {"lorem_ipsum": per_kind}
    assert counts["filters"]["decontamination"]["reasons"] == {  # the tasks in turn, one each
        "contaminated": 4, "contaminated_addition": 1, "contaminated_sorting": 1, "contaminated_copying": 1,
        "contaminated_counting": 1}
    seen = [f["seen"] for f in counts["filters"].values()]  # each filter sees what the one before kept
    removed = [f["removed"] for f in counts["filters"].values()]
    assert seen == [len(files) - sum(removed[:i]) for i in range(len(seen))]
    assert counts["documents_out"] == len(files) - counts["removed"] == SMALL["untouched"]
    assert not (out / "work").exists()  # intermediate shards removed; datatrove's logs kept
    assert (out / "logs" / "filter" / "stats.json").is_file()


def test_output_is_what_the_data_group_reads(curated):
    from llm.data import TextCorpus

    out, _ = curated
    corpus = TextCorpus(f"{out}/documents/**/*.txt")
    documents = [d for split in ("train", "val") for d in corpus.documents(split)]
    assert len(documents) == SMALL["untouched"]


def test_counts_logged_to_wandb(curated):
    from tests.test_wandb_conventions import OfflineRun, offline_runs

    out, _ = curated
    (directory,) = offline_runs(out)
    run = OfflineRun(directory)
    (history,) = run.history
    counts = json.loads((out / "curation.json").read_text())
    assert history["curate/minhash_dedup/removed"] == counts["filters"]["minhash_dedup"]["removed"]
    assert history["curate/documents_out"] == counts["documents_out"]
    assert run.run.job_type == "curate"


def test_finished_output_refused(curated, monkeypatch, capsys):
    out, _ = curated
    code, err = llm_cli("data", [f"output_dir={out}"], out.parent, monkeypatch, capsys)
    assert code == 2
    assert "output_dir=" in err and "overwrite=true" in err and "Traceback" not in err


def test_jsonl_shards_without_dedup(tmp_path, monkeypatch, capsys):
    """format=jsonl, the dedup and decontamination stages off: reader -> filters -> writer -> counts."""
    import gzip

    code, err = llm_cli("data", ["max_documents=6", "format=jsonl", "exact_dedup=false", "minhash.enabled=false",
                                 "decontamination.enabled=false", "output_dir=out"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    counts = json.loads((tmp_path / "out" / "curation.json").read_text())
    assert counts["documents_in"] == 6 and set(counts["filters"]) == {"length", "gopher_repetition",
                                                                       "gopher_quality", "c4"}
    rows = [json.loads(line) for path in (tmp_path / "out" / "documents").glob("*.jsonl.gz")
            for line in gzip.open(path, "rt")]
    assert len(rows) == counts["documents_out"] > 0
    assert {row["metadata"]["source"] for row in rows} == {"stdlib"}


def test_slurm_executor_composed_not_run(tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    from llm.curate.config import check, typed
    from llm.curate.pipeline import build_stages, executors
    from llm.curate.run import corpus_node

    cfg = compose_train(["curate/executor=slurm", "executor.slurm.partition=cpu", "executor.tasks=8",
                         f"output_dir={tmp_path}/out", "+executor.slurm.sbatch_args.account=proj"],
                        root=tmp_path, config_name="curate")
    s = typed(cfg)
    # Without sbatch here (CI), llm-data itself refuses to submit (exit 2); composing needs none.
    assert [p for p in check(s) if "sbatch" not in p] == []
    assert any("sbatch" in p for p in check(s)) == (shutil.which("sbatch") is None)
    stages = build_stages(s, corpus_node(cfg), [EvalItem("addition", "12+34=", "46")])
    made = executors(stages, s, tmp_path / "out" / "logs")
    assert all(isinstance(e, SlurmPipelineExecutor) for e in made)
    assert [e.depends for e in made] == [None, *made[:-1]]  # each stage a job array after the one before
    by_name = dict(zip([stage.name for stage in stages], made))
    assert by_name["filter"].tasks == 8 and by_name["minhash_buckets"].tasks == 14 and by_name["count"].tasks == 1
    assert {e.partition for e in made} == {"cpu"}
    assert not (tmp_path / "out").exists()  # composed only: nothing submitted, nothing written
    args = by_name["filter"].get_sbatch_args()
    assert args["account"] == "proj" and args["partition"] == "cpu" and args["job-name"] == "llm-data-filter"


@pytest.mark.parametrize("override, key", [
    ("format=csv", "format"),
    ("length.min_chars=-1", "length.min_chars"),
    ("length.max_chars=10", "length.max_chars"),
    ("quality.gopher_quality.min_words=3", "quality.gopher_quality.min_words"),
    ("decontamination.builtin=[spelling]", "decontamination.builtin"),
    ("decontamination.files=[missing.jsonl]", "decontamination.files[0]"),
    ("minhash.num_buckets=zero", "minhash.num_buckets"),
    ("curate/executor=slurm", "executor.slurm.partition"),
    ("data=text", "data.corpus.paths"),
    ("minhash.bands=3", "minhash.bands"),
    ("curate/quality=prose", "curate/quality"),
    ("data=tokens data.corpus.train=a.bin data.corpus.val=b.bin", "data.corpus"),
])
def test_bad_settings_exit_2(override, key, tmp_path, monkeypatch, capsys):
    code, err = llm_cli("data", [*override.split(), "output_dir=out"], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_item_grams():
    tok = RegexWordTokenizer()
    short = EvalItem("addition", "12+34=", "46")
    assert item_grams(short, 13, False, tok) == [("12", "+", "34", "=", "46")]  # shorter than n: whole
    assert item_grams(short, 13, True, tok) == [("12", "+", "34", "=", "46"), ("12", "+", "34", "=")]
    assert item_grams(EvalItem("copying", "copy t=", "t"), 13, True, tok) == [("copy", "t", "=", "t")]  # prompt: 3 words
    long = EvalItem("qa", "What is the capital city of France, the country?", "It is Paris.")
    grams = item_grams(long, 4, False, tok)
    assert all(len(g) == 4 for g in grams) and grams[0] == ("the", "country", "?", "it")  # each reaches the answer
    assert grams[-1] == ("it", "is", "paris", ".")


def test_web_preset_keeps_prose_and_refuses_code(tmp_path):
    """curate/quality=web: Gopher's and C4's published thresholds, offline (no NLTK or spaCy data)."""
    from datatrove.data import Document

    from llm.curate.config import typed
    from llm.curate.pipeline import _filter_stage

    cfg = compose_train(["curate/quality=web", f"output_dir={tmp_path}"], root=tmp_path, config_name="curate")
    s = typed(cfg)
    assert s.quality.name == "web" and not s.quality.c4_keep_text
    stage = _filter_stage(s, {"_target_": "llm.data.StdlibCorpus"}, tmp_path, [])
    filters = [stage.pipeline[i] for name, i in stage.counted.items() if name != "decontamination"]
    prose = Document(text=(
        "The committee met on Monday to review the proposal for the new library.\n"
        "Members agreed that the plan was sound and that the budget should be approved.\n"
        "Several residents asked whether the building would have a reading room for children.\n"
        "The architect explained that the second floor was designed with that purpose in mind.\n"
        "A vote was held at the end of the meeting, and the motion passed with a large majority.\n"
        "Construction is expected to begin in the spring and to finish before the end of next year.\n"
        "The town will publish the full minutes of the meeting on its website within a week."), id="prose")
    code = Document(text="def f(x):\n    return {k: v for k, v in x.items()}\n" * 20, id="code")
    assert all(f.filter(prose) is True for f in filters)
    assert any(f.filter(code) is not True for f in filters)


def test_file_items(tmp_path):
    from llm.curate.decont import file_items

    path = tmp_path / "my_eval.jsonl"
    path.write_text('{"prompt": "Q: 2+2=", "answer": "4"}\n\n{"prompt": "x", "id": 3}\n')
    assert file_items([str(path)]) == [EvalItem("my_eval", "Q: 2+2=", "4"), EvalItem("my_eval", "x", "")]


@pytest.mark.slow
def test_readme_planted_corpus(tmp_path, monkeypatch, capsys):
    """The README's table: the default planted corpus (python -m llm.curate.planted build) curated."""
    planted.main(["build", str(tmp_path / "planted")])
    code, err = llm_cli("data", ["data=text", f"data.corpus.paths={tmp_path}/planted/corpus/**/*.txt",
                                 "output_dir=planted/curated"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    result = planted.score(planted.read_labels(tmp_path / "planted"),
                           planted.kept_texts(tmp_path / "planted" / "curated" / "documents"))
    assert result == {"untouched": {"planted": 400, "removed": 0, "kept": 400},
                      "exact_duplicate": {"planted": 100, "removed": 100, "kept": 0},
                      "near_duplicate": {"planted": 100, "removed": 100, "kept": 0},
                      "low_quality": {"planted": 40, "removed": 40, "kept": 0},
                      "contaminated": {"planted": 20, "removed": 20, "kept": 0}}
    assert sys.modules["llm.curate.planted"] is planted
