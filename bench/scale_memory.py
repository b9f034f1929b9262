"""Per-device memory of the compiled train step across meshes, as ratios to the one-device step.

Compiles (ahead of time, nothing runs) the DPO-Kernels train step of the tiny model and of a
1B-shaped model (Llama-3.2-1B sizes) on 8 fake CPU devices, on the meshes 1 device, data=8, fsdp=8
and fsdp=4 x tensor=2, and prints per-device arguments, temporaries and total from XLA's memory
analysis (the CPU compiler's buffer assignment), each with its ratio to the one-device step.
Targets (issue 12): fsdp=8 temporaries <= 1.5x data=8's; fsdp=8 arguments ~ 1/8 of one device's.

    .venv/bin/python bench/scale_memory.py                 # tiny and 1B-shaped
    .venv/bin/python bench/scale_memory.py --models tiny
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

MESHES = {
    "1 device": dict(data=1, fsdp=1, tensor=1),
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
    "fsdp=4 x tensor=2": dict(data=1, fsdp=4, tensor=2),
}

# HMK + hybrid with a precomputed reference (the shipped large configs' loss), float32.
COMMON = ["loss.gamma=0.05", "loss.kernel=hmk", "loss.eta=0.01", "reference.mode=precomputed",
          "sft.steps=0", "train.steps=10"]
MODELS = {
    "tiny": ["model.preset=tiny", "train.batch_size=16", "data.max_length=128", "data.max_prompt_length=64",
             "loss.chunk_size=64", "model.num_kv_heads=2"],
    "1b-shaped": ["model.preset=llama3_2_1b", "train.batch_size=8", "data.max_length=256",
                  "data.max_prompt_length=128", "loss.chunk_size=128", "model.remat=full",
                  "model.dtype=bfloat16", "model.path=/nonexistent/Llama-3.2-1B"]  # full 128256 vocab,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)

    import jax

    from dpok_jax.config import load_config
    from dpok_jax.plan import plan_config

    mib = 1024 ** 2
    for model in args.models:
        print(f"\n{model}: per-device MiB (ratio to 1 device)")
        print(f"{'mesh':<20}{'arguments':>18}{'temporaries':>18}{'total':>18}{'compile s':>11}")
        base = None
        for name, mesh in MESHES.items():
            overrides = COMMON + MODELS[model] + [f"mesh.{k}={v}" for k, v in mesh.items()]
            cfg = load_config(None, overrides)
            n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
            p = plan_config(cfg, config_name=model, devices=jax.devices()[:n])
            row = (p.argument_bytes + p.held_bytes, p.temp_bytes, p.total_bytes)
            base = base or row
            cells = "".join(f"{v / mib:10.1f} ({v / b:4.2f})" for v, b in zip(row, base))
            print(f"{name:<20}{cells}{p.compile_seconds:11.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
