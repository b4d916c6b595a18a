"""The index of a multirun sweep: one record per job (overrides, status, run directory, error,
final loss) in `<sweep dir>/index.jsonl`, and at the end `index.json` and a summary line. A failed
job is recorded and the sweep goes on; Hydra then exits non-zero."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from typing import Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llm.files import InputError, read_input_json, read_jsonl, write_json
from llm.run.layout import RunDir


_current_sweep: Optional[Path] = None  # set when a multirun starts in this process


class SweepIndex(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _current_sweep
        _current_sweep = Path(config.hydra.sweep.dir)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg else None
        if hydra_cfg is None or hydra_cfg.mode is None or str(hydra_cfg.mode) != "RunMode.MULTIRUN":
            return
        run_dir = Path(hydra_cfg.runtime.output_dir)
        record = {"job": hydra_cfg.job.num, "overrides": list(job_return.overrides or []), "run_dir": str(run_dir),
                  "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed"}
        if job_return.status == JobStatus.FAILED:
            record["error"] = f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        summary = RunDir(run_dir).summary
        if summary.exists():
            try:
                data = read_input_json(summary, "summary")
            except InputError as e:  # a job killed while writing it: the index says so, the sweep goes on
                record.update(status="failed", error=str(e))
            else:
                record.update({k: data.get(k) for k in ("run_id", "val/loss", "N", "D", "C")})
        line = json.dumps(record, default=str) + "\n"
        # One short O_APPEND write per job: safe with parallel launchers writing the same index.
        fd = os.open(run_dir.parent / "index.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def report_sweep() -> None:
    """After a multirun (whether or not a job failed): write index.json and print the outcome."""
    sweep_dir = _current_sweep
    index = sweep_dir / "index.jsonl" if sweep_dir else None
    if index is None or not index.exists():
        return
    records = sorted(read_jsonl(index), key=lambda r: r["job"])
    write_json(sweep_dir / "index.json", records)
    failed = [r for r in records if r["status"] != "completed"]
    # The multirun's outcome, the command's last output: on stdout rather than through logging,
    # whose handlers still write the last job's log file.
    lines = [f"sweep {sweep_dir}: {len(records) - len(failed)} completed, {len(failed)} failed"]
    lines += [f"  failed job {r['job']} ({' '.join(r['overrides'])}): {r.get('error', '')[:300]}" for r in failed]
    sys.stdout.write("".join(line + "\n" for line in lines))
