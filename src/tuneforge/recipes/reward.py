"""Reward-model training (stage 2 of classic RLHF): a scalar head trained on pairs with the Bradley-Terry loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tuneforge.data.preference import PairBatch
from tuneforge.engine.recipe import LossTerms, Update
from tuneforge.engine.step import autocast, decoder_hidden
from tuneforge.losses import bradley_terry_loss, gather_last
from tuneforge.models.adapters import decoder_and_score
from tuneforge.recipes._pairs import PairData, weighted_stats
from tuneforge.recipes.registry import MethodSpec, register


@dataclass
class RewardConfig:
    """``method: reward``: a scalar-head reward model trained on pairs with the Bradley-Terry loss.

    Attributes:
        center_coefficient: weight of the reward-centering term eta (r_c + r_r)^2 that keeps rewards near 0
            (0 disables; 0.01 is a common choice). A per-pair margin is read from a row's ``margin`` field.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {'center_coefficient': (0.0, None)}

    center_coefficient: float = 0.0


register(MethodSpec(
    name="reward", recipe="tuneforge.recipes.reward:RewardRecipe", section="reward", section_class=RewardConfig,
    data="pairs", summary="a Bradley-Terry reward model (a scalar head) from chosen/rejected pairs",
    model_head="reward", generates=False))


class RewardRecipe:
    """``method: reward``: a scalar head on the decoder (a ``*ForSequenceClassification`` with one output, the
    registration's ``model_head="reward"``; with LoRA, PEFT trains the adapters and the new head in full), trained
    on pairs with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected) - margin), plus optional reward
    centering.

    Both sides of each pair are separate rows (2B), each scored at its last real token. The loss is the sum over
    pairs; the trainer divides it by the pairs of the step on all ranks. Logged: the mean reward of each side,
    their margin and the fraction ranked right (``accuracy``).
    """

    def __init__(self, run):
        self.run = run
        self.section: RewardConfig = run.config.reward
        self.pairs = PairData(run)
        self.inputs = self.pairs  # what it trains on: read, tokenised and batched

    # ------------------------------------------------------------------------------------------------ model
    def prepare_model(self, model: torch.nn.Module) -> None:
        # transformers' own pooling (for anyone loading the saved model) needs to know the pad id.
        model.config.pad_token_id = self.run.tokenizer.pad_token_id

    def scores(self, model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
        """(2B,) float32 rewards of the chosen sides, then the rejected ones: the head reads each row's last real
        position (``tuneforge.models.reward``: never transformers' pad-id pooling)."""
        sequences = batch.sequences
        _, score = decoder_and_score(model)
        with autocast(self.run.device, self.run.bf16):
            hidden = decoder_hidden(model, sequences.input_ids, sequences.attention_mask, sequences.position_ids)
            # Only the last real position of each row reaches the head: (rows, hidden) -> (rows, 1).
            return score(gather_last(hidden, sequences.attention_mask)).squeeze(-1).float()

    # ------------------------------------------------------------------------------------------------- loss
    def normaliser(self, batch: PairBatch) -> float:
        return float(batch.global_pairs)

    def loss_terms(self, model: torch.nn.Module, batch: PairBatch) -> LossTerms:
        pairs, weights = batch.num_pairs, batch.weights
        scores = self.scores(model, batch)
        chosen, rejected = scores[:pairs], scores[pairs:2 * pairs]
        losses = bradley_terry_loss(chosen, rejected, batch.margins, self.section.center_coefficient)
        margin = chosen - rejected
        stats = weighted_stats({"rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": margin,
                                "accuracy": (margin > 0).float()}, weights)
        return LossTerms((losses * weights).sum(), stats)

    def train_step(self, window: Sequence[PairBatch], update: Update) -> tuple[torch.Tensor, torch.Tensor]:
        return update(window)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float] | None:
        return self.pairs.validation_loss()

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return dict(means)

    def save_model(self, save: Callable[[], None]) -> None:
        save()
