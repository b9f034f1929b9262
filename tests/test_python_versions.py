"""The pinned stack installs and trains on every Python that `requires-python` admits (3.11-3.13;
TPU VM images may ship 3.12 or 3.13). Slow: a fresh virtual environment and a full install from the
package index per interpreter; an interpreter that is not on this machine is skipped with the reason."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _interpreter(version: str) -> str | None:
    """A working `python<version>`: a pyenv install, else one on PATH (a pyenv shim of an inactive
    version is on PATH but does not run)."""
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    candidates += [p for p in [shutil.which(f"python{version}")] if p]
    for python in candidates:
        if subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
            return python
    return None


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_install_and_train_on_python(tmp_path, version):
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine (PATH or ~/.pyenv/versions)")
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        pytest.skip(f"the suite itself runs on {version}")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True,
                         text=True, timeout=1800)
    if pip.returncode and "Could not fetch URL" in pip.stderr + pip.stdout:
        pytest.skip("the package index is unreachable")
    assert pip.returncode == 0, pip.stderr[-3000:]
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [str(venv / "bin" / "dpok"), "train", f"run_dir={run_dir}", "train.steps=2", "sft.steps=2",
         "train.batch_size=8", "sft.batch_size=8", "train.progress=false", "train.compare_with_dpo=false",
         "data.synthetic_train_per_task=8", "data.synthetic_eval_per_task=2", "train.eval_every=0"],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["eval/accuracy"] <= 1.0
    version_out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.version)"],
                                 capture_output=True, text=True, check=True)
    assert version_out.stdout.startswith(version)
