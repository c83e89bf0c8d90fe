"""Render a tokenised example with its trained tokens visibly marked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneforge.data.tokenize import Example
from tuneforge.losses import IGNORE_INDEX

if TYPE_CHECKING:  # preference imports the dataset stage; a preview needs only the dataclasses' fields
    from tuneforge.data.preference import PairExample, UnpairedExample

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"


def render_example(example: Example, tokenizer, colour: bool = False) -> str:
    """Decode runs of trained and untrained tokens; trained runs are green (colour) or wrapped in [[ ]]."""
    pieces = []
    run: list[int] = []
    run_trained = None
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_mark(tokenizer.decode(run), run_trained, colour))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_mark(tokenizer.decode(run), run_trained, colour))
    return "".join(pieces)


def _mark(text: str, trained: bool, colour: bool) -> str:
    if not trained:
        return text
    return f"{GREEN}{text}{RESET}" if colour else f"{OPEN}{text}{CLOSE}"


def _continuation(example: Example, start: int) -> Example:
    return Example(example.input_ids[start:], example.labels[start:], row=example.row)


def render_pair(pair: PairExample, tokenizer, colour: bool = False) -> str:
    """A :class:`~tuneforge.data.preference.PairExample`: the shared prompt once, then the chosen and the
    rejected continuation with their trained spans marked as in :func:`render_example`."""
    prompt = tokenizer.decode(pair.chosen.input_ids[:pair.prompt_length])
    chosen = render_example(_continuation(pair.chosen, pair.prompt_length), tokenizer, colour)
    rejected = render_example(_continuation(pair.rejected, pair.prompt_length), tokenizer, colour)
    # rstrip: the templates end with a newline; the labels below start their own lines.
    return "\n".join([prompt.rstrip("\n"), "chosen:", chosen.rstrip("\n"), "rejected:", rejected.rstrip("\n")])


def render_unpaired(example: UnpairedExample, tokenizer, colour: bool = False) -> str:
    """A :class:`~tuneforge.data.preference.UnpairedExample`: its prompt, then its completion marked as in
    :func:`render_example` under a desirable / undesirable heading."""
    prompt = tokenizer.decode(example.example.input_ids[:example.prompt_length])
    completion = render_example(_continuation(example.example, example.prompt_length), tokenizer, colour)
    heading = "desirable:" if example.desirable else "undesirable:"
    return "\n".join([prompt.rstrip("\n"), heading, completion.rstrip("\n")])


def preview_rows(examples: list, count: int, report) -> list[tuple[str, object]]:
    """The first ``count`` examples with their headings (``row 3``); for a mixture (``report.sources``), taken from
    the sources in turn and headed ``row 3 of SOURCE``, so a preview shows every source and which row is whose."""
    def source_of(example) -> str:
        inner = getattr(example, "chosen", None) or getattr(example, "example", None) or example
        return getattr(inner, "source", "")

    if not report.sources:
        return [(f"row {example.row}", example) for example in examples[:count]]
    queues = {sub.path: [e for e in examples if source_of(e) == sub.path] for sub in report.sources}
    chosen: list[tuple[str, object]] = []
    while len(chosen) < count and any(queues.values()):
        for name, queue in queues.items():
            if queue and len(chosen) < count:
                example = queue.pop(0)
                chosen.append((f"row {example.row} of {name}", example))
    return chosen
