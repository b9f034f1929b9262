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
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dpok_jax import losses
from dpok_jax.train.loop import _fetch, host_rows, to_global
from dpok_jax.train.step import ModelFns, StepSpec, _pair_arrays, _sequence_reduce, pooled_embeddings

_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_embedding_prompt",
             "ref_embedding_chosen", "ref_embedding_rejected")


def _eval_batches(p, pairs, batch_size: int):
    from dpok_jax.train.run import _batcher

    return _batcher(pairs, p.cfg, batch_size, p.cfg.train.seed).iterate_once()


def _reference_pass(fns: ModelFns, spec: StepSpec, top_k: int | None):
    """Jitted: per-pair reference log-probs, pooled embeddings and optional top-k log-probs."""

    def fn(ref_params, batch):
        ids, attn, resp = _pair_arrays(batch)
        hidden, unembed = fns.hidden(ref_params, ids, attn)
        tok = losses.chunked_token_logps(hidden[:, :-1], unembed, ids[:, 1:],
                                         chunk_size=spec.chunk_size)
        seq = _sequence_reduce(tok, resp[:, 1:], spec.logp_reduction)
        b = ids.shape[0] // 2
        e_x, e_pos, e_neg = pooled_embeddings(hidden, attn, resp)
        out = dict(ref_chosen_logps=seq[:b], ref_rejected_logps=seq[b:], ref_embedding_prompt=e_x,
                   ref_embedding_chosen=e_pos, ref_embedding_rejected=e_neg)
        if top_k:
            idx, lp = losses.topk_reference(hidden[:, :-1], unembed, k=top_k,
                                            chunk_size=spec.chunk_size)
            # [2b, L-1, k] -> [b, 2, L-1, k]: one row per pair, chosen then rejected.
            out["ref_topk_indices"] = jnp.stack([idx[:b], idx[b:]], axis=1)
            out["ref_topk_logps"] = jnp.stack([lp[:b], lp[b:]], axis=1)
        return out

    return jax.jit(fn)


def training_embeddings(p, spec: StepSpec, *, max_pairs: int) -> tuple[np.ndarray, ...]:
    """`e_x, e_{y+}, e_{y-}` of up to `max_pairs` training pairs, to fit kernel parameters."""
    cols: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected")}
    count = 0
    fn = None if spec.embeddings == "dataset" else _reference_pass(p.fns, spec, None)
    # Every host sees every host's rows (so all fit the same kernel parameters) and runs the same
    # number of batches (so the collectives of the jitted pass match).
    for batch in _eval_batches(p, p.train_pairs, p.cfg.train.batch_size):
        valid = host_rows({"valid": batch["valid"]}, p.batch_sharding)["valid"].astype(bool)
        if spec.embeddings == "dataset":
            if "embedding_prompt" not in batch:
                raise ValueError("loss.embeddings=dataset needs embedding_prompt, embedding_chosen "
                                 "and embedding_rejected columns in the data")
            got = host_rows({k: batch[f"embedding_{k}"] for k in cols}, p.batch_sharding)
        else:
            out = fn(p.init_params, to_global(_model_inputs(batch), p.batch_sharding))
            got = {k: _fetch(out[f"ref_embedding_{k}"]) for k in cols}
        for k in cols:
            cols[k].append(got[k][valid])
        count += int(valid.sum())
        if count >= max_pairs:
            break
    return tuple(np.concatenate(cols[k])[:max_pairs].astype(np.float64) for k in cols)


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}


def params_digest(params: Any) -> str:
    """A cheap content fingerprint (shape, dtype, sum and sum of squares per leaf)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    stats = jax.jit(lambda ls: [(jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32))))
                                for x in ls])([x for _, x in leaves])
    h = hashlib.sha256()
    for (path, x), (s, q) in zip(leaves, stats):
        h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}:{float(s):.9e}:{float(q):.9e}".encode())
    return h.hexdigest()[:16]


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
                a = self.arrays[key][idx][:, :, :positions]  # [b, 2, L-1, k]
                out[key] = np.concatenate([a[:, 0], a[:, 1]], axis=0)  # [2b, L-1, k]
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


def precomputed_reference(p, spec: StepSpec, ref_params, run_dir: Path, *, split: str = "train"
                          ) -> ReferenceCache:
    """Load or compute the reference cache of one split (one pass over the data)."""
    cfg = p.cfg
    pairs = p.train_pairs if split == "train" else p.eval_pairs
    top_k = cfg.reference.top_k if spec.uses_divergence else None
    key = json.dumps(dict(data=dataclasses.asdict(cfg.data), model=dataclasses.asdict(cfg.model),
                          split=split, top_k=top_k, reduction=spec.logp_reduction,
                          params=params_digest(ref_params)), sort_keys=True, default=str)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:20]
    cache_dir = Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else \
        Path(run_dir).parent / ".reference_cache"
    path = cache_dir / f"{split}-{fingerprint}.npz"
    if path.exists():
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        return ReferenceCache(arrays, int(arrays.pop("_width")))
    fn = _reference_pass(p.fns, spec, top_k)
    buckets = sorted(cfg.data.buckets)
    width = next(b for b in buckets if b >= cfg.data.max_length) - 1
    arrays: dict[str, np.ndarray] = {}
    from tqdm.auto import tqdm

    batches = _eval_batches(p, pairs, cfg.train.batch_size)
    for batch in tqdm(batches, desc=f"reference pass ({split})", disable=not cfg.train.progress):
        # Gathered from every host: each host's batcher later draws any example, so each needs all.
        out = jax.tree.map(_fetch, fn(ref_params, to_global(_model_inputs(batch), p.batch_sharding)))
        rows = host_rows({k: batch[k] for k in ("valid", "example_index")}, p.batch_sharding)
        valid = rows["valid"].astype(bool)
        idx = rows["example_index"][valid]
        for k, v in out.items():
            v = v[valid]
            if k.startswith("ref_topk"):
                pad = [(0, 0)] * v.ndim
                pad[2] = (0, width - v.shape[2])
                v = np.pad(v, pad)
            if k not in arrays:
                n = int(max(pairs.example_index)) + 1 if hasattr(pairs, "example_index") else len(pairs)
                arrays[k] = np.zeros((max(n, int(idx.max()) + 1),) + v.shape[1:], v.dtype)
            arrays[k][idx] = v
    if jax.process_index() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, _width=np.array(width), **arrays)
        tmp.replace(path)
    return ReferenceCache(arrays, width)
