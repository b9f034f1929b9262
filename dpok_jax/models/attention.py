"""Causal grouped-query attention: XLA, cuDNN or a Pallas TPU kernel, chosen by platform and shape.

``out[b, t, n] = Σ_s softmax_s(q[b,t,n]·k[b,s,n//G] / sqrt(D) | mask[b,t,s]) v[b,s,n//G]`` with
``G = N / K`` query heads per kv head (grouped-query attention, HF's ``repeat_kv`` without copies).

Implementations (`implementation_for`, the rule; `dot_product_attention` applies it):

- ``"xla"`` (CPU, GPU in float32, TPU where splash does not apply): plain XLA. Causal
  self-attention longer than one block (``CAUSAL_BLOCK`` = 128 query positions) runs **blocked**:
  query block ``i`` is scored against keys ``0 .. end of block i`` only (the later keys are masked
  anyway), with the heads laid out ``[B, K, G, T, D]`` so each block is one batched matmul. Exact
  (the same softmax over the same visible keys) at about half the score FLOPs; at 512 positions on
  the 2-core CPU (blocks of 128) it measured 2.4x faster forward and 1.8x forward+backward than
  `jax.nn.dot_product_attention`'s XLA lowering (16 rows, 8/4 heads of 32). Shorter or non-causal
  attention goes through `jax.nn.dot_product_attention` (implementation ``"xla"``), which
  materializes the ``[B, N, T, S]`` scores of one layer. Both are checked against a float64 NumPy
  reference.
- ``"cudnn"`` (GPU, bfloat16/float16 compute): cuDNN's fused flash attention, which never holds the
  scores. The padding mask enters as cuDNN's additive bias. Only tried on a GPU backend; a
  configuration cuDNN rejects while tracing (head size, dtype, cuDNN version) falls back to XLA
  with a warning. No GPU was available where this was written: its numerics are checked by
  ``tests/models/test_attention.py::test_cudnn_matches_xla``, which runs only on a GPU.
- ``"splash"`` (TPU): JAX's Pallas splash attention kernel (`dpok_jax.models.splash_attention`),
  flash attention that never holds the scores and skips key blocks above the causal diagonal. Taken
  when the mask is expressible as segment ids (a ``[B, S]`` key padding mask, or packed rows whose
  ``segment_ids`` are passed), the self-attention is at least ``SPLASH_MIN_LEN`` = 128 positions
  long, and XLA does not have to partition the kernel (one device, or an
  `dpok_jax.sharding.activation_mesh` to `jax.shard_map` it over); XLA otherwise. Checked against
  the XLA path in Pallas' interpreter on CPU (forward and gradients), never on a TPU here.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from dpok_jax import sharding as sharding_lib
from dpok_jax.models.splash_attention import splash_attention

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CAUSAL_BLOCK = 128  # query positions per block of the blocked causal XLA path
SPLASH_MIN_LEN = 128  # shorter self-attention stays on XLA on TPU (less than one kernel block)
IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def implementation_for(platform: str, dtype, *, causal_len: int | None = None,
                       partitionable: bool = True) -> str:
    """The attention implementation for a backend ``platform``, compute dtype and attention shape.

    Args:
      platform: ``jax.default_backend()``: ``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``.
      dtype: the compute dtype of q/k/v.
      causal_len: the length ``T`` of causal self-attention whose mask is expressible as segment
        ids (a ``[B, S]`` key padding mask, or packed rows with their ``segment_ids``); None for any
        other mask (an explicit ``[B, T, S]`` mask alone, cross-attention).
      partitionable: False when several devices may hold the inputs and no
        `dpok_jax.sharding.activation_mesh` says how to `jax.shard_map` a Pallas kernel over them
        (XLA cannot partition one).

    Returns:
      ``"splash"`` on TPU when ``causal_len >= SPLASH_MIN_LEN`` and ``partitionable``; ``"cudnn"``
      on GPU in bfloat16/float16; ``"xla"`` otherwise (always on CPU).

    >>> implementation_for("cpu", jnp.bfloat16, causal_len=2048), implementation_for("tpu", jnp.bfloat16)
    ('xla', 'xla')
    >>> implementation_for("tpu", jnp.bfloat16, causal_len=2048)
    'splash'
    >>> implementation_for("tpu", jnp.float32, causal_len=64)  # shorter than one kernel block
    'xla'
    >>> implementation_for("gpu", jnp.bfloat16), implementation_for("gpu", jnp.float32)
    ('cudnn', 'xla')
    """
    if platform == "tpu":
        long_enough = causal_len is not None and causal_len >= SPLASH_MIN_LEN
        return "splash" if long_enough and partitionable else "xla"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in tuple(jnp.dtype(d) for d in _CUDNN_DTYPES):
        return "cudnn"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          implementation: str | None = None, causal: bool = False,
                          block_size: int | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """GQA attention, causal with a key padding mask (2-D ``mask``) or under an explicit mask (3-D).

    Args:
      q: ``[B, T, N, D]`` queries (rotary already applied).
      k, v: ``[B, S, K, D]`` keys and values, ``N % K == 0``.
      mask: ``[B, S]`` bool, True on real key tokens (left or right padding), with the causal mask
        implied (``T == S``); or ``[B, T, S]`` bool, True where query ``t`` may attend key ``s``
        (nothing implied: a KV cache, say).
      implementation: ``"xla"``, ``"cudnn"`` or ``"splash"``; default `implementation_for` the
        default backend and these shapes. ``"splash"`` off TPU runs in Pallas' interpreter (tests).
      causal: with a 3-D mask, promise that it never lets a query see a later key (packed rows'
        block-diagonal causal mask), so the XLA path may run blocked. Implied by a 2-D mask.
      block_size: query positions per block of the blocked XLA path (default ``CAUSAL_BLOCK``), or
        query and key positions per block of the splash kernel (a multiple of 128; default
        `dpok_jax.models.splash_attention.splash_block`).
      segment_ids: ``[B, T]`` int, packed rows' segment ids (0 = padding) from which the 3-D
        ``mask`` was built as ``same segment & key id > 0 & causal``: a promise that lets the
        splash kernel take the row. Ignored by the XLA and cuDNN paths, which read ``mask``.

    Returns:
      ``[B, T, N, D]`` in ``q``'s dtype. A query row with no visible key (a left-padding position)
      is finite and meaningless, as every padded position's output.
    """
    mask = mask.astype(bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"attention mask must be [B, S] or [B, T, S], got shape {mask.shape}")
    if mask.ndim == 2 and q.shape[1] != k.shape[1]:
        raise ValueError(f"a [B, S] key mask implies causal self-attention: T={q.shape[1]} != S={k.shape[1]}")
    kernel_segments = _kernel_segment_ids(q, k, mask, segment_ids)
    if implementation is None:
        platform = jax.default_backend()
        partitionable = jax.device_count() == 1 or sharding_lib._ACTIVATION_MESH.get() is not None
        implementation = implementation_for(
            platform, q.dtype, causal_len=None if kernel_segments is None else q.shape[1],
            partitionable=partitionable)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "splash":
        if kernel_segments is None:
            raise ValueError("the splash kernel needs a [B, S] key mask or packed rows' segment_ids")
        return splash_attention(q, k, v, kernel_segments, block_size=block_size,
                                interpret=jax.default_backend() != "tpu")
    if mask.ndim == 2:
        mask, is_causal = mask[:, None, None, :], True  # [B, 1, 1, S]
    else:
        mask, is_causal = mask[:, None, :, :], False  # [B, 1, T, S]
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as err:  # rejected while tracing
            warnings.warn(f"cuDNN attention unavailable for q {q.shape} {q.dtype} ({err}); using XLA",
                          stacklevel=2)
    block = CAUSAL_BLOCK if block_size is None else int(block_size)
    if (is_causal or causal) and q.shape[1] == k.shape[1] and q.shape[1] > block:
        allowed = mask[:, 0]  # [B, T, S], or [B, 1, S] key padding to combine with causality
        if is_causal:
            allowed = allowed & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None]
        return _blocked_causal(q, k, v, allowed, block)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


def _kernel_segment_ids(q: jax.Array, k: jax.Array, mask: jax.Array,
                        segment_ids: jax.Array | None) -> jax.Array | None:
    """``[B, T]`` segment ids that express ``mask`` for the splash kernel, or None when it has none.
    A key padding mask is segment 1 (real) and 0 (padding): a real query sees the real keys at or
    before it, as under the mask; a padding query sees padding keys (meaningless either way)."""
    if mask.ndim == 2:
        return mask.astype(jnp.int32)
    if segment_ids is None:
        return None
    if q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids {segment_ids.shape} are for packed self-attention: "
                         f"q {q.shape}, k {k.shape}")
    return segment_ids


def _blocked_causal(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, block: int) -> jax.Array:
    """Exact causal attention by query blocks: block ``[i0, i1)`` against keys ``[0, i1)``.
    q [B,T,N,D], k/v [B,T,K,D], allowed [B,T,T] bool (already causal). A query row with no
    visible key gets a finite, meaningless output (as every padded position)."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    qt = jnp.transpose(q.reshape(b, t, kv, n // kv, d), (0, 2, 3, 1, 4))  # [B, K, G, T, D]
    kt, vt = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))  # [B, K, T, D]
    scale = d ** -0.5
    outs = []
    for i0 in range(0, t, block):
        i1 = min(i0 + block, t)
        s = jnp.einsum("bkgtd,bksd->bkgts", qt[:, :, :, i0:i1], kt[:, :, :i1],
                       preferred_element_type=jnp.float32) * scale
        s = jnp.where(allowed[:, None, None, i0:i1, :i1], s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", p, vt[:, :, :i1]))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, d)
