"""The data stage of a run: file -> validated conversations -> tokenised examples -> batches, with counts.

Validation (:func:`load_conversations`) needs no tokenizer and no model, so bad data fails in seconds, before
anything heavy is loaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tuneforge.config import DataConfig
from tuneforge.data.collate import Batch, collate_packed, collate_padded, pack_examples, placeholder_example
from tuneforge.data.formats import Conversation, to_conversation
from tuneforge.data.mixture import is_source_value, load_sources, source_name, weight_note
from tuneforge.data.readers import BadRow, Row, read_rows
from tuneforge.data.sources import DataSource
from tuneforge.data.templates import Template
from tuneforge.data.tokenize import Example, encode_conversation
from tuneforge.errors import DataError, TemplateError, UserError


@dataclass
class DataReport:
    """What happened to the rows of one file (or source, or mixture of sources).

    ``sources`` holds one report per source of a mixture (``tuneforge.data.mixture``), this one the totals;
    ``spec`` is the source a sub-report belongs to and ``mixed`` the rows its ``weight`` / ``fraction`` put in the
    mix (None when there is no mixture). ``kept`` and the token counts are over the mixed rows: a row of weight 2
    counts twice.
    """

    path: str = ""
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    sources: list = field(default_factory=list)
    spec: DataSource | None = None
    mixed: int | None = None

    def lines(self) -> list[str]:
        mixed = f", {self.mixed} in the mix{weight_note(self.spec)}" if self.mixed is not None else ""
        out = [f"{self.path}: {self.rows} rows{mixed}, {self.kept} kept, {self.tokens} tokens, "
               f"{self.trained_tokens} trained tokens, {self.truncated} truncated rows"]
        for reason, count in sorted(self.dropped.items()):
            out.append(f"  dropped {count} row(s): {reason}")
        for sub in self.sources:
            out += ["  " + line for line in sub.lines()]
        return out

    def to_dict(self) -> dict:
        out = {"path": self.path, "rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped),
               "truncated": self.truncated, "tokens": self.tokens, "trained_tokens": self.trained_tokens}
        if self.spec is not None:
            out.update(weight=self.spec.weight, fraction=self.spec.fraction)
        if self.mixed is not None:
            out["mixed"] = self.mixed
        if self.sources:
            out["sources"] = [sub.to_dict() for sub in self.sources]
        return out


def load_conversations(path, config: DataConfig, report: DataReport) -> list[Conversation]:
    """Read and validate every row of ``path`` (a path, a Hub id, rows in memory, a
    :class:`~tuneforge.data.sources.DataSource`, or a source mapping or mixture, read source by source). In
    ``raise`` mode the first bad row raises its :class:`DataError`; in ``skip`` mode it is counted in
    ``report.dropped`` by reason."""
    if is_source_value(path):
        return load_sources(path, config, report, load_conversations)
    report.path = source_name(path)
    conversations = []
    for row in read_rows(path):
        conversation = validate_row(row, report.path, config, report)
        if conversation is not None:
            conversations.append(conversation)
    if not conversations:
        raise UserError(f"{report.path}: no usable rows ({report.rows} read"
                        + (f", dropped: {dict(report.dropped)})" if report.dropped else ")"))
    return conversations


def validate_row(row: Row | BadRow, path: str, config: DataConfig, report: DataReport) -> Conversation | None:
    """One row read from ``path`` as a conversation, counted in ``report.rows``. A bad row raises its
    :class:`DataError` (``on_error=raise``) or is counted in ``report.dropped`` and gives None."""
    report.rows += 1
    try:
        if isinstance(row, BadRow):
            raise row.error
        return to_conversation(row.fields, config.format, path, row.number, config.system_prompt)
    except DataError as error:
        if config.on_error == "raise":
            raise
        report.dropped[error.reason] += 1
        return None


def tokenize_conversations(conversations: list[Conversation], template: Template, tokenizer,
                           config: DataConfig, report: DataReport) -> list[Example]:
    """Tokenise and apply the truncation policy (:func:`encode_example`) to every conversation."""
    examples = []
    template_errors: list[str] = []
    for conversation in conversations:
        example = encode_example(conversation, template, tokenizer, config, report, template_errors)
        if example is not None:
            examples.append(example)
    report.kept = len(examples)
    if not examples:
        raise UserError(f"{report.path}: no rows left after tokenisation (dropped: {dict(report.dropped)})"
                        + (f" (first template error: {template_errors[0]})" if template_errors else ""))
    return examples


def encode_example(conversation: Conversation, template: Template, tokenizer, config: DataConfig,
                   report: DataReport, template_errors: list[str] | None = None) -> Example | None:
    """One conversation tokenised, its tokens counted in ``report``; None when dropped (counted by reason). A row
    that would lose a whole response is dropped or raises, by ``data.on_truncation``; a row the template cannot
    render raises or is dropped, by ``data.on_error`` (the first such message goes into ``template_errors``)."""
    try:
        example = encode_conversation(conversation, template, tokenizer, config.max_length, config.train_on_prompt)
    except TemplateError as exc:
        # A chat template may reject one row (e.g. roles that do not alternate): name the row.
        if config.on_error == "raise":
            raise DataError(conversation.source, conversation.row, None, str(exc), "template_failed") from None
        report.dropped["template_failed"] += 1
        if template_errors is not None and not template_errors:
            template_errors.append(str(exc))
        return None
    if example.responses_lost:
        if config.on_truncation == "raise":
            raise DataError(conversation.source, conversation.row, None,
                            f"longer than data.max_length={config.max_length} tokens: truncation would remove "
                            f"{example.responses_lost} whole response(s); raise data.max_length or set "
                            "data.on_truncation=drop", "response_truncated_away")
        report.dropped["response_truncated_away"] += 1
        return None
    if example.num_trained == 0:
        # A row with nothing to learn would add a silent zero to the loss.
        report.dropped["no_trained_tokens"] += 1
        return None
    report.truncated += int(example.truncated)
    report.tokens += len(example.input_ids)
    report.trained_tokens += example.num_trained
    return example


def split_validation(conversations: list[Conversation], fraction: float, seed: int
                     ) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out ``fraction`` of the rows (at least one) with a fixed-seed permutation."""
    if fraction <= 0:
        return conversations, []
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(conversations), generator=generator).tolist()
    count = max(1, round(len(conversations) * fraction))
    if count >= len(conversations):
        raise UserError(f"data.val_fraction={fraction} leaves no training rows out of {len(conversations)}")
    held = set(order[:count])
    train = [c for i, c in enumerate(conversations) if i not in held]
    validation = [c for i, c in enumerate(conversations) if i in held]
    return train, validation


class RankBatches(Sequence):
    """The micro-batches of one epoch for one rank, collated when read.

    ``groups`` are *global* micro-batches (``batch_size × world_size`` items); rank r reads items
    [r·batch_size, (r+1)·batch_size) of each. A rank whose slice is empty reads one placeholder that trains
    nothing, so that it still joins the step's collective calls. Only the grouping is held: tensors are built one
    batch at a time. Subclasses say how items collate and what a placeholder is.
    """

    def __init__(self, groups: list[list], pad_id: int, batch_size: int, rank: int = 0):
        self.groups = groups
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.rank = rank

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        group = self.groups[index]
        mine = group[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] or [self.placeholder(group)]
        return self.collate(mine, group)

    def placeholder(self, group: list):
        raise NotImplementedError

    def collate(self, mine: list, group: list):
        """The batch of this rank's items ``mine``, with its global counts taken over ``group``."""
        raise NotImplementedError


def epoch_order(examples: list, generator: torch.Generator | None) -> list:
    """``examples`` in this epoch's order: shuffled with the run's generator (the same order on every rank,
    reproducible from the seed), or as they are."""
    if generator is None:
        return list(examples)
    return [examples[i] for i in torch.randperm(len(examples), generator=generator).tolist()]


def global_groups(items: list, batch_size: int, world_size: int) -> list[list]:
    """Consecutive global micro-batches of ``batch_size × world_size`` items (the last may be short)."""
    size = batch_size * world_size
    return [items[i:i + size] for i in range(0, len(items), size)]


# Global micro-batches per mega-batch of length grouping: the default of transformers' LengthGroupedSampler. Larger
# groups rows of closer lengths (less padding); smaller keeps more of the shuffle's randomness in which rows meet.
MEGA_BATCH_GROUPS = 50


def length_grouped(items: list, size: int, length: Callable[[object], int],
                   generator: torch.Generator | None) -> list[list]:
    """Global micro-batches of ``size`` items of similar ``length``, from ``items`` in the epoch's order
    (``data.group_by_length``).

    The order is cut into mega-batches of ``MEGA_BATCH_GROUPS × size`` items; each is sorted by length, longest
    first, and cut into micro-batches, so a micro-batch's padding is only the length spread of its neighbours in
    the sort. The micro-batches are then shuffled with ``generator`` (so the step order does not run from long to
    short, and stays reproducible from the seed and the same on every rank); without one they stay in sorted
    order. The one short micro-batch an epoch can end with stays last, so that cutting the flattened result into
    consecutive groups of ``size`` gives back these micro-batches.
    """
    mega = MEGA_BATCH_GROUPS * size
    groups: list[list] = []
    for start in range(0, len(items), mega):
        # A stable sort: rows of equal length keep their shuffled order.
        ordered = sorted(items[start:start + mega], key=length, reverse=True)
        groups.extend(ordered[i:i + size] for i in range(0, len(ordered), size))
    if generator is None or not groups:
        return groups
    tail = [groups.pop()] if len(groups[-1]) < size else []
    return [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()] + tail


def sequence_length(example: Example) -> int:
    return len(example.input_ids)


class EpochBatches(RankBatches):
    """SFT micro-batches: rows, or packs of rows (``packed``). For packs, the (seq, seq) attention masks are built
    one batch at a time, so an epoch of long packed sequences costs no more memory than one batch."""

    def __init__(self, groups: list[list], pad_id: int, packed: bool, batch_size: int, rank: int = 0):
        super().__init__(groups, pad_id, batch_size, rank)
        self.packed = packed

    def placeholder(self, group: list):
        if self.packed:
            return [placeholder_example(group[0][0])]
        return placeholder_example(group[0])

    def collate(self, mine: list, group: list) -> Batch:
        batch = collate_packed(mine, self.pad_id) if self.packed else collate_padded(mine, self.pad_id)
        rows = [e for pack in group for e in pack] if self.packed else group
        batch.global_tokens = sum(len(e.input_ids) for e in rows)
        batch.global_trained = sum(e.num_trained for e in rows)
        return batch


def make_batches(examples: list[Example], batch_size: int, pad_id: int, *, packing: bool = False,
                 max_length: int = 0, generator: torch.Generator | None = None, rank: int = 0,
                 world_size: int = 1, group_by_length: bool = False) -> EpochBatches:
    """One epoch of micro-batches for ``rank`` of ``world_size``. With a generator the order is shuffled (the
    generator is the run's, so the order is reproducible from its seed and the same on every rank); with
    packing, rows are packed after shuffling; with ``group_by_length``, micro-batches are formed from rows of
    similar length after shuffling (:func:`length_grouped`; not with packing)."""
    if packing and group_by_length:
        raise ValueError("group_by_length and packing exclude each other")  # the config refuses the pair
    ordered: list = epoch_order(examples, generator)
    if group_by_length:
        groups = length_grouped(ordered, batch_size * world_size, sequence_length, generator)
    else:
        if packing:
            ordered = pack_examples(ordered, max_length)
        groups = global_groups(ordered, batch_size, world_size)
    return EpochBatches(groups, pad_id, packing, batch_size, rank)
