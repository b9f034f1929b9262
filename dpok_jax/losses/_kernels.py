"""Kernels between embedding vectors, their normalization, HMK and the flat mixture (SPEC §3–4).

Every kernel is computed as `log K` (log space throughout: `log1p`, `logsumexp`, Cholesky solves), is
strictly positive and positive semi-definite, and acts row by row: `a[B, d], b[B, d] -> [B]`.

The `kernel_params` layout (what `fit_kernel_params` returns and what the trainer closes over as
constants)::

    {
        "rbf":         {"sigma": float > 0},
        "polynomial":  {"c": float > 1, "degree": int >= 1},
        "mahalanobis": {"cov_cholesky": [d, d] lower-triangular L with Σ = L Lᵀ},
        "spectral":    {"weights": [Q] >= 0, "lengthscales": [Q] > 0,
                        "frequencies": [Q, d], "rho": float in [0, 1)},
    }

`kernel_log(name, a, b, **kernel_params[name])` works on one entry; `hmk_log`, `mixture_log` and
`embedding_score` take the whole dict. `mahalanobis` alternatively accepts `precision` [d, d]
(= Σ⁻¹) instead of `cov_cholesky`; exactly one of the two must be given.

Reference: Das et al. 2025, *DPO Kernels*, Sec. 3 (kernelized representations) and Sec. 6.1 (HMK).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

KERNELS = ("polynomial", "rbf", "mahalanobis", "spectral")
# Order of the four components inside HMK and the flat mixture (and of `mixture`'s theta).
_MIX_ORDER = ("rbf", "polynomial", "spectral", "mahalanobis")
_SHORT = {"rbf": "rbf", "polynomial": "poly", "spectral": "spec", "mahalanobis": "maha"}
# Floor on the embedding norm before unit normalization: a zero vector (e.g. an empty prompt) maps
# to zero instead of NaN, with finite gradients.
_NORM_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------------
# argument checking (Python values and static shapes only: nothing here touches traced values)


def _concrete(x):
    """`x` as a NumPy array when its value is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 - anything non-array-like is reported by the caller
        return None


def _check_pair(a, b) -> None:
    if a.ndim < 1 or a.shape != b.shape:
        raise ValueError(f"kernel inputs a and b must have the same shape [..., d]; "
                         f"got a{tuple(a.shape)} and b{tuple(b.shape)}")


def _check_unknown(name: str, params: dict, allowed: tuple) -> None:
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise ValueError(f"kernel {name!r} got unknown parameter(s) {extra}; allowed: {list(allowed)}")


def _positive_scalar(value, arg: str, *, above: float = 0.0) -> None:
    v = _concrete(value)
    if v is None:
        return
    if v.shape != ():
        raise ValueError(f"{arg} must be a scalar; got shape {v.shape}")
    if not np.isfinite(v) or v <= above:
        raise ValueError(f"{arg} must be > {above:g}; got {float(v)}")


def _check_degree(degree) -> None:
    ok = isinstance(degree, numbers.Integral) and not isinstance(degree, bool)
    if not ok or degree < 1:
        raise ValueError(f"polynomial degree must be a Python int >= 1; got {degree!r}")


def _check_rho(rho) -> None:
    v = _concrete(rho)
    if v is None:
        return
    if v.shape != () or not (0.0 <= float(v) < 1.0):
        raise ValueError(f"spectral rho must be a scalar in [0, 1); got {v!r}")


# --------------------------------------------------------------------------------------------------
# the four kernels: (log K(a, b), log K(a, a)) pairs


def _poly(a, b, c, degree):
    """`log (⟨a,b⟩ + c)^d`, for any inputs.

    Even d: `K = |⟨a,b⟩ + c|^d > 0` unless the base is 0, so `log K = d log|⟨a,b⟩ + c|`. Odd d:
    `K <= 0` where the base is <= 0 (possible for non-unit inputs; never for unit vectors with
    c > 1), and log K is taken as `-inf` there (K clipped at 0), with a zero gradient. A zero base
    is `-inf` with a zero gradient for either parity (never `inf · 0 = NaN` in the backward pass).
    """
    base = jnp.sum(a * b, axis=-1) + c
    mag = jnp.abs(base) if degree % 2 == 0 else base
    ok = mag > 0
    return jnp.where(ok, degree * jnp.log(jnp.where(ok, mag, 1.0)), -jnp.inf)


def _poly_self(a, c, degree):
    return degree * jnp.log(jnp.sum(a * a, axis=-1) + c)


def _sqdist(a, b):
    tau = a - b
    # Sum of squares (not a norm): smooth at a = b, so gradients stay finite there.
    return jnp.sum(tau * tau, axis=-1)


def _rbf(a, b, sigma):
    return -_sqdist(a, b) / (2.0 * sigma**2)


def _maha_quad(tau, cov_cholesky, precision):
    if precision is not None:
        return jnp.einsum("...i,ij,...j->...", tau, precision, tau)
    d = tau.shape[-1]
    flat = tau.reshape(-1, d)
    # Σ⁻¹ is never formed: L⁻¹τ by a triangular solve, then its squared norm.
    z = solve_triangular(cov_cholesky, flat.T, lower=True)
    return jnp.sum(z * z, axis=0).reshape(tau.shape[:-1])


def _maha(a, b, cov_cholesky, precision):
    return -0.5 * _maha_quad(a - b, cov_cholesky, precision)


def _spectral(a, b, weights, lengthscales, frequencies, rho):
    tau = a - b
    sq = jnp.sum(tau * tau, axis=-1)[..., None]  # [..., 1]
    phase = tau @ frequencies.T  # [..., Q]
    terms = -sq / (2.0 * lengthscales**2) + jnp.log1p(rho * jnp.cos(phase))
    # `b=weights` lets a zero weight drop its term instead of taking log(0).
    return jax.nn.logsumexp(terms, axis=-1, b=weights) - jnp.log1p(rho)


def _prepare(name: str, a, b, params: dict):
    """Validated, dtype-cast parameters and the two kernel functions (log K(a,b), log K(a,a))."""
    dtype = a.dtype
    if name == "polynomial":
        _check_unknown(name, params, ("c", "degree"))
        c, degree = params.get("c", 2.0), params.get("degree", 2)
        _check_degree(degree)
        _positive_scalar(c, "polynomial c", above=1.0)
        c = jnp.asarray(c, dtype)
        return (lambda x, y: _poly(x, y, c, degree)), (lambda x: _poly_self(x, c, degree))
    if name == "rbf":
        _check_unknown(name, params, ("sigma",))
        if "sigma" not in params:
            raise ValueError("kernel 'rbf' needs sigma (e.g. from fit_kernel_params)")
        _positive_scalar(params["sigma"], "rbf sigma")
        sigma = jnp.asarray(params["sigma"], dtype)
        return (lambda x, y: _rbf(x, y, sigma)), (lambda x: jnp.zeros(x.shape[:-1], dtype))
    if name == "mahalanobis":
        _check_unknown(name, params, ("cov_cholesky", "precision"))
        chol, prec = params.get("cov_cholesky"), params.get("precision")
        if (chol is None) == (prec is None):
            raise ValueError("kernel 'mahalanobis' needs exactly one of cov_cholesky or precision")
        d = a.shape[-1]
        given = chol if chol is not None else prec
        arg = "cov_cholesky" if chol is not None else "precision"
        if tuple(np.shape(given)) != (d, d):
            raise ValueError(f"mahalanobis {arg} must have shape ({d}, {d}); got {np.shape(given)}")
        if chol is not None:
            v = _concrete(chol)
            if v is not None and (np.any(np.triu(v, 1) != 0) or np.any(np.diag(v) <= 0)):
                raise ValueError("mahalanobis cov_cholesky must be lower-triangular with a "
                                 "positive diagonal (the Cholesky factor of Σ)")
            chol = jnp.asarray(chol, dtype)
        else:
            prec = jnp.asarray(prec, dtype)
        return ((lambda x, y: _maha(x, y, chol, prec)),
                (lambda x: jnp.zeros(x.shape[:-1], dtype)))
    if name == "spectral":
        allowed = ("weights", "lengthscales", "frequencies", "rho")
        _check_unknown(name, params, allowed)
        missing = [k for k in allowed[:3] if k not in params]
        if missing:
            raise ValueError(f"kernel 'spectral' needs {missing} (e.g. from fit_kernel_params)")
        rho = params.get("rho", 0.5)
        _check_rho(rho)
        freq = params["frequencies"]
        d = a.shape[-1]
        if np.ndim(freq) != 2 or np.shape(freq)[1] != d:
            raise ValueError(f"spectral frequencies must have shape [Q, {d}]; got {np.shape(freq)}")
        q = np.shape(freq)[0]
        for arg in ("weights", "lengthscales"):
            if tuple(np.shape(params[arg])) != (q,):
                raise ValueError(f"spectral {arg} must have shape [{q}] (one per frequency); "
                                 f"got {np.shape(params[arg])}")
        w, ls = _concrete(params["weights"]), _concrete(params["lengthscales"])
        if w is not None and (np.any(w < 0) or not np.any(w > 0)):
            raise ValueError("spectral weights must be >= 0 with at least one > 0")
        if ls is not None and np.any(ls <= 0):
            raise ValueError("spectral lengthscales must be > 0")
        w = jnp.asarray(params["weights"], dtype)
        ls = jnp.asarray(params["lengthscales"], dtype)
        freq = jnp.asarray(freq, dtype)
        rho = jnp.asarray(rho, dtype)
        # Stationary: K(a, a) = Σ_q w_q for every a.
        return ((lambda x, y: _spectral(x, y, w, ls, freq, rho)),
                (lambda x: jnp.broadcast_to(jnp.log(jnp.sum(w)), x.shape[:-1])))
    raise ValueError(f"unknown kernel name {name!r}; expected one of {list(KERNELS)}")


def _as_float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.result_type(x.dtype, jnp.float32))


def kernel_log(name: str, a, b, *, normalized: bool = False, **params) -> jax.Array:
    """Log of a positive semi-definite kernel between rows of `a` and `b`.

    Formulas (τ = a − b), all in log space:

    - ``"polynomial"`` (``c`` > 1, default 2; Python-int ``degree`` >= 1, default 2):
      ``log K = degree · log(⟨a,b⟩ + c)``; positive base for unit vectors. For other inputs: even
      degree gives ``degree · log|⟨a,b⟩ + c|`` (K > 0), odd degree gives ``-inf`` (zero gradient)
      where ``K = (⟨a,b⟩ + c)^d <= 0``, i.e. K clipped at 0.
    - ``"rbf"`` (``sigma`` > 0): ``log K = −‖τ‖² / (2σ²)``.
    - ``"mahalanobis"`` (``cov_cholesky`` L with Σ = L Lᵀ, or ``precision`` Σ⁻¹, both [d, d]):
      ``log K = −½ τᵀ Σ⁻¹ τ = −½ ‖L⁻¹τ‖²`` (a triangular solve, never an inverse).
    - ``"spectral"`` (``weights`` [Q] >= 0, ``lengthscales`` [Q] > 0, ``frequencies`` [Q, d],
      ``rho`` in [0, 1), default 0.5):
      ``log K = logsumexp_q(log w_q − ‖τ‖²/(2ℓ_q²) + log1p(ρ cos(ω_qᵀτ))) − log1p(ρ)``,
      a spectral-mixture kernel: each term is a Schur product of PSD kernels and ρ < 1 keeps it
      strictly positive. It is a positive, PSD realization of the paper's eigenfunction expansion
      ``Σ_i exp(−λ_i z²) φ_i(z)``, not the paper's literal formula.

    With ``normalized=True``: ``log K̃(a,b) = log K(a,b) − ½(log K(a,a) + log K(b,b))``, so that
    K̃ ∈ (0, 1] (needed inside mixtures, where ``(1+c)^d`` would swamp the other kernels).

    Args:
      name: one of ``"polynomial"``, ``"rbf"``, ``"mahalanobis"``, ``"spectral"``.
      a: [B, d] (any leading batch shape) first argument.
      b: same shape as ``a``.
      normalized: return log K̃ instead of log K.
      **params: the kernel's parameters, e.g. ``**kernel_params[name]`` (see the module docstring).

    Returns:
      [B] log-kernel values in the inputs' floating dtype (at least float32).

    Raises:
      ValueError: unknown name or parameter, shape mismatch, ``sigma <= 0``, ``c <= 1``,
        non-int or < 1 ``degree``, ``rho`` outside [0, 1), invalid Cholesky factor.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0]]); b = jnp.array([[0.0, 0.0], [1.0, 0.0]])
      >>> [round(float(v), 4) for v in kernel_log("rbf", a, b, sigma=1.0)]
      [-0.5, -1.0]
      >>> [round(float(v), 4) for v in kernel_log("polynomial", a, b, c=2.0, degree=2)]
      [1.3863, 1.3863]

    Reference: Das et al. 2025, Sec. 3 and Table 1 (kernels on embeddings); SPEC §4.
    """
    a, b = _as_float(a), _as_float(b)
    dtype = jnp.result_type(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    _check_pair(a, b)
    pair, self_ = _prepare(name, a, b, params)
    out = pair(a, b)
    if normalized:
        out = out - 0.5 * (self_(a) + self_(b))
    return out


# --------------------------------------------------------------------------------------------------
# HMK and the flat mixture


def _check_theta(params, keys: tuple, size: int, what: str) -> None:
    if not isinstance(params, dict) or set(params) != set(keys):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{what} params must be a dict with keys {list(keys)}; got {got}")
    for k in keys:
        if tuple(np.shape(params[k])) != (size,):
            raise ValueError(f"{what} params[{k!r}] must have shape ({size},); "
                             f"got {np.shape(params[k])}")


_HMK_KEYS = ("theta_L", "theta_G", "theta_tau")


def init_hmk_params() -> dict:
    """Initial HMK logits: all zeros, i.e. every weight 1/2.

    ``{"theta_L": [2], "theta_G": [2], "theta_tau": [2]}`` (float32) with
    ``(λ_rbf, λ_poly) = softmax(θ_L)``, ``(λ_spec, λ_maha) = softmax(θ_G)``,
    ``(τ_local, τ_global) = softmax(θ_τ)``.

    Returns:
      dict of three float32 [2] arrays, trainable next to the policy.

    Example:
      >>> {k: v.tolist() for k, v in init_hmk_params().items()}
      {'theta_L': [0.0, 0.0], 'theta_G': [0.0, 0.0], 'theta_tau': [0.0, 0.0]}

    Reference: Das et al. 2025, Sec. 6.1 (HMK); SPEC §4.
    """
    return {k: jnp.zeros((2,), jnp.float32) for k in _HMK_KEYS}


def _hmk_log_weights(params) -> dict:
    _check_theta(params, _HMK_KEYS, 2, "hmk")
    lam_l = jax.nn.log_softmax(_as_float(params["theta_L"]))
    lam_g = jax.nn.log_softmax(_as_float(params["theta_G"]))
    tau = jax.nn.log_softmax(_as_float(params["theta_tau"]))
    return {"lambda_rbf": lam_l[0], "lambda_poly": lam_l[1], "lambda_spec": lam_g[0],
            "lambda_maha": lam_g[1], "tau_local": tau[0], "tau_global": tau[1]}


def hmk_weights(params) -> dict:
    """The HMK weights as probabilities: softmaxes of the three logit pairs.

    ``(λ_rbf, λ_poly) = softmax(θ_L)``, ``(λ_spec, λ_maha) = softmax(θ_G)``,
    ``(τ_local, τ_global) = softmax(θ_τ)``.

    Args:
      params: ``{"theta_L": [2], "theta_G": [2], "theta_tau": [2]}`` (see ``init_hmk_params``).

    Returns:
      dict of scalars with keys ``lambda_rbf, lambda_poly, lambda_spec, lambda_maha, tau_local,
      tau_global`` (the trainer logs them as ``hmk/<key>``).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"theta_L": jnp.array([0.0, jnp.log(3.0)]), "theta_G": jnp.zeros(2),
      ...      "theta_tau": jnp.zeros(2)}
      >>> {k: round(float(v), 3) for k, v in hmk_weights(p).items()}["lambda_poly"]
      0.75

    Reference: Das et al. 2025, Sec. 6.1; SPEC §4.
    """
    return {k: jnp.exp(v) for k, v in _hmk_log_weights(params).items()}


def _need_all(kernel_params: dict, what: str) -> None:
    missing = [k for k in KERNELS if k not in kernel_params]
    if missing:
        raise ValueError(f"{what} needs kernel_params for all four kernels; missing {missing} "
                         f"(fit them with fit_kernel_params)")


def hmk_log(a, b, weights, **kernel_params) -> jax.Array:
    """Log of the hierarchical mixture of kernels (HMK).

    ``K = τ_L (λ_rbf K̃_rbf + λ_poly K̃_poly) + τ_G (λ_spec K̃_spec + λ_maha K̃_maha)``, each K̃ the
    normalized kernel (``kernel_log(..., normalized=True)``), computed as a ``logsumexp`` over the
    four ``log K̃`` plus log weights (log-softmaxes of the logits). A convex combination of
    normalized PSD kernels: PSD, in (0, 1].

    Args:
      a: [B, d] first argument.
      b: [B, d] second argument.
      weights: HMK logits ``{"theta_L": [2], "theta_G": [2], "theta_tau": [2]}``.
      **kernel_params: ``rbf=..., polynomial=..., spectral=..., mahalanobis=...`` (all four; the
        dict of ``fit_kernel_params`` unpacked).

    Returns:
      [B] log K.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> x, p, n = (rng.normal(size=(8, 3)) for _ in range(3))
      >>> kp = fit_kernel_params(x, p, n)
      >>> v = hmk_log(x[:2], x[:2], init_hmk_params(), **kp)  # K̃(a, a) = 1 for every kernel
      >>> [round(float(t), 5) for t in v]
      [0.0, 0.0]

    Reference: Das et al. 2025, Sec. 6.1 and the HMK row of Table 1; SPEC §4.
    """
    _need_all(kernel_params, "hmk_log")
    lw = _hmk_log_weights(weights)
    terms = []
    for name, group in (("rbf", "tau_local"), ("polynomial", "tau_local"),
                        ("spectral", "tau_global"), ("mahalanobis", "tau_global")):
        logk = kernel_log(name, a, b, normalized=True, **kernel_params[name])
        terms.append(logk + (lw[group] + lw["lambda_" + _SHORT[name]]).astype(logk.dtype))
    return jax.nn.logsumexp(jnp.stack(terms, axis=-1), axis=-1)


def _entropy(theta) -> jax.Array:
    logp = jax.nn.log_softmax(_as_float(theta))
    return -jnp.sum(jnp.exp(logp) * logp)


def hmk_entropy(params) -> jax.Array:
    """Sum of the Shannon entropies of the three HMK weight distributions.

    ``H(λ_L) + H(λ_G) + H(τ)``, ``H(p) = −Σ p log p`` with ``log p`` from ``log_softmax`` (finite for
    any logits). The loss subtracts ``η·H`` so that no weight collapses to a single kernel.

    Args:
      params: HMK logits ``{"theta_L": [2], "theta_G": [2], "theta_tau": [2]}``.

    Returns:
      scalar, in [0, 3 log 2].

    Example:
      >>> round(float(hmk_entropy(init_hmk_params())), 4)  # 3 log 2 at uniform weights
      2.0794

    Reference: Das et al. 2025, FAQ on kernel collapse; SPEC §4 (anti-collapse).
    """
    _check_theta(params, _HMK_KEYS, 2, "hmk")
    return sum(_entropy(params[k]) for k in _HMK_KEYS)


def init_mixture_params() -> dict:
    """Initial flat-mixture logits: ``{"theta": zeros [4]}`` (float32), order rbf, polynomial,
    spectral, mahalanobis.

    Returns:
      dict with one float32 [4] array.

    Example:
      >>> init_mixture_params()["theta"].tolist()
      [0.0, 0.0, 0.0, 0.0]

    Reference: Das et al. 2025, Sec. 6 (flat mixture baseline); SPEC §4.
    """
    return {"theta": jnp.zeros((4,), jnp.float32)}


def mixture_weights(params) -> dict:
    """Flat-mixture weights ``λ = softmax(θ)``.

    Args:
      params: ``{"theta": [4]}``, order rbf, polynomial, spectral, mahalanobis.

    Returns:
      dict of scalars ``lambda_rbf, lambda_poly, lambda_spec, lambda_maha`` (logged as
      ``mixture/<key>``).

    Example:
      >>> {k: round(float(v), 2) for k, v in mixture_weights(init_mixture_params()).items()}
      {'lambda_rbf': 0.25, 'lambda_poly': 0.25, 'lambda_spec': 0.25, 'lambda_maha': 0.25}

    Reference: Das et al. 2025, Sec. 6; SPEC §4.
    """
    _check_theta(params, ("theta",), 4, "mixture")
    lam = jax.nn.softmax(_as_float(params["theta"]))
    return {"lambda_" + _SHORT[k]: lam[i] for i, k in enumerate(_MIX_ORDER)}


def mixture_log(a, b, params, **kernel_params) -> jax.Array:
    """Log of the flat mixture ``K = Σ_i λ_i K̃_i`` over the four normalized kernels.

    ``λ = softmax(θ)`` (order rbf, polynomial, spectral, mahalanobis); ``log K`` by ``logsumexp``.

    Args:
      a: [B, d] first argument.
      b: [B, d] second argument.
      params: ``{"theta": [4]}``.
      **kernel_params: all four kernels' parameters (``fit_kernel_params`` unpacked).

    Returns:
      [B] log K.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> x, p, n = (rng.normal(size=(8, 3)) for _ in range(3))
      >>> kp = fit_kernel_params(x, p, n)
      >>> bool((mixture_log(x, p, init_mixture_params(), **kp) < 0).all())  # K̃ <= 1
      True

    Reference: Das et al. 2025, Sec. 6; SPEC §4.
    """
    _need_all(kernel_params, "mixture_log")
    _check_theta(params, ("theta",), 4, "mixture")
    logw = jax.nn.log_softmax(_as_float(params["theta"]))
    terms = []
    for i, name in enumerate(_MIX_ORDER):
        logk = kernel_log(name, a, b, normalized=True, **kernel_params[name])
        terms.append(logk + logw[i].astype(logk.dtype))
    return jax.nn.logsumexp(jnp.stack(terms, axis=-1), axis=-1)


def mixture_entropy(params) -> jax.Array:
    """Shannon entropy ``H(λ) = −Σ λ log λ`` of the flat-mixture weights ``λ = softmax(θ)``.

    Args:
      params: ``{"theta": [4]}``.

    Returns:
      scalar in [0, log 4].

    Example:
      >>> round(float(mixture_entropy(init_mixture_params())), 4)  # log 4
      1.3863

    Reference: Das et al. 2025, FAQ on kernel collapse; SPEC §4.
    """
    _check_theta(params, ("theta",), 4, "mixture")
    return _entropy(params["theta"])


# --------------------------------------------------------------------------------------------------
# the embedding score


def _unit(e):
    e = _as_float(e)
    sq = jnp.sum(e * e, axis=-1, keepdims=True)
    return e * jax.lax.rsqrt(jnp.maximum(sq, _NORM_FLOOR**2))


def embedding_score(kind: str, e_x, e_pos, e_neg, *, kernel_params=None, hmk_params=None,
                    mixture_params=None) -> jax.Array:
    """The hybrid term ``s = log K(ê_x, ê_{y+}) − log K(ê_x, ê_{y−})`` on unit-normalized embeddings.

    Inputs are unit-normalized first, ``ê = e / max(‖e‖, 1e-12)`` (SPEC §3; a zero vector stays zero
    with finite gradients). Single kernels use the unnormalized ``log K``: on unit vectors every
    kernel here has a constant ``K(a, a)`` (``(1+c)^d``, 1, 1, ``Σ w_q``), so the normalized score
    would be identical and only cost more. HMK and the flat mixture use normalized kernels inside.

    Args:
      kind: ``"polynomial"``, ``"rbf"``, ``"mahalanobis"``, ``"spectral"``, ``"hmk"`` or ``"mixture"``.
      e_x: [B, d] prompt embeddings.
      e_pos: [B, d] chosen-response embeddings.
      e_neg: [B, d] rejected-response embeddings.
      kernel_params: the whole ``kernel_params`` dict (module docstring); a single kernel reads
        ``kernel_params[kind]``, HMK and the mixture need all four.
      hmk_params: HMK logits (``kind="hmk"``).
      mixture_params: flat-mixture logits (``kind="mixture"``).

    Returns:
      [B] scores, positive when the chosen response is closer to the prompt under the kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0]]); yp = jnp.array([[2.0, 0.1]]); yn = jnp.array([[0.0, 3.0]])
      >>> s = embedding_score("rbf", x, yp, yn, kernel_params={"rbf": {"sigma": 1.0}})
      >>> round(float(s[0]), 3)
      0.999

    Reference: Das et al. 2025, Sec. 3 (hybrid loss); SPEC §3.
    """
    e_x, e_pos, e_neg = _as_float(e_x), _as_float(e_pos), _as_float(e_neg)
    if not (e_x.ndim == 2 and e_x.shape == e_pos.shape == e_neg.shape):
        raise ValueError(f"e_x, e_pos, e_neg must all have the same shape [B, d]; got "
                         f"{tuple(e_x.shape)}, {tuple(e_pos.shape)}, {tuple(e_neg.shape)}")
    if kernel_params is None:
        raise ValueError(f"embedding_score({kind!r}) needs kernel_params")
    bsz = e_x.shape[0]
    # One kernel call on the stacked pairs [(x, y+); (x, y−)] instead of two.
    a = _unit(jnp.concatenate([e_x, e_x], axis=0))
    b = _unit(jnp.concatenate([e_pos, e_neg], axis=0))
    if kind == "hmk":
        if hmk_params is None:
            raise ValueError("embedding_score('hmk') needs hmk_params")
        logk = hmk_log(a, b, hmk_params, **kernel_params)
    elif kind == "mixture":
        if mixture_params is None:
            raise ValueError("embedding_score('mixture') needs mixture_params")
        logk = mixture_log(a, b, mixture_params, **kernel_params)
    elif kind in KERNELS:
        if kind not in kernel_params:
            raise ValueError(f"kernel_params has no entry for kernel {kind!r}")
        logk = kernel_log(kind, a, b, **kernel_params[kind])
    else:
        raise ValueError(f"unknown embedding_score kind {kind!r}; expected one of "
                         f"{list(KERNELS) + ['hmk', 'mixture']}")
    return logk[:bsz] - logk[bsz:]


# --------------------------------------------------------------------------------------------------
# fitting kernel parameters on training embeddings (NumPy, once, before training)


def _unit_np(e):
    e = np.asarray(e, np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), _NORM_FLOOR)


def fit_kernel_params(e_x, e_pos, e_neg, *, c: float = 2.0, degree: int = 2,
                      n_components: int = 4, rho: float = 0.5, lengthscale_factor: float = 2.0,
                      mahalanobis_bandwidth: bool = True, dtype=np.float32) -> dict:
    """Kernel parameters fitted once on training embeddings (NumPy in, NumPy/Python out).

    The embeddings are unit-normalized first, exactly as ``embedding_score`` does; with
    ``τ_i = ê_{y,i} − ê_{x,i}`` over both responses of every pair:

    - rbf: ``σ = median_i ‖τ_i‖`` (median heuristic), floored at 1e-3.
    - mahalanobis: ``Σ = s · Σ_LW`` with ``Σ_LW`` the Ledoit–Wolf shrinkage covariance of the τ_i
      (``sklearn.covariance.LedoitWolf``), returned as its Cholesky factor ``cov_cholesky``. With
      ``mahalanobis_bandwidth`` (default) ``s = median_i τ_iᵀ Σ_LW⁻¹ τ_i``, a bandwidth like the RBF
      median heuristic: without it a typical τᵀΣ⁻¹τ is about d and ``K_maha ≈ exp(−d/2)`` would
      vanish inside HMK. ``s = 1`` otherwise.
    - spectral: ``(λ_q, v_q)`` the top ``n_components`` eigenpairs of the covariance of all unit
      embeddings; ``ω_q = κ λ_q v_q`` (frequencies along the principal directions, scaled by their
      eigenvalues) with ``κ = (π/2) / (λ_1 · median_i |v_1ᵀτ_i|)`` so that the leading cosine turns a
      quarter period at a typical separation; ``w_q = λ_q / Σλ``; long length-scales
      ``ℓ_q = lengthscale_factor · σ``; ``rho`` as given.
    - polynomial: ``c`` and ``degree`` as given (defaults 2 and 2).

    Args:
      e_x: [N, d] prompt embeddings.
      e_pos: [N, d] chosen-response embeddings.
      e_neg: [N, d] rejected-response embeddings.
      c: polynomial offset (> 1).
      degree: polynomial degree (Python int >= 1).
      n_components: number Q of spectral components (capped by d).
      rho: spectral modulation depth in [0, 1).
      lengthscale_factor: spectral length-scales in units of the RBF σ.
      mahalanobis_bandwidth: rescale Σ by the median squared Mahalanobis distance.
      dtype: NumPy dtype of the returned arrays and floats.

    Returns:
      the ``kernel_params`` dict of the module docstring: arrays as NumPy, ``degree`` a Python int.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> kp = fit_kernel_params(*(rng.normal(size=(64, 5)) for _ in range(3)), n_components=3)
      >>> sorted(kp), kp["polynomial"], kp["spectral"]["frequencies"].shape
      (['mahalanobis', 'polynomial', 'rbf', 'spectral'], {'c': 2.0, 'degree': 2}, (3, 5))

    Reference: Das et al. 2025, Sec. 3 and 5 (kernel choice from data); SPEC §4.
    """
    from scipy.linalg import solve_triangular as np_solve_triangular
    from sklearn.covariance import LedoitWolf

    e_x, e_pos, e_neg = (np.asarray(e, np.float64) for e in (e_x, e_pos, e_neg))
    if not (e_x.ndim == 2 and e_x.shape == e_pos.shape == e_neg.shape):
        raise ValueError(f"e_x, e_pos, e_neg must all have the same shape [N, d]; got "
                         f"{e_x.shape}, {e_pos.shape}, {e_neg.shape}")
    n, d = e_x.shape
    if n < 2:
        raise ValueError(f"fit_kernel_params needs at least 2 pairs; got N={n}")
    _check_degree(degree)
    _positive_scalar(c, "polynomial c", above=1.0)
    _check_rho(rho)
    if not isinstance(n_components, numbers.Integral) or n_components < 1:
        raise ValueError(f"n_components must be an int >= 1; got {n_components!r}")
    _positive_scalar(lengthscale_factor, "lengthscale_factor")

    ux, up, un = _unit_np(e_x), _unit_np(e_pos), _unit_np(e_neg)
    tau = np.concatenate([up - ux, un - ux], axis=0)  # [2N, d]
    sigma = max(float(np.median(np.linalg.norm(tau, axis=-1))), 1e-3)

    cov = LedoitWolf().fit(tau).covariance_
    # Ledoit–Wolf shrinks toward a scaled identity, so Σ is positive definite unless every τ is 0.
    cov = cov + 1e-12 * np.eye(d)
    chol = np.linalg.cholesky(cov)
    if mahalanobis_bandwidth:
        z = np_solve_triangular(chol, tau.T, lower=True)
        scale = float(np.median(np.sum(z * z, axis=0)))
        if scale > 0:
            chol = chol * np.sqrt(scale)

    emb = np.concatenate([ux, up, un], axis=0)
    evals, evecs = np.linalg.eigh(np.cov(emb, rowvar=False).reshape(d, d))
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    q = min(int(n_components), d)
    if evals[0] <= 0:  # all embeddings identical: no principal direction, constant frequencies
        lam, vecs, kappa = np.full(q, 1.0 / q), evecs[:, :q], 0.0
    else:
        keep = max(1, min(q, int(np.sum(evals > evals[0] * 1e-12))))
        lam, vecs = evals[:keep], evecs[:, :keep]
        proj = max(float(np.median(np.abs(tau @ vecs[:, 0]))), 1e-6)
        kappa = (np.pi / 2.0) / (lam[0] * proj)
    freqs = kappa * lam[:, None] * vecs.T  # [Q, d]
    weights = lam / np.sum(lam)
    lengthscales = np.full(len(lam), lengthscale_factor * sigma)

    return {
        "rbf": {"sigma": np.dtype(dtype).type(sigma)},
        "polynomial": {"c": float(c), "degree": int(degree)},
        "mahalanobis": {"cov_cholesky": chol.astype(dtype)},
        "spectral": {"weights": weights.astype(dtype), "lengthscales": lengthscales.astype(dtype),
                     "frequencies": freqs.astype(dtype), "rho": float(rho)},
    }
