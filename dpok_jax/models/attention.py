"""Causal grouped-query attention: XLA, cuDNN or a Pallas TPU kernel, chosen by platform and shape.

``out[b, t, n] = Σ_s softmax_s(q[b,t,n]·k[b,s,n//G] / sqrt(D) | mask[b,t,s]) v[b,s,n//G]`` with
``G = N / K`` query heads per kv head (grouped-query attention, HF's ``repeat_kv`` without copies).

Implementations (`implementation_for`, the rule; `dot_product_attention` applies it):

- ``"xla"`` (CPU, GPU in float32, TPU where splash does not apply): plain XLA. On CPU, causal
  self-attention longer than one block under a key mask or packed rows' vectors runs
  `tiled_causal` (one row at a time, all its heads per tile, key windows from the segment
  starts, a flash-style custom VJP). Elsewhere causal
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

import functools
import warnings

import jax
import jax.numpy as jnp

from dpok_jax import sharding as sharding_lib
from dpok_jax.models.splash_attention import _BTKD, _BTND, splash_attention

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
                          block_size: int | None = None, segment_ids: jax.Array | None = None,
                          branch_ids: jax.Array | None = None) -> jax.Array:
    """GQA attention, causal with a key padding mask (2-D ``mask``) or under an explicit mask (3-D).

    Args:
      q: ``[B, T, N, D]`` queries (rotary already applied).
      k, v: ``[B, S, K, D]`` keys and values, ``N % K == 0``.
      mask: ``[B, S]`` bool, True on real key tokens (left or right padding), with the causal mask
        implied (``T == S``), and with ``segment_ids`` the within-segment rule below; or
        ``[B, T, S]`` bool, True where query ``t`` may attend key ``s`` (nothing implied: a KV
        cache, say).
      implementation: ``"xla"``, ``"cudnn"`` or ``"splash"``; default `implementation_for` the
        default backend and these shapes. ``"splash"`` off TPU runs in Pallas' interpreter (tests).
      causal: with a 3-D mask, promise that it never lets a query see a later key (packed rows'
        block-diagonal causal mask), so the XLA path may run blocked. Implied by a 2-D mask.
      block_size: query positions per block of the blocked XLA path (default ``CAUSAL_BLOCK``), or
        query and key positions per block of the splash kernel (a multiple of 128; default
        `dpok_jax.models.splash_attention.splash_block`).
      segment_ids: ``[B, T]`` int, packed rows' segment ids (0 = padding). With a 2-D ``mask``
        they are part of the mask: query ``t`` sees key ``s <= t`` only when both are in one segment
        (and the key is real); the XLA path then builds each query block's mask from these vectors
        instead of reading a materialized ``[B, T, S]`` one. With a 3-D ``mask`` they are a
        promise that it was built as ``same segment & key id > 0 & causal``, which lets the splash
        kernel take the row; the XLA and cuDNN paths read ``mask`` then.
      branch_ids: ``[B, T]`` int, with ``segment_ids`` and a 2-D ``mask``: prefix-shared pairs
        (`dpok_jax.data.packing`), where a query sees a key of its segment only in branch 0 or in
        its own branch. Rows with branches never take the splash kernel.

    Returns:
      ``[B, T, N, D]`` in ``q``'s dtype. A query row with no visible key (a left-padding position)
      is finite and meaningless, as every padded position's output.
    """
    mask = mask.astype(bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"attention mask must be [B, S] or [B, T, S], got shape {mask.shape}")
    if mask.ndim == 2 and q.shape[1] != k.shape[1]:
        raise ValueError(f"a [B, S] key mask implies causal self-attention: T={q.shape[1]} != S={k.shape[1]}")
    if branch_ids is not None and (segment_ids is None or mask.ndim != 2):
        raise ValueError("branch_ids need segment_ids and a [B, S] key mask")
    rule = None  # packed rows given as vectors: (key mask, segment ids, branch ids)
    if mask.ndim == 2 and segment_ids is not None:
        if segment_ids.shape != mask.shape:
            raise ValueError(f"segment_ids {segment_ids.shape} must match the key mask {mask.shape}")
        rule = (mask & (segment_ids > 0), segment_ids, branch_ids)
    kernel_segments = _kernel_segment_ids(q, k, mask, segment_ids, rule)
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
    block = CAUSAL_BLOCK if block_size is None else int(block_size)
    t = q.shape[1]
    if implementation == "xla" and t > block and jax.default_backend() == "cpu" and (
            rule is not None or mask.ndim == 2):
        keys, segments, branch = rule if rule is not None else (mask, None, None)
        return tiled_causal(q, k, v, keys, segments, branch, block=block)
    if rule is not None and implementation == "xla" and t > block:
        return _blocked_causal(q, k, v, lambda i0, i1: _allowed_block(*rule, i0, i1), block)
    if rule is not None:  # one block, or cuDNN: the dense [B, T, S] mask
        mask, causal = _allowed_block(*rule, 0, t), True
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
    if (is_causal or causal) and t == k.shape[1] and t > block:
        if is_causal:  # a key padding mask: each block's mask from the [B, S] vector
            keys = mask[:, 0, 0]
            return _blocked_causal(q, k, v, lambda i0, i1: _allowed_block(keys, None, None, i0, i1), block)
        allowed = mask[:, 0]  # [B, T, S], already causal
        return _blocked_causal(q, k, v, lambda i0, i1: allowed[:, i0:i1, :i1], block)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


def _visible(tq, tk, key_real, seg_q=None, seg_k=None, br_q=None, br_k=None) -> jax.Array:
    """The packed-row mask rule, ``[..., Tq, Tk]`` bool from query-side ``[..., Tq]`` and key-side
    ``[..., Tk]`` vectors: causal (position ``tq >= tk``), onto real keys, within a segment when
    segment ids are given, and with branch ids only onto branch 0 or the query's own branch."""
    allowed = key_real[..., None, :] & (tq[..., :, None] >= tk[..., None, :])
    if seg_q is not None:
        allowed &= seg_q[..., :, None] == seg_k[..., None, :]
    if br_q is not None:
        allowed &= (br_k[..., None, :] == 0) | (br_k[..., None, :] == br_q[..., :, None])
    return allowed


def _allowed_block(keys: jax.Array, segments: jax.Array | None, branch: jax.Array | None,
                   i0: int, i1: int) -> jax.Array:
    """``[B, i1 - i0, i1]`` bool: may query ``t`` in ``[i0, i1)`` attend key ``s < i1`` (`_visible`
    on ``keys`` [B, S], ``segments`` / ``branch`` [B, T] or None). Built from the vectors, so XLA
    fuses it into the score computation instead of reading a ``[B, T, S]`` array."""
    q_side = lambda x: None if x is None else x[:, i0:i1]  # noqa: E731
    k_side = lambda x: None if x is None else x[:, :i1]  # noqa: E731
    return _visible(jnp.arange(i0, i1), jnp.arange(i1), keys[:, :i1], q_side(segments), k_side(segments),
                    q_side(branch), k_side(branch))


def _kernel_segment_ids(q: jax.Array, k: jax.Array, mask: jax.Array,
                        segment_ids: jax.Array | None, rule) -> jax.Array | None:
    """``[B, T]`` segment ids that express ``mask`` for the splash kernel, or None when it has none.
    A key padding mask is segment 1 (real) and 0 (padding): a real query sees the real keys at or
    before it, as under the mask; a padding query sees padding keys (meaningless either way).
    Packed rows given as vectors (``rule``) are their segment ids on real tokens, unless they have
    branches (prefix sharing), which segment ids cannot express."""
    if rule is not None:
        keys, segments, branch = rule
        return None if branch is not None else jnp.where(keys, segments, 0).astype(jnp.int32)
    if mask.ndim == 2:
        return mask.astype(jnp.int32)
    if segment_ids is None:
        return None
    if q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids {segment_ids.shape} are for packed self-attention: "
                         f"q {q.shape}, k {k.shape}")
    return segment_ids


def _blocked_causal(q: jax.Array, k: jax.Array, v: jax.Array, allowed_block, block: int) -> jax.Array:
    """Exact causal attention by query blocks: block ``[i0, i1)`` against keys ``[0, i1)``.
    q [B,T,N,D], k/v [B,T,K,D]; ``allowed_block(i0, i1)`` -> [B, i1 - i0, i1] bool, already causal.
    The softmax is left unnormalized until after the value matmul (``(exp(s - m) v) / l``), which
    divides ``[.., D]`` values instead of ``[.., i1]`` probabilities, forward and backward; the row
    maximum ``m`` is a constant to autodiff (the result does not depend on it). A query row with no
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
        s = jnp.where(allowed_block(i0, i1)[:, None, None], s, -1e30)
        p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        denom = jnp.sum(p, axis=-1, keepdims=True)  # >= 1: the row maximum contributes exp(0)
        o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vt[:, :, :i1],
                       preferred_element_type=jnp.float32)
        outs.append((o / denom).astype(q.dtype))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, d)


# ----------------------------------------------------------------------------------------------
# CPU: exact attention one row at a time, in query-block tiles, with its own backward


def tiled_causal(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array,
                 segments: jax.Array | None = None, branch: jax.Array | None = None, *,
                 block: int = CAUSAL_BLOCK) -> jax.Array:
    """Causal GQA self-attention under the vector mask of `_allowed_block` (key padding ``keys``
    [B, T], optional ``segments`` / ``branch`` [B, T]), the XLA path on CPU.

    XLA:CPU runs each fused operation over its whole operand, so the batched blocked path streams
    every ``[B, K, G, block, i1]`` score tensor through memory several times (scores, mask and max,
    exp and sum, the value matmul), and its autodiff backward keeps the probabilities of every
    layer. Here a `jax.lax.map` over rows computes one ``[K, G, block, window]`` tile at a time
    (all heads of one query block against its key window: 1.09x faster on the small HH step than a
    ``[G, block, window]`` tile per (row, kv head), whose map ran 4x the iterations on 4x smaller
    matmuls), and a custom VJP recomputes the
    probabilities from the saved log-sum-exp per query (flash attention's backward), so the
    residuals are the output and ``[B, N, T]`` floats. Exact: the same softmax over the same
    visible keys. Rows are mapped per device inside an `dpok_jax.sharding.activation_mesh`.
    A query with no visible key gets a finite, meaningless output and no gradient.
    """
    t, d = q.shape[1], q.shape[3]
    segments = jnp.ones(keys.shape, jnp.int32) if segments is None else segments.astype(jnp.int32)
    branch = jnp.zeros_like(segments) if branch is None else branch.astype(jnp.int32)
    # Tie the mask vectors to the queries. Inside a differentiated layer scan they are
    # loop-invariant, and JAX's scan linearization hoists everything that depends on them alone out
    # of the loop: every tile's mask and fill, stacked over all (row, head, query block) tiles of
    # the forward (hundreds of MiB per layer at 4096 positions, and most of the attention's time).
    q, keys, segments, branch = jax.lax.optimization_barrier((q, keys, segments, branch))

    def local(q, k, v, keys, segments, branch):  # this device's rows / heads
        bl, _, nl, _ = q.shape
        kl = k.shape[2]
        qt = jnp.transpose(q.reshape(bl, t, kl, nl // kl, d), (0, 2, 3, 1, 4))  # [B, K, G, T, D]
        kt, vt = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))  # [B, K, T, D]
        out = _tiled(qt, kt, vt, keys.astype(bool), segments, branch, block)
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(bl, t, nl, d)

    return sharding_lib.shard_attention(local, q, k, v, keys, segments, branch, q_axes=_BTND, kv_axes=_BTKD)


EXACT_WINDOWS = 8  # key windows of up to this many blocks are exact; longer ones about 1.5x apart


def _window_widths(blocks: int) -> tuple[int, ...]:
    """Key windows (in blocks, ending at the query block's end) that a query tile with up to
    ``blocks`` key blocks chooses from: every count up to `EXACT_WINDOWS`, then about 1.5x apart,
    and ``blocks`` itself.

    >>> _window_widths(8), _window_widths(1), _window_widths(20)
    ((1, 2, 3, 4, 5, 6, 7, 8), (1,), (1, 2, 3, 4, 5, 6, 7, 8, 12, 18, 20))
    """
    widths, w = [], 1
    while w < blocks:
        widths.append(w)
        w = w + 1 if w < EXACT_WINDOWS else max(w + 1, (3 * w) // 2)
    return (*widths, blocks)


def _query_tiles(segments: jax.Array, block: int, widths: tuple[int, ...]):
    """Query tiles of at most ``block`` positions for one row's ``[T]`` segment ids (0 = padding).

    A tile on the row's fixed block grid that a segment starts inside lets that segment's queries
    read the previous segment's keys, all of them (its window reaches back to the earliest segment
    start among its queries). So every segment of at least ``block`` positions, and every real run
    after padding, starts a new run of tiles at its first position ("anchors"); shorter segments
    continue the tiles of the run they fall in. A run's tiles are ``block`` apart from its anchor,
    and its last one ends at the next anchor or padding. A tile's key window ends at the tile's
    end and starts at the segment start of its first query, rounded up to whole blocks and then to
    one of ``widths``. On the HH-RLHF rows of `bench/vs_trl.py` (segments of 506 positions on
    average) the tiles cover 1.89x the visible (query, key) pairs, against 1.95x (rows of 1024)
    and 2.27x (one row of 4992) on the grid.

    Returns ``(i0, size, choice, count)``: ``[T]`` int tile starts, query counts (``<= block``) and
    indexes into ``widths``, valid for the first ``count`` (a traced scalar) entries.
    """
    t = segments.shape[0]
    pos = jnp.arange(t)
    real = segments > 0
    differs, edge = segments[1:] != segments[:-1], jnp.ones((1,), bool)
    begins = real & jnp.concatenate([edge, differs])  # each segment's first position
    seg_start = jax.lax.cummax(jnp.where(begins, pos, 0), axis=0)
    last = jnp.concatenate([differs, edge])
    seg_end = jax.lax.cummin(jnp.where(last, pos + 1, t), axis=0, reverse=True)  # end of each run
    after_padding = jnp.concatenate([edge, ~real[:-1]])
    anchor = begins & ((seg_end - pos >= block) | after_padding)
    stop = anchor | (~real & ~after_padding)  # an anchor, or padding after a real position
    stops = jnp.where(stop, pos, t)
    next_stop = jnp.concatenate([jax.lax.cummin(stops, axis=0, reverse=True)[1:], jnp.full((1,), t)])
    anchors = jnp.nonzero(anchor, size=t, fill_value=t)[0]
    safe = jnp.minimum(anchors, t - 1)
    run = jnp.where(anchors < t, next_stop[safe] - anchors, 0)
    per_run = -(-run // block)
    ends = jnp.cumsum(per_run)  # tiles before and including each run
    tile = jnp.arange(t)  # a tile holds at least one real query: at most t of them
    owner = jnp.minimum(jnp.searchsorted(ends, tile, side="right"), t - 1)
    k = tile - (ends[owner] - per_run[owner])
    i0 = anchors[owner] + k * block
    size = jnp.minimum(block, run[owner] - k * block)
    blocks = -(-(i0 + block - seg_start[jnp.minimum(i0, t - 1)]) // block)
    return i0, size, jnp.searchsorted(jnp.asarray(widths), blocks), ends[-1]


def _over_tiles(segments: jax.Array, block: int, nb: int, tile, put, acc, out):
    """For every tile of `_query_tiles` (``nb`` blocks fit the row): ``(x, acc) =
    tile(width)(i0, own, acc)`` with the smallest width of `_window_widths` (``own`` [block] bool:
    the tile's queries), then ``out = put(out, x, own, i0)``. Returns ``(acc, out)``, pytrees of row-sized arrays.

    The tiles are grouped by width, and each width runs a `jax.lax.fori_loop` over its tiles (a
    traced count: the work follows the row's real positions). One loop with a `jax.lax.switch`
    over the widths instead copied the carried d/dk and d/dv into and out of the switch for every
    tile (XLA:CPU does not update a conditional's operands in place): at one 4992-position row,
    forward + backward took 111 ms against 105 ms grouped."""
    t = segments.shape[0]
    widths = _window_widths(nb)
    i0, size, choice, count = _query_tiles(segments, block, widths)
    choice = jnp.where(jnp.arange(choice.shape[0]) < count, choice, len(widths))  # unused: last
    order = jnp.argsort(choice, stable=True)
    bounds = jnp.cumsum(jnp.bincount(choice, length=len(widths) + 1))
    carry = (acc, out)
    for c, w in enumerate(widths):
        run = tile(w * block)

        def body(j, carry, run=run):
            # A row's last tile may run past its end: it starts earlier (its window then ends at
            # the row's end, so still holds every key its queries see) and owns its queries only.
            first = i0[order[j]]
            start = jnp.minimum(first, t - block)
            at = jnp.arange(block) + start
            own = (at >= first) & (at < first + size[order[j]])
            x, acc = run(start, own, carry[0])
            return acc, put(carry[1], x, own, start)

        carry = jax.lax.fori_loop(bounds[c - 1] if c else 0, bounds[c], body, carry)
    return carry


def _pad_rows(block: int, t: int, *arrays_and_axes):
    """Pad each ``(array, axis)`` at the end of ``axis`` from ``t`` to a multiple of ``block`` (zeros
    / False: padded keys are invisible, padded queries belong to no tile). Rows that are already a
    multiple (packed rows always are) are returned as they are: a pad and the slice back were
    row-sized copies of q, k, v per layer (the small HH step is 1.038x faster without them)."""
    pad = -t % block
    if not pad:
        return [x for x, _ in arrays_and_axes]
    out = []
    for x, axis in arrays_and_axes:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        out.append(jnp.pad(x, widths))
    return out


def _tile(q, k, v, keys, segments, branch, i0, own, width: int, block: int):
    """Query tile ``[i0, i0 + block)`` and its key window of ``width`` positions ending at the
    tile's end (clipped to the row): ``(q_i [H, G, block, D], k_w, v_w [H, width, D], allowed
    [block, width], j0)``. Only the tile's own queries (``own`` [block] bool: the next tile's
    may follow within the block) see keys here."""
    t = k.shape[1]
    j0 = jnp.clip(i0 + block - width, 0, t - width)
    take = lambda x, start, size, axis=0: jax.lax.dynamic_slice_in_dim(x, start, size, axis)  # noqa: E731
    allowed = own[:, None] & _visible(i0 + jnp.arange(block), j0 + jnp.arange(width), take(keys, j0, width),
                                      take(segments, i0, block), take(segments, j0, width),
                                      take(branch, i0, block), take(branch, j0, width))
    return take(q, i0, block, 2), take(k, j0, width, 1), take(v, j0, width, 1), allowed, j0


def _put(total, x, own, i0, axis: int):
    """``total`` with its ``[i0, i0 + block)`` slice along ``axis`` replaced by ``x`` where ``own``
    (``[block]``, on that axis) and kept elsewhere."""
    old = jax.lax.dynamic_slice_in_dim(total, i0, x.shape[axis], axis)
    mask = own.reshape((-1,) + (1,) * (x.ndim - axis - 1))
    return jax.lax.dynamic_update_slice_in_dim(total, jnp.where(mask, x.astype(total.dtype), old), i0, axis)


def _tiled_forward(q, k, v, keys, segments, branch, block: int):
    """One row and H kv heads: q [H, G, T, D], k/v [H, T, D] -> (out [H, G, T, D], log-sum-exp
    [H, G, T], float32 or wider), over the tiles of `_query_tiles`. Positions in no tile
    (padding) get zeros."""
    h, g, t, d = q.shape
    q, k, v, keys, segments, branch = _pad_rows(
        block, t, (q, 2), (k, 1), (v, 1), (keys, 0), (segments, 0), (branch, 0))
    tp = k.shape[1]
    scale = d ** -0.5
    acc = jnp.promote_types(q.dtype, jnp.float32)

    def tile(width):
        def run(i0, own, nothing):
            qi, kw, vw, allowed, _ = _tile(q, k, v, keys, segments, branch, i0, own, width, block)
            s = jnp.einsum("hgtd,hsd->hgts", qi, kw, preferred_element_type=acc) * scale
            s = jnp.where(allowed, s, -1e30)
            m = jnp.max(s, axis=-1)
            p = jnp.exp(s - m[..., None])
            denom = jnp.sum(p, axis=-1)  # >= 1
            o = jnp.einsum("hgts,hsd->hgtd", p.astype(v.dtype), vw, preferred_element_type=acc)
            return ((o / denom[..., None]).astype(q.dtype), m + jnp.log(denom)), nothing
        return run

    def put(carry, x, own, i0):
        return _put(carry[0], x[0], own, i0, 2), _put(carry[1], x[1], own, i0, 2)

    _, (out, lse) = _over_tiles(segments, block, tp // block, tile, put, (),
                                (jnp.zeros((h, g, tp, d), q.dtype), jnp.zeros((h, g, tp), acc)))
    return out[:, :, :t], lse[:, :, :t]


def _tiled_backward(q, k, v, keys, segments, branch, out, lse, dout, block: int):
    """One row and H kv heads' d/dq, d/dk, d/dv from the saved output and log-sum-exp:
    ``p = exp(s - lse)`` on visible keys, ``ds = p (dout v^T - rowsum(dout * out))``, over the
    same tiles as the forward; each tile writes its queries' d/dq and adds its d/dk and d/dv into
    row-sized arrays. d/dq is [H, G, T, D]; d/dk and d/dv are transposed, [H, D, T]."""
    h, g, t, d = q.shape
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)  # [H, G, T]
    q, k, v, keys, segments, branch, dout, lse, delta = _pad_rows(
        block, t, (q, 2), (k, 1), (v, 1), (keys, 0), (segments, 0), (branch, 0), (dout, 2), (lse, 2),
        (delta, 2))
    tp = k.shape[1]
    scale = d ** -0.5

    def tile(width):
        def run(i0, own, acc):
            qi, kw, vw, allowed, j0 = _tile(q, k, v, keys, segments, branch, i0, own, width, block)
            doi, lsei, deltai = (jax.lax.dynamic_slice_in_dim(x, i0, block, 2) for x in (dout, lse, delta))
            s = jnp.einsum("hgtd,hsd->hgts", qi, kw, preferred_element_type=f32) * scale
            p = jnp.where(allowed, jnp.exp(s - lsei[..., None]), 0.0)  # [H, G, block, width]
            # d/dk and d/dv come out transposed, [H, D, width]: "hgts,hgtd->hsd" contracts the tile
            # over its leading (g, t) axes, and XLA:CPU copied every p and ds tile transposed for
            # it (1.3x slower attention backward on the small HH rows).
            dv_w = jnp.einsum("hgtd,hgts->hds", doi, p.astype(doi.dtype), preferred_element_type=f32)
            dp = jnp.einsum("hgtd,hsd->hgts", doi, vw, preferred_element_type=f32)
            ds = p * (dp - deltai[..., None]) * scale
            dq_i = jnp.einsum("hgts,hsd->hgtd", ds.astype(kw.dtype), kw, preferred_element_type=f32)
            dk_w = jnp.einsum("hgtd,hgts->hds", qi, ds.astype(qi.dtype), preferred_element_type=f32)
            add = lambda total, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                total, jax.lax.dynamic_slice_in_dim(total, j0, width, 2) + x, j0, 2)
            return dq_i, (add(acc[0], dk_w), add(acc[1], dv_w))
        return run

    zeros = jnp.zeros((h, d, tp), f32)
    (dk, dv), dq = _over_tiles(segments, block, tp // block, tile,
                               lambda dq, x, own, i0: _put(dq, x, own, i0, 2), (zeros, zeros),
                               jnp.zeros((h, g, tp, d), f32))
    return dq[:, :, :t].astype(q.dtype), dk[:, :, :t].astype(k.dtype), dv[:, :, :t].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _tiled(q, k, v, keys, segments, branch, block):
    """[R, H, G, T, D] queries, [R, H, T, D] keys/values, [R, T] mask vectors -> [R, H, G, T, D]."""
    return _tiled_fwd(q, k, v, keys, segments, branch, block)[0]


def _tiled_fwd(q, k, v, keys, segments, branch, block):
    out, lse = jax.lax.map(lambda a: _tiled_forward(*a, block), (q, k, v, keys, segments, branch))
    return out, (q, k, v, keys, segments, branch, out, lse)


def _tiled_bwd(block, residuals, dout):
    q, k, v, keys, segments, branch, out, lse = residuals
    dq, dk, dv = jax.lax.map(lambda a: _tiled_backward(*a, block),
                             (q, k, v, keys, segments, branch, out, lse, dout))
    # [R, H, D, T] -> [R, H, T, D] once, outside the map (inside it, the transposed write into the
    # map's stacked output was a copy of the whole output per row).
    return dq, jnp.swapaxes(dk, -1, -2), jnp.swapaxes(dv, -1, -2), None, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
