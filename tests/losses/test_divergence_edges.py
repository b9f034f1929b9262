"""Divergences at their edges (issue 10): Rényi / alpha (a < 1) with p-mass off q's support, user
callables at float32 extremes, and overflow bounds of the chi2 / alpha power sums. Each test failed
on the code before the fix; references are float64 NumPy on probability vectors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from scipy.special import log_softmax

from dpok_jax import losses

ORDERS = (0.3, 0.5, 0.9, 0.999)
ALPHAS = (0.3, 0.5, 0.9)


def _power_sum(p, q, a):
    """Σ p^a q^(1−a) over tokens where both are > 0 (the other terms are 0 for 0 < a < 1)."""
    both = (p > 0) & (q > 0)
    return np.sum(np.where(both, p ** a * np.where(both, q, 1.0) ** (1.0 - a), 0.0), axis=-1)


def _renyi_ref(p, q, a):
    with np.errstate(divide="ignore"):
        return np.log(_power_sum(p, q, a)) / (a - 1.0)


def _alpha_ref(p, q, a):
    return (_power_sum(p, q, a) - 1.0) / (a * (a - 1.0))


def _log(x):
    with np.errstate(divide="ignore"):
        return jnp.log(jnp.asarray(x, jnp.float64))


def test_issue_examples_renyi_half_with_mass_off_support(x64):
    # p = (2/3, 1/3), q = (1, 0): renyi(0.5) = −2 log sqrt(2/3) = log 1.5 (was −0.2792).
    got = losses.divergence("renyi", _log([2 / 3, 1 / 3]), _log([1.0, 0.0]), order=0.5)
    np.testing.assert_allclose(got, math.log(1.5), rtol=1e-12)
    # 1% of p's mass off q's support: +0.01005 (was −0.00995).
    p, q = np.array([0.495, 0.495, 0.01]), np.array([0.5, 0.5, 0.0])
    got = losses.divergence("renyi", _log(p), _log(q), order=0.5)
    np.testing.assert_allclose(got, _renyi_ref(p, q, 0.5), rtol=1e-12)
    assert float(got) == pytest.approx(0.0100503, rel=1e-5)


@pytest.mark.parametrize("a", ALPHAS)
def test_alpha_f_with_mass_off_support_matches_reference_and_gradients(x64, a):
    rng = np.random.default_rng(0)
    pl, rl = rng.normal(size=(2, 4, 9)) * 2.0
    rl[:, :3] = -np.inf  # q = 0 where p > 0
    p, q = np.exp(log_softmax(pl, -1)), np.exp(log_softmax(rl, -1))
    got = losses.divergence("f", jnp.asarray(pl), jnp.asarray(rl), f="alpha", alpha=a)
    np.testing.assert_allclose(got, _alpha_ref(p, q, a), rtol=1e-10)
    got_r = losses.divergence("renyi", jnp.asarray(pl), jnp.asarray(rl), order=a)
    np.testing.assert_allclose(got_r, _renyi_ref(p, q, a), rtol=1e-10)
    rlj = jnp.asarray(rl)
    check_grads(lambda x: jnp.sum(losses.divergence("f", x, rlj, f="alpha", alpha=a)), (jnp.asarray(pl),),
                order=1, modes=["rev"], atol=1e-7, rtol=1e-6)
    check_grads(lambda x: jnp.sum(losses.divergence("renyi", x, rlj, order=a)), (jnp.asarray(pl),),
                order=1, modes=["rev"], atol=1e-7, rtol=1e-6)


def test_disjoint_supports_and_p_positive_where_q_zero(x64):
    p, q = _log([0.6, 0.4, 0.0, 0.0]), _log([0.0, 0.0, 0.3, 0.7])
    for a in ORDERS:
        assert losses.divergence("renyi", p, q, order=a) == jnp.inf  # −log 0 / (1 − a)
    for a in ALPHAS:  # Σ p^a q^(1−a) = 0: (0 − 1)/(a(a − 1)) = 1/(a(1 − a)), finite
        np.testing.assert_allclose(losses.divergence("f", p, q, f="alpha", alpha=a), 1.0 / (a * (1.0 - a)),
                                   rtol=1e-12)


_mask = st.lists(st.booleans(), min_size=8, max_size=8).filter(any)


@settings(max_examples=30, deadline=None)
@given(p_mask=_mask, q_mask=_mask, seed=st.integers(0, 2**16))
def test_nonnegative_and_exact_on_random_supports(p_mask, q_mask, seed):
    rng = np.random.default_rng(seed)
    pl, rl = rng.normal(size=(2, 8)) * 3.0
    pl[~np.array(p_mask)] = -np.inf
    rl[~np.array(q_mask)] = -np.inf
    p, q = np.exp(log_softmax(pl)), np.exp(log_softmax(rl))
    with jax.enable_x64(True):
        for a in ORDERS:
            got = float(losses.divergence("renyi", jnp.asarray(pl), jnp.asarray(rl), order=a))
            want = float(_renyi_ref(p, q, a))
            assert got >= 0.0, (a, got, want)
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        for a in ALPHAS:
            got = float(losses.divergence("f", jnp.asarray(pl), jnp.asarray(rl), f="alpha", alpha=a))
            assert got >= 0.0
            np.testing.assert_allclose(got, float(_alpha_ref(p, q, a)), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- user callables

USER = {
    "kl": lambda u: u * jnp.log(u),
    "tv": lambda u: 0.5 * jnp.abs(u - 1.0),
    "reverse_kl": lambda u: -jnp.log(u),
    "js": lambda u: 0.5 * (u * jnp.log(u) - (u + 1.0) * jnp.log((u + 1.0) / 2.0)),
}


def _f_ref(pl, rl, name):
    """Σ q f(p/q) in float64 log space (the registry's definitions; no u = p/q is formed)."""
    lp, lq = log_softmax(np.asarray(pl, np.float64)), log_softmax(np.asarray(rl, np.float64))
    p, q, d = np.exp(lp), np.exp(lq), lp - lq
    if name == "kl":
        return np.sum(p * d)
    if name == "reverse_kl":
        return np.sum(q * -d)
    if name == "tv":
        return 0.5 * np.sum(np.abs(p - q))
    m = 0.5 * (p + q)
    return 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))


@pytest.mark.parametrize("name", sorted(USER))
def test_user_callable_at_float32_extremes_equals_registry(name):
    # log p − log q ≈ ±100: u = e^100 overflows float32 (the callable gave NaN values and gradients).
    for pol, ref in (([10.0, 0, 0, 0], [-90.0, 10, 0, 0]), ([-90.0, 10, 0, 0], [10.0, 0, 0, 0])):
        a, b = jnp.asarray(pol, jnp.float32), jnp.asarray(ref, jnp.float32)
        fn = lambda x, f: jnp.sum(losses.divergence("f", x, b, f=f))  # noqa: E731
        val, grad = jax.value_and_grad(fn)(a, USER[name])
        reg_val, reg_grad = jax.value_and_grad(fn)(a, name)
        np.testing.assert_allclose(val, _f_ref(pol, ref, name), rtol=2e-5)
        np.testing.assert_allclose(val, reg_val, rtol=2e-5)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, reg_grad, rtol=1e-3, atol=1e-6)


def test_user_callable_tail_extension_float64_values_and_gradients(x64):
    # |log u| = 800 > log(max) − 8 = 701.8 in float64: both linear tails are exercised.
    for name, pol, ref in (("kl", [400.0, 0, 0, 0], [-400.0, 0, 0, 0]),
                           ("reverse_kl", [-400.0, 0, 0, 0], [400.0, 0, 0, 0]),
                           ("tv", [400.0, 0, 0, 0], [-400.0, 0, 0, 0])):
        b = jnp.asarray(ref)
        fn = lambda x: losses.divergence("f", x, b, f=USER[name])  # noqa: E731
        np.testing.assert_allclose(fn(jnp.asarray(pol)), _f_ref(pol, ref, name), rtol=1e-12)
        check_grads(fn, (jnp.asarray(pol),), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_user_callable_overflowing_generator_is_inf_never_nan():
    # (u − 1)^2 overflows float32 near u = e^44: +inf with a zero gradient, like the registry's chi2.
    a, b = jnp.asarray([10.0, 0, 0, 0]), jnp.asarray([-90.0, 10, 0, 0])
    val, grad = jax.value_and_grad(lambda x: losses.divergence("f", x, b, f=lambda u: (u - 1.0) ** 2))(a)
    assert val == jnp.inf and np.all(np.asarray(grad) == 0.0)


# ----------------------------------------------------------------------------- overflow bounds


def test_chi2_float64_is_finite_past_e80(x64):
    # True value Σ p²/q − 1 ≈ e^100 = 2.69e43 (the fixed cutoff of 80 returned inf).
    pl, rl = np.array([0.0, -100.0]), np.array([-100.0, 0.0])
    p, q = np.exp(log_softmax(pl)), np.exp(log_softmax(rl))
    want = np.sum(p * p / q) - 1.0
    got = losses.divergence("f", jnp.asarray(pl), jnp.asarray(rl), f="chi2")
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert 2.6e43 < float(got) < 2.7e43


def test_chi2_and_alpha_float32_between_e80_and_float32_max():
    # log Σ p²/q ≈ 85: finite in float32, with the exact (non-zero) gradient.
    pl, rl = np.array([0.0, -85.0]), np.array([-85.0, 0.0])
    a, b = jnp.asarray(pl, jnp.float32), jnp.asarray(rl, jnp.float32)
    p, q = np.exp(log_softmax(pl)), np.exp(log_softmax(rl))
    chi2 = np.sum(p * p / q) - 1.0
    val, grad = jax.value_and_grad(lambda x: losses.divergence("f", x, b, f="chi2"))(a)
    np.testing.assert_allclose(val, chi2, rtol=1e-4)
    with jax.enable_x64(True):  # float64 reference gradient of the same function
        g64 = jax.grad(lambda x: losses.divergence("f", x, jnp.asarray(rl), f="chi2"))(jnp.asarray(pl))
    np.testing.assert_allclose(grad, g64, rtol=1e-3)
    assert abs(float(grad[1])) > 1.0  # the old cutoff (80) gave +inf with a zero gradient here
    # alpha = 2 is chi2 / 2; alpha = 1.001 divides by 0.001: past float32's max it is +inf, not NaN.
    np.testing.assert_allclose(losses.divergence("f", a, b, f="alpha", alpha=2.0), chi2 / 2.0, rtol=1e-4)
    big = jnp.asarray([0.0, -200.0], jnp.float32), jnp.asarray([-200.0, 0.0], jnp.float32)
    v, g = jax.value_and_grad(lambda x: losses.divergence("f", x, big[1], f="alpha", alpha=3.0))(big[0])
    assert v == jnp.inf and np.all(np.asarray(g) == 0.0)
