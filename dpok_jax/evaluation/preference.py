"""Held-out preference accuracy and F1 (SPEC §10).

A pair is correct when its margin `h = (r+ − r−) + γ s` is positive. F1 treats "the first response is
the chosen one" as the positive class over every pair presented in both orders: the original order
is a positive example predicted positive iff `h > 0`; the swapped order is a negative example (its
margin is `−h`) predicted positive iff `h < 0`. A tie (`h = 0`) is a false negative and a true negative.
"""

from __future__ import annotations

import numpy as np


def preference_scores(margins: np.ndarray) -> dict[str, float]:
    """Accuracy and F1 of margins `h` [N] (positive = chosen preferred).

    >>> s = preference_scores(np.array([1.0, 2.0, -1.0, 0.0]))
    >>> round(s["accuracy"], 3), round(s["f1"], 3)
    (0.5, 0.571)
    """
    h = np.asarray(margins, dtype=np.float64).reshape(-1)
    if h.size == 0:
        raise ValueError("preference_scores: margins is empty")
    if not np.all(np.isfinite(h)):
        bad = int(np.flatnonzero(~np.isfinite(h))[0])
        raise ValueError(f"preference_scores: margin of pair {bad} is not finite ({h[bad]})")
    tp = float(np.sum(h > 0))  # original order, predicted first-is-chosen
    fn = float(h.size - tp)
    fp = float(np.sum(h < 0))  # swapped order predicted first-is-chosen
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    return {"accuracy": tp / h.size, "f1": f1, "count": float(h.size)}


def scores_by_task(
    margins: np.ndarray, task_ids: np.ndarray, task_names: list[str] | tuple[str, ...]
) -> dict[str, float]:
    """`eval/accuracy`, `eval/f1`, and per task `eval/accuracy/<task>`, `eval/f1/<task>`.

    The overall numbers pool every pair; `eval/accuracy/mean_over_tasks` averages the tasks.

    >>> out = scores_by_task(np.array([1.0, -1.0, 2.0]), np.array([0, 0, 1]), ["a", "b"])
    >>> out["eval/accuracy/a"], out["eval/accuracy/b"], round(out["eval/accuracy"], 3)
    (0.5, 1.0, 0.667)
    """
    margins = np.asarray(margins).reshape(-1)
    task_ids = np.asarray(task_ids).reshape(-1)
    if margins.shape != task_ids.shape:
        raise ValueError(f"scores_by_task: margins {margins.shape} and task_ids {task_ids.shape} differ")
    overall = preference_scores(margins)
    out = {"eval/accuracy": overall["accuracy"], "eval/f1": overall["f1"], "eval/count": overall["count"]}
    per_task = []
    for tid, name in enumerate(task_names):
        sel = task_ids == tid
        if not sel.any():
            continue
        s = preference_scores(margins[sel])
        out[f"eval/accuracy/{name}"] = s["accuracy"]
        out[f"eval/f1/{name}"] = s["f1"]
        per_task.append(s["accuracy"])
    if per_task:
        out["eval/accuracy/mean_over_tasks"] = float(np.mean(per_task))
    return out


def margin_stats(reward_margins: np.ndarray, task_ids: np.ndarray,
                 task_names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Mean and standard deviation of the implicit-reward margin `r+ − r−`, overall and per task
    (`eval/reward_margin`, `eval/reward_margin_std`, `eval/reward_margin/<task>`).

    >>> out = margin_stats(np.array([1.0, 3.0, -1.0]), np.array([0, 0, 1]), ["a", "b"])
    >>> out["eval/reward_margin"], out["eval/reward_margin/a"], out["eval/reward_margin/b"]
    (1.0, 2.0, -1.0)
    """
    m = np.asarray(reward_margins, np.float64).reshape(-1)
    t = np.asarray(task_ids).reshape(-1)
    if m.size == 0 or m.shape != t.shape:
        raise ValueError(f"margin_stats: {m.shape} margins and {t.shape} task ids")
    if not np.all(np.isfinite(m)):
        bad = int(np.flatnonzero(~np.isfinite(m))[0])
        raise ValueError(f"margin_stats: reward margin of pair {bad} is not finite ({m[bad]})")
    out = {"eval/reward_margin": float(m.mean()), "eval/reward_margin_std": float(m.std())}
    for tid, name in enumerate(task_names):
        if (t == tid).any():
            out[f"eval/reward_margin/{name}"] = float(m[t == tid].mean())
    return out
