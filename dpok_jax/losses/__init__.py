"""The pure math of DPO-Kernels (SPEC.md §1–8, public API of §11).

Arrays in, arrays out; no model and no config objects; hyperparameters are keyword-only and results
are per example or per position (the caller reduces).
"""

from dpok_jax.losses import paper_forms
from dpok_jax.losses import registry  # noqa: E402,F401 - name -> function tables per family
from dpok_jax.losses._divergences import F_REGISTRY, divergence, topk_divergence, topk_reference
from dpok_jax.losses._kernels import (
    embedding_score,
    fit_kernel_params,
    hmk_entropy,
    hmk_log,
    hmk_weights,
    init_hmk_params,
    init_mixture_params,
    kernel_log,
    mixture_entropy,
    mixture_log,
    mixture_weights,
)
from dpok_jax.losses._logprobs import (
    chunked_logps_and_divergence,
    chunked_token_logps,
    masked_divergence,
    sequence_logps,
    token_logps,
)
from dpok_jax.losses._preference import dpo_kernels_loss, implicit_reward, preference_loss

__all__ = [
    "F_REGISTRY",
    "chunked_logps_and_divergence",
    "chunked_token_logps",
    "divergence",
    "dpo_kernels_loss",
    "embedding_score",
    "fit_kernel_params",
    "hmk_entropy",
    "hmk_log",
    "hmk_weights",
    "implicit_reward",
    "init_hmk_params",
    "init_mixture_params",
    "kernel_log",
    "masked_divergence",
    "mixture_entropy",
    "mixture_log",
    "mixture_weights",
    "paper_forms",
    "preference_loss",
    "sequence_logps",
    "token_logps",
    "topk_divergence",
    "topk_reference",
]
