"""`PreferenceBatcher`: padded numpy batches from `TokenizedPairs`, per host, resumable.

Every host computes the same global order (a permutation drawn from ``(seed, epoch)``) and the same
padded length, and keeps only its contiguous slice of each global batch, so the hosts' slices form
one global batch without any communication.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from dpok_jax.data.tokenization import TokenizedPairs

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
# Packed row shapes (``data.pack_rows``): "bucket" rows as long as the batch's bucket, as many as
# first-fit needs; "tight" rows, one per batch device and micro-batch, as long as they need
# (`packing.tight_capacity`); "auto" (`resolve_pack_rows`).
PACK_ROWS = ("auto", "bucket", "tight")


def resolve_pack_rows(pack_rows: str, platform: str | None = None) -> str:
    """``"auto"`` -> ``"tight"`` on CPU, whose tiled attention skips other segments' keys, and
    ``"bucket"`` elsewhere (GPU/TPU attention kernels cover a row's whole causal triangle, which
    grows with the square of the row length); other values unchanged. ``platform`` defaults to
    `jax.default_backend`."""
    if pack_rows not in PACK_ROWS:
        raise ValueError(f"pack_rows must be one of {PACK_ROWS}, got {pack_rows!r}")
    if pack_rows != "auto":
        return pack_rows
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "tight" if platform == "cpu" else "bucket"


class PreferenceBatcher:
    """Shuffled, bucket-padded batches of preference pairs for this host; cycles through epochs.

    Batch (numpy, ``b = global_batch_size // process_count`` rows, L a bucket):
      ``chosen_input_ids, chosen_attention_mask, chosen_response_mask`` and the ``rejected_*`` three:
      int32 [b, L]; ``input_ids = prompt + response``, right-padded with the pad id;
      ``attention_mask`` is 1 on prompt and response; ``response_mask`` is 1 on response tokens
      (EOS included). L is the smallest bucket holding the longest sequence of the *global* batch,
      chosen and rejected alike (one L for both, so they can be concatenated; one L on all hosts).
      ``task_id`` int32 [b], ``example_index`` int32 [b] (row in the source dataset), ``valid`` bool
      [b] (False on padding rows of a partial batch, which copy a real row), and with dataset
      embeddings ``embedding_prompt / embedding_chosen / embedding_rejected`` float32 [b, d].

    Order: epoch e visits the pairs in ``default_rng([seed, e]).permutation(N)`` (or in order without
    `shuffle`); `state()` / `restore()` record ``(epoch, position)`` so a resumed run gets exactly
    the batches the uninterrupted run would have had.

    Args:
      pairs: from `tokenize_pairs`.
      global_batch_size: rows of one batch over all hosts; divisible by `process_count`.
      seed: shuffling seed.
      buckets: allowed padded lengths; the largest must hold every pair (>= ``pairs.max_length``).
      shuffle: reshuffle every epoch (else dataset order).
      drop_last: drop an epoch's last partial batch (else pad it, ``valid`` False on the padding).
        With fewer pairs than one global batch and `drop_last`, training (`next`) raises a one-line
        error saying how many pairs it needs; `iterate_once` works with any number of pairs.
      process_index, process_count: this host and the number of hosts.
      packing: plan padding-free packed rows (`dpok_jax.data.packing`): each batch then carries a
        ``"_pack"`` entry (rows, row length, ...) that `packing.apply_packing` turns into the packed
        layout once any cached reference values are attached. The row length is the batch's bucket;
        the row count is the same on every host. `pack_length`: rows are at least this long (the
        smallest bucket holding it), so that short sequences share rows. `pack_share_prompt`: a
        pair's prompt is laid down once and both responses branch off it (prefix sharing; the row
        length is then the smallest bucket holding the batch's longest pair, or a multiple of 128
        past the largest bucket).
      pack_row_multiple: the packed row count per host is a multiple of this (the host's batch
        devices); `pack_accum`: gradient-accumulation micro-batches (rows are packed per micro-batch).
      pack_rows: ``"bucket"`` (above) or ``"tight"``: ``pack_row_multiple`` rows per micro-batch,
        as long as the longest of them needs rounded up to a few sizes (`packing.tight_capacity`;
        `pack_length` is then a lower bound, and the buckets play no part), or ``"auto"`` (the
        default): `resolve_pack_rows` on JAX's default backend, tight on CPU, bucket elsewhere.

    >>> import datasets
    >>> from dpok_jax.data import ByteTokenizer, tokenize_pairs
    >>> ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "chosen": [" x"] * 3, "rejected": [" y"] * 3})
    >>> pairs, _ = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=4, max_length=8)
    >>> batcher = PreferenceBatcher(pairs, global_batch_size=2, seed=0, buckets=(8, 16))
    >>> batch = next(batcher)
    >>> batch["chosen_input_ids"].shape, batch["chosen_response_mask"][0].tolist(), batcher.steps_per_epoch
    ((2, 8), [0, 0, 1, 1, 1, 0, 0, 0], 1)
    """

    def __init__(self, pairs: TokenizedPairs, *, global_batch_size: int, seed: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, shuffle: bool = True, drop_last: bool = True,
                 process_index: int = 0, process_count: int = 1, packing: bool = False,
                 pack_row_multiple: int = 1, pack_accum: int = 1, pack_length: int = 0,
                 pack_share_prompt: bool = True, pack_rows: str = "auto"):
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
        if len(pairs) == 0:
            raise ValueError("PreferenceBatcher: no pairs (every row was skipped? see the bad-row report)")
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets={tuple(buckets)} must be positive lengths")
        self._lengths = pairs.lengths
        longest = max(int(self._lengths.max()), int(pairs.max_length))
        if longest > self.buckets[-1]:
            raise ValueError(f"the largest bucket {self.buckets[-1]} is shorter than max_length "
                             f"{pairs.max_length} (longest pair: {int(self._lengths.max())} tokens); "
                             "add a bucket >= max_length")
        self.pairs = pairs
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.packing, self.pack_row_multiple, self.pack_accum = bool(packing), int(pack_row_multiple), int(pack_accum)
        self.pack_length = int(pack_length)
        self.pack_share_prompt = bool(pack_share_prompt)
        if pack_rows not in PACK_ROWS:
            raise ValueError(f"pack_rows must be one of {PACK_ROWS}, got {pack_rows!r}")
        self.pack_rows = resolve_pack_rows(pack_rows) if self.packing else pack_rows
        if self.packing and self.local_batch_size % self.pack_accum:
            raise ValueError(f"packing: {self.local_batch_size} pairs per host do not split into "
                             f"{self.pack_accum} micro-batches")
        n = len(pairs)
        self.steps_per_epoch = n // self.global_batch_size if drop_last else -(-n // self.global_batch_size)
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.pairs)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def state(self) -> dict:
        """``{"epoch", "position"}`` (plus the settings they depend on, checked by `restore`)."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "num_examples": len(self.pairs), "global_batch_size": self.global_batch_size}

    def restore(self, state: dict) -> None:
        """Continue from a `state()`: the next batch is the one that followed when it was taken."""
        for key in ("seed", "num_examples", "global_batch_size"):
            mine = self.state()[key]
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot restore data position: saved {key}={int(state[key])}, this run has "
                                 f"{mine} (the data or batch size changed since the checkpoint)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(f"invalid data state epoch={epoch}, position={position} "
                             f"(steps_per_epoch={self.steps_per_epoch})")
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch if self._position < self.steps_per_epoch else self._epoch + 1

    def __iter__(self) -> "PreferenceBatcher":
        return self

    def __next__(self) -> dict:
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.pairs)} pairs are fewer than one global batch of "
                             f"{self.global_batch_size}: training needs at least {self.global_batch_size} "
                             "usable pairs (every step takes one full batch; iterate_once() pads instead)")
        if self._position >= self.steps_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        g = self.global_batch_size
        rows = self._order[self._position * g:(self._position + 1) * g]
        self._position += 1
        return self._build(rows)

    def iterate_once(self) -> Iterator[dict]:
        """One pass in dataset order (no shuffle): every pair exactly once, whatever the batch size.

        ``ceil(N / global_batch_size)`` batches on every host (so collectives match across hosts);
        the last one is padded with copies of a real row marked ``valid`` False. Independent of the
        training position (`state()` is unchanged) and of `drop_last`.
        """
        g, n = self.global_batch_size, len(self.pairs)
        for start in range(0, n, g):
            yield self._build(np.arange(start, min(start + g, n)))

    def _build(self, rows: np.ndarray) -> dict:
        g = self.global_batch_size
        valid = np.zeros(g, bool)
        valid[:len(rows)] = True
        # Padding rows copy the batch's first row: real tokens keep every masked computation finite.
        rows = np.concatenate([rows, np.full(g - len(rows), rows[0], rows.dtype)])
        longest = int(self._lengths[rows].max())
        length = next(b for b in self.buckets if b >= longest)
        lo = self.process_index * self.local_batch_size
        mine, valid = rows[lo:lo + self.local_batch_size], valid[lo:lo + self.local_batch_size]
        p = self.pairs
        b = len(mine)
        batch: dict[str, np.ndarray] = {}
        for side, responses in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            ids = np.full((b, length), p.pad_token_id, np.int32)
            attn = np.zeros((b, length), np.int32)
            resp = np.zeros((b, length), np.int32)
            for i, r in enumerate(mine):
                prompt, response = p.prompt_ids[r], responses[r]
                k, m = len(prompt), len(prompt) + len(response)
                ids[i, :k], ids[i, k:m] = prompt, response
                attn[i, :m] = 1
                resp[i, k:m] = 1
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = ids, attn
            batch[f"{side}_response_mask"] = resp
        batch["task_id"] = p.task_id[mine].astype(np.int32)
        batch["example_index"] = p.example_index[mine].astype(np.int32)
        batch["valid"] = valid
        for k, v in p.embeddings.items():
            batch[k] = v[mine]
        if self.packing:
            batch["_pack"] = self._pack_plan(rows, length, lo)
        return batch

    def _pack_plan(self, rows: np.ndarray, length: int, lo: int) -> dict:
        """The ``"_pack"`` entry of a global batch's rows (the same row count on every host)."""
        from dpok_jax.data.packing import rows_needed, shared_pair_lengths, tight_capacity

        p, lb = self.pairs, self.local_batch_size
        prompt, chosen, rejected = (np.array([len(x[r]) for r in rows]) for x in
                                    (p.prompt_ids, p.chosen_ids, p.rejected_ids))
        if self.pack_share_prompt:  # one item per pair: its prompt laid down once
            lengths = shared_pair_lengths(prompt, chosen, rejected)
        else:  # one item per sequence
            lengths = np.stack([prompt + chosen, prompt + rejected], axis=1)
        host_lengths = [lengths[h * lb:(h + 1) * lb] for h in range(self.process_count)]
        if self.pack_rows == "tight":  # one row per batch device and micro-batch, as long as needed
            rows = self.pack_row_multiple * self.pack_accum
            capacity = tight_capacity(host_lengths, accum=self.pack_accum,
                                      row_multiple=self.pack_row_multiple, minimum=self.pack_length)
        else:
            target = max(int(lengths.max()), length, self.pack_length)
            capacity = next((b for b in self.buckets if b >= target), -(-target // 128) * 128)
            rows = rows_needed(host_lengths, capacity, accum=self.pack_accum,
                               row_multiple=self.pack_row_multiple)
        return dict(rows=rows,
                    capacity=capacity, pad_token_id=int(p.pad_token_id), accum=self.pack_accum,
                    pair_offset=lo, global_pairs=self.global_batch_size,
                    share_prompt=self.pack_share_prompt)


def make_batcher(pairs: TokenizedPairs, *, batch_size: int, seed: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, batch_ways: int = 1, packing: bool = False,
                 accum: int = 1, pack_length: int = 0, pack_share_prompt: bool = True,
                 pack_rows: str = "auto", process_index: int | None = None, process_count: int | None = None) -> PreferenceBatcher:
    """This host's `PreferenceBatcher` for a run: `batch_size` rows per global batch, this process's
    slice of it (JAX's process index and count unless given).

    With `packing`, batches are planned for packed rows (apply `packing.apply_packing` after attaching
    any cached reference values): each host's row count is a multiple of its batch devices
    (`batch_ways`, the mesh's data x fsdp, over the processes) and rows are packed per
    gradient-accumulation micro-batch (`accum`), a pair's prompt shared by its two responses unless
    `pack_share_prompt` is false, in rows of the `pack_rows` shape (`PACK_ROWS`).

    >>> import datasets
    >>> from dpok_jax.data import ByteTokenizer, tokenize_pairs
    >>> ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": [" x"] * 2, "rejected": [" y"] * 2})
    >>> pairs, _ = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=4, max_length=8)
    >>> next(make_batcher(pairs, batch_size=2, seed=0, buckets=(8,), process_index=0, process_count=1))["valid"].tolist()
    [True, True]
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    return PreferenceBatcher(
        pairs, global_batch_size=batch_size, seed=seed, buckets=buckets,
        process_index=process_index, process_count=process_count, packing=packing,
        pack_row_multiple=max(1, batch_ways // process_count), pack_accum=accum,
        pack_length=pack_length, pack_share_prompt=pack_share_prompt, pack_rows=pack_rows)
