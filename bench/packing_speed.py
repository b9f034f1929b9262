"""Train-step time of packed rows (`data.packing`) against padded rows, side by side in one process.

The same pairs (several batches drawn once) go through the padded step and through packed steps with
several row lengths (`data.pack_length`) and both row shapes (`data.pack_rows`: bucket, tight), with prefix sharing (the default) and, with `--unshared`,
without it (`data.pack_share_prompt=false`); every shape is compiled first, then the variants run
interleaved in a shuffled order per round, so machine noise hits them alike. Prints, per variant, the
sequence tokens (a shared prompt counted in both sequences) per computed position, the median step time, and the median over rounds
of the within-round time ratio to the padded step (with quartiles). Below 1 is faster than padded.

    python bench/packing_speed.py                                   # embedded default: tiny, synthetic
    python bench/packing_speed.py --unshared --pack-lengths 0       # shared vs one segment per sequence
    python bench/packing_speed.py --pack-lengths 0 512 1024 data.source=../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \\
        data.max_length=512 data.max_prompt_length=256 train.batch_size=8
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import jax
import numpy as np

from dpok_jax.config import load_config
from dpok_jax.data import packing
from dpok_jax.train import run as run_lib
from dpok_jax.train.loop import to_global
from dpok_jax.train.state import make_optimizer

BASE = ["train.progress=false", "reference.mode=live", "sft.steps=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--pack-lengths", type=int, nargs="+", default=[0, 256, 512],
                        help="data.pack_length values to time (0: the batch's bucket)")
    parser.add_argument("--pack-rows", nargs="+", default=["bucket", "tight"], choices=["bucket", "tight"],
                        help="data.pack_rows values to time (tight: one row per device, as long as needed)")
    parser.add_argument("--unshared", action="store_true",
                        help="also time packed rows without prefix sharing (data.pack_share_prompt=false)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with run_lib.host_blas_single_threaded():  # as `dpok train` runs its steps
        _bench(args)


def _bench(args: argparse.Namespace) -> None:
    cfg = load_config(None, BASE + ["run_dir=/tmp/dpok_bench_packing", *args.overrides])
    p = run_lib.prepare(cfg)
    spec = run_lib.step_spec(cfg)
    tx = make_optimizer(learning_rate=1e-4, kernel_learning_rate=1e-2, warmup_steps=0, total_steps=10**6,
                        weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0)
    kernel_params = run_lib.fit_kernel(p, spec)
    state, step = run_lib.compile_train_step(p, spec, kernel_params, tx)
    variants: dict[str, list] = {}
    shares = (True, False) if args.unshared else (True,)
    for rows, pack_length, share in [(None, None, None)] + [
            (r, n, s) for r in args.pack_rows for n in args.pack_lengths for s in shares]:
        name = "padded" if pack_length is None else \
            f"packed{'' if share else ' unshared'} {rows} (pack_length={pack_length})"
        c = cfg if pack_length is None else load_config(
            None, BASE + ["run_dir=/tmp/dpok_bench_packing", *args.overrides, "data.packing=true",
                          f"data.pack_length={pack_length}", f"data.pack_share_prompt={share}",
                          f"data.pack_rows={rows}"])
        batcher = run_lib._batcher(p.train_pairs, c, c.train.batch_size, c.train.seed,
                                   packing=pack_length is not None, accum=c.optim.grad_accum, mesh=p.mesh)
        variants[name] = [packing.apply_packing(next(batcher)) for _ in range(args.batches)]
    stats = {}
    for name, batches in variants.items():
        ids = [b.get("packed_input_ids", b.get("chosen_input_ids")) for b in batches]
        computed = sum(x.size for x in ids) * (1 if "packed_input_ids" in batches[0] else 2)
        # Tokens of the pairs' sequences (a shared prompt counts in both) over computed positions:
        # above 1 where prefix sharing computes a prompt once for two sequences.
        real = sum(int((b["packed_segment_ids"] > 0).sum() +
                       ((b["packed_segment_ids"] > 0) & (b.get("packed_branch", 1) == 0)).sum())
                   if "packed_input_ids" in b else
                   int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum())
                   for b in batches)
        stats[name] = dict(fill=real / computed, shapes=sorted({x.shape for x in ids}))
        variants[name] = [to_global(b, p.batch_sharding) for b in batches]
        for b in variants[name]:  # compile every shape before timing (the state is donated: thread it)
            state, _ = jax.block_until_ready(step(state, p.init_params, b))
    times: dict[str, list] = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.rounds):
        random.Random(r).shuffle(names)
        for name in names:
            batch = variants[name][r % args.batches]
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(step(state, p.init_params, batch))
            times[name].append(time.perf_counter() - t0)
    base = times["padded"]
    print(f"{'variant':42s} {'seq tokens/computed':>13s} {'median step':>12s} {'ratio to padded (q1-q3)':>26s}  shapes")
    for name in variants:
        ratios = sorted(t / b for t, b in zip(times[name], base))
        q = statistics.quantiles(ratios, n=4)
        print(f"{name:42s} {stats[name]['fill']:13.3f} {statistics.median(times[name]) * 1e3:10.1f}ms "
              f"{statistics.median(ratios):10.3f} ({q[0]:.3f}-{q[2]:.3f})  {stats[name]['shapes']}")


if __name__ == "__main__":
    main()
