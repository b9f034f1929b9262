"""Llama-architecture GGUF files (llama.cpp's format): config, weights and tokenizer.

The file is read with the `gguf` package's own `GGUFReader` and every tensor is dequantized to
float32 with `gguf.quants.dequantize` (no block format is decoded here). After dequantization a GGUF
tensor of logical shape ``[ne0, ne1]`` is a NumPy ``[ne1, ne0]`` array, i.e. PyTorch's
``Linear.weight`` layout ``[out, in]``, so each one maps to the Hugging Face tensor of the same role
and then goes through the same per-parameter conversion and sharded creation as the safetensors path
(`dpok_jax.models.hf`): each parameter is created with `jax.make_array_from_callback`, whose callback
dequantizes only the tensors of that parameter.

llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` per head so that rotary pairs are
adjacent (``(x0, x1), (x2, x3), ...``); Hugging Face's rotary layout pairs ``x_j`` with
``x_{j + D/2}``. `unpermute_rows` undoes it.

The tokenizer (with its chat template) comes from the GGUF metadata through transformers' GGUF
support, ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dpok_jax.models.hf import _hf_names, _load_param, _specs
from dpok_jax.models.llama import Llama, ModelConfig

# Hugging Face tensor name -> GGUF tensor name (llama.cpp's `tensor_mapping` for the llama arch).
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face Llama tensor name.

    >>> gguf_tensor_name("model.layers.3.self_attn.q_proj.weight")
    'blk.3.attn_q.weight'
    """
    if hf_name.startswith("model.layers."):
        layer, rest = hf_name[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{_GGUF_NAMES[rest]}"
    return _GGUF_NAMES[hf_name]


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head rotary row permutation of a q/k weight ``[n_heads * D, in]``.

    In a GGUF head, rows ``2j`` and ``2j + 1`` are the rotary pair ``j``; Hugging Face keeps pair
    ``j`` in rows ``j`` and ``j + D/2``. So ``hf[h, c * D/2 + j] = gguf[h, 2j + c]`` for ``c in {0, 1}``.

    >>> unpermute_rows(np.arange(8.0)[:, None], n_heads=2)[:, 0].tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"q/k weight with {rows} rows cannot hold {n_heads} heads of even size")
    per_head = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # [h, D/2, 2, in]
    return np.swapaxes(per_head, 1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# Metadata


def _open(path: str | os.PathLike):
    import gguf

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist")
    try:
        return gguf.GGUFReader(file)
    except (ValueError, OSError) as e:  # bad magic / truncated file
        raise ValueError(f"{file}: not a readable GGUF file ({e})") from None


def _field(reader, file: Path, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{file}: GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def config_from_reader(reader, file: Path, **overrides: Any) -> ModelConfig:
    """`ModelConfig` from GGUF metadata; ValueError naming the file and key for anything else."""
    arch = _field(reader, file, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{file}: GGUF architecture is {arch!r}; only 'llama' is supported")
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, file, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise ValueError(f"{file}: rope scaling ({scaling!r}, rope_freqs tensor: "
                         f"{'rope_freqs.weight' in names}) is not supported in GGUF files")

    def num(key, default=...):
        return _field(reader, file, f"llama.{key}", default)

    heads = int(num("attention.head_count"))
    hidden = int(num("embedding_length"))
    vocab = num("vocab_size", None)
    if vocab is None:  # older converters leave it to the token list
        vocab = len(_field(reader, file, "tokenizer.ggml.tokens"))
    head_dim = num("attention.key_length", None) or num("rope.dimension_count", None) or hidden // heads
    # float32 metadata (e.g. eps 1e-5 stored as 9.99999974e-06) is kept as the float32 value it is.
    base = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(num("feed_forward_length")),
        num_layers=int(num("block_count")),
        num_heads=heads,
        num_kv_heads=int(num("attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        rope_theta=float(num("rope.freq_base", 10000.0)),
        max_position_embeddings=int(num("context_length", 2048)),
        rms_norm_eps=float(num("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_token_id(reader, file, "bos"),
        eos_token_id=_token_id(reader, file, "eos"),
        pad_token_id=_token_id(reader, file, "padding"),
    )
    try:
        return ModelConfig(**{**base, **overrides})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None


def _token_id(reader, file: Path, which: str) -> int | None:
    value = _field(reader, file, f"tokenizer.ggml.{which}_token_id", None)
    return None if value is None else int(value)


def read_gguf_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """`ModelConfig` of a Llama GGUF file (metadata only; no tensor is dequantized)."""
    return config_from_reader(_open(path), Path(path), **overrides)


# ----------------------------------------------------------------------------------------------
# Tensors


class _GGUFTensors:
    """Hugging Face-named, dequantized float32 tensors of an open GGUF file (one at a time)."""

    def __init__(self, reader, file: Path, cfg: ModelConfig):
        self.file, self.cfg = file, cfg
        self.tensors = {t.name: t for t in reader.tensors}

    def tensor(self, hf_name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[gguf_tensor_name(hf_name)]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        if hf_name.endswith("q_proj.weight"):
            w = unpermute_rows(w, self.cfg.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = unpermute_rows(w, self.cfg.num_kv_heads)
        return w


def supported_types() -> frozenset[str]:
    """GGML tensor types `gguf.quants.dequantize` can decode (F32, F16 and its registered quants)."""
    from gguf.quants import _type_traits  # the registry dequantize dispatches on
    from gguf import GGMLQuantizationType as Q

    return frozenset({Q.F32.name, Q.F16.name, *(q.name for q in _type_traits)})


def _check_tensors(tensors: _GGUFTensors, cfg: ModelConfig) -> None:
    expected = {}
    for spec in _specs(cfg):
        for name in _hf_names(spec, cfg):
            expected[gguf_tensor_name(name)] = spec.hf_shape(cfg)
    ok = supported_types()
    for name, shape in expected.items():
        t = tensors.tensors.get(name)
        if t is None:
            raise ValueError(f"{tensors.file}: tensor {name!r} is missing from the GGUF file")
        if t.tensor_type.name not in ok:
            raise ValueError(f"{tensors.file}: tensor {name!r} has type {t.tensor_type.name}, which "
                             f"gguf.quants cannot dequantize (supported: {', '.join(sorted(ok))})")
        got = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (the fastest axis) first
        if got != shape:
            raise ValueError(f"{tensors.file}: tensor {name!r} has shape {got} but the metadata "
                             f"implies {shape}")
    extra = sorted(set(tensors.tensors) - set(expected) - {"output.weight"})
    if extra:
        raise ValueError(f"{tensors.file}: unexpected tensors {extra[:5]} (not part of a Llama "
                         "with this metadata)")


def load_gguf_llama(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides: Any,
) -> Llama:
    """Load a Llama GGUF file into a `Llama`, dequantized, created already sharded.

    Args:
      path: a ``.gguf`` file of architecture ``llama`` (any tensor type `gguf.quants` decodes).
      dtype: compute dtype; default ``param_dtype``.
      param_dtype: storage dtype; default float32 (dequantized values are float32).
      mesh: place each parameter straight into its `dpok_jax.sharding` sharding on this mesh;
        default the first local device.
      **config_overrides: other `ModelConfig` fields (e.g. ``remat="full"``).

    Raises:
      FileNotFoundError, or ValueError naming the file and the key or tensor: another
      architecture, an unsupported tensor type or rope scaling, a missing tensor or a shape that
      disagrees with the metadata.
    """
    file = Path(path).expanduser()
    reader = _open(file)
    param_dtype = param_dtype or "float32"
    cfg = config_from_reader(reader, file, param_dtype=param_dtype, dtype=dtype or param_dtype,
                             **config_overrides)
    tensors = _GGUFTensors(reader, file, cfg)
    _check_tensors(tensors, cfg)

    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    if mesh is not None:
        from dpok_jax.sharding import param_shardings

        shardings = param_shardings(mesh, abs_state)
    else:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abs_state)
    specs = {spec.path: spec for spec in _specs(cfg)}

    def place(path, var, sharding):
        key = tuple(str(p.key) for p in path)
        array = _load_param(tensors, specs[key], cfg, var.shape, var.dtype, sharding.get_value())
        return var.replace(array)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    state = jax.tree_util.tree_map_with_path(place, abs_state, shardings, is_leaf=is_var)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Tokenizer


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(file: str, mtime_ns: int):
    from transformers import AutoTokenizer

    path = Path(file)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (with its chat template) stored in a GGUF file's metadata.

    Built by transformers' GGUF support; a `transformers` fast tokenizer, so ``save_pretrained``
    writes ordinary tokenizer files. Building it parses the whole vocabulary (seconds), so it is
    cached per file and modification time within the process; a copy is returned each time.

    Raises FileNotFoundError for a missing file, ValueError naming the file otherwise.
    """
    import copy

    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist")
    try:
        tok = _cached_tokenizer(str(file), file.stat().st_mtime_ns)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for bad metadata
        raise ValueError(f"{file}: cannot build a tokenizer from the GGUF metadata "
                         f"({type(e).__name__}: {e})") from e
    return copy.deepcopy(tok)
