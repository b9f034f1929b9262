"""Divergences: float64 references, gradients, zeros, extremes, precision, top-k mode, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from dpok_jax import losses
from dpok_jax.losses._divergences import hellinger_distance
from tests.losses import _ref_divergences as ref

V = 11

# (name, params, float64 reference on probability vectors)
CASES = [
    ("kl", {}, ref.kl),
    ("js", {}, ref.js),
    ("squared_hellinger", {}, ref.squared_hellinger),
    ("hellinger", {}, ref.squared_hellinger),
    ("bhattacharyya", {}, ref.bhattacharyya),
    ("renyi", {"order": 0.5}, lambda p, q: ref.renyi(p, q, 0.5)),
    ("renyi", {"order": 0.999}, lambda p, q: ref.renyi(p, q, 0.999)),
    ("renyi", {"order": 1.0}, lambda p, q: ref.renyi(p, q, 1.0)),
    ("renyi", {"order": 1.3}, lambda p, q: ref.renyi(p, q, 1.3)),
    ("renyi", {"order": 3.0}, lambda p, q: ref.renyi(p, q, 3.0)),
    *[("f", {"f": n}, (lambda fn: lambda p, q: ref.f_div(p, q, fn))(f)) for n, f in ref.F_SCALAR.items()],
    *[
        ("f", {"f": "alpha", "alpha": a}, (lambda fn: lambda p, q: ref.f_div(p, q, fn))(ref.alpha_f(a)))
        for a in (-0.5, 0.5, 2.0)
    ],
    ("f", {"f": lambda u: (u - 1.0) ** 2}, lambda p, q: ref.f_div(p, q, ref.F_SCALAR["chi2"])),
]
IDS = [n + "".join(f"-{k}={'callable' if callable(v) else v}" for k, v in p.items()) for n, p, _ in CASES]

# One case per distinct code path (aliases and registry entries that reuse a direct divergence left out).
DISTINCT = [("kl", {}), ("js", {}), ("squared_hellinger", {}), ("bhattacharyya", {}), ("renyi", {"order": 0.5}),
            ("renyi", {"order": 0.999}), ("renyi", {"order": 3.0}), ("f", {"f": "reverse_kl"}),
            ("f", {"f": "tv"}), ("f", {"f": "alpha", "alpha": 0.5})]

# Bounded divergences: finite for any pair of distributions, whatever their supports.
BOUNDED = [("js", {}), ("squared_hellinger", {}), ("f", {"f": "tv"}), ("f", {"f": "js"}),
           ("f", {"f": "squared_hellinger"}), ("renyi", {"order": 0.5}), ("f", {"f": "alpha", "alpha": 0.5})]


def _logits(key, shape, scale=2.0):
    return scale * jax.random.normal(jax.random.PRNGKey(key), shape)


@pytest.mark.parametrize("name,params,reference", CASES, ids=IDS)
def test_matches_float64_reference(x64, name, params, reference):
    rng = np.random.default_rng(abs(hash(str(params))) % 2**32)
    pl, rl = rng.normal(size=(2, 3, 5, V)) * 2.0
    got = losses.divergence(name, jnp.asarray(pl), jnp.asarray(rl), **params)
    assert got.dtype == jnp.float64 and got.shape == (3, 5)
    np.testing.assert_allclose(got, reference(ref.probs(pl), ref.probs(rl)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params,reference", CASES, ids=IDS)
def test_float32_close_to_float64(name, params, reference):
    pl, rl = np.asarray(_logits(1, (2, 4, V))), np.asarray(_logits(2, (4, V)))[None].repeat(2, 0)
    got = losses.divergence(name, jnp.asarray(pl), jnp.asarray(rl), **params)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference(ref.probs(pl), ref.probs(rl)), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,params,reference", CASES[:10], ids=IDS[:10])
def test_bf16_logits_are_upcast(name, params, reference):
    pl = _logits(3, (4, V)).astype(jnp.bfloat16)
    rl = _logits(4, (4, V)).astype(jnp.bfloat16)
    got = losses.divergence(name, pl, rl, **params)
    assert got.dtype == jnp.float32
    want = reference(ref.probs(np.asarray(pl, np.float64)), ref.probs(np.asarray(rl, np.float64)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,params,reference", CASES, ids=IDS)
def test_gradients_float64(x64, name, params, reference):
    pl, rl = _logits(5, (2, V)), _logits(6, (2, V))

    def fn(a, b):
        return jnp.sum(losses.divergence(name, a, b, **params) * jnp.array([1.0, 0.7]))

    check_grads(fn, (pl, rl), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,params,reference", CASES, ids=IDS)
def test_zero_at_identical_and_positive_elsewhere(name, params, reference):
    pl = _logits(7, (3, V))
    same = losses.divergence(name, pl, pl, **params)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    other = losses.divergence(name, pl, _logits(8, (3, V)), **params)
    assert np.all(np.asarray(other) > 1e-3)


def test_renyi_near_order_one_keeps_precision():
    # float32: a plain logsumexp / (a-1) has a ~1e-7/(a-1) error floor (here ~1e-2); see _log_power_sum.
    pl, rl = _logits(9, (4, V)), _logits(10, (4, V))
    want = ref.renyi(ref.probs(pl), ref.probs(rl), 1.0 + 1e-5)
    got = losses.divergence("renyi", pl, rl, order=1.0 + 1e-5)
    rel = np.max(np.abs(np.asarray(got) - want) / want)
    print(f"renyi order 1+1e-5, float32 max relative error: {rel:.2e}")
    assert rel < 1e-4
    np.testing.assert_allclose(losses.divergence("renyi", pl, rl, order=1.0),
                               losses.divergence("kl", pl, rl), rtol=1e-6)


def test_squared_hellinger_precise_near_identical():
    # H² ~ 1e-8 here; 1 - exp(logsumexp(.)) in float32 would be all rounding error.
    pl = _logits(11, (4, V))
    rl = pl + 2e-4 * jax.random.normal(jax.random.PRNGKey(12), pl.shape)
    want = ref.squared_hellinger(ref.probs(pl), ref.probs(rl))
    assert np.all(want < 1e-6)
    got = losses.divergence("squared_hellinger", pl, rl)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    np.testing.assert_allclose(losses.divergence("bhattacharyya", pl, rl), -np.log1p(-want), rtol=1e-3)


def test_shared_masked_entries_match_reference_on_support(x64):
    pl, rl = np.array(_logits(13, (3, V))), np.array(_logits(14, (3, V)))
    pl[:, :3] = rl[:, :3] = -np.inf
    for name, params in DISTINCT:
        g = jax.grad(lambda a: jnp.sum(losses.divergence(name, a, jnp.asarray(rl), **params)))(jnp.asarray(pl))
        assert np.all(np.isfinite(g)), (name, params)
    for name, params, reference in CASES:
        got = losses.divergence(name, jnp.asarray(pl), jnp.asarray(rl), **params)
        want = reference(ref.probs(pl[:, 3:]), ref.probs(rl[:, 3:]))
        np.testing.assert_allclose(got, want, rtol=1e-10, err_msg=f"{name} {params}")


def test_support_mismatch_is_inf_with_zero_gradient_not_nan():
    pl = _logits(15, (2, V))
    rl = _logits(16, (2, V)).at[:, 0].set(-jnp.inf)  # q = 0 where p > 0
    for name, params in [("kl", {}), ("renyi", {"order": 2.0}), ("f", {"f": "chi2"}),
                         ("f", {"f": "alpha", "alpha": 2.0})]:
        val, grad = jax.value_and_grad(lambda a: jnp.sum(losses.divergence(name, a, rl, **params)))(pl)
        assert val == jnp.inf, name
        assert np.all(np.asarray(grad) == 0), name
    disjoint_p = jnp.array([0.0, -jnp.inf]), jnp.array([-jnp.inf, 0.0])
    assert losses.divergence("bhattacharyya", *disjoint_p) == jnp.inf
    assert float(losses.divergence("squared_hellinger", *disjoint_p)) == pytest.approx(1.0)
    assert float(losses.divergence("js", *disjoint_p)) == pytest.approx(math.log(2.0))
    assert float(hellinger_distance(*disjoint_p)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- extreme inputs

_row = st.lists(
    st.one_of(st.sampled_from([1e4, -1e4, 0.0, -jnp.inf]), st.floats(-30, 30)), min_size=V, max_size=V
).filter(lambda r: any(x != -np.inf for x in r))


_JITTED = {}


def _jitted_flags(tag, cases, ok):
    """One jitted function: per case, does `ok(value, grad_a, grad_b)` hold? (one compile per list)"""
    key = (tag,) + tuple((n, tuple(sorted((k, id(v) if callable(v) else v) for k, v in p.items())))
                         for n, p in cases)
    if key not in _JITTED:
        def flags(a, b):
            out = []
            for name, params in cases:
                fn = lambda x, y: jnp.sum(losses.divergence(name, x, y, **params))  # noqa: E731
                val, (ga, gb) = jax.value_and_grad(fn, argnums=(0, 1))(a, b)
                out.append(ok(val, ga, gb))
            return jnp.stack(out)
        _JITTED[key] = jax.jit(flags)
    return _JITTED[key]


def _all_finite(cases):
    """Value and both gradients finite."""
    return _jitted_flags("finite", cases, lambda val, ga, gb: (
        jnp.isfinite(val) & jnp.all(jnp.isfinite(ga)) & jnp.all(jnp.isfinite(gb))))


def _no_nan(cases):
    """No NaN anywhere and a non-negative value (+inf allowed)."""
    return _jitted_flags("no_nan", cases, lambda val, ga, gb: (
        ~jnp.isnan(val) & (val >= -1e-6) & ~jnp.any(jnp.isnan(ga)) & ~jnp.any(jnp.isnan(gb))))


@settings(max_examples=25, deadline=None)
@given(p_row=_row, q_row=_row)
def test_bounded_divergences_finite_on_extreme_inputs(p_row, q_row):
    a, b = jnp.array([p_row]), jnp.array([q_row])
    check = _all_finite(BOUNDED)
    assert np.all(check(a, b)), (check(a, b), p_row, q_row)
    assert np.all(check(a, a)), (check(a, a), p_row)  # identical p, q


@settings(max_examples=25, deadline=None)
@given(p_row=_row, data=st.data())
def test_all_divergences_finite_on_extreme_inputs_with_shared_support(p_row, data):
    # Unbounded divergences are finite whenever the supports agree: mask q where p is masked.
    q_row = data.draw(st.lists(st.sampled_from([1e4, -1e4, 0.0, 3.0]), min_size=V, max_size=V))
    q_row = [-np.inf if p == -np.inf else q for p, q in zip(p_row, q_row)]
    a, b = jnp.array([p_row]), jnp.array([q_row])
    one_hot = jnp.where(jnp.arange(V) == int(np.argmax(p_row)), 0.0, -jnp.inf)[None]
    # chi2, alpha=2, alpha=-0.5 and the (u-1)^2 callable overflow float32 at 1e4 logit gaps: inf, not
    # NaN, is their right answer there (next test).
    check = _all_finite(DISTINCT)
    assert np.all(check(a, b)), (check(a, b), p_row, q_row)
    assert np.all(check(one_hot, one_hot))


@settings(max_examples=25, deadline=None)
@given(p_row=_row)
def test_overflowing_divergences_are_inf_or_finite_never_nan(p_row):
    a = jnp.array([p_row])
    b = jnp.where(a == -jnp.inf, -jnp.inf, 0.0)
    check = _no_nan([("f", {"f": "chi2"}), ("renyi", {"order": 3.0}), ("f", {"f": "alpha", "alpha": 2.0}),
                     ("f", {"f": "alpha", "alpha": -0.5})])
    assert np.all(check(a, b)), (check(a, b), p_row)


# ----------------------------------------------------------------------------- f registry


@pytest.mark.parametrize("key", sorted(losses.F_REGISTRY))
def test_registry_generator_convex_with_f1_zero_and_log_space_matches_generic(x64, key):
    entry = losses.F_REGISTRY[key]
    kw = {"alpha": 0.5} if entry.params else {}
    f = lambda u: entry.f(u, **kw)  # noqa: E731
    assert abs(float(f(jnp.float64(1.0)))) < 1e-12
    u = jnp.linspace(0.05, 8.0, 400)
    second = np.diff(np.asarray(f(u)), 2)
    assert np.all(second >= -1e-12)
    pl, rl = _logits(17, (3, V)), _logits(18, (3, V))
    np.testing.assert_allclose(losses.divergence("f", pl, rl, f=key, **kw),
                               losses.divergence("f", pl, rl, f=f), rtol=1e-10)


def test_registry_names_equal_the_direct_divergences(x64):
    pl, rl = _logits(19, (3, V)), _logits(20, (3, V))
    for f_name, direct in [("kl", "kl"), ("js", "js"), ("squared_hellinger", "squared_hellinger")]:
        np.testing.assert_allclose(losses.divergence("f", pl, rl, f=f_name), losses.divergence(direct, pl, rl))
    np.testing.assert_allclose(losses.divergence("f", pl, rl, f="reverse_kl"), losses.divergence("kl", rl, pl))
    np.testing.assert_allclose(losses.divergence("f", pl, rl, f="alpha", alpha=1.0), losses.divergence("kl", pl, rl))


# ----------------------------------------------------------------------------- top-k mode


def _topk(logits, k):
    lp = jax.nn.log_softmax(logits, -1)
    vals, idx = jax.lax.top_k(lp, k)
    return idx, vals


@pytest.mark.parametrize("name,params", [("kl", {}), ("js", {}), ("squared_hellinger", {}),
                                         ("renyi", {"order": 2.0}), ("f", {"f": "tv"})])
def test_topk_divergence_error_vs_exact(name, params):
    vocab = 256
    # Peaked-ish next-token distributions; the policy is a perturbation of the reference.
    base = 6.0 * jax.random.normal(jax.random.PRNGKey(21), (32, vocab))
    pl = base + 0.5 * jax.random.normal(jax.random.PRNGKey(22), base.shape)
    exact = np.asarray(losses.divergence(name, pl, base, **params))
    errors, tails = {}, {}
    for k in (4, 16, 64, vocab):  # 4 compiles per name: keep it eager, shapes are small
        idx, lq = _topk(base, k)
        approx = np.asarray(losses.topk_divergence(name, pl, idx, lq, **params))
        errors[k] = float(np.max(np.abs(approx - exact)))
        assert np.all(approx <= exact + 1e-5)  # data-processing inequality (f-divergences, Rényi)
        p_tail = 1.0 - np.sum(np.take_along_axis(np.asarray(jax.nn.softmax(pl)), np.asarray(idx), -1), -1)
        q_tail = 1.0 - np.sum(np.exp(np.asarray(lq)), -1)
        tails[k] = float(np.mean(q_tail))
        if params.get("f") == "tv":  # TV loses at most the tail's |p - q| mass
            assert np.all(exact - approx <= p_tail + q_tail + 1e-5)
    print(f"\n{name}{params} exact mean {exact.mean():.4f}; max |topk - exact| (mean ref tail mass) by k: "
          + ", ".join(f"k={k}: {e:.2e} ({tails[k]:.1e})" for k, e in errors.items()))
    assert errors[vocab] < 1e-4  # k = V: the tail is empty and the buckets are the vocabulary
    assert errors[4] > errors[16] > errors[64] > errors[vocab]
    assert errors[64] < 0.02 * exact.mean()
def test_topk_divergence_gradients_float64(x64):
    pl, rl = _logits(23, (2, V), 3.0), _logits(24, (2, V), 3.0)
    idx, lq = _topk(rl, 4)
    check_grads(lambda a: jnp.sum(losses.topk_divergence("js", a, idx, lq)), (pl,), order=1, modes=["rev"])
    check_grads(lambda a: jnp.sum(losses.topk_divergence("kl", a, idx, lq)), (pl,), order=1, modes=["rev"])


def test_topk_divergence_tail_is_stable_when_topk_holds_all_mass():
    pl = jnp.array([[0.0, -jnp.inf, -jnp.inf, 5.0]])
    idx, lq = _topk(jnp.array([[1.0, -jnp.inf, -jnp.inf, 2.0]]), 2)
    val, g = jax.value_and_grad(lambda a: jnp.sum(losses.topk_divergence("kl", a, idx, lq)))(pl)
    want = ref.kl(ref.probs([0.0, 5.0]), ref.probs([1.0, 2.0]))
    np.testing.assert_allclose(val, want, rtol=1e-5)
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,match", [
    (lambda a, b: losses.divergence("nope", a, b), "unknown divergence name"),
    (lambda a, b: losses.divergence("kl", a, b[:, :-1]), "policy_logits and ref_logits"),
    (lambda a, b: losses.divergence("renyi", a, b), "'order'"),
    (lambda a, b: losses.divergence("renyi", a, b, order=0.0), "'order' must be > 0"),
    (lambda a, b: losses.divergence("renyi", a, b, order=-1.0), "'order' must be > 0"),
    (lambda a, b: losses.divergence("kl", a, b, order=2.0), "unexpected parameter"),
    (lambda a, b: losses.divergence("f", a, b), "'f'"),
    (lambda a, b: losses.divergence("f", a, b, f="nope"), "unknown 'f'"),
    (lambda a, b: losses.divergence("f", a, b, f="alpha"), "'alpha'"),
    (lambda a, b: losses.divergence("wasserstein", a, b), "'cost_embeddings'"),
    (lambda a, b: losses.divergence("wasserstein", a, b, cost_embeddings=jnp.ones((V, 2)), epsilon=0.0),
     "'epsilon' must be > 0"),
    (lambda a, b: losses.divergence("wasserstein", a, b, cost_embeddings=jnp.ones((V, 2)), top_k=0), "'top_k'"),
    (lambda a, b: losses.divergence("wasserstein", a, b, cost_embeddings=jnp.ones((3, 2))), "'cost_embeddings'"),
    (lambda a, b: losses.topk_divergence("kl", a, jnp.zeros((2, 3), int), jnp.zeros((2, 4))), "ref_indices"),
    (lambda a, b: losses.topk_divergence("kl", a, jnp.zeros((5, 3), int), jnp.zeros((5, 3))), "leading shape"),
])
def test_bad_input_raises_value_error_at_trace_time(call, match):
    a, b = jnp.zeros((2, V)), jnp.zeros((2, V))
    with pytest.raises(ValueError, match=match):
        jax.jit(call)(a, b)
