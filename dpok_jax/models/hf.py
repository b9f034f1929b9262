"""Hugging Face Llama checkpoints: load local safetensors into a (sharded) `Llama`, export back.

Loading never builds the whole model on the host: each parameter is created with
`jax.make_array_from_callback`, whose callback reads (memory-mapped) only the tensors of that
parameter and returns the slice its device needs. The peak extra host memory is about one
parameter (one layer-stacked weight), not the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from dpok_jax.models.llama import Llama, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some exporters write that carry no information for this model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one of our parameters maps to HF tensor(s).

    ``hf_name`` has ``{i}`` for per-layer tensors (our parameter is then stacked on axis 0).
    ``to_ours`` maps one HF tensor (torch layout) to our layout, ``to_hf`` the inverse.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def _ident(x, c):
    return x


def _transpose(x, c):
    return x.T


def _specs(cfg: ModelConfig) -> list[_Spec]:
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = "model.layers.{i}."
    specs = [
        _Spec(("embed",), "model.embed_tokens.weight", lambda c: (v, h), _ident, _ident),
        _Spec(("final_norm", "weight"), "model.norm.weight", lambda c: (h,), _ident, _ident),
        _Spec(("layers", "attn_norm", "weight"), layer + "input_layernorm.weight", lambda c: (h,), _ident, _ident),
        _Spec(("layers", "mlp_norm", "weight"), layer + "post_attention_layernorm.weight", lambda c: (h,),
              _ident, _ident),
        # torch Linear stores [out, in]; the out dimension of q/k/v is (heads, head_dim) flattened.
        _Spec(("layers", "attn", "q"), layer + "self_attn.q_proj.weight", lambda c: (n * d, h),
              lambda x, c: x.T.reshape(h, n, d), lambda x, c: x.reshape(h, n * d).T),
        _Spec(("layers", "attn", "k"), layer + "self_attn.k_proj.weight", lambda c: (k * d, h),
              lambda x, c: x.T.reshape(h, k, d), lambda x, c: x.reshape(h, k * d).T),
        _Spec(("layers", "attn", "v"), layer + "self_attn.v_proj.weight", lambda c: (k * d, h),
              lambda x, c: x.T.reshape(h, k, d), lambda x, c: x.reshape(h, k * d).T),
        _Spec(("layers", "attn", "o"), layer + "self_attn.o_proj.weight", lambda c: (h, n * d),
              lambda x, c: x.T.reshape(n, d, h), lambda x, c: x.reshape(n * d, h).T),
        _Spec(("layers", "mlp", "gate"), layer + "mlp.gate_proj.weight", lambda c: (i, h), _transpose, _transpose),
        _Spec(("layers", "mlp", "up"), layer + "mlp.up_proj.weight", lambda c: (i, h), _transpose, _transpose),
        _Spec(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", lambda c: (h, i), _transpose, _transpose),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(_Spec(("lm_head",), "lm_head.weight", lambda c: (v, h), _transpose, _transpose))
    return specs


def _hf_names(spec: _Spec, cfg: ModelConfig) -> list[str]:
    if spec.stacked:
        return [spec.hf_name.format(i=layer) for layer in range(cfg.num_layers)]
    return [spec.hf_name]


# ----------------------------------------------------------------------------------------------
# Reading


def read_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """`ModelConfig` from ``path/config.json``; errors name the file and the field."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (a Hugging Face checkpoint needs config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    if hf.get("model_type") != "llama":
        raise ValueError(f"{config_file}: model_type is {hf.get('model_type')!r} (architectures "
                         f"{hf.get('architectures')}), expected 'llama': {folder} is not a Llama checkpoint, and "
                         "dpok_jax loads Llama-architecture models only (Llama 2/3, SmolLM2, TinyLlama, ...)")
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {e}") from None


def _weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, from the single file or the shard index."""
    index_file, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_file.is_file():
        try:
            mapping = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_file}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = {name: folder / fname for name, fname in mapping.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: listed in {index_file.name} but missing")
        return files
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


class _Reader:
    """Keeps one memory-mapped handle per safetensors file open while a model loads."""

    def __init__(self, weight_map: dict[str, Path], stack: contextlib.ExitStack):
        self.weight_map = weight_map
        self._stack = stack
        self._handles: dict[Path, Any] = {}

    def _handle(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def tensor(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)


def _check_tensors(reader: _Reader, cfg: ModelConfig, specs: list[_Spec], folder: Path) -> None:
    expected = {}
    for spec in specs:
        for name in _hf_names(spec, cfg):
            expected[name] = spec.hf_shape(cfg)
    for name, shape in expected.items():
        if name not in reader.weight_map:
            raise ValueError(f"{folder}: tensor {name!r} is missing from the checkpoint")
        got = reader.shape(name)
        if got != shape:
            raise ValueError(
                f"{reader.weight_map[name]}: tensor {name!r} has shape {got} but config.json implies {shape}"
            )
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for name in reader.weight_map:
        if name not in expected and name not in allowed_extra and not name.endswith(_IGNORED_SUFFIXES):
            raise ValueError(
                f"{reader.weight_map[name]}: unexpected tensor {name!r} (not part of a Llama with this config)"
            )


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _load_param(reader: _Reader, spec: _Spec, cfg: ModelConfig, shape, dtype, sharding) -> jax.Array:
    # Devices holding the same slice (replication) share one host array.
    cache: dict[tuple, np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        return spec.to_ours(reader.tensor(name), cfg)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = _index_key(index)
        if key not in cache:
            if spec.stacked:
                layers = range(cfg.num_layers)[index[0]]
                parts = [read(spec.hf_name.format(i=layer))[index[1:]] for layer in layers]
                cache[key] = np.stack(parts).astype(dtype)
            else:
                cache[key] = np.ascontiguousarray(read(spec.hf_name)[index]).astype(dtype)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def _checkpoint_dtype(hf_dtype: Any) -> str:
    return "bfloat16" if hf_dtype in ("bfloat16", "float16") else "float32"


def load_llama(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides: Any,
) -> Llama:
    """Load a local Hugging Face Llama checkpoint (``config.json`` + safetensors) into a `Llama`.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``,
        or a ``.gguf`` file (`dpok_jax.models.gguf.load_gguf_llama`: dequantized, float32 default).
      dtype: compute dtype (``"float32"``/``"bfloat16"``); default ``param_dtype``.
      param_dtype: storage dtype; default the checkpoint's (bfloat16 for bf16/fp16, else float32).
      mesh: place each parameter straight into its `dpok_jax.sharding` sharding on this mesh;
        default the first local device.
      **config_overrides: other `ModelConfig` fields (e.g. ``remat="full"``).

    Returns:
      The model; its ``.config`` is the checkpoint's config with the overrides.

    Raises:
      FileNotFoundError / ValueError naming the file, tensor or field when the folder is incomplete,
      not a Llama, or its tensor shapes disagree with config.json; ValueError (before any
      compilation) when the mesh does not divide a parameter dimension.
    """
    if str(path).endswith(".gguf"):
        from dpok_jax.models.gguf import load_gguf_llama

        return load_gguf_llama(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **config_overrides)
    folder = Path(path)
    config_file = folder / "config.json"
    hf_dtype = None
    if config_file.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            raw = json.loads(config_file.read_text())
            hf_dtype = raw.get("dtype", raw.get("torch_dtype"))
    param_dtype = param_dtype or _checkpoint_dtype(hf_dtype)
    cfg = read_config(folder, param_dtype=param_dtype, dtype=dtype or param_dtype, **config_overrides)

    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    if mesh is not None:
        from dpok_jax.sharding import param_shardings

        shardings = param_shardings(mesh, abs_state)
    else:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abs_state)

    specs = {spec.path: spec for spec in _specs(cfg)}
    weight_map = _weight_map(folder)
    with contextlib.ExitStack() as stack:
        reader = _Reader(weight_map, stack)
        _check_tensors(reader, cfg, list(specs.values()), folder)

        def place(path, var, sharding):
            key = tuple(str(p.key) for p in path)
            if key not in specs:
                raise RuntimeError(f"no Hugging Face mapping for parameter {'/'.join(key)}")
            array = _load_param(reader, specs[key], cfg, var.shape, var.dtype, sharding.get_value())
            return var.replace(array)

        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        state = jax.tree_util.tree_map_with_path(place, abs_state, shardings, is_leaf=is_var)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Writing


def _to_numpy(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def save_llama(model: Llama, path: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30) -> None:
    """Write ``config.json`` and safetensors that `transformers.LlamaForCausalLM.from_pretrained` loads.

    Tensors are fetched to the host one at a time (per layer for stacked weights) and flushed to a
    shard file every ``max_shard_bytes``; more than one shard adds ``model.safetensors.index.json``.
    Single-process only: every parameter must be fully addressable.
    """
    cfg = model.config
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    total = 0

    def emit(name: str, array: np.ndarray):
        nonlocal total
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            _flush(folder, shards, len(shards) - 1)
            shards.append({})
            sizes.append(0)
        shards[-1][name] = np.ascontiguousarray(array)
        sizes[-1] += array.nbytes
        total += array.nbytes

    for spec in _specs(cfg):
        node = state
        for key in spec.path:
            node = node[key]
        value = node.get_value()
        if spec.stacked:
            for layer in range(cfg.num_layers):
                emit(spec.hf_name.format(i=layer), spec.to_hf(_to_numpy(value[layer]), cfg))
        else:
            emit(spec.hf_name, spec.to_hf(_to_numpy(value), cfg))

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {}
    for k, name in enumerate(names):
        tmp = folder / f".shard-{k}.safetensors"
        if k == n - 1:
            _flush(folder, shards, k)
        os.replace(tmp, folder / name)
        weight_map.update({tensor: name for tensor in shards[k]})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))


def _flush(folder: Path, shards: list[dict[str, np.ndarray]], k: int) -> None:
    # "format": "pt" is what transformers checks for in safetensors metadata.
    save_file(shards[k], folder / f".shard-{k}.safetensors", metadata={"format": "pt"})
    # Keep only the names (for the index); the arrays are on disk now.
    shards[k] = {name: None for name in shards[k]}  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Tokenizers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike):
    """`transformers.AutoTokenizer` from a local folder (no hub access).

    Raises FileNotFoundError naming the folder when it has none of ``tokenizer.json``,
    ``tokenizer_config.json`` or ``tokenizer.model``.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
