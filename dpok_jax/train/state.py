"""The train state pytree and the optimizer.

`TrainState.params` is `{"policy": nnx.State of the Llama's nnx.Param leaves, "kernel": HMK or
mixture logits (empty dict without a mixture)}`. The optimizer is one optax chain: global-norm
clipping, then `optax.multi_transform` (AdamW with warmup + cosine decay for the policy; Adam at its
own learning rate for the kernel weights), wrapped in `optax.apply_if_finite` so a step with a
non-finite loss or gradient changes nothing and is counted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

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
