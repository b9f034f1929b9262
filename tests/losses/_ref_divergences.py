"""Independent float64 NumPy/SciPy references for the divergences and log-probs (tests only).

Written from the textbook definitions on probability vectors (not log space), so they share no code
or numerical tricks with dpok_jax.losses.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, rel_entr, softmax


def probs(logits) -> np.ndarray:
    return softmax(np.asarray(logits, np.float64), axis=-1)


def kl(p, q):
    return np.sum(rel_entr(p, q), axis=-1)


def js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def squared_hellinger(p, q):
    return 1.0 - np.sum(np.sqrt(p * q), axis=-1)


def bhattacharyya(p, q):
    return -np.log(np.sum(np.sqrt(p * q), axis=-1))


def renyi(p, q, order):
    if order == 1.0:
        return kl(p, q)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(p**order * q ** (1.0 - order), axis=-1)) / (order - 1.0)


def f_div(p, q, f):
    """Σ q f(p/q) over full-support vectors."""
    return np.sum(q * f(p / q), axis=-1)


F_SCALAR = {
    "kl": lambda u: u * np.log(u),
    "reverse_kl": lambda u: -np.log(u),
    "chi2": lambda u: (u - 1.0) ** 2,
    "tv": lambda u: 0.5 * np.abs(u - 1.0),
    "js": lambda u: 0.5 * (u * np.log(u) - (u + 1.0) * np.log((u + 1.0) / 2.0)),
    "squared_hellinger": lambda u: 0.5 * (np.sqrt(u) - 1.0) ** 2,
}


def alpha_f(a):
    return lambda u: (u**a - a * u - (1.0 - a)) / (a * (a - 1.0))


def token_logps(logits, labels):
    lp = log_softmax(np.asarray(logits, np.float64), axis=-1)
    return np.take_along_axis(lp, np.asarray(labels)[..., None], axis=-1)[..., 0]
