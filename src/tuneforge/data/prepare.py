"""The data stage of a run: read and validate (no tokenizer needed), hold out validation rows, tokenise."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.config import RunConfig
from tuneforge.data.dataset import DataReport, load_conversations, split_validation, tokenize_conversations
from tuneforge.data.formats import Conversation
from tuneforge.data.tokenize import Example


@dataclass
class ReadData:
    """Validated conversations, before tokenisation; ``reports[1]`` (when present) belongs to ``validation``."""

    train: list[Conversation]
    validation: list[Conversation]
    reports: list[DataReport]


@dataclass
class PreparedData:
    """Tokenised train and validation examples with their reports."""

    train: list[Example]
    validation: list[Example]
    reports: list[DataReport] = field(default_factory=list)


def read_data(config: RunConfig, load_rows: Callable = load_conversations) -> ReadData:
    """Read and validate every row of the train (and validation) file, and hold out ``data.val_fraction``.

    ``load_rows(path, data_config, report)`` reads one file: SFT conversations by default; preference pairs
    (:func:`read_preference_data`) and prompts (``tuneforge.data.prompts``) pass their own. Needs no tokenizer, so
    bad data is reported before any model is resolved or loaded.
    """
    data = config.data
    train_report = DataReport()
    conversations = load_rows(data.train, data, train_report)
    if data.validation:
        validation_report = DataReport()
        validation = load_rows(data.validation, data, validation_report)
        return ReadData(conversations, validation, [train_report, validation_report])
    if data.val_fraction > 0:
        conversations, validation = split_validation(conversations, data.val_fraction, config.train.seed)
        # Each report accounts for its own rows: rows = kept + dropped.
        train_report.rows -= len(validation)
        held_out = DataReport(path=f"{data.train} (held-out {data.val_fraction:g})", rows=len(validation))
        return ReadData(conversations, validation, [train_report, held_out])
    return ReadData(conversations, [], [train_report])


def tokenize_split(read: ReadData, tokenize: Callable) -> PreparedData:
    """``tokenize(rows, report)`` applied to the train rows and the validation rows of ``read``, each counting into
    its own report."""
    train = tokenize(read.train, read.reports[0])
    validation = tokenize(read.validation, read.reports[1]) if read.validation else []
    return PreparedData(train, validation, read.reports)


def tokenize_data(read: ReadData, config: RunConfig, tokenizer, template) -> PreparedData:
    """Tokenise the conversations of :func:`read_data` with ``template``, counting into its reports."""
    return tokenize_split(read, lambda rows, report: tokenize_conversations(rows, template, tokenizer, config.data,
                                                                            report))


def prepare_data(config: RunConfig, tokenizer, template) -> PreparedData:
    """Read, validate, split and tokenise the train (and validation) data."""
    return tokenize_data(read_data(config), config, tokenizer, template)


def read_preference_data(config: RunConfig, unpaired: bool = False) -> ReadData:
    """:func:`read_data` for preference methods: pairs (``prompt`` / ``chosen`` / ``rejected``), or unpaired rows
    (``prompt`` / ``completion`` / ``label``) for KTO. ``ReadData.train`` then holds ``PreferenceRow`` or
    ``UnpairedRow`` items."""
    from tuneforge.data.preference import load_preference_rows

    return read_data(config, functools.partial(load_preference_rows, unpaired=unpaired))


def tokenize_preference_data(read: ReadData, config: RunConfig, tokenizer, template,
                             unpaired: bool = False) -> PreparedData:
    """Tokenise the rows of :func:`read_preference_data` into ``PairExample`` (or ``UnpairedExample``) items."""
    from tuneforge.data.preference import tokenize_pairs, tokenize_unpaired

    tokenize = tokenize_unpaired if unpaired else tokenize_pairs
    return tokenize_split(read, lambda rows, report: tokenize(rows, template, tokenizer, config.data, report))
