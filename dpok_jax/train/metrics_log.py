"""Run metrics: `RUN_DIR/metrics.jsonl` (one JSON object a line) and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax


class MetricsLog:
    """Append-only JSONL + TensorBoard writer; only process 0 writes."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.active = jax.process_index() == 0
        self._tb = None
        if self.active and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a crashed run logs past its last checkpoint)."""
        if not self.active or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), "split": split}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, int(step))
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]
