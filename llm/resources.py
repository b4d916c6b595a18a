"""Where the package's own files are: the Hydra config directory, in a source checkout or an install."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def conf_dir() -> Path:
    """conf/ as a directory on disk: the installed `llm.conf` of a wheel or `pip install .`, or, in
    an editable install, the repository's conf/ (with experiments/ and sweeps/ through its links)."""
    try:
        return Path(str(files("llm.conf")))
    except ModuleNotFoundError:
        # A source tree on sys.path without an install (or an editable install made before conf/
        # became `llm.conf`): conf/ sits beside the package.
        return Path(__file__).resolve().parents[1] / "conf"


CONF_DIR: str = str(conf_dir())
