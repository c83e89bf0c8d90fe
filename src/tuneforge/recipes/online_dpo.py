"""Online DPO: Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (OAIF).

Offline DPO learns from pairs written before training; online DPO makes its pairs from the policy being trained.
What every online method shares (prompt data, sampling from the run's generator, the judge, the reference, the
update schedule of ``online_dpo.ppo_epochs`` x ``online_dpo.mini_batches`` updates per step, validation by
reward) is :class:`tuneforge.recipes._online.OnlineRL`; what is online DPO's, for each micro-batch of B prompts:

1. rollout (no gradients): two responses per prompt are sampled with the current policy (rows ``2i`` and
   ``2i + 1`` answer prompt ``i``) and scored by the judge, :class:`tuneforge.rewards.combined.Rewards`
   configured as GRPO's rewards are (``online_dpo.reward_functions`` with ``reward_weights``, and/or
   ``reward_model`` with ``reward_model_weight``). The response with the higher total is the better one (y_w),
   the other the worse (y_l) (:func:`rank_pairs`). A pair whose two totals are equal carries no preference: it is
   skipped (it never goes through the model again) and counted (``ties``). The reference's sequence log-probs of
   the untied pairs' responses, log ref(y | x) = sum_t log ref(y_t | x, y_<t), are computed here, once;
2. update: the policy's sequence log-probs of both responses with gradients, and ``tuneforge.losses.dpo_loss``
   per pair (``online_dpo.loss``: ``sigmoid`` is OAIF's DPO, Rafailov et al. 2023 eq. 7). The micro-batch's loss
   is the sum over its untied pairs; the trainer divides it by the untied pairs of the whole update on all ranks,
   so the split into micro-batches and processes does not change the update. An update (or a whole step) where
   every pair ties on every rank trains nothing: it is skipped (``OnlineRL.optimise``), the step logs loss 0 and
   grad_norm 0, the weights and the optimiser state stay as they were, and the learning-rate schedule advances.

The reference is the starting model (``engine.reference.Reference``): the policy with its LoRA adapter off, or a
frozen copy for full fine-tuning. Log-probs, of policy and reference alike, are those of the sampling policy
softmax(z / T) at ``online_dpo.temperature`` (``recipes._online.response_forward``, as TRL's OnlineDPOTrainer);
at T = 1, the default, they are the models' own.

Logged per step: the DPO statistics of the untied pairs (``rewards_chosen`` / ``rewards_rejected``: the implicit
rewards beta (log pi - log ref) of the better and worse response, ``reward_margin``, ``reward_accuracy``: pairs
whose implicit reward ranks the better response first, ``logps_chosen`` / ``logps_rejected``); the judge's scores
of the better and worse responses (``score_better``, ``score_worse``) and their lengths in tokens
(``length_better``, ``length_worse``), over the untied pairs; ``ties`` (tied pairs of the step on all ranks) and
``tie_fraction``; and what every online method logs: ``reward`` (the judge's mean over all responses) with
``reward_std`` and each reward's mean, ``response_length``, ``stopped_fraction``.

Validation generates greedily for the validation prompts and reports ``val_reward`` (the judge's mean score), as
GRPO does; ``eval.metric: val_reward`` picks the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tuneforge.engine.recipe import LossTerms, Update, stat
from tuneforge.errors import ConfigError
from tuneforge.losses import dpo_loss, ipo_token_means
from tuneforge.recipes._online import OnlineRL, PromptBatch, RolloutConfig, Samples
from tuneforge.recipes._pairs import pair_stats
from tuneforge.recipes.registry import MethodSpec, register

PAIR = 2  # responses sampled per prompt: the two sides of a pair


@dataclass
class OnlineDPOConfig(RolloutConfig):
    """``method: online_dpo``: two responses sampled per prompt, ranked by a judge (reward functions and/or a
    reward model, configured as for GRPO), and a DPO step on (better, worse) against the reference. Sampling, the
    judge (``reward_functions``, ``reward_weights``, ``reward_model``, ``reward_model_weight``) and the updates
    per step (``ppo_epochs``, ``mini_batches``): see :class:`RolloutConfig`; ``clip_range`` does not apply (the
    DPO loss has no probability ratio).

    Attributes:
        beta: KL strength of DPO: how far the policy may move from the reference (tau for IPO); default 0.1.
        loss: ``sigmoid`` (DPO, as in OAIF), ``ipo`` (on per-token mean log-probs) or ``hinge`` (SLiC / RSO);
            equations in ``tuneforge.losses.dpo_loss``; default ``sigmoid``.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {"beta": (1e-6, None)}

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"

    @property
    def samples_per_prompt(self) -> int:
        """The two sides of a pair."""
        return PAIR

    def check(self, config) -> None:
        """The judge and the update schedule (:meth:`RolloutConfig.check`); ``clip_range`` left alone."""
        super().check(config)
        if self.clip_range != RolloutConfig.clip_range:
            raise ConfigError(f"online_dpo.clip_range: method {config.method} has no probability ratio to clip (the "
                              "DPO loss compares log-ratios to the reference); remove the option")


register(MethodSpec(
    name="online_dpo", recipe="tuneforge.recipes.online_dpo:OnlineDPORecipe", section="online_dpo",
    section_class=OnlineDPOConfig, data="prompts",
    summary="Online DPO: two samples per prompt ranked by a judge (reward functions or a reward model), DPO on them",
    reference=True, online=True, fsdp=False, loss_validation=False))


def rank_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order each prompt's two responses by the judge.

    Args:
        rewards: (2B,) the judge's totals; rows ``2i`` and ``2i + 1`` answer prompt ``i``.
    Returns:
        (better, worse, untied): (B,) int64 rows of the higher- and the lower-scored response of each pair, and
        (B,) bool, False where the two scores are equal (such a pair lists row ``2i`` as the better one; its
        order means nothing and it is not trained on).
    """
    pairs = rewards.reshape(-1, PAIR)
    second_better = (pairs[:, 1] > pairs[:, 0]).long()
    first = torch.arange(0, rewards.shape[0], PAIR, device=rewards.device)
    return first + second_better, first + 1 - second_better, pairs[:, 0] != pairs[:, 1]


def select_rows(samples: Samples, rows: torch.Tensor) -> Samples:
    """``rows`` of ``samples`` (in that order) as :class:`Samples` of their own, without the padding columns none of
    them needs: left prompt padding and response columns past the longest selected response. The position ids
    stay valid: the columns cut are padding (attention 0) in every selected row.

    Args:
        samples: N rows; rows: (K,) int64 indices into them.
    """
    attention = samples.attention_mask[rows]
    width = samples.prompt_width
    start = int((attention[:, :width].sum(dim=0) > 0).long().argmax())  # the first prompt column any row uses
    longest = max(1, int(samples.mask[rows].sum(dim=1).max()))
    end = width + longest
    picked = rows.tolist()
    return Samples(samples.input_ids[rows][:, start:end], attention[:, start:end],
                   samples.position_ids[rows][:, start:end], width - start, samples.mask[rows][:, :longest],
                   samples.rewards[rows], samples.scores[rows], samples.stopped[rows],
                   [samples.responses[i] for i in picked], [samples.prompts[i] for i in picked])


@dataclass
class PairRollout:
    """Two sampled responses for each prompt of a micro-batch and the DPO loss inputs of its untied pairs.

    samples: :class:`Samples` of all 2B responses (rows ``2i``, ``2i + 1`` answer prompt ``i``): the step's
        rollout statistics, the bench and the logged sample read them.
    rows: (2K,) int64 rows of ``samples`` that are trained: the better then the worse response of each of the K
        untied pairs (:func:`rank_pairs`); a micro-batch whose pairs all tie keeps its first pair, at weight 0, so
        that every micro-batch of an update runs forward and backward (DDP's gradient hooks expect it).
    pairs: :func:`select_rows` of those rows: row ``2j`` is pair j's better response, ``2j + 1`` its worse one.
    weights: (K,) float32, 1 for a ranked pair, 0 for the placeholder of an all-tied micro-batch.
    ref_better, ref_worse: (K,) float32 the reference's sequence log-probs of the better and worse responses.
    ties: tied pairs of the micro-batch (of B), on this rank.
    count: the micro-batch's untied pairs summed over ranks (set by ``OnlineRL.collect_rollouts``).
    """

    samples: Samples
    rows: torch.Tensor
    pairs: Samples
    weights: torch.Tensor
    ref_better: torch.Tensor
    ref_worse: torch.Tensor
    ties: float
    count: float = 1.0


class OnlineDPORecipe:
    """``method: online_dpo``. See the module docstring; the shared online part is ``self.online``."""

    def __init__(self, run):
        self.run = run
        self.online = OnlineRL(run)
        self.inputs = self.online  # what it trains on: read, tokenised and batched
        self.section: OnlineDPOConfig = self.online.section

    # ------------------------------------------------------------------------ what online methods share
    def prepare_model(self, model: torch.nn.Module) -> None:
        self.online.prepare_model(model)

    def evaluate(self) -> dict | None:
        return self.online.evaluate()

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return self.online.step_metrics(means)

    def save_model(self, save: Callable[[], None]) -> None:
        save()

    @property
    def engine(self):
        return self.online.engine

    @property
    def last_rollouts(self) -> list[PairRollout]:
        return self.online.last_rollouts

    # ---------------------------------------------------------------------------------- online DPO's own
    def train_step(self, window: Sequence[PromptBatch], update: Update) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs for every micro-batch of the step, then ``ppo_epochs`` x ``mini_batches`` updates on them."""
        return self.online.optimise(self.collect_rollouts(window), update)

    def collect_rollouts(self, window: Sequence[PromptBatch]) -> list[PairRollout]:
        rollouts = self.online.collect_rollouts(window, self.rollout, self.count)
        self.record(rollouts)
        return rollouts

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> PairRollout:
        """Sample two responses per prompt, rank them by the judge, keep the untied pairs (better, worse) and take
        the reference's log-probs of those."""
        samples = self.online.sample(batch.examples, PAIR)
        better, worse, untied = rank_pairs(samples.rewards)
        kept = untied.nonzero().flatten()
        if kept.numel() == 0:
            kept = kept.new_zeros(1)  # the placeholder pair (weight 0): see PairRollout
        rows = torch.stack([better[kept], worse[kept]], dim=1).flatten()
        pairs = select_rows(samples, rows)
        reference = self.online.reference_forward(pairs).sum(dim=1)  # (2K,): 0 beyond each response
        return PairRollout(samples, rows, pairs, untied[kept].float(), reference[0::2], reference[1::2],
                           float((~untied).sum()))

    def count(self, rollout: PairRollout) -> torch.Tensor:
        """What the rollout's loss sum is divided by on this rank: its untied pairs."""
        return rollout.weights.sum()

    def normaliser(self, rollout: PairRollout) -> float:
        return rollout.count

    def loss_terms(self, model: torch.nn.Module, rollout: PairRollout) -> LossTerms:
        """The DPO loss summed over the rollout's untied pairs, and the pair statistics over them."""
        section, pairs = self.section, rollout.pairs
        logps = self.online.response_forward(model, pairs).logp.sum(dim=1)  # (2K,) sequence log-probs
        better, worse = logps[0::2], logps[1::2]
        sides = better, worse, rollout.ref_better, rollout.ref_worse
        if section.loss == "ipo":
            lengths = pairs.mask.sum(dim=1)
            sides = ipo_token_means(*sides, lengths[0::2], lengths[1::2])
        result = dpo_loss(*sides, section.beta, section.loss)
        weights = rollout.weights
        return LossTerms((result.losses * weights).sum(), pair_stats(result, better, worse, weights))

    def record(self, rollouts: Sequence[PairRollout]) -> None:
        """The judge's side of the step: scores and lengths of the better and worse responses of the untied
        pairs, the tie fraction, and ``ties``, the step's tied pairs on all ranks (weight 1 on rank 0 only, so the
        logged sum / weight is the count)."""
        add = self.run.stats.add
        ties = 0.0
        for rollout in rollouts:
            pairs, weights = rollout.pairs, rollout.weights
            ties += rollout.ties
            add("tie_fraction", stat(rollout.ties, rollout.samples.rewards.shape[0] // PAIR, self.run.device))
            lengths = pairs.mask.sum(dim=1).float()
            sides = {"score_better": pairs.rewards[0::2], "score_worse": pairs.rewards[1::2],
                     "length_better": lengths[0::2], "length_worse": lengths[1::2]}
            for name, values in sides.items():
                add(name, stat((values * weights).sum(), weights.sum()))
        add("ties", stat(ties, 1.0 if self.run.dist.is_main else 0.0, self.run.device))
