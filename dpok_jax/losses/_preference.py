"""Implicit rewards, preference links and the whole DPO-Kernels objective (SPEC §2, §5, §7, §8).

Pure functions of arrays: sequence log-probs, embeddings and per-position divergence values come in,
per-pair values (or, for `dpo_kernels_loss`, the scalar objective and its metrics) go out.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from dpok_jax.losses._kernels import (
    KERNELS,
    _concrete,
    embedding_score,
    hmk_entropy,
    hmk_weights,
    mixture_entropy,
    mixture_weights,
)

REWARDS = ("reverse_kl", "forward_kl", "js", "alpha")
LINKS = ("sigmoid", "hinge", "ipo")


def _check_beta(beta) -> None:
    v = _concrete(beta)
    if v is None:
        return
    if v.shape != () or not np.isfinite(v) or v <= 0:
        raise ValueError(f"beta must be a finite scalar > 0; got {beta!r}")


def _check_nonneg(value, arg: str) -> None:
    v = _concrete(value)
    if v is None:
        return
    if v.shape != () or not np.isfinite(v) or v < 0:
        raise ValueError(f"{arg} must be a finite scalar >= 0; got {value!r}")


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.result_type(x.dtype, jnp.float32))


def _capped_exp(x):
    # TRL's cap_exp: the exponent is clamped at log(max float) (4 decimals, rounded down), so
    # u^(-a) stays finite for any log-ratio; past the cap the value is constant and its gradient 0.
    cap = np.floor(np.log(np.finfo(x.dtype).max) * 1e4) / 1e4
    return jnp.exp(jnp.minimum(x, cap))


def implicit_reward(name: str, policy_logps, ref_logps, *, beta, **params) -> jax.Array:
    """Implicit reward ``r = β (f'(u) − f'(1))`` of an f-divergence-constrained policy.

    ``u = π_θ(y|x) / π_ref(y|x)`` at sequence level, taken in log space, ``x = log u``:

    - ``"reverse_kl"``: ``β x`` (DPO's reward; f'(u) = log u + 1, the constant dropped).
    - ``"forward_kl"``: ``β (1 − 1/u) = β (1 − exp(−x))``.
    - ``"js"``: ``β log(2u / (1 + u)) = β (log 2 + log σ(x))``.
    - ``"alpha"`` (``alpha`` = a, a real number; a = 0 is reverse KL exactly):
      ``β (1 − u^(−a)) / a``.

    Subtracting ``f'(1)`` makes every reward 0 where the policy equals the reference; the
    chosen − rejected margin, the only thing the loss sees, is unchanged and equals TRL DPOTrainer's
    ``f_divergence_type`` logits times β (``reverse_kl``, ``forward_kl``, ``js_divergence``;
    ``alpha_divergence`` with TRL's older ``alpha_divergence_coef = a``, or equivalently newer TRL's
    ``f_alpha_divergence_coef = 1 − a``, whose f'(u) = (u^(α−1) − 1)/(α−1)). Exponentials are capped
    like TRL's ``cap_exp``; the alpha reward also folds β/a into its exponent and caps it so that
    rewards, their differences and gradients are finite for any finite log-ratio and any β > 0
    (``_alpha_reward``).

    Args:
      name: ``"reverse_kl"``, ``"forward_kl"``, ``"js"`` or ``"alpha"``.
      policy_logps: [B] sequence log-probs under the policy.
      ref_logps: [B] sequence log-probs under the reference.
      beta: inverse temperature, > 0.
      **params: ``alpha`` for ``"alpha"`` (default 0.5); nothing for the others.

    Returns:
      [B] rewards.

    Example:
      >>> import jax.numpy as jnp
      >>> pol, ref = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -4.0])
      >>> [round(float(v), 4) for v in implicit_reward("reverse_kl", pol, ref, beta=0.1)]
      [0.1, -0.1]
      >>> [round(float(v), 4) for v in implicit_reward("js", pol, ref, beta=0.1)]
      [0.038, -0.062]

    Reference: Wang et al. 2023, *Beyond Reverse KL* (f-DPO), Table 1; Das et al. 2025, Sec. 4;
    SPEC §7.
    """
    policy_logps, ref_logps = _float(policy_logps), _float(ref_logps)
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"policy_logps and ref_logps must have the same shape; got "
                         f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}")
    _check_beta(beta)
    allowed = ("alpha",) if name == "alpha" else ()
    extra = sorted(set(params) - set(allowed))
    if name in REWARDS and extra:
        raise ValueError(f"implicit_reward {name!r} got unknown parameter(s) {extra}")
    dtype = jnp.result_type(policy_logps.dtype, ref_logps.dtype)
    x = policy_logps.astype(dtype) - ref_logps.astype(dtype)
    beta = jnp.asarray(beta, dtype)
    if name == "reverse_kl":
        f = x
    elif name == "forward_kl":
        f = 1.0 - _capped_exp(-x)
    elif name == "js":
        f = jnp.log(2.0).astype(dtype) + jax.nn.log_sigmoid(x)
    elif name == "alpha":
        a = params.get("alpha", 0.5)
        if not isinstance(a, numbers.Real) or isinstance(a, bool) or not np.isfinite(a):
            raise ValueError(f"alpha must be a finite Python real number; got {a!r}")
        # a = 0 is the limit (1 − u^(−a))/a → log u: reverse KL, exactly.
        if a == 0:
            f = x
        else:
            return _alpha_reward(x, float(a), beta)
    else:
        raise ValueError(f"unknown implicit reward name {name!r}; expected one of {list(REWARDS)}")
    return beta * f


def _alpha_reward(x, a: float, beta):
    """``β (1 − e^(−a x)) / a``, finite with a finite gradient for every finite log-ratio ``x``.

    With ``y = −a x``: for ``y <= 1`` it is ``−(β/a) expm1(y)`` (bounded, and exact near ``x = 0``
    where ``1 − e^y`` cancels). For ``y > 1`` it is ``β/a − sign(a) · exp(E)`` with
    ``E = y + log(β/|a|)``: β and 1/a are folded into the exponent instead of multiplying an
    exponential that may already be near the dtype's largest number (``(1 − e^88.7)/0.5`` is −inf in
    float32, and a chosen − rejected difference of two such rewards NaN). ``E`` is capped at
    ``log(max/4) − max(0, log|a|)`` so that each reward, its gradient ``β e^y = |a| e^E`` and the
    chosen − rejected difference stay finite; ``y`` is also capped at TRL's ``cap_exp`` bound
    (``log(max)``, 4 decimals), so values equal TRL's wherever TRL's are finite. Past the cap the reward
    is constant (gradient 0), like TRL's.
    """
    dtype = x.dtype
    log_max = float(np.log(np.finfo(dtype).max))
    trl_cap = np.floor(log_max * 1e4) / 1e4
    beta = jnp.asarray(beta, dtype)
    y = -a * x
    small = y <= 1.0
    near = -(beta / a) * jnp.expm1(jnp.where(small, y, 0.0))
    log_scale = jnp.log(beta) - np.log(abs(a))  # log(β/|a|)
    e_cap = log_max - np.log(4.0) - max(0.0, float(np.log(abs(a))))
    exponent = jnp.minimum(jnp.minimum(jnp.where(small, 1.0, y), trl_cap) + log_scale, e_cap)
    far = beta / a - np.sign(a) * jnp.exp(exponent)
    return jnp.where(small, near, far)


def preference_loss(link: str, margin, **params) -> jax.Array:
    """Per-pair preference loss of the (hybrid) margin ``h``.

    - ``"sigmoid"`` (``label_smoothing`` ε in [0, 0.5], default 0; conservative DPO):
      ``−(1 − ε) log σ(h) − ε log σ(−h)`` via ``jax.nn.log_sigmoid``.
    - ``"hinge"``: ``max(0, 1 − h)``.
    - ``"ipo"`` (``beta`` > 0): ``(h/β − 1/(2β))²``; with ``h = β z`` this is TRL's
      ``(z − 1/(2β))²``, meant for length-normalized log-probs (``logp_reduction="mean"``).

    Args:
      link: ``"sigmoid"``, ``"hinge"`` or ``"ipo"``.
      margin: [B] margins ``h``.
      **params: ``label_smoothing`` (sigmoid) or ``beta`` (ipo).

    Returns:
      [B] losses.

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([0.0, 2.0])
      >>> [round(float(v), 4) for v in preference_loss("sigmoid", h)]
      [0.6931, 0.1269]
      >>> [round(float(v), 4) for v in preference_loss("ipo", h, beta=0.5)]
      [1.0, 9.0]

    Reference: Rafailov et al. 2023 (DPO); Mitchell 2023 (conservative DPO); Azar et al. 2023
    (IPO); Das et al. 2025, Sec. 3; SPEC §5.
    """
    margin = _float(margin)
    allowed = {"sigmoid": ("label_smoothing",), "hinge": (), "ipo": ("beta",)}
    if link not in allowed:
        raise ValueError(f"unknown link {link!r}; expected one of {list(LINKS)}")
    extra = sorted(set(params) - set(allowed[link]))
    if extra:
        raise ValueError(f"link {link!r} got unknown parameter(s) {extra}; "
                         f"allowed: {list(allowed[link])}")
    if link == "sigmoid":
        eps = params.get("label_smoothing", 0.0)
        v = _concrete(eps)
        if v is not None and (v.shape != () or not 0.0 <= float(v) <= 0.5):
            raise ValueError(f"label_smoothing must be a scalar in [0, 0.5]; got {eps!r}")
        eps = jnp.asarray(eps, margin.dtype)
        return -(1.0 - eps) * jax.nn.log_sigmoid(margin) - eps * jax.nn.log_sigmoid(-margin)
    if link == "hinge":
        return jax.nn.relu(1.0 - margin)
    if "beta" not in params:
        raise ValueError("link 'ipo' needs beta")
    _check_beta(params["beta"])
    beta = jnp.asarray(params["beta"], margin.dtype)
    return jnp.square(margin / beta - 1.0 / (2.0 * beta))


def _mean(x):
    return jnp.mean(x)


def dpo_kernels_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    link: str = "sigmoid",
    label_smoothing: float = 0.0,
    reward: str = "reverse_kl",
    reward_params: dict | None = None,
    gamma: float = 0.0,
    kernel: str | None = None,
    embeddings: tuple | None = None,
    kernel_params: dict | None = None,
    hmk_params: dict | None = None,
    mixture_params: dict | None = None,
    eta: float = 0.0,
    divergence=None,
    divergence_mask=None,
    alpha: float = 0.0,
    divergence_name: str = "kl",
    sft_weight: float = 0.0,
    chosen_nll=None,
) -> tuple[jax.Array, dict]:
    """The DPO-Kernels objective: hybrid-margin preference loss + divergence − entropy (+ SFT).

    ``r± = implicit_reward(reward, π_θ(y±), π_ref(y±))``, ``z = r+ − r−``,
    ``s = embedding_score(kernel, e_x, e_{y+}, e_{y−})`` (only when ``gamma > 0``), ``h = z + γ s``::

        L = mean_B(link(h)) + α · Σ_t m_t D_t / max(Σ_t m_t, 1) − η · H(weights) + sft_weight · mean(nll)

    ``H`` is ``hmk_entropy`` (``kernel="hmk"``) or ``mixture_entropy`` (``kernel="mixture"``).
    With ``gamma = 0``, ``alpha = 0``, ``eta = 0``, the sigmoid link and ``reward="reverse_kl"``
    this is exactly DPO: ``−log σ(β((π_c − r_c) − (π_r − r_r))))``.

    Args:
      policy_chosen_logps: [B] policy sequence log-probs of the chosen responses.
      policy_rejected_logps: [B] policy sequence log-probs of the rejected responses.
      ref_chosen_logps: [B] reference sequence log-probs of the chosen responses.
      ref_rejected_logps: [B] reference sequence log-probs of the rejected responses.
      beta: > 0, inverse temperature (also IPO's β).
      link: ``"sigmoid"``, ``"hinge"`` or ``"ipo"`` (``preference_loss``).
      label_smoothing: conservative-DPO ε, sigmoid link only.
      reward: implicit reward name (``implicit_reward``).
      reward_params: extra keywords for the reward, e.g. ``{"alpha": 0.5}``.
      gamma: >= 0, weight of the embedding score.
      kernel: ``"polynomial"``, ``"rbf"``, ``"mahalanobis"``, ``"spectral"``, ``"hmk"`` or
        ``"mixture"``; required when ``gamma > 0``.
      embeddings: ``(e_x, e_pos, e_neg)``, each [B, d]; required when ``gamma > 0``.
      kernel_params: the whole ``kernel_params`` dict (``fit_kernel_params``).
      hmk_params: HMK logits (trainable) when ``kernel="hmk"``.
      mixture_params: flat-mixture logits (trainable) when ``kernel="mixture"``.
      eta: >= 0, entropy-bonus weight (HMK / mixture only).
      divergence: per-position divergence values, [N] or [2B, T] (any shape).
      divergence_mask: same shape as ``divergence``, 1 on response tokens; all ones if None.
      alpha: >= 0, divergence weight; needs ``divergence`` when > 0.
      divergence_name: the name used in the ``divergence/<name>`` metric.
      sft_weight: >= 0, weight of the chosen-response NLL term.
      chosen_nll: [B] per-example NLL of the chosen responses; required when ``sft_weight > 0``.

    Returns:
      ``(loss, metrics)``: the scalar objective and a dict of scalars: ``rewards/chosen``,
      ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (TRL's: ``β`` times the
      log-ratio, whatever ``reward``), ``logps/chosen``, ``logps/rejected``, ``loss/preference``,
      ``rewards/implicit_margins`` (mean z); with ``gamma > 0``: ``embedding/score`` (mean s),
      ``hybrid/margins`` (mean h), ``hybrid/accuracies`` (fraction with h > 0); for HMK
      ``hmk/lambda_rbf|lambda_poly|lambda_spec|lambda_maha|tau_local|tau_global`` and
      ``hmk/entropy``; for the mixture ``mixture/lambda_rbf|poly|spec|maha`` and
      ``mixture/entropy``; with ``divergence``: ``divergence/<divergence_name>`` (masked mean);
      with ``sft_weight > 0``: ``loss/sft``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss, m = dpo_kernels_loss(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]),
      ...                            jnp.array([-4.0]), beta=0.5)
      >>> round(float(loss), 4), float(m["rewards/margins"]), float(m["rewards/accuracies"])
      (0.3133, 1.0, 1.0)

    Reference: Das et al. 2025, Sec. 3 (hybrid loss), 4 (divergences), 6.1 (HMK); SPEC §8.
    """
    logps = [_float(v) for v in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps)]
    shapes = {tuple(v.shape) for v in logps}
    if len(shapes) != 1 or logps[0].ndim != 1:
        raise ValueError(f"the four log-prob arrays must share one shape [B]; got "
                         f"{[tuple(v.shape) for v in logps]}")
    pc, pr, rc, rr = logps
    bsz = pc.shape[0]
    _check_beta(beta)
    for value, arg in ((gamma, "gamma"), (eta, "eta"), (alpha, "alpha"),
                       (sft_weight, "sft_weight")):
        _check_nonneg(value, arg)
    if link != "sigmoid" and _concrete(label_smoothing) is not None and label_smoothing != 0:
        raise ValueError(f"label_smoothing applies to the sigmoid link only; got link={link!r}")
    reward_params = dict(reward_params or {})

    r_pos = implicit_reward(reward, pc, rc, beta=beta, **reward_params)
    r_neg = implicit_reward(reward, pr, rr, beta=beta, **reward_params)
    z = r_pos - r_neg
    dtype = z.dtype
    metrics = {}
    h = z
    uses_kernel = _concrete(gamma) is None or float(gamma) > 0
    if uses_kernel:
        if kernel is None:
            raise ValueError("gamma > 0 needs a kernel (e.g. kernel='hmk')")
        if embeddings is None or len(embeddings) != 3:
            raise ValueError("gamma > 0 needs embeddings=(e_x, e_pos, e_neg), each [B, d]")
        e_x = jnp.asarray(embeddings[0])
        if e_x.ndim != 2 or e_x.shape[0] != bsz:
            raise ValueError(f"embeddings must be [B={bsz}, d]; got e_x{tuple(e_x.shape)}")
        s = embedding_score(kernel, *embeddings, kernel_params=kernel_params,
                            hmk_params=hmk_params, mixture_params=mixture_params).astype(dtype)
        h = z + jnp.asarray(gamma, dtype) * s
        metrics["embedding/score"] = _mean(s)
        metrics["hybrid/margins"] = _mean(h)
        metrics["hybrid/accuracies"] = _mean((h > 0).astype(dtype))
    elif kernel is not None and kernel not in KERNELS + ("hmk", "mixture"):
        raise ValueError(f"unknown kernel {kernel!r}")

    pref_params = {"label_smoothing": label_smoothing} if link == "sigmoid" else {}
    if link == "ipo":
        pref_params = {"beta": beta}
    pref = preference_loss(link, h, **pref_params)
    loss = _mean(pref)

    uses_entropy = _concrete(eta) is None or float(eta) > 0
    if kernel in ("hmk", "mixture") and (uses_kernel or uses_entropy):
        params = hmk_params if kernel == "hmk" else mixture_params
        if params is None:
            raise ValueError(f"kernel={kernel!r} needs {kernel}_params")
        entropy = (hmk_entropy if kernel == "hmk" else mixture_entropy)(params).astype(dtype)
        weights = (hmk_weights if kernel == "hmk" else mixture_weights)(params)
        metrics.update({f"{kernel}/{k}": v.astype(dtype) for k, v in weights.items()})
        metrics[f"{kernel}/entropy"] = entropy
        loss = loss - jnp.asarray(eta, dtype) * entropy
    elif uses_entropy:
        raise ValueError(f"eta > 0 needs kernel='hmk' or 'mixture'; got kernel={kernel!r}")

    if divergence is not None:
        div = _float(divergence).astype(dtype)
        if divergence_mask is None:
            mask = jnp.ones_like(div)
        else:
            mask = jnp.asarray(divergence_mask).astype(dtype)
            if mask.shape != div.shape:
                raise ValueError(f"divergence_mask must match divergence's shape {tuple(div.shape)};"
                                 f" got {tuple(mask.shape)}")
        # where() keeps a non-finite value at a masked-out (padding) position out of the sum.
        div_mean = jnp.sum(jnp.where(mask > 0, div * mask, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)
        metrics[f"divergence/{divergence_name}"] = div_mean
        loss = loss + jnp.asarray(alpha, dtype) * div_mean
    elif _concrete(alpha) is None or float(alpha) > 0:
        raise ValueError("alpha > 0 needs divergence (per-position values)")

    if _concrete(sft_weight) is None or float(sft_weight) > 0:
        if chosen_nll is None:
            raise ValueError("sft_weight > 0 needs chosen_nll [B]")
        nll = _float(chosen_nll).astype(dtype)
        if nll.shape != (bsz,):
            raise ValueError(f"chosen_nll must have shape ({bsz},); got {tuple(nll.shape)}")
        metrics["loss/sft"] = _mean(nll)
        loss = loss + jnp.asarray(sft_weight, dtype) * metrics["loss/sft"]

    beta_ = jnp.asarray(beta, dtype)
    chosen_rewards = beta_ * (pc - rc)
    rejected_rewards = beta_ * (pr - rr)
    metrics.update({
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).astype(dtype)),
        "rewards/implicit_margins": _mean(z),
        "logps/chosen": _mean(pc),
        "logps/rejected": _mean(pr),
        "loss/preference": _mean(pref),
    })
    return loss, jax.lax.stop_gradient(metrics)
