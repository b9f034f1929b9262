"""The run's Llama from a config's `model` section: a preset (with size overrides) or a local
checkpoint (`model.path`: a Hugging Face folder or a .gguf file), on a mesh or abstract."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flax import nnx

from dpok_jax.models.hf import load_llama, read_config
from dpok_jax.models.llama import Llama, ModelConfig, init_llama

_SIZE_KEYS = {"hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"}


def tokenizer_source(data_tokenizer: str, model_path: str | None) -> str:
    """`data.tokenizer`, except that the default "byte" gives way to a checkpoint's own tokenizer.

    >>> tokenizer_source("byte", None), tokenizer_source("byte", "ckpt"), tokenizer_source("tok", "ckpt")
    ('byte', 'ckpt', 'tok')
    """
    if data_tokenizer == "byte" and model_path is not None:
        return model_path
    return data_tokenizer


def model_config(m: Any, tokenizer) -> ModelConfig:
    """The Llama's hyperparameters: from `m.path`'s config.json, else the preset (with size
    overrides) and a vocabulary that covers the tokenizer. `m`: a config's `model` section."""
    if m.path is not None:
        return read_config(m.path, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    overrides = {k: v for k, v in dataclasses.asdict(m).items() if k in _SIZE_KEYS and v is not None}
    constructor = getattr(ModelConfig, m.preset, None)
    if constructor is None:
        raise ValueError(f"config model.preset={m.preset!r}: unknown (tiny, smollm2_135m, "
                         "llama3_2_1b, llama3_1_8b)")
    vocab = max(int(getattr(tokenizer, "vocab_size", 0)), len(tokenizer))
    # Padded to a multiple of 64 so the vocabulary axis divides over tensor-parallel meshes; the
    # extra ids never occur as labels.
    vocab = -(-vocab // 64) * 64
    return constructor(vocab_size=vocab, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                       **overrides)


def build_model(m: Any, tokenizer, *, seed: int, mesh) -> Llama:
    """The Llama with its parameters created (preset, seeded) or loaded (`m.path`), placed on `mesh`."""
    if m.path is not None:
        return load_llama(m.path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat)
    return init_llama(model_config(m, tokenizer), seed=seed, mesh=mesh)


def model_skeleton(m: Any, tokenizer, *, seed: int = 0) -> Llama:
    """The Llama with abstract parameters (nothing allocated), to restore trained weights into.
    A `m.path` that is not a Hugging Face folder (a .gguf file) is loaded instead."""
    if m.path is not None and not Path(m.path).is_dir():
        return build_model(m, tokenizer, seed=seed, mesh=None)
    config = model_config(m, tokenizer)
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
