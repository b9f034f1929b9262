"""Run-folder files on a local disk or in an object store (`gs://`), through `etils.epath`.

A run folder (`run_dir`) may be a local path or a URL such as `gs://bucket/runs/x`. Every read and
write of its own files (config.yaml, metrics.jsonl, summary.json, the reference cache, reports) goes
through `epath.Path`, which handles both; orbax writes the checkpoints through the same API. What an
object store cannot do, and what is done instead:

- No atomic rename and no partial writes: on a local disk a file is written to a temporary beside it
  and renamed over the old one; in an object store the object is written whole (an object becomes
  visible only when its upload completes, so a reader never sees half of it).
- No append: `metrics.jsonl` is rewritten whole on remote paths (`MetricsLog`).
- No OS file locks: `RunFolderLock` is an exclusive lock on local paths only; on remote paths it
  is a marker file (see `dpok_jax.train.run_folder`).

Remote paths need the backend etils uses (`gcsfs` for `gs://`, or TensorFlow's `tf.io.gfile`) and,
for orbax, `google-cloud-storage`; neither is a dependency of this package.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import tempfile
from typing import Iterator

import numpy as np
from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_local(path: epath.PathLike) -> bool:
    """True for a path on this machine's file system; False for a URL (`gs://...`).

    >>> is_local("runs/x"), is_local("/tmp/x"), is_local("gs://bucket/x")
    (True, True, False)
    """
    return not _URL.match(os.fspath(path))


def run_path(path: epath.PathLike) -> epath.Path:
    """`path` as an `epath.Path`; a local one made absolute (orbax needs absolute paths).

    >>> str(run_path("gs://bucket/run") / "checkpoints")
    'gs://bucket/run/checkpoints'
    """
    if is_local(path):
        return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    return epath.Path(path)


def write_bytes(path: epath.PathLike, data: bytes) -> None:
    """Write a whole file so that a reader sees the old or the new contents, never a mixture."""
    path = epath.Path(path)
    if not is_local(path):
        path.write_bytes(data)  # an object appears whole when its upload completes
        return
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: epath.PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def save_npz(path: epath.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez` to a local or remote path, written whole (`write_bytes`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def load_npz(path: epath.PathLike) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file at a local or remote path."""
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
        return {k: f[k] for k in f.files}


@contextlib.contextmanager
def local_copy(path: epath.PathLike) -> Iterator[str]:
    """A local file name holding `path`'s contents (the path itself when it is local), for readers
    that only open local files (`config.load_config`)."""
    if is_local(path):
        yield os.fspath(path)
        return
    path = epath.Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, path.name)
        with open(local, "wb") as f:
            f.write(path.read_bytes())
        yield local
