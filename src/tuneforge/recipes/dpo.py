"""Direct Preference Optimization and its loss variants (IPO, cDPO, rDPO, hinge) from pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tuneforge.data.preference import PairBatch
from tuneforge.engine.recipe import LossTerms, Update
from tuneforge.engine.reference import Reference
from tuneforge.errors import ConfigError
from tuneforge.losses import SequenceLogprobs, dpo_loss, ipo_token_means
from tuneforge.recipes._pairs import PairData, pair_logprobs, pair_stats, prepare_reference
from tuneforge.recipes.registry import MethodSpec, register


@dataclass
class DPOConfig:
    """``method: dpo``: Direct Preference Optimization and the variants that only change its per-pair loss.

    Attributes:
        beta: KL strength: how far the policy may move from the reference (tau for IPO).
        loss: ``sigmoid`` (DPO), ``ipo`` (on per-token mean log-probs, as TRL), ``cdpo`` (conservative DPO,
            label smoothing), ``robust`` (rDPO) or ``hinge`` (SLiC / RSO); equations in ``tuneforge.losses.dpo_loss``.
        label_smoothing: assumed rate of flipped preference labels, in [0, 0.5); ``cdpo`` and ``robust`` only.
        precompute_ref: compute the reference log-probs once in a pass over the data before training and cache them
            in the run directory; training then needs no reference forward pass (and, for full fine-tuning, no
            second copy of the model).
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {'beta': (1e-06, None), 'label_smoothing': (0.0, 0.49)}

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False

    def check(self, config) -> None:
        if self.label_smoothing and self.loss not in ("cdpo", "robust"):
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} has no effect with dpo.loss={self.loss}; "
                              "use dpo.loss=cdpo or robust, or set it to 0")


register(MethodSpec(
    name="dpo", recipe="tuneforge.recipes.dpo:DPORecipe", section="dpo", section_class=DPOConfig, data="pairs",
    summary="Direct Preference Optimization (dpo.loss: sigmoid, ipo, cdpo, robust, hinge) from chosen/rejected pairs",
    reference=True, shared_prompt=True))


class DPORecipe:
    """``method: dpo``: pairs through the policy and the reference, one loss per pair (``dpo.loss``).

    Each micro-batch's loss is the sum of its pairs' losses; the trainer divides it by the pairs of the whole step
    on all ranks. Logged: the implicit rewards beta (log pi - log ref) of both sides, their margin, the fraction
    ranked right and the log-probs (``recipes._pairs.PAIR_STATS``). The reference is the starting model: the
    policy with its adapter off (LoRA), a frozen copy (full fine-tuning), or log-probs computed once before
    training (``dpo.precompute_ref``).
    """

    def __init__(self, run):
        self.run = run
        self.section: DPOConfig = run.config.dpo
        self.pairs = PairData(run)
        self.inputs = self.pairs  # what it trains on: read, tokenised and batched
        self.reference: Reference | None = None  # set by prepare_model

    # ------------------------------------------------------------------------------------------------ model
    def prepare_model(self, model: torch.nn.Module) -> None:
        def store(pair, chosen: float, rejected: float) -> None:
            pair.ref_chosen, pair.ref_rejected = chosen, rejected

        self.reference = prepare_reference(self.run, model, self.pairs, self.section.precompute_ref,
                                           self.logprobs, store)

    def logprobs(self, model: torch.nn.Module, batch: PairBatch) -> SequenceLogprobs:
        """(2B,) response log-probs of ``batch`` under ``model``: chosen sides, then rejected ones."""
        return pair_logprobs(self.run, model, batch)

    def reference_logprobs(self, model: torch.nn.Module, batch: PairBatch) -> SequenceLogprobs:
        """(2B,) the same under the reference of the policy ``model`` (no gradient)."""
        with self.reference.model(model) as reference:
            return self.logprobs(reference, batch)

    # ------------------------------------------------------------------------------------------------- loss
    def normaliser(self, batch: PairBatch) -> float:
        return float(batch.global_pairs)

    def loss_terms(self, model: torch.nn.Module, batch: PairBatch) -> LossTerms:
        pairs = batch.num_pairs
        policy = self.logprobs(model, batch)
        chosen, rejected = policy.sums[:pairs], policy.sums[pairs:2 * pairs]
        if batch.ref_chosen is not None:
            ref_chosen, ref_rejected = batch.ref_chosen, batch.ref_rejected
        else:
            ref = self.reference_logprobs(model, batch).sums
            ref_chosen, ref_rejected = ref[:pairs], ref[pairs:2 * pairs]
        sides = chosen, rejected, ref_chosen, ref_rejected
        section = self.section
        if section.loss == "ipo":
            sides = ipo_token_means(*sides, policy.counts[:pairs], policy.counts[pairs:2 * pairs])
        result = dpo_loss(*sides, section.beta, section.loss, section.label_smoothing)
        return LossTerms((result.losses * batch.weights).sum(), pair_stats(result, chosen, rejected, batch.weights))

    def train_step(self, window: Sequence[PairBatch], update: Update) -> tuple[torch.Tensor, torch.Tensor]:
        return update(window)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float] | None:
        return self.pairs.validation_loss()

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return dict(means)

    def save_model(self, save: Callable[[], None]) -> None:
        save()
