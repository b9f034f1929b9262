"""`tokenize_pairs`: normalized preference rows -> token ids, with every skipped row reported.

Length rule (the same for every format):
1. The prompt is ``[BOS] + tokens(prompt)`` (BOS only when the tokenizer has one and the text does not
   already start with it, as rendered chat templates often do). Longer than `max_prompt_length`, it
   keeps BOS and its *last* tokens (left truncation: the end of a prompt is what the response answers).
2. Each response is ``tokens(response) + [EOS]``. It gets the room left, ``max_length - len(prompt)``
   (>= 1, since ``max_prompt_length < max_length``); a longer response is cut from the right and then
   has no EOS (the model is not taught to stop mid-sentence).
3. Truncation keeps the row and is counted in the report. A row is dropped for length only when the
   cut chosen and rejected become identical (``identical_after_truncation``): then it holds no
   preference any more.

Prompt and responses are tokenized separately (as TRL does), so ``input_ids = prompt + response``
may differ from tokenizing the joined text at the boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from dpok_jax.data.formats import BAD_ROW_COLUMN, RowError, as_text
from dpok_jax.data.loading import ORIGIN_COLUMN
from dpok_jax.data.report import BadRowReport
from dpok_jax.data.synthetic import TASKS

EMBEDDING_COLUMNS = ("embedding_prompt", "embedding_chosen", "embedding_rejected")


@dataclasses.dataclass
class TokenizedPairs:
    """Token ids of N usable preference pairs (ragged; `PreferenceBatcher` pads them).

    Attributes:
      prompt_ids, chosen_ids, rejected_ids: N int32 arrays each; responses end with EOS unless cut.
      task_id: int32 [N], index into `task_names` (all 0 with ``("default",)`` without a task column).
      example_index: int64 [N], each pair's row index in the dataset given to `tokenize_pairs`.
      task_names: the task of each `task_id`.
      pad_token_id: the id batches are padded with.
      max_length: the longest ``prompt + response`` allowed when these were made.
      embeddings: ``embedding_prompt / embedding_chosen / embedding_rejected`` -> float32 [N, d], or {}.
    """

    prompt_ids: list[np.ndarray]
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    task_id: np.ndarray
    example_index: np.ndarray
    task_names: tuple[str, ...]
    pad_token_id: int
    max_length: int
    embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N]: the longer of ``prompt + chosen`` and ``prompt + rejected``, per pair."""
        return np.array([len(p) + max(len(c), len(r)) for p, c, r in
                         zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)], dtype=np.int64)

    def select(self, indices: Sequence[int]) -> "TokenizedPairs":
        """The pairs at positions `indices` (e.g. a subset for evaluation)."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self, prompt_ids=[self.prompt_ids[i] for i in idx], chosen_ids=[self.chosen_ids[i] for i in idx],
            rejected_ids=[self.rejected_ids[i] for i in idx], task_id=self.task_id[idx],
            example_index=self.example_index[idx], embeddings={k: v[idx] for k, v in self.embeddings.items()})


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _task_names(values: list, given: Sequence[str] | None) -> tuple[str, ...]:
    if given is not None:
        return tuple(given)
    present = {v if v is not None else "default" for v in values}
    # The synthetic tasks keep one fixed order, so train and eval splits agree on the ids.
    if present <= set(TASKS):
        return TASKS
    return tuple(sorted(map(str, present)))


def tokenize_pairs(dataset: Any, tokenizer: Any, *, max_prompt_length: int, max_length: int,
                   strict: bool = False, report: BadRowReport | None = None,
                   task_names: Sequence[str] | None = None, batch_size: int = 1024
                   ) -> tuple[TokenizedPairs, BadRowReport]:
    """Tokenize ``prompt / chosen / rejected`` rows; skip bad ones and count them by reason.

    See the module docstring for the length rule. Rows are skipped (reasons in `report.REASONS`) for
    a missing, non-string, undecodable or empty field, identical responses, an empty prompt without
    BOS, a row the loader could not normalize (``_bad_row``), or responses identical after truncation.

    Args:
      dataset: a `datasets.Dataset` (e.g. from `load_preference_dataset`) or anything with
        ``column_names`` and ``iter(batch_size=...)``.
      tokenizer: `ByteTokenizer` or a `transformers` tokenizer; must have ``eos_token_id``.
      max_prompt_length: most prompt tokens, BOS included.
      max_length: most tokens of ``prompt + response``; must exceed `max_prompt_length`.
      strict: raise `ValueError` naming the row (its ``_origin``, e.g. ``"train.jsonl:12"``, else its
        0-based position) and reason at the first bad row instead.
      report: a report to add to (default: a new one).
      task_names: fixes the task -> id mapping (pass the training pairs' names when tokenizing eval
        data); default `TASKS` when every task is one of them, else the sorted task values.
      batch_size: rows tokenized per call.

    Returns:
      ``(TokenizedPairs, BadRowReport)``.

    >>> from dpok_jax.data.tokenizer import ByteTokenizer
    >>> import datasets
    >>> ds = datasets.Dataset.from_dict({"prompt": ["Hi", "Hi"], "chosen": [" yo", " a"], "rejected": [" no", " a"]})
    >>> pairs, rep = tokenize_pairs(ds, ByteTokenizer(), max_prompt_length=8, max_length=16)
    >>> pairs.prompt_ids[0].tolist(), pairs.chosen_ids[0].tolist(), rep.counts
    ([257, 72, 105], [32, 121, 111, 258], {'identical_responses': 1})
    """
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
                         f"max_length={max_length}")
    eos, bos = tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer!r:.80} has no eos_token_id; responses must end with EOS")
    report = report if report is not None else BadRowReport()
    columns = list(dataset.column_names)
    emb_cols = [c for c in EMBEDDING_COLUMNS if c in columns]
    if emb_cols and len(emb_cols) != len(EMBEDDING_COLUMNS):
        raise ValueError(f"dataset has {emb_cols} but not {sorted(set(EMBEDDING_COLUMNS) - set(emb_cols))}: "
                         "dataset embeddings need all three columns")
    missing = {"prompt", "chosen", "rejected"} - set(columns)
    if missing:
        raise ValueError(f"dataset has no column(s) {sorted(missing)} (found {columns}); normalize it with "
                         "load_preference_dataset first")
    has_task = "task" in columns
    all_tasks = list(dataset["task"]) if has_task else []
    names = _task_names(all_tasks, task_names) if has_task else tuple(task_names or ("default",))
    task_index = {n: i for i, n in enumerate(names)}

    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "task": [], "row": []}
    embs: dict[str, list] = {c: [] for c in emb_cols}

    has_origin = ORIGIN_COLUMN in columns
    origins: list = []

    def skip(row: int, reason: str, detail: str) -> None:
        where = origins[row - start] if has_origin and origins[row - start] else f"row {row}"
        if strict:
            raise ValueError(f"{where}: bad row ({reason}): {detail} (data.strict is on; turn it off to "
                             "skip and count bad rows instead)")
        report.add(reason, where, detail)

    start = 0
    for batch in dataset.iter(batch_size=batch_size):
        n = len(batch["chosen"])
        origins = batch[ORIGIN_COLUMN] if has_origin else []
        good: list[tuple[int, str, str, str, int]] = []
        for j in range(n):
            row = start + j
            if BAD_ROW_COLUMN in batch and batch[BAD_ROW_COLUMN][j]:
                reason, _, detail = batch[BAD_ROW_COLUMN][j].partition(": ")
                skip(row, reason, detail)
                continue
            try:
                p, c, r = (as_text(batch[k][j], k) for k in ("prompt", "chosen", "rejected"))
                for k in emb_cols:
                    if batch[k][j] is None:
                        raise RowError("missing_field", f"{k!r} is null")
            except RowError as e:
                skip(row, e.reason, e.detail)
                continue
            if not c.strip() or not r.strip():
                skip(row, "empty_response", f"{'chosen' if not c.strip() else 'rejected'} is {c if not c.strip() else r!r}")
                continue
            if c == r:
                skip(row, "identical_responses", f"both are {c[:60]!r}")
                continue
            task = batch["task"][j] if has_task else "default"
            task = "default" if task is None else task
            if task not in task_index:
                skip(row, "unknown_task", f"task {task!r} is not in task_names {list(names)}")
                continue
            good.append((row, p, c, r, task_index[task]))
        ids = [_encode(tokenizer, [g[k] for g in good]) for k in (1, 2, 3)]
        for (row, _, _, _, tid), p_ids, c_ids, r_ids in zip(good, *ids):
            if bos is not None and (not p_ids or p_ids[0] != bos):
                p_ids = [bos] + list(p_ids)
            if not p_ids:
                skip(row, "empty_prompt", "the prompt has no tokens and the tokenizer no BOS")
                continue
            cut = []
            if len(p_ids) > max_prompt_length:
                keep = max_prompt_length - 1 if bos is not None else max_prompt_length
                p_ids = ([bos] if bos is not None else []) + list(p_ids[len(p_ids) - keep:])
                cut.append("prompt")
            room = max_length - len(p_ids)
            resp = []
            for name, r_ids in (("chosen", c_ids), ("rejected", r_ids)):
                r_ids = list(r_ids) + [eos]
                if len(r_ids) > room:
                    r_ids = r_ids[:room]
                    cut.append(name)
                resp.append(r_ids)
            if resp[0] == resp[1]:
                skip(row, "identical_after_truncation", f"chosen and rejected agree on the first {room} tokens "
                                                        f"left after the {len(p_ids)}-token prompt")
                continue
            for name in cut:
                report.add_truncated(name)
            j = row - start
            out["prompt"].append(np.asarray(p_ids, np.int32))
            out["chosen"].append(np.asarray(resp[0], np.int32))
            out["rejected"].append(np.asarray(resp[1], np.int32))
            out["task"].append(tid)
            out["row"].append(row)
            for k in emb_cols:
                embs[k].append(batch[k][j])
        start += n
    report.kept += len(out["row"])
    embeddings = {}
    for k in emb_cols:
        dims = {len(v) for v in embs[k]}
        if len(dims) > 1:
            raise ValueError(f"column {k!r} holds vectors of different sizes {sorted(dims)}")
        embeddings[k] = np.asarray(embs[k], np.float32).reshape(len(embs[k]), -1)
    if embeddings and len({v.shape[1] for v in embeddings.values()}) > 1:
        raise ValueError(f"embedding columns differ in size: { {k: v.shape[1] for k, v in embeddings.items()} }")
    pairs = TokenizedPairs(prompt_ids=out["prompt"], chosen_ids=out["chosen"], rejected_ids=out["rejected"],
                           task_id=np.asarray(out["task"], np.int32), example_index=np.asarray(out["row"], np.int64),
                           task_names=names, pad_token_id=int(pad), max_length=int(max_length),
                           embeddings=embeddings)
    return pairs, report
