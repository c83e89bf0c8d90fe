"""SimPO (Meng et al. 2024): reference-free, length-normalised preference optimisation from pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tuneforge.data.preference import PairBatch
from tuneforge.engine.recipe import LossTerms, Update
from tuneforge.losses import simpo_loss
from tuneforge.recipes._pairs import PairData, pair_logprobs, pair_stats
from tuneforge.recipes.registry import MethodSpec, register


@dataclass
class SimPOConfig:
    """``method: simpo``: reference-free, length-normalised preference optimisation (Meng et al. 2024).

    Attributes:
        beta: reward scale on the per-token mean log-prob (the paper uses 2 to 2.5).
        gamma: target reward margin between chosen and rejected, in reward units.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {'beta': (1e-06, None)}

    beta: float = 2.0
    gamma: float = 1.0


register(MethodSpec(
    name="simpo", recipe="tuneforge.recipes.simpo:SimPORecipe", section="simpo", section_class=SimPOConfig,
    data="pairs", summary="SimPO: reference-free, length-normalised preference optimisation from pairs",
    shared_prompt=True))


class SimPORecipe:
    """``method: simpo``: pairs through the policy only; the reward is beta times the per-token mean log-prob,
    and the loss asks the chosen reward to beat the rejected one by ``simpo.gamma``.

    Each micro-batch's loss is the sum of its pairs' losses (the trainer divides by the step's pairs on all
    ranks); logged: ``recipes._pairs.PAIR_STATS``.
    """

    def __init__(self, run):
        self.run = run
        self.section: SimPOConfig = run.config.simpo
        self.pairs = PairData(run)
        self.inputs = self.pairs  # what it trains on: read, tokenised and batched

    # ------------------------------------------------------------------------------------------------ model
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Nothing to add: SimPO has no reference."""

    # ------------------------------------------------------------------------------------------------- loss
    def normaliser(self, batch: PairBatch) -> float:
        return float(batch.global_pairs)

    def loss_terms(self, model: torch.nn.Module, batch: PairBatch) -> LossTerms:
        pairs = batch.num_pairs
        policy = pair_logprobs(self.run, model, batch)
        means = policy.means
        result = simpo_loss(means[:pairs], means[pairs:2 * pairs], self.section.beta, self.section.gamma)
        stats = pair_stats(result, policy.sums[:pairs], policy.sums[pairs:2 * pairs], batch.weights)
        return LossTerms((result.losses * batch.weights).sum(), stats)

    def train_step(self, window: Sequence[PairBatch], update: Update) -> tuple[torch.Tensor, torch.Tensor]:
        return update(window)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float] | None:
        return self.pairs.validation_loss()

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return dict(means)

    def save_model(self, save: Callable[[], None]) -> None:
        save()
