"""`load_preference_dataset`: a local file or folder, a hub name, or the synthetic tasks, as rows of
``prompt / chosen / rejected`` strings."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import datasets

from dpok_jax.data.formats import BAD_ROW_COLUMN, FORMATS, RowError, as_text, detect_format, normalize_row

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_KEEP_EXTRA = ("task",)


def _builder_for(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise ValueError(f"data file {path}: unsupported type; use .json, .jsonl (optionally .gz), "
                         ".parquet or .csv")
    return builder


def _read_json_lines(path: Path) -> datasets.Dataset:
    """Line by line, for files `datasets` rejects as a whole because of a few bad lines.

    A line that is not UTF-8 or not JSON becomes a row whose ``_bad_row`` says so, so it is counted
    like any other bad row instead of failing the file.
    """
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    rows: list[dict] = []
    with opener(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            n = len(rows)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append({BAD_ROW_COLUMN: f"undecodable: line {n + 1} is not UTF-8 ({e.reason} at byte {e.start})"})
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                rows.append({BAD_ROW_COLUMN: f"invalid_json: line {n + 1}: {e.msg}"})
                continue
            if not isinstance(obj, dict):
                rows.append({BAD_ROW_COLUMN: f"invalid_json: line {n + 1} is a {type(obj).__name__}, not an object"})
                continue
            try:
                for k, v in obj.items():
                    if isinstance(v, str):
                        as_text(v, k)
            except RowError as e:
                rows.append({BAD_ROW_COLUMN: str(e)})
                continue
            # Values are stored as JSON text so rows of mixed types fit one Arrow schema; decoded below.
            rows.append({"_json": text})
    keys: list[str] = []
    for r in rows:
        if "_json" in r:
            keys.extend(k for k in json.loads(r["_json"]) if k not in keys)
    columns: dict[str, list] = {k: [] for k in keys}
    columns[BAD_ROW_COLUMN] = []
    for r in rows:
        obj = json.loads(r["_json"]) if "_json" in r else {}
        for k in keys:
            columns[k].append(obj.get(k))
        columns[BAD_ROW_COLUMN].append(r.get(BAD_ROW_COLUMN))
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception:  # values of incompatible types within a column: keep them as JSON values
        feats = datasets.Features({k: datasets.Json() for k in keys} | {BAD_ROW_COLUMN: datasets.Value("string")})
        return datasets.Dataset.from_dict(columns, features=feats)


def _load_raw(source: Any, split: str, data_files: Any, cache_dir: str | None) -> tuple[datasets.Dataset, str]:
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"dataset has no split {split!r}; it has {sorted(source)}")
        return source[split], f"<DatasetDict>[{split}]"
    if isinstance(source, datasets.Dataset):
        return source, "<Dataset>"
    path = Path(str(source)).expanduser()
    if path.is_file():
        builder = _builder_for(path)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir), str(path)
        except Exception as e:  # a few bad lines make `datasets` reject a JSON Lines file as a whole
            if builder == "json" and path.name.lower().removesuffix(".gz").endswith(".jsonl"):
                return _read_json_lines(path), str(path)
            raise ValueError(f"cannot read data file {path}: {type(e).__name__}: {e.__cause__ or e}") from e
    if path.is_dir():
        try:
            splits = datasets.load_dataset(str(path), data_files=data_files, cache_dir=cache_dir)
        except Exception as e:
            raise ValueError(f"cannot read data folder {path}: {type(e).__name__}: {e.__cause__ or e}") from e
        if split not in splits:
            raise ValueError(f"data folder {path} has no split {split!r}; it has {sorted(splits)} "
                             "(splits are named by file names such as train.jsonl / test.jsonl)")
        return splits[split], f"{path}[{split}]"
    try:
        return datasets.load_dataset(str(source), data_files=data_files, split=split, cache_dir=cache_dir), \
            f"{source}[{split}]"
    except Exception as e:
        raise ValueError(f"data source {str(source)!r} is not a local file or folder, and loading it as a hub "
                         f"dataset (split {split!r}) failed: {type(e).__name__}: {e}") from e


def load_preference_dataset(source: Any, *, split: str = "train", format: str = "auto", tokenizer: Any = None,
                            data_files: Any = None, cache_dir: str | None = None) -> datasets.Dataset:
    """Preference rows with string columns ``prompt, chosen, rejected``, through `datasets`.

    Args:
      source: ``"synthetic"`` (the embedded tasks, `synthetic_tasks(seed=0)`); a local file (``.json``,
        ``.jsonl``, ``.jsonl.gz``, ``.parquet``, ``.csv``), which is all one split, returned whatever
        `split` says; a local folder, whose splits come from file names (``train.jsonl``,
        ``test.jsonl``, ...); a `datasets.Dataset` / `DatasetDict`; or else a hub dataset name (online
        only).
      split: the split to return (folders, hub datasets, ``"synthetic"``).
      format: ``"auto"`` (message lists -> conversational; else a ``prompt`` column -> explicit;
        else implicit), ``"explicit"``, ``"implicit"`` (HH-RLHF) or ``"conversational"``.
      tokenizer: needed for the conversational format (its chat template renders the messages).
      data_files: passed to `datasets.load_dataset` for folders and hub datasets.
      cache_dir: the `datasets` cache (default: its own default).

    Returns:
      A `datasets.Dataset` with one row per input row, in input order: ``prompt, chosen, rejected``,
      ``task`` if present, every ``embedding_*`` column, and ``_bad_row`` (``"reason: detail"`` or
      null) where a row could not be normalized (implicit or conversational format, unreadable JSON
      line). No row is dropped here: `tokenize_pairs` skips and counts bad rows.

    Raises:
      ValueError naming the file, folder or column when the source cannot be read or lacks columns.

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
    raw, name = _load_raw(source, split, data_files, cache_dir)
    present = [c for c in raw.column_names if c != BAD_ROW_COLUMN]
    if not present and len(raw):
        fmt = "explicit"  # every line was unreadable: nothing to detect, every row is already bad
    else:
        fmt = detect_format(raw.features, name) if format == "auto" else format
    if fmt == "explicit" and "prompt" not in raw.column_names and present:
        raise ValueError(f"data {name}: the explicit format needs a 'prompt' column; found {present} "
                         "(whole dialogues without a prompt column are the 'implicit' format)")
    if fmt == "conversational" and tokenizer is None:
        raise ValueError(f"data {name}: the conversational format needs tokenizer= (its chat template "
                         "renders the messages)")
    extra = [c for c in raw.column_names if c in _KEEP_EXTRA or c.startswith("embedding_")]
    had_bad = BAD_ROW_COLUMN in raw.column_names

    def convert(batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], BAD_ROW_COLUMN: []}
        for i in range(n):
            prior = batch[BAD_ROW_COLUMN][i] if had_bad else None
            row = {k: batch[k][i] for k in ("prompt", "chosen", "rejected") if k in batch}
            p, c, r, bad = (None, None, None, prior) if prior else normalize_row(row, fmt, tokenizer)
            for k, v in zip(("prompt", "chosen", "rejected", BAD_ROW_COLUMN), (p, c, r, bad)):
                out[k].append(v)
        return out

    keep = [c for c in ("prompt", "chosen", "rejected") if c in raw.column_names] + extra
    drop = [c for c in raw.column_names if c not in extra]
    if fmt == "explicit" and not had_bad:
        ds = raw.select_columns(keep)
        if "prompt" in keep:
            return ds
    features = {"prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                "rejected": datasets.Value("string"), BAD_ROW_COLUMN: datasets.Value("string")}
    if fmt == "explicit":
        # Explicit values pass through untouched (they may be bytes or numbers, checked later).
        features = {k: raw.features.get(k, datasets.Value("string")) for k in ("prompt", "chosen", "rejected")}
        features[BAD_ROW_COLUMN] = datasets.Value("string")
    for c in extra:
        features[c] = raw.features[c]
    ds = raw.map(convert, batched=True, batch_size=512, remove_columns=drop,
                 features=datasets.Features(features), desc=f"normalizing {fmt} rows",
                 load_from_cache_file=False)
    order = ["prompt", "chosen", "rejected"] + extra + [BAD_ROW_COLUMN]
    return ds.select_columns([c for c in order if c in ds.column_names])
