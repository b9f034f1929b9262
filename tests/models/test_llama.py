"""The Flax Llama on its own: config, shapes, dtypes, positions, remat, hidden states."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpok_jax.models import Llama, ModelConfig, RopeScaling
from dpok_jax.models.llama import default_positions

SMALL = dict(vocab_size=80, hidden_size=32, intermediate_size=64, head_dim=8)


@functools.partial(jax.jit, static_argnames="graphdef")
def _jit_forward(state, ids, mask, positions, *, graphdef):
    model = nnx.merge(graphdef, state)
    return model(ids, mask, positions=positions), model(ids, mask, positions=positions, return_hidden=True)


def run(model, ids, mask, positions=None, return_hidden=False):
    """Jitted forward; one compile serves every test with the same config and shapes."""
    graphdef, state = nnx.split(model)
    logits, hidden = _jit_forward(state, ids, mask, positions, graphdef=graphdef)
    return hidden if return_hidden else logits


def _batch(vocab, left=True):
    if left:
        ids = jnp.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], jnp.int32)
        mask = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], jnp.int32)
    else:
        ids = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], jnp.int32)
        mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    return ids % vocab, mask


def test_named_configs():
    tiny = ModelConfig.tiny()
    assert (tiny.vocab_size, tiny.hidden_size, tiny.intermediate_size, tiny.num_layers) == (512, 64, 192, 2)
    assert (tiny.num_heads, tiny.num_kv_heads, tiny.head_dim, tiny.tie_word_embeddings) == (4, 2, 16, True)
    assert ModelConfig.tiny(vocab_size=260, num_layers=4).num_layers == 4
    assert ModelConfig.smollm2_135m().num_kv_heads == 3
    assert ModelConfig.llama3_2_1b().rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    big = ModelConfig.llama3_1_8b()
    assert big.hidden_size == 4096 and not big.tie_word_embeddings and big.rope_scaling.factor == 8.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.hidden_size = 3


@pytest.mark.parametrize("name", ["tiny", "smollm2_135m", "llama3_2_1b", "llama3_1_8b"])
def test_hf_dict_round_trip(name):
    cfg = getattr(ModelConfig, name)()
    assert ModelConfig.from_hf(cfg.to_hf(), param_dtype=cfg.param_dtype) == cfg


def test_from_hf_reads_the_transformers4_rope_form():
    hf = ModelConfig.llama3_2_1b().to_hf()
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = {**rope, "rope_type": "llama3"}
    assert ModelConfig.from_hf(hf) == ModelConfig.llama3_2_1b(param_dtype="float32")


def test_parameter_counts_match_published_sizes():
    def count(cfg):
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        return sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract)))

    assert count(ModelConfig.smollm2_135m()) == 134_515_008
    assert count(ModelConfig.llama3_2_1b()) == 1_235_814_400
    assert count(ModelConfig.llama3_1_8b()) == 8_030_261_248


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(head_dim=7), "even"),
        (dict(param_dtype="float16"), "param_dtype"),
        (dict(remat="sometimes"), "remat"),
        (dict(hidden_size=0), "hidden_size"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.tiny(**bad)


def test_default_positions_left_and_right_padding():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


def test_padding_side_does_not_change_real_token_logits():
    model = Llama(ModelConfig.tiny(**SMALL), rngs=nnx.Rngs(0))
    ids_l, mask_l = _batch(80, left=True)
    ids_r, mask_r = _batch(80, left=False)
    left, right = run(model, ids_l, mask_l), run(model, ids_r, mask_r)
    np.testing.assert_allclose(left[0, 2:], right[0, :4], atol=1e-5)
    np.testing.assert_allclose(left[1], right[1], atol=1e-6)
    # Unpadded row alone gives the same: padding in other rows does not leak.
    alone = run(model, ids_l[1:], mask_l[1:])
    np.testing.assert_allclose(alone[0], left[1], atol=1e-6)
    assert np.isfinite(np.asarray(left)).all()


def test_future_tokens_do_not_change_past_logits():
    model = Llama(ModelConfig.tiny(**SMALL), rngs=nnx.Rngs(1))
    ids, mask = _batch(80, left=False)
    changed = ids.at[:, 3].set(1)
    a, b = run(model, ids, mask), run(model, changed, mask)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert np.abs(np.asarray(a[1, 3:] - b[1, 3:])).max() > 1e-4


def test_hidden_states_times_unembedding_are_the_logits():
    for tied in (True, False):
        model = Llama(ModelConfig.tiny(**SMALL, tie_word_embeddings=tied), rngs=nnx.Rngs(2))
        ids, mask = _batch(80)
        hidden = run(model, ids, mask, return_hidden=True)
        assert hidden.shape == (2, 6, 32)
        assert model.input_embeddings().shape == (80, 32)
        assert model.unembedding().shape == (32, 80)
        if tied:
            np.testing.assert_array_equal(model.unembedding(), model.input_embeddings().T)
        np.testing.assert_allclose(hidden @ model.unembedding(), run(model, ids, mask), atol=1e-5)


def test_explicit_positions_are_used():
    model = Llama(ModelConfig.tiny(**SMALL), rngs=nnx.Rngs(0))
    ids, mask = _batch(80, left=False)
    default = run(model, ids, mask)
    same = run(model, ids, mask, positions=default_positions(mask))
    # Rotary attention depends only on position differences: a uniform shift changes nothing,
    # stretching the positions does.
    shifted = run(model, ids, mask, positions=default_positions(mask) + 5)
    stretched = run(model, ids, mask, positions=default_positions(mask) * 3)
    np.testing.assert_array_equal(default, same)
    np.testing.assert_allclose(default, shifted, atol=1e-5)
    assert np.abs(np.asarray(default - stretched)).max() > 1e-4


def _loss_and_grads(cfg):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids, mask = _batch(cfg.vocab_size)

    @jax.jit
    def loss(state):
        logits = nnx.merge(graphdef, state)(ids, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    return jax.value_and_grad(loss)(state)


@pytest.fixture(scope="module")
def no_remat_grads():
    return _loss_and_grads(ModelConfig.tiny(**SMALL))


@pytest.mark.parametrize(
    "policy", ["full", pytest.param("dots", marks=pytest.mark.slow), "dots_with_no_batch_dims"])
def test_remat_gives_the_same_gradients(no_remat_grads, policy):
    base_loss, base_grads = no_remat_grads
    loss, grads = _loss_and_grads(ModelConfig.tiny(**SMALL, remat=policy))
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_really_rematerializes():
    """The jaxpr of the full-remat gradient holds a checkpoint (remat) primitive; none without."""
    def jaxpr_text(remat):
        model = Llama(ModelConfig.tiny(**SMALL, remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        ids, mask = _batch(80)
        f = lambda s: nnx.merge(graphdef, s)(ids, mask).sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(f))(state))

    assert "remat" in jaxpr_text("full") or "checkpoint" in jaxpr_text("full")
    assert "remat" not in jaxpr_text("none") and "checkpoint" not in jaxpr_text("none")


def test_bfloat16_params_and_compute():
    cfg = ModelConfig.tiny(**SMALL, param_dtype="bfloat16", dtype="bfloat16")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model)))
    ids, mask = _batch(80)
    logits = run(model, ids, mask)
    assert logits.dtype == jnp.float32
    assert run(model, ids, mask, return_hidden=True).dtype == jnp.bfloat16
    # Same weights in float32: close, not equal.
    model32 = Llama(ModelConfig.tiny(**SMALL), rngs=nnx.Rngs(0))
    nnx.update(model32, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model)))
    ref = run(model32, ids, mask)
    real = np.asarray(mask, bool)
    err = np.abs(np.asarray(logits - ref))[real].max()
    assert 0 < err < 0.05 * np.abs(np.asarray(ref))[real].max()


def test_mixed_precision_bf16_compute_on_f32_params():
    model = Llama(ModelConfig.tiny(**SMALL, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert model.embed[...].dtype == jnp.float32
    ids, mask = _batch(80)
    assert run(model, ids, mask, return_hidden=True).dtype == jnp.bfloat16


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the tables are materialized on CPU only")
def test_rope_tables_are_computed_once_per_forward_on_cpu():
    """XLA:CPU fused the rope tables' cos/sin into every consumer (each layer's q and k, forward and
    backward), per element of [B, T, heads, D]. `Llama` computes them once, in a conditional: the
    compiled gradient of a 3-layer model evaluates cos in at most 2 fusions (the table and the
    conditional's second branch), where fused it did in one per rope and layer."""
    import re

    model = Llama(ModelConfig.tiny(num_layers=3, dtype="float32", param_dtype="float32"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.ones((2, 32), jnp.int32)
    mask = jnp.ones((2, 32), bool)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(ids, mask) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    bodies = re.findall(r"\n%fused[^\n]*\{(.*?)\n\}", hlo, re.S)
    with_cos = [b for b in bodies if " cosine(" in b]
    assert 1 <= len(with_cos) <= 2, len(with_cos)
