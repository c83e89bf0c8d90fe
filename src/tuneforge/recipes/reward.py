"""Reward-model training (stage 2 of classic RLHF): a scalar head on the decoder, trained on preference pairs with
the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected) - margin), plus optional reward centering.

Data and loop are the preference recipe's; the model is a ``*ForSequenceClassification`` with one output (saved
in the format transformers and TRL load), scored at the last real token of each sequence
(``tuneforge.models.reward``). With LoRA, PEFT trains the adapters and the new head in full.
"""

from __future__ import annotations

import torch

from tuneforge.engine.step import autocast
from tuneforge.losses import bradley_terry_loss
from tuneforge.models.reward import reward_scores
from tuneforge.recipes.preference import PreferenceRecipe

REWARD_STATS = ("rewards_chosen", "rewards_rejected", "reward_margin", "accuracy")


class RewardRecipe(PreferenceRecipe):
    """``method: reward``."""

    @property
    def uses_reference(self) -> bool:
        return False

    model_head = "reward"
    lora_task_type = "SEQ_CLS"

    def _build_model(self, source) -> torch.nn.Module:
        model = super()._build_model(source)
        # transformers' own pooling (for anyone loading the saved model) needs to know the pad id.
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def _loss_sum(self, model: torch.nn.Module, batch) -> dict:
        pairs = batch.num_pairs
        sequences = batch.sequences
        with autocast(self.device, self.bf16):
            scores = reward_scores(model, sequences.input_ids, sequences.attention_mask, sequences.position_ids)
        chosen, rejected = scores[:pairs], scores[pairs:2 * pairs]
        losses = bradley_terry_loss(chosen, rejected, batch.margins,
                                    self.config.reward.center_coefficient)
        margin = (chosen - rejected).detach()
        stats = torch.stack([chosen.detach(), rejected.detach(), margin, (margin > 0).float()])
        weights = batch.weights
        return {"pair_loss": (losses * weights).sum(), "stats": (stats * weights).sum(dim=1)}

    def _named_stats(self, stats: torch.Tensor, count: int, prefix: str = "") -> dict:
        values = (stats / max(count, 1)).tolist()
        return {prefix + name: value for name, value in zip(REWARD_STATS, values)}

