"""The paper's Table-1 kernels of the scalar log-ratio, for loss-landscape plots only.

Das et al. (2025), Table 1, write each kernel as a function of the scalar log-ratio margin
``z = log π_θ(y+|x)/π_ref(y+|x) − log π_θ(y−|x)/π_ref(y−|x)`` (e.g. RBF ``exp(−z²/2σ²)``) and say the
kernelized term is *maximized*. These forms are **not trainable objectives**, which is why nothing
in training calls this module:

- RBF ``exp(−z²/2σ²)`` has gradient ``−z/σ² · exp(−z²/2σ²)``: gradient ascent pushes ``z`` toward 0
  from both sides, i.e. it *erases* the preference instead of widening it (and the Mahalanobis and
  spectral scalar forms, also peaked at 0, do the same).
- the polynomial ``(z + c)^d`` with even ``d`` grows in both directions, so ascent rewards preferring
  the rejected response as much as the chosen one once ``z < −c``.

The trainable, principled places for non-linearity are kernels between embedding *vectors*
(``losses.kernel_log``, ``hmk_log``, ``embedding_score``; SPEC §4, the way Table 1's HMK row is
written) and f-divergence transforms of the probability ratio (``losses.implicit_reward``, SPEC §7).
The functions here reproduce the scalar forms so the paper's Fig. 1 landscapes can be drawn and the
argument above checked (``ascent_direction``).

Reference: Das et al. 2025, Table 1 and Fig. 1; SPEC §5 "Why the kernel acts on embeddings".
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

FORMS = ("polynomial", "rbf", "spectral", "mahalanobis")


def _float(z):
    z = jnp.asarray(z)
    return z.astype(jnp.result_type(z.dtype, jnp.float32))


def _positive(value, arg: str) -> None:
    v = np.asarray(value)
    if np.any(~np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"{arg} must be > 0; got {value!r}")


def polynomial(z, *, c: float = 1.0, degree: int = 2) -> jax.Array:
    """Table 1's scalar polynomial form ``(z + c)^degree`` (landscape only; not trainable).

    Args:
      z: [...] log-ratio margins.
      c: offset.
      degree: Python int >= 1.

    Returns:
      [...] values.

    Example:
      >>> [float(v) for v in polynomial(jnp.array([-3.0, 1.0]), c=1.0, degree=2)]
      [4.0, 4.0]

    Reference: Das et al. 2025, Table 1 (polynomial row).
    """
    if not isinstance(degree, numbers.Integral) or isinstance(degree, bool) or degree < 1:
        raise ValueError(f"degree must be a Python int >= 1; got {degree!r}")
    return (_float(z) + c) ** degree


def rbf(z, *, sigma: float = 1.0) -> jax.Array:
    """Table 1's scalar RBF form ``exp(−z² / (2σ²))`` (landscape only; peaked at z = 0).

    Args:
      z: [...] log-ratio margins.
      sigma: bandwidth > 0.

    Returns:
      [...] values in (0, 1].

    Example:
      >>> [round(float(v), 4) for v in rbf(jnp.array([0.0, 1.0]), sigma=1.0)]
      [1.0, 0.6065]

    Reference: Das et al. 2025, Table 1 (RBF row).
    """
    _positive(sigma, "sigma")
    z = _float(z)
    return jnp.exp(-z * z / (2.0 * sigma**2))


def mahalanobis(z, *, mu: float = 0.0, var: float = 1.0) -> jax.Array:
    """Table 1's Mahalanobis form in one dimension, ``exp(−(z − μ)² / (2 var))`` (landscape only).

    Args:
      z: [...] log-ratio margins.
      mu: centre.
      var: variance > 0.

    Returns:
      [...] values in (0, 1].

    Example:
      >>> round(float(mahalanobis(jnp.array(2.0), mu=1.0, var=0.5)), 4)
      0.3679

    Reference: Das et al. 2025, Table 1 (Mahalanobis row).
    """
    _positive(var, "var")
    d = _float(z) - mu
    return jnp.exp(-d * d / (2.0 * var))


def spectral(z, *, lambdas=(1.0, 0.5), freqs=(1.0, 2.0)) -> jax.Array:
    """Table 1's spectral form ``Σ_i exp(−λ_i z²) φ_i(z)`` with ``φ_i(z) = cos(ω_i z)``.

    The paper leaves the eigenfunctions ``φ_i`` unspecified; cosines (the eigenfunctions of a
    stationary kernel on the line) are our choice for the plots.

    Args:
      z: [...] log-ratio margins.
      lambdas: [I] decay rates > 0.
      freqs: [I] frequencies ``ω_i``.

    Returns:
      [...] values.

    Example:
      >>> round(float(spectral(jnp.array(0.0))), 4)
      2.0

    Reference: Das et al. 2025, Table 1 (spectral row).
    """
    lam, om = np.asarray(lambdas, np.float64), np.asarray(freqs, np.float64)
    if lam.ndim != 1 or lam.shape != om.shape:
        raise ValueError(f"lambdas and freqs must be 1-D of equal length; got {lam.shape}, "
                         f"{om.shape}")
    _positive(lam, "lambdas")
    z = _float(z)[..., None]
    lam, om = jnp.asarray(lam, z.dtype), jnp.asarray(om, z.dtype)
    return jnp.sum(jnp.exp(-lam * z * z) * jnp.cos(om * z), axis=-1)


_FNS = {"polynomial": polynomial, "rbf": rbf, "spectral": spectral, "mahalanobis": mahalanobis}


def paper_form(name: str, z, **params) -> jax.Array:
    """One of the Table-1 scalar forms by name (``FORMS``), for landscape plots.

    Args:
      name: ``"polynomial"``, ``"rbf"``, ``"spectral"`` or ``"mahalanobis"``.
      z: [...] log-ratio margins.
      **params: the form's keywords.

    Returns:
      [...] values.

    Example:
      >>> round(float(paper_form("rbf", jnp.array(1.0), sigma=2.0)), 4)
      0.8825

    Reference: Das et al. 2025, Table 1.
    """
    if name not in _FNS:
        raise ValueError(f"unknown paper form {name!r}; expected one of {list(FORMS)}")
    return _FNS[name](z, **params)


def ascent_direction(name: str, z, **params) -> jax.Array:
    """``d/dz`` of a Table-1 form: the direction gradient *ascent* (the paper's "maximize") moves z.

    For the RBF form this is ``−z/σ² · exp(−z²/2σ²)``: negative for z > 0 and positive for z < 0,
    so maximizing drives every margin to 0 (the preference is erased).

    Args:
      name: a form in ``FORMS``.
      z: [...] log-ratio margins.
      **params: the form's keywords.

    Returns:
      [...] derivatives.

    Example:
      >>> [round(float(v), 4) for v in ascent_direction("rbf", jnp.array([-1.0, 1.0]))]
      [0.6065, -0.6065]

    Reference: Das et al. 2025, Table 1; SPEC §5.
    """
    z = _float(z)
    grad = jax.grad(lambda t: paper_form(name, t, **params))
    return jnp.vectorize(grad)(z)
