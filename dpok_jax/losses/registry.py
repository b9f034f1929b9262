"""One registry per family: name → function for the kernels, divergences, links and rewards.

Everything that lists these names reads them from here: the sweep's grid, the selection rules'
outcomes (checked at import), the docs' tables (`markdown_tables`, kept in sync by a test), and the
config's allowed values (`dpok_jax.config` keeps plain tuples so that loading a config never
imports JAX; a test asserts they equal these keys, in this order).

Each entry is a `Variant`: the function with its name bound (``fn(*arrays, **hyperparameters)``),
and `params`, the one place that says which `loss.*` config field feeds which keyword, so a trainer
builds the keyword arguments with `keyword_params(family, name, loss_section)` instead of its own
chain of `if name == ...` (Levanter-style registered variants). A variant's own hyperparameters sit
in the config's nested section named after it (`loss.wasserstein.epsilon`, `loss.renyi.order`);
shared ones (`beta`, `label_smoothing`) are plain `loss.*` fields.

    >>> import jax.numpy as jnp
    >>> float(DIVERGENCES["kl"].fn(jnp.zeros(3), jnp.zeros(3)))
    0.0
    >>> list(KERNELS)
    ['polynomial', 'rbf', 'spectral', 'mahalanobis', 'mixture', 'hmk']
"""

from __future__ import annotations

import dataclasses
import functools
from types import MappingProxyType
from typing import Any, Callable, Mapping

from dpok_jax.losses._divergences import F_REGISTRY, divergence
from dpok_jax.losses._kernels import hmk_log, kernel_log, mixture_log
from dpok_jax.losses._preference import implicit_reward, preference_loss


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named variant: its function, its hyperparameters (keyword → dotted path under `loss`, e.g.
    ``"wasserstein.epsilon"``) and a line of doc."""

    name: str
    fn: Callable[..., Any]
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    doc: str = ""


def _table(*variants: Variant) -> Mapping[str, Variant]:
    return MappingProxyType({v.name: v for v in variants})


KERNELS = _table(
    Variant("polynomial", functools.partial(kernel_log, "polynomial"), {}, "(⟨a,b⟩ + c)^d"),
    Variant("rbf", functools.partial(kernel_log, "rbf"), {}, "exp(−‖a−b‖² / 2σ²), σ by the median heuristic"),
    Variant("spectral", functools.partial(kernel_log, "spectral"), {},
            "spectral mixture along the embeddings' principal directions"),
    Variant("mahalanobis", functools.partial(kernel_log, "mahalanobis"), {},
            "exp(−½ τᵀΣ⁻¹τ), Σ Ledoit–Wolf"),
    Variant("mixture", mixture_log, {}, "flat softmax mixture of the four (Sec. 6 baseline)"),
    Variant("hmk", hmk_log, {}, "hierarchical mixture: τ_L(rbf, poly) + τ_G(spectral, mahalanobis)"),
)

DIVERGENCES = _table(
    Variant("kl", functools.partial(divergence, "kl"), {}, "Σ p (log p − log q)"),
    Variant("js", functools.partial(divergence, "js"), {}, "½ KL(p‖m) + ½ KL(q‖m)"),
    Variant("squared_hellinger", functools.partial(divergence, "squared_hellinger"), {}, "1 − Σ √(pq)"),
    Variant("renyi", functools.partial(divergence, "renyi"), {"order": "renyi.order"},
            "1/(a−1) log Σ p^a q^(1−a)"),
    Variant("bhattacharyya", functools.partial(divergence, "bhattacharyya"), {}, "−log Σ √(pq)"),
    Variant("wasserstein", functools.partial(divergence, "wasserstein"),
            {"epsilon": "wasserstein.epsilon", "top_k": "wasserstein.top_k"},
            "entropic OT on top-k supports (ott-jax Sinkhorn)"),
    Variant("f", functools.partial(divergence, "f"), {"f": "f.name"},
            f"Σ q f(p/q), f from {{{', '.join(F_REGISTRY)}}}"),
)

LINKS = _table(
    Variant("sigmoid", functools.partial(preference_loss, "sigmoid"), {"label_smoothing": "label_smoothing"},
            "−log σ(h) (DPO; conservative with label smoothing)"),
    Variant("hinge", functools.partial(preference_loss, "hinge"), {}, "max(0, 1 − h)"),
    Variant("ipo", functools.partial(preference_loss, "ipo"), {"beta": "beta"}, "(h/β − 1/(2β))²"),
)

REWARDS = _table(
    Variant("reverse_kl", functools.partial(implicit_reward, "reverse_kl"), {}, "β log u (DPO)"),
    Variant("forward_kl", functools.partial(implicit_reward, "forward_kl"), {}, "β (1 − 1/u)"),
    Variant("js", functools.partial(implicit_reward, "js"), {}, "β log(2u / (1 + u))"),
    Variant("alpha", functools.partial(implicit_reward, "alpha"), {"alpha": "alpha_reward.alpha"},
            "β (1 − u^(−a)) / a"),
)

FAMILIES = MappingProxyType({"kernel": KERNELS, "divergence": DIVERGENCES, "link": LINKS, "reward": REWARDS})


def keyword_params(family: str, name: str, loss_section: Any) -> tuple[tuple[str, Any], ...]:
    """`((keyword, value), ...)` of one variant's hyperparameters, read from a `loss` config section.

    >>> from dpok_jax.config import LossSection, WassersteinParams
    >>> keyword_params("divergence", "wasserstein", LossSection(wasserstein=WassersteinParams(0.2, 4)))
    (('epsilon', 0.2), ('top_k', 4))
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {list(FAMILIES)}")
    table = FAMILIES[family]
    if name not in table:
        raise ValueError(f"unknown {family} {name!r}; expected one of {list(table)}")
    return tuple((kw, functools.reduce(getattr, path.split("."), loss_section))
                 for kw, path in table[name].params.items())


def markdown_tables() -> str:
    """The four registries as Markdown tables (docs/analysis.md embeds this text; a test compares)."""
    out = []
    for family, table in FAMILIES.items():
        out += [f"| {family} | hyperparameters (`loss.*`) | what |", "|---|---|---|"]
        for v in table.values():
            params = ", ".join(f"`{kw}` ← `{field}`" for kw, field in v.params.items()) or "-"
            out.append(f"| `{v.name}` | {params} | {v.doc} |")
        out.append("")
    return "\n".join(out).rstrip("\n")
