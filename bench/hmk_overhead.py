"""Train-step time of DPO-Kernels variants against plain DPO, measured side by side in one process.

Each variant's jitted train step is compiled first, then the variants run interleaved (one step each
per round, in a shuffled order) on the same model, reference and batch, so machine noise hits them
alike. Prints per-variant median step time and, for each ratio, the median over rounds of the
within-round ratio (with its quartiles). Targets: HMK + hybrid <= 1.05x DPO;
Wasserstein penalty <= 1.3x the KL penalty.

    python bench/hmk_overhead.py                       # tiny model, CPU
    python bench/hmk_overhead.py --no-blas-limit       # without dpok train's one-thread host BLAS
    python bench/hmk_overhead.py model.preset=smollm2_135m train.batch_size=8 data.max_length=512
"""

from __future__ import annotations

import argparse
import random
import dataclasses
import statistics
import time

import jax

from dpok_jax.config import load_config
from dpok_jax.train import run as run_lib
from dpok_jax.train.loop import to_global
from dpok_jax.train.state import init_train_state, make_optimizer
from dpok_jax.train.step import make_train_step

VARIANTS = {
    "dpo": dict(gamma=0.0, kernel="none", eta=0.0),
    "hmk+hybrid": dict(gamma=0.1, kernel="hmk", eta=0.01),
    "kl penalty": dict(alpha=0.1, divergence="kl"),
    "wasserstein penalty": dict(alpha=0.1, divergence="wasserstein"),
}
BASE = ["data.synthetic_train_per_task=64", "data.synthetic_eval_per_task=8", "train.progress=false",
        "data.buckets=[128]", "reference.mode=live"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-blas-limit", action="store_true",
                        help="leave the host BLAS thread pool as it is (dpok train limits it to one "
                             "thread on CPU; see run.host_blas_single_threaded)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.no_blas_limit:
        _bench(args)
        return
    with run_lib.host_blas_single_threaded():  # as `dpok train` runs its steps
        _bench(args)


def _bench(args: argparse.Namespace) -> None:
    cfg = load_config(None, BASE + ["run_dir=/tmp/dpok_bench_hmk", *args.overrides])
    p = run_lib.prepare(cfg)
    batch = to_global(next(run_lib._batcher(p.train_pairs, cfg, cfg.train.batch_size, 0)),
                      p.batch_sharding)
    tx = make_optimizer(learning_rate=1e-4, kernel_learning_rate=1e-2, warmup_steps=0,
                        total_steps=1000, weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0)
    from dpok_jax import losses

    steps, states = {}, {}
    for name, loss_over in VARIANTS.items():
        vcfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **loss_over))
        spec = run_lib.step_spec(vcfg)
        kernel_params = run_lib.fit_kernel(p, spec)
        kernel = losses.init_hmk_params() if spec.uses_kernel else {}
        params = {"policy": run_lib.tree_copy(p.init_params), "kernel": kernel}
        states[name] = init_train_state(params, tx, 0)
        fn = jax.jit(make_train_step(p.fns, spec, kernel_params, tx))
        states[name], m = fn(states[name], p.init_params, batch)  # compile + warm up
        jax.block_until_ready(m["loss"])
        steps[name] = fn
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(steps)
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)  # no variant always runs first (or right after the slowest one)
        for name in order:
            fn = steps[name]
            t0 = time.perf_counter()
            states[name], m = fn(states[name], p.init_params, batch)
            jax.block_until_ready(m["loss"])
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}  batch {cfg.train.batch_size}"
          f"  rounds {args.rounds}"
          f"  host BLAS {'as is' if args.no_blas_limit else 'one thread'}")
    for name, t in med.items():
        print(f"  {name:<22} median step {t * 1e3:8.2f} ms")
    for (num, den), target in ((("hmk+hybrid", "dpo"), 1.05), (("wasserstein penalty", "kl penalty"), 1.3)):
        # Paired: the ratio within each round (same moment, same machine load), then its median and
        # quartiles over the rounds.
        ratios = sorted(a / b for a, b in zip(times[num], times[den]))
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        best = min(times[num]) / min(times[den])
        print(f"ratio {num} / {den}: median {q2:.3f} (quartiles {q1:.3f}-{q3:.3f}), "
              f"ratio of medians {med[num] / med[den]:.3f}, of fastest steps {best:.3f}; "
              f"target <= {target}")

if __name__ == "__main__":
    main()
