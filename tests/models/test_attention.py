"""Attention (`dpok_jax.models.attention`) against a float64 NumPy reference: causal + padding
masks (left and right), grouped-query heads, explicit 3-D masks, and the platform choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpok_jax.models.attention import dot_product_attention, implementation_for


def _reference(q, k, v, allowed):
    """float64: softmax(q k^T / sqrt(D)) v per query head, kv head = head // group; NaN rows where
    nothing is allowed. q [B,T,N,D], k/v [B,S,K,D], allowed [B,T,S] bool."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, d = q.shape
    group = n // k.shape[2]
    out = np.full((b, t, n, d), np.nan)
    for h in range(n):
        kh, vh = k[:, :, h // group], v[:, :, h // group]  # [B, S, D]
        scores = np.einsum("btd,bsd->bts", q[:, :, h], kh) / np.sqrt(d)
        scores = np.where(allowed, scores, -np.inf)
        has_key = allowed.any(-1)
        m = np.where(has_key, scores.max(-1), 0.0)[..., None]
        w = np.where(allowed, np.exp(scores - m), 0.0)
        probs = w / np.where(has_key, w.sum(-1), 1.0)[..., None]
        out[:, :, h] = np.where(has_key[..., None], np.einsum("bts,bsd->btd", probs, vh), np.nan)
    return out


def _inputs(b=3, t=7, n=4, kv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, d)).astype(np.float32)
    k = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("block", [None, 3], ids=["one_block", "blocked"])
@pytest.mark.parametrize("left", [True, False], ids=["left_padded", "right_padded"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_causal_padded_attention_equals_float64_reference(left, heads, block):
    """Also through the blocked causal path (query blocks of 3 over 7 positions: 3, 3, 1)."""
    n, kv = heads
    q, k, v = _inputs(n=n, kv=kv)
    lengths = np.array([7, 4, 1])
    pos = np.arange(7)
    key_mask = (pos[None] >= 7 - lengths[:, None]) if left else (pos[None] < lengths[:, None])
    got = np.asarray(jax.jit(lambda *a: dot_product_attention(*a, block_size=block))(q, k, v, key_mask))
    allowed = np.tril(np.ones((7, 7), bool))[None] & key_mask[:, None, :]
    ref = _reference(q, k, v, allowed)
    rows = ~np.isnan(ref[..., 0, 0])  # queries with at least one visible key
    assert rows.sum() < rows.size if left else rows.all()  # left padding leaves rows with no key
    np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()  # padded rows finite (and unused)


def test_explicit_3d_mask_is_used_as_given():
    q, k, v = _inputs(t=5)
    rng = np.random.default_rng(3)
    allowed = rng.random((3, 5, 5)) < 0.6
    allowed[:, :, 0] = True  # every query sees something
    got = np.asarray(dot_product_attention(q, k, v, allowed))
    np.testing.assert_allclose(got, _reference(q, k, v, allowed), rtol=1e-5, atol=1e-5)


def test_packed_segments_blocked_equal_float64_reference():
    """A packed row's mask (causal within segments, padding after) with `causal=True` runs blocked
    (blocks of 2 over 7 positions) and equals the reference, gradients too."""
    q, k, v = _inputs(t=7)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 2, 2, 3, 3, 3, 0]])
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & np.tril(np.ones((7, 7), bool))
    got = np.asarray(dot_product_attention(q, k, v, allowed, causal=True, block_size=2))
    ref = _reference(q, k, v, allowed)
    rows = ~np.isnan(ref[..., 0, 0])
    np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-5, atol=1e-5)
    w = np.where(rows[:, :, None, None], np.random.default_rng(2).standard_normal(q.shape), 0).astype(np.float32)
    grads = [jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, allowed, causal=True,
                                                                     block_size=b) * w), argnums=(0, 1, 2))(q, k, v)
             for b in (2, None)]  # blocked vs one block (jax.nn.dot_product_attention)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_equal_the_reference_attention():
    """d/dq,k,v of sum(out * w) through the XLA path equals a plain float32 einsum implementation."""
    q, k, v = _inputs(t=6)
    key_mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
    allowed = np.tril(np.ones((6, 6), bool))[None] & key_mask[:, None, :]
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    valid = allowed.any(-1)[:, :, None, None]

    def plain(q, k, v):
        g = q.shape[2] // k.shape[2]
        kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("btnd,bsnd->bnts", q, kk) / np.sqrt(q.shape[-1])
        s = jnp.where(allowed[:, None], s, -1e30)
        return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, -1), vv)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.where(valid, f(q, k, v) * w, 0.0))

    ref = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for block in (None, 2):  # one block, and the blocked causal path
        got = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, key_mask, block_size=block)),
                       argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_masks_and_implementations_are_errors():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"\[B, S\] or \[B, T, S\]"):
        dot_product_attention(q, k, v, np.ones((3,), bool))
    with pytest.raises(ValueError, match="implies causal self-attention"):
        dot_product_attention(q[:, :3], k, v, np.ones((3, 7), bool))
    with pytest.raises(ValueError, match=r"one of \('xla', 'cudnn', 'splash'\)"):
        dot_product_attention(q, k, v, np.ones((3, 7), bool), implementation="flash")


def test_platform_choice():
    assert implementation_for("cpu", jnp.float32) == "xla"
    assert implementation_for("tpu", jnp.bfloat16) == "xla"  # no segment-id mask: XLA (splash: test_splash_attention.py)
    assert implementation_for("gpu", jnp.bfloat16) == "cudnn"
    assert implementation_for("gpu", jnp.float32) == "xla"  # cuDNN flash attention is fp16/bf16 only


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_xla():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(b=2, t=128, n=8, kv=2, d=64))
    key_mask = np.ones((2, 128), bool)
    key_mask[1, 100:] = False
    fused = dot_product_attention(q, k, v, key_mask, implementation="cudnn")
    xla = dot_product_attention(q, k, v, key_mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(fused, np.float32)[:, :100], np.asarray(xla, np.float32)[:, :100],
                               atol=2e-2)


def _packed_rows(t, seed=0):
    """Three [3, t] rows: two segments then padding; one prefix-shared pair (branches 0, 1, 2);
    a short segment, a long one and padding. Returns key mask, segment ids, branch ids, and the
    [B, T, T] mask they mean (causal, within a segment, branch 0 or the query's own branch)."""
    seg = np.zeros((3, t), np.int32)
    br = np.zeros((3, t), np.int32)
    a, b = t // 3, (5 * t) // 6
    seg[0, :a], seg[0, a:b] = 1, 2
    seg[1] = 1
    br[1, t // 3:(2 * t) // 3], br[1, (2 * t) // 3:] = 1, 2
    seg[2, :7], seg[2, 7:t - 3] = 1, 2
    keys = seg > 0
    allowed = ((seg[:, :, None] == seg[:, None, :]) & keys[:, None, :] & np.tril(np.ones((t, t), bool))
               & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])))
    return keys, seg, br, allowed


@pytest.mark.parametrize("block", [64, 32], ids=["exact-windows", "ladder-windows"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_tiled_causal_equals_float64_reference(heads, block):
    """`tiled_causal` (CPU's path for vector masks) on packed rows with segments, branches and
    padding, 300 positions in query tiles of 64 (key windows of at most 5 blocks, all exact) or 32
    (up to 10 blocks: past `EXACT_WINDOWS`, the 1.5x ladder), against the float64 reference."""
    from dpok_jax.models.attention import EXACT_WINDOWS, tiled_causal

    assert (-(-300 // block) > EXACT_WINDOWS) == (block == 32)
    n, kv = heads
    q, k, v = _inputs(t=300, n=n, kv=kv)
    keys, seg, br, allowed = _packed_rows(300)
    got = np.asarray(jax.jit(lambda *a: tiled_causal(*a, block=block))(q, k, v, keys, seg, br))
    ref = _reference(q, k, v, allowed)
    rows = ~np.isnan(ref[..., 0, 0])
    assert not rows.all() and rows.sum() > 800  # padding rows see nothing, the rest do
    np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()


def _shared_row(layout, t):
    """One packed row of prefix-shared pairs: ``layout`` lists (prompt, chosen, rejected) lengths
    (a pair without a prompt has no branch 0), then padding to ``t``. Returns segment and branch
    ids ``[1, t]`` and the ``[1, t, t]`` mask."""
    seg, br = np.zeros(t, np.int32), np.zeros(t, np.int32)
    at = 0
    for i, lengths in enumerate(layout):
        for branch, n in enumerate(lengths):
            seg[at:at + n], br[at:at + n] = i + 1, branch
            at += n
    assert at <= t
    seg, br = seg[None], br[None]
    allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg > 0)[:, None, :] & np.tril(np.ones((t, t), bool))
               & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])))
    return seg, br, allowed


# Rejected branches that start inside the chosen branch's last block (short chosen), a prompt
# shorter than a block, long and short branches, a pair without a prompt, short pairs riding a
# long pair's tiles, a single-token rejected branch, and segments longer than the width ladder's
# exact part (8 blocks of 64). The rows are 768 positions (12 blocks: no padding inside
# `tiled_causal`); the last layout fills its row with a pair that starts off the block grid, so its
# last query tile would run past the row and starts earlier instead.
_LAYOUTS = [[(40, 5, 150), (3, 130, 140), (130, 2, 3), (0, 50, 70), (10, 4, 4), (6, 3, 1)],
            [(70, 70, 70), (1, 1, 200), (64, 64, 64)], [(300, 200, 250), (3, 3, 3)],
            [(10, 5, 5), (37, 300, 411)]]


@pytest.mark.parametrize("layout", range(len(_LAYOUTS)))
def test_tiled_causal_prefix_shared_rows_equal_float64_reference(layout):
    """Prefix-shared pairs of many shapes in one row (query tiles anchored at long segments,
    short pairs riding them, branches starting inside a block): outputs against the float64
    reference, gradients against plain masked attention."""
    from dpok_jax.models.attention import tiled_causal

    t = 768
    seg, br, allowed = _shared_row(_LAYOUTS[layout], t)
    q, k, v = _inputs(b=1, t=t, n=4, kv=2, d=8, seed=layout)
    keys = seg > 0
    got = np.asarray(jax.jit(lambda *a: tiled_causal(*a, block=64))(q, k, v, keys, seg, br))
    ref = _reference(q, k, v, allowed)
    rows = ~np.isnan(ref[..., 0, 0])
    np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-5, atol=1e-5)
    w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32) * rows[:, :, None, None]

    def plain(q, k, v):
        kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("btnd,bsnd->bnts", q, kk) / np.sqrt(q.shape[-1])
        return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(jnp.where(allowed[:, None], s, -1e30), -1), vv)

    grads = [jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), (0, 1, 2)))(q, k, v)
             for f in (lambda q, k, v: tiled_causal(q, k, v, keys, seg, br, block=64), plain)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_tiled_causal_query_tiles_start_at_long_segments():
    """Query tiles restart at each segment of at least a block (so its queries never read the
    previous segment's keys) and after padding; shorter segments ride the current run's tiles. A
    tile's key window reaches back to its first query's segment start in whole blocks, rounded up
    the width ladder; padding gets no tile, and the count is the row's tiles, not the grid's."""
    from dpok_jax.models.attention import _query_tiles, _window_widths

    def tiles(seg, block, widths):
        i0, size, choice, count = _query_tiles(jnp.asarray(seg), block, widths)
        n = int(count)
        return (np.asarray(i0[:n]).tolist(), np.asarray(size[:n]).tolist(),
                [widths[c] for c in np.asarray(choice[:n])])

    widths = _window_widths(6)
    assert tiles([1] * 5 + [2] * 3 + [0] * 2 + [3], 2, widths) == (
        [0, 2, 4, 5, 7, 10], [2, 2, 1, 2, 1, 1], [1, 2, 3, 1, 2, 1])
    # segment 2 (3 < 4 positions) rides segment 1's tiles; its tile reads back to its own start
    assert tiles([1] * 3 + [2] * 3 + [3] * 4, 4, _window_widths(3)) == ([0, 4, 6], [4, 2, 4], [1, 2, 1])
    _, _, w = tiles(np.ones(40, np.int32), 2, (1, 2, 3, 4, 6, 9, 13, 19, 20))
    assert w == [1, 2, 3, 4, 6, 6, 9, 9, 9, 13, 13, 13, 13, 19, 19, 19, 19, 19, 19, 20]


def test_tiled_causal_gradients_check_grads():
    """The hand-written backward (probabilities recomputed from the saved log-sum-exp) against
    numerical differences in float64 (`jax.test_util.check_grads`), on the rows that see a key
    (the others' outputs are meaningless and get no gradient)."""
    from jax.test_util import check_grads

    from dpok_jax.models.attention import tiled_causal

    with jax.enable_x64(True):
        q, k, v = (x.astype(np.float64) for x in _inputs(t=40, n=4, kv=2, d=4, seed=5))
        keys, seg, br, allowed = _packed_rows(40)
        visible = jnp.asarray(allowed.any(-1))[:, :, None, None]
        for block in (16, 4):  # windows of up to 3 blocks; up to 10 (the ladder past EXACT_WINDOWS)
            f = lambda q, k, v: jnp.where(visible, tiled_causal(q, k, v, keys, seg, br, block=block), 0.0)  # noqa: E731
            check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_cpu_vector_masks_take_the_tiled_path_also_on_a_mesh():
    """On CPU a key padding mask or packed rows' vectors longer than one block go through
    `tiled_causal` (its custom VJP is in the jaxpr); inside `activation_mesh` on 8 fake devices it
    runs per device (`jax.shard_map`) and gives the same values and gradients."""
    from dpok_jax.sharding import activation_mesh, make_mesh

    q, k, v = _inputs(b=4, t=300, n=4, kv=2)
    keys, seg, br, _ = _packed_rows(300)
    keys, seg, br = (np.concatenate([x, x[:1]]) for x in (keys, seg, br))
    attend = lambda q, k, v: dot_product_attention(q, k, v, keys, segment_ids=seg, branch_ids=br)  # noqa: E731
    assert "custom_vjp_call" in str(jax.make_jaxpr(attend)(q, k, v))
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda *a: dot_product_attention(*a, keys))(q, k, v))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda *a: dot_product_attention(*a, keys[:, :100]))(
        q[:, :100], k[:, :100], v[:, :100]))  # one block: jax.nn.dot_product_attention
    w = np.random.default_rng(3).standard_normal(q.shape).astype(np.float32) * keys[:, :, None, None]
    run = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w), argnums=(0, 1, 2)))
    plain = run(q, k, v)
    with activation_mesh(make_mesh(2, 2, 2)):  # fresh functions: traces are cached per function
        jaxpr = str(jax.make_jaxpr(lambda *a: attend(*a))(q, k, v))
        sharded = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w),
                                             argnums=(0, 1, 2)))(q, k, v)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5)
    for a, b in zip(sharded[1], plain[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block", [64, 32], ids=["unrolled", "scanned"])
def test_tiled_causal_in_a_differentiated_layer_scan_stores_no_per_tile_masks(block):
    """In a model the mask vectors are the same for every layer. Differentiating a layer scan,
    JAX hoists what depends on loop-invariant values alone out of the loop; without tying the
    vectors to the queries that was every tile's mask and fill, stacked over all (row, head, query
    block) tiles (hundreds of MiB per layer at 4096 positions). The gradient's jaxpr then carries
    only the custom VJP's residuals (q, k, v, output, log-sum-exp), never a tile-shaped array."""
    from dpok_jax.models.attention import tiled_causal

    q, k, v = _inputs(t=300, n=4, kv=2)
    keys, seg, br, _ = _packed_rows(300)
    w = jnp.full((2, q.shape[-1], q.shape[-1]), 0.1, jnp.float32)

    def loss(x, w):
        def layer(x, wl):
            y = x @ wl
            return tiled_causal(y, y[:, :, :2], y[:, :, 2:], keys, seg, br, block=block), ()
        return jnp.sum(jax.lax.scan(layer, x, w)[0])

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, w).jaxpr
    tile_shaped = [str(v.aval) for e in jaxpr.eqns for v in e.outvars
                   if len(v.aval.shape) >= 5 and block in v.aval.shape[-2:]]  # [rows, H, G, block, keys]
    assert not tile_shaped, tile_shaped[:5]
