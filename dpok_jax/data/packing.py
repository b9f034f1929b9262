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

With ``share_prompt`` (prefix sharing) a pair is one segment instead of two: the prompt is laid
down once and each response branches off it. The segment holds the prompt's tokens but the last
(branch 0), then the chosen sequence's remaining tokens (the prompt's last token and the chosen
response, branch 1), then the rejected sequence's remaining tokens (the prompt's last token again and
the rejected response, branch 2), with the positions the unpacked rows give them, and

- ``packed_branch`` int32 [R, P]: 0, 1 or 2 as above. A token attends to the earlier tokens of its
  segment that are in branch 0 or in its own branch, so every token sees exactly what it sees in its
  own unpacked sequence, and the prompt's last token is computed once per branch so that each
  response's first token is predicted from the position just before it. A prediction (label
  position ``t`` for token ``t + 1``) counts only where token ``t + 1`` attends token ``t``.

Prompt tokens are numbered with the chosen sequence (``packed_sequence``), which is where the
unpacked step pools the prompt embedding from. A pair of prompt length ``n_x`` then costs
``n_x + n_{y+} + n_{y-} + 1`` positions instead of ``2 n_x + n_{y+} + n_{y-}``.

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
    in packing order (chosen of its pairs, then rejected). [b] pair lengths (``share_prompt``) ->
    per micro-batch, its b/accum pairs' lengths."""
    if seq_lengths.ndim == 1:
        return [seq_lengths[m::accum] for m in range(accum)]
    return [np.concatenate([seq_lengths[m::accum, 0], seq_lengths[m::accum, 1]]) for m in range(accum)]


def shared_prefix(prompt_lengths: np.ndarray) -> np.ndarray:
    """Tokens of a pair laid down once with ``share_prompt``: the prompt but its last token."""
    return np.maximum(np.asarray(prompt_lengths, np.int64) - 1, 0)


def shared_pair_lengths(prompt_lengths, chosen_lengths, rejected_lengths) -> np.ndarray:
    """Positions one pair takes in a packed row with ``share_prompt`` (sequence lengths here are
    response lengths; the prompt is shared but its last token)."""
    p = np.asarray(prompt_lengths, np.int64)
    return 2 * p + np.asarray(chosen_lengths) + np.asarray(rejected_lengths) - shared_prefix(p)


def size_class(units: int) -> int:
    """The smallest of a few sizes >= ``units`` (every count up to 8, then about 1.125x apart: 9,
    11, 13, 15, 17, 20, 23, ...), so a run compiles the step for a handful of shapes only.

    >>> [size_class(n) for n in (1, 8, 9, 10, 12, 18)]
    [1, 8, 9, 11, 13, 20]
    """
    size = 1
    while size < units:
        size = max(size + 1, int(np.ceil(size * 1.125)))
    return size


def rows_needed(host_lengths: list[np.ndarray], capacity: int, *, accum: int = 1,
                row_multiple: int = 1) -> int:
    """Rows per process for a global batch: the most any process's micro-batch needs, times
    `accum`, rounded up to a multiple of `row_multiple` (its batch devices times `accum`) and then to
    one of a few sizes (`size_class` of the units).

    Args:
      host_lengths: per process, its pairs' (chosen, rejected) sequence lengths, int [b, 2], or
        with ``share_prompt`` its pairs' packed lengths (`shared_pair_lengths`), int [b].
      capacity: the packed row length.
    """
    per_micro = max(len(first_fit_decreasing(lens, capacity))
                    for lengths in host_lengths for lens in _micro_lengths(np.asarray(lengths), accum))
    unit = int(np.lcm(row_multiple, accum))
    units = -(-per_micro * accum // unit)
    return size_class(units) * unit


def tight_capacity(host_lengths: list[np.ndarray], *, accum: int = 1, row_multiple: int = 1,
                   minimum: int = 0, unit: int = 128) -> int:
    """The row length of **tight** rows (``data.pack_rows: tight``): each micro-batch of each process
    gets ``row_multiple`` rows (one per batch device), and the length is the shortest `size_class`
    multiple of ``unit`` (at least ``minimum``) into which first-fit decreasing packs every one of
    them. Padding is then at most the rounding (about 12% past 8 units) plus what first-fit leaves,
    where bucket-length rows leave up to a whole row empty. `host_lengths` as in `rows_needed`.

    >>> tight_capacity([np.array([300, 500, 200])])  # 1000 positions -> 8 units of 128
    1024
    >>> tight_capacity([np.array([300, 500, 200, 700])])  # 1700 -> 14 units -> size class 15
    1920
    >>> tight_capacity([np.array([300, 500, 200, 700])], row_multiple=2)  # two rows: 900 + 800
    1024
    """
    micro = [lens for lengths in host_lengths for lens in _micro_lengths(np.asarray(lengths), accum)]
    longest = max(int(np.max(m)) for m in micro)
    fewest = max(-(-int(np.sum(m)) // row_multiple) for m in micro)  # perfectly balanced rows
    units = size_class(-(-max(longest, fewest, int(minimum), 1) // unit))
    while not all(len(first_fit_decreasing(m, units * unit)) <= row_multiple for m in micro):
        units = size_class(units + 1)
    return units * unit


def pack_batch(batch: dict, *, rows: int, capacity: int, pad_token_id: int, accum: int = 1,
               pair_offset: int = 0, global_pairs: int | None = None, share_prompt: bool = False) -> dict:
    """An unpacked host batch (see `PreferenceBatcher`) -> the same pairs packed into `rows` rows of
    `capacity` tokens (module docstring). Raises if they do not fit (use `rows_needed`).

    `pair_offset` is this process's first pair in the global batch of `global_pairs` pairs (default:
    one process), so `packed_sequence` numbers the global (micro-)batch's sequences. `share_prompt`:
    one segment per pair, the prompt laid down once (module docstring)."""
    ids = {s: np.asarray(batch[f"{s}_input_ids"]) for s in ("chosen", "rejected")}
    attn = {s: np.asarray(batch[f"{s}_attention_mask"]) for s in ("chosen", "rejected")}
    resp = {s: np.asarray(batch[f"{s}_response_mask"]) for s in ("chosen", "rejected")}
    b = ids["chosen"].shape[0]
    if b % accum or rows % accum:
        raise ValueError(f"{b} pairs and {rows} rows must both divide into accum={accum} micro-batches")
    lengths = np.stack([attn["chosen"].sum(1), attn["rejected"].sum(1)], axis=1).astype(np.int64)
    if share_prompt:
        shared = _common_prompt(ids, attn, resp)
        items = lengths.sum(1) - shared  # [b] one item per pair
    else:
        items = lengths  # [b, 2] one item per sequence
    topk = "ref_topk_indices" in batch
    out = {k: v for k, v in batch.items() if k not in _UNPACKED and not k.startswith("ref_topk_")}
    tok = np.full((rows, capacity), pad_token_id, np.int32)
    seg = np.zeros((rows, capacity), np.int32)
    pos = np.zeros((rows, capacity), np.int32)
    rmask = np.zeros((rows, capacity), np.int32)
    branch = np.zeros((rows, capacity), np.int32)
    bm = b // accum
    gm = (b if global_pairs is None else int(global_pairs)) // accum  # pairs per global micro-batch
    if pair_offset % accum:
        raise ValueError(f"pair_offset={pair_offset} must be a multiple of accum={accum}")
    seq = np.full((rows, capacity), 2 * gm, np.int32)
    if topk:
        k = batch["ref_topk_indices"].shape[-1]
        tk_idx = np.zeros((rows, capacity - 1, k), batch["ref_topk_indices"].dtype)
        tk_lp = np.zeros((rows, capacity - 1, k), batch["ref_topk_logps"].dtype)
    for m, lens in enumerate(_micro_lengths(items, accum)):
        bins = first_fit_decreasing(lens, capacity)
        if len(bins) > rows // accum:
            raise ValueError(f"{len(bins)} packed rows needed for micro-batch {m}, only "
                             f"{rows // accum} given")
        for j, members in enumerate(bins):
            r = m + j * accum
            start = 0
            for n_seg, item in enumerate(sorted(members), start=1):
                # Pieces of source sequences laid end to end in this segment: (side, micro-batch
                # index, first and last + 1 source position, branch, whether the piece continues
                # the one before it in the same sequence).
                if share_prompt:
                    i = item
                    pair = m + i * accum
                    sh = int(shared[pair])
                    pieces = [("chosen", i, 0, sh, 0, False),
                              ("chosen", i, sh, int(lengths[pair, 0]), 1, True),
                              ("rejected", i, sh, int(lengths[pair, 1]), 2, False)]
                else:
                    side, i = ("chosen", item) if item < bm else ("rejected", item - bm)
                    pieces = [(side, i, 0, int(lens[item]), 0, False)]
                for side, i, lo, hi, br, continues in pieces:
                    pair = m + i * accum  # the host-local pair index of micro-batch m's i-th pair
                    sl = slice(start, start + hi - lo)
                    tok[r, sl] = ids[side][pair, lo:hi]
                    seg[r, sl] = n_seg
                    pos[r, sl] = np.arange(lo, hi)
                    rmask[r, sl] = resp[side][pair, lo:hi]
                    branch[r, sl] = br
                    seq[r, sl] = (gm if side == "rejected" else 0) + pair_offset // accum + i
                    # Label position t predicts token t + 1: source predictions a .. hi - 2 land at
                    # row positions start + (a - lo) ..; a continuing piece's first token is
                    # predicted by the row position just before it.
                    a = lo - 1 if continues and lo > 0 else lo
                    if topk and hi - 1 > a:
                        s = 0 if side == "chosen" else 1
                        lab = slice(start + a - lo, start + hi - 1 - lo)
                        tk_idx[r, lab] = batch["ref_topk_indices"][pair, s, a:hi - 1]
                        tk_lp[r, lab] = batch["ref_topk_logps"][pair, s, a:hi - 1]
                    start += hi - lo
    out.update(packed_input_ids=tok, packed_segment_ids=seg, packed_positions=pos,
               packed_response_mask=rmask, packed_sequence=seq)
    if share_prompt:
        out["packed_branch"] = branch
    if topk:
        out.update(packed_ref_topk_indices=tk_idx, packed_ref_topk_logps=tk_lp)
    return out


def _common_prompt(ids: dict, attn: dict, resp: dict) -> np.ndarray:
    """[b] tokens a pair's two sequences share with ``share_prompt``: their common prompt prefix
    (the same prompt, unless truncation cut the two differently), less the prompt's last token."""
    prompt = np.minimum(*(attn[s].sum(1) - resp[s].sum(1) for s in ("chosen", "rejected")))
    same = np.cumprod(ids["chosen"] == ids["rejected"], axis=1).sum(1)
    return np.minimum(shared_prefix(prompt), same)


def predicts_next(segments, branch=None):
    """[R, P-1] bool: where label position ``t`` predicts token ``t + 1`` of the same sequence, i.e.
    token ``t + 1`` attends token ``t``: the same segment and, with a shared prompt (`branch`),
    token ``t`` in branch 0 or in token ``t + 1``'s branch. NumPy or JAX arrays alike."""
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    if branch is not None:
        same = same & ((branch[:, :-1] == 0) | (branch[:, :-1] == branch[:, 1:]))
    return same


def unpack_topk(packed: dict, values: np.ndarray, *, pairs: int, width: int, accum: int = 1) -> np.ndarray:
    """Per-position values of a packed batch ([R, P-1, ...], label positions) back to the unpacked
    per-pair layout [pairs, 2, width, ...] (zeros past each sequence's end): how a packed reference
    pass fills the same cache as an unpacked one."""
    seq = np.asarray(packed["packed_sequence"])[:, 1:]
    segments = np.asarray(packed["packed_segment_ids"])
    branch = packed.get("packed_branch")
    branch = None if branch is None else np.asarray(branch)
    same = predicts_next(segments, branch)
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
    if branch is not None:
        # Inside the shared prefix (and for the prompt's last token) the rejected sequence's
        # predictions are the chosen one's: same tokens, same positions, same context.
        r, t = np.nonzero((branch == 0) & (segments > 0))
        s = np.asarray(packed["packed_sequence"])[r, t]
        shared = np.bincount(r % accum + s * accum, minlength=pairs)
        for p in np.nonzero(shared)[0]:
            out[p, 1, :shared[p]] = out[p, 0, :shared[p]]
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
