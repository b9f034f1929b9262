"""Greedy / temperature sampling from a `Llama` with a key-value cache.

The cached decoder below reuses the model's own parameters and blocks (`RMSNorm`, `MLP`,
`apply_rope`, `rope_tables`); only attention is written again, against a cache
``k, v: [layers, B, S, kv_heads, D]`` with ``S = prompt + new tokens`` slots. Slot ``s`` holds the
key/value of the ``s``-th token fed; a query in slot ``t`` attends to slots ``s <= t`` that hold a
real token (``slot_valid``), so left-padded prompts of different lengths decode together, each with
rotary positions counted from its first real token (as `Llama.__call__` does for training).

One `jax.jit` runs the prompt pass and a `jax.lax.while_loop` over new tokens, stopping when every
row has produced an end-of-sequence token. Sampling: ``temperature == 0`` is greedy (argmax);
otherwise ``softmax(logits / temperature)``, optionally restricted to the ``top_k`` largest logits.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpok_jax.models.llama import Llama, apply_rope, default_positions, rope_tables


def cached_forward(model: Llama, ids: jax.Array, positions: jax.Array, slot_valid: jax.Array,
                   cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
    """Feed ``ids`` ``[B, T]`` into cache slots ``start .. start + T - 1``; logits and the new cache.

    Args:
      model: the `Llama` (merged; call inside a jitted function).
      ids: ``[B, T]`` token ids; positions: ``[B, T]`` their rotary positions.
      slot_valid: ``[B, S]`` bool, True where a slot holds (or will hold) a real token.
      cache: ``{"k", "v"}`` each ``[layers, B, S, kv_heads, D]`` in the compute dtype.
      start: scalar int, the first slot written.

    Returns:
      logits ``[B, T, V]`` float32 (equal to `Llama.__call__`'s on the same tokens up to float
      rounding) and the updated cache.
    """
    cfg = model.config
    dt = cfg.compute_dtype
    t, s = ids.shape[1], cache["k"].shape[2]
    cos, sin = rope_tables(cfg, positions)
    query_slot = start + jnp.arange(t)  # [T]
    mask = slot_valid[:, None, :] & (jnp.arange(s)[None, None, :] <= query_slot[None, :, None])  # [B, T, S]
    x = jnp.take(model.embed[...], ids, axis=0).astype(dt)  # [B, T, H]
    layer_def, layer_state = nnx.split(model.layers)

    def body(h, xs):
        state, k_cache, v_cache = xs  # k_cache, v_cache: [B, S, K, D]
        layer = nnx.merge(layer_def, state)
        attn = layer.attn
        y = layer.attn_norm(h)
        q = jnp.einsum("bth,hnd->btnd", y, attn.q[...].astype(dt))
        k = jnp.einsum("bth,hkd->btkd", y, attn.k[...].astype(dt))
        v = jnp.einsum("bth,hkd->btkd", y, attn.v[...].astype(dt))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
        b, _, n, d = q.shape
        kv = k_cache.shape[2]
        q = q.reshape(b, t, kv, n // kv, d)  # query head i uses kv head i // group
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None], scores * (d ** -0.5), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache).reshape(b, t, n, d)
        h = h + jnp.einsum("btnd,ndh->bth", out, attn.o[...].astype(dt))
        h = h + layer.mlp(layer.mlp_norm(h))
        return h, (k_cache, v_cache)

    x, (k_new, v_new) = jax.lax.scan(body, x, (layer_state, cache["k"], cache["v"]))
    x = model.final_norm(x)
    logits = jnp.einsum("bth,hv->btv", x, model.unembedding().astype(dt), preferred_element_type=jnp.float32)
    return logits, {"k": k_new, "v": v_new}


def sample_token(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None) -> jax.Array:
    """``[B, V]`` logits -> ``[B]`` ids: argmax at temperature 0, else a draw from
    ``softmax(logits / temperature)`` over the ``top_k`` largest logits (all when None)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]  # [B, 1]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k",
                                             "eos_ids", "pad_id"))
def _generate(graphdef, state, ids, mask, key, *, max_new_tokens, temperature, top_k, eos_ids, pad_id):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, t = ids.shape
    s = t + max_new_tokens
    shape = (cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
    cache = {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
    mask = mask.astype(bool)
    slot_valid = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)  # [B, S]
    positions = default_positions(mask)
    logits, cache = cached_forward(model, ids, positions, slot_valid, cache, jnp.int32(0))
    next_pos = positions[:, -1] + 1  # prompts are left-padded: the last column is real
    key, sub = jax.random.split(key)
    tok = sample_token(logits[:, -1], sub, temperature=temperature, top_k=top_k)
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, out, done, key = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos)
        logits, cache = cached_forward(model, tok[:, None], (next_pos + i)[:, None], slot_valid, cache,
                                       t + i)
        key, sub = jax.random.split(key)
        return i + 1, sample_token(logits[:, 0], sub, temperature=temperature, top_k=top_k), cache, out, \
            done, key

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    carry = (jnp.int32(0), tok, cache, out, jnp.zeros((b,), bool), key)
    return jax.lax.while_loop(cond, body, carry)[3]


def generate_ids(model: Llama, prompt_ids: Any, prompt_mask: Any, *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, eos_ids: Sequence[int] = (),
                 pad_id: int = 0, seed: int = 0) -> np.ndarray:
    """New token ids ``[B, max_new_tokens]`` after left-padded prompts ``[B, T]`` (mask 1 = real).

    A row stops at its first id in ``eos_ids`` (kept in the output); later slots hold ``pad_id``.

    >>> from dpok_jax.models.llama import ModelConfig, init_llama
    >>> m = init_llama(ModelConfig.tiny(vocab_size=64))
    >>> generate_ids(m, np.array([[0, 5, 6]]), np.array([[0, 1, 1]]), max_new_tokens=4).shape
    (1, 4)
    """
    ids = np.asarray(prompt_ids, np.int32)
    mask = np.asarray(prompt_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must be equal [B, T]")
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all 1")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={model.config.vocab_size}], got {top_k}")
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
                    max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=None if top_k is None else int(top_k),
                    eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
    return np.asarray(out)


def _eos_ids(model: Llama, tokenizer: Any) -> tuple[int, ...]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (tuple, list)) else [value])
    return tuple(sorted(int(i) for i in ids))


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool) -> list[int]:
    """Token ids of one prompt: through the tokenizer's chat template as a user turn with the
    generation prompt (``chat=True``), or as raw text with BOS first, the way `tokenize_pairs`
    encodes training prompts (``chat=False``)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None and ids[:1] != [bos] else []) + ids


def generate(model: Llama, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0, chat: bool = True
             ) -> list[str]:
    """Continuations of ``prompts`` (decoded, special tokens dropped), generated in one batch.

    Prompts are left-padded to a power of two (at least 16) so repeated calls reuse compilations.
    See `encode_prompt` for ``chat``; the stop tokens are the tokenizer's and the model's EOS.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    encoded = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    if not encoded or min(map(len, encoded)) == 0:
        raise ValueError("generate needs at least one non-empty prompt")
    longest = max(map(len, encoded))
    width = max(16, 1 << (longest - 1).bit_length())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(encoded), width), pad, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = e
        mask[row, width - len(e):] = 1
    eos = _eos_ids(model, tokenizer)
    out = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, eos_ids=eos, pad_id=pad, seed=seed)
    texts = []
    for row in out.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in eos), len(row))
        texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
    return texts
