"""Reading local data files as raw records, each with its origin (file and 1-based line).

Every file type goes through the same rules, whether it is given alone or found in a folder:

- JSON Lines (``.jsonl``, or ``.json`` not starting with ``[``): one object per line, parsed with
  `json` line by line, values kept exactly as written (a string stays that string; nothing is
  re-typed per column). A line that is not UTF-8, not JSON or not an object is a bad record of its
  own; the rest of the file still loads.
- JSON array (``.json`` starting with ``[``): its elements; each one's origin is the line it starts on.
- CSV (``.csv``): the first record names the columns; every field is text exactly as written
  (``"007"``, ``"NA"``, ``"None"`` stay text; an empty field is the empty string); origins are the
  line each record starts on. A record with another number of fields than the header is a bad record.
- Parquet (``.parquet``): the stored column types; origins are 1-based record numbers.
- ``.gz``, ``.bz2``, ``.xz`` compression of any of these.

A record is ``(origin, values)`` where `values` is a dict, or a `RowError` when the record itself
cannot be read. Files that cannot be read as a whole (empty, UTF-16, a broken JSON array, an
unsupported type) raise `ValueError` naming the file.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from pathlib import Path
from typing import Any, Iterator

from dpok_jax.data.formats import RowError

Record = tuple[str, "dict | RowError"]

_TYPES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SUPPORTED = ".json, .jsonl, .csv, .parquet (text types optionally .gz, .bz2 or .xz)"


def file_type(path: Path) -> str | None:
    """``"json"``, ``"jsonl"``, ``"csv"``, ``"parquet"`` from the name (compression suffix skipped),
    or None for anything else."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _TYPES.get(suffixes[-1]) if suffixes else None


def _open_bytes(path: Path):
    opener = _COMPRESSIONS.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def _check_encoding(path: Path, head: bytes) -> None:
    """Raise for a UTF-16/32 file: its text would otherwise read as NUL-riddled garbage."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            raise ValueError(f"data file {path} is {name} encoded (byte-order mark {bom.hex(' ').upper()}); "
                             "save it as UTF-8")
    sample = head[:4096]
    if sample.count(0) and sample.count(0) >= len(sample) // 4:
        raise ValueError(f"data file {path} holds NUL bytes in its first {len(sample)} bytes: it looks "
                         "UTF-16 or binary, not UTF-8 text; save it as UTF-8")


def _json_lines(path: Path, lines: Iterator[bytes]) -> Iterator[Record]:
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, RowError("undecodable", f"the line is not UTF-8 ({e.reason} at byte {e.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield where, RowError("invalid_json", f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield where, RowError("invalid_json", f"the line is a JSON {type(obj).__name__}, not an object")
            continue
        yield where, obj


def _json_array(path: Path, data: bytes) -> Iterator[Record]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"data file {path}: line {line} is not UTF-8 ({e.reason}); a JSON array is read "
                         "as a whole, so the file cannot be used (JSON Lines tolerates bad lines)") from None
    decoder = json.JSONDecoder()
    pos, line, seen = text.index("[") + 1, 1 + text[:text.index("[")].count("\n"), text.index("[")
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise ValueError(f"data file {path}: the JSON array is not closed with ']'")
        if text[pos] == "]":
            return
        line += text.count("\n", seen, pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"data file {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg} "
                             "(a JSON array is read as a whole; JSON Lines tolerates bad lines)") from None
        where = f"{path}:{line}"
        yield (where, obj) if isinstance(obj, dict) else \
            (where, RowError("invalid_json", f"the array element is a JSON {type(obj).__name__}, not an object"))
        seen, pos = pos, end


def _csv(path: Path, stream) -> Iterator[Record]:
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    header = None
    start = 1
    for fields in reader:
        where, start = f"{path}:{start}", reader.line_num + 1
        if not fields:
            continue
        if header is None:
            header = fields
            if len(set(header)) != len(header):
                dup = sorted({h for h in header if header.count(h) > 1})
                raise ValueError(f"data file {path}: the CSV header repeats column(s) {dup}")
            continue
        if len(fields) != len(header):
            yield where, RowError("invalid_csv", f"{len(fields)} fields, the header has {len(header)}")
            continue
        yield where, dict(zip(header, fields))


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise ValueError(f"cannot read data file {path}: {type(e).__name__}: {e}") from None
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for values in batch.to_pylist():
            number += 1
            yield f"{path} record {number}", values


def read_file(path: str | Path) -> list[Record]:
    """Every record of one local data file, in file order (see the module docstring).

    Raises:
      ValueError naming the file when its type is unsupported, it is empty (no record), it is
      UTF-16/32 or binary, or (JSON array) it does not parse as a whole.
    """
    path = Path(path)
    kind = file_type(path)
    if kind is None:
        raise ValueError(f"data file {path}: unsupported type; use {SUPPORTED}")
    if kind == "parquet":
        records = list(_parquet(path))
    else:
        try:
            with _open_bytes(path) as f:
                data = f.read()
        except (OSError, EOFError, lzma.LZMAError) as e:  # e.g. a .gz that is not gzip
            raise ValueError(f"cannot read data file {path}: {type(e).__name__}: {e}") from None
        _check_encoding(path, data[:8192])
        if kind == "csv":
            records = list(_csv(path, io.BytesIO(data)))
        elif kind == "json" and data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
            records = list(_json_array(path, data))
        else:
            records = list(_json_lines(path, iter(data.splitlines())))
    if not records:
        raise ValueError(f"data file {path} is empty: it holds no {'rows' if kind != 'csv' else 'rows after the header'}")
    return records


def folder_files(folder: Path, split: str, data_files: Any = None) -> list[Path]:
    """The data files of `split` in `folder`, every supported type, sorted by path.

    Splits come from file names as in `datasets` (``train.jsonl``, ``test-00001.csv``, ``eval.json``;
    a folder without split names is all ``train``), or from `data_files` (patterns per split).
    Files of other types (README.md, ...) are not data and are skipped.
    """
    from datasets.data_files import DataFilesDict, get_data_patterns, sanitize_patterns

    try:
        patterns = sanitize_patterns(data_files) if data_files is not None else get_data_patterns(str(folder))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except Exception as e:  # datasets raises FileNotFoundError / EmptyDatasetError for no match
        raise ValueError(f"data folder {folder}: no data files found ({type(e).__name__}: {e})") from None
    splits = {str(k): [Path(p) for p in v if file_type(Path(p))] for k, v in resolved.items()}
    splits = {k: v for k, v in splits.items() if v}
    if split not in splits:
        raise ValueError(f"data folder {folder} has no split {split!r}; it has {sorted(splits)} "
                         f"(splits are named by file names such as train.jsonl / test.jsonl; types {SUPPORTED})")
    return sorted(splits[split])
