"""Run metrics: `RUN_DIR/metrics.jsonl` (one JSON object a line) and TensorBoard event files.

On a local run folder each row is appended to the file. An object store (`run_dir=gs://...`) cannot
append, so there the log keeps the file's rows in memory and rewrites the whole object, at most once
every `flush_every_s` seconds and at every `flush()` (the loop flushes before each checkpoint save,
so a resumed run's log has every row up to its checkpoint) and `close()`. A run killed between two
flushes loses the rows since the last one; they lie after its last checkpoint, which the resumed run
logs again anyway.
"""

from __future__ import annotations

import json
import math
import time

import jax
from etils import epath

from dpok_jax import storage


class MetricsLog:
    """JSONL + TensorBoard writer; only process 0 writes."""

    def __init__(self, run_dir: epath.PathLike, *, tensorboard: bool = True,
                 flush_every_s: float = 60.0):
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self.active = jax.process_index() == 0
        self._local = storage.is_local(self.path)
        self._lines: list[str] | None = None  # remote: the whole file, rewritten on flush
        self._dirty = False
        self._flushed_at = time.monotonic()
        self._flush_every_s = flush_every_s
        self._tb = None
        if self.active and tensorboard:
            self._tb = _tensorboard(epath.Path(run_dir) / "tensorboard")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a crashed run logs past its last checkpoint), and a torn
        last line (a process killed in the middle of writing it)."""
        if not self.active or not self.path.exists():
            return
        rows = _parse(self.path, tolerate_torn_tail=True)
        kept = [json.dumps(r) for r in rows if r.get("step", 0) <= step]
        storage.write_text(self.path, "".join(line + "\n" for line in kept))
        if not self._local:
            self._lines = kept

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), "split": split}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, int(step))
        if self._local:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            return
        if self._lines is None:
            self._lines = ([json.dumps(r) for r in _parse(self.path, tolerate_torn_tail=True)]
                           if self.path.exists() else [])
        self._lines.append(json.dumps(row))
        self._dirty = True
        if time.monotonic() - self._flushed_at >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Remote folders: rewrite the whole object with every row so far (local: nothing to do)."""
        if self._tb is not None:
            self._tb.flush()
        if self.active and self._dirty and self._lines is not None:
            storage.write_text(self.path, "".join(line + "\n" for line in self._lines))
            self._dirty = False
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(logdir: epath.Path):
    """A tensorboardX writer; on a remote folder only when tensorboardX can write there (its `gs://`
    writer needs google-cloud-storage, its `s3://` one boto3), else none, with a note
    (metrics.jsonl has every value)."""
    from tensorboardX import SummaryWriter, record_writer

    if not storage.is_local(logdir):
        scheme = str(logdir).split(":", 1)[0]
        if not {"gs": record_writer.GCS_ENABLED, "s3": record_writer.S3_ENABLED}.get(scheme, False):
            print(f"TensorBoard events not written to {logdir} (tensorboardX cannot write {scheme}:// "
                  "here: install google-cloud-storage for gs://, boto3 for s3://); metrics.jsonl has "
                  "every value.", flush=True)
            return None
    return SummaryWriter(str(logdir))


def _parse(path: epath.Path, *, tolerate_torn_tail: bool) -> list[dict]:
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


def read_metrics(run_dir: epath.PathLike, split: str | None = None) -> list[dict]:
    """Rows of `RUN_DIR/metrics.jsonl` (of one split if given); a torn last line is skipped."""
    rows = _parse(epath.Path(run_dir) / "metrics.jsonl", tolerate_torn_tail=True)
    return [r for r in rows if split is None or r["split"] == split]
