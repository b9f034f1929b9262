"""Kernels, HMK, the flat mixture, the embedding score and kernel fitting (SPEC §3–4)."""

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

NAMES = ("polynomial", "rbf", "mahalanobis", "spectral")
KINDS = NAMES + ("hmk", "mixture")


def _random_params(rng, d, q=3):
    """Hand-made parameters (not fitted) so every kernel is non-trivial on random points."""
    chol = np.tril(rng.normal(size=(d, d)) * 0.3)
    np.fill_diagonal(chol, rng.uniform(0.5, 1.5, size=d))
    return {
        "polynomial": {"c": 1.7, "degree": 3},
        "rbf": {"sigma": 0.9},
        "mahalanobis": {"cov_cholesky": chol},
        "spectral": {"weights": rng.uniform(0.1, 1.0, q), "lengthscales": rng.uniform(0.5, 2.0, q),
                     "frequencies": rng.normal(size=(q, d)), "rho": 0.6},
    }


def _random_theta(rng):
    hmk = {k: rng.normal(size=2) for k in ("theta_L", "theta_G", "theta_tau")}
    return hmk, {"theta": rng.normal(size=4)}


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(1, 6))
    e = [base + 0.8 * rng.normal(size=(96, 6)) for _ in range(3)]
    return losses.fit_kernel_params(*e)


# values against the float64 references --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("normalized", [False, True])
def test_kernel_log_matches_reference(x64, name, normalized):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(9, 5)) * 0.7, rng.normal(size=(9, 5)) * 0.7
    kp = _random_params(rng, 5)
    got = np.asarray(losses.kernel_log(name, a, b, normalized=normalized, **kp[name]))
    want = (ref.normalized if normalized else ref.kernel)(name, a, b, kp[name])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.log(want), rtol=1e-10, atol=1e-12)


def test_mahalanobis_precision_form_equals_cholesky_form(x64):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    chol = _random_params(rng, 4)["mahalanobis"]["cov_cholesky"]
    prec = np.linalg.inv(chol @ chol.T)
    np.testing.assert_allclose(losses.kernel_log("mahalanobis", a, b, precision=prec),
                               losses.kernel_log("mahalanobis", a, b, cov_cholesky=chol),
                               rtol=1e-10)


def test_whole_dict_form_and_normalized_self_is_zero(x64, fitted):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 6))
    for name in NAMES:
        v = losses.kernel_log(name, a, a, normalized=True, **fitted[name])
        np.testing.assert_allclose(v, 0.0, atol=1e-12)
        b = rng.normal(size=(5, 6))
        assert np.all(np.asarray(losses.kernel_log(name, a, b, normalized=True, **fitted[name])) <= 1e-12)


def test_hmk_and_mixture_match_reference(x64):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(8, 5)) * 0.6, rng.normal(size=(8, 5)) * 0.6
    kp = _random_params(rng, 5)
    th_hmk, th_mix = _random_theta(rng)
    np.testing.assert_allclose(losses.hmk_log(a, b, th_hmk, **kp), np.log(ref.hmk(a, b, th_hmk, kp)),
                               rtol=1e-10)
    np.testing.assert_allclose(losses.mixture_log(a, b, th_mix, **kp),
                               np.log(ref.mixture(a, b, th_mix, kp)), rtol=1e-10)


def test_weights_and_entropies_match_reference(x64):
    rng = np.random.default_rng(4)
    th_hmk, th_mix = _random_theta(rng)
    w = losses.hmk_weights(th_hmk)
    lam_l, lam_g, tau = (ref.softmax(th_hmk[k]) for k in ("theta_L", "theta_G", "theta_tau"))
    want = dict(lambda_rbf=lam_l[0], lambda_poly=lam_l[1], lambda_spec=lam_g[0],
                lambda_maha=lam_g[1], tau_local=tau[0], tau_global=tau[1])
    assert set(w) == set(want)
    for k in want:
        np.testing.assert_allclose(w[k], want[k], rtol=1e-12)
    np.testing.assert_allclose(losses.hmk_entropy(th_hmk),
                               ref.entropy(lam_l) + ref.entropy(lam_g) + ref.entropy(tau), rtol=1e-12)
    lam = ref.softmax(th_mix["theta"])
    mw = losses.mixture_weights(th_mix)
    np.testing.assert_allclose([mw[k] for k in ("lambda_rbf", "lambda_poly", "lambda_spec",
                                                "lambda_maha")], lam, rtol=1e-12)
    np.testing.assert_allclose(losses.mixture_entropy(th_mix), ref.entropy(lam), rtol=1e-12)


def test_init_params():
    p = losses.init_hmk_params()
    assert set(p) == {"theta_L", "theta_G", "theta_tau"}
    assert all(v.shape == (2,) and v.dtype == jnp.float32 and not np.any(v) for v in p.values())
    m = losses.init_mixture_params()
    assert m["theta"].shape == (4,) and m["theta"].dtype == jnp.float32
    np.testing.assert_allclose(losses.hmk_entropy(p), 3 * np.log(2), rtol=1e-6)
    np.testing.assert_allclose(losses.mixture_entropy(m), np.log(4), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_score_matches_reference(x64, kind, fitted):
    rng = np.random.default_rng(5)
    e = [rng.normal(size=(7, 6)) * s for s in (1.0, 3.0, 0.2)]
    th_hmk, th_mix = _random_theta(rng)
    theta = {"hmk": th_hmk, "mixture": th_mix}.get(kind)
    got = losses.embedding_score(kind, *e, kernel_params=fitted, hmk_params=th_hmk,
                                 mixture_params=th_mix)
    np.testing.assert_allclose(got, ref.score(kind, *e, fitted, theta), rtol=1e-9, atol=1e-11)
    # Unit normalization: positive rescaling of any input leaves the score unchanged.
    scaled = losses.embedding_score(kind, e[0] * 5.0, e[1] * 0.1, e[2] * 20.0, kernel_params=fitted,
                                    hmk_params=th_hmk, mixture_params=th_mix)
    np.testing.assert_allclose(scaled, got, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", NAMES)
def test_single_kernel_score_normalized_equals_unnormalized(x64, name, fitted):
    """The documented reason embedding_score uses log K, not log K̃, for single kernels."""
    rng = np.random.default_rng(6)
    x, p, n = (ref.unit(rng.normal(size=(6, 6))) for _ in range(3))
    kp = fitted[name]
    s_norm = (losses.kernel_log(name, x, p, normalized=True, **kp)
              - losses.kernel_log(name, x, n, normalized=True, **kp))
    np.testing.assert_allclose(losses.embedding_score(name, x, p, n, kernel_params=fitted), s_norm,
                               rtol=1e-10, atol=1e-12)


def test_embedding_score_sign():
    x = jnp.array([[1.0, 0.0, 0.0]])
    near, far = jnp.array([[0.9, 0.1, 0.0]]), jnp.array([[-0.2, 1.0, 0.0]])
    kp = {"rbf": {"sigma": 0.5}}
    assert float(losses.embedding_score("rbf", x, near, far, kernel_params=kp)[0]) > 0
    assert float(losses.embedding_score("rbf", x, far, near, kernel_params=kp)[0]) < 0


# positivity and PSD Gram matrices --------------------------------------------------------------------


def _gram(fn, pts):
    n = pts.shape[0]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.exp(np.asarray(fn(pts[i.ravel()], pts[j.ravel()]))).reshape(n, n)


@pytest.mark.parametrize("kind", [(n, False) for n in NAMES] + [(n, True) for n in NAMES]
                         + [("hmk", True), ("mixture", True)])
def test_gram_is_positive_and_psd(x64, kind):
    name, normalized = kind
    rng = np.random.default_rng(8)
    kp = _random_params(rng, 4)
    # (⟨a,b⟩ + c) > 0 needs c > max|⟨a,b⟩| off the unit sphere.
    kp["polynomial"]["c"] = 30.0
    th_hmk, th_mix = _random_theta(rng)
    for pts in (rng.normal(size=(14, 4)), ref.unit(rng.normal(size=(14, 4)))):
        if name == "hmk":
            fn = lambda a, b: losses.hmk_log(a, b, th_hmk, **kp)  # noqa: E731
        elif name == "mixture":
            fn = lambda a, b: losses.mixture_log(a, b, th_mix, **kp)  # noqa: E731
        else:
            fn = functools.partial(losses.kernel_log, name, normalized=normalized, **kp[name])
        g = _gram(fn, pts)
        assert np.all(g > 0)
        np.testing.assert_allclose(g, g.T, rtol=1e-10)
        assert np.linalg.eigvalsh(g).min() >= -1e-6 * max(1.0, np.abs(g).max())


# gradients -----------------------------------------------------------------------------------------


# Under jit (one compilation per derivative) and order 2 only where the function is small: the
# machine these run on is shared, and eager order-2 checks of the mixtures take tens of seconds.
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("normalized", [False, True])
def test_kernel_grads(x64, name, normalized):
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(3, 4)) * 0.5, rng.normal(size=(3, 4)) * 0.5
    kp = _random_params(rng, 4, q=2)

    def f(a, b):
        return losses.kernel_log(name, a, b, normalized=normalized, **kp[name])

    order = 2 if name in ("rbf", "polynomial") and not normalized else 1
    check_grads(jax.jit(f), (a, b), order=order, modes=("fwd", "rev"))


def test_kernel_param_grads(x64):
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    chol = _random_params(rng, 4)["mahalanobis"]["cov_cholesky"]
    check_grads(jax.jit(lambda s: losses.kernel_log("rbf", a, b, sigma=s)), (0.8,), order=2)
    # tril: numerical differentiation perturbs every entry, and a factor must stay triangular.
    check_grads(jax.jit(lambda L: losses.kernel_log("mahalanobis", a, b, cov_cholesky=jnp.tril(L))),
                (chol,), order=1, modes=("rev",))


def test_hmk_mixture_entropy_grads(x64):
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(3, 4)) * 0.5, rng.normal(size=(3, 4)) * 0.5
    kp = _random_params(rng, 4, q=2)
    th_hmk, th_mix = _random_theta(rng)
    check_grads(jax.jit(lambda a, b, t: losses.hmk_log(a, b, t, **kp)), (a, b, th_hmk), order=1,
                modes=("rev",))
    # mixture_log's gradients are checked through embedding_score("mixture") below.
    check_grads(jax.jit(losses.hmk_entropy), (th_hmk,), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(losses.mixture_entropy), (th_mix,), order=1, modes=("rev",))


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_score_grads(x64, kind, fitted):
    rng = np.random.default_rng(12)
    e = tuple(rng.normal(size=(3, 6)) for _ in range(3))
    th_hmk, th_mix = _random_theta(rng)

    def f(ex, ep, en, th, tm):
        return losses.embedding_score(kind, ex, ep, en, kernel_params=fitted, hmk_params=th,
                                      mixture_params=tm)

    check_grads(jax.jit(f), (*e, th_hmk, th_mix), order=1, modes=("rev",))


def test_hmk_theta_gradient_is_nonzero(fitted):
    rng = np.random.default_rng(13)
    e = tuple(jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(3))
    total = lambda t: jnp.sum(losses.embedding_score("hmk", *e, kernel_params=fitted,  # noqa: E731
                                                     hmk_params=t))
    g = jax.jit(jax.grad(total))(losses.init_hmk_params())
    assert all(np.all(np.isfinite(v)) for v in g.values())
    assert any(np.any(np.abs(v) > 0) for v in g.values())


# extreme inputs (float32, as trained) -------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _score_and_grad(kind):
    kp = losses.fit_kernel_params(*(np.random.default_rng(i).normal(size=(32, 4)) for i in range(3)))

    def total(e, th, tm):
        return jnp.sum(losses.embedding_score(kind, *e, kernel_params=kp, hmk_params=th,
                                              mixture_params=tm))

    return jax.jit(lambda e, th, tm: (losses.embedding_score(kind, *e, kernel_params=kp,
                                                             hmk_params=th, mixture_params=tm),
                                      jax.grad(total, argnums=(0, 1, 2))(e, th, tm)))


_vec = st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=4, max_size=4)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(v=_vec, w=_vec, log_scale=st.floats(-30, 30), eps=st.floats(0.0, 1e-3), case=st.integers(0, 3),
       theta=st.floats(-50, 50))
def test_embedding_score_extremes_are_finite(kind, v, w, log_scale, eps, case, theta):
    v = np.asarray(v, np.float32) + np.float32(1e-3)
    w = np.asarray(w, np.float32)
    # identical, near-antipodal, zero and arbitrarily scaled embeddings.
    x = v
    pos = {0: v, 1: -v + eps, 2: np.zeros(4, np.float32), 3: w}[case]
    neg = {0: -v, 1: v, 2: v, 3: -w + eps}[case]
    scale = np.float32(10.0 ** (log_scale / 10))
    e = tuple(jnp.asarray(np.stack([t * scale, t]), jnp.float32) for t in (x, pos, neg))
    th = {k: jnp.array([theta, -theta], jnp.float32) for k in ("theta_L", "theta_G", "theta_tau")}
    tm = {"theta": jnp.array([theta, 0.0, -theta, 1.0], jnp.float32)}
    s, grads = _score_and_grad(kind)(e, th, tm)
    assert np.all(np.isfinite(np.asarray(s)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


# fitting -------------------------------------------------------------------------------------------


def test_fit_kernel_params(x64):
    rng = np.random.default_rng(14)
    n, d = 80, 5
    e_x = rng.normal(size=(n, d)) + 2.0
    e_pos = e_x + 0.5 * rng.normal(size=(n, d))
    e_neg = rng.normal(size=(n, d)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1])
    kp = losses.fit_kernel_params(e_x, e_pos, e_neg, n_components=3, dtype=np.float64)
    ux, up, un = ref.unit(e_x), ref.unit(e_pos), ref.unit(e_neg)
    tau = np.concatenate([up - ux, un - ux])
    sigma = np.median(np.linalg.norm(tau, axis=1))
    np.testing.assert_allclose(kp["rbf"]["sigma"], sigma, rtol=1e-12)
    assert kp["polynomial"] == {"c": 2.0, "degree": 2} and type(kp["polynomial"]["degree"]) is int

    chol = kp["mahalanobis"]["cov_cholesky"]
    assert np.allclose(np.triu(chol, 1), 0) and np.all(np.diag(chol) > 0)
    cov = chol @ chol.T
    lw = ref.ledoit_wolf(tau)
    scale = cov[0, 0] / lw[0, 0]
    np.testing.assert_allclose(cov, scale * lw, rtol=1e-8, atol=1e-14)
    # The bandwidth puts the median squared Mahalanobis distance at 1.
    quad = np.einsum("ni,ij,nj->n", tau, np.linalg.inv(cov), tau)
    np.testing.assert_allclose(np.median(quad), 1.0, rtol=1e-8)

    sp = kp["spectral"]
    evals, evecs = np.linalg.eigh(np.cov(np.concatenate([ux, up, un]), rowvar=False))
    evals, evecs = evals[::-1][:3], evecs[:, ::-1][:, :3]
    np.testing.assert_allclose(sp["weights"], evals / evals.sum(), rtol=1e-8)
    norms = np.linalg.norm(sp["frequencies"], axis=1)
    np.testing.assert_allclose(norms / norms[0], evals / evals[0], rtol=1e-8)
    cosines = np.abs(np.sum(sp["frequencies"] / norms[:, None] * evecs.T, axis=1))
    np.testing.assert_allclose(cosines, 1.0, rtol=1e-8)
    np.testing.assert_allclose(sp["lengthscales"], 2.0 * sigma, rtol=1e-12)
    assert 0 <= sp["rho"] < 1
    # The leading cosine turns a quarter period at the median projection.
    proj = np.median(np.abs(tau @ evecs[:, 0]))
    np.testing.assert_allclose(norms[0] * proj, np.pi / 2, rtol=1e-8)


def test_fit_kernel_params_default_float32_and_usable_under_jit():
    rng = np.random.default_rng(15)
    kp = losses.fit_kernel_params(*(rng.normal(size=(20, 8)) for _ in range(3)))
    assert kp["mahalanobis"]["cov_cholesky"].dtype == np.float32
    assert kp["spectral"]["frequencies"].dtype == np.float32
    th = losses.init_hmk_params()
    e = tuple(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(3))
    s = jax.jit(lambda e, t: losses.embedding_score("hmk", *e, kernel_params=kp, hmk_params=t))(e, th)
    assert s.dtype == jnp.float32 and s.shape == (4,) and np.all(np.isfinite(s))
    want = ref.score("hmk", *e, jax.tree.map(np.float64, kp), jax.tree.map(np.float64, th))
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-5)


def test_fit_kernel_params_degenerate_identical_embeddings():
    e = np.ones((5, 3))
    kp = losses.fit_kernel_params(e, e, e)
    for leaf in jax.tree.leaves(kp):
        assert np.all(np.isfinite(leaf))
    s = jax.jit(lambda t: losses.embedding_score("hmk", e, e, e, kernel_params=kp, hmk_params=t))(
        losses.init_hmk_params())
    np.testing.assert_allclose(s, 0.0, atol=1e-6)


# bad input --------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    a = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="unknown kernel name"):
        losses.kernel_log("laplace", a, a)
    with pytest.raises(ValueError, match="same shape"):
        losses.kernel_log("rbf", a, jnp.ones((2, 4)), sigma=1.0)
    with pytest.raises(ValueError, match="sigma"):
        losses.kernel_log("rbf", a, a, sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        losses.kernel_log("rbf", a, a)
    with pytest.raises(ValueError, match="degree"):
        losses.kernel_log("polynomial", a, a, degree=2.0)
    with pytest.raises(ValueError, match="degree"):
        losses.kernel_log("polynomial", a, a, degree=0)
    with pytest.raises(ValueError, match="polynomial c"):
        losses.kernel_log("polynomial", a, a, c=1.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        losses.kernel_log("rbf", a, a, sigma=1.0, gamma=2.0)
    with pytest.raises(ValueError, match="exactly one of cov_cholesky or precision"):
        losses.kernel_log("mahalanobis", a, a)
    with pytest.raises(ValueError, match="cov_cholesky"):
        losses.kernel_log("mahalanobis", a, a, cov_cholesky=np.ones((3, 3)))
    with pytest.raises(ValueError, match="precision must have shape"):
        losses.kernel_log("mahalanobis", a, a, precision=np.eye(2))
    sp = {"weights": np.ones(2), "lengthscales": np.ones(2), "frequencies": np.ones((2, 3))}
    with pytest.raises(ValueError, match="rho"):
        losses.kernel_log("spectral", a, a, rho=1.0, **sp)
    with pytest.raises(ValueError, match="rho"):
        losses.kernel_log("spectral", a, a, rho=-0.1, **sp)
    with pytest.raises(ValueError, match="frequencies"):
        losses.kernel_log("spectral", a, a, **dict(sp, frequencies=np.ones((2, 4))))
    with pytest.raises(ValueError, match="weights"):
        losses.kernel_log("spectral", a, a, **dict(sp, weights=-np.ones(2)))
    with pytest.raises(ValueError, match="lengthscales"):
        losses.kernel_log("spectral", a, a, **dict(sp, lengthscales=np.ones(3)))
    with pytest.raises(ValueError, match="hmk params"):
        losses.hmk_weights({"theta_L": jnp.zeros(2)})
    with pytest.raises(ValueError, match="theta_G"):
        losses.hmk_entropy({"theta_L": jnp.zeros(2), "theta_G": jnp.zeros(3),
                            "theta_tau": jnp.zeros(2)})
    with pytest.raises(ValueError, match="mixture params"):
        losses.mixture_weights({"theta": jnp.zeros(3)})
    with pytest.raises(ValueError, match="missing"):
        losses.hmk_log(a, a, losses.init_hmk_params(), rbf={"sigma": 1.0})
    with pytest.raises(ValueError, match="unknown embedding_score kind"):
        losses.embedding_score("cosine", a, a, a, kernel_params={})
    with pytest.raises(ValueError, match="hmk_params"):
        losses.embedding_score("hmk", a, a, a, kernel_params={})
    with pytest.raises(ValueError, match="e_x, e_pos, e_neg"):
        losses.embedding_score("rbf", a, a, jnp.ones((3, 3)), kernel_params={"rbf": {"sigma": 1.0}})
    with pytest.raises(ValueError, match="no entry for kernel 'rbf'"):
        losses.embedding_score("rbf", a, a, a, kernel_params={})
    with pytest.raises(ValueError, match="at least 2 pairs"):
        losses.fit_kernel_params(np.ones((1, 3)), np.ones((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="degree"):
        losses.fit_kernel_params(*(np.ones((4, 3)),) * 3, degree=1.5)


def test_traced_params_skip_value_checks():
    """Learnable parameters (traced) pass through; only Python values are checked."""
    a = jnp.ones((2, 3))
    v = jax.jit(lambda s: losses.kernel_log("rbf", a, a * 2, sigma=s))(jnp.float32(1.0))
    np.testing.assert_allclose(v, -1.5, rtol=1e-6)


# polynomial kernel off the unit sphere (issue 10) -----------------------------------------------------


def test_polynomial_even_degree_negative_base_is_log_of_positive_kernel(x64):
    # ⟨a,b⟩ + c = −4 + 2 = −2: K = (−2)^2 = 4 > 0, log K = log 4 (was NaN).
    got = losses.kernel_log("polynomial", jnp.array([[1.0, 2.0]]), jnp.array([[-2.0, -1.0]]), c=2.0, degree=2)
    np.testing.assert_allclose(got, [np.log(4.0)], rtol=1e-14)
    rng = np.random.default_rng(30)
    a, b = rng.normal(size=(2, 16, 3)) * 2.0
    for degree in (2, 4):
        base = np.sum(a * b, -1) + 1.5
        assert np.any(base < 0)
        want = np.log(base.astype(np.float64) ** degree)
        got = losses.kernel_log("polynomial", a, b, c=1.5, degree=degree)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        check_grads(lambda x, y: losses.kernel_log("polynomial", x, y, c=1.5, degree=degree),
                    (jnp.asarray(a), jnp.asarray(b)), order=1, modes=("fwd", "rev"))


def test_polynomial_odd_degree_nonpositive_kernel_is_minus_inf_with_zero_gradient():
    a = jnp.array([[1.0, 2.0], [1.0, 0.0], [1.0, 2.0]])
    b = jnp.array([[-2.0, -1.0], [0.5, 0.0], [-1.0, -0.5]])  # bases −2, 2.5, 0 (c = 2)
    f = lambda x: losses.kernel_log("polynomial", x, b, c=2.0, degree=3)  # noqa: E731
    val = f(a)
    assert val[0] == -jnp.inf and val[2] == -jnp.inf
    np.testing.assert_allclose(val[1], 3.0 * np.log(2.5), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(f(x)), f(x), 0.0)))(a)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[[0, 2]] == 0.0)
    # Even degree with a zero base: −inf with a zero (not NaN) gradient too.
    g2 = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(
        losses.kernel_log("polynomial", x, b, c=2.0, degree=2)), 0.0, 1.0)))(a)
    assert np.all(np.isfinite(g2))
