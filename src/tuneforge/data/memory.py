"""Rows given as Python objects (the Python API's ``data=``): a list of dicts, or a ``datasets`` split.

They stand wherever a data file's path does (``data.train``, ``data.validation``, ``eval.generation_data``, the
inputs of an evaluation) and are read by :func:`tuneforge.data.readers.read_rows` into the same rows, so they meet
the same validation and messages as a file's. Errors name ``source`` (``data.train (in-memory rows)``) where a
file's path would be, and the row as its 0-based index (``rows[3]`` is "row 3"): the number a Python user looks
the row up by, as a file's row number is the one an editor shows.

A config file cannot hold rows, so a saved config (``RUN_DIR/config.yaml``) records :attr:`InMemoryRows.placeholder`
instead: the row count and a fingerprint of their content, which is also what resuming compares.
"""

from __future__ import annotations

import hashlib
import json

PLACEHOLDER_PREFIX = "<in-memory: "


class InMemoryRows:
    """Rows held in memory, with the name messages give them.

    Args:
        rows: the records (normally dicts; anything else becomes a bad row when read, as a non-object line of a
            JSONL file does).
        source: what errors and data reports call them, e.g. ``data.train (in-memory rows)``.
    """

    def __init__(self, rows: list, source: str):
        self.rows = rows
        self.source = source
        digest = hashlib.sha256()
        for row in rows:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode("utf-8"))
            digest.update(b"\n")
        self.fingerprint = digest.hexdigest()[:16]

    @property
    def placeholder(self) -> str:
        """What a saved config records: ``<in-memory: 24 rows, sha256 1a2b...>`` (plain YAML, and equal for
        equal rows, so a resumed run given the same rows sees no change of data)."""
        return f"{PLACEHOLDER_PREFIX}{len(self.rows)} rows, sha256 {self.fingerprint}>"

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        return f"InMemoryRows({self.source!r}, {self.placeholder})"

    def __deepcopy__(self, memo) -> InMemoryRows:
        # Rows are read, never changed: a copy of a config shares them (dataclasses.asdict deep-copies values).
        return self


def is_placeholder(value: object) -> bool:
    """Whether ``value`` is the placeholder a saved config holds for in-memory rows (maybe joined to a folder)."""
    return isinstance(value, str) and PLACEHOLDER_PREFIX in value and value.endswith(">")


def recorded(value: object) -> object:
    """``value`` as a saved config or eval.json records it: in-memory rows become their placeholder (also as the
    ``path`` of a source mapping, or of a mixture's entries)."""
    if isinstance(value, list):
        return [recorded(item) for item in value]
    if isinstance(value, dict) and "path" in value:
        return {**value, "path": recorded(value["path"])}
    return value.placeholder if isinstance(value, InMemoryRows) else value
