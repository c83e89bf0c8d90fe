"""The data stage of a run: read and validate (no tokenizer needed), hold out validation rows, tokenise."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.config import RunConfig
from tuneforge.data.dataset import DataReport, load_conversations, split_validation, tokenize_conversations
from tuneforge.data.formats import Conversation
from tuneforge.data.mixture import held_out, mix, tokenize_sources
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
    """Read and validate every row of the train (and validation) data, hold out ``data.val_fraction``, and mix a
    mixture's sources by their weights (``tuneforge.data.mixture``).

    ``load_rows(path, data_config, report)`` reads one file: SFT conversations by default; preference pairs
    (:func:`read_preference_data`) and prompts (``tuneforge.data.prompts``) pass their own. Needs no tokenizer, so
    bad data is reported before any model is resolved or loaded.
    """
    data = config.data
    seed = config.train.seed
    train_report = DataReport()
    # A stream (data.streaming) is read as training reaches it (tuneforge.data.streaming), not here.
    conversations = [] if data.streaming else load_rows(data.train, data, train_report)
    if data.validation:
        validation_report = DataReport()
        validation = load_rows(data.validation, data, validation_report)
        # Its own draw, so that adding a validation mixture never changes the training mix.
        validation = mix(validation, validation_report, seed + 1)
        return ReadData(mix(conversations, train_report, seed), validation, [train_report, validation_report])
    if data.val_fraction > 0:
        # Held out before the mix's weights: a repeated row never lands in both train and validation.
        conversations, validation = split_validation(conversations, data.val_fraction, seed)
        # Each report accounts for its own rows: rows = kept + dropped.
        train_report.rows -= len(validation)
        held_out(train_report, validation)
        held = DataReport(path=f"{train_report.path} (held-out {data.val_fraction:g})", rows=len(validation))
        return ReadData(mix(conversations, train_report, seed), validation, [train_report, held])
    return ReadData(mix(conversations, train_report, seed), [], [train_report])


def tokenize_split(read: ReadData, tokenize: Callable, for_source: Callable | None = None) -> PreparedData:
    """``tokenize(rows, report)`` applied to the train rows and the validation rows of ``read``, each counting into
    its own report; a mixture's rows source by source (``tuneforge.data.mixture.tokenize_sources``), with
    ``for_source(source)`` giving the tokenize function of a source that sets its own template."""
    # Empty train rows: streamed.
    train = tokenize_sources(read.train, read.reports[0], tokenize, for_source) if read.train else []
    validation = tokenize_sources(read.validation, read.reports[1], tokenize, for_source) if read.validation else []
    return PreparedData(train, validation, read.reports)


def per_source_template(tokenizer, tokenize_with: Callable) -> Callable:
    """``for_source`` of :func:`tokenize_split`: the tokenize function ``tokenize_with(template)`` for a source's own
    ``template``."""
    from tuneforge.data.templates import load_template

    return lambda source: tokenize_with(load_template(source.template, tokenizer))


def tokenize_data(read: ReadData, config: RunConfig, tokenizer, template) -> PreparedData:
    """Tokenise the conversations of :func:`read_data` with ``template`` (or a source's own), counting into its
    reports."""
    def tokenize_with(chosen):
        return lambda rows, report: tokenize_conversations(rows, chosen, tokenizer, config.data, report)

    return tokenize_split(read, tokenize_with(template), per_source_template(tokenizer, tokenize_with))


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

    def tokenize_with(chosen):
        return lambda rows, report: tokenize(rows, chosen, tokenizer, config.data, report)

    return tokenize_split(read, tokenize_with(template), per_source_template(tokenizer, tokenize_with))
