"""What a run folder promises: one writer at a time, and the settings it says it trained with.

- `RunFolderLock`: an exclusive `fcntl.flock` on `RUN_DIR/.lock` for the whole `dpok train`. A second
  process on the same folder gets an error naming the holder's pid and host. The kernel drops the lock
  when its process dies, so a lock left by a killed run never blocks the next one. An object store
  (`run_dir=gs://...`) has no such lock: there `.lock` is only a marker naming the holder, written at
  the start and deleted at the end; a marker found at the start is reported, not obeyed, since a
  killed run leaves one behind and nothing tells it from a live run's (two runs on one remote folder
  are the user's to avoid).
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

from etils import epath

from dpok_jax import config as config_lib
from dpok_jax import storage

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


def prepare_run_dir(run_dir: epath.PathLike) -> epath.Path:
    """Create `run_dir` (and parents) and check it is a writable folder; clear errors otherwise.
    (On an object store the write permission shows only at the first write.)"""
    path = epath.Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run_dir={str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"run_dir={str(path)!r} cannot be created: {err.strerror or err}") from None
    if storage.is_local(path) and not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"run_dir={str(path)!r} is not writable")
    return path


class RunFolderLock:
    """Exclusive lock on a run folder for the lifetime of one process (a context manager); on a
    remote folder only a marker file (see the module docstring)."""

    def __init__(self, run_dir: epath.PathLike):
        self.path = epath.Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._marker = False

    def acquire(self) -> "RunFolderLock":
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if not storage.is_local(self.path):
            if self.path.exists():
                holder = _holder(self.path.read_text())
                print(f"Warning: {self.path} names another dpok process ({holder}); a remote run "
                      "folder cannot be locked: if that run is still going, stop one of the two.",
                      flush=True)
            self.path.write_text(json.dumps(info))
            self._marker = True
            return self
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
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._marker:
            self.path.unlink(missing_ok=True)
            self._marker = False
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
        return _holder(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return "holder unknown"


def _holder(text: str) -> str:
    try:
        info = json.loads(text or "{}")
    except ValueError:
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


def check_resume_config(cfg: config_lib.Config, run_dir: epath.PathLike, *, allow: tuple[str, ...] = ()
                        ) -> None:
    """Refuse to continue a run in `run_dir` with settings that change its trajectory (the folder's
    `config.yaml` is then left as it was); print the accepted changes."""
    for key in allow:
        if key not in ALLOWED_WITH_FLAG:
            raise RunFolderError(f"--allow-change {key}: only {', '.join(ALLOWED_WITH_FLAG)} may be "
                                 "changed on resume (operational settings need no flag)")
    path = epath.Path(run_dir) / CONFIG_FILE
    if path.exists():
        try:
            with storage.local_copy(path) as local:
                old = config_lib.load_config(local)
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


def record_config(cfg: config_lib.Config, run_dir: epath.PathLike) -> None:
    """Write `cfg` as the folder's `config.yaml` (whole: `storage.write_text`), after
    `check_resume_config` passed."""
    storage.write_text(epath.Path(run_dir) / CONFIG_FILE, config_lib.to_yaml(cfg))
