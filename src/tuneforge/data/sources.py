"""Where a split's rows come from: one or several *sources*, each a file, a folder or a Hub dataset.

``data.train`` (and ``data.validation``, ``eval.generation_data``) holds one of:

- a path or Hub id (``train.jsonl``, ``org/name``): one source with the defaults;
- a mapping, one source with options (``{path: org/name, split: train, subset: en, columns: {...}}``);
- a list of them: a mixture, each entry with its own format, template, columns, roles, and ``weight`` or
  ``fraction`` (:mod:`tuneforge.data.mixture` mixes them);
- from Python, rows in memory (:class:`~tuneforge.data.memory.InMemoryRows`) wherever a path may stand.

:func:`parse_sources` turns any of these into a list of :class:`DataSource`, and raises a
:class:`~tuneforge.errors.ConfigError` naming the key for anything malformed. It reads no file: config validation
calls it, and the readers (:mod:`tuneforge.data.readers`, :mod:`tuneforge.data.hub`) take one source at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Union

from tuneforge.data.memory import InMemoryRows
from tuneforge.errors import ConfigError, DataError

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text")
# What a role of the data may be mapped onto (``roles: {human: user, bot: assistant}``).
TARGET_ROLES = ("system", "user", "assistant")
# ``columns`` keys that name the keys *inside* each message of a list-of-messages field, not a row field.
MESSAGE_KEYS = ("role", "content")

DataFiles = Union[str, list, dict]


@dataclass(frozen=True)
class DataSource:
    """One source of rows for a split.

    Attributes:
        path: a data file (JSONL, JSON, CSV, Parquet), a folder saved by ``datasets.save_to_disk``, a local folder
            laid out like a Hub dataset repo, or a Hub dataset id (``org/name``); from Python also rows in memory.
        split: the split of a Hub dataset or Hub-like folder (default ``train``; a ``DatasetDict`` folder too).
        subset: the Hub dataset's config name (``load_dataset(path, name=subset)``).
        revision: a branch, tag or commit of a Hub dataset.
        data_files: glob(s) of the files to read from a Hub dataset or Hub-like folder (``data/en-*.parquet``).
        columns: format field -> this source's field (``{instruction: question, output: answer}``,
            ``{messages: dialog}``); ``role`` and ``content`` name the keys inside each message
            (``{conversations: turns, role: speaker, content: text}``).
        roles: this source's role names -> ``system`` / ``user`` / ``assistant`` (``{human: user, bot: assistant}``);
            they are added to the format's own names.
        format: the row format of this source (default: ``data.format``).
        template: the chat template for this source's rows (default: ``data.template``).
        weight: how many times each row is used per epoch: 2 repeats every row, 0.5 keeps a seeded half,
            1.5 every row once plus a seeded half (default 1). Not together with ``fraction``.
        fraction: the share of this source's rows used, a seeded sample without replacement, ``0 < fraction <= 1``
            (TRL's per-dataset ``fraction``).
        name: what reports, errors and previews call this source (default: the path, with the split and subset
            of a Hub dataset).
    """

    path: str | InMemoryRows
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    data_files: DataFiles | None = None
    columns: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)
    format: str | None = None
    template: str | None = None
    weight: float | None = None
    fraction: float | None = None
    name: str = ""

    @property
    def label(self) -> str:
        """The name messages and reports give this source."""
        if self.name:
            return self.name
        if isinstance(self.path, InMemoryRows):
            return self.path.source
        extra = [f"{key}={value}" for key, value in (("subset", self.subset), ("split", self.split),
                                                    ("revision", self.revision)) if value]
        return f"{self.path} [{', '.join(extra)}]" if extra else str(self.path)

    @property
    def options(self) -> bool:
        """Whether anything beyond the path is set (a plain path reads exactly as before)."""
        return any(getattr(self, f.name) not in (None, "", {}) for f in fields(self) if f.name != "path")

    @property
    def multiplier(self) -> float:
        """Expected uses of each row per epoch: ``weight``, else ``fraction``, else 1."""
        if self.weight is not None:
            return self.weight
        return self.fraction if self.fraction is not None else 1.0


SOURCE_KEYS = tuple(f.name for f in fields(DataSource))


def is_source_mapping(value: object) -> bool:
    """Whether ``value`` reads as one source's mapping (a ``path`` and only source keys), not as a row of data:
    so a Python list of such dicts is a mixture, and any other list of dicts is rows."""
    return isinstance(value, dict) and "path" in value and all(key in SOURCE_KEYS for key in value)


def is_mixture(value: object) -> bool:
    """Whether a config value of ``data.train`` is a list of sources (rather than a path or rows)."""
    return isinstance(value, list) and bool(value) and all(is_source_mapping(item) or isinstance(item, DataSource)
                                                           for item in value)


def parse_sources(value: object, key: str) -> list[DataSource]:
    """The sources of a config value (a path, rows, a mapping or a list of them); :class:`ConfigError` naming
    ``key`` (``data.train``, ``data.train[1].columns``) for anything malformed. Reads no file."""
    if isinstance(value, (str, InMemoryRows, DataSource)) or isinstance(value, dict):
        return [_one(value, key)]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: an empty list of sources; give a path, a Hub id or a list of "
                              "{path: ..., weight: ...} entries")
        sources = [_one(item, f"{key}[{index}]") for index, item in enumerate(value)]
        labels = [source.label for source in sources]
        duplicate = next((label for label in labels if labels.count(label) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"{key}: two sources are both called {duplicate!r}; give one of them a name: "
                              "(name: ...) so that reports can tell them apart")
        return sources
    raise ConfigError(f"{key}: expected a path, a Hub dataset id, a {{path: ...}} mapping or a list of them, got "
                      f"{type(value).__name__}")


def check_data_value(value: object, key: str, required: bool = False) -> None:
    """Config validation of ``data.train`` / ``data.validation`` / ``eval.generation_data``."""
    if value is None or value == "":
        if required:
            raise ConfigError(f"{key}: no training file given (set {key} in the config or {key}=PATH)")
        return
    parse_sources(value, key)


def _one(value: object, key: str) -> DataSource:
    if isinstance(value, DataSource):
        return value
    if isinstance(value, (str, InMemoryRows)):
        if not str(value).strip():
            raise ConfigError(f"{key}: an empty path")
        return DataSource(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a path or a {{path: ...}} mapping, got {value!r}")
    unknown = [name for name in value if name not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"{key}: unknown source key {unknown[0]!r} (known keys: {', '.join(SOURCE_KEYS)})")
    if "path" not in value or not isinstance(value["path"], (str, InMemoryRows)) or not str(value["path"]).strip():
        raise ConfigError(f"{key}.path: every source needs a path (a file, a folder or a Hub dataset id)")
    for name in ("split", "subset", "revision", "format", "template", "name"):
        if value.get(name) is not None and not isinstance(value[name], str):
            raise ConfigError(f"{key}.{name}: expected a string, got {value[name]!r}")
    if value.get("format") is not None and value["format"] not in FORMATS:
        raise ConfigError(f"{key}.format: {value['format']!r} is not one of {', '.join(FORMATS)}")
    _check_data_files(value.get("data_files"), f"{key}.data_files")
    columns = _string_map(value.get("columns"), f"{key}.columns")
    roles = _string_map(value.get("roles"), f"{key}.roles")
    for source_role, target in roles.items():
        if target not in TARGET_ROLES:
            raise ConfigError(f"{key}.roles.{source_role}: {target!r} is not a role tuneforge trains on; map it onto "
                              f"{', '.join(TARGET_ROLES)}")
    weight = _number(value.get("weight"), f"{key}.weight", low=0.0, high=None)
    fraction = _number(value.get("fraction"), f"{key}.fraction", low=0.0, high=1.0)
    if weight is not None and fraction is not None:
        raise ConfigError(f"{key}: set weight (uses of each row, may repeat) or fraction (a share of the rows), "
                          "not both")
    kwargs = {**value, "columns": columns, "roles": roles, "weight": weight, "fraction": fraction}
    return DataSource(**{name: kwargs[name] for name in SOURCE_KEYS if kwargs.get(name) is not None})


def _check_data_files(value: object, key: str) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return
    if isinstance(value, dict) and all(isinstance(k, str) and (isinstance(v, str) or (
            isinstance(v, list) and all(isinstance(item, str) for item in v))) for k, v in value.items()):
        return
    raise ConfigError(f"{key}: expected a glob, a list of globs or a mapping split -> glob(s), got {value!r}")


def _string_map(value: object, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{key}: expected a mapping of names to names (e.g. {{instruction: question}}), got "
                          f"{value!r}")
    return dict(value)


def _number(value: object, key: str, low: float, high: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if value <= low or (high is not None and value > high):
        bounds = f"greater than {low:g}" + (f" and at most {high:g}" if high is not None else "")
        raise ConfigError(f"{key}: {value!r} is out of range; it must be {bounds}")
    return float(value)


# Fields that hold a list of messages in some format, and the keys inside each message that format reads.
MESSAGE_FIELDS = {"conversations": ("from", "value"), "messages": ("role", "content"), "prompt": ("role", "content"),
                  "completion": ("role", "content"), "chosen": ("role", "content"), "rejected": ("role", "content")}


def map_fields(fields: dict, source: DataSource, row: int) -> dict:
    """One row's fields with ``source.columns`` and ``source.roles`` applied: each mapped format field takes the
    value of the source's field, and every message of a message-list field gets the keys and role names its format
    reads. A mapped field (or message key) the row does not have raises a :class:`DataError` naming the source, the
    row and the field."""
    out = dict(fields)
    for target, name in source.columns.items():
        if target in MESSAGE_KEYS:
            continue
        if name not in fields:
            have = ", ".join(sorted(map(str, fields))) or "none"
            raise DataError(source.label, row, name, f"columns maps {target} onto {name!r}, which this row does not "
                            f"have (its fields: {have})", "missing_mapped_field")
        out[target] = fields[name]
    role_key, content_key = source.columns.get("role"), source.columns.get("content")
    if not (role_key or content_key or source.roles):
        return out
    for target, (default_role, default_content) in MESSAGE_FIELDS.items():
        if isinstance(out.get(target), list):
            out[target] = [_map_message(item, f"{target}[{index}]", role_key or default_role,
                                        content_key or default_content, (default_role, default_content), source, row)
                           for index, item in enumerate(out[target])]
    return out


def _map_message(item: object, label: str, role_key: str, content_key: str, keys: tuple[str, str],
                 source: DataSource, row: int) -> object:
    if not isinstance(item, dict):
        return item  # the format's own check names it
    for key in (role_key, content_key):
        if key not in item:
            raise DataError(source.label, row, f"{label}.{key}", "missing (columns.role / columns.content name the "
                            "keys of each message)", "missing_mapped_field")
    role = item[role_key]
    mapped = {k: v for k, v in item.items() if k not in (role_key, content_key)}
    mapped[keys[0]] = source.roles.get(role, role) if isinstance(role, str) else role
    mapped[keys[1]] = item[content_key]
    return mapped
