"""Orbax checkpoints of a run: the train state, the data position and the step's metrics.

Async saves; the last `keep` checkpoints and the best one by held-out accuracy are kept
(`AnyPreservationPolicy(LatestN, BestN)`). Restoring goes straight into the target shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from dpok_jax import storage

BEST_METRIC = "eval/accuracy"


_DISTRIBUTED_BARRIER_FLAG = "experimental_orbax_use_distributed_barrier"


def use_distributed_barriers() -> None:
    """Make orbax synchronize processes through JAX's coordination service, not device collectives.

    By default orbax's barriers are `sync_global_devices`, a tiny collective computation. Its
    checkpoint manager runs some of them on a background thread after an async save, where they
    interleave with the training step's own collectives in a different order on each process: the
    collectives then mismatch (on CPU, gloo aborts with "Received data size doesn't match expected
    size"). Orbax's absl flag switches its barriers to the distributed client's `wait_at_barrier`.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # Parsing only this flag (the others keep their defaults), as absl.app would at start-up.
        flags.FLAGS(["dpok", f"--{_DISTRIBUTED_BARRIER_FLAG}"], known_only=True)
    else:
        setattr(flags.FLAGS, _DISTRIBUTED_BARRIER_FLAG, True)


class RunCheckpoints:
    """Checkpoints under `RUN_DIR/checkpoints/<step>/{state,data}`."""

    def __init__(self, directory: epath.PathLike, *, keep: int, async_save: bool = True):
        if jax.process_count() > 1:
            use_distributed_barriers()
        self.directory = storage.run_path(directory)  # local: absolute; gs://...: as given
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=max(int(keep), 1)),
            pp.BestN(get_metric_fn=lambda m: m.get(BEST_METRIC, float("-inf")), n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, metrics: dict | None = None,
             *, force: bool = False) -> bool:
        """Queue an async save; `metrics` (scalars) feed the best-checkpoint policy."""
        clean = None
        if metrics:
            clean = {k: float(v) for k, v in metrics.items() if _is_scalar(v)}
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_state)),
            metrics=clean, force=force,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restore into the shapes, dtypes and shardings of `target` (a concrete or abstract state)."""
        abstract = jax.tree.map(_abstract, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                          data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
        """`(step, state, data)` of the newest checkpoint that reads back, or None if there is none.

        A checkpoint whose files are damaged (a disk error, a copy cut short) is moved aside to
        `RUN_DIR/checkpoints_damaged/<step>` with a message, and the previous one is tried.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, target)
                return int(step), state, data
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                moved = self._set_aside(step)
                print(f"Checkpoint {step} in {self.directory} cannot be read ({reason}); moved to "
                      f"{moved}; falling back to the previous checkpoint.", flush=True)
        return None

    def _set_aside(self, step: int) -> epath.Path:
        damaged = self.directory.parent / f"{self.directory.name}_damaged"
        target = damaged / str(step)
        if jax.process_index() == 0:
            damaged.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = damaged / f"{step}-{len(list(damaged.iterdir()))}"
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dpok_set_aside_{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) or (hasattr(v, "shape") and v.shape == ())


def restore_policy(directory: epath.PathLike) -> tuple[int, dict]:
    """`(step, nested dict of numpy arrays)`: only the policy's parameters (no optimizer state; orbax
    partial restore) of the newest checkpoint under `directory` that reads back (a damaged one is
    skipped with a message), placed on this machine's first device whatever mesh wrote it. Raises if
    there is none, or if its weights are not all finite."""
    ckpt_dir = storage.run_path(directory)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                       "data": ocp.JsonCheckpointHandler()})
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        for step in steps:
            try:
                meta = manager.item_metadata(step)["state"]
                policy_meta = meta["params"]["policy"]
                abstract = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                    policy_meta)
                item = {"params": {"policy": abstract}}
                restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True)))
            except Exception as err:  # damaged files: orbax/tensorstore raise many types
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                print(f"Checkpoint {step} in {ckpt_dir} cannot be read ({reason}); trying the "
                      "previous one.", flush=True)
                continue
            policy = jax.tree.map(np.asarray, _unwrap_values(restored["state"]["params"]["policy"]))
            bad = sum(int(np.size(x) - np.isfinite(x).sum()) for x in jax.tree.leaves(policy)
                      if np.issubdtype(np.asarray(x).dtype, np.floating))
            if bad:
                raise ValueError(f"checkpoint {step} in {ckpt_dir} holds {bad} non-finite weights: "
                                 "refusing to export a broken model")
            return int(step), policy
        raise FileNotFoundError(f"no readable checkpoint in {ckpt_dir} (tried steps {steps})")
    finally:
        manager.close()


def _unwrap_values(tree):
    """Restores without an NNX target keep variables as `{"value": array}`; the pure dict has arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree
