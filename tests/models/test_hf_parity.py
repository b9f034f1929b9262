"""Our Flax Llama equals transformers' PyTorch LlamaForCausalLM on the same weights (float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from dpok_jax.models import Llama, ModelConfig, RopeScaling, load_llama, save_llama

TOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}

VARIANTS = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_llama3_rope": dict(rope_parameters=LLAMA3_ROPE, num_key_value_heads=1),
}


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(state, ids, mask, *, graphdef):
    return nnx.merge(graphdef, state)(ids, mask)


def _ours(model, ids, mask):
    """Jitted logits; left- and right-padded batches of one config share the compile."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(state, jnp.asarray(ids), jnp.asarray(mask), graphdef=graphdef))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_logits_match_transformers(hf_checkpoint, helpers, variant, left):
    folder, torch_model = hf_checkpoint(**VARIANTS[variant])
    model = load_llama(folder)
    assert model.config.param_dtype == "float32" and model.config.dtype == "float32"
    ids, mask = helpers.padded_batch(model.config.vocab_size, [16, 11, 5], 16, left=left)
    ours = _ours(model, ids, mask)
    ref = helpers.torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    diff = np.abs(ours - ref)[real].max()
    assert diff <= TOL, f"{variant}: max abs diff {diff:.2e}"
    # A broken mask or rope would still give same-magnitude logits; make sure they are not trivial.
    assert np.abs(ref[real]).max() > 0.1
    assert np.isfinite(ours).all()


def test_llama3_scaling_changes_the_frequencies():
    """Guard: the test config puts frequencies in all three llama3 bands, so a no-op scaling fails."""
    from dpok_jax.models.llama import rope_inv_freq

    plain = rope_inv_freq(12, 500000.0, None)
    scaled = rope_inv_freq(12, 500000.0, RopeScaling(8.0, 1.0, 4.0, 64))
    ratio = plain / scaled
    assert np.isclose(ratio[0], 1.0)  # high frequency: untouched
    assert np.isclose(ratio[-1], 8.0)  # low frequency: divided by the factor
    assert ((ratio > 1.0 + 1e-6) & (ratio < 8.0 - 1e-6)).any()  # some in the smoothed band


def test_export_round_trip_loads_in_transformers(tmp_path, helpers):
    # Same shapes as tests/models/test_llama.py, so the eager init compiles are shared.
    cfg = ModelConfig.tiny(vocab_size=80, hidden_size=32, intermediate_size=64, num_heads=4,
                           num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                           rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))
    model = Llama(cfg, rngs=nnx.Rngs(3))
    # Non-trivial norm weights, so the export of every tensor is exercised.
    for norm in (model.final_norm.weight, model.layers.attn_norm.weight, model.layers.mlp_norm.weight):
        norm[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), norm.shape)
    save_llama(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    torch_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert not torch_model.config.tie_word_embeddings
    assert torch_model.config.rope_parameters["rope_type"] == "llama3"
    ids, mask = helpers.padded_batch(cfg.vocab_size, [12, 7], 12, left=True, seed=1)
    ref = helpers.torch_logits(torch_model, ids, mask)
    diff = np.abs(_ours(model, ids, mask) - ref)[mask.astype(bool)].max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"
    # And back into JAX: identical parameters.
    again = load_llama(tmp_path)
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_tied_export_writes_an_index_that_both_sides_load(tmp_path, helpers):
    cfg = ModelConfig.tiny(vocab_size=80, hidden_size=32, intermediate_size=64, head_dim=8)
    assert cfg.tie_word_embeddings
    model = Llama(cfg, rngs=nnx.Rngs(0))
    save_llama(model, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    torch_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch_model.config.tie_word_embeddings
    assert torch_model.lm_head.weight.data_ptr() == torch_model.model.embed_tokens.weight.data_ptr()
    ids, mask = helpers.padded_batch(cfg.vocab_size, [8, 5], 8, left=False)
    diff = np.abs(_ours(load_llama(tmp_path), ids, mask) - helpers.torch_logits(torch_model, ids, mask))
    assert diff[mask.astype(bool)].max() <= TOL


def test_bfloat16_load_is_close_to_float32(hf_checkpoint, helpers):
    folder, torch_model = hf_checkpoint()
    model = load_llama(folder, param_dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert model.embed[...].dtype == jnp.bfloat16
    ids, mask = helpers.padded_batch(model.config.vocab_size, [10, 6], 10, left=True)
    ours = _ours(model, ids, mask)
    assert ours.dtype == np.float32
    ref = helpers.torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    rel = np.abs(ours - ref)[real].max() / np.abs(ref[real]).max()
    assert 0 < rel < 0.05, rel
