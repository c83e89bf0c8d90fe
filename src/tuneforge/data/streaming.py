"""Training data read as training reaches it (``data.streaming``), for data larger than memory.

The flow is the in-memory one, one row at a time: file -> rows (JSONL line by line, Parquet by row group, a Hub
dataset through ``datasets.load_dataset(..., streaming=True)``) -> validated and tokenised as each row is
reached (:func:`~tuneforge.data.dataset.validate_row`, :func:`~tuneforge.data.dataset.encode_example`: the same
checks, messages and drop counts) -> micro-batches (:class:`StreamBatches`). Memory holds one shuffle block of
rows and one optimiser step's examples, whatever the size of the file.

Order: with ``data.shuffle`` the rows are shuffled inside consecutive blocks of :data:`SHUFFLE_BLOCK_ROWS`
rows, each block with a permutation seeded from (``train.seed``, pass, block); rows of different blocks never
swap, so a file sorted by topic stays roughly sorted: shuffle it once on disk if that matters. Without
``data.shuffle`` rows come in file order. At the end of the data the stream starts another pass, shuffled
afresh; the run stops at ``train.max_steps``.

Resume: after every optimiser step the stream's position (the pass, the block, where the block starts in the
file, rows taken from it; rows kept in the pass; the data report's counts) is stored in
``TrainState.data_state`` as plain JSON. A resumed run re-reads that block, draws the same permutation, skips the
rows taken and continues exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tuneforge.config_checks import supporting
from tuneforge.data.dataset import DataReport, EpochBatches, encode_example, validate_row
from tuneforge.data.memory import InMemoryRows
from tuneforge.data.readers import BadRow, Row, jsonl_row
from tuneforge.data.tokenize import Example
from tuneforge.errors import ConfigError, UserError
from tuneforge.recipes.registry import get

# Rows per shuffle block: the most rows a stream holds in memory (the examples of a step come on top).
SHUFFLE_BLOCK_ROWS = 1024
STREAM_SUFFIXES = (".jsonl", ".ndjson", ".parquet")
# Source options a stream does not apply (yet): refused rather than silently ignored.
UNSUPPORTED_SOURCE_OPTIONS = ("columns", "roles", "format", "template", "weight", "fraction")


# ------------------------------------------------------------------------------------------------ config
def check_streaming(config) -> None:
    """Refuse ``data.streaming`` with what it cannot do (a :class:`ConfigError` naming the option)."""
    data = config.data
    if not get(config.method).streaming:
        raise ConfigError(f"data.streaming: supported for method {supporting('streaming')} only (method "
                          f"{config.method} reads its whole data set before training, e.g. to score it with the "
                          "reference model); set data.streaming=false")
    if not config.train.max_steps:
        raise ConfigError("data.streaming: needs train.max_steps (a stream's length is unknown until it has been "
                          "read, so epochs cannot plan the run); set train.max_steps=N")
    if data.val_fraction > 0:
        raise ConfigError("data.streaming: data.val_fraction would have to hold the whole stream to draw from it; "
                          "give a separate data.validation file (read into memory) instead")
    if data.group_by_length:
        raise ConfigError("data.streaming: data.group_by_length sorts rows of a whole epoch; set "
                          "data.group_by_length=false (data.packing removes padding in a stream)")
    source = stream_source(data.train)
    if isinstance(source.path, InMemoryRows):
        raise ConfigError("data.streaming: these rows are already in memory; set data.streaming=false, or pass "
                          "a file path or a Hub dataset id")
    unsupported = [name for name in UNSUPPORTED_SOURCE_OPTIONS if getattr(source, name) not in (None, {}, "")]
    if unsupported:
        raise ConfigError(f"data.train.{unsupported[0]}: not supported with data.streaming yet; set "
                          "data.streaming=false, or prepare the file in the layout of data.format")
    path = Path(str(source.path))
    if path.is_dir() or (path.exists() and path.suffix.lower() not in STREAM_SUFFIXES):
        raise ConfigError(f"data.streaming: {path} cannot be streamed; stream a .jsonl or .parquet file or a Hub "
                          "dataset id, or set data.streaming=false")


def stream_source(value):
    """The one source a stream reads (``data.train``); a mixture is refused."""
    try:
        from tuneforge.data.sources import parse_sources
    except ImportError:  # a plain path only
        return _PlainSource(value)
    sources = parse_sources(value, "data.train")
    if len(sources) > 1:
        raise ConfigError("data.streaming: data.train is a mixture of sources, which streaming does not mix yet; "
                          "stream one source, or set data.streaming=false")
    return sources[0]


@dataclasses.dataclass(frozen=True)
class _PlainSource:
    path: object
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    data_files: object = None
    columns: dict = dataclasses.field(default_factory=dict)
    roles: dict = dataclasses.field(default_factory=dict)
    format: str | None = None
    template: str | None = None
    weight: float | None = None
    fraction: float | None = None

    @property
    def label(self) -> str:
        return str(self.path)


# ------------------------------------------------------------------------------------------ raw rows
def open_rows(source, position: dict) -> Iterator[tuple[Row | BadRow, dict]]:
    """The rows of ``source`` from ``position`` ({} is the start), each with the position just after it. A
    missing file is a :class:`UserError`."""
    path = Path(str(source.path))
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path, position)
    if path.is_file() and suffix == ".parquet":
        return _parquet_rows(path, position)
    if suffix in STREAM_SUFFIXES or path.exists():
        raise UserError(f"data file {path} does not exist" if not path.exists() else
                        f"data.streaming: {path} cannot be streamed; use a .jsonl or .parquet file")
    return _hub_rows(source, position)


def _jsonl_rows(path: Path, position: dict) -> Iterator[tuple[Row | BadRow, dict]]:
    offset, number = position.get("offset", 0), position.get("line", 0)
    with path.open("rb") as handle:
        handle.seek(offset)
        # readline, not iteration: the byte offset of every line is known, so a resumed run seeks straight to it.
        while raw := handle.readline():
            offset += len(raw)
            number += 1
            row = jsonl_row(path, number, raw)
            if row is not None:
                yield row, {"offset": offset, "line": number}


def _parquet_rows(path: Path, position: dict) -> Iterator[tuple[Row | BadRow, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow: pip install 'tuneforge[parquet]'") from None
    file = pq.ParquetFile(path)
    group, start = position.get("group", 0), position.get("row", 0)
    number = sum(file.metadata.row_group(g).num_rows for g in range(group))  # rows before this group
    for g in range(group, file.num_row_groups):
        records = file.read_row_group(g).to_pylist()  # one row group at a time in memory
        for index in range(start if g == group else 0, len(records)):
            after = {"group": g, "row": index + 1}
            yield Row(number + index + 1, records[index]), after
        number += len(records)


def _hub_rows(source, position: dict) -> Iterator[tuple[Row | BadRow, dict]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source.path}: streaming a Hub dataset needs `datasets`: pip install "
                        "'tuneforge[datasets]'") from None
    stream = datasets.load_dataset(str(source.path), name=source.subset, split=source.split or "train",
                                   revision=source.revision, data_files=source.data_files, streaming=True)
    done = position.get("rows", 0)
    if done:
        stream = stream.skip(done)  # the stream's own skip: rows are read past, not held
    for number, record in enumerate(stream, start=done + 1):
        yield Row(number, dict(record)), {"rows": number}


# ------------------------------------------------------------------------------------- shuffled rows
class ShuffledRows:
    """The rows of a source in passes, each pass cut into blocks of ``block_rows`` rows, each block shuffled
    (with ``shuffle``) by a permutation seeded from (``seed``, pass, block). :meth:`position` is plain JSON, and
    a stream made from it continues exactly where that one was."""

    def __init__(self, source, seed: int, shuffle: bool, position: dict | None = None,
                 block_rows: int = SHUFFLE_BLOCK_ROWS):
        position = position or {}
        self.source, self.seed, self.shuffle, self.block_rows = source, seed, shuffle, block_rows
        self.pass_index = position.get("pass", 0)
        self.block = position.get("block", 0)
        self.block_start: dict = position.get("block_start", {})  # the file position the block starts at
        self.taken = position.get("taken", 0)  # rows of the block handed out
        self._rows: list | None = None  # the block, in its shuffled order; loaded when first needed
        self._after: dict = {}  # the file position just after the block
        self._reader: Iterator | None = None
        self._reader_at: dict | None = None  # where _reader would read next

    def position(self) -> dict:
        return {"pass": self.pass_index, "block": self.block, "block_start": self.block_start, "taken": self.taken}

    def next(self) -> Row | BadRow | None:
        """The next row; None once at the end of each pass (the next call starts the next pass)."""
        if self._rows is None:
            self._load()
        if self.taken < len(self._rows):
            self.taken += 1
            return self._rows[self.taken - 1]
        if self._rows:  # this block is used up: the next one
            self.block_start, self.block, self.taken = self._after, self.block + 1, 0
            self._load()
            if self._rows:
                return self.next()
        # Nothing left in this pass: the next starts at the beginning, with new permutations.
        self.pass_index, self.block, self.block_start, self.taken = self.pass_index + 1, 0, {}, 0
        self._load()
        return None

    def _load(self) -> None:
        if self._reader is None or self._reader_at != self.block_start:
            if self._reader is not None:
                self._reader.close()
            self._reader = open_rows(self.source, self.block_start)
        rows, after = [], self.block_start
        for row, after in itertools.islice(self._reader, self.block_rows):
            rows.append(row)
        self._reader_at = self._after = after
        if self.shuffle and rows:
            order = np.random.default_rng([self.seed, self.pass_index, self.block]).permutation(len(rows))
            rows = [rows[i] for i in order]
        self._rows = rows

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# ----------------------------------------------------------------------------------------- examples
class ExampleStream:
    """Tokenised examples of a stream of rows, validated and counted into ``report`` as they are reached (a bad
    row raises with its file, row and field, or is counted by reason, by ``data.on_error``)."""

    def __init__(self, rows: ShuffledRows, label: str, data_config, tokenizer, template, report: DataReport,
                 kept_in_pass: int = 0):
        self.rows, self.label, self.data_config = rows, label, data_config
        self.tokenizer, self.template, self.report = tokenizer, template, report
        self.kept_in_pass = kept_in_pass

    def state(self) -> dict:
        """Where the stream is, as plain JSON: rows position, rows kept in this pass, the report's counts."""
        return {"rows": self.rows.position(), "kept_in_pass": self.kept_in_pass, "report": self.report.to_dict()}

    def next(self) -> Example:
        while True:
            row = self.rows.next()
            if row is None:
                if not self.kept_in_pass:
                    raise UserError(f"{self.label}: no usable rows in a whole pass over the data "
                                    f"(dropped: {dict(self.report.dropped)})")
                self.kept_in_pass = 0
                continue
            conversation = validate_row(row, self.label, self.data_config, self.report)
            if conversation is None:
                continue
            example = encode_example(conversation, self.template, self.tokenizer, self.data_config, self.report)
            if example is not None:
                self.report.kept += 1
                self.kept_in_pass += 1
                return example


def restore_report(report: DataReport, counts: dict) -> None:
    """Put a saved report's counts (``DataReport.to_dict``) back into ``report``."""
    for key, value in counts.items():
        setattr(report, key, Counter(value) if key == "dropped" else value)


# ------------------------------------------------------------------------------------------ batches
class StreamBatches(Sequence):
    """The micro-batches of a streaming run, ``train.max_steps × train.grad_accum`` of them, read in order.

    Reading the first micro-batch of an optimiser step reads the rows of the whole step (every rank reads the
    same stream and keeps its slice of each global micro-batch, as :class:`EpochBatches` does) and sets
    ``state.data_state`` to the position after the step, which the step's checkpoint then saves. With packing,
    rows are packed next-fit as they come (the same packs :func:`~tuneforge.data.collate.pack_examples` makes);
    the row that overflows a step's last pack starts the next step, and the saved position is just before it.
    """

    def __init__(self, config, tokenizer, template, state, report: DataReport, rank: int = 0, world_size: int = 1,
                 block_rows: int = SHUFFLE_BLOCK_ROWS):
        data, train = config.data, config.train
        source = stream_source(data.train)
        saved = state.data_state or {}
        if saved.get("report"):
            restore_report(report, saved["report"])
        report.path = source.label
        rows = ShuffledRows(source, train.seed, data.shuffle, saved.get("rows"), block_rows)
        self.examples = ExampleStream(rows, source.label, data, tokenizer, template, report,
                                      saved.get("kept_in_pass", 0))
        self.state, self.pad_id, self.packing, self.max_length = state, tokenizer.pad_token_id, data.packing, \
            data.max_length
        self.batch_size, self.grad_accum, self.rank, self.world_size = train.batch_size, train.grad_accum, rank, \
            world_size
        self.length = train.max_steps * train.grad_accum
        self._carry: tuple[Example, dict] | None = None  # packing: the example that starts the next step's packs
        self._step: EpochBatches | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index % self.grad_accum == 0 or self._step is None:
            groups, self.state.data_state = self._read_step()
            self._step = EpochBatches(groups, self.pad_id, self.packing, self.batch_size, self.rank)
        return self._step[index % self.grad_accum]

    def _read_step(self) -> tuple[list[list], dict]:
        """The global micro-batches of one optimiser step and the stream's state after them."""
        size = self.batch_size * self.world_size
        needed = size * self.grad_accum
        if not self.packing:
            items = [self.examples.next() for _ in range(needed)]
            return [items[i:i + size] for i in range(0, needed, size)], self.examples.state()
        packs: list[list[Example]] = []
        current, used, after = [], 0, None
        if self._carry is not None:
            current, used = [self._carry[0]], len(self._carry[0].input_ids)
            self._carry = None
        while after is None:
            before = self.examples.state()
            example = self.examples.next()
            if current and used + len(example.input_ids) > self.max_length:
                packs.append(current)
                current, used = [], 0
                if len(packs) == needed:
                    self._carry, after = (example, before), before
                    continue
            current.append(example)
            used += len(example.input_ids)
        return [packs[i:i + size] for i in range(0, needed, size)], after
