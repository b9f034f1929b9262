"""Per-token and per-sequence log-probabilities (SPEC.md §1), and the chunked, rematerialized LM head.

The head turns final hidden states `[B, T, H]` and an unembedding `[H, V]` into per-token log-probs
(and, optionally, per-position divergences against a reference) one chunk of positions at a time. With
`V = 128k` the full `[B, T, V]` float32 logits of one model are gigabytes; the chunked head holds one
`[B, chunk, V]` block, and `jax.checkpoint` makes the backward pass recompute that block instead of
saving every chunk's logits for it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpok_jax.losses import _divergences
from dpok_jax.ops import token_matmul

__all__ = ["chunked_logps_and_divergence", "chunked_token_logps", "masked_divergence", "sequence_logps",
           "token_logps"]


def _acc_dtype(*arrays: jax.Array) -> Any:
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _gather_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[..., V], [...] -> [...] `logits[label] − logsumexp(logits)` in (at least) float32."""
    logits = logits.astype(_acc_dtype(logits))
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-token log-probabilities `log softmax(logits)[label]`.

    `log π(y_t) = z_t[y_t] − logsumexp(z_t)`, computed in float32 even from bf16 logits.
    `logits[:, t]` is the distribution of `labels[:, t]` (the caller has already shifted).

    Args:
      logits: [B, T, V] (any float dtype).
      labels: [B, T] int token ids in [0, V).

    Returns:
      [B, T] float32 (float64 for float64 logits).

    Example:
      >>> import jax.numpy as jnp
      >>> out = token_logps(jnp.log(jnp.array([[[0.25, 0.75]]])), jnp.array([[1]]))  # log 0.75
      >>> out.shape, round(float(out[0, 0]), 4)
      ((1, 1), -0.2877)

    Reference: SPEC.md §1.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {labels.shape} must equal logits shape without V {logits.shape[:-1]}")
    return _gather_logps(logits, labels)


def sequence_logps(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, *, reduction: str = "sum"
) -> jax.Array:
    """Sequence log-probability over the masked-in (response) tokens.

    `ℓ(y|x) = Σ_t m_t log π(y_t | x, y_<t)`; `reduction="mean"` divides by `Σ_t m_t` (length-normalized;
    an all-zero mask gives 0).

    Args:
      logits: [B, T, V]; `logits[:, t]` is the distribution of `labels[:, t]` (already shifted).
      labels: [B, T] int token ids.
      mask: [B, T], 1 on response tokens, 0 on prompt and padding.
      reduction: "sum" or "mean".

    Returns:
      [B] float32.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75]]]))
      >>> out = sequence_logps(logits, jnp.array([[0, 1]]), jnp.array([[0, 1]]))  # only log 0.75 counts
      >>> out.shape, round(float(out[0]), 4)
      ((1,), -0.2877)

    Reference: SPEC.md §1; Rafailov et al. (2023), DPO.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"'reduction' must be 'sum' or 'mean', got {reduction!r}")
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {mask.shape} must equal labels shape {labels.shape}")
    tok = token_logps(logits, labels)
    on = mask > 0
    # where, not multiply: a masked-out token may have logp = -inf (masked logits), and 0 * -inf = NaN.
    total = jnp.sum(jnp.where(on, tok, 0.0), axis=-1)
    if reduction == "mean":
        return total / jnp.maximum(jnp.sum(on, axis=-1), 1).astype(total.dtype)
    return total


# ----------------------------------------------------------------------------- the chunked head


def _chunk_logits(h: jax.Array, unembed: jax.Array) -> jax.Array:
    """[B, C, H] @ [H, V] -> [B, C, V], accumulated in (at least) float32."""
    return token_matmul(h, unembed, preferred_element_type=_acc_dtype(h, unembed))


def _check_head(hidden: jax.Array, unembed: jax.Array, labels: jax.Array | None, prefix: str = "") -> None:
    if hidden.ndim != 3:
        raise ValueError(f"{prefix}hidden must be [B, T, H], got shape {hidden.shape}")
    if unembed.ndim != 2 or unembed.shape[0] != hidden.shape[-1]:
        raise ValueError(f"{prefix}unembed must be [H={hidden.shape[-1]}, V], got shape {unembed.shape}")
    if labels is not None and labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} must equal {prefix}hidden[:2] {hidden.shape[:2]}")


def _map_chunks(fn: Callable, xs: tuple, *, chunk_size: int, remat: bool = True) -> Any:
    """Apply `fn` to `[B, C, ...]` slices of the `[B, T, ...]` arrays `xs`, sequentially over T.

    T is padded to a multiple of C (padded outputs are dropped). `remat=True` wraps `fn` in
    `jax.checkpoint`, so reverse mode keeps only each chunk's inputs and recomputes its `[B, C, V]`
    intermediates chunk by chunk.
    """
    b, t, c, n, split, merge = _chunking(xs[0], chunk_size)
    body = lambda args: fn(*args)  # noqa: E731
    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.tree.map(merge, jax.lax.map(body, tuple(split(x) for x in xs)))


def _chunking(x: jax.Array, chunk_size: int) -> tuple:
    """(B, T, C, n, split, merge) for chunks of C positions of `[B, T, ...]` arrays like `x`."""
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"'chunk_size' must be >= 1, got {chunk_size}")
    b, t = x.shape[:2]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t

    def split(x):  # [B, T, ...] -> [n, B, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    def merge(y):  # [n, B, C, ...] -> [B, T, ...]
        return jnp.moveaxis(y, 0, 1).reshape(b, n * c, *y.shape[3:])[:, :t]

    return b, t, c, n, split, merge


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _frozen(params: dict) -> dict:
    """A divergence's hyperparameters with their arrays under `stop_gradient` (they get no gradient)."""
    return {k: jax.lax.stop_gradient(v) if isinstance(v, jax.Array) else v for k, v in params.items()}


def _live_map(fn: Callable, sliced: tuple, diff: tuple, whole: Any, n_live: jax.Array) -> Any:
    """`out[i] = fn(tuple(s[i] for s in sliced), whole)` for `i < n_live`; zeros for the other `i`.

    One loop of `n_live` (traced) iterations, forward and backward, so the blocks past it cost
    nothing. Reverse mode is a custom VJP: each live block is recomputed (rematerialized, as
    `jax.checkpoint` would) and its cotangents are written to its slot of the sliced inputs flagged
    in `diff` and summed, in at least float32, for the `whole` pytree. The sliced inputs not flagged
    and every array `fn` closes over get no gradient (JAX raises if a closed-over value is being
    differentiated). Reverse mode only.

    Why not `lax.map` over `lax.cond(i < n_live, ...)` under `jax.checkpoint`: differentiating that
    makes every residual of the cond (the `[H, V]` unembedding among them) an output of each
    iteration, so reverse mode stacked `n` copies of the unembedding (1.8 GB of zeros and copies per
    step on SmolLM2's 49k vocabulary).
    """
    n = sliced[0].shape[0]
    out_shape = jax.eval_shape(fn, tuple(s[0] for s in sliced), whole)
    d_idx = [k for k, d in enumerate(diff) if d]

    def forward(sliced, whole, n_live):
        def body(i, acc):
            y = fn(tuple(s[i] for s in sliced), whole)
            return jax.tree.map(lambda a, v: a.at[i].set(v), acc, y)

        init = jax.tree.map(lambda a: jnp.zeros((n, *a.shape), a.dtype), out_shape)
        return jax.lax.fori_loop(0, n_live, body, init)

    @jax.custom_vjp
    def run(sliced, whole, n_live):
        return forward(sliced, whole, n_live)

    def run_fwd(sliced, whole, n_live):
        return forward(sliced, whole, n_live), (sliced, whole, n_live)

    def run_bwd(res, g):
        sliced, whole, n_live = res
        g_leaves = [x for x in jax.tree.leaves(g) if _inexact(x)]

        def body(i, carry):
            d_sliced, d_whole = carry
            xs = [s[i] for s in sliced]

            def f(dx, wh):
                args = list(xs)
                for k, v in zip(d_idx, dx):
                    args[k] = v
                return [x for x in jax.tree.leaves(fn(tuple(args), wh)) if _inexact(x)]

            _, vjp = jax.vjp(f, [xs[k] for k in d_idx], whole)
            dx, dw = vjp([x[i] for x in g_leaves])
            d_sliced = [a.at[i].set(v.astype(a.dtype)) for a, v in zip(d_sliced, dx)]
            d_whole = jax.tree.map(lambda a, v: a + v.astype(a.dtype), d_whole, dw)
            return d_sliced, d_whole

        acc = lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32))  # noqa: E731
        init = ([jnp.zeros_like(sliced[k]) for k in d_idx], jax.tree.map(acc, whole))
        d_sliced, d_whole = jax.lax.fori_loop(0, n_live, body, init)
        cts = [None] * len(sliced)
        for k, v in zip(d_idx, d_sliced):
            cts[k] = v
        return tuple(cts), jax.tree.map(lambda v, a: v.astype(a.dtype), d_whole, whole), None

    run.defvjp(run_fwd, run_bwd)
    return run(tuple(sliced), whole, n_live)


def chunked_logps_and_divergence(
    policy_hidden: jax.Array,
    policy_unembed: jax.Array,
    labels: jax.Array,
    *,
    ref_hidden: jax.Array | None = None,
    ref_unembed: jax.Array | None = None,
    ref_topk: tuple[jax.Array, jax.Array] | None = None,
    divergence: str | None = None,
    chunk_size: int = 128,
    mask: jax.Array | None = None,
    **div_params: Any,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Policy (and reference) per-token log-probs and per-position divergences in one chunked pass.

    Per position t: `log π_θ(y_t) = z_t[y_t] − logsumexp(z_t)` with `z_t = h_t W`, likewise for the
    reference, and `D(π_θ(·|c_t) ‖ π_ref(·|c_t))` from both chunk logits (see
    :func:`dpok_jax.losses.divergence`), or, with `ref_topk`, the top-k + tail approximation
    (:func:`dpok_jax.losses.topk_divergence`). Never holds `[B, T, V]` logits of either model, forward
    or backward (rematerialized chunks). The reference side is under `stop_gradient`. Values and
    gradients equal the naive full-logits computation.

    Args:
      policy_hidden: [B, T, H] policy final hidden states (already aligned with `labels`).
      policy_unembed: [H, V] policy unembedding.
      labels: [B, T] int next-token ids.
      ref_hidden: [B, T, H] reference hidden states (live reference), or None.
      ref_unembed: [H, V] reference unembedding (required with `ref_hidden`).
      ref_topk: (indices [B, T, k] int, logps [B, T, k]) of a precomputed reference, or None.
      divergence: a divergence name, or None for no divergence.
      chunk_size: positions per chunk (T need not be a multiple).
      mask: [B, T] positions whose values are used (the label positions), or None for all. With a
        mask only those positions are computed: they are gathered to the front (a stable sort) and
        processed ``B * chunk_size`` at a time in a loop that stops after the last one (forward and
        backward; reverse mode through a custom VJP that recomputes each chunk), so the vocabulary
        matmuls grow with the label positions (a packed HH-RLHF row is about half prompt), not with
        ``B × T``. Every output is 0 where `mask` is 0; values and gradients elsewhere are the
        unmasked computation's. Reverse-mode differentiable only (no `jax.jvp`) with a mask.
      **div_params: the divergence's hyperparameters (e.g. `order`, `f`, `cost_embeddings`); their
        arrays get no gradient.

    Returns:
      (policy_token_logps [B, T], ref_token_logps [B, T] or None, div [B, T] or None).

    Example:
      >>> import jax.numpy as jnp
      >>> h, w = jnp.ones((1, 3, 2)), jnp.array([[0.0, 1.0], [0.0, 1.0]])
      >>> pol, ref, div = chunked_logps_and_divergence(h, w, jnp.array([[1, 1, 0]]), ref_hidden=h,
      ...                                              ref_unembed=w, divergence="kl", chunk_size=2)
      >>> [round(float(v), 4) for v in pol[0]], [round(float(v), 4) for v in div[0]]
      ([-0.1269, -0.1269, -2.1269], [0.0, 0.0, 0.0])

    Reference: SPEC.md §1 and §6 (memory).
    """
    _check_head(policy_hidden, policy_unembed, labels, "policy_")
    live = ref_hidden is not None
    if live and ref_topk is not None:
        raise ValueError("pass either ref_hidden/ref_unembed (live reference) or ref_topk, not both")
    if live:
        if ref_unembed is None:
            raise ValueError("ref_unembed is required with ref_hidden")
        _check_head(ref_hidden, ref_unembed, labels, "ref_")
        ref_hidden = jax.lax.stop_gradient(ref_hidden)
        ref_unembed = jax.lax.stop_gradient(ref_unembed)
    if divergence is None and div_params:
        raise ValueError(f"divergence parameters {sorted(div_params)} given without a divergence")
    div_params = _frozen(div_params)
    if divergence is not None and not live and ref_topk is None:
        raise ValueError(f"divergence {divergence!r} needs ref_hidden/ref_unembed or ref_topk")
    xs = [policy_hidden, labels]
    if live:
        xs.append(ref_hidden)
    elif ref_topk is not None:
        idx, lps = ref_topk
        if idx.shape != lps.shape or idx.shape[:2] != labels.shape:
            raise ValueError(
                f"ref_topk must be (indices, logps) of shape [B, T, k] with [B, T] = {labels.shape}, "
                f"got {idx.shape} and {lps.shape}"
            )
        xs += [idx, jax.lax.stop_gradient(lps)]

    def chunk(w, h, y, *ref):
        pol_logits = _chunk_logits(h, w)
        out = {"pol": _gather_logps(pol_logits, y)}
        if live:
            ref_logits = _chunk_logits(ref[0], ref_unembed)
            out["ref"] = _gather_logps(ref_logits, y)
            if divergence is not None:
                out["div"] = _divergences.divergence(divergence, pol_logits, ref_logits, **div_params)
        elif divergence is not None:
            out["div"] = _divergences.topk_divergence(divergence, pol_logits, ref[0], ref[1], **div_params)
        return out

    if mask is None:
        out = _map_chunks(lambda *a: chunk(policy_unembed, *a), tuple(xs), chunk_size=chunk_size)
        return out["pol"], out.get("ref"), out.get("div")
    b, t = labels.shape
    if mask.shape != (b, t):
        raise ValueError(f"mask shape {mask.shape} must be [B, T] = {(b, t)}")
    n = b * t
    flat = mask.reshape(n).astype(bool)
    order = jnp.argsort(~flat, stable=True)  # masked positions first, in order
    count = jnp.sum(flat)
    packed = tuple(x.reshape(n, *x.shape[2:])[order][None] for x in xs)  # [1, n, ...]
    _, _, c, n_chunks, split, merge = _chunking(packed[0], b * int(chunk_size))
    out = _live_map(lambda a, w: chunk(w, *a), tuple(split(x) for x in packed),
                    (True,) + (False,) * (len(xs) - 1), policy_unembed,
                    jnp.minimum(n_chunks, (count + c - 1) // c))
    kept = jnp.arange(n) < count  # a skipped chunk's zeros, and the unmasked tail of the last one
    out = {k: jnp.zeros((n,), v.dtype).at[order].set(jnp.where(kept, merge(v)[0], 0)).reshape(b, t)
           for k, v in out.items()}
    return out["pol"], out.get("ref"), out.get("div")


def chunked_token_logps(
    hidden: jax.Array, unembed: jax.Array, labels: jax.Array, *, chunk_size: int = 128
) -> jax.Array:
    """Per-token log-probs from hidden states, chunked over T without materializing `[B, T, V]`.

    `log π(y_t) = (h_t W)[y_t] − logsumexp(h_t W)`, one `[B, chunk, V]` block at a time, rematerialized
    in the backward pass; equal in value and gradient to `token_logps(hidden @ unembed, labels)`.

    Args:
      hidden: [B, T, H] final hidden states.
      unembed: [H, V] unembedding matrix.
      labels: [B, T] int next-token ids.
      chunk_size: positions per chunk (T need not be a multiple).

    Returns:
      [B, T] float32 (float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> out = chunked_token_logps(jnp.zeros((1, 5, 2)), jnp.zeros((2, 4)), jnp.zeros((1, 5), int),
      ...                           chunk_size=2)  # uniform over 4 tokens: log(1/4) everywhere
      >>> out.shape, [round(float(v), 4) for v in out[0]]
      ((1, 5), [-1.3863, -1.3863, -1.3863, -1.3863, -1.3863])

    Reference: SPEC.md §1 and §6 (memory).
    """
    return chunked_logps_and_divergence(hidden, unembed, labels, chunk_size=chunk_size)[0]


def masked_divergence(
    name: str,
    policy_hidden: jax.Array,
    policy_unembed: jax.Array,
    ref_hidden: jax.Array,
    ref_unembed: jax.Array,
    mask: jax.Array,
    *,
    block_size: int = 128,
    return_converged: bool = False,
    **params: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-position `D(π_θ(·|c_t) ‖ π_ref(·|c_t))` computed only where `mask` is set; 0 elsewhere.

    The masked positions of the `[B, T]` grid are compacted to the front (a stable sort), processed
    `block_size` at a time (`[block, V]` logits of each model, then :func:`dpok_jax.losses.divergence`),
    and scattered back. The loop over blocks stops after the last masked position (forward and
    backward, a custom VJP that recomputes each block; reverse mode only), so the work grows
    with the number of masked positions (the response tokens), not with `B × T`. Worth it for costly
    divergences (the Wasserstein penalty solves one OT problem per position; responses are usually a
    fraction of the padded sequence); cheap ones are better fused into
    :func:`chunked_logps_and_divergence`. Values and gradients at masked positions equal the dense
    computation; the reference side is under `stop_gradient`.

    Args:
      name: a divergence name of :func:`dpok_jax.losses.divergence`.
      policy_hidden, ref_hidden: [B, T, H] final hidden states (aligned with the next-token targets).
      policy_unembed, ref_unembed: [H, V] unembeddings.
      mask: [B, T] positions to compute (bool or 0/1).
      block_size: positions per block, >= 1.
      return_converged: also return where the solver converged (Wasserstein: every Sinkhorn solve
        reached its threshold; other divergences have no solver and are always True).
      **params: the divergence's hyperparameters (e.g. `cost_embeddings`, `epsilon`, `top_k`).

    Returns:
      [B, T] divergences, exactly 0 where `mask` is 0; with `return_converged`, `(divergences,
      converged [B, T] bool)`, True where `mask` is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> h, w = jnp.ones((1, 3, 2)), jnp.array([[0.0, 1.0], [0.0, 1.0]])
      >>> d = masked_divergence("kl", h, w, 0.5 * h, w, jnp.array([[0, 1, 1]]), block_size=2)
      >>> [round(float(v), 4) for v in d[0]]
      [0.0, 0.0671, 0.0671]

    Reference: SPEC.md §6 (Wasserstein over positions).
    """
    _check_head(policy_hidden, policy_unembed, None, "policy_")
    _check_head(ref_hidden, ref_unembed, None, "ref_")
    b, t, h = policy_hidden.shape
    if ref_hidden.shape != policy_hidden.shape:
        raise ValueError(f"ref_hidden shape {ref_hidden.shape} must equal policy_hidden {policy_hidden.shape}")
    if mask.shape != (b, t):
        raise ValueError(f"mask shape {mask.shape} must be [B, T] = {(b, t)}")
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"'block_size' must be >= 1, got {block_size}")
    ref_hidden = jax.lax.stop_gradient(ref_hidden)
    ref_unembed = jax.lax.stop_gradient(ref_unembed)
    params = _frozen(params)
    n = b * t
    bs = min(block_size, n)
    n_blocks = -(-n // bs)
    flat = mask.reshape(n).astype(bool)
    # Masked positions first, in order; the tail of `order` (unmasked) pads the last block.
    order = jnp.argsort(~flat, stable=True)
    count = jnp.sum(flat)
    order_padded = jnp.concatenate([order, jnp.zeros((n_blocks * bs - n,), order.dtype)])
    # Each block's hidden states, gathered in sorted order: [n_blocks, bs, H].
    hp = policy_hidden.reshape(n, h)[order_padded].reshape(n_blocks, bs, h)
    hr = ref_hidden.reshape(n, h)[order_padded].reshape(n_blocks, bs, h)
    out_dtype = _acc_dtype(policy_hidden, policy_unembed)
    offsets = jnp.arange(n_blocks) * bs

    def solve(blk, w):
        hp_i, hr_i, start = blk
        lp = _chunk_logits(hp_i[None], w)[0]
        lq = _chunk_logits(hr_i[None], ref_unembed)[0]
        if name == "wasserstein":
            d, ok = _divergences.divergence(name, lp, lq, return_converged=True, **params)
        else:
            d, ok = _divergences.divergence(name, lp, lq, **params), jnp.ones((bs,), bool)
        live = start + jnp.arange(bs) < count
        return jnp.where(live, d.astype(out_dtype), 0.0), jnp.where(live, ok, True)

    values, converged = _live_map(solve, (hp, hr, offsets), (True, False, False), policy_unembed,
                                  (count + bs - 1) // bs)
    converged = converged | (offsets[:, None] >= count)  # blocks past the masked positions
    values = jnp.zeros((n,), out_dtype).at[order].set(values.reshape(-1)[:n]).reshape(b, t)
    if not return_converged:
        return values
    converged = jnp.ones((n,), bool).at[order].set(converged.reshape(-1)[:n]).reshape(b, t)
    return values, converged
