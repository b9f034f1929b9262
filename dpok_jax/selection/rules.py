"""SPEC §9 rules (first match wins) and the selection report. See `dpok_jax.selection`."""

from __future__ import annotations

import dataclasses
import json
import math
import numpy as np
from etils import epath

from dpok_jax.config import SelectionSection
from dpok_jax.losses import registry
from dpok_jax.selection.metrics import kernel_metrics

# The rules' outcomes, in rule order (first match wins), then the fallback; all registry names.
KERNEL_BRANCHES, KERNEL_OTHERWISE = ("rbf", "polynomial", "mahalanobis", "spectral"), "hmk"
DIVERGENCE_BRANCHES = ("bhattacharyya", "wasserstein", "renyi", "js", "squared_hellinger")
DIVERGENCE_OTHERWISE = "kl"
for _name in KERNEL_BRANCHES + (KERNEL_OTHERWISE,):
    assert _name in registry.KERNELS, f"selection rule outcome {_name!r} is not a registered kernel"
for _name in DIVERGENCE_BRANCHES + (DIVERGENCE_OTHERWISE,):
    assert _name in registry.DIVERGENCES, f"selection rule outcome {_name!r} is not a registered divergence"



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

    def save(self, path: epath.PathLike) -> epath.Path:
        path = epath.Path(path)  # a local path or a run folder's gs://... URL
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


