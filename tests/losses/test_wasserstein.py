"""Top-k entropic OT (ott-jax Sinkhorn) against exact OT solved as a float64 linear program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.optimize import linprog

from dpok_jax import losses


def _cosine_cost(emb):
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0)


def _exact_ot(p, q, cost):
    """min <P, C> over couplings of p and q, as a linear program."""
    n = len(p)
    rows = np.kron(np.eye(n), np.ones((1, n)))  # Σ_j P_ij = p_i
    cols = np.kron(np.ones((1, n)), np.eye(n))  # Σ_i P_ij = q_j
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([p, q]), bounds=(0, None),
                  method="highs")
    assert res.status == 0
    return res.fun


def _setup(seed, v, batch, scale=1.5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, v)) * scale, rng.normal(size=(batch, v)) * scale, rng.normal(size=(v, 4))


@pytest.mark.parametrize("epsilon", [1e-2, 2e-3])
def test_full_support_matches_exact_linear_program(x64, epsilon):
    v = 6
    pl, rl, emb = _setup(0, v, 3)
    got = losses.divergence("wasserstein", jnp.asarray(pl), jnp.asarray(rl), cost_embeddings=jnp.asarray(emb),
                            epsilon=epsilon, top_k=v, threshold=1e-10, max_iterations=50_000, debiased=False)
    p, q = jax.nn.softmax(pl, -1), jax.nn.softmax(rl, -1)
    exact = np.array([_exact_ot(np.asarray(p[i]), np.asarray(q[i]), _cosine_cost(emb)) for i in range(3)])
    print(f"eps={epsilon}: sinkhorn {np.round(np.asarray(got), 5)}, exact OT {np.round(exact, 5)}")
    # reg_ot_cost = <P_ε, C> + ε KL(P_ε ‖ p⊗q) lies in [OT, OT + ε log V] (KL(P* ‖ p⊗q) <= log V).
    assert np.all(np.asarray(got) >= exact - 1e-6)
    assert np.all(np.asarray(got) <= exact + epsilon * np.log(v) + 1e-6)


def test_topk_truncation_error_is_bounded():
    v, eps = 64, 0.05
    pl, rl, emb = _setup(1, v, 16, scale=4.0)  # peaked, as LM next-token distributions mostly are
    pl, rl, emb = jnp.asarray(pl, jnp.float32), jnp.asarray(rl, jnp.float32), jnp.asarray(emb, jnp.float32)
    kw = dict(cost_embeddings=emb, epsilon=eps, threshold=1e-4, debiased=False)
    full = losses.divergence("wasserstein", pl, rl, top_k=v, **kw)
    p, q = jax.nn.softmax(pl, -1), jax.nn.softmax(rl, -1)
    for k in (4, 16):
        approx = losses.divergence("wasserstein", pl, rl, top_k=k, **kw)
        support = jnp.zeros_like(p, bool)
        for dist in (p, q):
            support = support | (dist >= jax.lax.top_k(dist, k)[0][..., -1:])
        outside = jnp.sum(jnp.where(support, 0.0, p), -1) + jnp.sum(jnp.where(support, 0.0, q), -1)
        err = np.abs(np.asarray(approx - full))
        print(f"top_k={k}: max |W_topk - W_full| = {err.max():.2e}, mean {err.mean():.2e}; "
              f"mean dropped mass {float(outside.mean()):.2e}")
        # Renormalizing moves each measure by TV <= its dropped mass, at cost <= 2 (cosine in [0, 2]).
        assert np.all(err <= 2.0 * np.asarray(outside) + eps * np.log(2 * k) + 1e-3)
    assert err.max() < 0.05


def test_gradients_float64_implicit_differentiation(x64):
    v = 5
    pl, rl, emb = _setup(2, v, 2)
    kw = dict(cost_embeddings=jnp.asarray(emb), epsilon=0.1, top_k=v, threshold=1e-12, max_iterations=20_000)
    fn = lambda a: jnp.sum(losses.divergence("wasserstein", a, jnp.asarray(rl), **kw))  # noqa: E731
    check_grads(jax.jit(fn), (jnp.asarray(pl),), order=1, modes=["rev"], atol=1e-5, rtol=1e-4)


def test_debiased_is_zero_at_identity_and_positive_elsewhere():
    pl, rl, emb = _setup(3, 20, 4)
    kw = dict(cost_embeddings=jnp.asarray(emb, jnp.float32), epsilon=0.05, top_k=5, debiased=True)
    div = jax.jit(lambda a, b: losses.divergence("wasserstein", a, b, **kw))  # one compile, two calls
    same = div(jnp.asarray(pl, jnp.float32), jnp.asarray(pl, jnp.float32))
    np.testing.assert_allclose(same, 0.0, atol=1e-4)
    other = div(jnp.asarray(pl, jnp.float32), jnp.asarray(rl, jnp.float32))
    assert np.all(np.asarray(other) > 1e-3)


def test_masked_tokens_batched_shapes_and_finite_gradients():
    v = 12
    pl, rl, emb = _setup(4, v, 6)
    pl = jnp.asarray(pl, jnp.float32).reshape(2, 3, v).at[..., :4].set(-jnp.inf)
    rl = jnp.asarray(rl, jnp.float32).reshape(2, 3, v).at[..., 2:6].set(-jnp.inf)
    kw = dict(cost_embeddings=jnp.asarray(emb, jnp.float32), epsilon=0.1, top_k=6)  # top-6 of p reaches zeros
    vg = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(losses.divergence("wasserstein", a, b, **kw))))
    assert jax.eval_shape(lambda a, b: losses.divergence("wasserstein", a, b, **kw), pl, rl).shape == (2, 3)
    for b in (rl, pl):  # masked supports; then p = q
        val, g = vg(pl, b)
        assert np.isfinite(val) and np.all(np.isfinite(g))


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_scaling_mode_equals_log_domain(x64, epsilon):
    """For ε >= 0.04 Sinkhorn runs on scalings by default; values and gradients equal the log domain."""
    pl, rl, emb = (jnp.asarray(x) for x in _setup(3, 12, 5))
    kw = dict(cost_embeddings=emb, epsilon=epsilon, top_k=4, threshold=1e-9, max_iterations=20_000)
    f = lambda lp, mode: jnp.sum(losses.divergence("wasserstein", lp, rl, lse_mode=mode, **kw))  # noqa: E731
    np.testing.assert_allclose(f(pl, None), f(pl, True), rtol=1e-7)
    np.testing.assert_allclose(f(pl, False), f(pl, True), rtol=1e-7)
    np.testing.assert_allclose(jax.grad(f)(pl, None), jax.grad(f)(pl, True), rtol=1e-6, atol=1e-9)


def test_small_epsilon_stays_finite_in_the_default_mode():
    """ε = 1e-3 would underflow exp(−C/ε) on scalings; the default switches to the log domain."""
    pl, rl, emb = (jnp.asarray(x, jnp.float32) for x in _setup(4, 12, 3))
    w = losses.divergence("wasserstein", pl, rl, cost_embeddings=emb, epsilon=1e-3, top_k=4)
    assert np.all(np.isfinite(np.asarray(w)))


def test_gibbs_geometry_equals_otts_dense_geometry(x64):
    """The precomputed-kernel geometry (scalings mode) changes the speed of Sinkhorn, not its result."""
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    from dpok_jax.losses._wasserstein import _geometry

    rng = np.random.default_rng(6)
    cost = jnp.asarray(rng.uniform(0.0, 2.0, (7, 7)))
    vec = jnp.asarray(rng.uniform(0.1, 1.0, 7))
    ours, ott_geom = _geometry(cost, 0.1, lse_mode=False), geometry.Geometry(cost_matrix=cost, epsilon=0.1)
    for axis in (0, 1):
        np.testing.assert_allclose(ours.apply_kernel(vec, eps=0.1, axis=axis),
                                   ott_geom.apply_kernel(vec, eps=0.1, axis=axis), rtol=1e-12)
    a, b = (jnp.asarray(rng.dirichlet(np.ones(7))) for _ in range(2))
    solver = sinkhorn.Sinkhorn(lse_mode=False, threshold=1e-10, max_iterations=10_000)
    out = [solver(linear_problem.LinearProblem(g, a=a, b=b)) for g in (ours, ott_geom)]
    assert int(out[0].n_iters) == int(out[1].n_iters)
    np.testing.assert_allclose(out[0].f, out[1].f, rtol=1e-10)
    np.testing.assert_allclose(out[0].reg_ot_cost, out[1].reg_ot_cost, rtol=1e-12)
    # Under jit the geometry round-trips as a pytree (the kernel is a leaf, not recomputed).
    leaves = jax.tree.leaves(ours)
    assert any(leaf.shape == (7, 7) and np.allclose(leaf, np.exp(-cost / 0.1)) for leaf in leaves)
    assert type(jax.tree.unflatten(jax.tree.structure(ours), leaves)) is type(ours)


# issue 10: the debiased default, its accuracy near p = q, and convergence reporting ------------------


def _near_identity(seed, v=50, n=3, delta=0.0):
    rng = np.random.default_rng(seed)
    ql = 2.0 * rng.normal(size=(n, v))
    return ql + delta * rng.normal(size=(n, v)), ql, rng.normal(size=(v, 8))


def test_default_is_debiased_zero_value_and_gradient_at_identity(x64):
    pl, _, emb = (jnp.asarray(x) for x in _near_identity(10))
    kw = dict(cost_embeddings=emb, epsilon=0.1, top_k=8)
    vg = jax.value_and_grad(lambda a, deb, **t: jnp.sum(losses.divergence("wasserstein", a, pl, debiased=deb,
                                                                          **kw, **t)))
    val, grad = vg(pl, True)  # zero to the solver's tolerance (threshold 1e-5 by default) ...
    assert abs(float(val)) < 1e-8 and float(jnp.linalg.norm(grad)) < 1e-3
    val, grad = vg(pl, True, threshold=1e-10, max_iterations=20_000)  # ... and with it
    assert abs(float(val)) < 1e-12 and float(jnp.linalg.norm(grad)) < 1e-8
    np.testing.assert_allclose(losses.divergence("wasserstein", pl, pl, **kw),
                               losses.divergence("wasserstein", pl, pl, debiased=True, **kw))
    # The biased cost pulls away from the reference: ~0.19 per position with a non-zero gradient.
    val_b, grad_b = vg(pl, False)
    assert float(val_b) / 3 > 0.1 and float(jnp.linalg.norm(grad_b)) > 1e-3


def test_debiased_gradient_near_identity_is_right_at_the_default_threshold(x64):
    pl, ql, emb = (jnp.asarray(x) for x in _near_identity(11, delta=1e-3))
    kw = dict(cost_embeddings=emb, epsilon=0.1, top_k=8)
    f = lambda a, **t: jnp.sum(losses.divergence("wasserstein", a, ql, **kw, **t))  # noqa: E731
    v_ref, g_ref = jax.value_and_grad(lambda a: f(a, threshold=1e-12, max_iterations=50_000))(pl)
    v_def, g_def = jax.value_and_grad(f)(pl)
    err = float(jnp.linalg.norm(g_def - g_ref) / jnp.linalg.norm(g_ref))
    v_old, g_old = jax.value_and_grad(lambda a: f(a, threshold=1e-3))(pl)
    err_old = float(jnp.linalg.norm(g_old - g_ref) / jnp.linalg.norm(g_ref))
    print(f"relative gradient error near p = q: default {err:.1e}, threshold 1e-3 {err_old:.1e}")
    assert err < 2e-2 and abs(float(v_def - v_ref)) < 1e-3 * abs(float(v_ref))
    assert err_old > 0.2  # why the default is not ott's 1e-3
    check_grads(lambda a: f(a, threshold=1e-12, max_iterations=50_000), (pl,), order=1, modes=["rev"],
                atol=1e-6, rtol=1e-4)


def test_unconverged_sinkhorn_is_reported_not_silent():
    v = 6
    pl, rl, emb = (jnp.asarray(x, jnp.float32) for x in _setup(0, v, 8))
    kw = dict(cost_embeddings=emb, epsilon=1e-3, top_k=v, debiased=False)
    # Too few iterations: flags, and an eager call without them warns.
    val, ok = losses.divergence("wasserstein", pl, rl, max_iterations=20, return_converged=True, **kw)
    assert ok.shape == (8,) and ok.dtype == jnp.bool_ and not bool(jnp.all(ok))
    with pytest.warns(RuntimeWarning, match="did not reach threshold"):
        losses.divergence("wasserstein", pl, rl, max_iterations=20, **kw)
    # The default iteration cap at small ε (max(2000, 100/ε)) converges these, and no value lies
    # below the exact optimal cost (an unconverged plan does: 12 of 40 such problems before).
    val, ok = losses.divergence("wasserstein", pl, rl, threshold=1e-3, return_converged=True, **kw)
    p = np.asarray(jax.nn.softmax(pl), np.float64)
    p = p / p.sum(-1, keepdims=True)
    q = np.asarray(jax.nn.softmax(rl), np.float64)
    q = q / q.sum(-1, keepdims=True)
    exact = np.array([_exact_ot(p[i], q[i], _cosine_cost(np.asarray(emb, np.float64))) for i in range(8)])
    assert bool(jnp.all(ok))
    assert np.all(np.asarray(val) >= exact - 1e-4)


def test_small_epsilon_converges_at_the_default_threshold_in_float64(x64):
    """ε = 1e-3, 40 random 6-token problems, default threshold 1e-5 and iteration cap: every solve
    converges and none lies below the exact optimal cost (with the earlier cap 20/ε, 3 did not
    converge)."""
    v = 6
    pl, rl, emb = (jnp.asarray(x) for x in _setup(7, v, 40))
    val, ok = losses.divergence("wasserstein", pl, rl, cost_embeddings=emb, epsilon=1e-3, top_k=v,
                                debiased=False, return_converged=True)
    assert bool(jnp.all(ok)), int(jnp.sum(~ok))
    p, q = (np.asarray(jax.nn.softmax(x)) for x in (pl, rl))
    cost = _cosine_cost(np.asarray(emb))
    exact = np.array([_exact_ot(p[i], q[i], cost) for i in range(40)])
    assert np.all(np.asarray(val) >= exact - 1e-6)
    assert np.all(np.asarray(val) <= exact + 1e-3 * np.log(v * v) + 1e-6)  # OT <= W_ε <= OT + ε log(n²)


def test_masked_divergence_reports_convergence_per_position():
    v, b, t = 12, 2, 5
    rng = np.random.default_rng(3)
    h, rh = (jnp.asarray(rng.normal(size=(b, t, 4)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(4, v)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, size=(b, t)))
    emb = jnp.asarray(rng.normal(size=(v, 4)), jnp.float32)
    kw = dict(cost_embeddings=emb, epsilon=1e-3, top_k=4, debiased=False, block_size=4)
    d, ok = losses.masked_divergence("wasserstein", h, w, rh, w, mask, max_iterations=20,
                                     return_converged=True, **kw)
    assert ok.shape == (b, t) and bool(jnp.all(ok[mask == 0]))
    assert not bool(jnp.all(ok[mask == 1]))
    d2, ok2 = losses.masked_divergence("wasserstein", h, w, rh, w, mask, threshold=1e-3,
                                       return_converged=True, **kw)
    assert bool(jnp.all(ok2))
    np.testing.assert_array_equal(losses.masked_divergence("wasserstein", h, w, rh, w, mask, threshold=1e-3,
                                                           **kw), d2)
