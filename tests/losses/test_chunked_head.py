"""The chunked, rematerialized LM head equals the naive full-logits head (values and gradients)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dpok_jax import losses

B, T, H, V = 2, 7, 5, 17  # T = 7 is not a multiple of the chunk sizes below


def _inputs(seed, dtype=jnp.float64):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(ks[0], (B, T, H), dtype)
    w = jax.random.normal(ks[1], (H, V), dtype)
    rh = h + 0.3 * jax.random.normal(ks[2], (B, T, H), dtype)
    rw = w + 0.3 * jax.random.normal(ks[3], (H, V), dtype)
    y = jax.random.randint(ks[4], (B, T), 0, V)
    return h, w, rh, rw, y


@pytest.mark.parametrize("chunk_size", [3, 7, 64])
def test_token_logps_equal_naive_values_and_gradients(x64, chunk_size):
    h, w, _, _, y = _inputs(0)
    weights = jnp.linspace(0.5, 1.5, B * T).reshape(B, T)
    chunked = lambda h, w: jnp.sum(weights * losses.chunked_token_logps(h, w, y, chunk_size=chunk_size))  # noqa: E731
    naive = lambda h, w: jnp.sum(weights * losses.token_logps(h @ w, y))  # noqa: E731
    np.testing.assert_allclose(losses.chunked_token_logps(h, w, y, chunk_size=chunk_size),
                               losses.token_logps(h @ w, y), rtol=1e-12)
    for got, want in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(naive, (0, 1))(h, w)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", [("kl", {}), ("js", {}), ("renyi", {"order": 0.5}),
                                         ("bhattacharyya", {}), ("f", {"f": "chi2"})])
def test_live_reference_divergence_equals_naive(x64, name, params):
    h, w, rh, rw, y = _inputs(1)
    wt = jnp.linspace(0.5, 1.5, B * T).reshape(B, T)

    def chunked(h, w, rh, rw):
        pol, ref, div = losses.chunked_logps_and_divergence(
            h, w, y, ref_hidden=rh, ref_unembed=rw, divergence=name, chunk_size=3, **params)
        return jnp.sum(wt * pol) + 0.3 * jnp.sum(wt * ref) + jnp.sum(wt * div), (pol, ref, div)

    def naive(h, w, rh, rw):
        rh, rw = jax.lax.stop_gradient(rh), jax.lax.stop_gradient(rw)
        pol, ref = losses.token_logps(h @ w, y), losses.token_logps(rh @ rw, y)
        div = losses.divergence(name, h @ w, rh @ rw, **params)
        return jnp.sum(wt * pol) + 0.3 * jnp.sum(wt * ref) + jnp.sum(wt * div), (pol, ref, div)

    (v1, outs1), g1 = jax.value_and_grad(chunked, (0, 1, 2, 3), has_aux=True)(h, w, rh, rw)
    (v2, outs2), g2 = jax.value_and_grad(naive, (0, 1, 2, 3), has_aux=True)(h, w, rh, rw)
    for a, b in zip(outs1, outs2):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert np.all(np.asarray(g1[2]) == 0) and np.all(np.asarray(g1[3]) == 0)  # reference: stop_gradient


def test_check_grads_chunked_head(x64):
    h, w, rh, rw, y = _inputs(2)

    def fn(h, w):
        pol, _, div = losses.chunked_logps_and_divergence(
            h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="js", chunk_size=3)
        return jnp.sum(pol) + jnp.sum(div)

    check_grads(fn, (h, w), order=1, modes=["rev"])


def test_precomputed_topk_mode_equals_naive(x64):
    h, w, rh, rw, y = _inputs(3)
    idx, lps = losses.topk_reference(rh, rw, k=4, chunk_size=3)
    full = jax.nn.log_softmax(rh @ rw, -1)
    want_vals, want_idx = jax.lax.top_k(full, 4)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(lps, want_vals, rtol=1e-12)
    assert idx.dtype == jnp.int32

    def chunked(h, w):
        pol, ref, div = losses.chunked_logps_and_divergence(
            h, w, y, ref_topk=(idx, lps), divergence="kl", chunk_size=4)
        assert ref is None
        return jnp.sum(pol) + jnp.sum(div)

    naive = lambda h, w: jnp.sum(losses.token_logps(h @ w, y)) + jnp.sum(  # noqa: E731
        losses.topk_divergence("kl", h @ w, idx, lps))
    np.testing.assert_allclose(chunked(h, w), naive(h, w), rtol=1e-12)
    for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(naive, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_masked_head_computes_only_masked_positions_and_equals_naive(x64, chunk_size):
    """``mask=``: outputs are the naive head's where the mask is set and 0 elsewhere, values and
    gradients (live reference with a divergence, and a precomputed top-k reference); positions
    outside the mask get no gradient. (That skipped chunks are not computed: the test below.)"""
    h, w, rh, rw, y = _inputs(6)
    mask = jnp.asarray(np.random.default_rng(0).random((B, T)) < 0.4)
    assert 0 < int(mask.sum()) < B * T
    m = mask.astype(h.dtype)
    wt = jnp.linspace(0.5, 1.5, B * T).reshape(B, T)
    idx, lps = losses.topk_reference(rh, rw, k=4, chunk_size=3)

    def masked(h, w, topk=False):
        ref = dict(ref_topk=(idx, lps)) if topk else dict(ref_hidden=rh, ref_unembed=rw)
        pol, r, div = losses.chunked_logps_and_divergence(h, w, y, divergence="js", chunk_size=chunk_size,
                                                          mask=mask, **ref)
        return jnp.sum(wt * pol) + jnp.sum(wt * div) + (0.0 if r is None else 0.3 * jnp.sum(wt * r)), (pol, r, div)

    def naive(h, w, topk=False):
        pol = losses.token_logps(h @ w, y)
        if topk:
            r, div = None, losses.topk_divergence("js", h @ w, idx, lps)
        else:
            r, div = losses.token_logps(rh @ rw, y), losses.divergence("js", h @ w, rh @ rw)
        out = (pol * m, None if r is None else r * m, div * m)
        return jnp.sum(wt * out[0]) + jnp.sum(wt * out[2]) + (0.0 if r is None else 0.3 * jnp.sum(wt * out[1])), out

    for topk in (False, True):
        (v1, o1), g1 = jax.value_and_grad(masked, (0, 1), has_aux=True)(h, w, topk)
        (v2, o2), g2 = jax.value_and_grad(naive, (0, 1), has_aux=True)(h, w, topk)
        for a, b in zip(o1, o2):
            if b is not None:
                np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
                assert np.all(np.asarray(a)[~np.asarray(mask)] == 0)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        assert np.all(np.asarray(g1[0])[~np.asarray(mask)] == 0)
    check_grads(lambda h, w: masked(h, w)[0], (h, w), order=1, modes=["rev"])


def test_masked_head_skips_chunks_past_the_masked_positions(x64):
    """Chunks holding only unmasked positions are never computed: a NaN hidden state there (two
    chunks of B * 1 positions hold the 4 masked ones) leaves values and gradients finite, where
    computing its chunk would put 0 * NaN into the unembedding's gradient."""
    h, w, rh, rw, y = _inputs(7)
    mask = np.zeros((B, T), bool)
    mask[0, [1, 4]] = mask[1, [0, 6]] = True
    h = h.at[1, 3].set(jnp.nan)
    fn = lambda h, w: jnp.sum(losses.chunked_logps_and_divergence(  # noqa: E731
        h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="kl", chunk_size=1, mask=jnp.asarray(mask))[0])
    value, grads = jax.value_and_grad(fn, (0, 1))(h, w)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
    dense = lambda h, w: jnp.sum(losses.chunked_logps_and_divergence(  # noqa: E731
        h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="kl", chunk_size=1)[0] * mask)
    assert not np.isfinite(jax.grad(dense, 1)(h, w)).all()  # the check can fail


@pytest.mark.parametrize("fill", [False, True], ids=["empty", "full"])
def test_masked_head_with_an_empty_or_full_mask(x64, fill):
    """No masked position: zeros and zero gradients (the loop runs no chunk); every position masked:
    the unmasked head's values and gradients."""
    h, w, rh, rw, y = _inputs(8)
    mask = jnp.full((B, T), fill)

    def fn(h, w, mask):
        pol, ref, div = losses.chunked_logps_and_divergence(
            h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="kl", chunk_size=3, mask=mask)
        return jnp.sum(pol) + jnp.sum(div) + jnp.sum(ref), (pol, ref, div)

    (v1, o1), g1 = jax.value_and_grad(fn, (0, 1), has_aux=True)(h, w, mask)
    (v2, o2), g2 = jax.value_and_grad(fn, (0, 1), has_aux=True)(h, w, None)
    for a, b in zip(o1 + g1, o2 + g2):
        np.testing.assert_allclose(a, b if fill else np.zeros_like(b), rtol=1e-11, atol=1e-13)


def test_masked_head_gradient_keeps_no_per_chunk_unembedding():
    """Reverse mode through the masked head keeps each chunk's inputs, never an ``[n_chunks, H, V]``
    stack: skipping chunks by `lax.cond` inside a differentiated `lax.map` made every residual of the
    cond (the unembedding among them) a per-iteration output, stacking n copies of the unembedding
    (1.8 GB per step at SmolLM2's 49k vocabulary)."""
    h, w, rh, rw, y = _inputs(9, jnp.float32)
    mask = jnp.asarray(np.random.default_rng(1).random((B, T)) < 0.5)

    def fn(h, w):
        pol, _, div = losses.chunked_logps_and_divergence(
            h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="kl", chunk_size=1, mask=mask)
        return jnp.sum(pol) + jnp.sum(div)

    text = str(jax.make_jaxpr(jax.grad(fn, (0, 1)))(h, w))
    stacks = re.findall(rf"f32\[\d+,{H},{V}\]", text)
    assert not stacks, stacks[:3]


def test_wasserstein_through_the_chunked_head():
    h, w, rh, rw, y = _inputs(4, jnp.float32)
    emb = jax.random.normal(jax.random.PRNGKey(9), (V, 3))
    kw = dict(divergence="wasserstein", cost_embeddings=emb, epsilon=0.1, top_k=3)
    _, _, div = losses.chunked_logps_and_divergence(h, w, y, ref_hidden=rh, ref_unembed=rw, chunk_size=3, **kw)
    want = losses.divergence("wasserstein", h @ w, rh @ rw, cost_embeddings=emb, epsilon=0.1, top_k=3)
    np.testing.assert_allclose(div, want, rtol=1e-4, atol=1e-5)  # (gradients: test_wasserstein.py)


def test_no_retracing_on_repeated_calls():
    h, w, rh, rw, y = _inputs(5, jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(h, w, rh, rw, y):
        def loss(h, w):
            pol, ref, div = losses.chunked_logps_and_divergence(
                h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="kl", chunk_size=3)
            return jnp.sum(pol - ref) + jnp.sum(div)
        return jax.value_and_grad(loss, (0, 1))(h, w)

    chex.clear_trace_counter()
    for seed in range(3):
        h, w, rh, rw, y = _inputs(10 + seed, jnp.float32)
        step(h, w, rh, rw, y)  # a retrace would raise in chex


def _grad_temp_bytes(fn, b, t, hdim, v):
    h = jax.ShapeDtypeStruct((b, t, hdim), jnp.float32)
    w = jax.ShapeDtypeStruct((hdim, v), jnp.float32)
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)
    return jax.jit(jax.grad(fn, (0, 1))).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes


def test_backward_does_not_keep_full_logits():
    # Compile-only check of the remat: the chunked gradient's temporaries are a few [B, chunk, V]
    # blocks, independent of T; the naive gradient holds several [B, T, V] arrays.
    b, hdim, v, chunk = 2, 32, 8192, 32

    def chunked(h, w, y):
        return jnp.sum(losses.chunked_logps_and_divergence(h, w, y, ref_hidden=h, ref_unembed=w,
                                                           divergence="kl", chunk_size=chunk)[2])

    def naive(h, w, y):
        return jnp.sum(losses.divergence("kl", h @ w, jax.lax.stop_gradient(h @ w)))

    t512, t1024 = (_grad_temp_bytes(chunked, b, t, hdim, v) for t in (512, 1024))
    naive512 = _grad_temp_bytes(naive, b, 512, hdim, v)
    logits_bytes = b * 512 * v * 4
    print(f"temp bytes: chunked T=512 {t512:,}, T=1024 {t1024:,}; naive T=512 {naive512:,}; "
          f"one [B,T,V] f32 {logits_bytes:,}")
    assert naive512 >= logits_bytes
    assert t512 < naive512 / 4
    assert t1024 < 1.25 * t512  # does not grow with T


def test_bad_input():
    h, w, rh, rw, y = _inputs(6, jnp.float32)
    with pytest.raises(ValueError, match="labels shape"):
        losses.chunked_token_logps(h, w, y[:, :-1])
    with pytest.raises(ValueError, match="unembed"):
        losses.chunked_token_logps(h, w.T, y)
    with pytest.raises(ValueError, match="'chunk_size'"):
        losses.chunked_token_logps(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="ref_unembed is required"):
        losses.chunked_logps_and_divergence(h, w, y, ref_hidden=rh, divergence="kl")
    with pytest.raises(ValueError, match="needs ref_hidden"):
        losses.chunked_logps_and_divergence(h, w, y, divergence="kl")
    with pytest.raises(ValueError, match="without a divergence"):
        losses.chunked_logps_and_divergence(h, w, y, ref_hidden=rh, ref_unembed=rw, order=2.0)
    with pytest.raises(ValueError, match="'order' must be > 0"):
        losses.chunked_logps_and_divergence(h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="renyi", order=-1)
    with pytest.raises(ValueError, match="ref_topk"):
        losses.chunked_logps_and_divergence(h, w, y, ref_topk=(jnp.zeros((B, T, 2), int), jnp.zeros((B, T, 3))),
                                            divergence="kl")
    with pytest.raises(ValueError, match="'k'"):
        losses.topk_reference(h, w, k=0)
