"""From a conversation to token ids and labels.

Each template segment is tokenised on its own (no special tokens added), and its tokens take the segment's
flag: trained tokens keep their id as label, the rest get ``IGNORE_INDEX``. Labels are aligned with
``input_ids`` (label[t] is the id of token t); the shift that makes position t predict token t+1 is done per
sample by the collator, so packed samples never predict each other's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.formats import Conversation
from tuneforge.data.templates import Template
from tuneforge.losses import IGNORE_INDEX


@dataclass
class Example:
    """One tokenised row.

    Attributes:
        input_ids: token ids, length <= max_length.
        labels: same length; the token id where trained, ``IGNORE_INDEX`` elsewhere.
        truncated: the row was cut at max_length.
        responses_lost: assistant responses of which no trained token survived truncation.
        row: the source row number (for messages and previews).
        source: the file or source the row came from (a mixture's previews name it).
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    responses_lost: int = 0
    row: int = 0
    source: str = ""

    @property
    def num_trained(self) -> int:
        # Position 0 can never be predicted, so its label does not count.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(conversation: Conversation, template: Template, tokenizer) -> tuple[list[int], str]:
    """(token ids, text) of ``conversation`` as a prompt, with the assistant header appended: each segment
    tokenised on its own, exactly as in training, so generation continues from the same ids training saw."""
    ids: list[int] = []
    segments = template.segments(conversation, add_generation_prompt=True)
    for segment in segments:
        ids += encode_text(tokenizer, segment.text)
    return ids, "".join(segment.text for segment in segments)


def encode_conversation(conversation: Conversation, template: Template, tokenizer, max_length: int,
                        train_on_prompt: bool = False) -> Example:
    """Tokenise ``conversation`` with ``template`` and build its labels.

    Plain-text rows are tokenised with the tokenizer's own special tokens (BOS where it adds one) plus EOS, and
    every token is trained.
    """
    ids: list[int] = []
    labels: list[int] = []
    response_of_token: list[int] = []
    if conversation.is_plain_text:
        text_ids = tokenizer(conversation.messages[0].content)["input_ids"]
        # Some tokenizers already append EOS (add_eos_token); one EOS is what the model should learn.
        if tokenizer.eos_token_id is not None and text_ids[-1:] != [tokenizer.eos_token_id]:
            text_ids = text_ids + [tokenizer.eos_token_id]
        ids, labels = list(text_ids), list(text_ids)
        response_of_token = [0] * len(ids)
    else:
        for segment in template.segments(conversation):
            piece = encode_text(tokenizer, segment.text)
            ids += piece
            trained = segment.trained or train_on_prompt
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
            response_of_token += [segment.response if segment.trained else -1] * len(piece)
    responses = {r for r in response_of_token if r >= 0}
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        kept = {r for r in response_of_token[1:max_length] if r >= 0}
        lost = len(responses - kept)
    else:
        lost = 0
    return Example(ids, labels, truncated=truncated, responses_lost=lost, row=conversation.row,
                   source=conversation.source)
