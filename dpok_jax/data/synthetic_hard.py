"""A harder variant of the embedded synthetic tasks, for `dpok sweep`: shifted held-out prompts and
noisy training labels, so that methods can differ (on the default tasks every method reaches ~0.98).

The five families and their pair rules are those of `dpok_jax.data.synthetic`; what changes is
which prompt combinations are held out, and the training labels:

- distribution shift: held-out prompts use wordings or entities that never occur in training:
  ``factuality``: one of the two stated entities comes from a held-out third of each table (capitals,
  element symbols), so the answer must be copied from the prompt, not remembered;
  ``reasoning``: two of the six question wordings ("Max of", "Min of") only in the held-out split;
  ``truthfulness``: two of the six yes/no templates only held out;
  ``safety``: two of the eight request templates only held out;
  ``instruction_following``: the last six words of the vocabulary only held out.
- label noise: a fraction `noise` of the training pairs have chosen and rejected swapped (the held-out
  split is clean), as preference data gathered from annotators is.

Same format as `synthetic_tasks`: a `datasets.DatasetDict` with "train" and "test", columns
``prompt, chosen, rejected, task``, and the same lengths (one 64-token bucket with the byte tokenizer).
`write_hard_tasks` saves it as ``train.jsonl`` / ``test.jsonl`` in a folder, which `data.source`
reads like any local preference data.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np

from dpok_jax.data import synthetic

TASKS = synthetic.TASKS


def _held_out(task: str, combo: tuple) -> bool:
    """Whether a prompt combination belongs to the shifted held-out side."""
    if task == "factuality":
        kind, i, j, _ = combo
        n = len(synthetic._CAPITALS if kind == "capital" else synthetic._ELEMENTS)
        unseen = range(n - n // 3, n)
        return (i in unseen) != (j in unseen)  # exactly one unseen entity; both unseen: dropped
    if task == "reasoning":
        return combo[2] in (2, 5)
    if task == "truthfulness":
        return combo[2] in (4, 5)
    if task == "safety":
        return combo[2] in (6, 7)
    if task == "instruction_following":
        return combo[2] >= len(synthetic._WORDS) - 6
    raise ValueError(f"unknown task {task!r}")


def _dropped(task: str, combo: tuple) -> bool:
    if task != "factuality":
        return False
    kind, i, j, _ = combo
    n = len(synthetic._CAPITALS if kind == "capital" else synthetic._ELEMENTS)
    return i >= n - n // 3 and j >= n - n // 3


def synthetic_hard_tasks(seed: int = 0, *, n_train_per_task: int = 300, n_eval_per_task: int = 40,
                         noise: float = 0.15) -> datasets.DatasetDict:
    """The five tasks with shifted held-out prompts and `noise` flipped training labels.

    Args:
      seed: everything (order, distractors, which training pairs are flipped) follows from it.
      n_train_per_task, n_eval_per_task: pairs per task in each split (combinations repeat when
        more are asked for than exist).
      noise: fraction of training pairs with chosen and rejected swapped, in [0, 0.5).

    >>> d = synthetic_hard_tasks(0, n_train_per_task=40, n_eval_per_task=5, noise=0.25)
    >>> d["train"].num_rows, d["test"].num_rows, sorted(set(d["test"]["task"])) == sorted(TASKS)
    (200, 25, True)
    >>> any("Max of" in p for p in d["train"]["prompt"]), any("Max of" in p for p in d["test"]["prompt"])
    (False, True)
    """
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"synthetic_hard_tasks: noise={noise} must be in [0, 0.5)")
    if n_train_per_task < 1 or n_eval_per_task < 1:
        raise ValueError(f"synthetic_hard_tasks: n_train_per_task={n_train_per_task} and "
                         f"n_eval_per_task={n_eval_per_task} must be >= 1")
    cols = {s: {"prompt": [], "chosen": [], "rejected": [], "task": []} for s in ("train", "test")}
    for k, task in enumerate(TASKS):
        combos, pair = synthetic._FAMILIES[task]()
        rng = np.random.default_rng([seed, 100 + k])
        pools = {"test": [c for c in combos if _held_out(task, c)],
                 "train": [c for c in combos if not _held_out(task, c) and not _dropped(task, c)]}
        for split, n in (("test", n_eval_per_task), ("train", n_train_per_task)):
            picked = synthetic._cycle(rng, pools[split], n)
            flips = rng.random(n) < noise if split == "train" else np.zeros(n, bool)
            for combo, flip in zip(picked, flips):
                q, chosen, rejected = pair(combo, rng)
                if flip:
                    chosen, rejected = rejected, chosen
                c = cols[split]
                c["prompt"].append(f"Q: {q}\nA:")
                c["chosen"].append(f" {chosen}")
                c["rejected"].append(f" {rejected}")
                c["task"].append(task)
    out = {}
    for i, (split, c) in enumerate(cols.items()):
        perm = np.random.default_rng([seed, 200 + i]).permutation(len(c["task"]))
        out[split] = datasets.Dataset.from_dict({key: [v[j] for j in perm] for key, v in c.items()})
    return datasets.DatasetDict(out)


def write_hard_tasks(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """`synthetic_hard_tasks(seed, **kwargs)` as ``folder/train.jsonl`` and ``folder/test.jsonl``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, ds in synthetic_hard_tasks(seed, **kwargs).items():
        tmp = folder / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in ds))
        tmp.replace(folder / f"{split}.jsonl")
    return folder
