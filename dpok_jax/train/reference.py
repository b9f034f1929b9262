"""The frozen reference, computed once: training embeddings for kernel fitting, and the
`precomputed` reference mode (SPEC §1, §3, §6).

Precomputed mode does one pass of the reference over a split and caches, per example: the sequence
log-probs of both responses, the pooled reference embeddings `e_x, e_{y+}, e_{y-}`, and (when a
divergence penalty is on) the reference's top-k log-probs per position, from which the divergence is
computed on top-k + one tail bucket (approximate; see `losses.topk_divergence`). The cache is an
`.npz` file named by a fingerprint of the data, tokenization, model and reference parameters, so a
second run (or a resumed one) reuses it and any change recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from dpok_jax import losses, storage
from dpok_jax.train.interrupts import Interrupted, StopRequest
from dpok_jax.host_device import host_rows, to_global
from dpok_jax.host_device import to_host as _fetch
from dpok_jax.data.packing import unpack_topk
from dpok_jax.train.step import ModelFns, PairLayout, StepSpec

_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_embedding_prompt",
             "ref_embedding_chosen", "ref_embedding_rejected")


def _reference_pass(fns: ModelFns, spec: StepSpec, top_k: int | None, params, batch_sharding):
    """Jitted: per-pair reference log-probs, pooled embeddings and optional top-k log-probs, with
    explicit shardings (parameters where they are, every output over the batch axes)."""

    def fn(ref_params, batch):
        lay = PairLayout(batch)  # padded or packed rows (`dpok_jax.data.packing`)
        hidden, unembed = lay.hidden(fns, ref_params)
        tok = losses.chunked_token_logps(hidden[:, :-1], unembed, lay.labels,
                                         chunk_size=spec.chunk_size)
        seq = lay.sequence_logps(tok, spec.logp_reduction)
        b = lay.pairs
        e_x, e_pos, e_neg = lay.pooled_embeddings(hidden)
        out = dict(ref_chosen_logps=seq[:b], ref_rejected_logps=seq[b:], ref_embedding_prompt=e_x,
                   ref_embedding_chosen=e_pos, ref_embedding_rejected=e_neg)
        if top_k:
            idx, lp = losses.topk_reference(hidden[:, :-1], unembed, k=top_k,
                                            chunk_size=spec.chunk_size)
            if lay.packed:  # [R, P-1, k], unpacked to the per-pair layout on the host
                out["packed_ref_topk_indices"], out["packed_ref_topk_logps"] = idx, lp
            else:  # [2b, L-1, k] -> [b, 2, L-1, k]: one row per pair, chosen then rejected.
                out["ref_topk_indices"] = jnp.stack([idx[:b], idx[b:]], axis=1)
                out["ref_topk_logps"] = jnp.stack([lp[:b], lp[b:]], axis=1)
        return out

    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding), out_shardings=batch_sharding)


def training_embeddings(*, fns: ModelFns, spec: StepSpec, params, batches: Iterable[dict],
                        batch_sharding, max_pairs: int, stop: StopRequest | None = None
                        ) -> tuple[np.ndarray, ...]:
    """`e_x, e_{y+}, e_{y-}` of up to `max_pairs` training pairs (one in-order pass of `batches`,
    from `PreferenceBatcher.iterate_once`), to fit kernel parameters.

    Every host gets every host's rows, so all of them fit the same kernel parameters, and all run the
    same number of batches, so the collectives of the jitted pass match.
    """
    cols: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected")}
    count = 0
    fn = None if spec.embeddings == "dataset" else \
        _reference_pass(fns, spec, None, params, batch_sharding)
    for batch in batches:
        _check_stop(stop, "kernel fitting")
        valid = host_rows({"valid": batch["valid"]}, batch_sharding)["valid"].astype(bool)
        if spec.embeddings == "dataset":
            if "embedding_prompt" not in batch:
                raise ValueError("loss.embeddings=dataset needs embedding_prompt, embedding_chosen "
                                 "and embedding_rejected columns in the data")
            got = host_rows({k: batch[f"embedding_{k}"] for k in cols}, batch_sharding)
        else:
            out = fn(params, to_global(_model_inputs(batch), batch_sharding))
            got = {k: _fetch(out[f"ref_embedding_{k}"]) for k in cols}
        for k in cols:
            cols[k].append(got[k][valid])
        count += int(valid.sum())
        if count >= max_pairs:
            break
    return tuple(np.concatenate(cols[k])[:max_pairs].astype(np.float64) for k in cols)


def _check_stop(stop: StopRequest | None, where: str) -> None:
    if stop is not None and stop.poll() is not None:
        raise Interrupted(stop.signum, f"{where} (nothing to save; the same command redoes it)")


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items()
            if k.startswith(("chosen_", "rejected_", "packed_")) or k == "task_id"}


def params_digest(params: Any) -> str:
    """A content fingerprint of parameters, computed on the devices (multi-host safe): per leaf its
    path, shape, dtype, sum, sum of squares and a position-weighted sum (so permuted or moved values
    change it too)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)

    def stats(ls):
        out = []
        for x in ls:
            x = x.astype(jnp.float32)
            w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) * 0.7548776662)
            out.append(jnp.stack([jnp.sum(x), jnp.sum(jnp.square(x)), jnp.sum(x * w)]))
        return out

    values = jax.jit(stats)([x for _, x in leaves])
    h = hashlib.sha256()
    for (path, x), v in zip(leaves, values):
        v = _fetch(v)
        h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}:".encode() + v.tobytes())
    return h.hexdigest()[:20]


def pairs_digest(pairs) -> str:
    """A fingerprint of tokenized pairs: every token id, task id, row index, the pad id and any
    dataset embeddings (so a rewritten data file, or another tokenizer, never reuses a cache)."""
    h = hashlib.sha256()
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        seqs = getattr(pairs, name)
        h.update(name.encode() + np.asarray([len(x) for x in seqs], np.int64).tobytes())
        if len(seqs):
            h.update(np.concatenate([np.asarray(x, np.int64) for x in seqs]).tobytes())
    for name in ("task_id", "example_index"):
        h.update(name.encode() + np.asarray(getattr(pairs, name), np.int64).tobytes())
    h.update(f"pad={pairs.pad_token_id};max_length={pairs.max_length};"
             f"tasks={list(pairs.task_names)}".encode())
    for key in sorted(pairs.embeddings):
        h.update(key.encode() + np.ascontiguousarray(pairs.embeddings[key], np.float32).tobytes())
    return h.hexdigest()[:20]


@dataclasses.dataclass
class ReferenceCache:
    arrays: dict  # key -> [N_rows, ...] indexed by example_index
    width: int  # stored positions (L-1) of the top-k arrays

    def lookup(self, batch: dict) -> dict:
        idx = np.asarray(batch["example_index"])
        out = dict(batch)
        for key in _REF_KEYS:
            out[key] = self.arrays[key][idx]
        if "ref_topk_indices" in self.arrays:
            positions = np.asarray(batch["chosen_input_ids"]).shape[1] - 1
            for key in ("ref_topk_indices", "ref_topk_logps"):
                # [b, 2, L-1, k]: one row per pair, so each host's rows stay its own pairs.
                out[key] = self.arrays[key][idx][:, :, :positions]
        return out

    def attach(self, batcher) -> "_CachedBatcher":
        return _CachedBatcher(batcher, self)

    def attach_iter(self, batches) -> Iterator[dict]:
        for batch in batches:
            yield self.lookup(batch)


class _CachedBatcher:
    """A batcher whose batches carry the cached reference values (state/restore pass through)."""

    def __init__(self, batcher, cache: ReferenceCache):
        self.batcher, self.cache = batcher, cache

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.cache.lookup(next(self.batcher))

    def state(self) -> dict:
        return self.batcher.state()

    def restore(self, state: dict) -> None:
        self.batcher.restore(state)


def cache_path(cache_dir: epath.PathLike, *, split: str, pairs, ref_params, spec: StepSpec,
               top_k: int | None, width: int, model: dict) -> epath.Path:
    """`cache_dir/<split>-<fingerprint>.npz`: the fingerprint covers the tokenized data's content,
    the reference parameters' content and every setting that changes the cached values."""
    key = json.dumps(dict(data=pairs_digest(pairs), params=params_digest(ref_params), split=split,
                          top_k=top_k, width=width, reduction=spec.logp_reduction,
                          embeddings=spec.embeddings, model=model, version=2),
                     sort_keys=True, default=str)
    return epath.Path(cache_dir) / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def precomputed_reference(*, fns: ModelFns, spec: StepSpec, ref_params, pairs,
                          batches: Iterable[dict], batch_sharding, path: epath.PathLike, top_k: int | None,
                          width: int, progress: bool = True, stop: StopRequest | None = None
                          ) -> ReferenceCache:
    """Load the reference cache at `path`, or compute it with one in-order pass (`batches`, from
    `PreferenceBatcher.iterate_once`) and save it there.

    Every host gathers every host's rows (any host's batcher later draws any example) and writes the
    same file whole (`storage.save_npz`: locally a host-unique temporary, then a rename; in an object
    store one upload), so the cache is complete whether the hosts share a filesystem or not, and any
    process count reads it back.
    """
    path = epath.Path(path)
    if path.exists():
        arrays = storage.load_npz(path)
        print(f"Reference values loaded from {path}.", flush=True)
        return ReferenceCache(arrays, int(arrays.pop("_width")))
    fn = _reference_pass(fns, spec, top_k, ref_params, batch_sharding)
    arrays: dict[str, np.ndarray] = {}
    n = int(np.max(pairs.example_index)) + 1
    from tqdm.auto import tqdm

    show = progress and jax.process_index() == 0
    for batch in tqdm(batches, desc=f"reference pass ({path.name.split('-')[0]})", disable=not show):
        _check_stop(stop, "the reference pass")
        out = jax.tree.map(_fetch, fn(ref_params, to_global(_model_inputs(batch), batch_sharding)))
        rows = host_rows({k: batch[k] for k in batch if k in ("valid", "example_index") or
                          k in ("packed_sequence", "packed_segment_ids", "packed_positions", "packed_branch")},
                         batch_sharding)
        valid = rows["valid"].astype(bool)
        for key in ("indices", "logps"):
            if f"packed_ref_topk_{key}" in out:
                out[f"ref_topk_{key}"] = unpack_topk(rows, out.pop(f"packed_ref_topk_{key}"),
                                                     pairs=len(valid), width=width)
        idx = rows["example_index"][valid]
        for k, v in out.items():
            v = v[valid]
            if k.startswith("ref_topk"):
                pad = [(0, 0)] * v.ndim
                pad[2] = (0, width - v.shape[2])
                v = np.pad(v, pad)
            if k not in arrays:
                arrays[k] = np.zeros((n,) + v.shape[1:], v.dtype)
            arrays[k][idx] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.save_npz(path, _width=np.array(width), **arrays)
    return ReferenceCache(arrays, width)
