"""Mutation testing: plant one small bug at a time in a copy of the repository and see whether
the CI suite notices.

    python tests/mutate.py                          # the default modules, 40 mutants each
    python tests/mutate.py llm/generate/sampling.py --sample 0      # every mutant of one file
    python tests/mutate.py llm/stages --list        # the mutants, without running anything
    python tests/mutate.py llm/model --jobs 2 --out runs/mutation

Each mutant changes one operator or constant: `+`<->`-`, `*`<->`/`, `<`<->`<=`, `>`<->`>=`,
`==`<->`!=`, `is`<->`is not`, `in`<->`not in`, `and`<->`or`, `&`<->`|`, a dropped unary `-` or
`not`, an integer n -> n+1, a float x -> x+1, True<->False. Strings, docstrings, annotations,
`raise` statements and logging calls are left alone: a wrong message is not what this measures.

A mutant is *killed* when the CI tests for its module fail (or error, or run past a timeout of
twice their unmutated time plus 60 s, as CI would); it *survives* when they pass. The tests run
are the CI selection (`-m 'not slow'`) of the test files mapped to the module in `TESTS` below:
a subset of the suite, so the score is a lower bound on the whole CI suite's. Mutants are drawn
at random (`--sample`, `--seed`) where a module has too many to run in an afternoon; the report
gives the score with a 95% Wilson interval and every survivor, for a person to judge (an
equivalent mutant, e.g. `>` vs `>=` on a float that is never equal, cannot be killed).

Kept out of CI: a run over the default modules takes about an hour on 2 cores. Each worker
copies the tracked files into its own directory and runs pytest there with `PYTHONPATH` set to
it, so the checkout you work in is never changed."""

from __future__ import annotations

import argparse
import ast
import copy
import fnmatch
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Queue

log = logging.getLogger("mutate")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODULES = ["llm/stages", "llm/generate/sampling.py", "llm/scaling/fit.py",
                   "llm/data/stream.py", "llm/tracking/guard.py", "llm/model"]

# The test files that exercise each module, most direct first (pytest stops at the first
# failure). The first matching pattern wins.
TESTS: list[tuple[str, list[str]]] = [
    ("llm/stages/objectives.py", ["tests/test_objectives.py", "tests/test_direction.py", "tests/test_distill.py"]),
    # Whole training runs (tests/test_train.py, 5 minutes) are too slow to repeat per mutant.
    ("llm/stages/pretrain.py", ["tests/test_training_parts.py", "tests/test_direction.py",
                                "tests/test_reliability.py::test_guard_rolls_back_and_skips_nan_and_spike_batches",
                                "tests/test_moe.py::test_moe_run_logs_router_metrics_and_counts_active_parameters",
                                "tests/test_trust.py::test_resume_with_another_lr_and_seq_len_takes_effect_and_counts_d_as_trained"]),
    ("llm/stages/distill.py", ["tests/test_distill.py", "tests/test_objectives.py"]),
    ("llm/stages/optim.py", ["tests/test_training_parts.py", "tests/test_lora.py"]),
    ("llm/stages/schedule.py", ["tests/test_training_parts.py"]),
    ("llm/stages/init_from.py", ["tests/test_posttrain.py", "tests/test_lora.py"]),
    ("llm/stages/*", ["tests/test_direction.py", "tests/test_objectives.py", "tests/test_posttrain.py"]),
    ("llm/generate/*", ["tests/test_generate.py"]),
    ("llm/scaling/*", ["tests/test_scaling_options.py", "tests/test_scaling_fit.py"]),
    ("llm/data/token_*.py", ["tests/test_token_shards.py", "tests/test_data.py", "tests/test_token_files.py"]),
    ("llm/data/*", ["tests/test_data.py"]),
    ("llm/tracking/guard.py", ["tests/test_direction.py",
                               "tests/test_reliability.py::test_guard_rolls_back_and_skips_nan_and_spike_batches",
                               "tests/test_reliability.py::test_guard_gives_up_after_max_rollbacks_with_a_clear_error",
                               "tests/test_reliability.py::test_a_non_finite_update_is_never_checkpointed"]),
    ("llm/model/moe.py", ["tests/test_moe.py", "tests/test_model.py"]),
    ("llm/model/config.py", ["tests/test_model.py", "tests/test_moe.py", "tests/test_config.py"]),
    ("llm/model/value.py", ["tests/test_model.py", "tests/test_direction.py"]),
    ("llm/model/lora.py", ["tests/test_lora.py"]),
    ("llm/model/*", ["tests/test_model.py", "tests/test_flops.py", "tests/test_hf.py", "tests/test_generate.py"]),
]

_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
          ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
_CMPOP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
          ast.NotIn: ast.In}
_BOOLOP = {ast.And: ast.Or, ast.Or: ast.And}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
           ast.Pow: "**", ast.BitAnd: "&", ast.BitOr: "|", ast.Lt: "<", ast.LtE: "<=",
           ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
           ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}
_LOGGERS = {"log", "logger", "logging", "warnings"}


@dataclass(frozen=True)
class Mutant:
    path: str  # relative to the repository
    index: int  # the site's position in the file's walk
    line: int
    change: str  # e.g. "`<` -> `<=`"

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line} {self.change}"


class _Sites(ast.NodeTransformer):
    """Walks a module in a fixed order, numbering the places a mutation can go; with `target`
    set, rewrites the target-th place and leaves the rest as they were."""

    def __init__(self, target: int = -1):
        self.target, self.count, self.found = target, 0, []

    def _site(self, node: ast.AST, change: str, mutated):
        index, self.count = self.count, self.count + 1
        self.found.append((index, getattr(node, "lineno", 0), change))
        return mutated() if index == self.target else node

    # Subtrees a mutation would only make read differently.
    def visit_Raise(self, node):
        return node

    def visit_JoinedStr(self, node):
        return node

    def visit_Expr(self, node):  # docstrings and bare logging calls
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node
        return self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in _LOGGERS:
            return node
        return self.generic_visit(node)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_FunctionDef(self, node):  # the defaults and the body; not decorators or annotations
        node.args = self.visit(node.args)
        node.body = [self.visit(statement) for statement in node.body]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arguments(self, node):  # default values only: the rest are names and annotations
        node.defaults = [self.visit(d) for d in node.defaults]
        node.kw_defaults = [d if d is None else self.visit(d) for d in node.kw_defaults]
        return node

    def visit_If(self, node):
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return node
        return self.generic_visit(node)

    # The mutations.
    def _swap_operator(self, node, table: dict, suffix: str = ""):
        """The node with its `op` swapped by `table` (`+` for `-`, `and` for `or`, ...), if listed."""
        node = self.generic_visit(node)
        new = table.get(type(node.op))
        if new is None:
            return node

        def mutated():
            changed = copy.copy(node)
            changed.op = new()
            return changed

        return self._site(node, f"`{_SYMBOL[type(node.op)]}{suffix}` -> `{_SYMBOL[new]}{suffix}`", mutated)

    def visit_BinOp(self, node):
        return self._swap_operator(node, _BINOP)

    def visit_AugAssign(self, node):
        return self._swap_operator(node, _BINOP, "=")

    def visit_BoolOp(self, node):
        return self._swap_operator(node, _BOOLOP)

    def visit_Compare(self, node):
        node = self.generic_visit(node)
        for i, op in enumerate(node.ops):
            new = _CMPOP[type(op)]

            def mutated(i=i, new=new):
                ops = list(node.ops)
                ops[i] = new()
                return ast.copy_location(ast.Compare(node.left, ops, node.comparators), node)

            node = self._site(node, f"`{_SYMBOL[type(op)]}` -> `{_SYMBOL[new]}`", mutated)
        return node

    def visit_UnaryOp(self, node):
        node = self.generic_visit(node)
        if isinstance(node.op, ast.USub):
            return self._site(node, "unary `-` dropped", lambda: node.operand)
        if isinstance(node.op, ast.Not):
            return self._site(node, "`not` dropped", lambda: node.operand)
        return node

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            return self._site(node, f"`{value}` -> `{not value}`",
                              lambda: ast.copy_location(ast.Constant(not value), node))
        if isinstance(value, (int, float)) and math.isfinite(value):
            new = value + 1
            return self._site(node, f"`{value!r}` -> `{new!r}`",
                              lambda: ast.copy_location(ast.Constant(new), node))
        return node


def source_of(path: Path, rev: str | None = None) -> str:
    """The file's text in the working tree, or at commit `rev`."""
    if rev is None:
        return path.read_text()
    rel = path.resolve().relative_to(REPO).as_posix()
    return subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout


def mutants_of(path: Path, rev: str | None = None) -> list[Mutant]:
    sites = _Sites()
    sites.visit(ast.parse(source_of(path, rev)))
    rel = path.resolve().relative_to(REPO).as_posix()
    return [Mutant(rel, index, line, change) for index, line, change in sites.found]


def mutated_source(source: str, index: int) -> str:
    tree = _Sites(index).visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree))


def tests_for(path: str) -> list[str]:
    for pattern, tests in TESTS:
        if fnmatch.fnmatch(path, pattern):
            return tests
    raise SystemExit(f"error: no tests are mapped to {path}; add it to TESTS in {Path(__file__).name} or pass --tests")


class Worker:
    """A private copy of the tracked files; pytest runs there with PYTHONPATH pointing at it, so
    `import llm` (in-process and in any subprocess the tests start) loads the copy."""

    def __init__(self, root: Path, rev: str | None, tests_rev: str | None = None):
        self.root = root
        root.mkdir(parents=True)
        if rev:  # a commit's files, whatever the working tree holds now
            self._extract(rev)
        else:
            files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
            for name in filter(None, files.decode().split("\0")):
                source = REPO / name
                if source.is_file():
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, root / name)
        if tests_rev:  # an older (or newer) suite against the same code: a before/after score
            shutil.rmtree(root / "tests")
            self._extract(tests_rev, "tests")
        self.env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1",
                    "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

    def _extract(self, rev: str, *paths: str) -> None:
        archive = subprocess.run(["git", "archive", "--format=tar", rev, *paths], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(self.root)], input=archive, check=True)

    def pytest(self, tests: list[str], timeout: float) -> tuple[str, float, str]:
        """(passed|failed|timeout, seconds, the first test that failed)."""
        tests = [t for t in tests if (self.root / t.split("::")[0]).exists()]  # an older suite may lack some
        if not tests:
            raise SystemExit(f"error: none of the mapped test files exist in {self.root}")
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
                                   "-m", "not slow", *tests], cwd=self.root, env=self.env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        seconds = time.perf_counter() - start
        if proc.returncode == 5:
            raise SystemExit(f"error: pytest collected no tests from {tests}")
        if proc.returncode == 0:
            return "passed", seconds, ""
        failed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
        return "failed", seconds, failed[0] if failed else f"pytest exit {proc.returncode}"

    def run(self, mutant: Mutant, tests: list[str], timeout: float) -> tuple[str, float, str]:
        target = self.root / mutant.path
        original = target.read_text()
        target.write_text(mutated_source(original, mutant.index))
        try:
            return self.pytest(tests, timeout)
        finally:
            target.write_text(original)


def wilson(killed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = killed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def python_files(targets: list[str], rev: str | None = None) -> list[Path]:
    """The Python files of each target (a file or a folder), in the working tree or at `rev`."""
    files = []
    for target in targets:
        if rev:
            listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", target], cwd=REPO,
                                    capture_output=True, text=True).stdout.split()
            found = sorted(REPO / name for name in listed if name.endswith(".py"))
        else:
            path = (REPO / target).resolve()
            found = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.suffix == ".py" and path.is_file() else []
        if not found:
            raise SystemExit(f"error: {target} is neither a Python file nor a folder of them in {rev or REPO}")
        files += found
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tests/mutate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring (and README, Testing) for what a mutant is.")
    parser.add_argument("targets", nargs="*", default=DEFAULT_MODULES,
                        help="files or folders to mutate, relative to the repository (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=40,
                        help="mutants drawn at random per target, 0 for all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="for the draw (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="workers in parallel, each a repository copy (default: %(default)s)")
    parser.add_argument("--tests", nargs="+", help="test files to run for every mutant, instead of the TESTS map")
    parser.add_argument("--rev", help="mutate this commit's files (e.g. HEAD) instead of the working tree's")
    parser.add_argument("--tests-rev", help="run the tests/ folder of this commit (e.g. an older suite, for a "
                        "before/after score on the same mutants)")
    parser.add_argument("--only", type=Path, metavar="REPORT_JSON",
                        help="run only the mutants a report.json lists as killed (the same mutants against "
                        "another suite: with --tests-rev, which of them an older suite misses)")
    parser.add_argument("--retry", type=Path, metavar="REPORT_JSON",
                        help="run only the mutants a report.json lists as survivors (after new tests)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mutation",
                        help="where report.json and report.md go (default: runs/mutation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for option in ("rev", "tests_rev"):  # one commit for the whole run, though the branch moves on
        if getattr(args, option):
            resolved = subprocess.run(["git", "rev-parse", "--verify", f"{getattr(args, option)}^{{commit}}"], cwd=REPO,
                                      capture_output=True, text=True)
            if resolved.returncode:
                parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: not a commit of {REPO}")
            setattr(args, option, resolved.stdout.strip())
    if args.sample < 0 or args.jobs < 1:
        parser.error("--sample must be >= 0 and --jobs >= 1")

    only: set[tuple[str, int]] = set()
    for option, report_path, key in (("--only", args.only, "killed_mutants"), ("--retry", args.retry, "survivors")):
        if report_path is None:
            continue
        try:
            only |= {(m["path"], m["index"]) for r in json.loads(report_path.read_text()) for m in r[key]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"{option} {report_path}: not a report.json of this command ({e})")
    rng = random.Random(args.seed)
    chosen: dict[str, list[Mutant]] = {}
    for target in args.targets:
        every = [m for path in python_files([target], args.rev) for m in mutants_of(path, args.rev)]
        picked = every if args.sample == 0 or args.sample >= len(every) else rng.sample(every, args.sample)
        if args.only or args.retry:
            picked = [m for m in every if (m.path, m.index) in only]
        chosen[target] = sorted(picked, key=lambda m: (m.path, m.index))
        log.info("%s: %d mutants, %d to run", target, len(every), len(chosen[target]))
    if args.list:
        for target, mutants in chosen.items():
            for m in mutants:
                print(f"{m.name}  [{' '.join(args.tests or tests_for(m.path))}]")
        return

    with tempfile.TemporaryDirectory(prefix="llm-mutate-") as tmp:
        workers: Queue[Worker] = Queue()
        for i in range(args.jobs):
            workers.put(Worker(Path(tmp) / f"w{i}", args.rev, args.tests_rev))
        # The unmutated tests must pass (in a copy, as the mutants run) and give the timeout.
        baseline: dict[tuple[str, ...], float] = {}

        def run_baseline(tests: tuple[str, ...]) -> None:
            worker = workers.get()
            try:
                outcome, seconds, failed = worker.pytest(list(tests), timeout=3600)
            finally:
                workers.put(worker)
            if outcome != "passed":  # no mutant can be judged by tests that already fail
                log.error("the unmutated tests fail (%s %s); their mutants are left out: %s", outcome, failed,
                          " ".join(tests))
                return
            baseline[tests] = seconds
            log.info("baseline %.1f s: %s", seconds, " ".join(tests))

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run_baseline, {tuple(args.tests or tests_for(m.path)) for ms in chosen.values() for m in ms}))
        for target in chosen:
            chosen[target] = [m for m in chosen[target] if tuple(args.tests or tests_for(m.path)) in baseline]

        todo = [m for ms in chosen.values() for m in ms]
        results: dict[Mutant, tuple[str, float, str]] = {}

        def run(m: Mutant) -> None:
            tests = tuple(args.tests or tests_for(m.path))
            worker = workers.get()
            try:
                results[m] = worker.run(m, list(tests), timeout=2 * baseline[tests] + 60)
            finally:
                workers.put(worker)
            outcome, seconds, killer = results[m]
            log.info("[%d/%d] %s: %s (%.0f s)", len(results), len(todo), m.name,
                     "survived" if outcome == "passed" else f"killed ({outcome} {killer})".rstrip(), seconds)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, todo))

    report = []
    for target, mutants in chosen.items():
        killed = sum(results[m][0] != "passed" for m in mutants)
        low, high = wilson(killed, len(mutants))
        total = sum(len(mutants_of(path, args.rev)) for path in python_files([target], args.rev))
        report.append({"target": target, "total": total, "run": len(mutants),
            "killed": killed, "score": killed / max(1, len(mutants)), "interval95": [low, high],
            "tests": sorted({t for m in mutants for t in (args.tests or tests_for(m.path))}),
            "survivors": [asdict(m) for m in mutants if results[m][0] == "passed"],
            "killed_mutants": [{**asdict(m), "by": results[m][0] if results[m][0] == "timeout" else results[m][2]}
                               for m in mutants if results[m][0] != "passed"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| target | mutants | run | killed | score (95% interval) |", "|---|---|---|---|---|"]
    for r in report:
        lines.append(f"| {r['target']} | {r['total']} | {r['run']} | {r['killed']} | "
                     f"{r['score']:.0%} ({r['interval95'][0]:.0%}-{r['interval95'][1]:.0%}) |")
    run_total = sum(r["run"] for r in report)
    killed_total = sum(r["killed"] for r in report)
    lines.append(f"| all | | {run_total} | {killed_total} | {killed_total / max(1, run_total):.0%} |")
    lines += ["", "Survivors:", ""] + [f"- {s['path']}:{s['line']} {s['change']}" for r in report for s in r["survivors"]]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log.info("written: %s", args.out / "report.md")


if __name__ == "__main__":
    main()
