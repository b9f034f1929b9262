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
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpok_jax.losses._wasserstein import topk_sinkhorn

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


def _safe_expm1(x: jax.Array) -> jax.Array:
    """expm1 that returns +inf (zero gradient) past float32 range instead of inf * 0 = NaN later."""
    big = x > 80.0
    return jnp.where(big, jnp.inf, jnp.expm1(jnp.where(big, 0.0, x)))


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
    # instead of losing them to rounding in logsumexp.
    e_max = jnp.max(jnp.where(both & (s.p > 0), e, _NEG_INF), axis=-1)
    small_sum = jnp.sum(jnp.where(both, s.p * jnp.expm1(jnp.minimum(e, 60.0)), 0.0), axis=-1)
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
    return _safe_expm1(_log_power_sum(s, alpha - 1.0)) / (alpha * (alpha - 1.0))


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


def _user_f(s: _Parts, f: Callable) -> jax.Array:
    """`Σ q f(p/q)` for a user generator, evaluated on `u = p/q` directly (not in log space)."""
    both = s.both
    u = jnp.exp(jnp.where(both, s.lp - s.lq, 0.0))
    value = jnp.sum(jnp.where(both, s.q * f(u), 0.0), axis=-1)
    # p = 0 < q contributes q f(0); p > 0 = q contributes p f'(∞), taken as +inf (true of every
    # superlinear f; registry entries handle the finite cases exactly).
    f0 = jnp.asarray(f(jnp.zeros((), s.q.dtype)), s.q.dtype)
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
    - `"wasserstein"` (`cost_embeddings` [V, e], `epsilon` = 0.1, `top_k` = 16, `debiased` = False,
      `threshold` = 1e-3, `max_iterations` = 2000): entropic OT (ott-jax Sinkhorn, `reg_ot_cost`)
      between `p` and `q` restricted to the union of their top-k tokens and renormalized, ground cost
      `1 − cos` between those tokens' embedding rows (gradient stopped). Approximate (truncation);
      see :func:`dpok_jax.losses._wasserstein.topk_sinkhorn`.

    Zeros in `p` or `q` never give NaN values or gradients; infinite divergences are `+inf` with
    zero gradient.

    Args:
      name: one of the names above.
      policy_logits: [..., V] logits of π_θ.
      ref_logits: [..., V] logits of π_ref (same shape).
      **params: the name's hyperparameters (keyword-only; unknown ones raise ValueError).

    Returns:
      [...] the divergence per position, float32 (float64 for float64 input).

    Raises:
      ValueError: unknown name or parameter, shape mismatch, `order <= 0`, `epsilon <= 0`,
        `top_k < 1` (at trace time).

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
        "cost_embeddings": _REQUIRED, "epsilon": 0.1, "top_k": 16, "debiased": False,
        "threshold": 1e-3, "max_iterations": 2000, "lse_mode": None,
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
    return topk_sinkhorn(
        logp, logq, emb, epsilon=eps, top_k=top_k, debiased=bool(kw["debiased"]),
        threshold=float(kw["threshold"]), max_iterations=int(kw["max_iterations"]),
        lse_mode=None if kw["lse_mode"] is None else bool(kw["lse_mode"]),
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
