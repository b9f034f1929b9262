"""SPEC §9 selection metrics: pure functions of embeddings and reference top-k distributions.

See `dpok_jax.selection` for the definitions and the rules that use them.
"""

from __future__ import annotations

import numpy as np

_FLOOR = 1e-12  # distances below this count as zero (identical embeddings)


def _unit(e) -> np.ndarray:
    e = np.asarray(e, np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be [N, d]; got shape {e.shape}")
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), _FLOOR)


def kernel_metrics(e_x, e_pos, e_neg) -> dict[str, float]:
    """PND, PNAV, TAT, NAG (and drift) of [N, d] prompt / chosen / rejected embeddings.

    Pairs whose denominator is 0 (an embedding equal to its prompt's) are left out of that ratio's
    mean; `n_degenerate` counts them.

    >>> x = np.array([[1.0, 0.0]]); yp = np.array([[1.0, 0.0]]); yn = np.array([[-1.0, 0.0]])
    >>> m = kernel_metrics(x, yp, yn)
    >>> m["PND"], m["PNAV"], m["TAT"], m["NAG"], m["drift"]
    (0.0, 4.0, 1.0, 1.0, -2.0)
    """
    x, yp, yn = _unit(e_x), _unit(e_pos), _unit(e_neg)
    if not (x.shape == yp.shape == yn.shape):
        raise ValueError(f"e_x, e_pos, e_neg shapes differ: {x.shape}, {yp.shape}, {yn.shape}")
    if x.shape[0] < 1:
        raise ValueError("kernel_metrics: no pairs")
    dp, dn = np.linalg.norm(x - yp, axis=-1), np.linalg.norm(x - yn, axis=-1)
    dpn = np.linalg.norm(yp - yn, axis=-1)
    ok_pnd, ok_sum = dn > _FLOOR, dp + dn > _FLOOR

    def mean(v, ok):
        return float(np.mean(v[ok])) if ok.any() else float("nan")

    return {
        "PND": mean(dp / np.where(ok_pnd, dn, 1.0), ok_pnd),
        "PNAV": float(np.mean((dp - dn) ** 2)),
        "TAT": mean(dpn / np.where(ok_sum, dp + dn, 1.0), ok_sum),
        "NAG": mean((dn - dp) / np.where(ok_sum, dp + dn, 1.0), ok_sum),
        "drift": float(np.mean(dp - dn)),
        "n_degenerate": int(np.sum(~ok_pnd | ~ok_sum)),
    }


def _nucleus_support(idx: np.ndarray, logp: np.ndarray, mask: np.ndarray, p: float) -> set:
    """Union over masked positions of the smallest top-prob prefix reaching mass `p` (idx, logp [T, k])."""
    out: set = set()
    for t in np.flatnonzero(mask):
        order = np.argsort(-logp[t])
        cum = np.cumsum(np.exp(logp[t][order]))
        n = int(min(np.searchsorted(cum, p) + 1, len(order)))
        out.update(idx[t][order[:n]].tolist())
    return out


def support_overlap(idx_pos, logp_pos, mask_pos, idx_neg, logp_neg, mask_neg, *, nucleus: float = 0.95
                    ) -> float:
    """Mean over pairs of the Jaccard index of the chosen and rejected nucleus supports.

    Args: idx_* [N, T, k] token ids and logp_* [N, T, k] reference log-probs (top-k), mask_* [N, T]
    1 where the position predicts a response token.

    >>> i = np.array([[[1, 2]]]); lp = np.log(np.array([[[0.5, 0.5]]])); m = np.ones((1, 1))
    >>> support_overlap(i, lp, m, np.array([[[2, 3]]]), lp, m)
    0.3333333333333333
    """
    vals = []
    for n in range(len(idx_pos)):
        a = _nucleus_support(idx_pos[n], logp_pos[n], mask_pos[n], nucleus)
        b = _nucleus_support(idx_neg[n], logp_neg[n], mask_neg[n], nucleus)
        if a or b:
            vals.append(len(a & b) / len(a | b))
    return float(np.mean(vals)) if vals else float("nan")


def log_ratio_kurtosis(ref_pos_logps, ref_neg_logps) -> float:
    """Pearson kurtosis (normal = 3) of `ℓ_ref(y+) − ℓ_ref(y−)` over pairs; NaN below 4 pairs or
    for a constant log-ratio."""
    from scipy.stats import kurtosis

    z = np.asarray(ref_pos_logps, np.float64) - np.asarray(ref_neg_logps, np.float64)
    if z.size < 4 or np.std(z) == 0:
        return float("nan")
    return float(kurtosis(z, fisher=False, bias=True))


def transport_w1(idx_a, logp_a, idx_b, logp_b, cost_embeddings, *, epsilon: float = 0.01) -> np.ndarray:
    """Entropic 1-Wasserstein `<P, C>` between top-k distributions, by ott-jax Sinkhorn.

    `C_ij = 1 − cos(E[a_i], E[b_j])` on the tokens' embedding rows `E` [V, e]; each distribution is
    its top-k renormalized. Args: idx_* [P, k] ids, logp_* [P, k] log-probs. Returns [P].
    """
    import jax
    import jax.numpy as jnp
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    emb = np.asarray(cost_embeddings, np.float32)
    unit = jnp.asarray(emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), _FLOOR))

    def one(ia, la, ib, lb):
        cost = jnp.clip(1.0 - unit[ia] @ unit[ib].T, 0.0, 2.0)
        geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
        prob = linear_problem.LinearProblem(geom, jax.nn.softmax(la), jax.nn.softmax(lb))
        out = sinkhorn.Sinkhorn(lse_mode=True, max_iterations=5000)(prob)
        return jnp.sum(out.matrix * cost)

    args = [np.asarray(v) for v in (idx_a, logp_a, idx_b, logp_b)]
    if len(args[0]) == 0:
        return np.zeros((0,))
    return np.asarray(jax.jit(jax.vmap(one))(*args), np.float64)


def smoothness(idx, logp, mask, cost_embeddings, *, max_positions: int = 256, epsilon: float = 0.01
               ) -> float:
    """Mean W1 between consecutive masked positions' top-k distributions (idx, logp [N, T, k],
    mask [N, T]); at most `max_positions` consecutive pairs (the first ones in row order)."""
    a, b = [], []
    for n in range(len(idx)):
        for t in range(idx.shape[1] - 1):
            if mask[n, t] and mask[n, t + 1]:
                a.append((n, t))
                b.append((n, t + 1))
    a, b = a[:max_positions], b[:max_positions]
    if not a:
        return float("nan")
    pick = lambda arr, s: np.stack([arr[n, t] for n, t in s])  # noqa: E731
    w = transport_w1(pick(idx, a), pick(logp, a), pick(idx, b), pick(logp, b), cost_embeddings,
                     epsilon=epsilon)
    return float(np.mean(w))


