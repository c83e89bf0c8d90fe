"""From tokenised examples to batches of tensors: padded batches, or packs of several rows per sequence.

Every batch carries ``targets``: the label of the *next* token at each position, computed per sample, with
``IGNORE_INDEX`` at each sample's last position. The loss reads ``targets`` directly, so no sample in a pack is
ever trained to predict the first token of the sample after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.data.tokenize import Example
from tuneforge.losses import IGNORE_INDEX


def next_token_targets(labels: list[int]) -> list[int]:
    """labels aligned with input ids -> targets aligned with the positions that predict them."""
    return labels[1:] + [IGNORE_INDEX]


@dataclass
class Batch:
    """Tensors for one micro-batch.

    Attributes:
        input_ids: (batch, seq) token ids; padding uses the tokenizer's pad id (may equal EOS: harmless, since
            masks never look at ids).
        targets: (batch, seq) next-token label per position or ``IGNORE_INDEX``.
        attention_mask: (batch, seq) 1 for real tokens, or for packs (batch, 1, seq, seq) boolean block-diagonal
            causal mask (True = may attend).
        position_ids: (batch, seq) positions restarting at 0 for each sample.
        num_tokens: real (non-padding) tokens in the batch.
        num_trained: positions with a target.
        global_tokens / global_trained: the same counts over this micro-batch on *all* ranks (equal to the local
            counts in one process); the loss of a step is normalised by the global trained count.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    num_tokens: int
    num_trained: int
    global_tokens: int | None = None
    global_trained: int | None = None

    def __post_init__(self):
        if self.global_tokens is None:
            self.global_tokens = self.num_tokens
        if self.global_trained is None:
            self.global_trained = self.num_trained

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def placeholder_example(example: Example) -> Example:
    """A copy of ``example`` with nothing trained: what a rank runs when the last global batch of an epoch has
    no rows left for it, so that every rank still joins the collective calls of the step. Its loss is exactly 0
    and it adds nothing to the token counts, which are global."""
    return Example(list(example.input_ids), [IGNORE_INDEX] * len(example.labels), row=example.row)


def collate_padded(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` to the longest one."""
    width = max(len(e.input_ids) for e in examples)
    count = len(examples)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    targets = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((count, width), dtype=torch.long)
    positions = torch.zeros((count, width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        targets[i, :n] = torch.tensor(next_token_targets(example.labels))
        attention[i, :n] = 1
        positions[i, :n] = torch.arange(n)
    return Batch(input_ids, targets, attention, positions,
                 num_tokens=sum(len(e.input_ids) for e in examples),
                 num_trained=int((targets != IGNORE_INDEX).sum()))


def pack_examples(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Group examples, in order, into packs of at most ``max_length`` tokens (greedy, next-fit)."""
    packs: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for example in examples:
        n = len(example.input_ids)
        if current and used + n > max_length:
            packs.append(current)
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        packs.append(current)
    return packs


def collate_packed(packs: list[list[Example]], pad_id: int) -> Batch:
    """Concatenate each pack into one sequence, with a block-diagonal causal mask.

    Position ids alone do not isolate packed samples under SDPA (the kernel still sees one causal block), so the
    mask is explicit: token i may attend to token j only if both belong to the same sample and j <= i. Padding
    positions attend to themselves only, which keeps the softmax finite.
    """
    width = max(sum(len(e.input_ids) for e in pack) for pack in packs)
    count = len(packs)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    targets = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((count, width), dtype=torch.long)
    # Sample index per position; padding gets a unique negative id per position.
    sample = -torch.arange(1, width + 1).repeat(count, 1)
    for i, pack in enumerate(packs):
        start = 0
        for j, example in enumerate(pack):
            n = len(example.input_ids)
            input_ids[i, start:start + n] = torch.tensor(example.input_ids)
            targets[i, start:start + n] = torch.tensor(next_token_targets(example.labels))
            positions[i, start:start + n] = torch.arange(n)
            sample[i, start:start + n] = j
            start += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (sample[:, :, None] == sample[:, None, :]) & causal
    return Batch(input_ids, targets, mask[:, None], positions,
                 num_tokens=sum(len(e.input_ids) for pack in packs for e in pack),
                 num_trained=int((targets != IGNORE_INDEX).sum()))
