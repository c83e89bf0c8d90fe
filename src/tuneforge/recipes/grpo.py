"""Critic-free online RL: GRPO (Shao et al. 2024, "DeepSeekMath") and RLOO (Ahmadian et al. 2024).

What every online method shares (prompt data, sampling, rewards, the update schedule of ``grpo.ppo_epochs`` x
``grpo.mini_batches`` updates per rollout batch, validation by reward) is :class:`tuneforge.recipes._online.OnlineRL`.
What is GRPO's: for each prompt ``grpo.num_generations`` (G) responses are sampled; advantages come from the
rewards of each group of G (``tuneforge.losses.group_advantages``: mean and optionally std for GRPO, leave-one-out
baseline for RLOO), one per response, at each of its tokens; the reference log-probs give the k3 KL term of
``grpo_loss``; the summed loss of an update is divided by the response tokens (``grpo.normalisation: token``) or
responses (``sequence``) of its group on all ranks, so accumulation does not change the update. With one update
per rollout (the default), pi_old is the policy itself (ratio 1, clipping inactive) and its log-probs are not
computed separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tuneforge.engine.recipe import LossTerms
from tuneforge.losses import group_advantages, grpo_loss
from tuneforge.recipes._online import OnlineRL, PromptBatch, RolloutConfig, Samples
from tuneforge.recipes.registry import MethodSpec, register


@dataclass
class GRPOConfig(RolloutConfig):
    """``method: grpo | rloo``: critic-free online RL; G responses are sampled per prompt, scored by reward
    functions (or a reward model), and each is reinforced by its advantage over the others of its group.
    Sampling, rewards and updates per rollout: see :class:`RolloutConfig`.

    Attributes:
        num_generations: G >= 2, responses sampled per prompt (the group); default 4.
        beta: KL coefficient to the reference (the model with the adapter off, or a frozen copy for full
            fine-tuning; k3 estimate); 0 disables; default 0.04.
        normalisation: ``token`` (every response token of the step weighs the same, DAPO) or ``sequence``
            (mean per response, then over responses, GRPO's eq. 3); default ``token``.
        scale_by_std: GRPO only: divide each group's centred rewards by its std (False: Dr. GRPO); RLOO never
            scales; default True.
    """

    # key: (smallest allowed, largest allowed); None leaves that side open (checked with the shared ones)
    RANGES: ClassVar[dict] = {"num_generations": (2, None), "beta": (0.0, None)}

    num_generations: int = 4
    beta: float = 0.04
    normalisation: Literal["token", "sequence"] = "token"
    scale_by_std: bool = True

    @property
    def samples_per_prompt(self) -> int:
        """The group: ``num_generations`` responses per prompt."""
        return self.num_generations


register(MethodSpec(
    name="grpo", recipe="tuneforge.recipes.grpo:GRPORecipe", section="grpo", section_class=GRPOConfig,
    data="prompts", summary="GRPO: online RL from prompts and rewards, advantages within groups of samples",
    reference=True, online=True, fsdp=False, loss_validation=False))
register(MethodSpec(
    name="rloo", recipe="tuneforge.recipes.grpo:GRPORecipe", section="grpo", section_class=GRPOConfig,
    data="prompts", summary="RLOO: online RL from prompts and rewards, leave-one-out baselines",
    reference=True, online=True, fsdp=False, loss_validation=False))


@dataclass(frozen=True)
class GroupAdvantage:
    """How a method of this file turns a group's rewards into advantages: ``group_advantages``' ``baseline``, and
    whether it reads ``grpo.scale_by_std``."""

    baseline: str
    scales_by_std: bool


# The advantage of each method registered above (a method's name is read here only).
ADVANTAGES = {"grpo": GroupAdvantage("group_mean", scales_by_std=True),
              "rloo": GroupAdvantage("leave_one_out", scales_by_std=False)}


@dataclass
class Rollout:
    """G sampled responses for each prompt of a micro-batch (:class:`Samples`, rows ``i * G .. i * G + G - 1``
    belong to prompt ``i``) and GRPO's loss inputs.

    advantages: (B*G,) one per response; ref_logp: (B*G, T) reference per-token log-probs (0 where the mask is
    0), or None when beta is 0; old_logp: (B*G, T) the rollout policy's, or None with one update per rollout;
    count: the micro-batch's response tokens (or responses) on all ranks, the normaliser.
    """

    samples: Samples
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None
    old_logp: torch.Tensor | None
    count: float = 1.0


class GRPORecipe:
    """``method: grpo | rloo``. See the module docstring; the shared online part is ``self.online``."""

    def __init__(self, run):
        self.run = run
        self.online = OnlineRL(run)
        self.inputs = self.online  # what it trains on: read, tokenised and batched
        self.section = self.online.section
        self.advantage = ADVANTAGES[run.spec.name]

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
    def last_rollouts(self) -> list[Rollout]:
        return self.online.last_rollouts

    # ------------------------------------------------------------------------------------ GRPO's own
    def train_step(self, window: Sequence[PromptBatch], update) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollouts for every micro-batch of the step, then ``ppo_epochs`` x ``mini_batches`` updates."""
        return self.online.optimise(self.collect_rollouts(window), update)

    def collect_rollouts(self, window: Sequence[PromptBatch]) -> list[Rollout]:
        return self.online.collect_rollouts(window, self.rollout, self.count)

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample G responses per prompt, score them, and compute advantages and reference (and, with several
        updates per rollout, old) log-probs."""
        online, section = self.online, self.section
        samples = online.sample(batch.examples, online.generations)
        advantages = group_advantages(samples.rewards, online.generations, self.advantage.baseline,
                                      section.scale_by_std if self.advantage.scales_by_std else None)
        ref_logp = online.reference_forward(samples) if section.beta > 0 else None
        old_logp = None
        if section.ppo_epochs * section.mini_batches > 1:
            old_logp = online.response_forward(self.run.model, samples).logp
        return Rollout(samples, advantages.to(self.run.device), ref_logp, old_logp)

    def count(self, rollout: Rollout) -> torch.Tensor:
        """What the rollout's loss sum is divided by on this rank: its response tokens, or its responses."""
        mask = rollout.samples.mask
        if self.section.normalisation == "token":
            return mask.sum().float()
        return torch.tensor(float(mask.shape[0]), device=mask.device)

    def normaliser(self, rollout: Rollout) -> float:
        return rollout.count

    def loss_terms(self, model: torch.nn.Module, rollout: Rollout) -> LossTerms:
        """GRPO's loss summed over the rollout's tokens (or per-response means summed over its responses), and
        its token means (clip_fraction, kl) weighted by its tokens."""
        section, mask = self.section, rollout.samples.mask
        logp = self.online.response_forward(model, rollout.samples).logp
        loss_sum, stats = grpo_loss(logp, rollout.old_logp, rollout.ref_logp, rollout.advantages, mask,
                                    section.clip_range, section.beta, section.normalisation, denominator=1)
        return LossTerms(loss_sum, self.online.token_stats(stats, mask))
