"""Cluster separation of chosen vs rejected response embeddings (SPEC §10, paper Sec. 7.4)."""

from __future__ import annotations

import numpy as np


def davies_bouldin(e_chosen, e_rejected) -> float:
    """scikit-learn's Davies–Bouldin score of two clusters, chosen [N, d] and rejected [M, d].

    `DB = max over the other cluster of (s_i + s_j) / ‖c_i − c_j‖`, averaged over the two clusters,
    `s` the mean distance of a cluster's points to its centroid `c`; lower means better separated.

    >>> round(davies_bouldin(np.array([[0.0, 0], [0, 1]]), np.array([[4.0, 0], [4, 1]])), 3)
    0.25
    """
    a, b = np.asarray(e_chosen, np.float64), np.asarray(e_rejected, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"davies_bouldin: embeddings must be [N, d] and [M, d]; got {a.shape}, {b.shape}")
    if len(a) < 1 or len(b) < 1 or len(a) + len(b) < 3:
        raise ValueError(f"davies_bouldin: need both clusters and at least 3 points; got {len(a)} + {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("davies_bouldin: embeddings contain non-finite values")
    from sklearn.metrics import davies_bouldin_score

    x = np.concatenate([a, b])
    labels = np.concatenate([np.ones(len(a), int), np.zeros(len(b), int)])
    return float(davies_bouldin_score(x, labels))
