"""Compiled peak memory of the LM loss head: chunked + rematerialized vs naive full logits.

Lowers and compiles (never runs) `value_and_grad` of `Σ policy token log-probs + Σ KL(π_θ ‖ π_ref)`
per position, for a policy and a live reference head, with `jax.ShapeDtypeStruct` inputs, and reads
XLA's memory analysis. Runs on CPU. Example:

    .venv/bin/python bench/loss_head_memory.py --batch 8 --seq 2048 --vocab 128256 --hidden 2048
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dpok_jax import losses


def _loss_fns(chunk_size: int):
    def chunked(h, w, rh, rw, y):
        pol, _, div = losses.chunked_logps_and_divergence(
            h, w, y, ref_hidden=rh, ref_unembed=rw, divergence="kl", chunk_size=chunk_size)
        return jnp.sum(pol) + jnp.sum(div)

    def naive(h, w, rh, rw, y):
        logits = jnp.einsum("bth,hv->btv", h, w, preferred_element_type=jnp.float32)
        ref_logits = jax.lax.stop_gradient(jnp.einsum("bth,hv->btv", rh, rw, preferred_element_type=jnp.float32))
        return jnp.sum(losses.token_logps(logits, y)) + jnp.sum(losses.divergence("kl", logits, ref_logits))

    return {"chunked": chunked, "naive": naive}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    dt = jnp.dtype(args.dtype)
    h = jax.ShapeDtypeStruct((args.batch, args.seq, args.hidden), dt)
    w = jax.ShapeDtypeStruct((args.hidden, args.vocab), dt)
    y = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    print(f"B={args.batch} T={args.seq} V={args.vocab} H={args.hidden} dtype={args.dtype} "
          f"chunk={args.chunk_size}; value_and_grad w.r.t. policy hidden and unembedding, live reference")
    print("counted: temp = XLA temp buffers (activations, saved residuals, logits); peak = temp + "
          "arguments + outputs (arguments: both models' hidden states and unembeddings, labels)")
    result = {}
    for name, fn in _loss_fns(args.chunk_size).items():
        compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(h, w, h, w, y).compile()
        mem = compiled.memory_analysis()
        temp, arg, out = mem.temp_size_in_bytes, mem.argument_size_in_bytes, mem.output_size_in_bytes
        result[name] = {"temp": temp, "peak": temp + arg + out - mem.alias_size_in_bytes}
        print(f"{name:8s} temp {temp / 2**30:8.3f} GiB   args {arg / 2**30:6.3f} GiB   out {out / 2**30:6.3f} GiB"
              f"   peak {result[name]['peak'] / 2**30:8.3f} GiB")
    for key in ("temp", "peak"):
        print(f"ratio chunked/naive ({key}): {result['chunked'][key] / result['naive'][key]:.4f} "
              f"(target <= 0.125)")
    return result


if __name__ == "__main__":
    main()
