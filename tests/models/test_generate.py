"""The KV-cache sampler against the cache-free model: same logits, same greedy tokens, and sampling
frequencies that follow softmax(logits / temperature)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpok_jax.data import ByteTokenizer
from dpok_jax.models import ModelConfig, init_llama
from dpok_jax.models.generate import cached_forward, encode_prompt, generate, generate_ids

CFG = ModelConfig.tiny(vocab_size=64, initializer_range=0.3)  # peaked logits: no near-ties in argmax


@pytest.fixture(scope="module")
def model():
    return init_llama(CFG, seed=3)


@functools.partial(jax.jit, static_argnames="graphdef")
def _full(state, ids, mask, *, graphdef):
    return nnx.merge(graphdef, state)(ids, mask)


def _full_logits(model, ids, mask):
    graphdef, state = nnx.split(model)
    return np.asarray(_full(state, jnp.asarray(ids), jnp.asarray(mask), graphdef=graphdef))


def _prompts():
    ids = np.array([[0, 0, 0, 5, 9, 17, 33, 2], [11, 12, 13, 14, 15, 16, 17, 18], [0, 0, 0, 0, 0, 0, 40, 41]],
                   np.int32)
    return ids, (np.arange(8)[None] >= np.array([[3], [0], [6]])).astype(np.int32)


def _empty_cache(b, s):
    shape = (CFG.num_layers, b, s, CFG.num_kv_heads, CFG.head_dim)
    return {"k": jnp.zeros(shape), "v": jnp.zeros(shape)}


def test_cached_prompt_then_token_by_token_equals_full_forward(model):
    """Prefill 5 tokens, then feed 3 one at a time: every logit equals the cache-free forward's."""
    ids, mask = _prompts()
    full = _full_logits(model, ids, mask)
    slot_valid = jnp.asarray(mask.astype(bool))
    positions = jnp.maximum(jnp.cumsum(jnp.asarray(mask), axis=1) - 1, 0)

    @jax.jit
    def step(state, cache, t0, tok, pos):
        return cached_forward(nnx.merge(graphdef, state), tok, pos, slot_valid, cache, t0)

    graphdef, state = nnx.split(model)
    logits, cache = step(state, _empty_cache(3, 8), jnp.int32(0), jnp.asarray(ids[:, :5]), positions[:, :5])
    got = [np.asarray(logits)]
    for t in range(5, 8):
        logits, cache = step(state, cache, jnp.int32(t), jnp.asarray(ids[:, t:t + 1]), positions[:, t:t + 1])
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=1e-5, rtol=1e-5)


def test_greedy_equals_argmax_of_the_cache_free_model(model):
    ids, mask = _prompts()
    out = generate_ids(model, ids, mask, max_new_tokens=6)
    # Reference: grow the rows (right-padded to one width, so one compile) and re-run the whole
    # model for every new token.
    seqs = [list(ids[row][mask[row] == 1]) for row in range(ids.shape[0])]
    for _ in range(6):
        width = 16
        grown = np.zeros((len(seqs), width), np.int32)
        grown_mask = np.zeros_like(grown)
        for row, seq in enumerate(seqs):
            grown[row, :len(seq)], grown_mask[row, :len(seq)] = seq, 1
        logits = _full_logits(model, grown, grown_mask)
        for row, seq in enumerate(seqs):
            seq.append(int(logits[row, len(seq) - 1].argmax()))
    assert out.tolist() == [seq[-6:] for seq in seqs]


def test_rows_stop_at_eos_and_pad(model):
    ids, mask = _prompts()
    free = generate_ids(model, ids, mask, max_new_tokens=6)  # the greedy test's compile
    eos = int(free[0, 1])  # row 0 produces it second
    out = generate_ids(model, ids, mask, max_new_tokens=6, eos_ids=(eos,), pad_id=63)
    assert out[0].tolist() == [free[0, 0], eos, 63, 63, 63, 63]
    for row in (1, 2):  # the others run on until their own first `eos`, if any
        stop = next((i for i, t in enumerate(free[row]) if t == eos), 5)
        assert out[row, :stop + 1].tolist() == free[row, :stop + 1].tolist()


def test_sampling_follows_softmax_over_temperature(model):
    """2,000 one-token draws from one prompt: frequencies match softmax(logits / T)."""
    ids, mask = _prompts()
    n, temperature = 2000, 1.5
    batch_ids, batch_mask = np.repeat(ids[:1], n, 0), np.repeat(mask[:1], n, 0)
    draws = generate_ids(model, batch_ids, batch_mask, max_new_tokens=1, temperature=temperature, seed=7)[:, 0]
    logits = _full_logits(model, ids[:1], mask[:1])[0, -1].astype(np.float64) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    freq = np.bincount(draws, minlength=CFG.vocab_size) / n
    assert probs.max() < 0.9  # a spread-out distribution, so this checks more than the argmax
    # Total variation: its standard error here is ~0.05; a wrong temperature moves it by > 0.2.
    assert 0.5 * np.abs(freq - probs).sum() < 0.12
    top3 = generate_ids(model, batch_ids, batch_mask, max_new_tokens=1, temperature=temperature, top_k=3,
                        seed=8)[:, 0]
    assert set(top3.tolist()) == set(np.argsort(logits)[-3:].tolist())


def test_generate_text_with_a_tokenizer():
    tok = ByteTokenizer()
    m = init_llama(ModelConfig.tiny(vocab_size=tok.vocab_size), seed=0)
    a, b = generate(m, tok, ["hi", "a longer prompt"], max_new_tokens=4)
    assert isinstance(a, str) and isinstance(b, str)
    # Batched rows equal rows generated alone (padding does not leak between prompts).
    assert generate(m, tok, ["a longer prompt"], max_new_tokens=4) == [b]
    # Raw prompts are encoded as training prompts are: BOS, then the text (no chat template).
    assert encode_prompt(tok, "hi", chat=False) == [tok.bos_token_id, 104, 105]
    assert encode_prompt(tok, "hi", chat=True) == tok.encode("user: hi\nassistant: ")


def test_bad_input(model):
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate_ids(model, ids, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        generate_ids(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k must be in"):
        generate_ids(model, ids, mask, max_new_tokens=1, temperature=1.0, top_k=0)
    with pytest.raises(TypeError, match="not one string"):
        generate(model, ByteTokenizer(), "hello")
