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
        """Drop lines logged after `step` (a crashed run logs past its last checkpoint), and a torn
        last line (a process killed in the middle of writing it)."""
        if not self.active or not self.path.exists():
            return
        rows = _parse(self.path, tolerate_torn_tail=True)
        kept = [json.dumps(r) for r in rows if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

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


def _parse(path: Path, *, tolerate_torn_tail: bool) -> list[dict]:
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if tolerate_torn_tail and number == len(lines):
                print(f"{path}: dropped a torn last line ({number}; the writer was killed in the "
                      "middle of it).", flush=True)
                break
            raise ValueError(f"{path} line {number} is not valid JSON ({err.msg})") from None
    return rows


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    """Rows of `RUN_DIR/metrics.jsonl` (of one split if given); a torn last line is skipped."""
    rows = _parse(Path(run_dir) / "metrics.jsonl", tolerate_torn_tail=True)
    return [r for r in rows if split is None or r["split"] == split]
