"""A finished `dpok train`'s `summary.json` and its accuracy table, from the runs' `LoopResult`s."""

from __future__ import annotations

import json

from etils import epath


def run_label(*, gamma: float, kernel: str, alpha: float, divergence: str) -> str:
    """The run's column name: `dpo`, `<kernel>+hybrid`, then `+<divergence>` with a penalty.

    >>> run_label(gamma=0.1, kernel="hmk", alpha=0.05, divergence="kl")
    'hmk+hybrid+kl'
    """
    parts = ["dpo" if gamma == 0 else f"{kernel}+hybrid"]
    if alpha > 0:
        parts.append(divergence)
    return "+".join(parts)


def build_summary(runs: dict, label: str, *, interrupted_by: str | None = None,
                  exit_status: int | None = None) -> dict:
    """The main run's held-out metrics, steps, last logged train window and interrupt state; with a
    `dpo` run, its metrics under `baseline/...`. `runs`: label -> `LoopResult`."""
    main = runs[label]
    interrupted = any(r.interrupted for r in runs.values())
    summary = dict(main.eval_metrics)
    summary["run"] = label
    summary["steps"] = main.final_step
    summary["skipped_steps"] = main.skipped_steps
    summary["interrupted"] = interrupted
    if interrupted:
        summary["interrupted_by"] = interrupted_by
        summary["exit_status"] = exit_status
    summary.update({f"train/{k}": v for k, v in main.last_logged.items()
                    if k in ("loss", "rewards/margins", "rewards/accuracies")})
    if "dpo" in runs:
        summary["baseline/steps"] = runs["dpo"].final_step
        summary.update({f"baseline/{k}": v for k, v in runs["dpo"].eval_metrics.items()})
    return summary


def write_summary(run_dir: epath.PathLike, summary: dict, process_index: int) -> epath.Path:
    """`summary.json` from process 0; `summary.process<i>.json` (its own view, to check that every
    host trained the same model) from the others."""
    name = "summary.json" if process_index == 0 else f"summary.process{process_index}.json"
    path = epath.Path(run_dir) / name
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return path


def format_table(results: dict[str, dict], task_names) -> str:
    """Held-out preference accuracy per task (rows) for each run (columns)."""
    names = list(results)
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["Held-out preference accuracy", f"{'task':<24}" + "".join(f"{n:>{width}}" for n in names)]
    for task in list(task_names) + ["mean_over_tasks"]:
        key = f"eval/accuracy/{task}"
        if not any(key in r for r in results.values()):
            continue
        cells = "".join(f"{r.get(key, float('nan')):>{width}.3f}" for r in results.values())
        lines.append(f"{task:<24}{cells}")
    for key, title in (("eval/accuracy", "all pairs"), ("eval/f1", "F1 (both orders)")):
        cells = "".join(f"{r.get(key, float('nan')):>{width}.3f}" for r in results.values())
        lines.append(f"{title:<24}{cells}")
    return "\n".join(lines)
