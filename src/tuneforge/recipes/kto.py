"""KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable completions against a reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tuneforge.data.collate import Batch
from tuneforge.data.preference import UnpairedBatch
from tuneforge.engine.recipe import LossTerms, Update
from tuneforge.engine.reference import Reference
from tuneforge.losses import SequenceLogprobs, kto_loss, kto_reference_point
from tuneforge.recipes._pairs import PairData, prepare_reference, response_logprobs, weighted_stats
from tuneforge.recipes.registry import MethodSpec, register


@dataclass
class KTOConfig:
    """``method: kto``: unpaired desirable / undesirable completions (Ethayarajh et al. 2024).

    Attributes:
        beta: KL strength.
        desirable_weight, undesirable_weight: lambda_D and lambda_U; keep lambda_D n_D / (lambda_U n_U) in
            [1, 4/3] when the classes are unbalanced.
        precompute_ref: as ``dpo.precompute_ref``.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {'beta': (1e-06, None), 'desirable_weight': (0.0, None), 'undesirable_weight': (0.0, None)}

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref: bool = False


register(MethodSpec(
    name="kto", recipe="tuneforge.recipes.kto:KTORecipe", section="kto", section_class=KTOConfig, data="unpaired",
    summary="KTO: unpaired completions labelled desirable or undesirable, against a reference",
    reference=True))


def rows(sequences: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of a padded ``Batch`` (its counts are not needed downstream)."""
    return dataclasses.replace(sequences, input_ids=sequences.input_ids[start:stop],
                               targets=sequences.targets[start:stop],
                               attention_mask=sequences.attention_mask[start:stop],
                               position_ids=sequences.position_ids[start:stop])


class KTORecipe:
    """``method: kto``: unpaired completions labelled desirable or undesirable, against the reference.

    A micro-batch holds B examples and their B mismatched KL examples (another row's completion after this row's
    prompt), from which the reference point z0 is estimated over the whole batch on all ranks
    (``losses.kto_reference_point``). The loss is the sum of the examples' losses; the trainer divides it by the
    examples of the step on all ranks. Logged: the fraction of desirable examples, the policy's log-probs, z0
    (``kl``) and the mean implicit reward of each class. The reference is the DPO recipe's
    (``kto.precompute_ref`` as ``dpo.precompute_ref``).
    """

    def __init__(self, run):
        self.run = run
        self.section: KTOConfig = run.config.kto
        self.examples = PairData(run, unpaired=True)
        self.inputs = self.examples  # what it trains on: read, tokenised and batched
        self.reference: Reference | None = None  # set by prepare_model

    # ------------------------------------------------------------------------------------------------ model
    def prepare_model(self, model: torch.nn.Module) -> None:
        def store(example, logp: float, kl_logp: float) -> None:
            example.ref_logp, example.ref_kl_logp = logp, kl_logp

        # One forward per batch of the pass: its 2B rows, the examples then their KL examples.
        self.reference = prepare_reference(self.run, model, self.examples, self.section.precompute_ref,
                                           lambda module, batch: self.logprobs(module, batch.sequences), store)

    def logprobs(self, model: torch.nn.Module, sequences: Batch) -> SequenceLogprobs:
        """Response log-probs of each row of ``sequences`` under ``model``."""
        return response_logprobs(self.run, model, sequences)

    # ------------------------------------------------------------------------------------------------- loss
    def normaliser(self, batch: UnpairedBatch) -> float:
        return float(batch.global_examples)

    def loss_terms(self, model: torch.nn.Module, batch: UnpairedBatch) -> LossTerms:
        section, count, weights = self.section, batch.num_examples, batch.weights
        examples, mismatched = rows(batch.sequences, 0, count), rows(batch.sequences, count, 2 * count)
        policy = self.logprobs(model, examples).sums
        with torch.no_grad():
            # z0 is detached, so the policy's log-probs of the mismatched pairs need no graph.
            policy_kl = self.logprobs(model, mismatched).sums
            if batch.ref_logps is not None:
                ref, ref_kl = batch.ref_logps, batch.ref_kl_logps
            else:
                with self.reference.model(model) as reference:
                    ref = self.logprobs(reference, examples).sums
                    ref_kl = self.logprobs(reference, mismatched).sums
        z0 = kto_reference_point(policy_kl, ref_kl, weights, all_ranks=self.run.dist.enabled)
        result = kto_loss(policy, ref, batch.desirable, z0, section.beta, section.desirable_weight,
                          section.undesirable_weight)
        desirable = batch.desirable.float()
        stats = weighted_stats({"desirable_fraction": desirable, "logps": policy, "kl": z0.expand_as(policy)},
                               weights)
        # The mean implicit reward within each class: weighted by the class's examples only (a class absent from
        # the step has weight 0 and is not logged).
        stats.update(weighted_stats({"rewards_desirable": result.rewards}, desirable * weights))
        stats.update(weighted_stats({"rewards_undesirable": result.rewards}, (1 - desirable) * weights))
        return LossTerms((result.losses * weights).sum(), stats)

    def train_step(self, window: Sequence[UnpairedBatch], update: Update) -> tuple[torch.Tensor, torch.Tensor]:
        return update(window)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float] | None:
        return self.examples.validation_loss()

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return dict(means)

    def save_model(self, save: Callable[[], None]) -> None:
        save()
