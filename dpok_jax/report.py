"""`dpok report RUN_DIR`: PNG plots of a run and a Markdown summary linking them (SPEC §10).

- `kernel_weights.png`: HMK `λ` and `τ` (or the flat mixture's `λ`) over steps (paper Fig. 5/7);
- `divergences.png`: the logged `divergence/*` values over steps (Fig. 2);
- `margins_accuracy.png`: reward margin and preference accuracy over steps, training batches and
  held-out evaluations (the DPO baseline beside them when the run has one);
- `paper_forms.png`: the Table-1 scalar forms and their ascent directions (Fig. 1; why they are not
  trainable objectives, SPEC §5);
- `report.md`: the final numbers (summary.json, eval.json, selection.json when present) and links.

Plots are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state, no display).
A plot whose data the run does not have (no kernel, no divergence penalty) is skipped and the
summary says why.
"""

from __future__ import annotations

import json
import math
import numpy as np
from etils import epath


def read_metrics(run_dir: epath.PathLike) -> list[dict]:
    """Rows of `RUN_DIR/metrics.jsonl`; non-finite values (logged as strings) become NaN."""
    path = epath.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a dpok run folder?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n}: not JSON ({err.msg})") from None
        rows.append({k: (float(v) if isinstance(v, str) and k not in ("split",) else v)
                     for k, v in row.items()})
    return rows


def series(rows: list[dict], key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(steps, values)` of one metric in one split (rows lacking it are skipped)."""
    pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s, float), np.asarray(v, float)


def _keys(rows: list[dict], prefix: str, split: str = "train") -> list[str]:
    return sorted({k for r in rows if r.get("split") == split for k in r if k.startswith(prefix)})


def _figure(ncols: int = 1, width: float = 6.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.0), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_kernel_weights(rows: list[dict], path: epath.PathLike) -> str | None:
    """λ (and τ) of HMK or the flat mixture over steps; None (with the reason) when absent."""
    lam = _keys(rows, "hmk/lambda_") or _keys(rows, "mixture/lambda_")
    if not lam:
        return "no HMK / mixture weights in metrics.jsonl (the run has no kernel mixture)"
    tau = _keys(rows, "hmk/tau_")
    fig, axes = _figure(2 if tau else 1)
    for key in lam:
        axes[0].plot(*series(rows, key, "train"), label=key.split("/")[1])
    axes[0].set(title="kernel weights λ", xlabel="step", ylabel="weight")
    if tau:
        for key in tau:
            axes[1].plot(*series(rows, key, "train"), label=key.split("/")[1])
        axes[1].set(title="HMK level weights τ", xlabel="step", ylabel="weight")
    for ax in axes:
        ax.legend(fontsize=8)
    _save(fig, path)
    return None


def plot_divergences(rows: list[dict], path: epath.PathLike) -> str | None:
    keys = _keys(rows, "divergence/")
    if not keys:
        return "no divergence/* values in metrics.jsonl (the run has no divergence penalty)"
    fig, (ax,) = _figure()
    for key in keys:
        ax.plot(*series(rows, key, "train"), label=key)
    ax.set(title="divergence from the reference", xlabel="step", ylabel="value")
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def plot_margins_accuracy(rows: list[dict], path: epath.PathLike, baseline: list[dict] | None = None
                          ) -> str | None:
    if not _keys(rows, "rewards/margins") and not _keys(rows, "eval/accuracy", "eval"):
        return "no rewards/margins or eval/accuracy in metrics.jsonl"
    fig, (ax_m, ax_a) = _figure(2)
    for label, rs, style in (("run", rows, "-"), ("dpo baseline", baseline, "--")):
        if not rs:
            continue
        ax_m.plot(*series(rs, "rewards/margins", "train"), style, label=f"{label} (train batches)")
        ax_a.plot(*series(rs, "rewards/accuracies", "train"), style, label=f"{label} (train batches)")
        s, v = series(rs, "eval/accuracy", "eval")
        if len(s):
            ax_a.plot(s, v, style, marker="o", label=f"{label} (held out)")
    ax_m.set(title="reward margin r+ − r−", xlabel="step")
    ax_a.set(title="preference accuracy", xlabel="step", ylim=(-0.02, 1.02))
    for ax in (ax_m, ax_a):
        ax.legend(fontsize=8)
    _save(fig, path)
    return None


def plot_paper_forms(path: epath.PathLike, z_max: float = 4.0) -> None:
    """Table 1's scalar forms `K(z)` and `dK/dz` (gradient-ascent direction) over z (Fig. 1)."""
    import jax.numpy as jnp

    from dpok_jax.losses import paper_forms

    z = jnp.linspace(-z_max, z_max, 401)
    fig, (ax_v, ax_g) = _figure(2)
    for name, style in zip(paper_forms.FORMS, ("-", "-", "-.", ":")):  # rbf and mahalanobis coincide
        v = np.asarray(paper_forms.paper_form(name, z))
        ax_v.plot(z, v / np.max(np.abs(v)), style, label=name)
        ax_g.plot(z, np.asarray(paper_forms.ascent_direction(name, z)), style, label=name)
    ax_v.set(title="Table-1 forms K(z) (scaled to max 1)", xlabel="log-ratio margin z")
    ax_g.set(title="dK/dz: where ascent moves z", xlabel="log-ratio margin z")
    ax_g.axhline(0.0, color="k", lw=0.5)
    for ax in (ax_v, ax_g):
        ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: epath.PathLike) -> None:
    """A PNG through `epath` (a local path or a run folder's gs://... URL)."""
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _read_json(path: epath.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _scalar_table(d: dict, keys: list[str]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for k in keys:
        v = d[k]
        lines.append(f"| `{k}` | {v:.4f} |" if isinstance(v, float) and math.isfinite(v) else f"| `{k}` | {v} |")
    return lines


def write_report(run_dir: epath.PathLike, out_dir: epath.PathLike | None = None) -> epath.Path:
    """Draw every plot the run has data for into `out_dir` (default RUN_DIR/report) and write
    `report.md` linking them; returns the Markdown file's path."""
    run_dir = epath.Path(run_dir)
    out = epath.Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(run_dir)
    base_dir = run_dir / "dpo_baseline"
    baseline = read_metrics(base_dir) if (base_dir / "metrics.jsonl").exists() else None
    plots = {
        "kernel_weights.png": ("HMK / mixture weights over steps (Fig. 5/7)",
                               lambda p: plot_kernel_weights(rows, p)),
        "divergences.png": ("Divergence values over steps (Fig. 2)", lambda p: plot_divergences(rows, p)),
        "margins_accuracy.png": ("Reward margins and accuracy over steps",
                                 lambda p: plot_margins_accuracy(rows, p, baseline)),
        "paper_forms.png": ("Loss landscapes of the paper's Table-1 scalar forms (Fig. 1; not trainable, "
                            "SPEC §5)", lambda p: plot_paper_forms(p)),
    }
    md = [f"# Run report: `{run_dir}`", ""]
    skipped = []
    for name, (title, draw) in plots.items():
        reason = draw(out / name)
        if reason:
            skipped.append(f"- {title}: skipped, {reason}.")
        else:
            md += [f"## {title}", "", f"![{title}]({name})", ""]
    if skipped:
        md += ["## Not drawn", ""] + skipped + [""]
    for title, fname, filt in (
            ("Final summary (summary.json)", "summary.json", lambda k, v: isinstance(v, (int, float))),
            ("Evaluation (eval.json, `dpok eval`)", "eval.json", lambda k, v: isinstance(v, (int, float))),
    ):
        data = _read_json(run_dir / fname)
        if data:
            md += [f"## {title}", ""] + _scalar_table(data, [k for k, v in data.items() if filt(k, v)
                                                              and not isinstance(v, bool)]) + [""]
    sel = _read_json(run_dir / "selection.json")
    if sel:
        md += ["## Data-driven selection (selection.json)", "",
               f"kernel **{sel['kernel']['choice']}** (rule: {sel['kernel']['rule']})"
               + (f"; divergence **{sel['divergence']['choice']}** (rule: {sel['divergence']['rule']})"
                  if sel.get("divergence") else ""), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
