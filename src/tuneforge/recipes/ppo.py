"""PPO with a value head: RLHF as in Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022).

The loop and the step (rollouts, then ``ppo.ppo_epochs`` x ``ppo.mini_batches`` updates) are
:class:`tuneforge.recipes.online.OnlineRLRecipe`'s. What is PPO's, for each micro-batch of prompts:

1. rollout (no gradients): one sampled response per prompt, scored by a reward model (``ppo.reward_model``)
   and/or reward functions; one forward of the policy gives the log-probs pi_old, the value head's V_t and the
   entropy at each response token; the reference's log-probs give the per-token reward
   r_t = -kl_coef (log pi_old - log ref) + [t = last real token] score (``ppo_rewards``); generalised advantage
   estimation gives A_t and the returns A_t + V_t (``gae_advantages``); the step's advantages are whitened
   together (``ppo.whiten_advantages``);
2. each update: log-probs and values with gradients; loss = clipped policy loss + ``vf_coef`` x clipped value
   loss (``ppo_policy_loss``, ``ppo_value_loss``), token means over the update group on all ranks.

After the step an adaptive KL coefficient (``ppo.adaptive_kl``) moves towards ``ppo.target_kl``, as in
Ziegler et al. 2019 (Sec. 2.2): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon), with KL the
mean per-response sum of log pi - log ref and n the step's responses; it is part of the checkpoint.

The value head is a linear layer (zero-initialised, so every V_t starts at 0) on the policy's last hidden state:
with LoRA it shares the adapted trunk, whose adapter learns from both losses. It is trained state (checkpoints,
resume) and is written beside the run as ``value_head.safetensors``; the run directory itself holds the policy
like any causal-LM run, so ``generate``, ``chat``, ``merge`` and ``export`` use it as they are. A separate critic
model is not implemented (one more model in memory; the shared-trunk head is what fits a small machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tuneforge.engine.step import autocast
from tuneforge.losses import (WHITEN_EPS, gae_advantages, masked_whiten, ppo_policy_loss, ppo_rewards,
                              ppo_value_loss)
from tuneforge.models.adapters import causal_lm
from tuneforge.recipes.online import OnlineRLRecipe, PromptBatch, Samples

VALUE_HEAD_FILE = "value_head.safetensors"
KL_ERROR_CLIP = 0.2  # Ziegler et al. 2019's clip of the controller's proportional error


@dataclass
class PPORollout:
    """One sampled response per prompt of a micro-batch and PPO's loss inputs; each (N, T) float32 is 0 where
    ``samples.mask`` is 0.

    old_logp: log pi_old of each response token (the policy that sampled them); old_values: V_t at the rollout;
    ref_logp: the reference's log-probs; rewards: per-token rewards (KL penalty + score at the last token);
    advantages: GAE (whitened over the step in ``_prepare_step``); returns: value targets; entropy: the policy's
    entropy at each response position (a statistic).
    """

    samples: Samples
    old_logp: torch.Tensor
    old_values: torch.Tensor
    ref_logp: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor
    denominator: float = 1.0  # the update group's response-token count on all ranks, set before the loss


class ValueHead(torch.nn.Module):
    """V(s_t) = w . h_t + b on the final hidden state; zero-initialised so the first values are 0 and the first
    advantages are the discounted rewards themselves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., 1) float32."""
        return self.linear(hidden.to(self.linear.weight.dtype))


class PPORecipe(OnlineRLRecipe):
    """``method: ppo``. See the module docstring."""

    def _before_wrap(self) -> None:
        super()._before_wrap()  # the full-fine-tuning reference copy is made before the head exists
        hidden_size = causal_lm(self.model).config.hidden_size
        # A submodule of the model, so the optimiser, DDP and checkpoints handle it like any trainable weight.
        self.model.value_head = ValueHead(hidden_size).to(self.device)

    @property
    def kl_coef(self) -> float:
        """The current KL coefficient: ``ppo.kl_coef``, or, with ``ppo.adaptive_kl``, where the controller has moved
        it (a resumed run goes on from the saved value)."""
        if not self.section.adaptive_kl:
            return self.section.kl_coef
        return float(self.state.method_state.get("kl_coef", self.section.kl_coef))

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> PPORollout:
        section = self.section
        samples = self.sample(batch.examples, 1)
        with autocast(self.device, self.bf16):
            policy = self.response_forward(self.model, samples, value_head=self.model.value_head, entropy=True)
        ref_logp = self.reference_forward(samples)
        rewards = ppo_rewards(samples.rewards, policy.logp, ref_logp, samples.mask, self.kl_coef)
        advantages, returns = gae_advantages(rewards, policy.values, samples.mask, section.gamma, section.lam)
        return PPORollout(samples, policy.logp, policy.values, ref_logp, rewards, advantages, returns,
                          policy.entropy)

    def _prepare_step(self, rollouts: list[PPORollout]) -> None:
        """Whiten the advantages of all the step's response tokens together, on all ranks, as PPO
        implementations whiten over the rollout batch; record KL and entropy."""
        self._step_kl_coef = self.kl_coef  # the coefficient this step's rewards were made with (logged)
        masks = [r.samples.mask.bool() for r in rollouts]
        if self.section.whiten_advantages:
            flat = torch.cat([r.advantages[m] for r, m in zip(rollouts, masks)])
            whitened = self._whiten_over_ranks(flat)
            for rollout, mask, piece in zip(rollouts, masks, whitened.split([int(m.sum()) for m in masks])):
                rollout.advantages = torch.zeros_like(rollout.advantages).masked_scatter(mask, piece)
        for rollout, mask in zip(rollouts, masks):
            kl = torch.where(mask, rollout.old_logp - rollout.ref_logp, 0.0).sum()
            self._add_stat("kl", kl, float(mask.shape[0]))  # per response: the sum over its tokens
            self._add_stat("entropy", rollout.entropy.sum(), mask.sum())

    def _whiten_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``masked_whiten`` of the step's advantages (1-D, this rank's) with the mean and unbiased variance of
        every rank's, so the split of the batch over processes does not change them. A step with fewer than two
        response tokens in all (batch 1 and an immediate stop) is only centred: its variance is undefined."""
        if not self.dist.enabled and values.numel() >= 2:
            return masked_whiten(values[None], torch.ones_like(values[None])).squeeze(0)
        moments = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)]).double()
        if self.dist.enabled:
            dist.all_reduce(moments)
        total, count = moments.tolist()
        mean = total / max(count, 1.0)
        squares = ((values.double() - mean) ** 2).sum()
        if self.dist.enabled:
            dist.all_reduce(squares)
        if count < 2:
            return (values.double() - mean).float()
        return ((values.double() - mean) * torch.rsqrt(squares / (count - 1) + WHITEN_EPS)).float()

    def _count(self, rollout: PPORollout) -> torch.Tensor:
        return rollout.samples.mask.sum().float()

    def _loss_sum(self, model: torch.nn.Module, rollout: PPORollout) -> dict:
        """Clipped policy loss + vf_coef x clipped value loss of one rollout, token sums divided by the update
        group's count (inside the wrapped forward, so DDP hooks see it), and their statistics."""
        section, mask = self.section, rollout.samples.mask
        with autocast(self.device, self.bf16):
            out = self.response_forward(model, rollout.samples, value_head=model.value_head)
        policy_loss, policy_stats = ppo_policy_loss(out.logp, rollout.old_logp, rollout.advantages, mask,
                                                    section.clip_range, denominator=rollout.denominator)
        value_loss, value_stats = ppo_value_loss(out.values, rollout.old_values, rollout.returns, mask,
                                                 section.clip_range_value, denominator=rollout.denominator)
        # The stats are token means of this rollout; the step's metrics weigh them by its tokens. The losses are
        # shares of the group's mean, so they are scaled back to this rollout's mean for the log.
        share = rollout.denominator / max(float(mask.sum()), 1.0)
        stats = {**policy_stats, **value_stats, "policy_loss": policy_loss.detach() * share,
                 "value_loss": value_loss.detach() * share}
        return {"loss": policy_loss + section.vf_coef * value_loss, "stats": stats}

    def _after_step(self, rollouts: list[PPORollout]) -> None:
        super()._after_step(rollouts)
        section = self.section
        if not section.adaptive_kl:
            return
        kl_sum, responses = self._global_stat("kl")
        error = min(max(kl_sum / max(responses, 1.0) / section.target_kl - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
        self.state.method_state["kl_coef"] = self.kl_coef * (1 + error * responses / section.kl_horizon)

    def _step_metrics(self) -> dict:
        return {**super()._step_metrics(), "kl_coef": getattr(self, "_step_kl_coef", self.kl_coef)}

    def _save_model(self, weights) -> None:
        """The policy as any causal-LM run (without the head, so it loads as a plain model), then the head."""
        head = self.model.value_head
        # Before the run marker (written last by save_run), so a marked run directory is complete.
        save_file({name: p.detach().cpu().contiguous() for name, p in head.state_dict().items()},
                  str(self.run_dir / VALUE_HEAD_FILE))
        self.model._modules.pop("value_head")
        try:
            super()._save_model(weights)
        finally:
            self.model.value_head = head
