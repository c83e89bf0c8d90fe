"""Score conversations with a trained reward model: ``tuneforge score``, evaluation, and online RL reward.

Conversations are rendered and tokenised exactly as in reward-model training (the run's own template), and the
score is read at the last real token of each, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.data.collate import collate_padded
from tuneforge.data.formats import Conversation
from tuneforge.data.templates import Template
from tuneforge.data.tokenize import Example, encode_conversation
from tuneforge.errors import UserError
from tuneforge.generation.generator import load_for_inference, tokenizer_and_template
from tuneforge.models.loading import resolve_model
from tuneforge.models.reward import reward_scores
from tuneforge.progress import progress as show_progress


@dataclass
class RewardScorer:
    """A reward model with its tokenizer and template."""

    model: torch.nn.Module
    tokenizer: object
    template: Template
    device: torch.device
    max_length: int = 1024

    @classmethod
    def load(cls, spec: str, template: str | None = None, dtype: str = "float32",
             max_length: int = 1024) -> "RewardScorer":
        """``spec``: a reward-model run directory (``method: reward``), or a folder with a sequence-classification
        model of one output."""
        source = cls.resolve(spec)
        tokenizer, chosen = tokenizer_and_template(source, template)
        model, device = load_for_inference(source, dtype, head="reward")
        return cls(model, tokenizer, chosen, device, max_length)

    @staticmethod
    def resolve(spec: str):
        """The model source of ``spec``, checked to be a reward model where that can be told without loading it
        (a run directory of another method is refused), so a wrong path fails before any model loads."""
        source = resolve_model(spec)
        if source.run is not None and not source.is_reward_model:
            raise UserError(f"{spec} is a {source.run.get('method', 'sft')} run, not a reward model; train one with "
                            "method: reward")
        return source

    def encode(self, conversation: Conversation) -> Example:
        """Token ids of a whole conversation; a longer one keeps its *last* ``max_length`` tokens, because the
        score is read at the end."""
        example = encode_conversation(conversation, self.template, self.tokenizer, max_length=10**9)
        if len(example.input_ids) > self.max_length:
            example = Example(example.input_ids[-self.max_length:], example.labels[-self.max_length:],
                              truncated=True, row=example.row)
        return example

    @torch.no_grad()
    def score(self, conversations: list[Conversation], batch_size: int = 8, progress: str | None = None
              ) -> list[float]:
        """One scalar per conversation, in order; with ``progress``, the batches done are shown under that name."""
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id
        starts = range(0, len(conversations), batch_size)
        for start in show_progress(starts, progress or "", enabled=None if progress else False):
            examples = [self.encode(c) for c in conversations[start:start + batch_size]]
            batch = collate_padded(examples, pad)
            values = reward_scores(self.model, batch.input_ids.to(self.device), batch.attention_mask.to(self.device),
                                   batch.position_ids.to(self.device))
            scores += values.cpu().tolist()
        return scores
