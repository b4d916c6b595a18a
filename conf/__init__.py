"""Hydra configs, installed as the package `llm.conf` (see setup.py); `llm.resources.CONF_DIR` finds them."""
