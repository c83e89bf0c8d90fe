"""Prompt-only data for online RL (``method: grpo | rloo | ppo``): the model writes the responses during training.

A row has a ``prompt`` (a string, read as one user message, or a list of ``{"role", "content"}`` messages ending
with a user message) and any other fields; the whole row is kept and handed to the reward functions, so they can
read ``row["answer"]`` or any other column. ``data.system_prompt`` (or a row's ``system`` field) is added as in
preference data.

Prompts are tokenised segment by segment with the template (as in training and in ``tuneforge.generation``), with
the assistant header appended. A prompt whose tokens plus ``max_new_tokens`` (of the method's own section) exceed
``data.max_length`` is dropped (``data.on_truncation: drop``, counted in the report) or raises (``raise``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config import DataConfig, RunConfig
from tuneforge.data.dataset import DataReport
from tuneforge.data.formats import Conversation, Message, _Checker
from tuneforge.data.preference import _add_system, _explicit_prompt
from tuneforge.data.mixture import is_source_value, load_sources, source_name
from tuneforge.data.prepare import PreparedData, ReadData, per_source_template, read_data, tokenize_split
from tuneforge.data.readers import BadRow, read_rows
from tuneforge.data.tokenize import encode_prompt
from tuneforge.errors import DataError, UserError
from tuneforge.recipes.registry import get


@dataclass
class PromptRow:
    """A validated prompt and the row it came from (all its fields, for the reward functions)."""

    prompt: list[Message]
    fields: dict
    source: str
    number: int


@dataclass
class PromptExample:
    """A tokenised prompt: ``input_ids`` end with the assistant header; ``text`` is what those ids spell;
    ``messages`` the prompt's turns (a reward model scores them with the response appended)."""

    input_ids: list[int]
    text: str
    fields: dict
    messages: list[Message] | None = None


def load_prompt_rows(path, config: DataConfig, report: DataReport) -> list[PromptRow]:
    """Read and validate every row of ``path``. In ``raise`` mode the first bad row raises its
    :class:`DataError` (naming file, row and field); in ``skip`` mode it is counted in ``report.dropped``."""
    if is_source_value(path):
        return load_sources(path, config, report, load_prompt_rows)
    report.path = name = source_name(path)
    rows = []
    for row in read_rows(path):
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row.error
            check = _Checker(name, row.number)
            if "prompt" not in row.fields or row.fields["prompt"] is None:
                raise check.fail("prompt", "missing required field (online RL rows need a prompt; the model writes "
                                 "the response)", "missing_field")
            prompt = _add_system(_explicit_prompt(row.fields, check), row.fields, check, config.system_prompt)
            rows.append(PromptRow(prompt, dict(row.fields), name, row.number))
        except DataError as error:
            if config.on_error == "raise":
                raise
            report.dropped[error.reason] += 1
    if not rows:
        raise UserError(f"{name}: no usable prompt rows ({report.rows} read)")
    return rows


def read_prompt_data(config: RunConfig) -> ReadData:
    """:func:`tuneforge.data.prepare.read_data` for prompt rows; ``ReadData.train`` holds ``PromptRow`` items."""
    return read_data(config, load_prompt_rows)


def leaves_room(row, prompt_tokens: int, config: RunConfig, report: DataReport) -> bool:
    """Whether a prompt of ``prompt_tokens`` leaves room for the method's ``max_new_tokens`` within
    ``data.max_length``; one that does not raises (``data.on_truncation: raise``) or is counted as dropped.
    ``row`` is any row with ``source`` and ``number`` (for the error's file and row)."""
    section = get(config.method).section
    new_tokens = config.method_section.max_new_tokens
    if prompt_tokens <= config.data.max_length - new_tokens:
        return True
    if config.data.on_truncation == "raise":
        raise DataError(row.source, row.number, "prompt",
                        f"{prompt_tokens} prompt tokens + {section}.max_new_tokens={new_tokens} exceed "
                        f"data.max_length={config.data.max_length}; raise data.max_length or shorten the prompt",
                        "prompt_too_long")
    report.dropped["prompt_too_long"] += 1
    return False


def tokenize_prompts(rows: list[PromptRow], template, tokenizer, config: RunConfig,
                     report: DataReport) -> list[PromptExample]:
    """Tokenise each prompt with the assistant header appended; drop (or raise on) prompts that leave no room for
    ``max_new_tokens`` within ``data.max_length``."""
    section = get(config.method).section  # the method's own section: grpo for grpo and rloo
    new_tokens = config.method_section.max_new_tokens
    room = config.data.max_length - new_tokens
    examples = []
    for row in rows:
        ids, text = encode_prompt(Conversation(list(row.prompt)), template, tokenizer)
        if not leaves_room(row, len(ids), config, report):
            continue
        report.kept += 1
        report.tokens += len(ids)
        examples.append(PromptExample(ids, text, row.fields, list(row.prompt)))
    if rows and not examples:
        raise UserError(f"{report.path}: every prompt is longer than data.max_length - {section}.max_new_tokens = "
                        f"{room} tokens; raise data.max_length or lower {section}.max_new_tokens")
    return examples


def tokenize_prompt_data(read: ReadData, config: RunConfig, tokenizer, template) -> PreparedData:
    def tokenize_with(chosen):
        return lambda rows, report: tokenize_prompts(rows, chosen, tokenizer, config, report)

    return tokenize_split(read, tokenize_with(template), per_source_template(tokenizer, tokenize_with))
