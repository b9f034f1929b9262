"""Causal grouped-query attention through `jax.nn.dot_product_attention`, the kernel chosen by platform.

``out[b, t, n] = Σ_s softmax_s(q[b,t,n]·k[b,s,n//G] / sqrt(D) | mask[b,t,s]) v[b,s,n//G]`` with
``G = N / K`` query heads per kv head (grouped-query attention, HF's ``repeat_kv`` without copies).

Implementations (`implementation_for`):

- ``"xla"`` (CPU, TPU, and GPU in float32): JAX's reference lowering. It materializes the
  ``[B, N, T, S]`` scores of one layer (float32); with per-layer rematerialization only one layer's
  are alive at a time. This is the path the tests check against a float64 NumPy reference.
- ``"cudnn"`` (GPU, bfloat16/float16 compute): cuDNN's fused flash attention, which never holds the
  scores. The padding mask enters as cuDNN's additive bias. Only tried on a GPU backend; a
  configuration cuDNN rejects while tracing (head size, dtype, cuDNN version) falls back to XLA
  with a warning. No GPU was available where this was written: its numerics are checked by
  ``tests/models/test_attention.py::test_cudnn_matches_xla``, which runs only on a GPU.
- TPU stays on XLA: a Pallas flash/splash kernel would need its numerics tested on a TPU (or in
  Pallas' interpret mode), which this package does not do yet.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def implementation_for(platform: str, dtype) -> str:
    """The `jax.nn.dot_product_attention` implementation for a backend ``platform`` and compute dtype.

    >>> implementation_for("cpu", jnp.bfloat16), implementation_for("tpu", jnp.bfloat16)
    ('xla', 'xla')
    >>> implementation_for("gpu", jnp.bfloat16), implementation_for("gpu", jnp.float32)
    ('cudnn', 'xla')
    """
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in tuple(jnp.dtype(d) for d in _CUDNN_DTYPES):
        return "cudnn"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          implementation: str | None = None) -> jax.Array:
    """GQA attention, causal with a key padding mask (2-D ``mask``) or under an explicit mask (3-D).

    Args:
      q: ``[B, T, N, D]`` queries (rotary already applied).
      k, v: ``[B, S, K, D]`` keys and values, ``N % K == 0``.
      mask: ``[B, S]`` bool, True on real key tokens (left or right padding), with the causal mask
        implied (``T == S``); or ``[B, T, S]`` bool, True where query ``t`` may attend key ``s``
        (nothing implied: a KV cache, say).
      implementation: ``"xla"`` or ``"cudnn"``; default `implementation_for` the default backend.

    Returns:
      ``[B, T, N, D]`` in ``q``'s dtype. A query row with no visible key (a left-padding position)
      is finite and meaningless, as every padded position's output.
    """
    if implementation is None:
        implementation = implementation_for(jax.default_backend(), q.dtype)
    mask = mask.astype(bool)
    if mask.ndim == 2:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"a [B, S] key mask implies causal self-attention: T={q.shape[1]} != S={k.shape[1]}")
        mask, is_causal = mask[:, None, None, :], True  # [B, 1, 1, S]
    elif mask.ndim == 3:
        mask, is_causal = mask[:, None, :, :], False  # [B, 1, T, S]
    else:
        raise ValueError(f"attention mask must be [B, S] or [B, T, S], got shape {mask.shape}")
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as err:  # rejected while tracing
            warnings.warn(f"cuDNN attention unavailable for q {q.shape} {q.dtype} ({err}); using XLA",
                          stacklevel=2)
    elif implementation != "xla":
        raise ValueError(f"attention implementation must be 'xla' or 'cudnn', got {implementation!r}")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")
