"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per line, the source of truth the
report is built from) and TensorBoard event files beside it. Only the main process writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, directory: str | Path, *, stage: str, enabled: bool = True, tensorboard: bool = True):
        self.directory = Path(directory)
        self.stage = stage
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.directory / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or not values:
            return
        record = {"stage": self.stage, "step": step, **values}
        with open(self.directory / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop this stage's records past ``step``: after a resume from checkpoint ``step`` they are
        logged again, and the log must read as one uninterrupted run."""
        path = self.directory / "metrics.jsonl"
        if not path.exists():
            return
        keep = [r for r in read_metrics(path) if r.get("stage") != self.stage or r.get("step", 0) <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in keep))
        tmp.replace(path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
