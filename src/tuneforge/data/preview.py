"""Render a tokenised example with its trained tokens visibly marked."""

from __future__ import annotations

from tuneforge.data.tokenize import Example
from tuneforge.losses import IGNORE_INDEX

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
