"""The train state pytree and the optimizer.

`TrainState.params` is `{"policy": nnx.State of the Llama's nnx.Param leaves, "kernel": HMK or
mixture logits (empty dict without a mixture)}`. The optimizer is one optax chain: global-norm
clipping, then `optax.multi_transform` (AdamW with warmup + cosine decay for the policy; Adam at its
own learning rate for the kernel weights), wrapped in `optax.apply_if_finite` so a step with a
non-finite loss or gradient changes nothing and is counted.

On a mesh the whole state is sharded by `dpok_jax.sharding`'s rules (`state_shardings`): Adam's
moments like their parameters (ZeRO-3 with ``fsdp``), counters and the rng replicated. `init_sharded`
creates it directly in those shardings; `jit_train_step` jits a step with them and with the
activation constraints of the model resolved on the mesh.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpok_jax import sharding as sharding_lib

# Far above any `train.max_nonfinite`: the loop, not optax, decides when to stop.
_OPTAX_MAX_NONFINITE = 1_000_000


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates attempted
    params: Any  # {"policy": nnx.State, "kernel": dict}
    opt_state: Any
    rng: jax.Array  # uint32 key data [2]


def make_optimizer(
    *,
    learning_rate: float,
    kernel_learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float,
    b1: float,
    b2: float,
    clip_norm: float,
) -> optax.GradientTransformation:
    """Clip, then AdamW (policy) / Adam (kernel weights), skipping non-finite updates."""
    total = max(int(total_steps), 1)
    warmup = min(int(warmup_steps), total - 1) if total > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup > 0 else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=learning_rate * 0.1,
    )
    # Decay matrices only: norms' scales are not shrunk toward 0.
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)  # noqa: E731
    policy_tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    kernel_tx = optax.adam(kernel_learning_rate, b1=b1, b2=b2)

    def labels(params):
        return {
            "policy": jax.tree.map(lambda _: "policy", params["policy"]),
            "kernel": jax.tree.map(lambda _: "kernel", params["kernel"]),
        }

    inner = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.multi_transform({"policy": policy_tx, "kernel": kernel_tx}, labels),
    )
    return optax.apply_if_finite(inner, _OPTAX_MAX_NONFINITE)


def init_train_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def nonfinite_counts(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """(consecutive, total) skipped steps, from optax.apply_if_finite's state."""
    return state.opt_state.notfinite_count, state.opt_state.total_notfinite


def train_params_shardings(mesh: Mesh, policy_shardings: Any, kernel_params: Any) -> dict:
    """Shardings of `TrainState.params`: the policy's from the rules, kernel weights replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return {"policy": policy_shardings, "kernel": jax.tree.map(lambda _: replicated, kernel_params)}


def state_shardings(mesh: Mesh, params: dict, policy_shardings: Any, tx: optax.GradientTransformation,
                    seed: int = 0) -> TrainState:
    """The `TrainState` of ``params`` (concrete or abstract) as a tree of NamedShardings; nothing is
    computed (`jax.eval_shape`)."""
    abstract = jax.eval_shape(lambda prm: init_train_state(prm, tx, seed), params)
    return sharding_lib.train_state_shardings(
        mesh, abstract, train_params_shardings(mesh, policy_shardings, params["kernel"]))


def init_sharded(params: dict, tx: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
    """`init_train_state` in one jit whose outputs are born in ``shardings`` (no replicated moments,
    not even transiently)."""
    return jax.jit(lambda prm: init_train_state(prm, tx, seed), out_shardings=shardings)(params)


class BoundStep:
    """A jitted step with its last arguments bound (the fitted kernel arrays, already on the
    devices): called and lowered like the step without them, e.g. ``step(state, ref_params,
    batch)`` and ``step.lower(state, ref_params, batch)``. The bound values are arguments of the
    compiled program, not constants in it: any values of the same shapes share one executable."""

    def __init__(self, jitted: Callable, *bound: Any):
        self.jitted = jitted
        self.bound = bound

    def __call__(self, *args):
        return self.jitted(*args, *self.bound)

    def lower(self, *args):
        return self.jitted.lower(*args, *self.bound)


def replicated_args(mesh: Mesh, kernel_arrays: Any) -> tuple[tuple, tuple]:
    """``((kernel_arrays on every device of mesh,), (their shardings,))``; ``((), ())`` for None
    (no kernel: the step keeps its three arguments)."""
    if kernel_arrays is None:
        return (), ()
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, kernel_arrays)
    return (jax.device_put(kernel_arrays, shardings),), (shardings,)


def jit_train_step(step_fn: Callable, mesh: Mesh, shardings: TrainState, ref_shardings: Any,
                   batch_sharding: NamedSharding, kernel_arrays: Any = None) -> BoundStep:
    """``step_fn(state, ref_params, batch[, kernel_arrays]) -> (state, metrics)`` jitted on
    ``mesh``: explicit in/out shardings (the same before and after a step, so it never retraces),
    the state donated, and the model's activation constraints (`dpok_jax.sharding.constrain`)
    active while tracing. ``kernel_arrays`` (`step.split_kernel_params`), replicated, are bound as
    the step's last argument: steps that differ only in fitted values compile to one program."""
    bound, bound_shardings = replicated_args(mesh, kernel_arrays)

    def traced(state, ref_params, batch, *kernel):
        with sharding_lib.activation_mesh(mesh):
            return step_fn(state, ref_params, batch, *kernel)

    jitted = jax.jit(traced, in_shardings=(shardings, ref_shardings, batch_sharding, *bound_shardings),
                     out_shardings=(shardings, None), donate_argnums=(0,))
    return BoundStep(jitted, *bound)
