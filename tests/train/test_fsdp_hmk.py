"""fsdp=8 with HMK on 8 fake CPU devices: runs to the end (it used to abort in a collective
deadlock) and equals the one-device run."""

import os

import jax
import numpy as np

from dpok_jax.config import load_config
from dpok_jax.train import run as run_lib
from dpok_jax.train.metrics_log import read_metrics
from dpok_jax.xla_flags import CPU_COLLECTIVE_ORDER_FLAG, ensure_cpu_collective_order

SMALL = [
    "data.synthetic_train_per_task=16", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.log_every=1",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]", "train.eval_every=0", "train.steps=3", "sft.steps=0",
    "loss.gamma=0.1", "loss.kernel=hmk", "loss.eta=0.01",
]


def test_cpu_collective_order_flag_is_set_once_and_respects_the_user():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    ensure_cpu_collective_order(env)
    ensure_cpu_collective_order(env)
    assert env["XLA_FLAGS"].count("concurrency_optimized_scheduler") == 1
    assert CPU_COLLECTIVE_ORDER_FLAG in env["XLA_FLAGS"]
    mine = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    ensure_cpu_collective_order(mine)
    assert mine["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert CPU_COLLECTIVE_ORDER_FLAG in os.environ["XLA_FLAGS"]  # the tests run with it


def test_fsdp8_with_hmk_trains_and_equals_one_device(tmp_path):
    one = load_config(None, [f"run_dir={tmp_path / 'one'}", *SMALL])
    run_lib.run(one, devices=jax.devices()[:1])
    fsdp = load_config(None, [f"run_dir={tmp_path / 'fsdp'}", *SMALL, "mesh.fsdp=8"])
    run_lib.run(fsdp, devices=jax.devices()[:8])
    a, b = read_metrics(one.run_dir, "train"), read_metrics(fsdp.run_dir, "train")
    assert len(a) == len(b) == 3
    for key in ("loss", "embedding/score", "hmk/lambda_rbf"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=2e-5, atol=1e-6,
                                   err_msg=key)
