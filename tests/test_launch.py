"""The launch scripts: the local multi-process launcher propagates a failure and runs from anywhere."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch")),
                         ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_local_multiprocess_propagates_the_first_failure_from_any_directory(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    run_dir = tmp_path / "runs" / "mp"
    out = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "loss.kernel=nope",
                          f"run_dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert "failed (exit 2)" in out.stderr
    # The first process to fail has written its error; the other may have been stopped before it
    # wrote anything (the script kills the rest on the first failure).
    logs = [(tmp_path / "runs" / f"mp.process{i}.log").read_text() for i in range(2)]
    assert any("loss.kernel" in log for log in logs), logs
