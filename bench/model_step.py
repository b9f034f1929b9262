"""Forward+backward throughput of the Flax Llama vs transformers' PyTorch Llama, on CPU.

Same config, same batch, float32, one process: each step is the summed next-token cross entropy
and its gradient with respect to every parameter. Prints tokens/second for both and their ratio.

    .venv/bin/python bench/model_step.py                       # tiny and smollm2_135m
    .venv/bin/python bench/model_step.py --configs tiny --batch 8 --seq 128 --steps 10
"""

from __future__ import annotations

import argparse
import os
import time

# A CPU benchmark by design: pin JAX to the host so it compares like with like against torch CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from dpok_jax.models import ModelConfig, init_llama  # noqa: E402


def _batch(cfg: ModelConfig, batch: int, seq: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[: batch // 2, : seq // 4] = 0  # left-pad half the rows: masks are part of the work
    return ids, mask


def jax_step_time(cfg: ModelConfig, ids: np.ndarray, mask: np.ndarray, steps: int) -> float:
    model = init_llama(cfg, seed=0)
    graphdef, state = nnx.split(model)

    def loss(state, ids, mask):
        logits = nnx.merge(graphdef, state)(ids, mask)
        logp = jax.nn.log_softmax(logits[:, :-1])
        target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(target * mask[:, 1:])

    step = jax.jit(jax.value_and_grad(loss))
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    jax.block_until_ready(step(state, ids, mask))  # compile + warm up
    start = time.perf_counter()
    for _ in range(steps):
        out = step(state, ids, mask)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def torch_step_time(cfg: ModelConfig, ids: np.ndarray, mask: np.ndarray, steps: int) -> float:
    hf = cfg.to_hf()
    hf.pop("dtype")
    # sdpa is transformers' default (and fastest) attention on CPU.
    config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().train()
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    positions = torch.clamp(torch.cumsum(mask_t, -1) - 1, min=0)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        target = torch.gather(logp, -1, ids_t[:, 1:, None])[..., 0]
        loss = -(target * mask_t[:, 1:]).sum()
        loss.backward()

    step()  # warm up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "smollm2_135m"])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 for tiny, 2 otherwise")
    parser.add_argument("--seq", type=int, default=None, help="default: 128 for tiny, 64 otherwise")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 20 for tiny, 3 otherwise")
    parser.add_argument("--remat", default="none")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} devices), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    header = f"{'config':<14}{'batch x seq':>12}{'jax tok/s':>12}{'torch tok/s':>13}{'jax/torch':>11}"
    print(header)
    print("-" * len(header))
    for name in args.configs:
        small = name == "tiny"
        batch = args.batch or (8 if small else 2)
        seq = args.seq or (128 if small else 64)
        steps = args.steps or (20 if small else 3)
        cfg = getattr(ModelConfig, name)(remat=args.remat)
        ids, mask = _batch(cfg, batch, seq)
        t_jax = jax_step_time(cfg, ids, mask, steps)
        t_torch = torch_step_time(cfg, ids, mask, steps)
        tokens = batch * seq
        print(f"{name:<14}{f'{batch} x {seq}':>12}{tokens / t_jax:>12.0f}{tokens / t_torch:>13.0f}"
              f"{t_torch / t_jax:>11.2f}")


if __name__ == "__main__":
    main()
