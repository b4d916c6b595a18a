"""The combination matrix (tests/matrix.py): every stage x parallelism x LoRA x schedule, each with
a row of a pairwise covering array of the architecture groups, either trains 2 steps (2 gloo
processes where the layout needs them) or is refused before any work with a message that names
the keys. CI validates every combination (a dry run: the model on the meta device) and trains a
pairwise subset; `-m slow` trains them all. The README's table of refusals is generated here."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from llm.config import ConfigError
from llm.run.layout import RunDir
from tests import matrix
from tests.matrix import ARCHITECTURE, PRETRAIN, ROWS, STAGES, Combination, Outcome

# Frozen references and reward models are in eval mode on purpose (as in tests/test_posttrain.py).
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")

MATRIX = matrix.combinations()
CI_RUNS = {c.id for c in matrix.ci_real_runs(MATRIX)}
# Combinations that crash today (a traceback instead of a run or a refusal), with the reason:
# expected failures until the bug is fixed (strict: a fix makes them pass and the list shrinks).
KNOWN_CRASHES: dict[str, str] = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def one_thread_per_rank():
    """Tiny tensors: one thread per process, in this one and in the ranks it spawns."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


class Parents:
    """The parent runs of post-training, one per architecture row, trained when first needed."""

    def __init__(self, work: Path):
        self.work, self.runs = work, {}

    def __getitem__(self, row: int) -> Path:
        if row not in self.runs:
            self.runs[row] = matrix.make_parent(row, self.work / "parents", self.cache)
        return self.runs[row]

    def get(self, row: int) -> Path:
        return self[row]

    @property
    def cache(self) -> Path:
        return self.work / "cache"


@pytest.fixture(scope="module")
def parents(work, one_thread_per_rank) -> Parents:
    return Parents(work)


@pytest.fixture(scope="module")
def validated(work, parents) -> dict[str, Outcome]:
    """Each combination's outcome of composing and validating (filled as tests ask)."""
    return {}


def validate(combination: Combination, work: Path, parents: Parents, validated: dict[str, Outcome]) -> Outcome:
    if combination.id not in validated:
        validated[combination.id] = matrix.check(combination, work / "validate" / combination.id, parents.cache,
                                                 parents if combination.is_posttrain else {}, real=False)
    return validated[combination.id]


def assert_clean(outcome: Outcome) -> None:
    """Ran or refused; a refusal names, on each of its lines, the keys it is about."""
    assert outcome.status != "crashed", (f"{outcome.combination.id} crashed ({outcome.where}) with\n"
                                         f"  {outcome.combination.command_line()}\n{outcome.message}")
    if outcome.refused:
        for problem in matrix.problem_lines(outcome.message):
            assert matrix.named_keys(problem), f"{outcome.combination.id}: the refusal names no key: {problem}"


def marks(combination: Combination, real: bool) -> list:
    out = [] if not real or combination.id in CI_RUNS else [pytest.mark.slow]
    if combination.id in KNOWN_CRASHES:
        out.append(pytest.mark.xfail(reason=KNOWN_CRASHES[combination.id], strict=True))
    return out


@pytest.mark.parametrize("combination", [pytest.param(c, id=c.id) for c in MATRIX])
def test_every_combination_validates_or_is_refused_naming_its_keys(combination, work, parents, validated):
    assert_clean(validate(combination, work, parents, validated))


@pytest.mark.parametrize("combination", [pytest.param(c, id=c.id, marks=marks(c, real=True)) for c in MATRIX])
def test_combination_trains_two_steps_or_is_refused(combination, parents, tmp_path):
    root = tmp_path / "root"
    outcome = matrix.check(combination, root, parents.cache, parents if combination.is_posttrain else {}, real=True)
    assert_clean(outcome)
    if outcome.refused:
        return
    run = RunDir(root / "run")
    summary = json.loads(run.summary.read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == matrix.STEPS
    if combination.schedule == "wsd":  # the branch: one more run directory, decayed early
        branches = [p for p in (run.path / "branches").iterdir() if (RunDir(p).summary).is_file()]
        assert len(branches) == 1
        assert json.loads(RunDir(branches[0]).summary.read_text())["status"] == "completed"


def test_readme_table_of_refusals_is_current(work, parents, validated):
    outcomes = [validate(c, work, parents, validated) for c in MATRIX]
    table = matrix.refusal_table(outcomes)
    assert matrix.readme_table(matrix.README.read_text()) == table, (
        "README.md's table of refused combinations is stale: run `python -m tests.matrix --write-readme`\n" + table)


def test_known_crashes_are_combinations_of_the_matrix_that_validate():
    assert set(KNOWN_CRASHES) <= {c.id for c in MATRIX} - CI_RUNS  # CI's real runs all pass


def test_covering_array_has_every_pair_of_architecture_choices_and_the_matrix_uses_them_all():
    for a, b in itertools.combinations(ARCHITECTURE, 2):
        pairs = {(row[a], row[b]) for row in ROWS}
        assert pairs == set(itertools.product(ARCHITECTURE[a], ARCHITECTURE[b])), (a, b)
    assert {c.row for c in MATRIX} == set(range(len(ROWS)))
    assert len(MATRIX) == len({c.id for c in MATRIX}) == 1 * 8 * 2 + 6 * 8 * 2 * 2  # 8 layouts; pretraining has no LoRA key


def test_ci_subset_covers_stage_lora_and_schedule_pairwise_and_every_layout():
    subset = matrix.ci_real_runs(MATRIX)
    assert {(c.stage, c.lora) for c in MATRIX} == {(c.stage, c.lora) for c in subset}
    assert {(s, sch) for s in STAGES for sch in matrix.SCHEDULES} <= {(c.stage, c.schedule) for c in subset}
    assert {(lora, sch) for lora in (False, True) for sch in matrix.SCHEDULES} <= {(c.lora, c.schedule) for c in subset}
    assert {c.parallelism for c in subset} == set(matrix.PARALLELISMS) - {"pp"}  # pp: in pp_fsdp and test_pipeline
    assert sum(c.devices > 1 for c in subset) == len(matrix.PARALLELISMS) - 2  # one run per other multi-rank layout


def test_posttraining_refuses_an_architecture_override_that_contradicts_its_parent(parents, tmp_path):
    from llm.train import train

    tmp_path = tmp_path / "root"
    tmp_path.mkdir()
    mqa_row = next(i for i, row in enumerate(ROWS) if row["attention"] == "mqa")
    combination = Combination("sft", "single", False, "cosine", mqa_row)
    cfg = matrix.compose([*combination.overrides(parents[mqa_row]), "attention=gqa"], tmp_path, parents.cache)
    with pytest.raises(ConfigError) as refused:
        train(cfg)
    assert "attention=gqa" in str(refused.value) and "init_from" in str(refused.value)
    assert not os.listdir(tmp_path)  # no run directory


def test_refusal_messages_name_keys_and_the_table_groups_them():
    refusal = ("Invalid configuration (2 problems):\n  - parallelism.tensor_parallel=2: must divide "
               "model.attention.n_kv_heads=1\n  - init_from='/tmp/x/parent-r03/run': not a run")
    assert matrix.problem_lines(refusal)[1] == "init_from='/tmp/x/parent-r03/run': not a run"
    assert matrix.named_keys(refusal) == ["parallelism.tensor_parallel", "model.attention.n_kv_heads", "init_from"]
    assert matrix.named_keys("the run failed for no stated reason") == []
    combos = [Combination(PRETRAIN, "fsdp_tp", None, s, 1) for s in matrix.SCHEDULES]
    table = matrix.refusal_table([Outcome(c, "refused", refusal) for c in combos]
                                 + [Outcome(Combination(PRETRAIN, "single", None, "cosine", 0), "completed")])
    assert "3 combinations: 1 run, 2 refused" in table
    assert "| 2: posttrain=none, parallelism=fsdp_tp, attention=mqa |" in table and "<parent>: not a run" in table


def test_the_matrix_covers_every_option_of_the_stage_and_parallelism_groups():
    # A new stage or layout joins the matrix (README: "Adding a stage"), or this fails.
    conf = Path(__file__).resolve().parents[1] / "conf"
    stages = {p.stem for p in (conf / "posttrain").glob("*.yaml")}
    assert {"none" if s == PRETRAIN else s for s in STAGES} == stages
    assert set(matrix.PARALLELISMS) == {p.stem for p in (conf / "parallelism").glob("*.yaml")}
