"""The whole TrainState is sharded by the rules table (8 fake CPU devices from conftest).

Adam's ``mu``/``nu`` must be sharded exactly like their parameters (ZeRO-3 with fsdp), the kernel
weights, counters and rng replicated. Before issue 12 the moments were replicated on every device.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpok_jax import losses
from dpok_jax.models import Llama, ModelConfig
from dpok_jax.sharding import make_mesh, param_shardings, train_state_shardings
from dpok_jax.train.state import (
    init_train_state,
    make_optimizer,
    state_shardings,
    train_params_shardings,
)

CFG = ModelConfig.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=8, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=False)


def _tx():
    return make_optimizer(learning_rate=1e-3, kernel_learning_rate=1e-2, warmup_steps=1, total_steps=10,
                          weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0)


def _params(abstract=True):
    make = lambda: Llama(CFG, rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(make) if abstract else make()
    _, policy, _ = nnx.split(model, nnx.Param, ...)
    return {"policy": policy, "kernel": losses.init_hmk_params()}


def _param_table(mesh, params):
    """Parameter key path (as a string) -> expected NamedSharding."""
    shardings = param_shardings(mesh, params["policy"])
    paths = jax.tree_util.tree_flatten_with_path(params["policy"])[0]
    return {jax.tree_util.keystr(p): s for (p, _), s in zip(paths, jax.tree.leaves(shardings))}


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)],
                         ids=["fsdp8", "data2_fsdp2_tensor2"])
def test_every_leaf_of_the_train_state_is_sharded_by_the_rules(shape):
    assert jax.device_count() == 8
    mesh = make_mesh(**shape)
    params = _params()
    tx = _tx()
    shardings = state_shardings(mesh, params, param_shardings(mesh, params["policy"]), tx)
    table = _param_table(mesh, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx, 0), params)
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = jax.tree.leaves(shardings)
    assert len(leaves) == len(got)
    moments = 0
    for (path, leaf), sharding in zip(leaves, got):
        key = jax.tree_util.keystr(path)
        assert isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape, key
        policy_suffix = key.rsplit("['policy']", 1)[-1]
        if key.startswith(".params['policy']"):
            assert sharding == table[policy_suffix], key
        elif key.startswith(".opt_state") and (".mu['policy']" in key or ".nu['policy']" in key):
            assert sharding == table[policy_suffix], key  # Adam moment: exactly its parameter's sharding
            moments += 1
        else:
            # Kernel weights and their moments, step, counters, flags, rng: replicated.
            assert sharding == replicated, key
    n_policy = len(table)
    assert moments == 2 * n_policy  # mu and nu of every policy parameter
    # Really sharded: the big moments are split over the devices, not copies.
    fsdp = shape["fsdp"]
    embed = table["['embed'].value"]
    assert embed.shard_shape((CFG.vocab_size, CFG.hidden_size)) == (
        CFG.vocab_size // shape["tensor"], CFG.hidden_size // fsdp)


def test_a_moment_that_matches_no_parameter_is_an_error():
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    params = _params()
    policy_shardings = param_shardings(mesh, params["policy"])
    # An optimizer whose state holds a parameter-sized buffer under an unrelated shape.
    odd = jax.eval_shape(lambda p: init_train_state(p, _tx(), 0), params)
    odd = odd.replace(opt_state={"stray": jax.ShapeDtypeStruct((7, 3), np.float32)})
    with pytest.raises(ValueError, match=r"\['stray'\] \(7, 3\) matches no parameter"):
        train_state_shardings(mesh, odd, train_params_shardings(mesh, policy_shardings, params["kernel"]))


def test_compile_train_step_state_is_sharded_like_the_rules(tmp_path):
    """Through the trainer: `run.compile_train_step`'s state (before issue 12: moments replicated)."""
    from dpok_jax.config import load_config
    from dpok_jax.train import run as run_lib

    cfg = load_config(None, [f"run_dir={tmp_path}", "data.synthetic_train_per_task=8",
                             "data.synthetic_eval_per_task=2", "train.batch_size=8", "train.progress=false",
                             "model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
                             "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
                             "data.max_length=64", "data.max_prompt_length=32", "data.buckets=[64]",
                             "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "sft.steps=0"])
    p = run_lib.prepare(cfg, devices=jax.devices()[:8])
    state, _ = run_lib.compile_train_step(p, run_lib.step_spec(cfg), None, _tx(), losses.init_hmk_params())
    mu = state.opt_state.inner_state[1].inner_states["policy"].inner_state[0].mu["policy"]
    for m, prm in zip(jax.tree.leaves(mu), jax.tree.leaves(state.params["policy"])):
        assert m.sharding.is_equivalent_to(prm.sharding, m.ndim)
    embed = mu["embed"][...]
    assert not embed.sharding.is_fully_replicated
    assert embed.addressable_shards[0].data.shape == (embed.shape[0], embed.shape[1] // 8)
