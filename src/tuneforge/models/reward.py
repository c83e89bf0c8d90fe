"""Reward models: a causal LM's decoder with a scalar head, scored at the last real token of each sequence.

The model is transformers' ``*ForSequenceClassification`` with one label, so a saved reward model loads anywhere
(TRL, vLLM, plain transformers). Its own pooling is not used: transformers picks the last token that is not the
pad id, which is wrong when pad == eos (the usual case) and the text contains an EOS. The score here is read at
the last position the attention mask marks as real, whatever the ids.
"""

from __future__ import annotations

import torch

from tuneforge.losses import gather_last
from tuneforge.models.adapters import decoder_and_score


def reward_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar reward of each sequence.

    Args:
        model: a reward model (possibly PEFT-wrapped ``*ForSequenceClassification`` with ``num_labels=1``).
        input_ids: (batch, seq) right- or left-padded token ids.
        attention_mask: (batch, seq) 1 at real tokens.
        position_ids: (batch, seq) or None (transformers derives them from the mask only for some models, so
            pass them for left padding).
    Returns:
        (batch,) float32 scores, differentiable.
    """
    body, score = decoder_and_score(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    # Only the last real position of each row reaches the head: (batch, hidden) -> (batch, 1).
    last = gather_last(hidden, attention_mask)
    return score(last).squeeze(-1).float()
