"""Padding-free packing of preference pairs: several sequences per row, attention within a segment.

A padded batch spends its compute on padding: every row is as long as the batch's longest pair. A
packed batch lays the same pairs' sequences (prompt + chosen and prompt + rejected, one segment each)
end to end into ``R`` rows of one length ``P`` (first-fit decreasing), with

- ``packed_input_ids`` int32 [R, P]: the tokens, pad id after the last segment of a row;
- ``packed_segment_ids`` int32 [R, P]: 1, 2, ... per segment of the row, 0 on padding (attention is
  causal within a segment and never crosses one);
- ``packed_positions`` int32 [R, P]: rotary positions restarting at 0 in every segment (the positions
  the unpacked, right-padded row gives the same tokens);
- ``packed_response_mask`` int32 [R, P]: 1 on response tokens (EOS included);
- ``packed_sequence`` int32 [R, P]: which sequence of the (micro-)batch a token belongs to, chosen
  sequences first (``i`` for pair ``i``) then rejected (``b + i``), ``2b`` on padding. Per-sequence
  sums (log-probs, pooled embeddings) are ``segment_sum`` over it, so every result comes out in the
  unpacked step's order and the loss, gradients and metrics equal the unpacked step's.

Per-pair arrays (``task_id``, ``valid``, cached reference log-probs and embeddings, dataset
embeddings) are kept as they are. A precomputed reference's top-k rows ``ref_topk_*`` [b, 2, L-1, k]
are laid out like the tokens: ``packed_ref_topk_*`` [R, P-1, k].

Multi-host and gradient accumulation: every process packs only its own pairs, and all processes use
the same ``R`` (`rows_needed` is computed from the global batch's lengths, which every process knows).
With ``accum`` micro-batches (the step splits rows and pairs with stride ``accum``), the pairs of
micro-batch ``m`` (local pairs ``m, m + accum, ...``) go into rows ``m, m + accum, ...`` only, and
``packed_sequence`` numbers a micro-batch's sequences as the step will see them after the split.
"""

from __future__ import annotations

import numpy as np

_UNPACKED = tuple(f"{side}_{k}" for side in ("chosen", "rejected")
                  for k in ("input_ids", "attention_mask", "response_mask"))


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity` (longest first, each
    into the first bin with room). Deterministic: ties keep index order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {capacity}")
        for j, r in enumerate(room):
            if r >= n:
                bins[j].append(int(i))
                room[j] -= n
                break
        else:
            bins.append([int(i)])
            room.append(capacity - n)
    return bins


def _micro_lengths(seq_lengths: np.ndarray, accum: int) -> list[np.ndarray]:
    """[b, 2] (chosen, rejected) lengths of one host -> per micro-batch, the 2 * b/accum lengths
    in packing order (chosen of its pairs, then rejected)."""
    return [np.concatenate([seq_lengths[m::accum, 0], seq_lengths[m::accum, 1]]) for m in range(accum)]


def rows_needed(host_lengths: list[np.ndarray], capacity: int, *, accum: int = 1,
                row_multiple: int = 1) -> int:
    """Rows per process for a global batch: the most any process's micro-batch needs, times
    `accum`, rounded up to a multiple of `row_multiple` (its batch devices times `accum`) and then to
    one of a few sizes (every count up to 8 units, then about 1.125x apart), so a run compiles the
    step for a handful of shapes only.

    Args:
      host_lengths: per process, its pairs' (chosen, rejected) sequence lengths, int [b, 2].
      capacity: the packed row length.
    """
    per_micro = max(len(first_fit_decreasing(lens, capacity))
                    for lengths in host_lengths for lens in _micro_lengths(np.asarray(lengths), accum))
    unit = int(np.lcm(row_multiple, accum))
    units = -(-per_micro * accum // unit)
    size = 1
    while size < units:
        size = max(size + 1, int(np.ceil(size * 1.125)))
    return size * unit


def pack_batch(batch: dict, *, rows: int, capacity: int, pad_token_id: int, accum: int = 1,
               pair_offset: int = 0, global_pairs: int | None = None) -> dict:
    """An unpacked host batch (see `PreferenceBatcher`) -> the same pairs packed into `rows` rows of
    `capacity` tokens (module docstring). Raises if they do not fit (use `rows_needed`).

    `pair_offset` is this process's first pair in the global batch of `global_pairs` pairs (default:
    one process), so `packed_sequence` numbers the global (micro-)batch's sequences."""
    ids = {s: np.asarray(batch[f"{s}_input_ids"]) for s in ("chosen", "rejected")}
    attn = {s: np.asarray(batch[f"{s}_attention_mask"]) for s in ("chosen", "rejected")}
    resp = {s: np.asarray(batch[f"{s}_response_mask"]) for s in ("chosen", "rejected")}
    b = ids["chosen"].shape[0]
    if b % accum or rows % accum:
        raise ValueError(f"{b} pairs and {rows} rows must both divide into accum={accum} micro-batches")
    lengths = np.stack([attn["chosen"].sum(1), attn["rejected"].sum(1)], axis=1).astype(np.int64)
    topk = "ref_topk_indices" in batch
    out = {k: v for k, v in batch.items() if k not in _UNPACKED and not k.startswith("ref_topk_")}
    tok = np.full((rows, capacity), pad_token_id, np.int32)
    seg = np.zeros((rows, capacity), np.int32)
    pos = np.zeros((rows, capacity), np.int32)
    rmask = np.zeros((rows, capacity), np.int32)
    bm = b // accum
    gm = (b if global_pairs is None else int(global_pairs)) // accum  # pairs per global micro-batch
    if pair_offset % accum:
        raise ValueError(f"pair_offset={pair_offset} must be a multiple of accum={accum}")
    seq = np.full((rows, capacity), 2 * gm, np.int32)
    if topk:
        k = batch["ref_topk_indices"].shape[-1]
        tk_idx = np.zeros((rows, capacity - 1, k), batch["ref_topk_indices"].dtype)
        tk_lp = np.zeros((rows, capacity - 1, k), batch["ref_topk_logps"].dtype)
    for m, lens in enumerate(_micro_lengths(lengths, accum)):
        bins = first_fit_decreasing(lens, capacity)
        if len(bins) > rows // accum:
            raise ValueError(f"{len(bins)} packed rows needed for micro-batch {m}, only "
                             f"{rows // accum} given")
        for j, members in enumerate(bins):
            r = m + j * accum
            start = 0
            for n_seg, item in enumerate(sorted(members), start=1):
                side, i = ("chosen", item) if item < bm else ("rejected", item - bm)
                pair = m + i * accum  # the host-local pair index of micro-batch m's i-th pair
                n = int(lens[item])
                sl = slice(start, start + n)
                tok[r, sl] = ids[side][pair, :n]
                seg[r, sl] = n_seg
                pos[r, sl] = np.arange(n)
                rmask[r, sl] = resp[side][pair, :n]
                seq[r, sl] = (gm if side == "rejected" else 0) + pair_offset // accum + i
                if topk and n > 1:
                    s = 0 if side == "chosen" else 1
                    # label position t predicts token t + 1: a segment's n - 1 predictions.
                    tk_idx[r, start:start + n - 1] = batch["ref_topk_indices"][pair, s, :n - 1]
                    tk_lp[r, start:start + n - 1] = batch["ref_topk_logps"][pair, s, :n - 1]
                start += n
    out.update(packed_input_ids=tok, packed_segment_ids=seg, packed_positions=pos,
               packed_response_mask=rmask, packed_sequence=seq)
    if topk:
        out.update(packed_ref_topk_indices=tk_idx, packed_ref_topk_logps=tk_lp)
    return out


def unpack_topk(packed: dict, values: np.ndarray, *, pairs: int, width: int, accum: int = 1) -> np.ndarray:
    """Per-position values of a packed batch ([R, P-1, ...], label positions) back to the unpacked
    per-pair layout [pairs, 2, width, ...] (zeros past each sequence's end): how a packed reference
    pass fills the same cache as an unpacked one."""
    seq = np.asarray(packed["packed_sequence"])[:, 1:]
    same = np.asarray(packed["packed_segment_ids"])[:, 1:] == np.asarray(packed["packed_segment_ids"])[:, :-1]
    same &= np.asarray(packed["packed_segment_ids"])[:, 1:] > 0
    label_pos = np.asarray(packed["packed_positions"])[:, 1:] - 1
    rows = np.arange(seq.shape[0])[:, None].repeat(seq.shape[1], 1)
    bm = pairs // accum
    r, t = np.nonzero(same)
    s = seq[r, t]
    m = rows[r, t] % accum
    side = (s >= bm).astype(np.int64)
    pair = m + (s - side * bm) * accum
    out = np.zeros((pairs, 2, width) + values.shape[2:], values.dtype)
    out[pair, side, label_pos[r, t]] = values[r, t]
    return out


def apply_packing(batch: dict) -> dict:
    """The packed layout of a batch planned by `PreferenceBatcher(packing=True)` (its ``"_pack"``
    entry); a batch without one is returned as it is."""
    if "_pack" not in batch:
        return batch
    batch = dict(batch)
    plan = batch.pop("_pack")
    return pack_batch(batch, **plan)


class PackedBatcher:
    """A batcher (or a batcher with cached reference values attached) whose batches come packed;
    `state` / `restore` pass through."""

    def __init__(self, batcher):
        self.batcher = batcher

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return apply_packing(next(self.batcher))

    def state(self) -> dict:
        return self.batcher.state()

    def restore(self, state: dict) -> None:
        self.batcher.restore(state)
