"""Host <-> device movement that is correct on one process and on many (multi-host TPU/GPU).

- `to_global`: each process's numpy rows of a batch -> one global `jax.Array` sharded over the batch
  axes (`jax.make_array_from_process_local_data`).
- `to_host`: a global array -> numpy holding every process's values, on every process
  (`multihost_utils.process_allgather`; a plain read on one process).
- `host_rows`: a host-local numpy batch -> every process's rows in global order, on every process.
- `check_batch_layout`: the batch axes must give each process its own contiguous block of the global
  batch, the block the data pipeline feeds it. Otherwise (say 2 processes on a `tensor=8` mesh, where
  the batch is replicated over both) each process would feed different rows into what JAX treats as
  one array, and the processes would silently train different models.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the batch axis (multi-host safe)."""
    if "_pack" in batch:
        raise ValueError("a batch planned for packing reached the devices unpacked: pass it through "
                         "dpok_jax.data.packing.apply_packing first")
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathered across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_rows(batch: dict, sharding: NamedSharding) -> dict:
    """Every process's rows of a host-local numpy batch, in global batch order, on every process
    (the same order as `to_host` gives the outputs of a step on `to_global(batch)`)."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in batch.items()}
    return {k: to_host(v) for k, v in to_global(batch, sharding).items()}


def check_batch_layout(sharding: NamedSharding, global_batch: int) -> None:
    """Raise unless process `i` holds exactly rows `[i*b, (i+1)*b)` of the global batch
    (`b = global_batch / process_count`), which is what each process's batcher feeds it."""
    count = jax.process_count()
    if count == 1:
        return
    mesh = sharding.mesh
    spans: dict[int, set] = {i: set() for i in range(count)}
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        rows = range(global_batch)[index[0]]
        spans[device.process_index].update(rows)
    local = global_batch // count
    for i in range(count):
        if spans[i] != set(range(i * local, (i + 1) * local)):
            batch_axes = [a for a in ("data", "fsdp") if a in mesh.shape]
            ways = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
            raise ValueError(
                f"the mesh's batch axes ({' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes)}) "
                f"split the batch {ways} ways, which does not give each of the {count} processes its "
                f"own block of rows (process {i} would hold {len(spans[i])} of {global_batch} rows, "
                f"expected rows {i * local}..{(i + 1) * local - 1}): the processes would feed different "
                "data into one batch and train different models. Make mesh.data x mesh.fsdp a "
                "multiple of the number of processes (put mesh.tensor within a host).")
