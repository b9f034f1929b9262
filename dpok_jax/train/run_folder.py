"""What a run folder promises: one writer at a time, and the settings it says it trained with.

- `RunFolderLock`: an exclusive `fcntl.flock` on `RUN_DIR/.lock` for the whole `dpok train`. A second
  process on the same folder gets an error naming the holder's pid and host. The kernel drops the lock
  when its process dies, so a lock left by a killed run never blocks the next one.
- `check_resume_config`: a folder that already holds a run (its `config.yaml`) may only be resumed
  with settings that leave the trajectory unchanged. Operational settings (logging, checkpoint
  cadence, mesh, progress bars) may change freely; a few intentional changes (`train.steps` to extend a
  run) need `--allow-change KEY`; anything else is an error that lists the differing keys, and the
  folder's `config.yaml` is left as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dpok_jax import config as config_lib

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"

# Settings that never change what is trained: how it is logged, saved, shown, or laid out on devices
# (checkpoints reshard on restore), and where caches live.
OPERATIONAL = ("run_dir", "train.progress", "train.log_every", "train.eval_every",
               "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite",
               "reference.cache_dir", "mesh.")
# Changes a user may make on purpose with `--allow-change KEY`: they change what the run does from
# here on (more steps move the learning-rate schedule; other evaluation data; an added baseline).
ALLOWED_WITH_FLAG = ("train.steps", "data.max_eval_examples", "train.compare_with_dpo")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (the CLI exits with status 2)."""


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Create `run_dir` (and parents) and check it is a writable folder; clear errors otherwise."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run_dir={str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"run_dir={str(path)!r} cannot be created: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"run_dir={str(path)!r} is not writable")
    return path


class RunFolderLock:
    """Exclusive lock on a run folder for the lifetime of one process (a context manager)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.path.parent} is in use by another dpok process ({holder}); "
                "wait for it to finish or use another run_dir") from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('started')}"


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def _is(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def config_differences(old: config_lib.Config, new: config_lib.Config) -> dict[str, tuple]:
    """`{dotted key: (old, new)}` for every setting that differs."""
    a, b = _flatten(config_lib.to_dict(old)), _flatten(config_lib.to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(cfg: config_lib.Config, run_dir: Path, *, allow: tuple[str, ...] = ()
                        ) -> None:
    """Refuse to continue a run in `run_dir` with settings that change its trajectory (the folder's
    `config.yaml` is then left as it was); print the accepted changes."""
    for key in allow:
        if key not in ALLOWED_WITH_FLAG:
            raise RunFolderError(f"--allow-change {key}: only {', '.join(ALLOWED_WITH_FLAG)} may be "
                                 "changed on resume (operational settings need no flag)")
    path = Path(run_dir) / CONFIG_FILE
    if path.is_file():
        try:
            old = config_lib.load_config(path)
        except (ValueError, FileNotFoundError) as err:
            raise RunFolderError(f"{path} (the settings this run folder was trained with) cannot "
                                 f"be read: {err}") from None
        diffs = config_differences(old, cfg)
        refused = {k: v for k, v in diffs.items() if not _is(k, OPERATIONAL) and k not in allow}
        if refused:
            lines = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in refused.items())
            hint = [k for k in refused if k in ALLOWED_WITH_FLAG]
            extra = (f" (to change {', '.join(hint)} on purpose, pass "
                     + " ".join(f"--allow-change {k}" for k in hint) + ")") if hint else ""
            raise RunFolderError(
                f"run folder {run_dir} was trained with other settings; resuming would silently "
                f"change the run. Differing: {lines}. Use a new run_dir{extra}.")
        if diffs:
            print("Resuming with changed settings: "
                  + "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in diffs.items()), flush=True)


def record_config(cfg: config_lib.Config, run_dir: Path) -> None:
    """Write `cfg` as the folder's `config.yaml` (atomically), after `check_resume_config` passed."""
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(config_lib.to_yaml(cfg))
    tmp.replace(path)
