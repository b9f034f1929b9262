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

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dpok_jax.config import SelectionSection
from dpok_jax.losses import registry

_FLOOR = 1e-12  # distances below this count as zero (identical embeddings)
# The rules' outcomes, in rule order (first match wins), then the fallback; all registry names.
KERNEL_BRANCHES, KERNEL_OTHERWISE = ("rbf", "polynomial", "mahalanobis", "spectral"), "hmk"
DIVERGENCE_BRANCHES = ("bhattacharyya", "wasserstein", "renyi", "js", "squared_hellinger")
DIVERGENCE_OTHERWISE = "kl"
for _name in KERNEL_BRANCHES + (KERNEL_OTHERWISE,):
    assert _name in registry.KERNELS, f"selection rule outcome {_name!r} is not a registered kernel"
for _name in DIVERGENCE_BRANCHES + (DIVERGENCE_OTHERWISE,):
    assert _name in registry.DIVERGENCES, f"selection rule outcome {_name!r} is not a registered divergence"


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


# ------------------------------------------------------------------------------------------------
# the rules


def _cond(rule: str, text: str, value: float, threshold: float, holds: bool) -> dict:
    return {"rule": rule, "condition": text, "value": value, "threshold": threshold,
            "holds": bool(holds) and not math.isnan(value)}


def kernel_rule(m: dict, th: SelectionSection = SelectionSection(), *, n_pairs: int | None = None,
                dim: int | None = None) -> dict:
    """The kernel of SPEC §9 from `kernel_metrics` output; `{"choice", "rule", "conditions", "notes"}`.

    With fewer pairs than embedding dimensions the Mahalanobis branch is skipped (its covariance
    would be mostly shrinkage) and the next matching branch is taken; the notes say so.

    >>> kernel_rule({"PND": 0.0, "PNAV": 0.8, "TAT": 0.2, "NAG": 0.2})["choice"]
    'rbf'
    """
    tol = th.approx_tol
    log_pnd = math.log(m["PND"]) if m["PND"] > 0 else -math.inf
    c = [
        _cond("rbf", "PNAV > eps1", m["PNAV"], th.kernel_eps1, m["PNAV"] > th.kernel_eps1),
        _cond("rbf", "TAT < eps2", m["TAT"], th.kernel_eps2, m["TAT"] < th.kernel_eps2),
        _cond("polynomial", "|NAG| < tol", m["NAG"], tol, abs(m["NAG"]) < tol),
        _cond("polynomial", "|log PND| < tol", log_pnd, tol, abs(log_pnd) < tol),
        _cond("mahalanobis", "NAG > 0", m["NAG"], 0.0, m["NAG"] > 0),
        _cond("mahalanobis", "PNAV < eps3", m["PNAV"], th.kernel_eps3, m["PNAV"] < th.kernel_eps3),
        _cond("spectral", "TAT > eps4", m["TAT"], th.kernel_eps4, m["TAT"] > th.kernel_eps4),
        _cond("spectral", "PND < eps5", m["PND"], th.kernel_eps5, m["PND"] < th.kernel_eps5),
    ]
    notes = []
    for name in KERNEL_BRANCHES:
        conds = [x for x in c if x["rule"] == name]
        if not all(x["holds"] for x in conds):
            continue
        if name == "mahalanobis" and n_pairs is not None and dim is not None and n_pairs < dim:
            notes.append(f"mahalanobis matched but there are fewer pairs ({n_pairs}) than embedding "
                         f"dimensions ({dim}) for its covariance: skipped, falling back to the next rule")
            continue
        rule = " and ".join(x["condition"] for x in conds)
        if notes:
            notes[-1] += f" (fallback: {name})"
        return {"choice": name, "rule": rule, "conditions": c, "notes": notes}
    if notes:
        notes[-1] += f" (fallback: {KERNEL_OTHERWISE})"
    return {"choice": KERNEL_OTHERWISE, "rule": "otherwise", "conditions": c, "notes": notes}


def divergence_rule(m: dict, th: SelectionSection = SelectionSection(), *,
                    exclude: tuple[str, ...] = ()) -> dict:
    """The divergence of SPEC §9 from `overlap, drift, kurtosis, smoothness`; branches named in
    `exclude` are skipped (with a note). A NaN metric (too little data) fails its conditions.

    >>> divergence_rule({"overlap": 0.7, "drift": 0.0, "kurtosis": 3.0, "smoothness": 0.5})["choice"]
    'bhattacharyya'
    """
    o, k, s = m["overlap"], m["kurtosis"], m["smoothness"]
    c = [
        _cond("bhattacharyya", "overlap > eps1", o, th.div_eps1, o > th.div_eps1),
        _cond("wasserstein", "drift > eps2", m["drift"], th.div_eps2, m["drift"] > th.div_eps2),
        _cond("renyi", "kurtosis > eps3", k, th.div_eps3, k > th.div_eps3),
        _cond("js", "overlap < overlap_low", o, th.overlap_low, o < th.overlap_low),
        _cond("js", "kurtosis < kurtosis_low", k, th.kurtosis_low, k < th.kurtosis_low),
        _cond("squared_hellinger", "smoothness < smoothness_low", s, th.smoothness_low,
              s < th.smoothness_low),
        _cond("squared_hellinger", "kurtosis < kurtosis_low", k, th.kurtosis_low, k < th.kurtosis_low),
    ]
    notes = [f"{name} is missing its statistic (NaN: too few pairs or positions); its branch "
             "cannot fire" for name, v in (("kurtosis", k), ("overlap", o), ("smoothness", s))
             if math.isnan(v)]
    for name in DIVERGENCE_BRANCHES:
        conds = [x for x in c if x["rule"] == name]
        if all(x["holds"] for x in conds):
            if name in exclude:
                notes.append(f"{name} matched but is not usable here: skipped, falling back to the "
                             "next rule")
                continue
            return {"choice": name, "rule": " and ".join(x["condition"] for x in conds),
                    "conditions": c, "notes": notes}
    return {"choice": DIVERGENCE_OTHERWISE, "rule": "otherwise", "conditions": c, "notes": notes}


# ------------------------------------------------------------------------------------------------
# the report


@dataclasses.dataclass
class SelectionReport:
    """Every metric, threshold and condition, the choices and the rules that fired."""

    n_pairs: int
    dim: int
    metrics: dict
    kernel: dict
    divergence: dict | None
    notes: list
    per_task: dict

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def table(self) -> str:
        lines = [f"Data-driven selection (SPEC §9) over {self.n_pairs} pairs, embedding width {self.dim}",
                 "", f"{'metric':<12}{'value':>12}"]
        lines += [f"{k:<12}{_fmt(v):>12}" for k, v in self.metrics.items()]
        for what in (self.kernel, self.divergence):
            if what is None:
                continue
            lines += ["", f"{'rule':<19}{'condition':<30}{'value':>10}{'threshold':>11}  verdict"]
            lines += [f"{c['rule']:<19}{c['condition']:<30}{_fmt(c['value']):>10}"
                      f"{_fmt(c['threshold']):>11}  {'holds' if c['holds'] else 'fails'}"
                      for c in what["conditions"]]
        lines.append("")
        lines.append(f"kernel:     {self.kernel['choice']}  (rule: {self.kernel['rule']})")
        if self.divergence is not None:
            lines.append(f"divergence: {self.divergence['choice']}  (rule: {self.divergence['rule']})")
        for task, r in self.per_task.items():
            lines.append(f"  task {task:<22} kernel {r['kernel']['choice']:<12} ({r['kernel']['rule']}; "
                         f"{r['n_pairs']} pairs)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


def select(e_x, e_pos, e_neg, *, thresholds: SelectionSection = SelectionSection(),
           divergence_metrics: dict | None = None, task_ids=None, task_names=None,
           exclude_divergences: tuple[str, ...] = ()) -> SelectionReport:
    """Both rules on [N, d] embeddings (and `overlap, kurtosis, smoothness` when given).

    With a task column, the kernel rule is also applied per task; a single task (or a task with
    fewer than 2 pairs) is reported and the overall choice stands for it.
    """
    e_x = np.asarray(e_x)
    n, dim = e_x.shape if e_x.ndim == 2 else (0, 0)
    if n < 2:
        raise ValueError(f"selection needs at least 2 pairs of embeddings; got {n} (shape {e_x.shape})")
    km = kernel_metrics(e_x, e_pos, e_neg)
    notes = []
    if km["n_degenerate"]:
        notes.append(f"{km['n_degenerate']} pairs have a response embedding equal to its prompt's; "
                     "left out of the PND/TAT/NAG ratios")
    kernel = kernel_rule(km, thresholds, n_pairs=n, dim=dim)
    notes += kernel["notes"]
    metrics = {k: km[k] for k in ("PND", "PNAV", "TAT", "NAG", "drift")}
    divergence = None
    if divergence_metrics is not None:
        metrics.update({k: float(divergence_metrics[k]) for k in ("overlap", "kurtosis", "smoothness")})
        divergence = divergence_rule(metrics, thresholds, exclude=exclude_divergences)
        notes += divergence["notes"]
    per_task: dict = {}
    if task_ids is not None:
        task_ids = np.asarray(task_ids)
        present = sorted(set(task_ids.tolist()))
        name = (lambda t: task_names[t] if task_names is not None else str(t))  # noqa: E731
        if len(present) < 2:
            notes.append(f"a single task ({name(present[0])}): no per-task selection, the overall "
                         "choice applies")
        else:
            for t in present:
                sel = task_ids == t
                if sel.sum() < 2:
                    notes.append(f"task {name(t)} has {int(sel.sum())} pair: the overall choice applies")
                    continue
                m = kernel_metrics(e_x[sel], np.asarray(e_pos)[sel], np.asarray(e_neg)[sel])
                r = kernel_rule(m, thresholds, n_pairs=int(sel.sum()), dim=dim)
                notes += [f"task {name(t)}: {x}" for x in r["notes"]]
                per_task[name(t)] = {"n_pairs": int(sel.sum()), "metrics": m,
                                     "kernel": {"choice": r["choice"], "rule": r["rule"]}}
    return SelectionReport(n_pairs=n, dim=dim, metrics=metrics, kernel=kernel, divergence=divergence,
                           notes=notes, per_task=per_task)


# ------------------------------------------------------------------------------------------------
# with a model: `dpok select` and `kernel: auto` / `divergence: auto`


def collect(p, *, max_pairs: int, top_k: int) -> dict:
    """One reference pass over up to `max_pairs` training pairs of a prepared run (`train.run.prepare`):
    embeddings (the reference's pooled hidden states, or the dataset's columns with
    `loss.embeddings: dataset`), sequence log-probs, top-k next-token log-probs along both responses."""
    import jax
    import jax.numpy as jnp

    from dpok_jax import data as data_lib
    from dpok_jax import losses
    from dpok_jax.train.loop import host_rows, to_global
    from dpok_jax.train.step import pooled_embeddings

    cfg, fns = p.cfg, p.fns
    vocab_k = int(top_k)

    @jax.jit
    def ref_pass(params, batch):
        ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        resp = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]])
        hidden, unembed = fns.hidden(params, ids, attn)
        tok = losses.chunked_token_logps(hidden[:, :-1], unembed, ids[:, 1:], chunk_size=cfg.loss.chunk_size)
        mask = resp[:, 1:].astype(jnp.float32)
        seq = jnp.sum(tok * mask, -1)
        if cfg.loss.logp_reduction == "mean":
            seq = seq / jnp.maximum(jnp.sum(mask, -1), 1.0)
        idx, lp = losses.topk_reference(hidden[:, :-1], unembed, k=min(vocab_k, unembed.shape[-1]),
                                        chunk_size=cfg.loss.chunk_size)
        return dict(emb=pooled_embeddings(hidden, attn, resp), seq=seq, idx=idx, lp=lp, mask=mask)

    batcher = data_lib.PreferenceBatcher(
        p.train_pairs, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed,
        buckets=cfg.data.buckets, process_index=jax.process_index(), process_count=jax.process_count())
    cols: dict[str, list] = {}
    count = 0
    for batch in batcher.iterate_once():
        inputs = {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}
        out = ref_pass(p.init_params, to_global(inputs, p.batch_sharding))
        out = jax.tree.map(lambda x: np.asarray(_gather(x)), out)
        rows = host_rows({k: batch[k] for k in batch if k in ("valid", "task_id") or
                          k.startswith("embedding_")}, p.batch_sharding)
        valid = rows["valid"].astype(bool)
        b = len(valid)
        e_x, e_pos, e_neg = out["emb"]
        if cfg.loss.embeddings == "dataset":
            if "embedding_prompt" not in rows:
                raise ValueError("loss.embeddings=dataset needs embedding_prompt, embedding_chosen and "
                                 "embedding_rejected columns in the data")
            e_x, e_pos, e_neg = (rows[f"embedding_{k}"] for k in ("prompt", "chosen", "rejected"))
        got = dict(e_x=e_x, e_pos=e_pos, e_neg=e_neg, task_id=rows["task_id"],
                   ref_pos=out["seq"][:b], ref_neg=out["seq"][b:], idx_pos=out["idx"][:b],
                   idx_neg=out["idx"][b:], lp_pos=out["lp"][:b], lp_neg=out["lp"][b:],
                   mask_pos=out["mask"][:b], mask_neg=out["mask"][b:])
        for k, v in got.items():
            cols.setdefault(k, []).append(np.asarray(v)[valid])
        count += int(valid.sum())
        if count >= max_pairs:
            break
    width = max(c.shape[1] for c in cols["idx_pos"])  # batches may differ in padded length

    def cat(k):
        arrs = cols[k]
        if k.startswith(("idx_", "lp_", "mask_")):
            arrs = [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrs]
        return np.concatenate(arrs)[:max_pairs]

    out = {k: cat(k) for k in cols}
    out["cost_embeddings"] = np.asarray(_gather(fns.input_embeddings(p.init_params)), np.float32)
    return out


def _gather(x):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return x


def run_selection(p, *, exclude_divergences: tuple[str, ...] = ()) -> SelectionReport:
    """SPEC §9 on a prepared run: its reference model and training pairs, `cfg.selection` thresholds."""
    th = p.cfg.selection
    c = collect(p, max_pairs=th.max_pairs, top_k=th.top_k)
    div = {
        "overlap": support_overlap(c["idx_pos"], c["lp_pos"], c["mask_pos"], c["idx_neg"], c["lp_neg"],
                                   c["mask_neg"], nucleus=th.nucleus),
        "kurtosis": log_ratio_kurtosis(c["ref_pos"], c["ref_neg"]),
        "smoothness": smoothness(c["idx_pos"], c["lp_pos"], c["mask_pos"], c["cost_embeddings"],
                                 max_positions=th.smoothness_positions, epsilon=th.smoothness_epsilon),
    }
    return select(c["e_x"], c["e_pos"], c["e_neg"], thresholds=th, divergence_metrics=div,
                  task_ids=c["task_id"], task_names=p.task_names,
                  exclude_divergences=exclude_divergences)


def resolve_auto(p) -> Any:
    """`p.cfg` with `loss.kernel: auto` / `loss.divergence: auto` replaced by the rules' choices.

    The report goes to `RUN_DIR/selection.json` (the run folder's `config.yaml` keeps `auto`, so a
    resume is checked against what the user asked for); a resumed run reuses the recorded choice
    instead of recomputing it. Configs without `auto` are returned unchanged.
    """
    import jax

    cfg = p.cfg
    if "auto" not in (cfg.loss.kernel, cfg.loss.divergence):
        return cfg
    path = Path(cfg.run_dir) / "selection.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        kernel, divergence = recorded["kernel"]["choice"], (recorded.get("divergence") or {}).get("choice")
        print(f"Selection reused from {path}: kernel {kernel}, divergence {divergence}.", flush=True)
    else:
        exclude = ()
        if cfg.reference.mode == "precomputed" and cfg.loss.alpha > 0:
            exclude = ("wasserstein",)  # needs a live reference (config.validate says why)
        report = run_selection(p, exclude_divergences=exclude)
        kernel, divergence = report.kernel["choice"], report.divergence["choice"]
        if jax.process_index() == 0:
            report.save(path)
            print(report.table(), flush=True)
            print(f"Selection report written to {path}", flush=True)
    changes = {}
    if cfg.loss.kernel == "auto":
        changes["kernel"] = kernel
    if cfg.loss.divergence == "auto":
        changes["divergence"] = divergence
    print(f"auto -> {changes}", flush=True)
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **changes))
