"""Independent float64 NumPy references for kernels, HMK, rewards and links (tests only).

Written from the textbook formulas in probability space (kernel values, not their logs; explicit
inverses; TRL's DPOTrainer formulas transcribed as written there), so they share no code or numerical
tricks with dpok_jax.losses.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def f64(x):
    return np.asarray(x, np.float64)


def unit(e):
    e = f64(e)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def softmax(t):
    t = f64(t)
    e = np.exp(t - t.max())
    return e / e.sum()


def entropy(p):
    p = f64(p)
    return -np.sum(p * np.log(p))


# kernels, K(a, b) row by row ----------------------------------------------------------------------


def polynomial(a, b, c, degree):
    c = f64(c)
    return (np.sum(f64(a) * f64(b), -1) + c) ** degree


def rbf(a, b, sigma):
    sigma = f64(sigma)
    return np.exp(-np.sum((f64(a) - f64(b)) ** 2, -1) / (2 * sigma**2))


def mahalanobis(a, b, cov):
    tau = f64(a) - f64(b)
    inv = np.linalg.inv(f64(cov))
    return np.exp(-0.5 * np.einsum("bi,ij,bj->b", tau, inv, tau))


def spectral(a, b, weights, lengthscales, frequencies, rho):
    tau, rho = f64(a) - f64(b), f64(rho)
    out = np.zeros(tau.shape[0])
    for w, ls, om in zip(f64(weights), f64(lengthscales), f64(frequencies)):
        out += w * np.exp(-np.sum(tau**2, -1) / (2 * ls**2)) * (1 + rho * np.cos(tau @ om)) / (1 + rho)
    return out


def kernel(name, a, b, params):
    if name == "mahalanobis":
        cov = params.get("cov")
        if cov is None:
            chol = f64(params["cov_cholesky"])
            cov = chol @ chol.T
        return mahalanobis(a, b, cov)
    fn = {"polynomial": polynomial, "rbf": rbf, "spectral": spectral}[name]
    return fn(a, b, **params)


def normalized(name, a, b, params):
    return kernel(name, a, b, params) / np.sqrt(kernel(name, a, a, params) * kernel(name, b, b, params))


def hmk(a, b, theta, kp):
    lam_l, lam_g, tau = softmax(theta["theta_L"]), softmax(theta["theta_G"]), softmax(theta["theta_tau"])
    k = {n: normalized(n, a, b, kp[n]) for n in kp}
    return (tau[0] * (lam_l[0] * k["rbf"] + lam_l[1] * k["polynomial"])
            + tau[1] * (lam_g[0] * k["spectral"] + lam_g[1] * k["mahalanobis"]))


def mixture(a, b, theta, kp):
    lam = softmax(theta["theta"])
    names = ("rbf", "polynomial", "spectral", "mahalanobis")
    return sum(lam[i] * normalized(n, a, b, kp[n]) for i, n in enumerate(names))


def score(kind, e_x, e_pos, e_neg, kp, theta=None):
    x, p, n = unit(e_x), unit(e_pos), unit(e_neg)
    if kind == "hmk":
        k = lambda u, v: hmk(u, v, theta, kp)  # noqa: E731
    elif kind == "mixture":
        k = lambda u, v: mixture(u, v, theta, kp)  # noqa: E731
    else:
        k = lambda u, v: kernel(kind, u, v, kp[kind])  # noqa: E731
    return np.log(k(x, p)) - np.log(k(x, n))


def ledoit_wolf(x):
    """Ledoit & Wolf (2004) shrinkage covariance, textbook form (normalized Frobenius norm)."""
    x = f64(x)
    n, p = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    m = np.trace(s) / p
    d2 = np.sum((s - m * np.eye(p)) ** 2) / p
    b2_bar = sum(np.sum((np.outer(r, r) - s) ** 2) / p for r in xc) / n**2
    b2 = min(b2_bar, d2)
    return (b2 / d2) * m * np.eye(p) + (1 - b2 / d2) * s


# rewards and links, as TRL's DPOTrainer writes them ---------------------------------------------


def spec_reward(name, pol, ref, beta, alpha=None):
    """SPEC §7: r = β (f'(u) − f'(1)) with u = π/π_ref, evaluated on u itself."""
    u = np.exp(f64(pol) - f64(ref))
    if name == "reverse_kl":
        f = np.log(u)
    elif name == "forward_kl":
        f = 1 - 1 / u
    elif name == "js":
        f = np.log(2 * u / (1 + u))
    else:
        f = (1 - u ** (-alpha)) / alpha
    return beta * f


def trl_logits_legacy(f_type, pc, pr, rc, rr, alpha_coef=1.0):
    """TRL DPOTrainer.dpo_loss (v0.9–0.12): the unscaled logits for `f_divergence_type`."""
    chosen_logratios, rejected_logratios = f64(pc) - f64(rc), f64(pr) - f64(rr)
    if f_type == "alpha_divergence":
        return (np.exp(rejected_logratios * -alpha_coef) - np.exp(chosen_logratios * -alpha_coef)) / alpha_coef
    logits = (f64(pc) - f64(pr)) - (f64(rc) - f64(rr))
    if f_type == "js_divergence":
        softplus = lambda t: np.log1p(np.exp(t))  # noqa: E731
        logits = logits - (softplus(chosen_logratios) - softplus(rejected_logratios))
    return logits


def trl_logits_scores(f_type, pc, pr, rc, rr, alpha_coef=1.0):
    """TRL DPOTrainer (newer): chosen_scores − rejected_scores for `f_divergence_type`."""
    chosen_logratios, rejected_logratios = f64(pc) - f64(rc), f64(pr) - f64(rr)

    def scores(x):
        if f_type == "reverse_kl":
            return x
        if f_type == "forward_kl":
            return -np.exp(-x)
        if f_type == "js_divergence":
            return np.log(expit(x))
        return np.exp((alpha_coef - 1.0) * x) / (alpha_coef - 1.0)

    return scores(chosen_logratios) - scores(rejected_logratios)


def trl_losses(loss_type, logits, beta, label_smoothing=0.0):
    """TRL's per-pair losses on its unscaled `logits`."""
    logits = f64(logits)
    if loss_type == "sigmoid":
        return (-np.log(expit(beta * logits)) * (1 - label_smoothing)
                - np.log(expit(-beta * logits)) * label_smoothing)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2  # ipo


def dpo_textbook(pc, pr, rc, rr, beta):
    """Rafailov et al. 2023, Eq. 7."""
    return -np.log(expit(beta * ((f64(pc) - f64(rc)) - (f64(pr) - f64(rr)))))
