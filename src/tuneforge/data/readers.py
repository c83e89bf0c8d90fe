"""Read a data file into numbered rows (plain dicts), whatever its on-disk format.

Row numbers are what a user sees in an editor: the line number for JSONL, the 1-based record number for JSON,
CSV (header excluded), Parquet and ``datasets`` folders. Rows given in memory (:class:`InMemoryRows`, from the
Python API) are numbered by their 0-based index, the number a Python user looks them up by.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.hub import is_saved_dataset, load_hub_records, load_saved_records
from tuneforge.data.memory import InMemoryRows, is_placeholder
from tuneforge.data.sources import DataSource, map_fields
from tuneforge.errors import DataError, UserError
from tuneforge.paths import looks_like_hub_dataset

SUPPORTED = (".jsonl, .json, .csv, .parquet, a folder saved by datasets.save_to_disk or laid out like a Hub dataset "
             "repo, or a Hub dataset id (org/name)")


@dataclass
class Row:
    """One record of a data file: its number (for error messages) and its fields."""

    number: int
    fields: dict


@dataclass
class BadRow:
    """A row that could not be read at all (malformed JSON, not an object)."""

    error: DataError


def read_rows(path: str | Path | InMemoryRows | DataSource) -> list[Row | BadRow]:
    """Read every record of ``path`` (a file, a folder, a Hub dataset id, rows in memory, or a
    :class:`~tuneforge.data.sources.DataSource` with its split, subset and column mapping). Malformed records come
    back as :class:`BadRow`, so lenient mode can count them; a source that cannot be read at all raises
    :class:`UserError`."""
    if isinstance(path, DataSource):
        rows = _read_source(path)
        if not (path.columns or path.roles):
            return rows
        return [_mapped(row, path) if isinstance(row, Row) else row for row in rows]
    if isinstance(path, str) and not Path(path).exists() and looks_like_hub_dataset(path):
        return _read_source(DataSource(path))
    if isinstance(path, InMemoryRows):
        return [Row(number, value) if isinstance(value, dict) else
                BadRow(DataError(path.source, number, None, f"expected a dict, got {type(value).__name__}",
                                 "not_an_object"))
                for number, value in enumerate(path.rows)]
    if is_placeholder(str(path)):
        raise UserError(f"{path}: these were rows in memory when the run was made, and a config file cannot hold "
                        "them; pass the same rows again from Python: tuneforge.train(..., data=rows)")
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.is_dir():
        return _read_saved_dataset(path) if is_saved_dataset(path) else _read_source(DataSource(str(path)))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(f"{path}: unsupported file type '{suffix}'; use {SUPPORTED}")


def _as_row(path: Path, number: int, value: object) -> Row | BadRow:
    if isinstance(value, dict):
        return Row(number, value)
    return BadRow(DataError(str(path), number, None, f"expected a JSON object, got {type(value).__name__}",
                            "not_an_object"))


def _read_jsonl(path: Path) -> list[Row | BadRow]:
    rows: list[Row | BadRow] = []
    # Bytes, decoded line by line, so one badly encoded line is one bad row (with its number), not a crash.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            row = jsonl_row(path, number, raw)
            if row is not None:
                rows.append(row)
    return rows


def jsonl_row(path: Path, number: int, raw: bytes) -> Row | BadRow | None:
    """Line ``number`` (1-based) of a JSONL file, as read in bytes: a row, a bad row, or None for a blank line."""
    if number == 1 and raw.startswith(codecs.BOM_UTF8):  # written by some Windows tools
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRow(DataError(str(path), number, None, f"not valid UTF-8 (byte {exc.start + 1} of the line); save "
                                "the file as UTF-8", "invalid_encoding"))
    if not line.strip():
        return None
    try:
        # Without the line break, so the column in the message is a column of this line.
        value = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        return BadRow(DataError(str(path), number, None, f"invalid JSON ({exc.msg} at column {exc.colno})",
                                "invalid_json"))
    return _as_row(path, number, value)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not part of the data
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start + 1}); save the file as UTF-8") from None


def _read_json(path: Path) -> list[Row | BadRow]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        hint = " (one JSON object per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(f"{path}: a .json data file must hold a list of objects (or use .jsonl, one object a line)")
    return [_as_row(path, number, item) for number, item in enumerate(value, start=1)]


def _read_csv(path: Path) -> list[Row | BadRow]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        # Empty cells are missing values, not empty strings, so "input" stays optional for alpaca.
        return [Row(number, {k: v for k, v in record.items() if k is not None and v not in (None, "")})
                for number, record in enumerate(reader, start=1)]
    except csv.Error as exc:
        raise UserError(f"{path}: not a valid CSV file (line {reader.line_num}): {exc}") from None


def _read_parquet(path: Path) -> list[Row | BadRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow: pip install 'tuneforge[parquet]'") from None
    import pyarrow

    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as exc:
        raise UserError(f"{path}: not a readable Parquet file: {exc}") from None
    return [Row(number, record) for number, record in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path) -> list[Row | BadRow]:
    records = load_saved_records(DataSource(str(path)))
    return [Row(number, record) for number, record in enumerate(records, start=1)]


def _read_source(source: DataSource) -> list[Row | BadRow]:
    """The rows of one source. A file reads as :func:`read_rows` reads it (1-based numbers); a Hub dataset or a
    Hub-like folder through ``datasets`` (0-based row indices); a saved dataset folder with its ``split``."""
    path = source.path
    if isinstance(path, InMemoryRows) or is_placeholder(str(path)):
        return read_rows(path)
    local = Path(path)
    hub_options = [name for name in ("split", "subset", "revision", "data_files") if getattr(source, name)]
    if local.is_file():
        if hub_options:
            raise UserError(f"{source.label}: {hub_options[0]} applies to Hub datasets and dataset folders, not to a "
                            f"{local.suffix or 'plain'} file; remove it")
        return read_rows(local)
    if local.is_dir() and is_saved_dataset(local):
        other = [name for name in hub_options if name != "split"]
        if other:
            raise UserError(f"{source.label}: {other[0]} applies to Hub datasets and Hub-like folders, not to a "
                            "folder saved by datasets.save_to_disk; remove it")
        return [Row(number, record) for number, record in enumerate(load_saved_records(source), start=1)]
    if not local.is_dir() and not looks_like_hub_dataset(str(path)):
        raise UserError(f"data file {path} does not exist")
    return [Row(number, record) for number, record in enumerate(load_hub_records(source))]


def _mapped(row: Row, source: DataSource) -> Row | BadRow:
    try:
        return Row(row.number, map_fields(row.fields, source, row.number))
    except DataError as error:
        return BadRow(error)
