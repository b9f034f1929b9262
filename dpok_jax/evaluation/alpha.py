"""Weighted alpha, the heavy-tailed self-regularization metric (SPEC §10; Martin, Peng & Mahoney 2021).

Per weight matrix `W` [N, M] (N >= M after a transpose; leaves of more than two axes are flattened to
[shape[0], rest]) the empirical spectral density is the eigenvalues `λ` of `X = WᵀW / N` (the squared
singular values over N). Its tail is fitted by a continuous power law `p(λ) ∝ λ^(−α)`, `λ >= λ_min`
(Clauset, Shalizi & Newman 2009): for each candidate `λ_min` among the distinct eigenvalues (all but the
largest) the MLE `α = 1 + n / Σ_i log(λ_i / λ_min)` over the `n` tail eigenvalues, and the
Kolmogorov–Smirnov distance `D = max_j |j/n − P(λ_(j))|`, `P(λ) = 1 − (λ/λ_min)^(1−α)` the fitted CDF and
`j/n` the empirical CDF just below the j-th smallest tail eigenvalue (the `powerlaw` package's
convention); the `λ_min` of the smallest `D` wins. Weighted alpha over L matrices:
`α̂ = (1/L) Σ_l α_l log10 λ_max,l`. Smaller is better-trained in the HT-SR theory.
"""

from __future__ import annotations

import numpy as np


def eigenvalues(w) -> np.ndarray:
    """Ascending eigenvalues of `WᵀW / N` (float64) of a [N, M] or [N, ...] matrix, N the larger side.

    >>> eigenvalues(np.diag([2.0, 1.0])).tolist()
    [0.5, 2.0]
    """
    w = np.asarray(w, np.float64)
    if w.ndim < 2:
        raise ValueError(f"eigenvalues: a weight matrix needs 2 or more axes; got shape {w.shape}")
    w = w.reshape(w.shape[0], -1)
    n = max(w.shape)
    s = np.linalg.svd(w, compute_uv=False)
    return np.sort(s * s / n)


def fit_power_law(evals) -> dict:
    """Clauset fit of the tail of positive values: `{"alpha", "xmin", "D", "n_tail"}`.

    >>> rng = np.random.default_rng(0)
    >>> x = (1 - rng.random(4000)) ** (-1 / 1.5)   # Pareto, density exponent 2.5, x >= 1
    >>> round(fit_power_law(x)["alpha"], 1)
    2.5
    """
    x = np.sort(np.asarray(evals, np.float64))
    x = x[x > 0]
    candidates = np.unique(x)[:-1]
    if len(candidates) < 1:
        raise ValueError(f"fit_power_law: need at least 2 distinct positive values; got {len(np.unique(x))}")
    best = None
    log_x = np.log(x)
    for xmin in candidates:
        start = int(np.searchsorted(x, xmin, side="left"))
        tail, n = x[start:], len(x) - start
        s = float(np.sum(log_x[start:] - np.log(xmin)))
        if s <= 0:
            continue
        alpha = 1.0 + n / s
        cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
        d = float(np.max(np.abs(np.arange(n) / n - cdf)))
        if best is None or d < best["D"]:
            best = {"alpha": alpha, "xmin": float(xmin), "D": d, "n_tail": n}
    return best


def weighted_alpha(matrices: dict, *, min_size: int = 16) -> dict:
    """`α̂ = mean_l α_l log10 λ_max,l` over named weight matrices; smaller ones are skipped.

    Args:
      matrices: name -> array with >= 2 axes (e.g. every kernel of a Llama).
      min_size: matrices whose smaller side (after flattening) is below this are skipped: too few
        eigenvalues for a tail fit.

    Returns:
      `{"weighted_alpha", "layers": {name: {"alpha", "lambda_max", "xmin", "D", "n_tail"}}, "skipped"}`.
    """
    layers, skipped = {}, []
    for name, w in matrices.items():
        w = np.asarray(w)
        if w.ndim < 2 or min(w.shape[0], int(np.prod(w.shape[1:]))) < min_size:
            skipped.append(name)
            continue
        ev = eigenvalues(w)
        fit = fit_power_law(ev)
        if fit is None:
            skipped.append(name)
            continue
        layers[name] = dict(fit, lambda_max=float(ev[-1]))
    if not layers:
        raise ValueError(f"weighted_alpha: no weight matrix with both sides >= {min_size} "
                         f"(skipped {skipped})")
    value = float(np.mean([v["alpha"] * np.log10(v["lambda_max"]) for v in layers.values()]))
    return {"weighted_alpha": value, "layers": layers, "skipped": skipped}


def named_matrices(params) -> dict:
    """Name -> array for every leaf of a parameter pytree with two or more axes."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if getattr(leaf, "ndim", 0) >= 2:
            out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out
