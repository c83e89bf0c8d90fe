"""Measurements on held-out data: response-token loss, answers to held-out prompts, and the implicit-reward
preference accuracy of a policy on held-out pairs.

Reading (:func:`read_heldout`) needs no tokenizer and no model, so a bad row is reported before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuneforge.config import DataConfig
from tuneforge.data.dataset import DataReport, make_batches, tokenize_conversations
from tuneforge.data.formats import Conversation, Message, _Checker, detect_format, to_conversation
from tuneforge.data.preference import (PreferenceRow, _add_system, _explicit_prompt, make_preference_batches,
                                       tokenize_pairs)
from tuneforge.data.readers import BadRow, read_rows
from tuneforge.engine.step import evaluate_loss, move
from tuneforge.errors import DataError, UserError
from tuneforge.generation import Generator
from tuneforge.losses import dpo_loss, sequence_logprobs_from_hidden
from tuneforge.models.adapters import decoder_and_head, is_peft
from tuneforge.progress import progress


# ------------------------------------------------------------------------------------------------------ reading
@dataclass
class HeldoutRow:
    """One prompt to answer, from a row of an evaluation file.

    Attributes:
        prompt: the messages before the row's last assistant message (or the row's ``prompt``), ending with a
            user message.
        reference: the last assistant message's text; None for a prompt-only row.
        fields: the row's fields as read (user metrics read any of them; ``answer`` and ``pattern`` are used by
            ``contains`` and ``regex_match``).
        source / number: the file and its row number, for messages.
    """

    prompt: list[Message]
    reference: str | None
    fields: dict = field(default_factory=dict)
    source: str = ""
    number: int = 0

    @property
    def question(self) -> str:
        """The last user message: what a person reads as the prompt."""
        return next(m.content for m in reversed(self.prompt) if m.role == "user")

    def short_answer(self, answer_field: str = "answer") -> str | None:
        """The row's ``answer_field`` when it has one (a short answer for ``contains``), else the reference."""
        value = self.fields.get(answer_field)
        return str(value) if value not in (None, "") else self.reference


@dataclass
class HeldoutData:
    """A validated evaluation file: conversations with a response (for the loss) and prompts to answer."""

    conversations: list[Conversation]
    rows: list[HeldoutRow]
    report: DataReport


def read_heldout(path: str, data: DataConfig) -> HeldoutData:
    """Read and validate every row of ``path``.

    A row in an SFT format (messages, prompt/completion, alpaca, sharegpt, text) gives a conversation for the
    loss and, when a user message precedes its last assistant message, a prompt whose reference is that
    message. A row with only a ``prompt`` (a string or a message list ending with a user message, as in GRPO
    prompt data) gives a prompt without a reference. Bad rows raise a :class:`DataError` naming file, row and
    field (or are counted, with ``data.on_error: skip``).
    """
    report = DataReport(path=str(path))
    conversations, rows = [], []
    for row in read_rows(path):
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row.error
            if detect_format(row.fields) is None and "prompt" in row.fields and data.format == "auto":
                check = _Checker(str(path), row.number)
                prompt = _add_system(_explicit_prompt(row.fields, check), row.fields, check, data.system_prompt)
                rows.append(HeldoutRow(prompt, None, dict(row.fields), str(path), row.number))
                continue
            conversation = to_conversation(row.fields, data.format, str(path), row.number, data.system_prompt)
        except DataError as error:
            if data.on_error == "raise":
                raise
            report.dropped[error.reason] += 1
            continue
        conversations.append(conversation)
        last = max(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
        prompt = conversation.messages[:last]
        if not conversation.is_plain_text and any(m.role == "user" for m in prompt):
            rows.append(HeldoutRow(prompt, conversation.messages[last].content, dict(row.fields), str(path),
                                   row.number))
    if not conversations and not rows:
        raise UserError(f"{path}: no usable rows ({report.rows} read"
                        + (f", dropped: {dict(report.dropped)})" if report.dropped else ")"))
    report.kept = len(conversations) + sum(r.reference is None for r in rows)
    return HeldoutData(conversations, rows, report)


# ---------------------------------------------------------------------------------------------------- the loss
def heldout_loss(generator: Generator, conversations: list[Conversation], data: DataConfig,
                 batch_size: int = 8) -> dict:
    """Mean loss over the response tokens of ``conversations`` (the masks of training) and its perplexity:
    ``engine.step.evaluate_loss``'s dict (``loss``, ``perplexity``, ``tokens``). Rows whose truncation at
    ``data.max_length`` would remove a whole response are dropped and counted (``data.on_truncation``)."""
    report = DataReport(path=conversations[0].source if conversations else "")
    examples = tokenize_conversations(conversations, generator.template, generator.tokenizer, data, report)
    batches = make_batches(examples, batch_size, generator.tokenizer.pad_token_id)
    return {**evaluate_loss(generator.model, batches, generator.device, desc="held-out loss"),
            "dropped": sum(report.dropped.values())}


# ------------------------------------------------------------------------------------------ implicit reward
def _pair_logprobs(model: torch.nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and of the rejected sides of a ``PairBatch`` (two rows per pair),
    each (pairs,) float32; only response positions reach the output head."""
    body, head = decoder_and_head(model)
    sequences = move(batch, device).sequences
    hidden = body(**sequences.model_inputs(), use_cache=False).last_hidden_state
    sums = sequence_logprobs_from_hidden(hidden, sequences.targets, head).sums.cpu()
    return sums[:batch.num_pairs], sums[batch.num_pairs:2 * batch.num_pairs]


@torch.no_grad()
def implicit_reward_margins(generator: Generator, pairs: list[PreferenceRow], data: DataConfig, beta: float,
                            reference: torch.nn.Module | None = None,
                            batch_size: int = 8) -> list[float | None]:
    """DPO's implicit reward margin of each pair, r(chosen) - r(rejected), with r(y) = beta * (log pi(y | x) -
    log ref(y | x)) and log-probs summed over the response tokens (``losses.dpo_loss``'s rewards).

    The reference is ``reference`` when given (a full fine-tuning run's starting model), else the policy with
    its LoRA adapter switched off. Pairs the template cannot render raise; pairs whose truncation at
    ``data.max_length`` would remove a response are left out (counted by ``tokenize_pairs``): the list has one
    entry per pair, in order, None for a pair left out.
    """
    model = generator.model
    if reference is None and not is_peft(model):
        raise UserError("the implicit reward needs a reference model: a LoRA run (adapter switched off) or a full "
                        "fine-tuning run (its starting model)")
    report = DataReport(path=pairs[0].source if pairs else "")
    examples = tokenize_pairs(pairs, generator.template, generator.tokenizer, data, report)
    margins: list[float] = []
    batches = make_preference_batches(examples, batch_size, generator.tokenizer.pad_token_id)
    for batch in progress(batches, "implicit reward"):
        chosen, rejected = _pair_logprobs(model, batch, generator.device)
        if reference is not None:
            ref_chosen, ref_rejected = _pair_logprobs(reference, batch, generator.device)
        else:
            with model.disable_adapter():
                ref_chosen, ref_rejected = _pair_logprobs(model, batch, generator.device)
        margins += dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta).margins.tolist()
    # The batches keep the examples' order, and the examples the pairs' order less the pairs left out.
    kept = iter(zip((example.row for example in examples), margins))
    aligned, following = [], next(kept, None)
    for pair in pairs:
        if following is not None and following[0] == pair.row:
            aligned.append(following[1])
            following = next(kept, None)
        else:
            aligned.append(None)
    return aligned
