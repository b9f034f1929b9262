"""On 8 fake CPU devices: sharded forward and gradient equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpok_jax.models import Llama, ModelConfig, init_llama, load_llama
from dpok_jax.sharding import make_mesh, param_shardings, shard_batch, shard_model

CFG = ModelConfig.tiny(vocab_size=80, hidden_size=32, intermediate_size=64, head_dim=8, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=False)


def _batch(batch_size=8, seq=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, size=(batch_size, seq)).astype(np.int32)
    lengths = rng.integers(3, seq + 1, size=batch_size)
    mask = (np.arange(seq)[None, :] >= seq - lengths[:, None]).astype(np.int32)  # left padded
    return {"input_ids": ids * mask, "attention_mask": mask}


def _step_fn(graphdef, shardings=None):
    def loss(state, batch):
        model = nnx.merge(graphdef, state)
        logits = model(batch["input_ids"], batch["attention_mask"])
        logp = jax.nn.log_softmax(logits[:, :-1])
        target = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(target * batch["attention_mask"][:, 1:]), logits

    def step(state, batch):
        out, grads = jax.value_and_grad(loss, has_aux=True)(state, batch)
        if shardings is not None:
            # What a train step does so the optimizer update stays sharded like the parameters.
            grads = jax.lax.with_sharding_constraint(grads, shardings)
        return out, grads

    return jax.jit(step)


def _reference():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    single = jax.devices()[0]
    state = jax.device_put(state, single)
    batch = jax.device_put(_batch(), single)
    (loss, logits), grads = _step_fn(graphdef)(state, batch)
    return loss, logits, grads


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=4, tensor=2), dict(data=8, fsdp=1, tensor=1)],
                         ids=["fsdp4_tensor2", "data8"])
def test_sharded_step_equals_single_device(reference, shape):
    assert jax.device_count() == 8
    mesh = make_mesh(**shape)
    # Both ways of getting a sharded model: born sharded, or placed after creation.
    if shape["data"] == 1:
        model = init_llama(CFG, seed=0, mesh=mesh)
    else:
        model = shard_model(Llama(CFG, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    q = model.layers.attn.q[...]
    if shape["tensor"] == 2:
        # Really sharded: spec from the rules table and per-device pieces smaller than the whole.
        assert q.sharding.spec == jax.P(None, "fsdp", "tensor", None)
        assert q.addressable_shards[0].data.shape == (2, 8, 2, 8)
        assert model.embed[...].sharding.spec == jax.P("tensor", "fsdp")
        assert model.lm_head[...].sharding.spec == jax.P("fsdp", "tensor")
        assert model.layers.mlp.down[...].sharding.spec == jax.P(None, "tensor", "fsdp")
    else:
        assert q.sharding.is_fully_replicated
    batch = shard_batch(_batch(), mesh)
    assert batch["input_ids"].addressable_shards[0].data.shape[0] == 8 // (shape["data"] * shape["fsdp"])

    shardings = param_shardings(mesh, state)
    step = _step_fn(graphdef, shardings)
    (loss, logits), grads = step(state, batch)
    ref_loss, ref_logits, ref_grads = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(shardings)):
        assert g.sharding.is_equivalent_to(s, g.ndim)


def test_load_llama_places_each_tensor_into_its_sharding(tmp_path):
    from dpok_jax.models import save_llama

    model = Llama(CFG, rngs=nnx.Rngs(5))
    save_llama(model, tmp_path)
    mesh = make_mesh(fsdp=4, tensor=2)
    loaded = load_llama(tmp_path, mesh=mesh)
    expected = param_shardings(mesh, nnx.state(loaded))
    for value, want, ref in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(expected),
                                jax.tree.leaves(nnx.state(model))):
        assert value.sharding.is_equivalent_to(want, value.ndim)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref))
    assert loaded.layers.mlp.gate[...].addressable_shards[0].data.shape == (2, 8, 32)
    # Exporting a sharded model gathers it tensor by tensor: same checkpoint back.
    save_llama(loaded, tmp_path / "again")
    for a, b in zip(jax.tree.leaves(nnx.state(load_llama(tmp_path / "again"))), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_indivisible_mesh_fails_before_compiling(tmp_path):
    from dpok_jax.models import save_llama

    save_llama(Llama(CFG, rngs=nnx.Rngs(0)), tmp_path)
    # 2 kv heads cannot be split 8 ways: the error names the parameter, nothing is compiled.
    with pytest.raises(ValueError, match=r"layers/attn/k .*'kv_heads'=2 is not divisible"):
        load_llama(tmp_path, mesh=make_mesh(fsdp=1, tensor=8))
    with pytest.raises(ValueError, match="kv_heads"):
        shard_model(Llama(CFG, rngs=nnx.Rngs(0)), make_mesh(fsdp=1, tensor=8))
