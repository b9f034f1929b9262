"""Per-token and per-sequence log-probs: float64 reference, bf16 upcast, masks, gradients, extremes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from dpok_jax import losses
from tests.losses import _ref_divergences as ref

B, T, V = 3, 6, 13


def _inputs(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T, V)) * 3.0, rng.integers(0, V, (B, T)), (rng.random((B, T)) < 0.6)


def test_token_logps_matches_float64_reference(x64):
    logits, labels, _ = _inputs(0)
    got = losses.token_logps(jnp.asarray(logits), jnp.asarray(labels))
    assert got.dtype == jnp.float64 and got.shape == (B, T)
    np.testing.assert_allclose(got, ref.token_logps(logits, labels), rtol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_matches_float64_reference(x64, reduction):
    logits, labels, mask = _inputs(1)
    mask[0] = False  # an empty response: sum 0, mean 0 (no division by zero)
    tok = ref.token_logps(logits, labels) * mask
    want = tok.sum(-1) if reduction == "sum" else tok.sum(-1) / np.maximum(mask.sum(-1), 1)
    got = losses.sequence_logps(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert got[0] == 0.0


def test_bf16_logits_give_float32_logps():
    logits, labels, mask = _inputs(2)
    bf = jnp.asarray(logits, jnp.bfloat16)
    got = losses.token_logps(bf, jnp.asarray(labels))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref.token_logps(np.asarray(bf, np.float64), labels), rtol=1e-5, atol=1e-5)
    assert losses.sequence_logps(bf, jnp.asarray(labels), jnp.asarray(mask)).dtype == jnp.float32


def test_masked_out_minus_inf_token_does_not_poison_sum_or_gradient():
    logits, labels, mask = _inputs(3)
    logits[0, 0, labels[0, 0]] = -np.inf  # log p = -inf at a masked-out (prompt) position
    mask[0, 0] = False
    fn = lambda x: jnp.sum(losses.sequence_logps(x, jnp.asarray(labels), jnp.asarray(mask)))  # noqa: E731
    val, g = jax.value_and_grad(fn)(jnp.asarray(logits, jnp.float32))
    assert np.isfinite(val) and np.all(np.isfinite(g))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients_float64(x64, reduction):
    logits, labels, mask = _inputs(4)
    fn = lambda x: losses.sequence_logps(x, jnp.asarray(labels), jnp.asarray(mask), reduction=reduction)  # noqa: E731
    check_grads(fn, (jnp.asarray(logits),), order=2, modes=["rev"])
    check_grads(lambda x: losses.token_logps(x, jnp.asarray(labels)), (jnp.asarray(logits),), order=1, modes=["rev"])


@settings(max_examples=25, deadline=None)
@given(row=st.lists(st.one_of(st.sampled_from([1e4, -1e4, 0.0, -np.inf]), st.floats(-50, 50)),
                    min_size=V, max_size=V).filter(lambda r: max(r) > -np.inf))
def test_extreme_logits_finite_values_and_gradients(row):
    logits = jnp.array([[row]], jnp.float32)
    label = jnp.array([[int(np.argmax(row))]])  # the label has positive probability
    val, g = _value_and_grad(logits, label)
    assert np.isfinite(val) and np.all(np.isfinite(g))


@jax.jit
def _value_and_grad(logits, label):
    return jax.value_and_grad(lambda x: jnp.sum(losses.sequence_logps(x, label, jnp.ones_like(label))))(logits)


def test_bad_input():
    logits, labels, mask = _inputs(5)
    with pytest.raises(ValueError, match="labels shape"):
        losses.token_logps(jnp.asarray(logits), jnp.asarray(labels[:, :-1]))
    with pytest.raises(ValueError, match="mask shape"):
        losses.sequence_logps(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask[:, :-1]))
    with pytest.raises(ValueError, match="'reduction'"):
        losses.sequence_logps(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), reduction="max")
