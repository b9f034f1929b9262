"""`dpok sweep`: the kernel x divergence grid (plus the implicit f-DPO rewards) over seeds, resumable.

Rows: plain DPO (no embedding term) and the kernels polynomial, rbf, spectral, mahalanobis, the flat
mixture and HMK (hybrid loss, `loss.gamma`); columns: the divergence penalties (`loss.alpha`); one
more row, `implicit`, trains the f-DPO implicit rewards (SPEC §7) with neither kernel nor penalty
(`reverse_kl` is plain DPO). Every cell is trained from the same reference per seed (one SFT
warm-up per seed, shared), into `OUT/seed<s>/<cell>/`, and evaluated on the held-out pairs.

`OUT/results.csv` gets one row per finished cell and seed (accuracy and F1 overall and per task,
final step, wall time, status). A cell whose loss goes non-finite is recorded as `diverged` with the
step, a cell that raises as `failed` with the error, and the sweep goes on. Run the same command
again to resume: finished cells (any status) are skipped, a half-trained cell resumes from its
checkpoint. `OUT/heatmap_<task>.png` and `OUT/sweep.md` show mean ± std over seeds per cell (the
paper's Fig. 8-10 analogues).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import re
import time
from pathlib import Path

import numpy as np

from dpok_jax import config as config_lib
from dpok_jax.losses import registry

# The grid, from the registries: plain DPO then every kernel; every divergence; every implicit reward.
KERNEL_ROWS = ("dpo",) + tuple(registry.KERNELS)
DIVERGENCE_COLUMNS = tuple(registry.DIVERGENCES)
IMPLICIT_REWARDS = tuple(registry.REWARDS)

# The default sweep on top of the embedded default: the harder synthetic tasks, a tiny model and a
# short budget so the whole grid x 2 seeds fits 30 minutes on 2 CPU cores; live reference (the
# divergence penalties are exact, and Wasserstein needs it). A cell's cost is mostly XLA compiling
# its train and eval steps (about 10 s of a 15 s cell, measured), not its 50 steps; `run_sweep`
# keeps a persistent compilation cache so what repeats (the plain-DPO and implicit-reward cells of
# the second seed, every cell's shared pieces, a resumed sweep) is compiled once.
SWEEP_DEFAULTS = (
    "model.num_layers=1", "sft.steps=150", "train.steps=50", "train.batch_size=16", "train.log_every=10",
    "train.eval_every=50", "train.checkpoint_every=25", "train.progress=false",
    "train.compare_with_dpo=false", "reference.mode=live", "loss.gamma=0.1", "loss.eta=0.01",
    "loss.alpha=0.05", "loss.divergence=kl",
    # Padded rows: a cell is compile-bound (50 steps), and packed rows come in a few row counts per
    # run, each compiled once: with packing the default sweep used 47 CPU-minutes for 102 of its 106
    # cells, against 23 for all 106 padded.
    "data.packing=false",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    kernel: str  # a KERNEL_ROWS entry, or "implicit"
    divergence: str  # a DIVERGENCE_COLUMNS entry, or "none"
    reward: str = "reverse_kl"

    @property
    def name(self) -> str:
        return f"implicit__{self.reward}" if self.kernel == "implicit" else f"{self.kernel}__{self.divergence}"


def grid(kernels=KERNEL_ROWS, divergences=DIVERGENCE_COLUMNS, rewards=IMPLICIT_REWARDS) -> list[Cell]:
    """Kernels x divergences, then one implicit-reward cell per reward."""
    for name, given, allowed in (("kernel", kernels, KERNEL_ROWS), ("divergence", divergences, DIVERGENCE_COLUMNS),
                                 ("reward", rewards, IMPLICIT_REWARDS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise ValueError(f"sweep: unknown {name}(s) {bad}; expected some of {list(allowed)}")
    cells = [Cell(k, d) for k in kernels for d in divergences]
    return cells + [Cell("implicit", "none", r) for r in rewards]


def cell_config(base: config_lib.Config, cell: Cell, run_dir: Path) -> config_lib.Config:
    """`base` with the cell's loss: `gamma` only for kernels, `eta` only for HMK / mixture."""
    loss = base.loss
    if cell.kernel == "implicit":
        loss = dataclasses.replace(loss, gamma=0.0, kernel="none", eta=0.0, alpha=0.0, divergence="none",
                                   reward=cell.reward)
    else:
        kernel = "none" if cell.kernel == "dpo" else cell.kernel
        loss = dataclasses.replace(
            loss, kernel=kernel, gamma=0.0 if kernel == "none" else loss.gamma,
            eta=loss.eta if kernel in ("hmk", "mixture") else 0.0, divergence=cell.divergence,
            reward="reverse_kl")
    return config_lib.validate(dataclasses.replace(base, loss=loss, run_dir=str(run_dir)))


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict) -> None:
    rows = _read_rows(path) + [row]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _train_cell(p, cfg: config_lib.Config, cell_dir: Path) -> dict:
    """Train one cell; returns its status, final step and held-out metrics."""
    from dpok_jax.train.loop import TrainingDiverged
    from dpok_jax.train.run import train_one

    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
    try:
        result = train_one(p, cfg, cell_dir)
    except TrainingDiverged as err:
        found = re.search(r"at step (\d+)", str(err))
        return {"status": "diverged", "step": int(found.group(1)) if found else "", "error": str(err)[:200]}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - recorded, and the sweep goes on
        if "not finite" in str(err):
            return {"status": "diverged", "step": cfg.train.steps, "error": str(err)[:200]}
        return {"status": "failed", "step": "", "error": f"{type(err).__name__}: {err}"[:300]}
    if result.interrupted:
        raise KeyboardInterrupt
    metrics = {k: v for k, v in result.eval_metrics.items() if k.startswith("eval/")}
    return {"status": "done", "step": result.final_step, **metrics}


@contextlib.contextmanager
def compilation_cache(folder: Path | None):
    """JAX's persistent compilation cache in `folder` for the duration (None: leave JAX's settings
    alone). Cells rebuild their jitted steps, so without it identical computations (the same cell on
    another seed, the eval step of every non-kernel cell, a resumed sweep) compile again; a cache
    the user configured (`JAX_COMPILATION_CACHE_DIR`) is kept. Restored afterwards, so a caller's
    later compilations do not write into `folder`."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if folder is None or jax.config.jax_compilation_cache_dir:
        yield
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    cc.reset_cache()  # the cache is set up at the first compilation: make it read the new folder
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    try:
        yield
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()


def run_sweep(base: config_lib.Config, out: str | Path, *, seeds=(0, 1), cells: list[Cell] | None = None,
              progress=print, compile_cache: bool = True) -> Path:
    """Train every (seed, cell) not yet in `OUT/results.csv`; then draw the heatmaps and tables.
    `compile_cache`: keep compiled steps in `OUT/.jax_cache` (see `compilation_cache`)."""
    from dpok_jax.train.run import host_blas_single_threaded, prepare

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = grid() if cells is None else cells
    results = out / "results.csv"
    done = {(r["seed"], r["cell"]) for r in _read_rows(results)}
    with host_blas_single_threaded(), compilation_cache(out / ".jax_cache" if compile_cache else None):
        for seed in seeds:
            todo = [c for c in cells if (str(seed), c.name) not in done]
            if not todo:
                continue
            seed_dir = out / f"seed{seed}"
            base_s = dataclasses.replace(base, run_dir=str(seed_dir),
                                         train=dataclasses.replace(base.train, seed=int(seed)))
            p = prepare(base_s)  # the reference (SFT warm-up saved in seed_dir/reference), once per seed
            for cell in todo:
                cfg = cell_config(base_s, cell, seed_dir / cell.name)
                p.cfg = cfg
                t0 = time.perf_counter()
                got = _train_cell(p, cfg, seed_dir / cell.name)
                row = {"seed": seed, "cell": cell.name, "kernel": cell.kernel, "divergence": cell.divergence,
                       "reward": cell.reward, "wall_s": round(time.perf_counter() - t0, 1), **got}
                _append_row(results, row)
                progress(f"[sweep] seed {seed} {cell.name}: {got['status']} "
                         f"acc={got.get('eval/accuracy', float('nan')):.3f} ({row['wall_s']} s)")
    return write_sweep_outputs(out)


def aggregate(rows: list[dict], metric: str) -> dict[str, dict]:
    """Per cell: `mean`, `std` (population, over seeds) and `n` of `metric` over finished seeds, and
    the statuses of the others (`diverged@<step>`, `failed`)."""
    out: dict[str, dict] = {}
    for r in rows:
        cell = out.setdefault(r["cell"], {"values": [], "other": [], "kernel": r["kernel"],
                                          "divergence": r["divergence"], "reward": r["reward"]})
        value = r.get(metric, "")
        if r["status"] == "done" and value not in ("", None) and math.isfinite(float(value)):
            cell["values"].append(float(value))
        else:
            cell["other"].append(r["status"] + (f"@{r['step']}" if r["status"] == "diverged" else ""))
    for cell in out.values():
        v = np.asarray(cell["values"])
        cell.update(n=len(v), mean=float(v.mean()) if len(v) else float("nan"),
                    std=float(v.std()) if len(v) else float("nan"))
    return out


def _cell_text(c: dict | None) -> str:
    if c is None:
        return ""
    parts = [f"{c['mean']:.3f} ± {c['std']:.3f}"] if c["n"] else []
    return " ".join(parts + c["other"])


def _metrics(rows: list[dict]) -> list[str]:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("eval/accuracy")]
    return sorted(keys, key=lambda k: (k != "eval/accuracy", k != "eval/accuracy/mean_over_tasks", k))


def sweep_table(rows: list[dict], metric: str) -> str:
    """Markdown: kernels (rows) x divergences (columns), `mean ± std` over seeds; then the implicit
    rewards. Diverged / failed seeds are listed in the cell."""
    agg = aggregate(rows, metric)
    kernels = [k for k in KERNEL_ROWS if any(c["kernel"] == k for c in agg.values())]
    divs = [d for d in DIVERGENCE_COLUMNS if any(c["divergence"] == d for c in agg.values())]
    lines = []
    if kernels and divs:  # a grid without kernel or divergence cells has no such table
        lines = [f"| {metric} | " + " | ".join(divs) + " |", "|---" * (len(divs) + 1) + "|"]
        for k in kernels:
            lines.append(f"| {k} | " + " | ".join(_cell_text(agg.get(f"{k}__{d}")) for d in divs) + " |")
    rewards = [r for r in IMPLICIT_REWARDS if f"implicit__{r}" in agg]
    if rewards:
        lines += ["", "| implicit f-DPO reward | " + " | ".join(rewards) + " |", "|---" * (len(rewards) + 1) + "|",
                  "| (no kernel, no penalty) | " + " | ".join(_cell_text(agg[f"implicit__{r}"]) for r in rewards)
                  + " |"]
    return "\n".join(lines).strip("\n")


def plot_heatmap(rows: list[dict], metric: str, path: Path) -> None:
    """Heatmap of the mean over seeds (text: mean ± std, or the failure) and the implicit-reward row."""
    from matplotlib.figure import Figure

    agg = aggregate(rows, metric)
    kernels = [k for k in KERNEL_ROWS if any(c["kernel"] == k for c in agg.values())]
    divs = [d for d in DIVERGENCE_COLUMNS if any(c["divergence"] == d for c in agg.values())]
    rewards = [r for r in IMPLICIT_REWARDS if f"implicit__{r}" in agg]
    fig = Figure(figsize=(2 + 1.5 * max(len(divs), len(rewards), 1), 2.5 + 0.6 * len(kernels)),
                 layout="constrained")
    panels = [(kernels, divs, lambda k, d: f"{k}__{d}")] if kernels and divs else []
    if rewards:
        panels.append((["implicit"], rewards, lambda k, r: f"implicit__{r}"))
    axes = fig.subplots(len(panels), 1, squeeze=False,
                        height_ratios=[len(ps[0]) for ps in panels]) if panels else []
    for ax, (ys, xs, key) in zip([a[0] for a in axes], panels):
        grid_ = np.array([[agg.get(key(y, x), {"mean": np.nan})["mean"] for x in xs] for y in ys])
        im = ax.imshow(grid_, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                text = _cell_text(agg.get(key(y, x))).replace(" ± ", "\n± ")
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="w" if not grid_[i, j] > 0.6 else "k")
        ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(ys)), ys, fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{metric}: mean ± std over seeds")
    fig.savefig(path, dpi=100)


def write_sweep_outputs(out: str | Path) -> Path:
    """`OUT/heatmap_<metric>.png` per accuracy metric and `OUT/sweep.md` with the tables; returns
    the Markdown file."""
    out = Path(out)
    rows = _read_rows(out / "results.csv")
    if not rows:
        raise ValueError(f"{out / 'results.csv'} has no results yet")
    seeds = sorted({r["seed"] for r in rows})
    walls = [float(r["wall_s"]) for r in rows if r.get("wall_s")]
    md = [f"# Sweep `{out}`", "", f"{len(rows)} cell runs over seeds {', '.join(seeds)}; "
          f"training wall time {sum(walls) / 60:.1f} min in all (cells only, without SFT warm-ups).", ""]
    for metric in _metrics(rows):
        name = "heatmap_" + (metric.split("/", 2)[2] if metric.count("/") == 2 else "all") + ".png"
        plot_heatmap(rows, metric, out / name)
        md += [f"## {metric}", "", sweep_table(rows, metric), "", f"![{metric}]({name})", ""]
    bad = [r for r in rows if r["status"] != "done"]
    if bad:
        md += ["## Diverged or failed cells", ""] + [
            f"- seed {r['seed']} `{r['cell']}`: {r['status']} at step {r['step']}: {r.get('error', '')}"
            for r in bad] + [""]
    path = out / "sweep.md"
    path.write_text("\n".join(md))
    return path
