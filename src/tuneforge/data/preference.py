"""Preference data for DPO, SimPO, ORPO, KTO and reward models: file -> validated pairs -> tokenised pairs ->
batches of chosen and rejected sequences.

Row layouts (detected from the row's keys; ``data.format`` must stay ``auto``):

1. Explicit prompt: ``prompt`` (a string, read as one user message, or a list of ``{"role", "content"}``
   messages ending with a user message), ``chosen`` and ``rejected`` (each a string, read as one assistant
   message, or a list of assistant messages). An optional ``system`` string becomes the system message, and an
   optional numeric ``margin`` (how clearly chosen is better; Llama 2's reward-model margin) is used by
   ``method: reward``.
2. Implicit prompt (the Anthropic HH layout): no ``prompt``; ``chosen`` and ``rejected`` are whole
   conversations, as message lists or as HH text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is
   their longest common leading run of messages, cut back to end with a user message; what follows it in each
   must be assistant messages.
3. Unpaired (KTO): ``prompt``, ``completion`` (a string or a list of assistant messages) and ``label`` (a bool;
   also ``"true"``/``"false"``/``"1"``/``"0"`` and 0/1, since CSV cells are strings). For KTO, paired rows are
   accepted too and split in two, chosen -> desirable and rejected -> undesirable, as TRL does.

``data.system_prompt`` is added to rows that have no system message. Assistant messages inside a prompt are
context: rendered, never trained.

Reasons a row is rejected (the keys of ``DataReport.dropped`` in ``data.on_error=skip``): ``missing_field``,
``wrong_type``, ``unknown_role``, ``misplaced_system``, ``no_prompt``, ``prompt_ends_with_assistant``,
``prompt_mismatch`` (implicit prompt: chosen and rejected differ before their final assistant messages),
``empty_response``, ``identical_responses``, ``bad_label``, ``unpaired_row`` (a ``label`` row given to a pairwise
method); after tokenisation ``template_failed`` and ``response_truncated_away``.

Only the responses are trained (``data.train_on_prompt`` does not apply): the preference losses compare the
log-probabilities of the two completions of one prompt, and the shared prompt would only add the same terms to
both sides.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from tuneforge.config import DataConfig
from tuneforge.data.collate import Batch, collate_padded, next_token_targets, placeholder_example
from tuneforge.data.dataset import DataReport, RankBatches, epoch_order, global_groups
from tuneforge.data.formats import ROLES, Conversation, Message, _check_structure, _Checker
from tuneforge.data.mixture import is_source_value, load_sources, source_name
from tuneforge.data.readers import BadRow, read_rows
from tuneforge.data.templates import Template
from tuneforge.data.tokenize import Example, encode_conversation
from tuneforge.errors import DataError, TemplateError, UserError
from tuneforge.losses import IGNORE_INDEX

_ROLE_MAP = {role: role for role in ROLES}
# An HH turn marker: at the start of the text or after a blank line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_TRUE_LABELS = ("true", "1")
_FALSE_LABELS = ("false", "0")


# ---------------------------------------------------------------------------------------------------------------
# Rows: validation without a tokenizer
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PreferenceRow:
    """A validated pair before tokenisation.

    Attributes:
        prompt: optional system message, then user/assistant turns, ending with a user message; its assistant
            messages have ``trained=False``.
        chosen / rejected: one or more assistant messages (``trained=True``).
        margin: the row's optional ``margin`` field (reward models).
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str = ""
    row: int = 0
    margin: float | None = None


@dataclass
class UnpairedRow:
    """A validated KTO example: one completion of a prompt, labelled desirable or not."""

    prompt: list[Message]
    completion: list[Message]
    desirable: bool
    source: str = ""
    row: int = 0


def _parse_hh(text: str, check: _Checker, name: str) -> list[Message] | None:
    """Messages of an HH-layout string, or None when it has no turn markers."""
    turns = list(_HH_TURN.finditer(text))
    if not turns:
        return None
    if text[:turns[0].start()].strip():
        raise check.fail(name, "has text before its first '\\n\\nHuman:' marker", "no_prompt")
    messages = []
    for index, turn in enumerate(turns):
        end = turns[index + 1].start() if index + 1 < len(turns) else len(text)
        role = _HH_ROLES[turn.group(1)]
        content = text[turn.end():end].strip()
        if role == "assistant" and not content:
            raise check.fail(name, f"turn {index + 1} (Assistant:) is empty", "empty_response")
        messages.append(Message(role, content))
    return messages


def _responses(fields: dict, name: str, check: _Checker) -> list[Message]:
    """``name`` as a list of assistant messages: a string is one message."""
    value = fields.get(name)
    if isinstance(value, list):
        messages = check.message_list(fields, name, "role", "content", _ROLE_MAP)
        if not messages:
            raise check.fail(name, "has no messages", "empty_response")
        for index, message in enumerate(messages):
            if message.role != "assistant":
                raise check.fail(f"{name}[{index}].role", f"{name} messages must be assistant messages (got "
                                 f"{message.role!r}); put earlier turns in prompt", "unknown_role")
        return messages
    if value is not None and not isinstance(value, str):
        raise check.fail(name, f"expected a string or a list of messages, got {type(value).__name__}", "wrong_type")
    return [Message("assistant", check.string(fields, name, empty_reason="empty_response"))]


def _explicit_prompt(fields: dict, check: _Checker) -> list[Message]:
    value = fields["prompt"]
    if isinstance(value, list):
        prompt = check.message_list(fields, "prompt", "role", "content", _ROLE_MAP)
        if not prompt:
            raise check.fail("prompt", "has no messages", "no_prompt")
        for message in prompt:
            message.trained = False
        if prompt[-1].role == "assistant":
            raise check.fail("prompt", "must end with a user message (it ends with an assistant message); move "
                             "that message into chosen/rejected or drop it", "prompt_ends_with_assistant")
        return prompt
    if not isinstance(value, str):
        raise check.fail("prompt", f"expected a string or a list of messages, got {type(value).__name__}",
                         "wrong_type")
    return [Message("user", check.string(fields, "prompt", empty_reason="no_prompt"))]


def _conversation(fields: dict, name: str, check: _Checker) -> list[Message]:
    """``name`` as a whole conversation (implicit-prompt rows): a message list or HH text."""
    if name not in fields or fields[name] is None:
        raise check.fail(name, "missing required field (a preference row needs chosen and rejected)",
                         "missing_field")
    value = fields[name]
    if isinstance(value, list):
        return check.message_list(fields, name, "role", "content", _ROLE_MAP)
    if not isinstance(value, str):
        raise check.fail(name, f"expected a string or a list of messages, got {type(value).__name__}", "wrong_type")
    messages = _parse_hh(value, check, name)
    if messages is None:
        raise check.fail(name, "is a plain string and the row has no prompt: add a `prompt` field, or give chosen "
                         "and rejected as whole conversations (message lists, or HH text with '\\n\\nHuman:' and "
                         "'\\n\\nAssistant:' turns)", "no_prompt")
    return messages


def _split_implicit(chosen: list[Message], rejected: list[Message], check: _Checker
                    ) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen responses, rejected responses) of two whole conversations."""
    shared = 0
    while (shared < min(len(chosen), len(rejected))
           and (chosen[shared].role, chosen[shared].content) == (rejected[shared].role, rejected[shared].content)):
        shared += 1
    # The responses start after the last user message both share; shared assistant turns after it (both
    # answers begin the same way) belong to each response.
    while shared and chosen[shared - 1].role != "user":
        shared -= 1
    if shared == 0:
        raise check.fail("chosen", "chosen and rejected share no leading user message, so the prompt cannot be "
                         "inferred; add a `prompt` field", "no_prompt")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(messages):
            raise check.fail(name, "has no response after the prompt it shares with the other side",
                             "empty_response")
        for index in range(shared, len(messages)):
            if messages[index].role != "assistant":
                raise check.fail(f"{name}[{index}]", f"a {messages[index].role} message after the shared prompt: "
                                 "chosen and rejected may differ only in their final assistant messages",
                                 "prompt_mismatch")
    prompt = chosen[:shared]
    for message in prompt:
        message.trained = False
    return prompt, chosen[shared:], rejected[shared:]


def _add_system(prompt: list[Message], fields: dict, check: _Checker, system_prompt: str | None) -> list[Message]:
    # An empty optional system field (common in exported datasets) means "no system message".
    system = check.string(fields, "system", required=False, allow_empty=True)
    has_system = bool(prompt) and prompt[0].role == "system"
    if system:
        if has_system:
            raise check.fail("system", "the prompt already starts with a system message; give only one",
                             "misplaced_system")
        return [Message("system", system)] + prompt
    if system_prompt and not has_system:
        return [Message("system", system_prompt)] + prompt
    return prompt


def _same(a: list[Message], b: list[Message]) -> bool:
    return [(m.role, m.content) for m in a] == [(m.role, m.content) for m in b]


def to_preference_row(fields: dict, path: str, row: int, system_prompt: str | None = None) -> PreferenceRow:
    """Validate one paired row (layout 1 or 2 of the module docstring); raises :class:`DataError`."""
    check = _Checker(path, row)
    if "label" in fields:
        raise check.fail("label", "this row is unpaired (KTO) data; this method needs chosen and rejected pairs",
                         "unpaired_row")
    if fields.get("prompt") is not None:
        prompt = _explicit_prompt(fields, check)
        chosen = _responses(fields, "chosen", check)
        rejected = _responses(fields, "rejected", check)
        # The system / user / assistant order rules of SFT rows, on the conversation the model will see.
        _check_structure(prompt + chosen, check, "prompt")
    else:
        whole_chosen = _conversation(fields, "chosen", check)
        whole_rejected = _conversation(fields, "rejected", check)
        prompt, chosen, rejected = _split_implicit(whole_chosen, whole_rejected, check)
        _check_structure(prompt + chosen, check, "chosen")
    if _same(chosen, rejected):
        raise check.fail("rejected", "is identical to chosen; a pair must differ", "identical_responses")
    prompt = _add_system(prompt, fields, check, system_prompt)
    margin = fields.get("margin")
    if margin is not None:
        try:
            margin = float(margin)  # CSV cells are strings
        except (TypeError, ValueError):
            raise check.fail("margin", f"expected a number, got {margin!r}", "wrong_type") from None
        if margin != margin or margin in (float("inf"), float("-inf")):
            raise check.fail("margin", f"expected a finite number, got {margin!r}", "wrong_type")
    return PreferenceRow(prompt, chosen, rejected, source=path, row=row, margin=margin)


def _label(fields: dict, check: _Checker) -> bool:
    if fields.get("label") is None:
        raise check.fail("label", "missing required field (true for a desirable completion, false otherwise)",
                         "missing_field")
    value = fields["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_LABELS + _FALSE_LABELS:
        return value.strip().lower() in _TRUE_LABELS
    raise check.fail("label", f"expected true or false (or 1/0), got {value!r}", "bad_label")


def to_unpaired_rows(fields: dict, path: str, row: int, system_prompt: str | None = None) -> list[UnpairedRow]:
    """Validate one KTO row: an unpaired row gives one :class:`UnpairedRow`, a paired row two (chosen desirable,
    rejected undesirable). Raises :class:`DataError`."""
    check = _Checker(path, row)
    if "label" not in fields and "completion" not in fields and ("chosen" in fields or "rejected" in fields):
        pair = to_preference_row(fields, path, row, system_prompt)
        return [UnpairedRow(list(pair.prompt), pair.chosen, True, source=path, row=row),
                UnpairedRow(list(pair.prompt), pair.rejected, False, source=path, row=row)]
    if fields.get("prompt") is None:
        raise check.fail("prompt", "missing required field (an unpaired row needs prompt, completion and label)",
                         "no_prompt")
    prompt = _explicit_prompt(fields, check)
    completion = _responses(fields, "completion", check)
    _check_structure(prompt + completion, check, "prompt")
    desirable = _label(fields, check)
    prompt = _add_system(prompt, fields, check, system_prompt)
    return [UnpairedRow(prompt, completion, desirable, source=path, row=row)]


def load_preference_rows(path, config: DataConfig, report: DataReport, unpaired: bool = False) -> list:
    """Read and validate every row of ``path``: :class:`PreferenceRow` items, or :class:`UnpairedRow` items
    with ``unpaired`` (where a paired file row gives two). In ``data.on_error=raise`` the first bad row raises
    its :class:`DataError`; in ``skip`` it is counted in ``report.dropped`` by reason. ``report.rows`` counts
    file rows."""
    if config.format != "auto":
        raise UserError(f"data.format={config.format!r} names an SFT row format; preference data is recognised "
                        "from its keys (prompt/chosen/rejected, or prompt/completion/label): set data.format to "
                        "auto")
    if is_source_value(path):
        return load_sources(path, config, report, functools.partial(load_preference_rows, unpaired=unpaired))
    report.path = name = source_name(path)
    items: list = []
    for row in read_rows(path):
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row.error
            if unpaired:
                items += to_unpaired_rows(row.fields, name, row.number, config.system_prompt)
            else:
                items.append(to_preference_row(row.fields, name, row.number, config.system_prompt))
        except DataError as error:
            if config.on_error == "raise":
                raise
            report.dropped[error.reason] += 1
    if not items:
        raise UserError(f"{name}: no usable rows ({report.rows} read"
                        + (f", dropped: {dict(report.dropped)})" if report.dropped else ")"))
    return items


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PairExample:
    """A tokenised pair.

    Attributes:
        chosen: prompt + chosen tokens; labels ``IGNORE_INDEX`` on the prompt, token ids on trained spans.
        rejected: prompt + rejected tokens, likewise.
        prompt_length: number of leading tokens both share (the rendered prompt with the assistant header).
        row: the source row number.
        ref_chosen / ref_rejected: reference-model log-prob sums, filled in by the recipe when precomputed.
        margin: the row's ``margin`` (reward models), or None.
    """

    chosen: Example
    rejected: Example
    prompt_length: int
    row: int = 0
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    margin: float | None = None


@dataclass
class UnpairedExample:
    """A tokenised KTO example and its mismatched pair for the KL estimate.

    Attributes:
        example: prompt + completion.
        kl_example: this row's prompt + another row's completion (KTO's z0 estimate, Ethayarajh et al. 2024).
        prompt_length: tokens of the rendered prompt in ``example`` (and in ``kl_example``).
        desirable: the label.
        ref_logp / ref_kl_logp: reference log-prob sums of the two, filled in by the recipe when precomputed.
    """

    example: Example
    kl_example: Example
    prompt_length: int
    desirable: bool
    row: int = 0
    ref_logp: float | None = None
    ref_kl_logp: float | None = None


def _first_trained(example: Example) -> int:
    return next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


class _Encoder:
    """Encodes prompt + response conversations of one file, applying the per-row error and truncation policies
    of ``data.on_error`` and ``data.on_truncation`` and counting into the report."""

    def __init__(self, template: Template, tokenizer, config: DataConfig, report: DataReport):
        self.template = template
        self.tokenizer = tokenizer
        self.config = config
        self.report = report
        self.first_template_error = ""

    def reject(self, error: DataError, policy_raises: bool) -> None:
        if policy_raises:
            raise error
        self.report.dropped[error.reason] += 1
        if error.reason == "template_failed" and not self.first_template_error:
            self.first_template_error = f" (first template error: {error.message})"

    def encode(self, source: str, row: int, side: str, prompt: list[Message], response: list[Message]
               ) -> Example | None:
        """The example of prompt + ``response`` (the row's field ``side``), or None when the row is dropped."""
        try:
            example = encode_conversation(Conversation(prompt + response, source=source, row=row), self.template,
                                          self.tokenizer, self.config.max_length, train_on_prompt=False)
        except TemplateError as exc:
            # A chat template may reject one row (e.g. roles that do not alternate): name the row.
            self.reject(DataError(source, row, None, str(exc), "template_failed"), self.config.on_error == "raise")
            return None
        if example.responses_lost or example.num_trained == 0:
            self.reject(DataError(source, row, side, f"longer than data.max_length={self.config.max_length} tokens "
                                  "with the prompt: truncation would remove a whole response; raise "
                                  "data.max_length or set data.on_truncation=drop", "response_truncated_away"),
                        self.config.on_truncation == "raise")
            return None
        return example

    def prompt_length(self, source: str, row: int, examples: list[Example]) -> int | None:
        """The shared prompt length of examples of one prompt, or None when the template rendered the prompt
        differently for them (counted or raised as ``template_failed``)."""
        lengths = {_first_trained(e) for e in examples}
        length = lengths.pop()
        if lengths or any(e.input_ids[:length] != examples[0].input_ids[:length] for e in examples):
            self.reject(DataError(source, row, None, f"template {self.template.name} renders the prompt differently "
                                  "for chosen and rejected, so they do not share a prompt prefix; use "
                                  "data.template=chatml", "template_failed"), self.config.on_error == "raise")
            return None
        return length

    def finish(self, kept: int) -> None:
        self.report.kept = kept
        if not kept:
            raise UserError(f"{self.report.path}: no rows left after tokenisation (dropped: "
                            f"{dict(self.report.dropped)})" + self.first_template_error)


def tokenize_pairs(rows: list[PreferenceRow], template: Template, tokenizer, config: DataConfig,
                   report: DataReport) -> list[PairExample]:
    """Tokenise each pair as prompt + chosen and prompt + rejected and check that both start with the same
    prompt tokens. Pairs where either side would lose a response to truncation are dropped (counted) or raise,
    by ``data.on_truncation``; a pair the template cannot render raises or is counted, by ``data.on_error``."""
    encoder = _Encoder(template, tokenizer, config, report)
    pairs = []
    for row in rows:
        chosen = encoder.encode(row.source, row.row, "chosen", row.prompt, row.chosen)
        if chosen is None:
            continue
        rejected = encoder.encode(row.source, row.row, "rejected", row.prompt, row.rejected)
        if rejected is None:
            continue
        prompt_length = encoder.prompt_length(row.source, row.row, [chosen, rejected])
        if prompt_length is None:
            continue
        report.truncated += int(chosen.truncated or rejected.truncated)
        report.tokens += len(chosen.input_ids) + len(rejected.input_ids)
        report.trained_tokens += chosen.num_trained + rejected.num_trained
        pairs.append(PairExample(chosen, rejected, prompt_length, row=row.row, margin=row.margin))
    encoder.finish(len(pairs))
    return pairs


def tokenize_unpaired(rows: list[UnpairedRow], template: Template, tokenizer, config: DataConfig,
                      report: DataReport) -> list[UnpairedExample]:
    """Tokenise KTO examples and pair each with a mismatched completion for the KL estimate.

    The ``kl_example`` of kept example i is its own prompt tokens followed by the completion tokens (and labels)
    of kept example (i + 1) % n, cut at ``data.max_length``. The pairing is fixed, not drawn per batch, so the
    reference log-probs of the KL examples can be computed once before training. With one example the KL
    example is the example itself.
    """
    encoder = _Encoder(template, tokenizer, config, report)
    kept: list[tuple[Example, int, UnpairedRow]] = []
    for row in rows:
        example = encoder.encode(row.source, row.row, "completion", row.prompt, row.completion)
        if example is None:
            continue
        report.truncated += int(example.truncated)
        report.tokens += len(example.input_ids)
        report.trained_tokens += example.num_trained
        kept.append((example, _first_trained(example), row))
    encoder.finish(len(kept))
    out = []
    for index, (example, prompt_length, row) in enumerate(kept):
        other, other_prompt, _ = kept[(index + 1) % len(kept)]
        ids = example.input_ids[:prompt_length] + other.input_ids[other_prompt:]
        labels = [IGNORE_INDEX] * prompt_length + other.labels[other_prompt:]
        limit = config.max_length
        kl_example = Example(ids[:limit], labels[:limit], truncated=other.truncated or len(ids) > limit,
                             row=row.row)
        out.append(UnpairedExample(example, kl_example, prompt_length, row.desirable, row=row.row))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------

def _optional_tensor(values: list[float | None]) -> torch.Tensor | None:
    """(B,) float32 when every value is set, else None (the recipe then computes them)."""
    if any(v is None for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32)


@dataclass
class PairBatch:
    """One micro-batch of B pairs.

    Attributes:
        sequences: 2B rows padded to one width: rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected ones
            in the same order, so one forward pass serves both.
        num_pairs: B.
        weights: (B,) float32, 1.0 for real pairs, 0.0 for placeholder pairs (a rank with no rows left).
        ref_chosen / ref_rejected: (B,) float32 reference log-prob sums when every pair has them, else None.
        chosen_tokens: trained target positions in the chosen rows (ORPO normalises its NLL by this).
        margins: (B,) float32 reward-model margins when every pair has one, else None.
        rejected_targets: set in the shared-prompt layout (:func:`collate_pairs_shared_prompt`): then
            ``sequences`` has B rows, prompt + chosen + rejected, ``sequences.targets`` are the chosen side's
            targets and this (B, seq) tensor the rejected side's.
        global_pairs / global_chosen_tokens: real pairs and chosen trained tokens of this micro-batch over all
            ranks; default to the local counts.
    """

    sequences: Batch
    num_pairs: int
    weights: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_tokens: int
    margins: torch.Tensor | None = None
    rejected_targets: torch.Tensor | None = None
    global_pairs: int | None = None
    global_chosen_tokens: int | None = None

    def __post_init__(self):
        if self.global_pairs is None:
            self.global_pairs = int((self.weights > 0).sum())
        if self.global_chosen_tokens is None:
            self.global_chosen_tokens = self.chosen_tokens


@dataclass
class UnpairedBatch:
    """One micro-batch of B KTO examples.

    Attributes:
        sequences: 2B rows: rows 0..B-1 the examples, rows B..2B-1 their KL examples in the same order.
        num_examples: B.
        desirable: (B,) bool labels.
        weights: (B,) float32, 0.0 for placeholders.
        ref_logps / ref_kl_logps: (B,) float32 reference log-prob sums when every example has them, else None.
        global_examples: real examples of this micro-batch over all ranks; defaults to the local count.
    """

    sequences: Batch
    num_examples: int
    desirable: torch.Tensor
    weights: torch.Tensor
    ref_logps: torch.Tensor | None
    ref_kl_logps: torch.Tensor | None
    global_examples: int | None = None

    def __post_init__(self):
        if self.global_examples is None:
            self.global_examples = int((self.weights > 0).sum())


def _weights(examples: list[Example]) -> torch.Tensor:
    # Tokenisation drops every row with nothing trained, so an example without a trained token is a placeholder.
    return torch.tensor([1.0 if e.num_trained else 0.0 for e in examples], dtype=torch.float32)


def collate_pairs(pairs: list[PairExample], pad_id: int) -> PairBatch:
    """Stack the chosen then the rejected sequences of ``pairs`` into one padded batch of 2B rows."""
    count = len(pairs)
    sequences = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return PairBatch(sequences, count, _weights([p.chosen for p in pairs]),
                     _optional_tensor([p.ref_chosen for p in pairs]),
                     _optional_tensor([p.ref_rejected for p in pairs]),
                     chosen_tokens=int((sequences.targets[:count] != IGNORE_INDEX).sum()),
                     margins=_optional_tensor([p.margin for p in pairs]))


def collate_pairs_shared_prompt(pairs: list[PairExample], pad_id: int) -> PairBatch:
    """One row per pair, prompt + chosen + rejected, with the prompt computed once for both sides.

    The rejected tokens attend to the prompt and to earlier rejected tokens only (never to the chosen ones), and
    their positions continue from the prompt as if chosen were not there, so every hidden state is the one the
    separate layout computes, and so are the log-probs and their gradients; the prompt's forward and backward are
    done once instead of twice. The last prompt position predicts the first token of both sides, so each side
    has its own targets: ``sequences.targets`` (chosen) and ``rejected_targets``.
    """
    count = len(pairs)
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) - p.prompt_length for p in pairs]
    width = max(lengths)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    chosen_targets = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    rejected_targets = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((count, width), dtype=torch.long)
    # Segment of each position: 0 prompt, 1 chosen, 2 rejected; padding gets a unique negative id per position.
    segment = -torch.arange(1, width + 1).repeat(count, 1)
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = pair.prompt_length, pair.chosen, pair.rejected
        end_chosen = len(chosen.input_ids)
        end = end_chosen + len(rejected.input_ids) - prompt
        input_ids[i, :end_chosen] = torch.tensor(chosen.input_ids)
        input_ids[i, end_chosen:end] = torch.tensor(rejected.input_ids[prompt:])
        positions[i, :end_chosen] = torch.arange(end_chosen)
        positions[i, end_chosen:end] = torch.arange(prompt, len(rejected.input_ids))
        segment[i, :prompt] = 0
        segment[i, prompt:end_chosen] = 1
        segment[i, end_chosen:end] = 2
        chosen_targets[i, :end_chosen] = torch.tensor(next_token_targets(chosen.labels))
        rejected_next = next_token_targets(rejected.labels)
        # The last prompt position predicts rejected's first token too; the rest sit after the chosen tokens.
        rejected_targets[i, :prompt] = torch.tensor(rejected_next[:prompt])
        rejected_targets[i, end_chosen:end] = torch.tensor(rejected_next[prompt:])
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same_side = segment[:, :, None] == segment[:, None, :]
    sees_prompt = (segment[:, None, :] == 0) & (segment[:, :, None] >= 0)
    mask = (same_side | sees_prompt) & causal
    sequences = Batch(input_ids, chosen_targets, mask[:, None], positions, num_tokens=sum(lengths),
                      num_trained=int((chosen_targets != IGNORE_INDEX).sum() + (rejected_targets != IGNORE_INDEX).sum()))
    return PairBatch(sequences, count, _weights([p.chosen for p in pairs]),
                     _optional_tensor([p.ref_chosen for p in pairs]),
                     _optional_tensor([p.ref_rejected for p in pairs]),
                     chosen_tokens=int((chosen_targets != IGNORE_INDEX).sum()),
                     margins=_optional_tensor([p.margin for p in pairs]), rejected_targets=rejected_targets)


def collate_unpaired(examples: list[UnpairedExample], pad_id: int) -> UnpairedBatch:
    """Stack the examples then their KL examples into one padded batch of 2B rows."""
    sequences = collate_padded([e.example for e in examples] + [e.kl_example for e in examples], pad_id)
    return UnpairedBatch(sequences, len(examples), torch.tensor([e.desirable for e in examples], dtype=torch.bool),
                         _weights([e.example for e in examples]),
                         _optional_tensor([e.ref_logp for e in examples]),
                         _optional_tensor([e.ref_kl_logp for e in examples]))


def _placeholder(item: PairExample | UnpairedExample) -> PairExample | UnpairedExample:
    """``item`` with nothing trained (weight 0), keeping its reference values so that every rank's batch has
    the same tensors."""
    if isinstance(item, PairExample):
        return PairExample(placeholder_example(item.chosen), placeholder_example(item.rejected), item.prompt_length,
                           item.row, item.ref_chosen, item.ref_rejected, item.margin)
    return UnpairedExample(placeholder_example(item.example), placeholder_example(item.kl_example),
                           item.prompt_length, item.desirable, item.row, item.ref_logp, item.ref_kl_logp)


def _sequences(item: PairExample | UnpairedExample) -> tuple[Example, Example]:
    return (item.chosen, item.rejected) if isinstance(item, PairExample) else (item.example, item.kl_example)


class PreferenceBatches(RankBatches):
    """Micro-batches of pairs (or KTO examples) for one rank (see ``dataset.RankBatches``). A placeholder has
    weight 0; the global counts cover the real items of the group. With ``shared_prompt`` pairs use
    :func:`collate_pairs_shared_prompt` (one row per pair).
    """

    def __init__(self, groups: list[list], pad_id: int, batch_size: int, rank: int = 0, shared_prompt: bool = False):
        super().__init__(groups, pad_id, batch_size, rank)
        self.shared_prompt = shared_prompt

    def placeholder(self, group: list):
        return _placeholder(group[0])

    def collate(self, mine: list, group: list):
        if isinstance(group[0], PairExample):
            collate = collate_pairs_shared_prompt if self.shared_prompt else collate_pairs
            batch = collate(mine, self.pad_id)
            batch.global_pairs = len(group)
            batch.global_chosen_tokens = sum(p.chosen.num_trained for p in group)
        else:
            batch = collate_unpaired(mine, self.pad_id)
            batch.global_examples = len(group)
        rows = [e for item in group for e in _sequences(item)]
        batch.sequences.global_tokens = sum(len(e.input_ids) for e in rows)
        batch.sequences.global_trained = sum(e.num_trained for e in rows)
        return batch


def make_preference_batches(examples: list, batch_size: int, pad_id: int, *, generator: torch.Generator | None = None,
                            rank: int = 0, world_size: int = 1, shared_prompt: bool = False) -> PreferenceBatches:
    """One epoch of micro-batches of ``examples`` (all :class:`PairExample` or all :class:`UnpairedExample`) for
    ``rank`` of ``world_size``. With a generator the order is shuffled (the run's generator, so the order is the
    same on every rank and reproducible from the seed)."""
    kinds = {type(e) for e in examples}
    if len(kinds) > 1 or not kinds <= {PairExample, UnpairedExample}:
        names = sorted(k.__name__ for k in kinds)
        raise TypeError(f"examples must be all PairExample or all UnpairedExample, got {names}")
    groups = global_groups(epoch_order(examples, generator), batch_size, world_size)
    return PreferenceBatches(groups, pad_id, batch_size, rank, shared_prompt)
