"""Several sources for one split: read each with its own format and column mapping, then mix them by ``weight`` or
``fraction``.

The mix is drawn from the run's seed with a ``torch.Generator`` of its own, so the same config gives the same rows
in the same order on every rank and on resume. Each source keeps its own :class:`DataReport` (rows read, dropped by
reason, rows in the mix, rows kept and trained tokens), under the split's report (``DataReport.sources``), and so
in ``data_report.json``.

Order of the steps: every source is read and validated; ``data.val_fraction`` holds out rows of the unweighted
union (so a repeated row never lands in both train and validation); then each source's rows are repeated or
sampled by its ``weight`` or ``fraction``; then each source is tokenised with its own template.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch

from tuneforge.data.sources import DataSource, parse_sources


def is_source_value(value: object) -> bool:
    """Whether a loader's ``path`` argument is a source mapping or a list of sources (rather than one path, rows in
    memory or a :class:`DataSource`), which :func:`load_sources` reads."""
    return isinstance(value, (dict, list))


def source_name(value: object) -> str:
    """What messages and reports call a loader's ``path`` argument."""
    return value.label if isinstance(value, DataSource) else str(value)


def source_config(config, source: DataSource):
    """``data`` as one source reads it: its own ``format`` when it sets one."""
    return dataclasses.replace(config, format=source.format) if source.format else config


def load_sources(value: object, config, report, load_one: Callable, key: str = "data.train") -> list:
    """Read a source mapping or a mixture with ``load_one(source, data_config, report)`` (a loader such as
    ``load_conversations``). One source reads into ``report`` itself; several each into a report of their own,
    listed in ``report.sources``, with ``report`` holding the totals. The rows come back source after source."""
    sources = parse_sources(value, key)
    if len(sources) == 1:
        return load_one(sources[0], source_config(config, sources[0]), report)
    report.path = "mixture of " + " + ".join(source.label for source in sources)
    items: list = []
    for source in sources:
        sub = type(report)(spec=source)
        items += load_one(source, source_config(config, source), sub)
        report.sources.append(sub)
        report.rows += sub.rows
        report.dropped.update(sub.dropped)
    return items


def held_out(report, validation: list) -> None:
    """Take the rows ``data.val_fraction`` held out off the read counts of the sources they came from."""
    by_source = Counter(item.source for item in validation)
    for sub in report.sources:
        sub.rows -= by_source[sub.path]


def mix(items: list, report, seed: int) -> list:
    """The rows of a mixture after each source's ``weight`` or ``fraction``: ``weight`` 2 repeats every row, 1.5
    adds a seeded half once more, 0.5 keeps a seeded half; ``fraction`` keeps a seeded share (at least one row).
    Sources stay in their order and rows in theirs; ``report.sources[i].mixed`` counts what each contributes."""
    if not report.sources:
        return items
    generator = torch.Generator().manual_seed(seed)
    groups = group_by_source(items, report)
    out: list = []
    for sub in report.sources:
        chosen = _draw(groups[sub.path], sub.spec, generator)
        sub.mixed = len(chosen)
        out += chosen
    report.mixed = len(out)
    return out


def group_by_source(items: list, report) -> dict[str, list]:
    """``items`` by the source they came from (``item.source``), in the order of ``report.sources``."""
    groups: dict[str, list] = {sub.path: [] for sub in report.sources}
    for item in items:
        groups[item.source].append(item)
    return groups


def _draw(rows: list, spec: DataSource, generator: torch.Generator) -> list:
    multiplier = spec.multiplier
    if multiplier == 1 or not rows:
        return list(rows)
    whole, part = divmod(multiplier, 1.0)
    count = round(len(rows) * part)
    if spec.fraction is not None:
        count = max(1, count)  # a fraction never empties a source
    # Every random draw happens, whatever the counts, so that one source's size never shifts another's sample.
    order = torch.randperm(len(rows), generator=generator).tolist()
    sampled = [rows[i] for i in sorted(order[:count])]
    return list(rows) * int(whole) + sampled


def tokenize_sources(rows: list, report, tokenize: Callable, for_source: Callable | None = None) -> list:
    """Tokenise a split's rows with ``tokenize(rows, report)``; for a mixture, source by source, each into its own
    report and with its own template (``for_source(spec)`` gives the tokenize function for a source that sets
    one), the split's report taking the totals."""
    if not report.sources:
        return tokenize(rows, report)
    groups = group_by_source(rows, report)
    examples: list = []
    for sub in report.sources:
        run = (for_source(sub.spec) if for_source and sub.spec.template else None) or tokenize
        before = Counter(sub.dropped)
        examples += run(groups[sub.path], sub) if groups[sub.path] else []
        report.dropped.update(sub.dropped - before)
        for name in ("truncated", "tokens", "trained_tokens"):
            setattr(report, name, getattr(report, name) + getattr(sub, name))
    report.kept = sum(sub.kept for sub in report.sources)
    return examples


def weight_note(spec: DataSource | None) -> str:
    """`` (weight 2)`` or `` (fraction 0.5)`` for a report line; empty for a source used as it is."""
    if spec is None:
        return ""
    if spec.weight is not None:
        return f" (weight {spec.weight:g})"
    return f" (fraction {spec.fraction:g})" if spec.fraction is not None else ""
