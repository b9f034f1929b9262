"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters are annotated with logical names (``"vocab"``, ``"embed"``, ``"heads"``, ...) through
NNX ``out_sharding`` metadata; `LOGICAL_AXIS_RULES` below is the only place that decides which mesh
axis each name lands on (MaxText's ``logical_axis_rules``). Resolution uses Flax's own mechanism
(`nnx.logical_axis_rules` + `nnx.get_partition_spec`).

Mesh axes: ``data`` (pure data parallel: parameters replicated), ``fsdp`` (data parallel with
parameters sharded along ``embed``, ZeRO-3 style), ``tensor`` (Megatron-style: heads, MLP width and
vocab split). A parameter dimension that its mesh axes do not divide is an error (`param_shardings`
raises, naming the parameter), never a silent fall back to replication.

Activations are constrained through the same table (``activation_*`` names, `constrain`): the batch
over ``data`` x ``fsdp``, heads and MLP width over ``tensor``. With parameters sharded over ``fsdp``
and activations sharded over the batch, XLA all-gathers each layer's weights and reduce-scatters
their gradients (MaxText's fsdp) instead of all-reducing full-batch activations. The whole train
state (optimizer moments like their parameters, counters replicated) comes from
`train_state_shardings`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Activations ([B, T, ...] inside the model). Sequence stays unsharded (no context parallelism).
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_embed_lookup", "tensor"),  # the embedding table's hidden axis while looking tokens up
)

# The mesh that `constrain` resolves activation specs against, set by `activation_mesh` around
# tracing (a Python context, so it holds inside jit tracing and needs no JAX global state).
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh",
                                                                              default=None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all); one size may be -1 to fill.

    Raises ValueError (before anything compiles) when the sizes do not multiply to the device count.

    >>> dict(make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.devices()[:1]).shape)
    {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} must be a positive int or -1, got {size!r}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {fill}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if n % known:
            raise ValueError(
                f"mesh {sizes} cannot fill {fill[0]!r}: {n} devices are not divisible by {known}"
            )
        sizes[fill[0]] = n // known
    elif known != n:
        raise ValueError(f"mesh {sizes} has {known} slots but there are {n} devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: shardings are propagated by the compiler from parameters and batch, so the model
    # code needs no per-op annotations.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in names)


def logical_to_spec(axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The PartitionSpec for a tuple of logical axis names.

    >>> logical_to_spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    True
    """
    table = dict(rules)
    for name in axes:
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules table")
    return PartitionSpec(*(table[name] if name is not None else None for name in axes))


def param_shardings(mesh: Mesh, state: Any, *, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for an NNX state (concrete or from `nnx.eval_shape`), same tree structure.

    Each Variable's ``out_sharding`` logical names are resolved through ``rules``. Raises ValueError
    naming the parameter when a logical name is not in the table or a dimension is not divisible by
    the size of the mesh axes it maps to.
    """
    table = dict(rules)

    def check(path, var):
        axes = var.get_metadata().get("out_sharding") or ()
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        for axis in axes:
            if axis is not None and axis not in table:
                raise ValueError(f"parameter {name}: logical axis {axis!r} has no entry in the sharding rules")
        for dim, axis in zip(var.shape, axes):
            size = _axis_size(mesh, table.get(axis))
            if dim % size:
                raise ValueError(
                    f"parameter {name} {tuple(var.shape)}: dimension {axis!r}={dim} is not divisible by "
                    f"mesh axes {table[axis]!r} of size {size} (mesh {dict(mesh.shape)})"
                )
        return var

    jax.tree_util.tree_map_with_path(check, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def shard_model(model: nnx.Module, mesh: Mesh, *, rules=LOGICAL_AXIS_RULES) -> nnx.Module:
    """Place ``model``'s state on ``mesh`` per the rules, in place; returns the model."""
    state = nnx.state(model)
    shardings = param_shardings(mesh, state, rules=rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, *, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a batch array: leading dimension over the ``batch`` rule (``data`` x ``fsdp``)."""
    return NamedSharding(mesh, PartitionSpec(dict(rules)["batch"]))


def shard_batch(batch: Any, mesh: Mesh, *, rules=LOGICAL_AXIS_RULES) -> Any:
    """`jax.device_put` every array of ``batch`` with `batch_sharding`, checking divisibility first."""
    sharding = batch_sharding(mesh, rules=rules)
    size = _axis_size(mesh, dict(rules)["batch"])

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % size:
            raise ValueError(
                f"batch entry {jax.tree_util.keystr(path)} with shape {x.shape}: leading dimension must be "
                f"divisible by the data-parallel size {size} (mesh {dict(mesh.shape)})"
            )
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(put, batch)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, rules=LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Within this context (while tracing), `constrain` pins activations to ``mesh`` per ``rules``."""
    token = _ACTIVATION_MESH.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def activation_spec(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The PartitionSpec of an activation of ``shape`` with logical ``axes`` on ``mesh``.

    A dimension that its mesh axes do not divide (a batch of 1 while sampling, say) stays
    unsharded: activation constraints are layout requests; parameters and the batch are checked
    strictly elsewhere (`param_shardings`, `shard_batch`).

    >>> mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    >>> activation_spec((4, 3, 8), ("activation_batch", "activation_length", "activation_embed"), mesh)
    P(('data', 'fsdp'), None, None)
    """
    if len(shape) != len(axes):
        raise ValueError(f"activation of shape {tuple(shape)} given {len(axes)} logical axes {tuple(axes)}")
    spec = logical_to_spec(axes, rules)
    return PartitionSpec(*(entry if dim % _axis_size(mesh, entry) == 0 else None
                           for dim, entry in zip(shape, spec)))


def shard_attention(local: Callable, q: jax.Array, k: jax.Array, v: jax.Array, *rows: jax.Array,
                    q_axes: Sequence[str], kv_axes: Sequence[str]) -> jax.Array:
    """``local(q, k, v, *rows)`` on each device's rows and heads inside an `activation_mesh` (a
    `jax.shard_map`: rows over the batch axes, heads over tensor when the query and key/value head
    counts both divide, so every GQA group stays on one device); called as it is without one.
    For attention that XLA cannot partition itself (a Pallas kernel) or should not (a loop over
    rows). q ``[B, T, N, D]``, k/v ``[B, T, K, D]`` with logical axes ``q_axes`` / ``kv_axes``;
    ``rows``: ``[B, T]`` per-row arrays (masks, segment ids)."""
    current = _ACTIVATION_MESH.get()
    if current is None:
        return local(q, k, v, *rows)
    mesh, rules = current
    q_spec = activation_spec(q.shape, q_axes, mesh, rules)
    kv_spec = activation_spec(k.shape, kv_axes, mesh, rules)
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
    qkv_spec = PartitionSpec(q_spec[0], None, heads, None)
    row_spec = PartitionSpec(q_spec[0], None)
    mapped = jax.shard_map(local, mesh=mesh, out_specs=qkv_spec, check_vma=False,
                           in_specs=(qkv_spec, qkv_spec, qkv_spec, *(row_spec for _ in rows)))
    return mapped(q, k, v, *rows)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`jax.lax.with_sharding_constraint` of ``x`` to its logical ``axes`` inside `activation_mesh`;
    the identity outside one (a model used without a mesh)."""
    current = _ACTIVATION_MESH.get()
    if current is None:
        return x
    mesh, rules = current
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(x.shape, axes, mesh, rules)))


def train_state_shardings(mesh: Mesh, state: Any, params_shardings: Any) -> Any:
    """Shardings for a whole train state (same tree as ``state``, concrete or abstract).

    ``state`` has ``params`` and ``opt_state`` (a `dpok_jax.train.state.TrainState`);
    ``params_shardings`` is the tree of ``state.params``'s shardings. Every optimizer-state leaf
    whose key path ends with a parameter's path and has that parameter's shape (Adam's ``mu`` and
    ``nu``, any optax moment) gets that parameter's sharding; scalars (step, counters, flags) and
    the rng are replicated. Any other leaf with a dimension is an error naming it, so a new
    optimizer cannot silently replicate a parameter-sized buffer on every device.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    param_paths, _ = jax.tree_util.tree_flatten_with_path(state.params)
    shard_leaves = jax.tree.leaves(params_shardings)
    if len(param_paths) != len(shard_leaves):
        raise ValueError(f"params_shardings has {len(shard_leaves)} leaves, state.params {len(param_paths)}")
    table = {jax.tree_util.keystr(path): (tuple(leaf.shape), sh)
             for (path, leaf), sh in zip(param_paths, shard_leaves)}

    def pick(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(path)):
            hit = table.get(jax.tree_util.keystr(path[start:]))
            if hit is not None and hit[0] == shape:
                return hit[1]
        if len(shape) == 0:
            return replicated
        raise ValueError(f"optimizer state leaf {jax.tree_util.keystr(path)} {shape} matches no parameter: "
                         "give it a sharding rule before training on a mesh")

    return state.replace(
        step=replicated,
        params=params_shardings,
        opt_state=jax.tree_util.tree_map_with_path(pick, state.opt_state),
        rng=replicated,
    )
