"""The supervised warm-up that turns the initial model into the reference (`sft.steps > 0`).

Token-mean NLL of the chosen responses (`sft.responses=chosen`) or of both (`both`), AdamW with a
short warm-up and cosine decay, global-norm clipping. The step is jitted with explicit in and out
shardings (parameters and their Adam moments as the rules table places the parameters, the batch over
the batch axes), so its outputs feed the train step on any mesh and any number of processes.

Crash safety: progress is checkpointed to `RUN_DIR/sft_checkpoints` every `train.checkpoint_every`
steps and on SIGINT/SIGTERM (then `Interrupted` is raised); the same command resumes the warm-up
exactly. The finished reference goes to `RUN_DIR/reference` and later runs load it from there.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from dpok_jax import config as config_lib
from dpok_jax import storage
from dpok_jax.train.checkpoint import RunCheckpoints
from dpok_jax.train.interrupts import Interrupted, StopRequest
from dpok_jax.train.loop import TrainingDiverged, params_finite, to_global, tree_copy
from dpok_jax.train.step import ModelFns, make_sft_step

REFERENCE_DIR = "reference"
PROGRESS_DIR = "sft_checkpoints"


def sft_optimizer(sft: config_lib.SFTSection, clip_norm: float) -> optax.GradientTransformation:
    """Clipping, then AdamW with a linear warm-up (a tenth of the steps, at most 10) and cosine decay."""
    total = max(sft.steps, 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=sft.learning_rate, warmup_steps=min(10, total // 10),
        decay_steps=total, end_value=sft.learning_rate * 0.1)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0),
    )


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                        mesh) -> Any:
    """Shardings of `tx.init(params)`: moments like their parameters, everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract, param_shardings,
        transform_non_params=lambda _: replicated,
    )


def sft_warmup(*, cfg: config_lib.Config, fns: ModelFns, init_params: Any, param_shardings: Any,
               batch_sharding: NamedSharding, batcher, run_dir: epath.PathLike, stop: StopRequest) -> Any:
    """The reference parameters: loaded from `RUN_DIR/reference`, or trained (resuming if it was
    interrupted) and saved there. Raises `Interrupted` after saving progress on a signal."""
    run_dir = storage.run_path(run_dir)
    done = RunCheckpoints(run_dir / REFERENCE_DIR, keep=1, async_save=False)
    restored = done.restore_latest(init_params)
    done.close()
    if restored is not None:
        print(f"Reference (SFT warm-up) loaded from {run_dir / REFERENCE_DIR}.", flush=True)
        return restored[1]

    mesh = batch_sharding.mesh
    tx = sft_optimizer(cfg.sft, cfg.optim.clip_norm)
    opt_shardings = opt_state_shardings(tx, init_params, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(make_sft_step(fns, tx, cfg.loss.chunk_size, responses=cfg.sft.responses),
                      in_shardings=(param_shardings, opt_shardings, batch_sharding),
                      out_shardings=(param_shardings, opt_shardings, replicated),
                      donate_argnums=(0, 1))
    params = tree_copy(init_params)  # the initial parameters stay valid (donation)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

    progress = RunCheckpoints(run_dir / PROGRESS_DIR, keep=1)
    start = 0
    resumed = progress.restore_latest({"params": params, "opt_state": opt_state})
    if resumed is not None:
        start, tree, data_state = resumed
        params, opt_state = tree["params"], tree["opt_state"]
        batcher.restore(data_state)
        print(f"SFT warm-up resumed at step {start} of {cfg.sft.steps}.", flush=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.sft.steps, initial=start, desc="sft warm-up", dynamic_ncols=True,
               disable=not cfg.train.progress or jax.process_index() != 0, mininterval=1.0)
    loss = float("nan")
    every = cfg.train.checkpoint_every
    try:
        for step in range(start + 1, cfg.sft.steps + 1):
            params, opt_state, loss = step_fn(params, opt_state, to_global(next(batcher), batch_sharding))
            bar.update(1)
            if step % cfg.train.log_every == 0:
                bar.set_postfix(nll=f"{float(loss):.4f}")
            stopping = stop.poll() is not None
            if (every and step % every == 0) or stopping:
                if not params_finite(params):
                    raise TrainingDiverged(
                        f"SFT warm-up: non-finite parameters at step {step} (nothing saved); lower "
                        "sft.learning_rate")
                progress.save(step, {"params": params, "opt_state": opt_state}, batcher.state(),
                              force=True)
            if stopping:
                progress.close()
                raise Interrupted(stop.signum, f"the SFT warm-up (saved at step {step} of "
                                               f"{cfg.sft.steps}; the same command resumes it)")
    finally:
        bar.close()
        progress.close()
    if not params_finite(params):
        raise TrainingDiverged("SFT warm-up ended with non-finite parameters (nothing saved); lower "
                               "sft.learning_rate")
    print(f"SFT warm-up: {cfg.sft.steps} steps, final token NLL {float(loss):.4f}.", flush=True)
    done = RunCheckpoints(run_dir / REFERENCE_DIR, keep=1, async_save=False)
    done.save(0, params, {"sft_steps": cfg.sft.steps}, force=True)
    done.close()
    if jax.process_index() == 0:
        try:  # best effort, as before: the finished reference is already saved
            (run_dir / PROGRESS_DIR).rmtree(missing_ok=True)
        except OSError:
            pass
    return params
