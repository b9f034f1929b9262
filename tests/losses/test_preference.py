"""Implicit rewards, preference links and dpo_kernels_loss (SPEC §2, §5, §7, §8)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from dpok_jax import losses
from tests.losses import _ref_kernels as ref

REWARDS = ("reverse_kl", "forward_kl", "js", "alpha")
TRL_NAME = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js_divergence",
            "alpha": "alpha_divergence"}


def _logps(rng, b=8):
    pc, pr, rc, rr = (rng.normal(-20.0, 4.0, size=b) for _ in range(4))
    return pc, pr, rc, rr


# implicit rewards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REWARDS)
def test_implicit_reward_matches_spec_formula(x64, name):
    rng = np.random.default_rng(0)
    pol, refl = rng.normal(-10, 2, size=9), rng.normal(-10, 2, size=9)
    params = {"alpha": 0.3} if name == "alpha" else {}
    got = losses.implicit_reward(name, pol, refl, beta=0.2, **params)
    np.testing.assert_allclose(got, ref.spec_reward(name, pol, refl, 0.2, alpha=0.3), rtol=1e-10,
                               atol=1e-13)
    # Every reward is 0 where the policy equals the reference.
    np.testing.assert_allclose(losses.implicit_reward(name, pol, pol, beta=0.2, **params), 0.0,
                               atol=1e-15)


@pytest.mark.parametrize(("name", "a"), [("reverse_kl", None), ("forward_kl", None), ("js", None),
                                         ("alpha", 0.3), ("alpha", 0.5), ("alpha", 1.7),
                                         ("alpha", -0.4)])
def test_reward_margin_equals_trl(x64, name, a):
    """β·logits of TRL's f_divergence_type, both its older (dpo_loss) and newer (scores) code."""
    a = 0.5 if a is None else a
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-10, 1.5, size=11) for _ in range(4))
    beta = 0.3
    params = {"alpha": a} if name == "alpha" else {}
    z = (losses.implicit_reward(name, pc, rc, beta=beta, **params)
         - losses.implicit_reward(name, pr, rr, beta=beta, **params))
    new = ref.trl_logits_scores(TRL_NAME[name], pc, pr, rc, rr, alpha_coef=1.0 - a)
    np.testing.assert_allclose(z, beta * new, rtol=1e-10, atol=1e-13)
    if name != "forward_kl":  # the older dpo_loss had no forward_kl branch
        old = ref.trl_logits_legacy(TRL_NAME[name], pc, pr, rc, rr, alpha_coef=a)
        np.testing.assert_allclose(z, beta * old, rtol=1e-10, atol=1e-13)


def test_alpha_zero_is_reverse_kl(x64):
    rng = np.random.default_rng(2)
    pol, refl = rng.normal(size=5), rng.normal(size=5)
    np.testing.assert_array_equal(losses.implicit_reward("alpha", pol, refl, beta=0.1, alpha=0.0),
                                  losses.implicit_reward("reverse_kl", pol, refl, beta=0.1))
    near = losses.implicit_reward("alpha", pol, refl, beta=0.1, alpha=1e-7)
    np.testing.assert_allclose(near, 0.1 * (pol - refl), rtol=1e-5)


@pytest.mark.parametrize("name", REWARDS)
def test_implicit_reward_grads(x64, name):
    rng = np.random.default_rng(3)
    pol, refl = rng.normal(size=4), rng.normal(size=4)
    params = {"alpha": 0.4} if name == "alpha" else {}
    f = jax.jit(lambda p, r: losses.implicit_reward(name, p, r, beta=0.7, **params))
    check_grads(f, (pol, refl), order=2, modes=("fwd", "rev"))


# links ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_sigmoid_with_label_smoothing_equals_trl(x64, eps):
    rng = np.random.default_rng(4)
    logits, beta = rng.normal(0, 5, size=10), 0.25
    got = losses.preference_loss("sigmoid", beta * logits, label_smoothing=eps)
    np.testing.assert_allclose(got, ref.trl_losses("sigmoid", logits, beta, eps), rtol=1e-10)


def test_hinge_and_ipo_equal_trl(x64):
    rng = np.random.default_rng(5)
    logits, beta = rng.normal(0, 5, size=10), 0.25
    np.testing.assert_allclose(losses.preference_loss("hinge", beta * logits),
                               ref.trl_losses("hinge", logits, beta), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(losses.preference_loss("ipo", beta * logits, beta=beta),
                               ref.trl_losses("ipo", logits, beta), rtol=1e-10)


@pytest.mark.parametrize("link", ["sigmoid", "hinge", "ipo"])
def test_link_grads(x64, link):
    # Away from the hinge's kink at h = 1, where the derivative jumps.
    h = np.array([-3.0, -0.4, 0.3, 2.5])
    params = {"sigmoid": {"label_smoothing": 0.2}, "hinge": {}, "ipo": {"beta": 0.3}}[link]
    check_grads(jax.jit(lambda m: losses.preference_loss(link, m, **params)), (h,), order=2,
                modes=("fwd", "rev"))


@functools.lru_cache(maxsize=None)
def _link_value_and_grad(link, eps):
    params = {"sigmoid": {"label_smoothing": eps}, "hinge": {}, "ipo": {"beta": 0.1}}[link]
    f = lambda m: losses.preference_loss(link, m, **params)  # noqa: E731
    return jax.jit(lambda m: (f(m), jax.grad(lambda t: jnp.sum(f(t)))(m)))


@pytest.mark.parametrize("link", ["sigmoid", "hinge", "ipo"])
@settings(max_examples=25, deadline=None)
@given(m=st.floats(-1e4, 1e4, allow_nan=False), eps=st.sampled_from([0.0, 0.1, 0.5]))
def test_links_finite_at_extreme_margins(link, m, eps):
    margins = jnp.array([m, -m, 1e4, -1e4, 0.0], jnp.float32)
    v, g = _link_value_and_grad(link, eps)(margins)
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(g))
    if link == "sigmoid" and eps == 0.0:
        assert float(v[2]) < 1e-30 and abs(float(v[3]) - 1e4) < 1.0


@functools.lru_cache(maxsize=None)
def _reward_value_and_grad(name):
    def total(p, r):
        return jnp.sum(losses.implicit_reward(name, p, r, beta=0.5, **params))

    params = {"alpha": 0.5} if name == "alpha" else {}
    return jax.jit(lambda p, r: (losses.implicit_reward(name, p, r, beta=0.5, **params),
                                 jax.grad(total, argnums=(0, 1))(p, r)))


@pytest.mark.parametrize("name", REWARDS)
@settings(max_examples=25, deadline=None)
@given(x=st.floats(-1e4, 1e4, allow_nan=False))
def test_implicit_rewards_finite_at_extreme_log_ratios(name, x):
    pol = jnp.array([x, -x, 1e4, -1e4], jnp.float32)
    refl = jnp.zeros(4, jnp.float32)
    v, grads = _reward_value_and_grad(name)(pol, refl)
    assert np.all(np.isfinite(v))
    assert all(np.all(np.isfinite(g)) for g in grads)
    margin = losses.preference_loss("sigmoid", v[:2] - v[2:])
    assert np.all(np.isfinite(margin))


# the whole objective -------------------------------------------------------------------------------


def test_plain_dpo_is_textbook_dpo(x64):
    rng = np.random.default_rng(6)
    pc, pr, rc, rr = _logps(rng)
    loss, m = losses.dpo_kernels_loss(pc, pr, rc, rr, beta=0.1)
    np.testing.assert_allclose(loss, ref.dpo_textbook(pc, pr, rc, rr, 0.1).mean(), rtol=1e-12)
    cr, rj = 0.1 * (pc - rc), 0.1 * (pr - rr)
    np.testing.assert_allclose(m["rewards/chosen"], cr.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/rejected"], rj.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/margins"], (cr - rj).mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(cr > rj), rtol=1e-12)
    np.testing.assert_allclose(m["logps/chosen"], pc.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["logps/rejected"], pr.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["loss/preference"], loss, rtol=1e-12)
    assert not any(k.startswith(("hmk/", "embedding/", "divergence/", "hybrid/")) for k in m)


@pytest.mark.parametrize("reward", REWARDS)
@pytest.mark.parametrize("link", ["sigmoid", "hinge", "ipo"])
def test_loss_equals_trl_for_every_reward_and_link(x64, reward, link):
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (rng.normal(-10, 1.5, size=6) for _ in range(4))
    beta, eps = 0.2, (0.15 if link == "sigmoid" else 0.0)
    loss, _ = losses.dpo_kernels_loss(pc, pr, rc, rr, beta=beta, link=link, label_smoothing=eps,
                                      reward=reward,
                                      reward_params={"alpha": 0.6} if reward == "alpha" else None)
    logits = ref.trl_logits_scores(TRL_NAME[reward], pc, pr, rc, rr, alpha_coef=0.4)
    np.testing.assert_allclose(loss, ref.trl_losses(link, logits, beta, eps).mean(), rtol=1e-10)


@pytest.fixture(scope="module")
def kernel_setup():
    rng = np.random.default_rng(8)
    kp = losses.fit_kernel_params(*(rng.normal(size=(40, 5)) for _ in range(3)), dtype=np.float64)
    emb = tuple(rng.normal(size=(6, 5)) for _ in range(3))
    th = {k: rng.normal(size=2) for k in ("theta_L", "theta_G", "theta_tau")}
    return kp, emb, th


def test_full_objective_matches_reference(x64, kernel_setup):
    kp, emb, th = kernel_setup
    rng = np.random.default_rng(9)
    pc, pr, rc, rr = _logps(rng, 6)
    div = rng.uniform(0, 0.3, size=(12, 7))
    mask = (rng.uniform(size=(12, 7)) > 0.3).astype(np.float64)
    div_masked = np.where(mask > 0, div, np.nan)  # padding may hold garbage; it must not leak
    nll = rng.uniform(1, 3, size=6)
    beta, gamma, eta, alpha, sft, eps = 0.1, 0.7, 0.05, 0.2, 0.3, 0.1
    loss, m = losses.dpo_kernels_loss(
        pc, pr, rc, rr, beta=beta, label_smoothing=eps, gamma=gamma, kernel="hmk", embeddings=emb,
        kernel_params=kp, hmk_params=th, eta=eta, divergence=div_masked, divergence_mask=mask,
        alpha=alpha, divergence_name="js", sft_weight=sft, chosen_nll=nll)
    s = ref.score("hmk", *emb, kp, th)
    z = beta * ((pc - rc) - (pr - rr))
    h = z + gamma * s
    pref = ref.trl_losses("sigmoid", h, 1.0, eps)
    lam_l, lam_g, tau = (ref.softmax(th[k]) for k in ("theta_L", "theta_G", "theta_tau"))
    ent = ref.entropy(lam_l) + ref.entropy(lam_g) + ref.entropy(tau)
    div_mean = np.sum(div * mask) / np.sum(mask)
    want = pref.mean() + alpha * div_mean - eta * ent + sft * nll.mean()
    np.testing.assert_allclose(loss, want, rtol=1e-9)
    np.testing.assert_allclose(m["embedding/score"], s.mean(), rtol=1e-9)
    np.testing.assert_allclose(m["hybrid/accuracies"], np.mean(h > 0), rtol=1e-12)
    np.testing.assert_allclose(m["hybrid/margins"], h.mean(), rtol=1e-9)
    np.testing.assert_allclose(m["divergence/js"], div_mean, rtol=1e-12)
    np.testing.assert_allclose(m["hmk/entropy"], ent, rtol=1e-12)
    np.testing.assert_allclose(m["hmk/lambda_poly"], lam_l[1], rtol=1e-12)
    np.testing.assert_allclose(m["hmk/tau_global"], tau[1], rtol=1e-12)
    np.testing.assert_allclose(m["loss/sft"], nll.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["loss/preference"], pref.mean(), rtol=1e-9)
    assert {"hmk/lambda_rbf", "hmk/lambda_spec", "hmk/lambda_maha", "hmk/tau_local"} <= set(m)


def test_mixture_and_single_kernel_objectives(x64, kernel_setup):
    kp, emb, _ = kernel_setup
    rng = np.random.default_rng(10)
    pc, pr, rc, rr = _logps(rng, 6)
    tm = {"theta": rng.normal(size=4)}
    z = 0.1 * ((pc - rc) - (pr - rr))
    loss, m = losses.dpo_kernels_loss(pc, pr, rc, rr, beta=0.1, gamma=0.5, kernel="mixture",
                                      embeddings=emb, kernel_params=kp, mixture_params=tm, eta=0.1)
    s = ref.score("mixture", *emb, kp, tm)
    want = ref.trl_losses("sigmoid", z + 0.5 * s, 1.0).mean() - 0.1 * ref.entropy(ref.softmax(tm["theta"]))
    np.testing.assert_allclose(loss, want, rtol=1e-9)
    assert {"mixture/lambda_rbf", "mixture/lambda_poly", "mixture/lambda_spec",
            "mixture/lambda_maha", "mixture/entropy"} <= set(m)
    loss, m = losses.dpo_kernels_loss(pc, pr, rc, rr, beta=0.1, gamma=2.0, kernel="mahalanobis",
                                      embeddings=emb, kernel_params=kp)
    s = ref.score("mahalanobis", *emb, kp)
    np.testing.assert_allclose(loss, ref.trl_losses("sigmoid", z + 2.0 * s, 1.0).mean(), rtol=1e-9)
    assert not any(k.startswith(("hmk/", "mixture/")) for k in m)


def test_objective_grads(x64, kernel_setup):
    kp, emb, th = kernel_setup
    rng = np.random.default_rng(11)
    pc, pr, rc, rr = _logps(rng, 6)
    div = rng.uniform(0, 0.3, size=(12, 4))
    nll = rng.uniform(1, 3, size=6)

    def f(pc, pr, e_x, e_pos, e_neg, th, div, nll):
        return losses.dpo_kernels_loss(
            pc, pr, rc, rr, beta=0.1, label_smoothing=0.1, gamma=0.7, kernel="hmk",
            embeddings=(e_x, e_pos, e_neg), kernel_params=kp, hmk_params=th, eta=0.05,
            divergence=div, alpha=0.2, sft_weight=0.3, chosen_nll=nll)[0]

    check_grads(jax.jit(f), (pc, pr, *emb, th, div, nll), order=1, modes=("rev",))


def test_objective_under_jit_and_theta_gets_gradient(kernel_setup):
    kp, emb, _ = kernel_setup
    kp32 = jax.tree.map(lambda v: np.asarray(v, np.float32) if isinstance(v, np.ndarray) else v, kp)
    rng = np.random.default_rng(12)
    pc, pr, rc, rr = (jnp.asarray(v, jnp.float32) for v in _logps(rng, 6))
    emb32 = tuple(jnp.asarray(e, jnp.float32) for e in emb)

    def loss_fn(th, pc):
        return losses.dpo_kernels_loss(pc, pr, rc, rr, beta=0.1, gamma=0.7, kernel="hmk",
                                       embeddings=emb32, kernel_params=kp32, hmk_params=th, eta=0.1)

    (loss, m), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(losses.init_hmk_params(), pc)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert all(v.shape == () and v.dtype == jnp.float32 for v in m.values())
    assert any(np.any(np.abs(v) > 0) for v in g.values())


# bad input -----------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        losses.implicit_reward("reverse_kl", x, x, beta=0.0)
    with pytest.raises(ValueError, match="unknown implicit reward"):
        losses.implicit_reward("tv", x, x, beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        losses.implicit_reward("js", x, jnp.zeros(4), beta=0.1)
    with pytest.raises(ValueError, match="alpha"):
        losses.implicit_reward("alpha", x, x, beta=0.1, alpha=float("nan"))
    with pytest.raises(ValueError, match="unknown parameter"):
        losses.implicit_reward("js", x, x, beta=0.1, alpha=0.5)
    with pytest.raises(ValueError, match="unknown link"):
        losses.preference_loss("logistic", x)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.preference_loss("sigmoid", x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="needs beta"):
        losses.preference_loss("ipo", x)
    with pytest.raises(ValueError, match="beta"):
        losses.preference_loss("ipo", x, beta=-1.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        losses.preference_loss("hinge", x, beta=0.1)
    with pytest.raises(ValueError, match="one shape"):
        losses.dpo_kernels_loss(x, x, x, jnp.zeros(4), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_kernels_loss(x, x, x, x, beta=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, gamma=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, link="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs a kernel"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, gamma=1.0)
    with pytest.raises(ValueError, match="embeddings"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, gamma=1.0, kernel="rbf")
    with pytest.raises(ValueError, match="embeddings"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, gamma=1.0, kernel="rbf",
                                embeddings=(jnp.ones((4, 2)),) * 3, kernel_params={})
    with pytest.raises(ValueError, match="eta"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, eta=0.1, kernel="rbf")
    with pytest.raises(ValueError, match="hmk_params"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, eta=0.1, kernel="hmk")
    with pytest.raises(ValueError, match="alpha"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="divergence_mask"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, divergence=jnp.zeros((6, 2)),
                                divergence_mask=jnp.ones((6, 3)))
    with pytest.raises(ValueError, match="chosen_nll"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, sft_weight=0.1)
    with pytest.raises(ValueError, match="chosen_nll"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, sft_weight=0.1, chosen_nll=jnp.zeros(4))
    with pytest.raises(ValueError, match="unknown kernel"):
        losses.dpo_kernels_loss(x, x, x, x, beta=0.1, kernel="cosine")


# alpha rewards far from the reference (issue 10) ------------------------------------------------------


def _trl_float32_alpha_loss(x_chosen, x_rejected, a, beta):
    """TRL's alpha_divergence logits in float32 with its cap_exp, then −log σ(β·logits)."""
    f32 = np.float32
    cap = f32(np.floor(np.log(np.finfo(f32).max) * 1e4) / 1e4)
    capped = lambda x: np.exp(np.minimum(f32(-a) * f32(x), cap))  # noqa: E731
    logits = (capped(x_rejected) - capped(x_chosen)) / f32(a)
    return float(np.logaddexp(0.0, -float(beta) * float(logits)))


def test_alpha_reward_below_minus_177_nats_is_finite_and_equals_trl():
    # Sequence log-ratios of −300 and −200 nats (sum reduction, a = 0.5, β = 0.1): u^(−a) overflows
    # float32; the loss was NaN, TRL's capped formula gives log 2.
    pc, pr = jnp.array([-300.0], jnp.float32), jnp.array([-200.0], jnp.float32)
    z = jnp.zeros(1, jnp.float32)
    f = lambda c, r: losses.dpo_kernels_loss(c, r, z, z, beta=0.1, reward="alpha",  # noqa: E731
                                             reward_params={"alpha": 0.5})[0]
    for fn in (f, jax.jit(f)):
        loss, grads = jax.value_and_grad(fn, argnums=(0, 1))(pc, pr)
        np.testing.assert_allclose(loss, _trl_float32_alpha_loss(-300.0, -200.0, 0.5, 0.1), rtol=1e-6)
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
        assert all(np.all(np.isfinite(g)) for g in grads)


@functools.lru_cache(maxsize=None)
def _alpha_value_and_grad(a, beta):
    def total(p, r):
        return jnp.sum(losses.implicit_reward("alpha", p, r, beta=beta, alpha=a))

    def loss(p, r):
        v = losses.implicit_reward("alpha", p, r, beta=beta, alpha=a)
        return jnp.sum(losses.preference_loss("sigmoid", v[:2] - v[2:]))

    return jax.jit(lambda p, r: (losses.implicit_reward("alpha", p, r, beta=beta, alpha=a),
                                 jax.grad(total, argnums=(0, 1))(p, r), loss(p, r),
                                 jax.grad(loss)(p, r)))


@pytest.mark.parametrize("a", [0.1, 0.5, 1.7, -0.4, 5.0])
@pytest.mark.parametrize("beta", [0.01, 0.1, 10.0])
@settings(max_examples=15, deadline=None)
@given(x=st.floats(-1e4, 1e4, allow_nan=False), y=st.floats(-1e4, 1e4, allow_nan=False))
def test_alpha_reward_finite_for_any_log_ratio_any_beta(a, beta, x, y):
    pol = jnp.array([x, y, -1e4, 1e4], jnp.float32)
    v, grads, loss, lgrad = _alpha_value_and_grad(a, beta)(pol, jnp.zeros(4, jnp.float32))
    assert np.all(np.isfinite(v)) and all(np.all(np.isfinite(g)) for g in grads)
    assert np.isfinite(loss) and np.all(np.isfinite(lgrad))


@pytest.mark.parametrize("a", [0.5, 1.7, -0.4])
def test_alpha_reward_float64_values_and_gradients_across_both_forms(x64, a):
    # −a x from 0.2 to 600: the expm1 form (−a x <= 1) and the exponent form (> 1), TRL's values.
    x = -np.array([0.2, 0.9, 1.1, 30.0, 600.0]) / a
    got = losses.implicit_reward("alpha", x, np.zeros_like(x), beta=0.3, alpha=a)
    np.testing.assert_allclose(got, 0.3 * (1.0 - np.exp(-a * x)) / a, rtol=1e-12)
    check_grads(lambda t: losses.implicit_reward("alpha", t, jnp.zeros_like(t), beta=0.3, alpha=a),
                (jnp.asarray(x),), order=1, modes=("fwd", "rev"), rtol=1e-6)
