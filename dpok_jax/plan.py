"""`dpok plan`: will a config's train step fit its devices? Compiled ahead of time, nothing run.

The real train step of a config (model, loss, optimizer, mesh, batch, ``grad_accum``, ``remat``) is
lowered on abstract inputs (`jax.ShapeDtypeStruct` with their shardings: no parameter is ever
materialized) and compiled by XLA for the mesh; the compiled executable's memory analysis gives
per-device bytes, its cost analysis the FLOPs. Without the named accelerator at hand the mesh is
made of fake CPU devices (``--xla_force_host_platform_device_count``), in a subprocess when this
process has fewer: the per-device numbers are then **an estimate from the CPU compiler's buffer
assignment** (TPU/GPU compilers fuse and schedule differently, and the CPU path of attention
materializes the ``[B, N, T, T]`` scores that cuDNN flash attention would not), compared with the
named device's HBM.

Per device:
  ``total = arguments + outputs not aliased to (donated) arguments + temporaries + held``
where ``held`` is what the training loop keeps on the device but the step does not read (the
frozen reference's parameters in precomputed-reference mode: jit prunes unused arguments).
Verdict: fits when ``total ≤ (1 − headroom) · HBM`` (headroom 10% by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 1024 ** 3
# Per-chip memory in bytes. TPU sizes are GiB as Google lists them; GPU sizes are the marketed GB.
DEVICE_HBM = {
    "v5e": 16 * GIB,
    "v5p": 95 * GIB,
    "v4": 32 * GIB,
    "h100": 80 * 10 ** 9,
    "h200": 141 * 10 ** 9,
    "a100": 80 * 10 ** 9,
    "a100-40": 40 * 10 ** 9,
    "l4": 24 * 10 ** 9,
    "a10": 24 * 10 ** 9,
    "rtx4090": 24 * 10 ** 9,
}


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one compiled train step and what they mean for a device."""

    config: str
    model: str
    mesh: dict
    devices: int
    device_kind: str | None
    hbm_bytes: int | None
    batch_size: int
    seq_len: int
    grad_accum: int
    remat: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    held_bytes: int
    flops_per_device: float
    compile_seconds: float
    model_flops: float = float("nan")
    headroom: float = 0.10
    notes: list = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + max(self.output_bytes - self.alias_bytes, 0) + self.temp_bytes + self.held_bytes

    @property
    def fits(self) -> bool | None:
        if self.hbm_bytes is None:
            return None
        return self.total_bytes <= (1.0 - self.headroom) * self.hbm_bytes

    def verdict(self) -> str:
        if self.hbm_bytes is None:
            return "no device named (--device-kind): nothing to compare with"
        used = self.total_bytes / self.hbm_bytes
        if self.fits:
            return f"FITS: {used:.0%} of {self.device_kind} HBM (headroom {1 - used:.0%} >= {self.headroom:.0%})"
        if self.total_bytes <= self.hbm_bytes:
            return f"TIGHT: {used:.0%} of {self.device_kind} HBM (headroom below {self.headroom:.0%})"
        return f"DOES NOT FIT: {used:.0%} of {self.device_kind} HBM"

    def suggestions(self) -> list[str]:
        """Changes that shrink the part that is too big (estimates: re-run the plan to confirm)."""
        if self.hbm_bytes is None or self.fits:
            return []
        budget = (1.0 - self.headroom) * self.hbm_bytes
        out = []
        state = self.argument_bytes + self.held_bytes
        data = self.mesh.get("data", 1)
        if state > budget / 2 and data > 1:
            out.append(f"mesh: fold data={data} into fsdp (fsdp={self.mesh.get('fsdp', 1) * data}, data=1): "
                       f"parameters and optimizer state are replicated {data}x over 'data'")
        if self.remat == "none":
            out.append("model.remat=full: keep only each layer's input for the backward pass")
        need = (self.total_bytes - budget) / max(self.temp_bytes, 1)
        micro = self.batch_size // self.grad_accum
        if self.temp_bytes > 0 and need < 1:
            factor = 2
            while factor * self.grad_accum <= self.batch_size and (1 - 1 / factor) < need:
                factor *= 2
            batch_devices = self.mesh.get("data", 1) * self.mesh.get("fsdp", 1)
            if micro % (factor * batch_devices) == 0 or (micro // factor) % batch_devices == 0:
                out.append(f"optim.grad_accum={self.grad_accum * factor}: about {factor}x fewer activation "
                           f"bytes per micro-batch (temporaries are {self.temp_bytes / GIB:.2f} GiB)")
        if not out:
            out.append("more devices, a larger fsdp or tensor axis, or a shorter data.max_length")
        return out

    def table(self) -> str:
        def gib(x):
            return f"{x / GIB:9.3f} GiB"

        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"plan: {self.config}",
            f"  model {self.model}; mesh {mesh} ({self.devices} devices); batch {self.batch_size} pairs "
            f"x {self.seq_len} tokens, grad_accum {self.grad_accum}, remat {self.remat}",
            f"  compiled ahead of time for {self.devices} devices in {self.compile_seconds:.0f} s "
            "(on fake CPU devices the per-device bytes are the CPU compiler's buffer assignment: an "
            "estimate)",
            "  per device:",
            f"    arguments (state, batch)    {gib(self.argument_bytes)}",
            f"    outputs not donated         {gib(max(self.output_bytes - self.alias_bytes, 0))}",
            f"    temporaries                 {gib(self.temp_bytes)}",
            f"    held by the loop, unused    {gib(self.held_bytes)}",
            f"    total                       {gib(self.total_bytes)}",
        ]
        if self.hbm_bytes is not None:
            lines.append(f"    {self.device_kind} HBM                {gib(self.hbm_bytes)}")
        lines.append(f"  FLOPs per step: {self.flops_per_device:.3e} per device, "
                     f"{self.flops_per_device * self.devices:.3e} in all (XLA cost analysis, which counts "
                     "the layer scan's body once)")
        lines.append(f"  model FLOPs per step: {self.model_flops:.3e} (6 x params x tokens + attention, "
                     "policy training only: the MFU numerator)")
        lines.append(f"  verdict: {self.verdict()}")
        for s in self.suggestions():
            lines.append(f"  suggestion: {s}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


# ------------------------------------------------------------------------------------------------
# Building the abstract step


def model_config(cfg) -> tuple[Any, list[str]]:
    """The `ModelConfig` a config trains (its checkpoint's config.json, or the preset's shape)."""
    from dpok_jax.models import ModelConfig, read_config

    m, notes = cfg.model, []
    overrides = {k: v for k, v in dataclasses.asdict(m).items()
                 if k in {"hidden_size", "intermediate_size", "num_layers", "num_heads",
                          "num_kv_heads", "head_dim"} and v is not None}
    common = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **overrides)
    if m.path is not None and Path(m.path, "config.json").is_file():
        return read_config(m.path, **common), notes
    if m.path is not None:
        if m.preset == "tiny":
            raise ValueError(f"config model.path={m.path!r} has no config.json here: set model.preset to "
                             "the checkpoint's shape (smollm2_135m, llama3_2_1b, llama3_1_8b) to plan it")
        notes.append(f"model.path {m.path} not found here: planned with the model.preset={m.preset} shape")
    constructor = getattr(ModelConfig, m.preset, None)
    if constructor is None:
        raise ValueError(f"config model.preset={m.preset!r}: unknown")
    base = constructor()
    if m.preset == "tiny" or m.path is None:
        # What `dpok train` builds from a preset: the tokenizer's vocabulary padded to 64.
        vocab = _tokenizer_vocab(cfg, base.vocab_size)
        common["vocab_size"] = -(-vocab // 64) * 64
    return constructor(**common), notes


def _tokenizer_vocab(cfg, default: int) -> int:
    if cfg.data.tokenizer == "byte":
        from dpok_jax import data as data_lib

        tok = data_lib.load_tokenizer("byte")
        return max(int(getattr(tok, "vocab_size", 0)), len(tok))
    return default


def seq_len(cfg) -> int:
    """The padded length of the longest batch: the smallest bucket holding ``data.max_length``."""
    return min(b for b in cfg.data.buckets if b >= cfg.data.max_length)


def abstract_batch(cfg, spec, hidden_size: int, mesh) -> dict:
    """ShapeDtypeStructs (with the batch sharding) of one global batch of the train step."""
    import jax
    import jax.numpy as jnp

    from dpok_jax.sharding import batch_sharding

    b, length = cfg.train.batch_size, seq_len(cfg)
    shard = batch_sharding(mesh)

    def s(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=shard)

    batch = {}
    for side in ("chosen", "rejected"):
        for key in ("input_ids", "attention_mask", "response_mask"):
            batch[f"{side}_{key}"] = s((b, length), jnp.int32)
    batch.update(task_id=s((b,), jnp.int32), example_index=s((b,), jnp.int32), valid=s((b,), jnp.bool_))
    if spec.uses_kernel and spec.embeddings == "dataset":
        for k in ("prompt", "chosen", "rejected"):
            batch[f"embedding_{k}"] = s((b, hidden_size), jnp.float32)
    if spec.reference == "precomputed":
        batch.update(ref_chosen_logps=s((b,), jnp.float32), ref_rejected_logps=s((b,), jnp.float32))
        for k in ("prompt", "chosen", "rejected"):
            batch[f"ref_embedding_{k}"] = s((b, hidden_size), jnp.float32)
        if spec.uses_divergence:
            k = cfg.reference.top_k
            # One row per pair (chosen, rejected), as `train.reference`'s cache serves them.
            batch["ref_topk_indices"] = s((b, 2, length - 1, k), jnp.int32)
            batch["ref_topk_logps"] = s((b, 2, length - 1, k), jnp.float32)
    return batch


def _kernel_params(spec, hidden_size: int):
    """Kernel parameters of the right shapes (fitted on random vectors: the step takes their arrays
    as an argument, so their values do not change the program)."""
    if not spec.uses_kernel:
        return None
    import numpy as np

    from dpok_jax import losses

    rng = np.random.default_rng(0)
    e = [rng.standard_normal((64, hidden_size)).astype(np.float32) for _ in range(3)]
    return losses.fit_kernel_params(*e)


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device_bytes(tree, shardings) -> int:
    import jax
    import numpy as np

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
    return total


def lower_train_step(cfg, devices=None):
    """``(lowered, info)`` of a config's train step on abstract inputs; ``info`` holds the model
    name, mesh, held bytes and notes. Uses the first ``devices`` (default: all)."""
    step, state, ref, batch, _, info = abstract_train_step(cfg, devices)
    return step.lower(state, ref, batch), info


def abstract_train_step(cfg, devices=None):
    """``(jitted step, state, reference params, batch, mesh, info)``: the config's jitted train step
    and abstract (``jax.ShapeDtypeStruct``) inputs with their shardings; nothing is materialized."""
    import jax
    from flax import nnx

    from dpok_jax import losses, sharding
    from dpok_jax.models import Llama
    from dpok_jax.train.run import step_spec
    from dpok_jax.train.state import init_train_state, jit_train_step, make_optimizer, state_shardings
    from dpok_jax.train.step import ModelFns, make_train_step, split_kernel_params

    mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor, devices=devices)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % (n_batch * cfg.optim.grad_accum):
        raise ValueError(f"config train.batch_size={cfg.train.batch_size} must be divisible by the batch devices "
                         f"(mesh data x fsdp = {n_batch}) times optim.grad_accum={cfg.optim.grad_accum}")
    mcfg, notes = model_config(cfg)
    spec = step_spec(cfg)
    abstract_model = nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    fns = ModelFns(graphdef, rest)
    policy_shardings = sharding.param_shardings(mesh, params)
    if spec.kernel == "hmk" and spec.uses_kernel:
        kernel_init = losses.init_hmk_params()
    elif spec.kernel == "mixture" and spec.uses_kernel:
        kernel_init = losses.init_mixture_params()
    else:
        kernel_init = {}
    tx = make_optimizer(learning_rate=cfg.optim.learning_rate, kernel_learning_rate=cfg.optim.kernel_learning_rate,
                        warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps,
                        weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1, b2=cfg.optim.b2,
                        clip_norm=cfg.optim.clip_norm)
    train_params = {"policy": params, "kernel": kernel_init}
    shardings = state_shardings(mesh, train_params, policy_shardings, tx, cfg.train.seed)
    state = _abstract(jax.eval_shape(lambda p: init_train_state(p, tx, cfg.train.seed), train_params), shardings)
    ref = _abstract(params, policy_shardings)
    batch = abstract_batch(cfg, spec, mcfg.hidden_size, mesh)
    kernel_params = _kernel_params(spec, mcfg.hidden_size)
    step = jit_train_step(make_train_step(fns, spec, kernel_params, tx), mesh, shardings, policy_shardings,
                          sharding.batch_sharding(mesh), kernel_arrays=split_kernel_params(kernel_params)[0])
    held = 0
    if spec.reference == "precomputed":
        # The loop keeps the frozen reference's parameters on the devices; the step never reads them.
        held = _per_device_bytes(params, policy_shardings)
    name = cfg.model.path or cfg.model.preset
    info = dict(model=f"{name} ({_count(params) / 1e9:.2f}B params, {mcfg.param_dtype} params, "
                      f"{mcfg.dtype} compute)",
                mesh=dict(mesh.shape), devices=mesh.size, held=held, notes=notes, remat=mcfg.remat,
                model_flops=model_flops(mcfg, _count(params), 2 * cfg.train.batch_size * seq_len(cfg),
                                        seq_len(cfg)))
    return step, state, ref, batch, mesh, info


def model_flops(mcfg, n_params: int, tokens: int, seq: int) -> float:
    """Training FLOPs of the policy per step, the usual MFU numerator (PaLM appendix B):
    ``6 N tokens`` for the weight matmuls (N counted without the input embedding, a lookup) plus
    ``6 · 2 · L · T · N_heads · D`` per token for attention scores and values (causal masking not
    discounted). Excludes rematerialization and any reference forward pass."""
    lookup = mcfg.vocab_size * mcfg.hidden_size if not mcfg.tie_word_embeddings else 0
    attention = 12 * mcfg.num_layers * seq * mcfg.num_heads * mcfg.head_dim
    return float(6 * (n_params - lookup) * tokens + attention * tokens)


def _count(params) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def plan_config(cfg, *, config_name: str = "", device_kind: str | None = None, hbm_bytes: int | None = None,
                devices=None, headroom: float = 0.10) -> Plan:
    """Compile ``cfg``'s train step on ``devices`` (default: all of this process) and return its `Plan`."""
    t0 = time.perf_counter()
    lowered, info = lower_train_step(cfg, devices)
    compiled = lowered.compile()
    if hbm_bytes is None and device_kind is not None:
        if device_kind not in DEVICE_HBM:
            raise ValueError(f"--device-kind {device_kind!r}: expected one of {', '.join(DEVICE_HBM)}")
        hbm_bytes = DEVICE_HBM[device_kind]
    return _plan(cfg, compiled, info, config_name=config_name, device_kind=device_kind, hbm_bytes=hbm_bytes,
                 headroom=headroom, seconds=time.perf_counter() - t0)


def _plan(cfg, compiled, info, *, config_name, device_kind, hbm_bytes, headroom, seconds) -> Plan:
    mem = compiled.memory_analysis()
    return Plan(config=config_name, model=info["model"], mesh=info["mesh"], devices=info["devices"],
                device_kind=device_kind, hbm_bytes=hbm_bytes, batch_size=cfg.train.batch_size,
                seq_len=seq_len(cfg), grad_accum=cfg.optim.grad_accum, remat=info["remat"],
                argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                held_bytes=int(info["held"]), flops_per_device=_flops(compiled), compile_seconds=seconds,
                headroom=headroom, notes=info["notes"], model_flops=info.get("model_flops", float("nan")))


def _bytes_limits(mesh) -> list[int]:
    """``memory_stats()["bytes_limit"]`` of this process's devices in ``mesh`` (none on CPU)."""
    import jax

    stats = [d.memory_stats() or {} for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return [s["bytes_limit"] for s in stats if "bytes_limit" in s]


def check_fits(cfg, spec, train_step, state, ref_params, mesh, *, headroom: float = 0.0) -> Plan:
    """Before training on an accelerator: compile ``train_step`` (the jitted step `dpok train` runs)
    for the real devices ahead of time and raise ValueError with the plan when its per-device bytes
    exceed the device's memory (``memory_stats()["bytes_limit"]``). Returns the `Plan`.

    ``state`` and ``ref_params`` may be concrete or abstract; the batch is the config's largest.
    """
    import jax

    t0 = time.perf_counter()
    hidden = int(jax.tree.leaves(state.params["policy"]["final_norm"])[0].shape[0])
    batch = abstract_batch(cfg, spec, hidden, mesh)
    compiled = train_step.lower(state, ref_params, batch).compile()
    limits = _bytes_limits(mesh)
    held = _per_device_bytes(ref_params, jax.tree.map(lambda x: x.sharding, ref_params)) \
        if spec.reference == "precomputed" else 0
    info = dict(model=cfg.model.path or cfg.model.preset, mesh=dict(mesh.shape), devices=mesh.size,
                held=held, notes=[], remat=cfg.model.remat)
    plan = _plan(cfg, compiled, info, config_name="(dpok train)", device_kind=mesh.devices.flat[0].device_kind,
                 hbm_bytes=min(limits) if limits else None, headroom=headroom,
                 seconds=time.perf_counter() - t0)
    if plan.hbm_bytes is not None and plan.total_bytes > plan.hbm_bytes:
        raise ValueError("the train step does not fit the devices' memory; nothing was run:\n" + plan.table())
    return plan


# ------------------------------------------------------------------------------------------------
# Command line (`dpok plan`), possibly in a subprocess with its own fake-device count


def mesh_devices(cfg, devices: int | None) -> int:
    """Device count to plan on: ``--devices`` or the product of an explicit mesh."""
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if devices is not None:
        return devices
    if -1 in sizes:
        raise ValueError(f"config mesh {dict(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])} fills an axis "
                         "(-1): pass --devices N to plan it")
    return math.prod(sizes)


def run_plan(config: str | None, overrides: list[str], *, devices: int | None, device_kind: str | None,
             hbm_gib: float | None = None, headroom: float = 0.10, as_json: bool = False) -> Plan:
    """Load the config, compile on ``devices`` fake CPU devices (in a subprocess when this process
    already started JAX with fewer), print and return the `Plan`."""
    from dpok_jax.config import load_config

    cfg = load_config(config, overrides)
    n = mesh_devices(cfg, devices)
    hbm = int(hbm_gib * GIB) if hbm_gib is not None else None
    if "jax" not in sys.modules:
        # Nothing has started JAX in this process yet: give it the fake devices directly.
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() >= n:
        name = str(config) if config is not None else "(embedded default)"
        plan = plan_config(cfg, config_name=name, device_kind=device_kind, hbm_bytes=hbm,
                           devices=jax.devices()[:n], headroom=headroom)
    else:
        plan = _plan_in_subprocess(config, overrides, n, device_kind, hbm_gib, headroom)
    print(plan.to_json() if as_json else plan.table(), flush=True)
    return plan


def _plan_in_subprocess(config, overrides, n, device_kind, hbm_gib, headroom) -> Plan:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    cmd = [sys.executable, "-m", "dpok_jax.plan", "--json", "--devices", str(n), "--headroom", str(headroom)]
    if config is not None:
        cmd += ["--config", str(config)]
    if device_kind is not None:
        cmd += ["--device-kind", device_kind]
    if hbm_gib is not None:
        cmd += ["--hbm-gib", str(hbm_gib)]
    out = subprocess.run(cmd + list(overrides), env=env, capture_output=True, text=True)
    if out.returncode not in (0, 3):  # 3: planned, does not fit
        raise RuntimeError(f"plan subprocess failed ({out.returncode}):\n{out.stderr[-4000:]}")
    fields = json.loads(out.stdout.strip().splitlines()[-1])
    return Plan(**fields)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dpok plan` options (shared by the CLI and ``python -m dpok_jax.plan``)."""
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: the embedded default)")
    parser.add_argument("--devices", type=int, default=None,
                        help="fake devices to compile for (default: the product of the config's mesh)")
    parser.add_argument("--device-kind", default=None, choices=sorted(DEVICE_HBM),
                        help="compare per-device bytes with this accelerator's memory")
    parser.add_argument("--hbm-gib", type=float, default=None, help="device memory in GiB (overrides --device-kind's)")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of memory to keep free (0.10)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.grad_accum=4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpok_jax.plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    plan = run_plan(args.config, args.overrides, devices=args.devices, device_kind=args.device_kind,
                    hbm_gib=args.hbm_gib, headroom=args.headroom, as_json=args.json)
    return 0 if plan.fits in (True, None) else 3


if __name__ == "__main__":
    sys.exit(main())
