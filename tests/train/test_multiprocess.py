"""Two real `jax.distributed` processes on localhost (4 fake CPU devices each), as on a 2-host pod.

SFT warm-up + HMK + hybrid + KL penalty + precomputed reference on data=2 x fsdp=2 x tensor=2: both
processes are killed (SIGKILL) mid-run and restarted, and the resumed two-process run must log the
same losses as one uninterrupted process on 8 fake devices, with both processes agreeing.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dpok_jax.config import load_config
from dpok_jax.train import run as run_lib
from dpok_jax.train.metrics_log import read_metrics

ARGS = [
    "data.synthetic_train_per_task=16", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.log_every=1",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=2", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]", "train.eval_every=0", "train.checkpoint_every=1",
    "sft.steps=2", "sft.batch_size=8", "train.steps=4", "train.compare_with_dpo=false",
    "loss.gamma=0.1", "loss.kernel=hmk", "loss.eta=0.01", "loss.alpha=0.1", "loss.divergence=kl",
    "reference.mode=precomputed", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
    # Bucket rows: what multi-host runs get on GPU and TPU (`data.pack_rows: auto`). CPU's tight rows
    # plan from every host's lengths alike (tests/train/test_packing.py's property test) and cost
    # this test a compile per row length (1:44 -> 2:39).
    "data.pack_rows=bucket",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, tag: str) -> list:
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = []
    for i in range(2):
        log = run_dir.parent / f"{tag}.p{i}.log"
        cmd = [sys.executable, "-m", "dpok_jax.cli", "train", f"run_dir={run_dir}", *ARGS,
               "mesh.distributed=true", f"mesh.coordinator_address=127.0.0.1:{port}",
               "mesh.num_processes=2", f"mesh.process_id={i}"]
        procs.append((subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env),
                      log))
    return procs


def _logs(procs) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in procs)


def _wait(procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc, _ in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            pytest.fail(f"two-process run did not finish in {timeout} s:\n{_logs(procs)}")
    return codes


def test_two_processes_train_resume_and_match_one_process(tmp_path):
    run_dir = tmp_path / "two"
    procs = _launch(run_dir, "first")
    deadline = time.monotonic() + 600
    ckpts = run_dir / "checkpoints"
    while not (ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in ckpts.iterdir())):
        if any(p.poll() is not None for p, _ in procs) or time.monotonic() > deadline:
            for p, _ in procs:
                p.kill()
            pytest.fail(f"no step-2 checkpoint from the two-process run:\n{_logs(procs)}")
        time.sleep(0.05)
    for p, _ in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs, 60)

    procs = _launch(run_dir, "resumed")
    assert _wait(procs, 600) == [0, 0], _logs(procs)
    assert "Resumed from" in procs[0][1].read_text()

    one = load_config(None, [f"run_dir={tmp_path / 'one'}", *ARGS])
    run_lib.run(one, devices=jax.devices()[:8])
    a = read_metrics(one.run_dir, "train")
    b = read_metrics(run_dir, "train")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margins", "divergence/kl", "hmk/lambda_rbf"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    # Both processes saw the same model: the same held-out scores and last logged losses.
    s0 = json.loads((run_dir / "summary.json").read_text())
    s1 = json.loads((run_dir / "summary.process1.json").read_text())
    assert s0.keys() == s1.keys()
    for key in s0:
        if isinstance(s0[key], float):
            assert s0[key] == pytest.approx(s1[key], rel=1e-6, abs=1e-7), key
    assert s0["steps"] == 4 and not s0["interrupted"]


def test_batch_axes_that_do_not_span_the_processes_are_refused_before_any_work(tmp_path):
    """2 processes x 4 devices on tensor=8: the batch would be replicated over both processes, each
    feeding its own rows into it (they silently trained different models); now a clear error."""
    run_dir = tmp_path / "tensor8"
    global ARGS
    saved = ARGS
    ARGS = [a for a in saved if not a.startswith("mesh.")] + ["mesh.data=1", "mesh.fsdp=1",
                                                              "mesh.tensor=8"]
    try:
        procs = _launch(run_dir, "tensor8")
        codes = _wait(procs, 300)
    finally:
        ARGS = saved
    assert codes == [2, 2], _logs(procs)
    for _, log in procs:
        text = log.read_text()
        assert "the processes would feed different data into one batch" in text, text
        assert "Traceback" not in text
    assert not (run_dir / "checkpoints").exists()
