"""SIGINT/SIGTERM in every phase of `dpok train` (real subprocesses): the phase saves, the exit status
says it was interrupted, and rerunning the same command finishes the run exactly as an
uninterrupted one (losses of every logged window, SFT warm-up included)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpok_jax.train.metrics_log import read_metrics

ARGS = [
    "data.synthetic_train_per_task=16", "data.synthetic_eval_per_task=4",
    "train.batch_size=8", "train.progress=false", "train.log_every=2",
    "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
    "loss.chunk_size=32", "data.max_length=96", "data.max_prompt_length=48",
    "data.buckets=[96]", "train.eval_every=0", "train.checkpoint_every=1",
    "sft.steps=12", "sft.batch_size=8", "train.steps=9", "train.compare_with_dpo=true",
    "loss.gamma=0.1", "loss.kernel=rbf", "loss.eta=0",
]


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _start(run_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dpok_jax.cli", "train", f"run_dir={run_dir}", *ARGS]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env())


def _steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _interrupt_when(proc, ready, sig, log: Path, timeout=300.0) -> int:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"dpok train ended (rc {proc.returncode}) before the phase:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"phase not reached in {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


@pytest.mark.slow  # five real `dpok train` processes: minutes on CI's 2 cores
def test_every_phase_saves_on_signal_and_resumes_exactly(tmp_path):
    run_dir = tmp_path / "cut"
    phases = [
        ("sft", signal.SIGTERM, lambda: _steps(run_dir / "sft_checkpoints")),
        ("main", signal.SIGINT, lambda: _steps(run_dir / "checkpoints")),
        ("baseline", signal.SIGTERM, lambda: _steps(run_dir / "dpo_baseline" / "checkpoints")),
    ]
    for i, (name, sig, ready) in enumerate(phases):
        log = tmp_path / f"{name}.log"
        rc = _interrupt_when(_start(run_dir, log), ready, sig, log)
        text = log.read_text()
        assert rc == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], (name, rc, text)
        assert "Traceback" not in text, text
        assert f"{sig.name} received" in text
    # The SFT warm-up was resumed (not restarted), then the rest ran to the end.
    log = tmp_path / "final.log"
    proc = _start(run_dir, log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["steps"] == 9
    assert summary["baseline/steps"] == 9

    # Against one uninterrupted run of the same command.
    full = tmp_path / "full"
    log = tmp_path / "full.log"
    assert _start(full, log).wait(timeout=600) == 0, log.read_text()
    for sub in ("", "dpo_baseline"):
        a = read_metrics(full / sub, "train")
        b = read_metrics(run_dir / sub, "train")
        assert [r["step"] for r in b] == [r["step"] for r in a] == [2, 4, 6, 8, 9]
        np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a],
                                   rtol=1e-6, atol=1e-7)
    assert "SFT warm-up resumed at step" in (tmp_path / "main.log").read_text()
    assert json.loads((full / "summary.json").read_text())["eval/accuracy"] == \
        pytest.approx(summary["eval/accuracy"], abs=1e-9)
