"""What pyproject.toml cannot say: the configs ship inside the package as `llm.conf`.

conf/ (with experiments/ and sweeps/ through its `experiment` and `sweep` links) stays at the top
of the repository where users edit it; a wheel or a non-editable `pip install .` copies it into
the installed package, so `llm-train` runs from any directory. `pip install -e .` maps `llm.conf`
to the same conf/ directory. llm/resources.py finds it either way.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["llm*"]), "llm.conf"],
    package_dir={"llm.conf": "conf"},
    # The globs follow the experiment/ and sweep/ links, so the wheel holds real files.
    package_data={"llm.conf": ["*.yaml", "**/*.yaml"]},
)
