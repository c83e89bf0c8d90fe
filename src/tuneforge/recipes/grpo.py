"""Critic-free online RL: GRPO (Shao et al. 2024, "DeepSeekMath") and RLOO (Ahmadian et al. 2024).

The loop and the step (rollouts, then ``grpo.ppo_epochs`` x ``grpo.mini_batches`` updates) are
:class:`tuneforge.recipes.online.OnlineRLRecipe`'s. What is GRPO's: for each prompt ``grpo.num_generations`` (G)
responses are sampled; advantages come from the rewards of each group of G (``tuneforge.losses.group_advantages``:
mean and optionally std for GRPO, leave-one-out baseline for RLOO), one per response, at each of its tokens; the
reference log-probs give the k3 KL term of ``grpo_loss``; the summed loss of an update is divided by the
response tokens (``grpo.normalisation: token``) or responses (``sequence``) of its group on all ranks, so
accumulation does not change the update. With one update per rollout (the default), pi_old is the policy
itself (ratio 1, clipping inactive) and its log-probs are not computed separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.engine.step import autocast
from tuneforge.losses import group_advantages, grpo_loss
from tuneforge.recipes.online import OnlineRLRecipe, PromptBatch, Samples


@dataclass
class Rollout:
    """G sampled responses for each prompt of a micro-batch (:class:`Samples`, rows ``i * G .. i * G + G - 1``
    belong to prompt ``i``) and GRPO's loss inputs.

    advantages: (B*G,) one per response; ref_logp: (B*G, T) reference per-token log-probs (0 where the mask is
    0), or None when beta is 0; old_logp: (B*G, T) the rollout policy's, or None with one update per rollout.
    """

    samples: Samples
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None
    old_logp: torch.Tensor | None
    denominator: float = 1.0  # the update group's token (or response) count on all ranks, set before the loss


class GRPORecipe(OnlineRLRecipe):
    """``method: grpo | rloo``. See the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generations = self.section.num_generations

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample G responses per prompt, score them, and compute advantages and reference (and, with several
        updates per rollout, old) log-probs."""
        section = self.section
        samples = self.sample(batch.examples, self.generations)
        advantages = group_advantages(samples.rewards, self.generations, self.method,
                                      section.scale_by_std if self.method == "grpo" else None)
        ref_logp = self.reference_forward(samples) if section.beta > 0 else None
        old_logp = None
        if self.updates_per_step > 1:
            with autocast(self.device, self.bf16):
                old_logp = self.response_forward(self.model, samples).logp
        return Rollout(samples, advantages.to(self.device), ref_logp, old_logp)

    def _count(self, rollout: Rollout) -> torch.Tensor:
        if self.section.normalisation == "token":
            return rollout.samples.mask.sum().float()
        return torch.tensor(float(rollout.samples.mask.shape[0]), device=self.device)

    def _loss_sum(self, model: torch.nn.Module, rollout: Rollout) -> dict:
        """GRPO's loss of one rollout, already divided by the group's count (runs inside the wrapped forward, so
        DDP hooks see it), and its statistics (token means: clip_fraction, kl)."""
        section = self.section
        with autocast(self.device, self.bf16):
            logp = self.response_forward(model, rollout.samples).logp
        loss, stats = grpo_loss(logp, rollout.old_logp, rollout.ref_logp, rollout.advantages, rollout.samples.mask,
                                section.clip_range, section.beta, section.normalisation,
                                denominator=rollout.denominator)
        return {"loss": loss, "stats": stats}
