"""The training loop: jitted, sharded steps; progress; metrics; held-out evaluation; checkpoints.

Crash safety: checkpoints are saved every `train.checkpoint_every` steps (async) and on SIGINT or
SIGTERM (a flag; the loop saves after the step in flight and exits). Resuming restores the state, the
data position and the partly filled metrics window, so the resumed run logs the same values as an
uninterrupted one. `train.max_nonfinite` non-finite losses in a row (or non-finite parameters) stop
the run with `TrainingDiverged`; skipped steps never change the parameters (optax.apply_if_finite),
and a checkpoint is never written with non-finite parameters, so the last one saved is good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding

from dpok_jax.evaluation.preference import scores_by_task
from dpok_jax.host_device import host_rows, to_global, to_host  # noqa: F401 (re-exported)
from dpok_jax.train.checkpoint import RunCheckpoints
from dpok_jax.train.interrupts import StopRequest
from dpok_jax.train.metrics_log import MetricsLog
from dpok_jax.train.state import TrainState

_fetch = to_host  # the older name, kept for callers


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class LoopResult:
    state: TrainState
    final_step: int
    interrupted: bool = False
    eval_metrics: dict = field(default_factory=dict)
    skipped_steps: int = 0
    last_logged: dict = field(default_factory=dict)  # the last logged train window (every process)


def evaluate(eval_step: Callable, params, ref_params, batches, sharding, task_names) -> dict:
    """Run `eval_step` over every held-out batch and score the pairs (SPEC §10)."""
    margins, tasks = [], []
    for batch in batches:
        out = eval_step(params, ref_params, to_global(batch, sharding))
        out = jax.tree.map(to_host, out)
        valid = out["valid"].astype(bool)
        margins.append(out["margin"][valid])
        tasks.append(out["task_id"][valid])
    return scores_by_task(np.concatenate(margins), np.concatenate(tasks), task_names)


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
    run_dir: epath.PathLike,
    total_steps: int,
    log_every: int,
    eval_every: int,
    checkpoint_every: int,
    keep_checkpoints: int,
    max_nonfinite: int,
    progress: bool = True,
    desc: str = "train",
    stop: StopRequest | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> LoopResult:
    """Train from `state` (or from the latest good checkpoint in `run_dir`) up to `total_steps`.

    `stop` (SIGINT/SIGTERM) or `should_stop(step)` end the loop after a step, with a checkpoint.
    Checkpoints never hold non-finite parameters; the metrics window of a partly logged interval is
    saved with the data position, so a resumed run logs the same averages as an uninterrupted one.
    """
    run_dir = epath.Path(run_dir)
    stop = stop if stop is not None else StopRequest()
    ckpt = RunCheckpoints(run_dir / "checkpoints", keep=keep_checkpoints)
    log = MetricsLog(run_dir)
    start = 0
    window: list[dict] = []
    restored = ckpt.restore_latest(state)
    if restored is not None:
        start, state, data_state = restored
        window = [dict(m) for m in data_state.pop(_WINDOW_KEY, [])]
        batcher.restore(data_state)
        log.truncate_after(start)
        print(f"Resumed from {run_dir / 'checkpoints'} at step {start}.", flush=True)

    result = LoopResult(state=state, final_step=start)
    if start >= total_steps:
        ckpt.close()
        log.close()
        return result

    bar = _progress(total_steps, start, desc, progress)
    t0, tokens = time.perf_counter(), 0.0
    step = start
    last_saved = start if restored is not None else None
    try:
        while step < total_steps:
            batch = to_global(next(batcher), sharding)
            state, metrics = train_step(state, ref_params, batch)
            step += 1
            window.append(metrics)
            consecutive = int(state.opt_state.notfinite_count)
            if consecutive >= max_nonfinite or (consecutive and not params_finite(state.params)):
                why = (f"{consecutive} non-finite losses in a row at step {step} (limit "
                       f"train.max_nonfinite={max_nonfinite})" if consecutive >= max_nonfinite else
                       f"the parameters became non-finite at step {step}")
                kept = (f"the last good checkpoint (step {last_saved}) in {run_dir / 'checkpoints'} "
                        "is intact" if last_saved is not None else "no checkpoint was saved")
                raise TrainingDiverged(
                    f"{why}; no non-finite state is ever saved: {kept}. Lower "
                    "optim.learning_rate or loss.beta, or check the data.")
            if step % log_every == 0 or step == total_steps:
                host = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
                elapsed = max(time.perf_counter() - t0, 1e-9)
                tokens += host.pop("tokens", 0.0) * len(window)
                host["tokens_per_s"] = tokens / elapsed
                host["skipped_total"] = float(state.opt_state.total_notfinite)
                log.write(step, "train", host)
                result.last_logged = host
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
            if should_stop is not None and should_stop(step):
                stop.request()
            stop_now = stop.poll() is not None
            if (checkpoint_every and step % checkpoint_every == 0) or stop_now \
                    or step == total_steps:
                if params_finite(state.params):
                    log.flush()  # remote run folders: the rows up to this checkpoint, saved
                    data_state = dict(batcher.state())
                    data_state[_WINDOW_KEY] = [{k: float(v) for k, v in m.items()} for m in window]
                    ckpt.save(step, state, data_state, evaluated, force=True)
                    last_saved = step
                else:
                    print(f"Step {step}: non-finite parameters, checkpoint not saved.", flush=True)
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


_WINDOW_KEY = "metrics_window"


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def params_finite(params) -> bool:
    """Every floating-point parameter is finite (one fused reduction on the devices)."""
    return bool(_all_finite(params))


def _progress(total: int, start: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, mininterval=1.0)


def tree_copy(tree):
    """Fresh buffers (so donating the policy never invalidates the frozen reference)."""
    return jax.tree.map(jnp.copy, tree)
