"""ORPO (Hong et al. 2024): SFT on the chosen response plus an odds-ratio term, from pairs; no reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tuneforge.data.preference import PairBatch
from tuneforge.engine.recipe import LossTerms, Update
from tuneforge.losses import orpo_loss, orpo_sft_loss_sum
from tuneforge.recipes._pairs import PairData, pair_logprobs, pair_stats
from tuneforge.recipes.registry import MethodSpec, register


@dataclass
class ORPOConfig:
    """``method: orpo``: SFT loss on the chosen response plus an odds-ratio term (Hong et al. 2024); no reference.

    Attributes:
        lam: weight of the odds-ratio term (the paper's lambda, TRL's ``beta``).
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {'lam': (0.0, None)}

    lam: float = 0.1


register(MethodSpec(
    name="orpo", recipe="tuneforge.recipes.orpo:ORPORecipe", section="orpo", section_class=ORPOConfig, data="pairs",
    summary="ORPO: SFT loss plus an odds-ratio preference term from pairs, no reference model",
    shared_prompt=True))


class ORPORecipe:
    """``method: orpo``: the SFT loss on the chosen response plus lambda times the odds-ratio term, from pairs
    through the policy only.

    Two separately normalised terms (Hong et al. 2024, eq. 6): the odds-ratio term summed over pairs, divided by
    the pairs of the step, and the chosen responses' NLL summed over their tokens, divided by the chosen tokens
    of the step (all ranks), so the SFT term is the mean token NLL as in SFT. Logged: ``recipes._pairs.PAIR_STATS``
    with ORPO's implicit reward lambda * mean log-prob.
    """

    def __init__(self, run):
        self.run = run
        self.section: ORPOConfig = run.config.orpo
        self.pairs = PairData(run)
        self.inputs = self.pairs  # what it trains on: read, tokenised and batched

    # ------------------------------------------------------------------------------------------------ model
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Nothing to add: ORPO has no reference."""

    # ------------------------------------------------------------------------------------------------- loss
    def normaliser(self, batch: PairBatch) -> tuple[float, float]:
        """(pairs, chosen trained tokens) over all ranks: the odds-ratio term's and the NLL's."""
        return float(batch.global_pairs), float(batch.global_chosen_tokens)

    def loss_terms(self, model: torch.nn.Module, batch: PairBatch) -> LossTerms:
        pairs, weights = batch.num_pairs, batch.weights
        policy = pair_logprobs(self.run, model, batch)
        chosen, rejected = policy.sums[:pairs], policy.sums[pairs:2 * pairs]
        result = orpo_loss(policy.means[:pairs], policy.means[pairs:2 * pairs], self.section.lam)
        loss_sum = torch.stack([(result.losses * weights).sum(), orpo_sft_loss_sum(chosen, weights)])
        return LossTerms(loss_sum, pair_stats(result, chosen, rejected, weights))

    def train_step(self, window: Sequence[PairBatch], update: Update) -> tuple[torch.Tensor, torch.Tensor]:
        return update(window)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float] | None:
        return self.pairs.validation_loss()

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return dict(means)

    def save_model(self, save: Callable[[], None]) -> None:
        save()
