"""Causal grouped-query attention through JAX's Pallas splash attention kernel (the TPU path).

``out[b, t, n] = Σ_{s ≤ t, seg[b,s] = seg[b,t]} softmax_s(q[b,t,n]·k[b,s,n//G] / sqrt(D)) v[b,s,n//G]``:
causal self-attention within segments, the mask `dpok_jax.models.attention.dot_product_attention`
otherwise builds as a ``[B, T, T]`` boolean. The kernel is JAX's own
(`jax.experimental.pallas.ops.tpu.splash_attention`, as MaxText uses it): flash attention that never
holds the scores, skips the key blocks above the causal diagonal, and takes GQA natively (``N``
query heads on ``K`` kv heads, ``N % K == 0``). Segment ids carry both the packing and the padding:

- a ``[B, S]`` key padding mask becomes segment ids ``mask.astype(int32)`` (1 real, 0 padding). A
  real query then sees exactly the real keys at or before it; a padding query sees padding keys at
  or before it, itself included (finite and meaningless, as every padded position's output);
- packed rows' ids are used as they are (0 = padding after the last segment).

Sequences that are not a multiple of the 128-wide block are padded at the end up to one (the later
positions are invisible to every real query under the causal mask) and the output sliced back.

Under `dpok_jax.sharding.activation_mesh` the kernel runs inside `jax.shard_map` (XLA cannot
partition a Pallas call): batch over the activation batch axes, heads over ``tensor`` when both the
query and kv heads divide, otherwise heads whole on each device. Off TPU it runs in Pallas' interpreter
(the tests' path), with the same blocks and masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from dpok_jax import sharding as sharding_lib

LANES = 128  # the kernel's blocks are multiples of 128 positions
SPLASH_BLOCKS = (512, 256, LANES)  # the default block: the largest that divides the (padded) length
_BTND = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_BTKD = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


def padded_length(seq_len: int) -> int:
    """``seq_len`` rounded up to a multiple of 128, the length the kernel runs at.

    >>> padded_length(128), padded_length(200), padded_length(2048)
    (128, 256, 2048)
    """
    return -(-seq_len // LANES) * LANES


def splash_block(seq_len: int, block_size: int | None = None) -> int:
    """Query and key positions per block of the kernel for a sequence of ``seq_len`` positions.

    >>> splash_block(2048), splash_block(768), splash_block(200), splash_block(512, 128)
    (512, 256, 256, 128)
    """
    length = padded_length(seq_len)
    if block_size is None:
        return next(b for b in SPLASH_BLOCKS if length % b == 0)
    if block_size % LANES or length % block_size:
        raise ValueError(f"splash attention block {block_size} must be a multiple of {LANES} dividing "
                         f"the padded length {length}")
    return int(block_size)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     block_size: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal GQA self-attention within segments by the splash kernel.

    Args:
      q: ``[B, T, N, D]`` queries (rotary already applied).
      k, v: ``[B, T, K, D]`` keys and values, ``N % K == 0``.
      segment_ids: ``[B, T]`` int; a query attends the keys at or before it with its own id.
      block_size: positions per query and key block (default `splash_block`).
      interpret: run the kernel in Pallas' interpreter (required off TPU).

    Returns:
      ``[B, T, N, D]`` in ``q``'s dtype.
    """
    b, t, n, d = q.shape
    if k.shape != (b, t, k.shape[2], d) or v.shape != k.shape or n % k.shape[2]:
        raise ValueError(f"splash attention is self-attention with N % K == 0: q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    block = splash_block(t, block_size)
    segment_ids = segment_ids.astype(jnp.int32)

    def local(q, k, v, seg):  # one device's rows and heads
        return _splash_rows(q, k, v, seg, block=block, interpret=interpret)

    return sharding_lib.shard_attention(local, q, k, v, segment_ids, q_axes=_BTND, kv_axes=_BTKD)


def _splash_rows(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, *, block: int,
                 interpret: bool) -> jax.Array:
    """The kernel on local arrays: q [B,T,N,D], k/v [B,T,K,D], seg [B,T] -> [B,T,N,D]."""
    t, n, d = q.shape[1], q.shape[2], q.shape[3]
    length = padded_length(t)
    if length != t:  # later positions: invisible to every earlier query under the causal mask
        pad = ((0, 0), (0, length - t), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, length - t)))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * n)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    qh = jnp.swapaxes(q * jnp.asarray(d ** -0.5, q.dtype), 1, 2)  # [B, N, T, D]; the kernel does not scale
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, T, D]
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(qh, kh, vh, seg)
    return jnp.swapaxes(out, 1, 2)[:, :t]  # [B, T, N, D]
