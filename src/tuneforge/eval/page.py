"""The pieces a ``tuneforge report`` page is built of: blocks (headings, text, tables, figures, code, samples),
rendered to HTML and Markdown by ``eval.report``, and how the values of eval.json read in them (fractions as
percentages, differences with the direction that is better)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MISSING = "—"

# Metrics of eval.json that tuneforge eval writes: label, whether the value is a fraction (shown as a percentage,
# differences in percentage points) and which direction is better (None: neither).
EVAL_METRICS: dict[str, tuple[str, bool, str | None]] = {
    "loss": ("held-out response loss (nats/token)", False, "lower"),
    "perplexity": ("perplexity", False, "lower"),
    "exact_match": ("exact match", True, "higher"),
    "contains": ("answer contained in the response", True, "higher"),
    "token_f1": ("token F1", True, "higher"),
    "rouge_l": ("ROUGE-L F1 on normalised words", True, "higher"),
    "regex_match": ("regex match", True, "higher"),
    "stopped_rate": ("stopped on its own", True, "higher"),
    "mean_response_words": ("mean response length (words)", False, None),
    "refusal_rate_harmful": ("refusals of harmful prompts", True, "higher"),
    "refusal_rate_benign": ("refusals of benign prompts", True, "lower"),
    "preference_accuracy": ("preference pairs ranked right", True, "higher"),
}


# ------------------------------------------------------------------------------------------------ blocks
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    """A paragraph; spans between backticks are code."""
    text: str


@dataclass
class Table:
    """``rows`` hold strings, or (string, "better" | "worse") for a difference to colour."""
    header: list[str]
    rows: list[list]
    numeric_from: int | None = 1  # the columns from this one on hold numbers (right-aligned); None: none do


@dataclass
class Image:
    file_name: str
    data: bytes
    alt: str


@dataclass
class Code:
    title: str
    text: str


@dataclass
class Sample:
    number: int
    prompt: str
    reference: str | None
    responses: list[tuple[str, str]]  # (model label, response)


# ------------------------------------------------------------------------------------------------ formatting
def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def row_decimals(values) -> int:
    """Decimals for numbers shown together (a table row): fewer as the largest grows, so a row lines up."""
    largest = max((abs(value) for value in values if is_number(value)), default=0)
    return 4 if largest < 10 else 2 if largest < 1000 else 0


def format_number(value: float, decimals: int | None = None) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{row_decimals([value]) if decimals is None else decimals}f}"


def metric_label(name: str) -> str:
    known = EVAL_METRICS.get(name)
    return f"{known[0]} `{name}`" if known else f"`{name}`"


def format_metric(name: str, value, decimals: int | None = None) -> str:
    """A metric value as the report shows it: fractions as percentages, absent values as a dash."""
    if value is None:
        return MISSING
    if not is_number(value):
        return str(value)
    return f"{100 * value:.1f}%" if EVAL_METRICS.get(name, ("", False))[1] else format_number(value, decimals)


def format_difference(name: str, first, second, decimals: int | None = None) -> str | tuple[str, str]:
    """``first - second``, in percentage points for fractions; with "better"/"worse" where the metric has a
    direction and the values differ."""
    if not (is_number(first) and is_number(second)):
        return MISSING
    difference = first - second
    _, fraction, better = EVAL_METRICS.get(name, ("", False, None))
    places = row_decimals([first, second]) if decimals is None else decimals
    text = f"{100 * difference:+.1f} pp" if fraction else f"{difference:+,.{places}f}"
    if better is None or difference == 0:
        return text
    return text, "better" if (difference > 0) == (better == "higher") else "worse"


def format_duration(seconds) -> str:
    if not is_number(seconds):
        return MISSING
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def format_setting(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
