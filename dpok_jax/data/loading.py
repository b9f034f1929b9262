"""`load_preference_dataset`: a local file or folder, a hub name, or the synthetic tasks, as rows of
``prompt / chosen / rejected`` strings, each row knowing where it came from.

Local files are read by `readers` (values exactly as written, bad records kept as bad rows); a
folder's files follow the same rules as a single file. The format is detected from the shape most
rows have, then every row is normalized on its own: a row that does not fit is reported, never
allowed to change how the other rows are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import datasets

from dpok_jax.data.formats import BAD_ROW_COLUMN, FORMATS, RowError, detect_format, normalize_row
from dpok_jax.data.readers import Record, folder_files, read_file

ORIGIN_COLUMN = "_origin"
_KEEP_EXTRA = ("task",)


def _dataset_records(ds: datasets.Dataset, label: str) -> Iterable[Record]:
    """Rows of an in-memory dataset, named ``"row N"`` (0-based), prefixed by `label` if given."""
    prefix = f"{label} " if label else ""
    for i, row in enumerate(ds):
        bad = row.pop(BAD_ROW_COLUMN, None)
        origin = row.pop(ORIGIN_COLUMN, None) or f"{prefix}row {i}"
        if bad:
            reason, _, detail = bad.partition(": ")
            yield origin, RowError(reason, detail)
        else:
            yield origin, row


def _records(source: Any, split: str, data_files: Any, cache_dir: str | None) -> tuple[list[Record], str]:
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"dataset has no split {split!r}; it has {sorted(source)}")
        return list(_dataset_records(source[split], "")), f"<DatasetDict>[{split}]"
    if isinstance(source, datasets.Dataset):
        return list(_dataset_records(source, "")), "<Dataset>"
    path = Path(str(source)).expanduser()
    if path.is_file():
        return read_file(path), str(path)
    if path.is_dir():
        records: list[Record] = []
        for file in folder_files(path, split, data_files):
            records.extend(read_file(file))
        return records, f"{path}[{split}]"
    try:
        ds = datasets.load_dataset(str(source), data_files=data_files, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(f"data source {str(source)!r} is not a local file or folder, and loading it as a hub "
                         f"dataset (split {split!r}) failed: {type(e).__name__}: {e}") from e
    name = f"{source}[{split}]"
    return list(_dataset_records(ds, name)), name


def _embedding(value: Any, key: str) -> list[float] | None:
    if value is None:
        return None  # tokenize_pairs reports it as missing_field
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise RowError("bad_embedding", f"{key!r} is not a list of numbers: {value!r:.60}")
    return [float(v) for v in value]


def load_preference_dataset(source: Any, *, split: str = "train", format: str = "auto", tokenizer: Any = None,
                            data_files: Any = None, cache_dir: str | None = None) -> datasets.Dataset:
    """Preference rows with string columns ``prompt, chosen, rejected``, through `datasets`.

    Args:
      source: ``"synthetic"`` (the embedded tasks, `synthetic_tasks(seed=0)`); a local file (``.json``,
        ``.jsonl``, ``.csv``, ``.parquet``, text types optionally ``.gz``/``.bz2``/``.xz``), which is
        all one split, returned whatever `split` says; a local folder, whose splits come from file
        names (``train.jsonl``, ``train.csv``, ``test.jsonl``, ...: every file of the split is read,
        whatever its type); a `datasets.Dataset` / `DatasetDict`; or else a hub dataset name (online
        only).
      split: the split to return (folders, hub datasets, ``"synthetic"``).
      format: ``"auto"`` (the shape most rows have: message lists -> conversational; else a
        ``prompt`` key -> explicit; else implicit), ``"explicit"``, ``"implicit"`` (HH-RLHF) or
        ``"conversational"``.
      tokenizer: needed for the conversational format (its chat template renders the messages).
      data_files: patterns per split for folders (as `datasets`), or files of a hub dataset.
      cache_dir: the `datasets` cache for hub datasets.

    Returns:
      A `datasets.Dataset` with one row per input record, in input order: ``prompt, chosen,
      rejected`` (strings exactly as in the source, or as rendered for the implicit and
      conversational formats), ``task`` if present, every ``embedding_*`` column, ``_bad_row``
      (``"reason: detail"`` or null) and ``_origin`` (``"path:LINE"``, 1-based; ``"path record N"``
      for Parquet; ``"row N"`` for in-memory data). No row is dropped here: `tokenize_pairs` skips,
      counts and names bad rows by their origin.

    Raises:
      ValueError naming the file, folder or column when the source cannot be read as a whole (empty,
      UTF-16, unsupported type) or lacks columns.

    >>> ds = load_preference_dataset("synthetic", split="test")
    >>> ds.column_names
    ['prompt', 'chosen', 'rejected', 'task']
    """
    if format not in FORMATS + ("auto",):
        raise ValueError(f"data format {format!r}: expected one of {('auto',) + FORMATS}")
    if isinstance(source, str) and source == "synthetic":
        from dpok_jax.data.synthetic import synthetic_tasks

        splits = synthetic_tasks(0)
        if split not in splits:
            raise ValueError(f"synthetic data has splits {sorted(splits)}, not {split!r}")
        return splits[split]
    records, name = _records(source, split, data_files, cache_dir)
    if not records:
        raise ValueError(f"data {name} holds no rows")
    readable = [v for _, v in records if isinstance(v, dict)]
    if not readable:
        fmt = "explicit"  # every record was unreadable: nothing to detect, every row is already bad
    else:
        fmt = detect_format(readable, name) if format == "auto" else format
    keys: dict[str, None] = {}
    for row in readable:
        keys.update(dict.fromkeys(row))
    if fmt == "explicit" and "prompt" not in keys and readable:
        raise ValueError(f"data {name}: the explicit format needs a 'prompt' column; found {sorted(keys)} "
                         "(whole dialogues without a prompt column are the 'implicit' format)")
    if fmt == "conversational" and tokenizer is None:
        raise ValueError(f"data {name}: the conversational format needs tokenizer= (its chat template "
                         "renders the messages)")
    extra = [k for k in keys if k in _KEEP_EXTRA or k.startswith("embedding_")]
    columns: dict[str, list] = {k: [] for k in ["prompt", "chosen", "rejected", *extra, BAD_ROW_COLUMN,
                                               ORIGIN_COLUMN]}
    for origin, values in records:
        p = c = r = bad = None
        kept = dict.fromkeys(extra)
        if isinstance(values, RowError):
            bad = str(values)
        else:
            p, c, r, bad = normalize_row(values, fmt, tokenizer)
            try:
                for k in extra:
                    v = values.get(k)
                    kept[k] = _embedding(v, k) if k.startswith("embedding_") else (None if v is None else str(v))
            except RowError as e:
                p = c = r = None
                bad = str(e)
        for k, v in zip(("prompt", "chosen", "rejected", BAD_ROW_COLUMN, ORIGIN_COLUMN), (p, c, r, bad, origin)):
            columns[k].append(v)
        for k in extra:
            columns[k].append(kept[k])
    string = datasets.Value("string")
    features = {k: (datasets.List(datasets.Value("float32")) if k.startswith("embedding_") else string)
                for k in columns}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
