"""PPO with a value head: RLHF as in Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022).

What every online method shares (prompt data, sampling, rewards, the update schedule of ``ppo.ppo_epochs`` x
``ppo.mini_batches`` updates per rollout batch, validation by reward) is :class:`tuneforge.recipes._online.OnlineRL`.
What is PPO's, for each micro-batch of prompts:

1. rollout (no gradients): one sampled response per prompt, scored by a reward model (``ppo.reward_model``)
   and/or reward functions; one forward of the policy gives the log-probs pi_old, the value head's V_t and the
   entropy at each response token; the reference's log-probs give the per-token reward
   r_t = -kl_coef (log pi_old - log ref) + [t = last real token] score (``ppo_rewards``); generalised advantage
   estimation gives A_t and the returns A_t + V_t (``gae_advantages``); the step's advantages are whitened
   together, over all ranks (``ppo.whiten_advantages``);
2. each update: log-probs and values with gradients; loss = clipped policy loss + ``vf_coef`` x clipped value
   loss (``ppo_policy_loss``, ``ppo_value_loss``), token sums over the update group's tokens on all ranks.

After the step an adaptive KL coefficient (``ppo.adaptive_kl``) moves towards ``ppo.target_kl``, as in
Ziegler et al. 2019 (Sec. 2.2): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon), with KL the
mean per-response sum of log pi - log ref and n the step's responses; it is part of the checkpoint
(``TrainState.method_state``).

The value head is a linear layer (zero-initialised, so every V_t starts at 0) on the policy's last hidden state:
with LoRA it shares the adapted trunk, whose adapter learns from both losses. It is trained state (checkpoints,
resume) and is written beside the run as ``value_head.safetensors``; the run directory itself holds the policy
like any causal-LM run, so ``generate``, ``chat``, ``merge`` and ``export`` use it as they are. A separate critic
model is not implemented (one more model in memory; the shared-trunk head is what fits a small machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tuneforge.engine.recipe import LossTerms, stat
from tuneforge.losses import (WHITEN_EPS, gae_advantages, masked_whiten, ppo_policy_loss, ppo_rewards,
                              ppo_value_loss)
from tuneforge.models.adapters import causal_lm
from tuneforge.recipes._online import OnlineRL, PromptBatch, RolloutConfig, Samples
from tuneforge.recipes.registry import MethodSpec, register

VALUE_HEAD_FILE = "value_head.safetensors"
KL_ERROR_CLIP = 0.2  # Ziegler et al. 2019's clip of the controller's proportional error
KL_COEF_KEY = "kl_coef"  # TrainState.method_state: the adaptive controller's current coefficient


@dataclass
class PPOConfig(RolloutConfig):
    """``method: ppo``: one response per prompt, scored by a reward model (or functions); a KL penalty to the
    reference at every token; GAE advantages from a value head on the policy's hidden states; several clipped
    updates per rollout batch. Sampling, rewards, ``ppo_epochs`` and ``mini_batches``: see :class:`RolloutConfig`.

    Attributes:
        ppo_epochs: passes over each rollout batch; default 4 (TRL's).
        kl_coef: beta of the per-token penalty -beta (log pi - log ref); default 0.05.
        adaptive_kl: adapt beta after each rollout towards ``target_kl`` (Ziegler et al. 2019); default False.
        target_kl: the KL (nats per response) the adaptive controller aims at; default 6.0.
        kl_horizon: the controller's horizon in responses; default 10000.
        gamma: discount of GAE; default 1.0.
        lam: lambda of GAE; default 0.95.
        clip_range_value: clipping of the value prediction around its rollout value; default 0.2.
        vf_coef: weight of the value loss; default 0.1.
        whiten_advantages: normalise the step's advantages to mean 0, std 1; default True.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {"kl_coef": (0.0, None), "target_kl": (1e-6, None), "kl_horizon": (1, None), "gamma": (0.0, 1.0),
                             "lam": (0.0, 1.0), "clip_range_value": (1e-6, None), "vf_coef": (0.0, None)}

    ppo_epochs: int = 4
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True


register(MethodSpec(
    name="ppo", recipe="tuneforge.recipes.ppo:PPORecipe", section="ppo", section_class=PPOConfig,
    data="prompts", summary="PPO: online RL with a value head and a per-token KL penalty to the reference",
    reference=True, online=True, fsdp=False, loss_validation=False))


@dataclass
class PPORollout:
    """One sampled response per prompt of a micro-batch and PPO's loss inputs; each (N, T) float32 is 0 where
    ``samples.mask`` is 0.

    old_logp: log pi_old of each response token (the policy that sampled them); old_values: V_t at the rollout;
    ref_logp: the reference's log-probs; rewards: per-token rewards (KL penalty + score at the last token);
    advantages: GAE (whitened over the step in ``collect_rollouts``); returns: value targets; entropy: the
    policy's entropy at each response position (a statistic); count: the micro-batch's response tokens on all
    ranks, the normaliser.
    """

    samples: Samples
    old_logp: torch.Tensor
    old_values: torch.Tensor
    ref_logp: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor
    count: float = 1.0


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


class PPORecipe:
    """``method: ppo``. See the module docstring; the shared online part is ``self.online``."""

    def __init__(self, run):
        self.run = run
        self.online = OnlineRL(run)
        self.inputs = self.online  # what it trains on: read, tokenised and batched
        self.section = self.online.section
        self.step_kl_coef: float | None = None  # the coefficient the last step's rewards were made with (logged)

    # ------------------------------------------------------------------------ what online methods share

    def evaluate(self) -> dict | None:
        return self.online.evaluate()

    @property
    def engine(self):
        return self.online.engine

    @property
    def last_rollouts(self) -> list[PPORollout]:
        return self.online.last_rollouts

    # ------------------------------------------------------------------------------------------ model
    def prepare_model(self, model: torch.nn.Module) -> None:
        """The shared part first (the full-fine-tuning reference copy is made before the head exists), then the
        value head: a submodule of the model, so the optimiser, DDP and checkpoints handle it like any trainable
        weight."""
        self.online.prepare_model(model)
        model.value_head = ValueHead(causal_lm(model).config.hidden_size).to(self.run.device)

    def save_model(self, save: Callable[[], None]) -> None:
        """The policy as any causal-LM run (without the head, so it loads as a plain model), then the head."""
        model = self.run.model
        head = model.value_head
        # Before the run marker (written last by save_run), so a marked run directory is complete.
        save_file({name: p.detach().cpu().contiguous() for name, p in head.state_dict().items()},
                  str(self.run.run_dir / VALUE_HEAD_FILE))
        model._modules.pop("value_head")
        try:
            save()
        finally:
            model.value_head = head

    # ------------------------------------------------------------------------------------------- step
    @property
    def kl_coef(self) -> float:
        """The current KL coefficient: ``ppo.kl_coef``, or, with ``ppo.adaptive_kl``, where the controller has moved
        it (a resumed run goes on from the saved value)."""
        if not self.section.adaptive_kl:
            return self.section.kl_coef
        return float(self.run.state.method_state.get(KL_COEF_KEY, self.section.kl_coef))

    def train_step(self, window: Sequence[PromptBatch], update) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollouts (advantages whitened over the step), ``ppo_epochs`` x ``mini_batches`` updates, then the
        adaptive KL coefficient."""
        result = self.online.optimise(self.collect_rollouts(window), update)
        self.adapt_kl_coef()
        return result

    def collect_rollouts(self, window: Sequence[PromptBatch]) -> list[PPORollout]:
        """The step's rollouts, with the advantages of all its response tokens whitened together on all ranks (as
        PPO implementations whiten over the rollout batch); records KL (per response) and entropy (per token)."""
        rollouts = self.online.collect_rollouts(window, self.rollout, self.count)
        self.step_kl_coef = self.kl_coef
        masks = [r.samples.mask.bool() for r in rollouts]
        if self.section.whiten_advantages:
            flat = torch.cat([r.advantages[m] for r, m in zip(rollouts, masks)])
            whitened = self._whiten_over_ranks(flat)
            for rollout, mask, piece in zip(rollouts, masks, whitened.split([int(m.sum()) for m in masks])):
                rollout.advantages = torch.zeros_like(rollout.advantages).masked_scatter(mask, piece)
        for rollout, mask in zip(rollouts, masks):
            kl = torch.where(mask, rollout.old_logp - rollout.ref_logp, 0.0).sum()
            self.run.stats.add("kl", stat(kl, float(mask.shape[0])))  # per response: the sum over its tokens
            self.run.stats.add("entropy", stat(rollout.entropy.sum(), mask.sum()))
        return rollouts

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> PPORollout:
        online, section = self.online, self.section
        samples = online.sample(batch.examples, 1)
        policy = online.response_forward(self.run.model, samples, value_head=self.run.model.value_head, entropy=True)
        ref_logp = online.reference_forward(samples)
        rewards = ppo_rewards(samples.rewards, policy.logp, ref_logp, samples.mask, self.kl_coef)
        advantages, returns = gae_advantages(rewards, policy.values, samples.mask, section.gamma, section.lam)
        return PPORollout(samples, policy.logp, policy.values, ref_logp, rewards, advantages, returns,
                          policy.entropy)

    def _whiten_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``masked_whiten`` of the step's advantages (1-D, this rank's) with the mean and unbiased variance of
        every rank's, so the split of the batch over processes does not change them. A step with fewer than two
        response tokens in all (batch 1 and an immediate stop) is only centred: its variance is undefined."""
        distributed = self.run.dist.enabled
        if not distributed and values.numel() >= 2:
            return masked_whiten(values[None], torch.ones_like(values[None])).squeeze(0)
        moments = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)]).double()
        if distributed:
            dist.all_reduce(moments)
        total, count = moments.tolist()
        mean = total / max(count, 1.0)
        squares = ((values.double() - mean) ** 2).sum()
        if distributed:
            dist.all_reduce(squares)
        if count < 2:
            return (values.double() - mean).float()
        return ((values.double() - mean) * torch.rsqrt(squares / (count - 1) + WHITEN_EPS)).float()

    def adapt_kl_coef(self) -> None:
        """Ziegler et al.'s proportional controller (module docstring), from the step's KL on all ranks."""
        section = self.section
        if not section.adaptive_kl:
            return
        kl_sum, responses = self.run.stats.totals(self.run.dist.enabled)["kl"]
        error = min(max(kl_sum / max(responses, 1.0) / section.target_kl - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
        self.run.state.method_state[KL_COEF_KEY] = self.kl_coef * (1 + error * responses / section.kl_horizon)

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        kl_coef = self.kl_coef if self.step_kl_coef is None else self.step_kl_coef
        return {**self.online.step_metrics(means), "kl_coef": kl_coef}

    # ------------------------------------------------------------------------------------------- loss
    def count(self, rollout: PPORollout) -> torch.Tensor:
        """The rollout's response tokens on this rank (the losses are token means over the update group)."""
        return rollout.samples.mask.sum().float()

    def normaliser(self, rollout: PPORollout) -> float:
        return rollout.count

    def loss_terms(self, model: torch.nn.Module, rollout: PPORollout) -> LossTerms:
        """Clipped policy loss + vf_coef x clipped value loss, summed over the rollout's response tokens, and their
        statistics (token means weighted by its tokens; the two losses' sums as ``policy_loss``, ``value_loss``)."""
        section, mask = self.section, rollout.samples.mask
        out = self.online.response_forward(model, rollout.samples, value_head=model.value_head)
        policy_sum, policy_stats = ppo_policy_loss(out.logp, rollout.old_logp, rollout.advantages, mask,
                                                   section.clip_range, denominator=1)
        value_sum, value_stats = ppo_value_loss(out.values, rollout.old_values, rollout.returns, mask,
                                                section.clip_range_value, denominator=1)
        tokens = mask.sum()
        stats = {**self.online.token_stats({**policy_stats, **value_stats}, mask),
                 "policy_loss": stat(policy_sum.detach(), tokens), "value_loss": stat(value_sum.detach(), tokens)}
        return LossTerms(policy_sum + section.vf_coef * value_sum, stats)
