"""The training loop: jitted, sharded steps; progress; metrics; held-out evaluation; checkpoints.

Crash safety: checkpoints are saved every `train.checkpoint_every` steps (async) and on Ctrl-C
(SIGINT sets a flag; the loop saves after the step in flight and exits). Resuming restores the
state and the data position, so the resumed run produces the same losses as an uninterrupted one.
`train.max_nonfinite` non-finite losses in a row stop the run with `TrainingDiverged`; the skipped
steps never change the parameters (optax.apply_if_finite), and the last checkpoint is left intact.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dpok_jax.evaluation.preference import scores_by_task
from dpok_jax.train.checkpoint import RunCheckpoints
from dpok_jax.train.metrics_log import MetricsLog
from dpok_jax.train.state import TrainState


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class LoopResult:
    state: TrainState
    final_step: int
    interrupted: bool = False
    eval_metrics: dict = field(default_factory=dict)
    skipped_steps: int = 0


@contextmanager
def sigint_flag():
    """Yields a one-element list that becomes [True] on the first Ctrl-C (a second one aborts)."""
    flag = [False]
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag[0]:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag[0] = True
        print("\nInterrupted: saving a checkpoint after the current step (Ctrl-C again to abort).",
              flush=True)

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, plain KeyboardInterrupt semantics
        pass
    try:
        yield flag
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the batch axis (multi-host safe)."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def evaluate(eval_step: Callable, params, ref_params, batches, sharding, task_names) -> dict:
    """Run `eval_step` over every held-out batch and score the pairs (SPEC §10)."""
    margins, tasks = [], []
    for batch in batches:
        out = eval_step(params, ref_params, to_global(batch, sharding))
        out = jax.tree.map(_fetch, out)
        valid = out["valid"].astype(bool)
        margins.append(out["margin"][valid])
        tasks.append(out["task_id"][valid])
    return scores_by_task(np.concatenate(margins), np.concatenate(tasks), task_names)


def host_rows(batch: dict, sharding: NamedSharding) -> dict:
    """Every host's rows of a host-local numpy batch, in global batch order, as numpy on every host
    (the same order as `_fetch` gives the outputs of a step on `to_global(batch)`)."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in batch.items()}
    return {k: _fetch(v) for k, v in to_global(batch, sharding).items()}


def _fetch(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every host (gathered across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def run_loop(
    *,
    state: TrainState,
    ref_params: Any,
    train_step: Callable,
    eval_step: Callable,
    batcher,
    eval_batches: Callable[[], Any],
    task_names,
    sharding: NamedSharding,
    run_dir: Path,
    total_steps: int,
    log_every: int,
    eval_every: int,
    checkpoint_every: int,
    keep_checkpoints: int,
    max_nonfinite: int,
    progress: bool = True,
    desc: str = "train",
    should_stop: Callable[[int], bool] | None = None,
) -> LoopResult:
    """Train from `state` (or from the latest checkpoint in `run_dir`) up to `total_steps`."""
    run_dir = Path(run_dir)
    ckpt = RunCheckpoints(run_dir / "checkpoints", keep=keep_checkpoints)
    log = MetricsLog(run_dir)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(latest, state)
        batcher.restore(data_state)
        start = int(latest)
        log.truncate_after(start)
        print(f"Resumed from {run_dir / 'checkpoints'} at step {start}.", flush=True)

    result = LoopResult(state=state, final_step=start)
    if start >= total_steps:
        ckpt.close()
        log.close()
        return result

    bar = _progress(total_steps, start, desc, progress)
    window: list[dict] = []
    t0, tokens = time.perf_counter(), 0.0
    step = start
    try:
        with sigint_flag() as interrupted:
            while step < total_steps:
                batch = to_global(next(batcher), sharding)
                state, metrics = train_step(state, ref_params, batch)
                step += 1
                window.append(metrics)
                consecutive = int(state.opt_state.notfinite_count)
                if consecutive >= max_nonfinite:
                    raise TrainingDiverged(
                        f"{consecutive} non-finite losses in a row at step {step} (limit "
                        f"train.max_nonfinite={max_nonfinite}); the parameters were not updated by "
                        f"them and the last good checkpoint in {run_dir / 'checkpoints'} is intact. "
                        "Lower optim.learning_rate or loss.beta, or check the data.")
                if step % log_every == 0 or step == total_steps:
                    host = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    tokens += host.pop("tokens", 0.0) * len(window)
                    host["tokens_per_s"] = tokens / elapsed
                    host["skipped_total"] = float(state.opt_state.total_notfinite)
                    log.write(step, "train", host)
                    bar.set_postfix(loss=f"{host['loss']:.4f}",
                                    acc=f"{host.get('rewards/accuracies', float('nan')):.3f}",
                                    tok_s=f"{host['tokens_per_s']:.0f}")
                    window = []
                evaluated = None
                if eval_every and (step % eval_every == 0 or step == total_steps):
                    evaluated = evaluate(eval_step, state.params, ref_params, eval_batches(),
                                         sharding, task_names)
                    log.write(step, "eval", evaluated)
                    result.eval_metrics = evaluated
                stop_now = interrupted[0] or (should_stop is not None and should_stop(step))
                if (checkpoint_every and step % checkpoint_every == 0) or stop_now \
                        or step == total_steps:
                    ckpt.save(step, state, batcher.state(), evaluated, force=True)
                bar.update(1)
                if stop_now:
                    result.interrupted = True
                    break
    finally:
        bar.close()
        ckpt.close()
        log.close()
    result.state = state
    result.final_step = step
    result.skipped_steps = int(state.opt_state.total_notfinite)
    return result


def _progress(total: int, start: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, mininterval=1.0)


def tree_copy(tree):
    """Fresh buffers (so donating the policy never invalidates the frozen reference)."""
    return jax.tree.map(jnp.copy, tree)
