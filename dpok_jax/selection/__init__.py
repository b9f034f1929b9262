"""Data-driven choice of the kernel and the divergence before training (SPEC §9, paper Sec. 5).

Kernel metrics, over unit-normalized training embeddings with `d(a, b) = ‖a − b‖`, `d± = d(x, y±)`::

    PND  = mean d+ / d−                    PNAV = mean (d+ − d−)²
    TAT  = mean ‖y+ − y−‖ / (d+ + d−)      NAG  = mean (d− − d+) / (d− + d+)

Kernel rule, first match wins (`cfg.selection` holds every threshold): RBF if PNAV > ε1 and TAT < ε2;
polynomial if |NAG| ≈ 0 and |log PND| ≈ 0 (the paper's "PND ≈ 0" read as a balanced ratio,
tolerance `approx_tol`); Mahalanobis if NAG > 0 and PNAV < ε3; spectral if TAT > ε4 and PND < ε5;
otherwise HMK.

Divergence metrics, from the reference model: support overlap (Jaccard of the nucleus-p token
supports along the chosen vs the rejected response, per pair, averaged; the nucleus is taken within
the reference's top-k, so it is truncated at k tokens), drift `mean (d+ − d−)`, Pearson kurtosis
(3 for a normal law) of the reference log-ratio `ℓ_ref(y+) − ℓ_ref(y−)` over pairs, and smoothness
(mean entropic 1-Wasserstein, ott-jax, between consecutive response positions' top-k next-token
distributions, ground cost the cosine distance of the tokens' input-embedding rows).
Divergence rule, first match wins: Bhattacharyya if overlap > ε1; Wasserstein if drift > ε2; Rényi if
kurtosis > ε3; JS if overlap < `overlap_low` and kurtosis < `kurtosis_low`; squared Hellinger if
smoothness < `smoothness_low` and kurtosis < `kurtosis_low`; KL otherwise. The low thresholds are
ours (the paper gives none).
"""

from dpok_jax.selection.auto import collect, resolve_auto, run_selection
from dpok_jax.selection.metrics import (
    kernel_metrics,
    log_ratio_kurtosis,
    smoothness,
    support_overlap,
    transport_w1,
)
from dpok_jax.selection.rules import (
    DIVERGENCE_BRANCHES,
    DIVERGENCE_OTHERWISE,
    KERNEL_BRANCHES,
    KERNEL_OTHERWISE,
    SelectionReport,
    divergence_rule,
    kernel_rule,
    select,
)

__all__ = [
    "DIVERGENCE_BRANCHES",
    "DIVERGENCE_OTHERWISE",
    "KERNEL_BRANCHES",
    "KERNEL_OTHERWISE",
    "SelectionReport",
    "collect",
    "divergence_rule",
    "kernel_metrics",
    "kernel_rule",
    "log_ratio_kurtosis",
    "resolve_auto",
    "run_selection",
    "select",
    "smoothness",
    "support_overlap",
    "transport_w1",
]
