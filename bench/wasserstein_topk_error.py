"""Top-k truncation error of the Wasserstein penalty, measured against exact optimal transport.

The penalty (SPEC §6) solves OT between `p` and `q` restricted to the union of their top-k tokens,
renormalized. This script isolates that truncation: both sides are *exact* transport costs, solved as
linear programs in float64 (scipy.optimize.linprog, HiGHS), one on the full vocabulary and one on the
top-k union support, ground cost `1 − cos` between random token embeddings. Distributions are
softmaxes of Gaussian logits (`scale` sets how peaked they are); the policy is the reference plus a
perturbation of size `delta` (training starts at policy = reference and stays near it).

    python bench/wasserstein_topk_error.py            # the table in docs/math.md (about a minute)
    python bench/wasserstein_topk_error.py --vocab 40 --problems 20 --top-k 8 16

Prints, per vocabulary size, logit scale and top_k: the mean entropy of the reference distributions
(nats), the mean and 90th percentile of the relative error |W_topk − W_full| / W_full over the
problems, and the mean probability mass left outside the support (p's and q's, averaged).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.optimize import linprog
from scipy.special import softmax


def exact_ot(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> float:
    """min <P, C> over couplings of p and q (float64 linear program)."""
    n, m = len(p), len(q)
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([p, q]),
                  bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"linprog failed: {res.message}")
    return float(res.fun)


def cosine_cost(emb: np.ndarray) -> np.ndarray:
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0)


def topk_union(p: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Indices of topk(p) ∪ topk(q), as the penalty builds its support."""
    return np.union1d(np.argsort(-p)[:k], np.argsort(-q)[:k])


def measure(vocab: int, scale: float, delta: float, ks: list[int], problems: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rel = {k: [] for k in ks}
    outside = {k: [] for k in ks}
    entropy = []
    for _ in range(problems):
        emb = rng.normal(size=(vocab, 16))
        cost = cosine_cost(emb)
        ref_logits = scale * rng.normal(size=vocab)
        q = softmax(ref_logits)
        p = softmax(ref_logits + delta * rng.normal(size=vocab))
        full = exact_ot(p, q, cost)
        entropy.append(float(-np.sum(q * np.log(q))))
        for k in ks:
            s = topk_union(p, q, k)
            ps, qs = p[s] / p[s].sum(), q[s] / q[s].sum()
            w = exact_ot(ps, qs, cost[np.ix_(s, s)])
            rel[k].append(abs(w - full) / full)
            outside[k].append(0.5 * ((1.0 - p[s].sum()) + (1.0 - q[s].sum())))
    return float(np.mean(entropy)), {
        k: (float(np.mean(rel[k])), float(np.quantile(rel[k], 0.9)), float(np.mean(outside[k])))
        for k in ks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[40, 50])
    ap.add_argument("--scale", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--delta", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, nargs="+", default=[4, 8, 12, 16, 20, 24])
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"policy logits = reference logits + {args.delta} * N(0, 1); {args.problems} problems each; "
          "exact LP (float64) on the full vocabulary vs on the top-k union support")
    print(f"{'V':>4} {'scale':>5} {'H(q)':>5} {'top_k':>5} {'mean rel err':>13} {'p90 rel err':>12} "
          f"{'mass outside':>13}")
    for vocab in args.vocab:
        for scale in args.scale:
            ks = [k for k in args.top_k if k <= vocab]
            ent, rows = measure(vocab, scale, args.delta, ks, args.problems, args.seed)
            for k, (mean, p90, out) in rows.items():
                print(f"{vocab:>4} {scale:>5.1f} {ent:>5.2f} {k:>5} {100 * mean:>12.2f}% "
                      f"{100 * p90:>11.2f}% {100 * out:>12.2f}%")


if __name__ == "__main__":
    main()
