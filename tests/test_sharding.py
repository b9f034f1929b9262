"""Mesh construction, the rules table, batch sharding (8 fake CPU devices from conftest)."""

import jax
import numpy as np
import pytest
from flax import nnx

from dpok_jax.sharding import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_batch,
)


def test_fill_axis_and_axis_types():
    assert jax.device_count() == 8
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(data=-1, fsdp=1, tensor=4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_one_device_mesh():
    mesh = make_mesh(devices=jax.devices()[:1])
    assert mesh.size == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fsdp=3), "3 slots but there are 8 devices"),
        (dict(data=3, fsdp=-1), "not divisible by 3"),
        (dict(data=-1, fsdp=-1), "at most one"),
        (dict(fsdp=0), "positive int or -1"),
        (dict(tensor=2.0), "positive int or -1"),
    ],
)
def test_bad_mesh_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)


def test_rules_table_is_the_single_source():
    rules = dict(LOGICAL_AXIS_RULES)
    assert len(rules) == len(LOGICAL_AXIS_RULES)  # no duplicate names
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == jax.P(None, "fsdp", "tensor", None)
    with pytest.raises(ValueError, match="'nonsense'"):
        logical_to_spec(("nonsense",))


def test_param_shardings_uses_the_out_sharding_metadata():
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros((8, 6), np.float32), out_sharding=("embed", "mlp"), eager_sharding=False)
            self.bad = nnx.Param(np.zeros((3,), np.float32), out_sharding=("mlp",), eager_sharding=False)

    mesh = make_mesh(fsdp=4, tensor=2)
    state = nnx.state(Tiny())
    with pytest.raises(ValueError, match=r"parameter bad \(3,\): dimension 'mlp'=3 is not divisible"):
        param_shardings(mesh, state)
    state = nnx.state(nnx.Dict(w=nnx.Param(np.zeros((8, 6), np.float32), out_sharding=("embed", "mlp"),
                                            eager_sharding=False)))
    shardings = param_shardings(mesh, state)
    assert jax.tree.leaves(shardings)[0].spec == jax.P("fsdp", "tensor")

    unknown = nnx.state(nnx.Dict(w=nnx.Param(np.zeros((8,), np.float32), out_sharding=("foo",),
                                              eager_sharding=False)))
    with pytest.raises(ValueError, match="'foo' has no entry"):
        param_shardings(mesh, unknown)


def test_batch_sharding_splits_the_leading_dim_over_data_and_fsdp():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert batch_sharding(mesh).spec == jax.P(("data", "fsdp"))
    batch = shard_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh)
    assert batch["x"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(24).reshape(8, 3))
    with pytest.raises(ValueError, match=r"\['x'\] with shape \(6, 3\).*divisible by the data-parallel size 4"):
        shard_batch({"x": np.zeros((6, 3))}, mesh)
