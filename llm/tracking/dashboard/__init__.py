"""Comparing runs: `llm-dashboard` (llm/cli/dashboard.py).

  runs.py    which runs: run/sweep directories or a W&B project, filters, grouping
  page.py    the offline dashboard: one self-contained HTML file from the runs' local metrics
  report.py  the online dashboard: a W&B Report built with wandb-workspaces
"""

from llm.tracking.dashboard.page import page_data, write_page
from llm.tracking.dashboard.runs import (Filters, Run, SelectionError, find_local_runs, find_wandb_runs, varying_groups,
                                         varying_keys)

__all__ = ["Filters", "Run", "SelectionError", "find_local_runs", "find_wandb_runs", "page_data", "varying_groups",
           "varying_keys", "write_page"]
