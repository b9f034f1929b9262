"""Small array operations shared by the model and the loss head (imports only JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_matmul(x: jax.Array, w: jax.Array, *, lead: int = 2, preferred_element_type=None) -> jax.Array:
    """``x [*L, *C] @ w [*C, *O] -> [*L, *O]``: contract the trailing dims of ``x`` after its
    ``lead`` leading (token) dims with the leading dims of ``w``, on ``x`` flattened to one token
    dim. The same numbers as ``einsum("bt...,...o->bto")``, but the weight gradient contracts over
    one dimension: XLA:CPU otherwise transposes the ``[B, T, out]`` cotangent (a strided copy of an
    activation-sized array, per layer and projection) to contract over ``(B, T)``. On the 2-core
    CPU this made the SmolLM2-shaped MLP's forward + backward at 3 x 1024 tokens 1.4x faster.

    >>> token_matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5, 6))).shape
    (2, 3, 5, 6)
    >>> token_matmul(jnp.ones((2, 3, 4, 5)), jnp.ones((4, 5, 7))).shape
    (2, 3, 7)
    """
    lead_shape = x.shape[:lead]
    contract = x.ndim - lead
    if w.shape[:contract] != x.shape[lead:]:
        raise ValueError(f"token_matmul: x {x.shape} (lead {lead}) does not contract with w {w.shape}")
    flat = x.reshape(-1, *x.shape[lead:])
    out = jax.lax.dot_general(flat, w, ((tuple(range(1, contract + 1)), tuple(range(contract))), ((), ())),
                              preferred_element_type=preferred_element_type)
    return out.reshape(*lead_shape, *out.shape[1:])
