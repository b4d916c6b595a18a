"""The configs ship with the package: a wheel installed (not editable) into a fresh venv runs
`llm-train` from a directory that is not the repository, with conf/, experiments/ and sweeps/
found inside the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the build reads. Copied (links kept as links) so the build's build/ and *.egg-info stay out of
# the checkout and no stale file from an earlier build can slip into the wheel.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "llm", "conf", "experiments", "sweeps")


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this checkout; its dependencies (torch, ...) come
    from the test's own environment through a .pth file instead of being downloaded again."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    assert (source / "conf" / "experiment").is_symlink(), "conf/experiment should link to experiments/"

    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
          str(source)], cwd=root)
    (wheel,) = (root / "dist").glob("llm-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_llm_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    # pip itself comes through that .pth too; run by the venv's python it installs into the venv.
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root)
    return venv


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the repository, with no conf/ of its own."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    return where


def test_the_wheel_is_what_runs(installed, elsewhere):
    out = _run([str(installed / "bin" / "python"), "-c", "import llm, llm.resources as r; print(llm.__file__); print(r.CONF_DIR)"],
               cwd=elsewhere).stdout.split()
    package, conf = Path(out[0]), Path(out[1])
    assert package.is_relative_to(installed), f"llm imported from {package}, not from the installed wheel"
    assert conf == package.parent / "conf"
    # Real files, not links back into a checkout.
    assert (conf / "experiment" / "attention_ablation.yaml").is_file()
    assert not (conf / "experiment").is_symlink() and not (conf / "sweep").is_symlink()


def test_llm_train_composes_the_job_from_another_directory(installed, elsewhere):
    out = _run([str(installed / "bin" / "llm-train"), "--cfg", "job"], cwd=elsewhere).stdout
    for key in ("model:", "data:", "trainer:", "posttrain:", "experiment_name: null"):
        assert f"\n{key}" in f"\n{out}", f"{key!r} missing from the composed job config:\n{out}"


def test_experiments_and_sweeps_ship_with_the_package(installed, elsewhere):
    assert (REPO / "experiments" / "attention_ablation.yaml").is_file() and (REPO / "sweeps" / "isoflop.yaml").is_file()
    out = _run([str(installed / "bin" / "llm-train"), "--cfg", "job", "experiment=attention_ablation"], cwd=elsewhere).stdout
    assert "experiment_name: attention_ablation" in out
    assert "flops: 4.0e12" in out or "flops: 4000000000000.0" in out, out

    help_text = _run([str(installed / "bin" / "llm-train"), "--help"], cwd=elsewhere).stdout
    groups = {line.split(":")[0]: line for line in help_text.splitlines() if ":" in line}
    assert "attention_ablation" in groups["experiment"] and "posttrain/sft" not in groups["experiment"]
    assert "sft" in groups["experiment/posttrain"]
    assert "isoflop" in groups["sweep"], help_text


def test_a_users_own_experiments_dir_joins_the_shipped_configs(installed, elsewhere):
    """What the README tells users: `--config-dir DIR` adds DIR's experiment/ (and any group) to the package's."""
    mine = elsewhere / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "wide_gqa.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /attention: gqa\nexperiment_name: wide_gqa\nmodel:\n  d_model: 96\n")
    out = _run([str(installed / "bin" / "llm-train"), "--config-dir", "my_conf", "--cfg", "job", "experiment=wide_gqa"],
               cwd=elsewhere).stdout
    assert "experiment_name: wide_gqa" in out and "d_model: 96" in out and "n_kv_heads: 2" in out, out
