"""Token-level divergences D(π_θ ‖ π_ref) from logits, and the f-divergence registry (SPEC.md §6).

Everything is computed from `log_softmax` in (at least) float32 and in log space. Zeros of `p` or `q`
(masked `-inf` logits) never produce NaN values or gradients: terms are selected with "safe input"
`where`s (the masked branch receives a harmless constant, so its cotangent is finite). Where the true
divergence is infinite (support of `p` not inside that of `q` for KL-like divergences, or a value past
float32 range) the result is `+inf` with zero gradient.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpok_jax.losses._wasserstein import DEFAULT_THRESHOLD, default_max_iterations, topk_sinkhorn

__all__ = [
    "F_REGISTRY",
    "FDivergence",
    "divergence",
    "hellinger_distance",
    "topk_divergence",
    "topk_reference",
]

_REQUIRED = object()
_NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------- log-space helpers


def _log_probs(logits: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return jax.nn.log_softmax(logits.astype(dtype), axis=-1)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """Masked views of two log-prob vectors; `lp`/`lq` are 0 where the probability is 0."""

    pf: jax.Array
    qf: jax.Array
    lp: jax.Array
    lq: jax.Array
    p: jax.Array
    q: jax.Array

    @property
    def both(self) -> jax.Array:
        return self.pf & self.qf

    @classmethod
    def of(cls, logp: jax.Array, logq: jax.Array) -> "_Parts":
        pf, qf = logp > _NEG_INF, logq > _NEG_INF
        lp, lq = jnp.where(pf, logp, 0.0), jnp.where(qf, logq, 0.0)
        return cls(pf, qf, lp, lq, jnp.where(pf, jnp.exp(lp), 0.0), jnp.where(qf, jnp.exp(lq), 0.0))

    def swapped(self) -> "_Parts":
        return _Parts(self.qf, self.pf, self.lq, self.lp, self.q, self.p)


def _lse(x: jax.Array) -> jax.Array:
    """logsumexp over the last axis that is exact (and NaN-free in its gradient) at ±inf entries."""
    pos = jnp.any(x == jnp.inf, axis=-1)
    empty = jnp.all(x == _NEG_INF, axis=-1)
    ok = ~pos & ~empty
    out = jax.nn.logsumexp(jnp.where(ok[..., None], x, 0.0), axis=-1)
    return jnp.where(ok, out, jnp.where(pos, jnp.inf, _NEG_INF))


def _safe_expm1(x: jax.Array, scale: float = 1.0) -> jax.Array:
    """`expm1(x) / scale` (scale > 0), `+inf` with a zero gradient exactly where it overflows the dtype.

    The bound is the dtype's own, `x > log(max · scale)` (88.72 + log scale in float32, 709.78 +
    log scale in float64): below it value and gradient `exp(x) / scale` are finite and exact, above it
    the true value is past the dtype's range. (A fixed cutoff returned +inf for float64 values as small
    as e^80, and silently zeroed the float32 gradient between e^80 and e^88.7.)
    """
    bound = math.log(float(jnp.finfo(x.dtype).max)) + math.log(scale)
    big = x > bound
    return jnp.where(big, jnp.inf, jnp.expm1(jnp.where(big, 0.0, x)) / scale)


def _infinite_where(bad: jax.Array, value: jax.Array) -> jax.Array:
    return jnp.where(bad, jnp.inf, value)


def _kl(s: _Parts) -> jax.Array:
    value = jnp.sum(jnp.where(s.both, s.p * (s.lp - s.lq), 0.0), axis=-1)
    return _infinite_where(jnp.any(s.pf & ~s.qf, axis=-1), value)


def _js(s: _Parts) -> jax.Array:
    # log m with m = (p + q)/2; where only one side is positive, log m is that side's log minus log 2.
    lm = jnp.where(s.both, jnp.logaddexp(s.lp, s.lq), jnp.where(s.pf, s.lp, s.lq)) - math.log(2.0)
    kl_pm = jnp.sum(jnp.where(s.pf, s.p * (s.lp - lm), 0.0), axis=-1)
    kl_qm = jnp.sum(jnp.where(s.qf, s.q * (s.lq - lm), 0.0), axis=-1)
    return 0.5 * (kl_pm + kl_qm)


def _squared_hellinger(s: _Parts) -> jax.Array:
    # ½ Σ (√p − √q)² equals 1 − Σ √(pq) for normalized p, q, but sums non-negative terms: its float32
    # error is relative to the value, where 1 − exp(logsumexp(·)) has a 1e-7 absolute floor near p = q.
    sp = jnp.where(s.pf, jnp.exp(0.5 * s.lp), 0.0)
    sq = jnp.where(s.qf, jnp.exp(0.5 * s.lq), 0.0)
    return 0.5 * jnp.sum((sp - sq) ** 2, axis=-1)


def _bhattacharyya(s: _Parts) -> jax.Array:
    h2 = _squared_hellinger(s)
    near = h2 < 0.5
    # −log(1 − H²) is accurate near p = q; −logsumexp(½(log p + log q)) when the coefficient is small.
    via_h2 = -jnp.log1p(-jnp.where(near, h2, 0.0))
    via_lse = -_lse(jnp.where(s.both, 0.5 * (s.lp + s.lq), _NEG_INF))
    return jnp.where(near, via_h2, via_lse)


def _log_power_sum(s: _Parts, eps: float) -> jax.Array:
    """`log Σ p^(1+ε) q^(−ε)`, accurate both when it is large and when it is close to 0."""
    both = s.both
    e = jnp.where(both, eps * (s.lp - s.lq), 0.0)
    x = jnp.where(both, s.lp + e, _NEG_INF)
    if eps > 0:  # p > 0 = q: q^(−ε) = inf
        x = jnp.where(s.pf & ~s.qf, jnp.inf, x)
    if 1.0 + eps < 0:  # p = 0 < q: p^(1+ε) = inf
        x = jnp.where(~s.pf & s.qf, jnp.inf, x)
    big = _lse(x)
    # Near p = q (or ε → 0) the sum is 1 + small: log1p(Σ p expm1(ε d)) keeps the small part's digits
    # instead of losing them to rounding in logsumexp. Over the common support Σ p e^(ε d) =
    # Σ_both p + Σ_both p expm1(ε d), and Σ_both p = 1 − m with m the mass of p where q = 0 (for ε < 0
    # those tokens contribute p^(1+ε) · 0^(−ε) = 0; for ε > 0 the sum is +inf and `big` says so).
    # Summing m directly (not 1 − Σ_both p) keeps its digits when it is small.
    e_max = jnp.max(jnp.where(both & (s.p > 0), e, _NEG_INF), axis=-1)
    off_support = jnp.sum(jnp.where(s.pf & ~s.qf, s.p, 0.0), axis=-1)
    small_sum = jnp.sum(jnp.where(both, s.p * jnp.expm1(jnp.minimum(e, 60.0)), 0.0), axis=-1) - off_support
    use_small = (jnp.abs(big) < 0.25) & (e_max <= 60.0) & (small_sum > -1.0)
    small = jnp.log1p(jnp.where(use_small, small_sum, 0.0))
    return jnp.where(use_small, small, big)


def _renyi(s: _Parts, order: float) -> jax.Array:
    if order == 1.0:
        return _kl(s)
    return _log_power_sum(s, order - 1.0) / (order - 1.0)


def _tv(s: _Parts) -> jax.Array:
    return 0.5 * jnp.sum(jnp.abs(s.p - s.q), axis=-1)


def _chi2(s: _Parts) -> jax.Array:
    return _safe_expm1(_log_power_sum(s, 1.0))


def _alpha(s: _Parts, alpha: float) -> jax.Array:
    if alpha == 1.0:
        return _kl(s)
    if alpha == 0.0:
        return _kl(s.swapped())
    denom = alpha * (alpha - 1.0)
    if denom > 0:  # a < 0 or a > 1: expm1(·) / denom, +inf exactly where the quotient overflows
        return _safe_expm1(_log_power_sum(s, alpha - 1.0), denom)
    # 0 < a < 1: the power sum is in [0, 1], expm1 in [−1, 0]: the quotient is bounded by 1/|denom|.
    return jnp.expm1(_log_power_sum(s, alpha - 1.0)) / denom


# ----------------------------------------------------------------------------- the f registry


@dataclasses.dataclass(frozen=True)
class FDivergence:
    """A registry entry: the convex generator `f` (f(1) = 0) and its log-space evaluation.

    `f(u, **params)` is the scalar generator (for inspection, plots and tests); `from_logprobs(parts,
    **params)` computes `Σ q f(p/q)` from log-probabilities without forming `p/q`.
    """

    name: str
    f: Callable[..., Any]
    from_logprobs: Callable[..., jax.Array]
    params: tuple[str, ...] = ()


def _alpha_f(u, *, alpha):
    if alpha == 1.0:
        return u * jnp.log(u)
    if alpha == 0.0:
        return -jnp.log(u)
    return (u**alpha - alpha * u - (1.0 - alpha)) / (alpha * (alpha - 1.0))


F_REGISTRY: dict[str, FDivergence] = {
    "kl": FDivergence("kl", lambda u: u * jnp.log(u), _kl),
    "reverse_kl": FDivergence("reverse_kl", lambda u: -jnp.log(u), lambda s: _kl(s.swapped())),
    "chi2": FDivergence("chi2", lambda u: (u - 1.0) ** 2, _chi2),
    "tv": FDivergence("tv", lambda u: 0.5 * jnp.abs(u - 1.0), _tv),
    "js": FDivergence(
        "js", lambda u: 0.5 * (u * jnp.log(u) - (u + 1.0) * jnp.log((u + 1.0) / 2.0)), _js
    ),
    "alpha": FDivergence("alpha", _alpha_f, _alpha, ("alpha",)),
    "squared_hellinger": FDivergence(
        "squared_hellinger", lambda u: 0.5 * (jnp.sqrt(u) - 1.0) ** 2, _squared_hellinger
    ),
}


# Headroom below the dtype's largest exponent: a callable is evaluated directly only where
# |log u| <= log(max) − 8 (80.7 in float32, 701.8 in float64), so u <= e^80.7 and f(u) of u log u-type
# generators stays ~30x below float32's largest number.
_USER_F_HEADROOM = 8.0


def _user_f_cutoff(dtype) -> float:
    return math.log(float(jnp.finfo(dtype).max)) - _USER_F_HEADROOM


def _user_f(s: _Parts, f: Callable) -> jax.Array:
    """`Σ q f(p/q)` for a user generator `f`, stable for any log-ratio `t = log p − log q`.

    Each term is evaluated in the perspective form that keeps its scale: `p · f(u)/u` for `t > 0` and
    `q · f(u)` for `t <= 0` (the larger of p, q multiplies, so an underflowed q or p never meets an
    overflowed u in `0 · inf`). `u = e^t` itself is only formed for `|t| <= c`, `c = log(max) − 8`
    (80.7 in float32): past it, the term is extended linearly in `t` from the cutoff,

        t > c:   p · (g(c) + g'(c) (t − c)),   g(t) = f(e^t) e^(−t)
        t < −c:  q · (h(−c) + h'(−c) (t + c)), h(t) = f(e^t)

    with `g, g', h, h'` from `jax.jvp` of `f` at the constant cutoff. This is exact for generators of
    the form `A u log u + B u + C log u + D` up to terms that vanish at the cutoff (kl, reverse_kl,
    tv, js, squared_hellinger, alpha with 0 < a < 1: e.g. `u log u` at t = 100 in float32 gives the
    registry's KL) and a lower bound for tails that grow faster in `t` (`u^a`, a > 1); registry
    entries, evaluated in log space, are exact there. Where `f(u)` (or `g(c)`, `g'(c)`) is not finite
    the term is `+inf` with a zero gradient, never NaN.

    `p = 0 < q` contributes `q f(0)`; `p > 0 = q` contributes `p f'(∞)`, taken as `+inf` (true of
    every superlinear f; registry entries handle the finite cases exactly).
    """
    dtype = s.q.dtype
    both = s.both
    cut = _user_f_cutoff(dtype)
    t = jnp.where(both, s.lp - s.lq, 0.0)
    inner = jnp.abs(t) <= cut
    t_in = jnp.where(inner, t, 0.0)
    # Where f(u) is not finite the term is +inf: find those entries on a gradient-free probe, then
    # evaluate f again on a harmless u = 1 there, so no inf or NaN cotangent reaches the logits.
    probe = jnp.asarray(f(jax.lax.stop_gradient(jnp.exp(t_in))), dtype)
    bad = both & inner & ~jnp.isfinite(probe)
    t_in = jnp.where(bad, 0.0, t_in)
    fu = jnp.asarray(f(jnp.exp(t_in)), dtype)
    direct = jnp.where(t_in > 0, s.p * (fu * jnp.exp(-t_in)), s.q * fu)

    def g(x):  # f(e^x) e^(−x): the per-unit-of-p term for large t
        return jnp.asarray(f(jnp.exp(x)), dtype) * jnp.exp(-x)

    def h(x):  # f(e^x): the per-unit-of-q term for very negative t
        return jnp.asarray(f(jnp.exp(x)), dtype)

    one = jnp.ones((), dtype)
    g_c, dg_c = jax.jvp(g, (cut * one,), (one,))
    h_c, dh_c = jax.jvp(h, (-cut * one,), (one,))
    hi_ok = jnp.isfinite(g_c) & jnp.isfinite(dg_c)
    lo_ok = jnp.isfinite(h_c) & jnp.isfinite(dh_c)
    t_hi = jnp.where(t > cut, t, cut)
    t_lo = jnp.where(t < -cut, t, -cut)
    upper = s.p * (jnp.where(hi_ok, g_c, 0.0) + jnp.where(hi_ok, dg_c, 0.0) * (t_hi - cut))
    lower = s.q * (jnp.where(lo_ok, h_c, 0.0) + jnp.where(lo_ok, dh_c, 0.0) * (t_lo + cut))
    term = jnp.where(inner, direct, jnp.where(t > 0, upper, lower))
    term_inf = bad | (both & (t > cut) & ~hi_ok) | (both & (t < -cut) & ~lo_ok)
    value = jnp.sum(jnp.where(both & ~term_inf, term, 0.0), axis=-1)
    value = _infinite_where(jnp.any(term_inf, axis=-1), value)
    # p = 0 < q contributes q f(0); p > 0 = q contributes p f'(∞) = +inf (see the docstring).
    f0 = jnp.asarray(f(jnp.zeros((), dtype)), dtype)
    f0_ok = jnp.isfinite(f0)
    mass0 = jnp.sum(jnp.where(~s.pf & s.qf, s.q, 0.0), axis=-1)
    value = value + jnp.where(mass0 > 0, jnp.where(f0_ok, mass0 * jnp.where(f0_ok, f0, 0.0), jnp.inf), 0.0)
    return _infinite_where(jnp.any(s.pf & ~s.qf, axis=-1), value)


# ----------------------------------------------------------------------------- parameter checks


def _take(name: str, params: dict, spec: dict[str, Any]) -> dict:
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise ValueError(f"divergence {name!r}: unexpected parameter(s) {unknown}; accepted: {sorted(spec)}")
    out = {}
    for key, default in spec.items():
        if key in params:
            out[key] = params[key]
        elif default is _REQUIRED:
            raise ValueError(f"divergence {name!r}: missing required parameter {key!r}")
        else:
            out[key] = default
    return out


def _static_float(name: str, key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(f"divergence {name!r}: {key!r} must be a static Python number, got {value!r}") from err


_NAMES = ("kl", "js", "squared_hellinger", "hellinger", "renyi", "bhattacharyya", "f", "wasserstein")


def _from_logprobs(name: str, logp: jax.Array, logq: jax.Array, params: dict) -> jax.Array:
    """Every divergence except wasserstein, from normalized log-probabilities."""
    if name not in _NAMES:
        raise ValueError(f"unknown divergence name {name!r}; expected one of {_NAMES}")
    if name in ("kl", "js", "squared_hellinger", "hellinger", "bhattacharyya"):
        _take(name, params, {})
        fn = {
            "kl": _kl, "js": _js, "squared_hellinger": _squared_hellinger,
            "hellinger": _squared_hellinger, "bhattacharyya": _bhattacharyya,
        }[name]
        return fn(_Parts.of(logp, logq))
    if name == "renyi":
        order = _static_float(name, "order", _take(name, params, {"order": _REQUIRED})["order"])
        if not order > 0:
            raise ValueError(f"divergence 'renyi': 'order' must be > 0, got {order}")
        return _renyi(_Parts.of(logp, logq), order)
    if name == "f":
        f = params.get("f", _REQUIRED)
        if f is _REQUIRED:
            raise ValueError("divergence 'f': missing required parameter 'f' (a F_REGISTRY name or a callable)")
        rest = {k: v for k, v in params.items() if k != "f"}
        if callable(f):
            _take("f", rest, {})
            return _user_f(_Parts.of(logp, logq), f)
        if f not in F_REGISTRY:
            raise ValueError(f"divergence 'f': unknown 'f' {f!r}; registry: {sorted(F_REGISTRY)}")
        entry = F_REGISTRY[f]
        kw = _take(f"f={f}", rest, {p: _REQUIRED for p in entry.params})
        kw = {k: _static_float("f", k, v) for k, v in kw.items()}
        return entry.from_logprobs(_Parts.of(logp, logq), **kw)
    raise ValueError("divergence 'wasserstein' needs token identities (the full vocabulary); "
                     "it is not available on top-k buckets")


def _check_shapes(**arrays: jax.Array) -> None:
    (n1, a1), (n2, a2) = arrays.items()
    if a1.shape != a2.shape:
        raise ValueError(f"{n1} and {n2} must have the same shape, got {a1.shape} and {a2.shape}")


# ----------------------------------------------------------------------------- public API


def divergence(name: str, policy_logits: jax.Array, ref_logits: jax.Array, **params: Any) -> jax.Array:
    r"""Per-position divergence `D(p ‖ q)`, `p = softmax(policy_logits)`, `q = softmax(ref_logits)`.

    Reduced over the last (vocabulary) axis only, from `log_softmax` in float32 (float64 stays
    float64; bf16 is upcast). Names and what they compute (`d = log p − log q`):

    - `"kl"`: `Σ p (log p − log q)`; `+inf` when `p > 0 = q` somewhere.
    - `"js"`: `½ KL(p‖m) + ½ KL(q‖m)`, `m = ½(p+q)`, `log m` by `logaddexp`; in `[0, log 2]`.
    - `"squared_hellinger"` (alias `"hellinger"`, SPEC §6): `H² = 1 − Σ √(pq)`, evaluated as
      `½ Σ (√p − √q)²` (same value, precise near `p = q`); in `[0, 1]`. The distance `H = √H²` is
      :func:`hellinger_distance`, a metric only (infinite gradient at `p = q`).
    - `"renyi"` (`order` a > 0, static): `1/(a−1) log Σ p^a q^(1−a)`; `a = 1` is KL exactly; near 1
      the sum is evaluated as `log1p(Σ p expm1((a−1) d))` to keep its digits.
    - `"bhattacharyya"`: `−log Σ √(pq)`; `+inf` for disjoint supports.
    - `"f"` (`f` a :data:`F_REGISTRY` name, or a callable `u -> f(u)`): `Σ q f(p/q)`. Registry:
      `kl` (u log u), `reverse_kl` (−log u), `chi2` ((u−1)²), `tv` (½|u−1|), `js`, `alpha`
      (`alpha` a, Amari: (u^a − a u − (1−a)) / (a(a−1)); a = 1 is KL, a = 0 reverse KL),
      `squared_hellinger` (½(√u − 1)²), each evaluated in log space. A callable is evaluated on
      `u = p/q` directly; where `p > 0 = q` it counts `p f'(∞)` as `+inf`.
    - `"wasserstein"` (`cost_embeddings` [V, e], `epsilon` = 0.1, `top_k` = 16, `debiased` = True,
      `threshold` = 1e-5, `max_iterations` = max(2000, 100/ε), `lse_mode` = None,
      `return_converged` = False):
      entropic OT (ott-jax Sinkhorn) between `p` and `q` restricted to the union of their top-k
      tokens and renormalized, ground cost `1 − cos` between those tokens' embedding rows (gradient
      stopped). By default the debiased Sinkhorn divergence `W_ε(p,q) − ½W_ε(p,p) − ½W_ε(q,q)`
      (0 with a zero gradient at `p = q`); `debiased=False` gives the biased `reg_ot_cost` `W_ε`,
      which is not 0 at `p = q`. With `return_converged=True` the result is `(value, converged)`,
      `converged` [...] bool saying whether every Sinkhorn solve reached `threshold`; otherwise an
      eager call with unconverged positions emits a RuntimeWarning. Approximate (truncation); see
      :func:`dpok_jax.losses._wasserstein.topk_sinkhorn`.

    Zeros in `p` or `q` never give NaN values or gradients; infinite divergences are `+inf` with
    zero gradient.

    Args:
      name: one of the names above.
      policy_logits: [..., V] logits of π_θ.
      ref_logits: [..., V] logits of π_ref (same shape).
      **params: the name's hyperparameters (keyword-only; unknown ones raise ValueError).

    Returns:
      [...] the divergence per position, float32 (float64 for float64 input); for
      `"wasserstein"` with `return_converged=True`, `(value, converged)`.

    Raises:
      ValueError: unknown name or parameter, shape mismatch, `order <= 0`, `epsilon <= 0`,
        `top_k` outside [1, V], `threshold <= 0`, `max_iterations < 1` (at trace time).

    Example:
      >>> import jax.numpy as jnp
      >>> p = jnp.log(jnp.array([0.5, 0.5])); q = jnp.log(jnp.array([0.9, 0.1]))
      >>> round(float(divergence("kl", p, q)), 4)  # 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1)
      0.5108
      >>> round(float(divergence("renyi", p, q, order=1.0)), 4)
      0.5108
      >>> round(float(divergence("f", p, q, f="tv")), 4)
      0.4

    Reference: DPO-Kernels paper, Sec. 4 (divergence regularizers); SPEC.md §6.
    """
    _check_shapes(policy_logits=policy_logits, ref_logits=ref_logits)
    logp, logq = _log_probs(policy_logits), _log_probs(ref_logits)
    if name != "wasserstein":
        return _from_logprobs(name, logp, logq, params)
    kw = _take(name, params, {
        "cost_embeddings": _REQUIRED, "epsilon": 0.1, "top_k": 16, "debiased": True,
        "threshold": DEFAULT_THRESHOLD, "max_iterations": None, "lse_mode": None,
        "return_converged": False,
    })
    emb = kw.pop("cost_embeddings")
    vocab = policy_logits.shape[-1]
    if emb.ndim != 2 or emb.shape[0] != vocab:
        raise ValueError(f"divergence 'wasserstein': 'cost_embeddings' must be [V={vocab}, e], got {emb.shape}")
    eps = _static_float(name, "epsilon", kw["epsilon"])
    if not eps > 0:
        raise ValueError(f"divergence 'wasserstein': 'epsilon' must be > 0, got {eps}")
    top_k = int(kw["top_k"])
    if not 1 <= top_k <= vocab:
        raise ValueError(f"divergence 'wasserstein': 'top_k' must be in [1, V={vocab}], got {top_k}")
    threshold = _static_float(name, "threshold", kw["threshold"])
    if not threshold > 0:
        raise ValueError(f"divergence 'wasserstein': 'threshold' must be > 0, got {threshold}")
    max_iterations = kw["max_iterations"]
    max_iterations = default_max_iterations(eps) if max_iterations is None else int(max_iterations)
    if max_iterations < 1:
        raise ValueError(f"divergence 'wasserstein': 'max_iterations' must be >= 1, got {max_iterations}")
    value, converged = topk_sinkhorn(
        logp, logq, emb, epsilon=eps, top_k=top_k, debiased=bool(kw["debiased"]),
        threshold=threshold, max_iterations=max_iterations,
        lse_mode=None if kw["lse_mode"] is None else bool(kw["lse_mode"]),
    )
    if kw["return_converged"]:
        return value, converged
    _warn_if_unconverged(converged, eps, threshold, max_iterations)
    return value


def _warn_if_unconverged(converged: jax.Array, eps: float, threshold: float, max_iterations: int) -> None:
    """Eager calls only (under a trace the flag is abstract): a RuntimeWarning naming the count."""
    if isinstance(converged, jax.core.Tracer):
        return
    flags = np.asarray(converged)
    if flags.all():
        return
    warnings.warn(
        f"divergence 'wasserstein': Sinkhorn did not reach threshold={threshold:g} within "
        f"max_iterations={max_iterations} at {int((~flags).sum())} of {flags.size} position(s) "
        f"(epsilon={eps:g}); those values come from an infeasible plan and can lie below the exact "
        "transport cost. Raise max_iterations or epsilon, or pass return_converged=True to get the "
        "per-position flags.",
        RuntimeWarning,
        stacklevel=3,
    )


def hellinger_distance(policy_logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
    """Hellinger distance `H = sqrt(H²)`, a metric for reports (not for training: ∞ gradient at p = q).

    Args:
      policy_logits, ref_logits: [..., V] logits.

    Returns:
      [...] `H` in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> float(hellinger_distance(jnp.array([0.0, -jnp.inf]), jnp.array([-jnp.inf, 0.0])))
      1.0

    Reference: SPEC.md §6 (`hellinger`).
    """
    return jnp.sqrt(divergence("squared_hellinger", policy_logits, ref_logits))


def _log1mexp(x: jax.Array) -> jax.Array:
    """`log(1 − exp(x))` for x <= 0 (Mächler 2012); `-inf` at x >= 0 with a zero gradient."""
    neg = x < 0
    xs = jnp.where(neg, x, -1.0)
    out = jnp.where(xs > -math.log(2.0), jnp.log(-jnp.expm1(xs)), jnp.log1p(-jnp.exp(xs)))
    return jnp.where(neg, out, _NEG_INF)


def _with_tail(logps: jax.Array) -> jax.Array:
    """[..., k] log-probs -> [..., k+1] with the tail bucket `log(1 − Σ exp)` appended.

    The tail is floored at the dtype's epsilon: a logsumexp near 0 carries ~eps absolute rounding, so a
    smaller tail is unknowable, and a rounded-to-zero reference tail would make KL-like divergences
    infinite against any policy tail.
    """
    floor = math.log(float(jnp.finfo(logps.dtype).eps))
    return jnp.concatenate([logps, jnp.maximum(_log1mexp(_lse(logps)), floor)[..., None]], axis=-1)


def topk_divergence(
    name: str, policy_logits: jax.Array, ref_indices: jax.Array, ref_logps: jax.Array, **params: Any
) -> jax.Array:
    r"""Approximate `D(p ‖ q)` on the reference's top-k tokens plus one tail bucket.

    `p̂ = (p_{i_1}, …, p_{i_k}, 1 − Σ_j p_{i_j})`, `q̂ = (q_{i_1}, …, q_{i_k}, 1 − Σ_j q_{i_j})` with
    `i_1..i_k` the reference's top-k token ids; returns `D(p̂ ‖ q̂)` for any name of :func:`divergence`
    except `"wasserstein"`. By the data-processing inequality `D(p̂‖q̂) <= D(p‖q)` for every
    f-divergence (KL, JS, H², f, and monotone transforms: Rényi, Bhattacharyya): the approximation
    under-estimates, by the divergence hidden inside the tail; it is exact when the tail holds the same
    relative distribution under both. This is what a precomputed reference allows (SPEC §6): its full
    logits are not stored. Tail masses are computed as `log1p(−exp(logsumexp(·)))` (stable form) and
    floored at the dtype's epsilon (2^-23 in float32), below which they are rounding noise.

    Args:
      name: a divergence name (see :func:`divergence`), not "wasserstein".
      policy_logits: [..., V] logits of π_θ.
      ref_indices: [..., k] int token ids of the reference's top-k.
      ref_logps: [..., k] the reference's log-probabilities at those ids.
      **params: the name's hyperparameters.

    Returns:
      [...] the bucketed divergence.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.log(jnp.array([0.7, 0.2, 0.05, 0.05]))
      >>> idx, lq = jnp.array([0, 1]), jnp.log(jnp.array([0.7, 0.2]))
      >>> abs(float(topk_divergence("kl", logits, idx, lq))) < 1e-6  # p̂ = q̂ on the 3 buckets
      True

    Reference: SPEC.md §6 (precomputed-reference mode).
    """
    _check_shapes(ref_indices=ref_indices, ref_logps=ref_logps)
    if ref_indices.shape[:-1] != policy_logits.shape[:-1]:
        raise ValueError(
            f"ref_indices leading shape {ref_indices.shape[:-1]} must match policy_logits "
            f"{policy_logits.shape[:-1]}"
        )
    if name == "wasserstein":
        raise ValueError("divergence 'wasserstein' needs a live reference (full logits), not top-k")
    logp = _log_probs(policy_logits)
    p_k = jnp.take_along_axis(logp, ref_indices.astype(jnp.int32), axis=-1)
    q_k = ref_logps.astype(logp.dtype)
    # Renormalize the (k+1)-bucket vectors: rounding can leave them a few ulps off a distribution.
    p_hat = jax.nn.log_softmax(_with_tail(p_k), axis=-1)
    q_hat = jax.nn.log_softmax(_with_tail(q_k), axis=-1)
    return _from_logprobs(name, p_hat, q_hat, params)


def topk_reference(hidden: jax.Array, unembed: jax.Array, *, k: int, chunk_size: int = 128):
    """The reference's top-k next-token log-probs per position, computed chunk by chunk.

    `logits = hidden @ unembed`, `(indices, logps) = top_k(log_softmax(logits), k)`; the `[B, T, V]`
    logits are never materialized (one `[B, chunk, V]` block at a time). The tail mass is
    `1 − Σ exp(logps)`, recovered where needed (see :func:`topk_divergence`). No gradient.

    Args:
      hidden: [B, T, H] final hidden states of the reference.
      unembed: [H, V] its unembedding matrix.
      k: tokens kept per position, 1 <= k <= V.
      chunk_size: positions per chunk.

    Returns:
      (indices [B, T, k] int32, logps [B, T, k] float32), sorted by decreasing probability.

    Example:
      >>> import jax.numpy as jnp
      >>> idx, lp = topk_reference(jnp.ones((1, 3, 2)), jnp.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]),
      ...                          k=2, chunk_size=2)
      >>> idx.shape, lp.shape, idx[0, 0].tolist()
      ((1, 3, 2), (1, 3, 2), [2, 1])

    Reference: SPEC.md §6 (precomputed-reference mode).
    """
    # Imported here: _logprobs depends on this module for the divergences it fuses into its pass.
    from dpok_jax.losses._logprobs import _check_head, _chunk_logits, _map_chunks

    _check_head(hidden, unembed, None)
    vocab = unembed.shape[-1]
    k = int(k)
    if not 1 <= k <= vocab:
        raise ValueError(f"'k' must be in [1, V={vocab}], got {k}")
    hidden = jax.lax.stop_gradient(hidden)
    unembed = jax.lax.stop_gradient(unembed)

    def chunk(h):  # [B, C, H] -> ([B, C, k], [B, C, k])
        logits = _chunk_logits(h, unembed)
        vals, idx = jax.lax.top_k(logits, k)
        return idx.astype(jnp.int32), vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    return _map_chunks(chunk, (hidden,), chunk_size=chunk_size, remat=False)
