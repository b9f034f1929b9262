"""`load_pairs`: the `data:` config section -> tokenized training and evaluation pairs.

Sources (``data.source``, ``data.eval_source``):

- ``"synthetic"``: its own ``train`` and ``test`` splits.
- a single file (or a folder without ``data.eval_split`` files) and no ``data.eval_source``: the
  ``data.train_split`` rows are tokenized once, then a deterministic
  slice of its usable pairs is held out for evaluation: ``k = round(eval_fraction * N)`` clipped to
  ``[1, cap]`` with ``cap = data.max_eval_examples`` (1000 when unset), the pairs at
  ``default_rng(data.seed).permutation(N)[:k]``. Training gets the other ``N - k``.
- a folder or a hub name: its ``train_split`` and ``eval_split`` (or ``data.eval_source``).

Every pair of the evaluation side is evaluated (`PreferenceBatcher.iterate_once` pads the last batch),
so its size need not be a multiple of the batch size. Training needs at least one full global batch;
fewer usable pairs is a one-line error saying how many rows are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from dpok_jax.data.loading import load_preference_dataset
from dpok_jax.data.readers import folder_files
from dpok_jax.data.report import BadRowReport
from dpok_jax.data.tokenization import TokenizedPairs, tokenize_pairs

DEFAULT_HELD_OUT_CAP = 1000


def held_out_count(n: int, fraction: float, cap: int | None = None) -> int:
    """Pairs held out of `n` usable ones: ``round(fraction * n)`` clipped to ``[1, cap or 1000]``.

    >>> held_out_count(300, 0.05), held_out_count(10, 0.05), held_out_count(10**6, 0.05)
    (15, 1, 1000)
    """
    cap = DEFAULT_HELD_OUT_CAP if cap is None else int(cap)
    return int(max(1, min(round(fraction * n), cap)))


def rows_needed(train_pairs: int, fraction: float, cap: int | None = None) -> int:
    """Fewest usable pairs `n` of a single file such that ``n - held_out_count(n) >= train_pairs``.

    >>> rows_needed(16, 0.05), rows_needed(16, 0.5)
    (17, 32)
    """
    n = train_pairs + 1
    while n - held_out_count(n, fraction, cap) < train_pairs:
        n += 1
    return n


def _one_split(path: Path, eval_split: str) -> bool:
    """A file, or a folder without files of `eval_split`: evaluation pairs are held out of it."""
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    try:
        folder_files(path, eval_split)
    except ValueError:
        return True
    return False


def _tokenize(ds, tokenizer, d, task_names=None) -> tuple[TokenizedPairs, BadRowReport]:
    return tokenize_pairs(ds, tokenizer, max_prompt_length=d.max_prompt_length, max_length=d.max_length,
                          strict=d.strict, task_names=task_names, report=BadRowReport(source=str(d.source)))


def _no_pairs(name: str, source: Any, report: BadRowReport) -> ValueError:
    return ValueError(f"no usable {name} pairs left in {str(source)!r}: {report.summary()}")


def load_pairs(data_cfg: Any, tokenizer: Any, run_dir: epath.PathLike | None = None, is_main_process: bool = True,
               min_train_pairs: int = 1) -> tuple[TokenizedPairs, TokenizedPairs]:
    """Load, hold out, tokenize and report the pairs of a `config.DataSection`.

    Args:
      data_cfg: the ``data`` section (source, eval_source, splits, format, lengths, strict, seed,
        eval_fraction, max_eval_examples, synthetic sizes).
      tokenizer: from `load_tokenizer`.
      run_dir: where ``bad_rows_train.json`` and ``bad_rows_eval.json`` go (None: not saved).
      is_main_process: only the main process writes the reports and prints.
      min_train_pairs: the largest global batch training takes (one full batch per step).

    Returns:
      ``(train_pairs, eval_pairs)``; eval uses the training pairs' task ids.

    Raises:
      ValueError: no usable pairs on a side, or fewer training pairs than `min_train_pairs` (one line
      naming the count needed and why).
    """
    d = data_cfg
    say = (lambda msg: print(msg, flush=True)) if is_main_process else (lambda msg: None)
    reports: dict[str, BadRowReport] = {}
    single = d.source != "synthetic" and d.eval_source is None and _one_split(Path(str(d.source)).expanduser(),
                                                                             d.eval_split)
    if single:
        ds = load_preference_dataset(d.source, split=d.train_split, format=d.format, tokenizer=tokenizer)
        pairs, report = _tokenize(ds, tokenizer, d)
        if len(pairs) == 0:
            raise _no_pairs("train", d.source, report)
        n = len(pairs)
        held = held_out_count(n, d.eval_fraction, d.max_eval_examples)
        if n - held < min_train_pairs:
            k = report.total_skipped
            skipped = f" ({k} row{'s' if k > 1 else ''} skipped, see bad_rows_train.json)" if k else ""
            raise ValueError(
                f"data.source {str(d.source)!r} is too small: {n} usable pairs{skipped}, {held} held out for "
                f"evaluation (data.eval_fraction={d.eval_fraction}) leave {n - held} for training, fewer "
                f"than one global batch of {min_train_pairs}; it needs at least "
                f"{rows_needed(min_train_pairs, d.eval_fraction, d.max_eval_examples)} usable rows "
                "(or a smaller batch size, or a separate data.eval_source)")
        order = np.random.default_rng(d.seed).permutation(n)
        train_pairs, eval_pairs = pairs.select(np.sort(order[held:])), pairs.select(np.sort(order[:held]))
        reports["train"] = report
        reports["eval"] = BadRowReport(source=f"{d.source} (the {held} held-out pairs; the file's bad rows "
                                              "are in bad_rows_train.json)", kept=held)
        say(f"data.source has one split: {held} of its {n} usable pairs held out for evaluation "
            f"(data.eval_fraction={d.eval_fraction}; set data.eval_source to use a separate file).")
    else:
        if d.source == "synthetic":
            from dpok_jax.data.synthetic import synthetic_tasks

            splits = synthetic_tasks(d.seed, n_train_per_task=d.synthetic_train_per_task,
                                     n_eval_per_task=d.synthetic_eval_per_task)
            train_ds, eval_ds = splits["train"], splits["test"]
        else:
            train_ds = load_preference_dataset(d.source, split=d.train_split, format=d.format, tokenizer=tokenizer)
            eval_ds = load_preference_dataset(d.eval_source or d.source, split=d.eval_split, format=d.format,
                                              tokenizer=tokenizer)
        if d.max_eval_examples is not None and len(eval_ds) > d.max_eval_examples:
            eval_ds = eval_ds.select(range(d.max_eval_examples))
        train_pairs, reports["train"] = _tokenize(train_ds, tokenizer, d)
        if len(train_pairs) == 0:
            raise _no_pairs("train", d.source, reports["train"])
        if len(train_pairs) < min_train_pairs:
            raise ValueError(f"data.source {str(d.source)!r} is too small: {len(train_pairs)} usable train pairs "
                             f"are fewer than one global batch of {min_train_pairs}; training needs at least "
                             f"{min_train_pairs} (every step takes one full batch)")
        eval_pairs, reports["eval"] = _tokenize(eval_ds, tokenizer, d, task_names=list(train_pairs.task_names))
        reports["eval"].source = str(d.eval_source or d.source)
        if len(eval_pairs) == 0:
            raise _no_pairs("eval", d.eval_source or d.source, reports["eval"])
    for name, report in reports.items():
        if run_dir is not None and is_main_process:
            report.save(epath.Path(run_dir) / f"bad_rows_{name}.json")
        if report.total_skipped:
            say(f"[{name} data] {report.summary()}")
    return train_pairs, eval_pairs
