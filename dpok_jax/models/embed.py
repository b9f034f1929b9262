"""Sentence-encoder embeddings as data: `embedding_prompt / embedding_chosen / embedding_rejected`.

The paper's kernels compare prompt and response embeddings from an external sentence encoder
(`loss.embeddings: encoder`). They are computed once, before training, and cached on disk:

- `add_embedding_columns`: a preference dataset (``prompt / chosen / rejected`` text columns, as
  `dpok_jax.data.load_preference_dataset` returns) gets the three ``embedding_*`` columns
  (`dpok embed`); training then reads them with ``loss.embeddings: dataset``.
- `add_pair_embeddings`: tokenized pairs get them from the text the policy actually sees (the ids
  decoded back, after truncation), which is what `dpok train` does with ``loss.embeddings: encoder``.

`embed_texts` keys its cache by the encoder's weights and settings and by the texts themselves
(``CACHE_DIR/encoder-<sha256>.npy``), so a second run with the same data loads instead of encoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import Any, Sequence

import numpy as np

from dpok_jax import storage

COLUMNS = ("prompt", "chosen", "rejected")


def _encoder_fingerprint(encoder) -> str:
    h = hashlib.sha256(repr(encoder.config).encode())
    with open(encoder.folder / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    h.update((encoder.folder / "tokenizer.json").read_bytes())
    return h.hexdigest()


def embed_texts(encoder, texts: Sequence[str], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """float32 ``[N, d]`` embeddings of `texts` (each distinct text encoded once), cached on disk.

    Args:
      encoder: a `dpok_jax.models.encoder.SentenceEncoder`.
      texts: the strings.
      cache_dir: where ``encoder-<key>.npy`` is kept; None: no cache.
    """
    texts = list(texts)
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(_encoder_fingerprint(encoder).encode())
        for text in unique:
            h.update(text.encode("utf-8", "surrogatepass") + b"\0")
        path = storage.run_path(cache_dir) / f"encoder-{h.hexdigest()[:24]}.npy"  # local or gs://
        if path.exists():
            table = np.load(io.BytesIO(path.read_bytes()))
            if table.shape == (len(unique), encoder.dim):
                return table[inverse]
    table = encoder.encode(list(unique))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, table)
        storage.write_bytes(path, buf.getvalue())  # a reader never sees half a file
    return table[inverse]


def add_embedding_columns(dataset, encoder, cache_dir: str | os.PathLike | None = None):
    """`dataset` with ``embedding_{prompt,chosen,rejected}`` float32 lists from its text columns.

    Rows whose three fields are not all strings (rows the loader marked bad) get ``None`` embeddings,
    so `tokenize_pairs` still skips and reports them.

    Raises ValueError naming the missing column.
    """
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing} (found {dataset.column_names}); load it with "
                         "load_preference_dataset first")
    values = {c: list(dataset[c]) for c in COLUMNS}
    ok = [all(isinstance(values[c][i], str) for c in COLUMNS) for i in range(len(dataset))]
    rows = [i for i, good in enumerate(ok) if good]
    for c in COLUMNS:
        emb = embed_texts(encoder, [values[c][i] for i in rows], cache_dir)
        column: list[Any] = [None] * len(dataset)
        for j, i in enumerate(rows):
            column[i] = emb[j].tolist()
        name = f"embedding_{c}"
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, column)
    return dataset


def add_pair_embeddings(pairs, tokenizer, encoder, cache_dir: str | os.PathLike | None = None):
    """`TokenizedPairs` with ``embeddings`` from the decoded prompt / chosen / rejected ids.

    Special tokens (BOS, EOS) are dropped from the decoded text. Returns a new object.
    """
    def texts(seqs):
        return [tokenizer.decode([int(t) for t in s], skip_special_tokens=True) for s in seqs]

    embeddings = {f"embedding_{c}": embed_texts(encoder, texts(getattr(pairs, f"{c}_ids")), cache_dir)
                  for c in COLUMNS}
    return dataclasses.replace(pairs, embeddings=embeddings)
