"""`losses.masked_divergence`: the divergence on masked positions only, compacted into blocks, equals
the dense per-position divergence there (values and gradients), is exactly 0 elsewhere, and skips
blocks holding no masked position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpok_jax import losses

B, T, H, V = 3, 7, 5, 13


def _inputs(seed, dtype=jnp.float64):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(ks[0], (B, T, H), dtype)
    w = jax.random.normal(ks[1], (H, V), dtype)
    rh = h + 0.5 * jax.random.normal(ks[2], (B, T, H), dtype)
    rw = w + 0.5 * jax.random.normal(ks[3], (H, V), dtype)
    mask = jax.random.bernoulli(ks[4], 0.4, (B, T)).astype(jnp.int32)
    return h, w, rh, rw, mask


def _dense(name, h, w, rh, rw, **params):
    return losses.divergence(name, h @ w, rh @ rw, **params)


@pytest.mark.parametrize("block_size", [1, 4, 64])
@pytest.mark.parametrize("name,params", [("kl", {}), ("js", {}), ("renyi", {"order": 0.7})])
def test_equals_dense_on_mask_values_and_gradients(x64, name, params, block_size):
    h, w, rh, rw, mask = _inputs(0)
    got = losses.masked_divergence(name, h, w, rh, rw, mask, block_size=block_size, **params)
    want = np.asarray(_dense(name, h, w, rh, rw, **params)) * np.asarray(mask)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(got)[np.asarray(mask) == 0] == 0.0)

    weights = jnp.linspace(0.5, 1.5, B * T).reshape(B, T)
    masked = lambda h, w: jnp.sum(weights * losses.masked_divergence(  # noqa: E731
        name, h, w, rh, rw, mask, block_size=block_size, **params))
    dense = lambda h, w: jnp.sum(weights * mask * _dense(name, h, w, rh, rw, **params))  # noqa: E731
    for g, r in zip(jax.grad(masked, (0, 1))(h, w), jax.grad(dense, (0, 1))(h, w)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_wasserstein_equals_dense_topk_sinkhorn():
    h, w, rh, rw, mask = _inputs(1, jnp.float32)
    emb = jax.random.normal(jax.random.PRNGKey(9), (V, 4))
    params = dict(cost_embeddings=emb, epsilon=0.1, top_k=3)
    got = losses.masked_divergence("wasserstein", h, w, rh, rw, mask, block_size=4, **params)
    want = np.asarray(_dense("wasserstein", h, w, rh, rw, **params)) * np.asarray(mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    masked = lambda h: jnp.sum(losses.masked_divergence(  # noqa: E731
        "wasserstein", h, w, rh, rw, mask, block_size=4, **params))
    dense = lambda h: jnp.sum(mask * _dense("wasserstein", h, w, rh, rw, **params))  # noqa: E731
    np.testing.assert_allclose(jax.grad(masked)(h), jax.grad(dense)(h), rtol=1e-4, atol=1e-6)


def test_empty_blocks_are_skipped():
    """With a mask of 2 positions and blocks of 2, one block runs; the divergence is called once
    per traced branch, and the untaken branch costs nothing at run time: count executions."""
    h, w, rh, rw, _ = _inputs(2, jnp.float32)
    mask = jnp.zeros((B, T), jnp.int32).at[0, 3].set(1).at[2, 6].set(1)
    calls = []

    def counting_kl(p, q):
        jax.debug.callback(lambda: calls.append(1))
        return losses.divergence("kl", p, q)

    import dpok_jax.losses._logprobs as lp

    original = lp._divergences.divergence
    lp._divergences.divergence = lambda name, p, q, **kw: counting_kl(p, q)
    try:
        out = jax.jit(lambda *a: losses.masked_divergence("kl", *a, block_size=2))(h, w, rh, rw, mask)
        jax.block_until_ready(out)
    finally:
        lp._divergences.divergence = original
    assert len(calls) == 1  # ceil(21 / 2) = 11 blocks, one of them solved
    np.testing.assert_allclose(np.asarray(out)[mask == 1],
                               np.asarray(_dense("kl", h, w, rh, rw))[mask == 1], rtol=1e-5)


def test_all_masked_out_gives_zeros_and_zero_gradients():
    h, w, rh, rw, _ = _inputs(3, jnp.float32)
    mask = jnp.zeros((B, T), jnp.int32)
    f = lambda h: jnp.sum(losses.masked_divergence("kl", h, w, rh, rw, mask))  # noqa: E731
    assert float(f(h)) == 0.0
    assert np.all(np.asarray(jax.grad(f)(h)) == 0.0)


def test_bad_inputs_name_the_argument():
    h, w, rh, rw, mask = _inputs(4, jnp.float32)
    with pytest.raises(ValueError, match="mask shape"):
        losses.masked_divergence("kl", h, w, rh, rw, mask[:, :-1])
    with pytest.raises(ValueError, match="block_size"):
        losses.masked_divergence("kl", h, w, rh, rw, mask, block_size=0)
    with pytest.raises(ValueError, match="ref_hidden shape"):
        losses.masked_divergence("kl", h, w, rh[:, :-1], rw, mask)
