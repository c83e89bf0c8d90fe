"""Preference losses: DPO and its variants, SimPO, ORPO, KTO and the Bradley-Terry reward-model loss.

Every loss below returns one value per pair (or per example for KTO), in float32; the recipe sums them with the
pairs' weights and the trainer divides by the pairs of the step. The method-specific pieces around them live
here too: IPO's per-token means, ORPO's rewards and SFT term, KTO's reference point. Inputs are per-sequence
log-probs from ``sequence_logprobs``; reference log-probs are constants (compute them under ``torch.no_grad``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tuneforge.losses.tokens import IGNORE_INDEX, token_logprobs

DPO_LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "hinge")


def response_lengths(targets: torch.Tensor) -> torch.Tensor:
    """Number of positions with a target in each row.

    Args:
        targets: (batch, seq) target ids or ``IGNORE_INDEX``.
    Returns:
        (batch,) int64 counts.
    """
    return (targets != IGNORE_INDEX).sum(dim=-1)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log pi(y | x) of each row's response: the sum of its token log-probs, or their mean.

    DPO (Rafailov et al. 2023, eq. 7) uses the sum, log pi(y|x) = sum_t log pi(y_t | x, y_<t). SimPO (Meng et
    al. 2024, eq. 4) and ORPO (Hong et al. 2024) use the length-normalised (1/|y|) sum_t log pi(y_t | ...), which
    is ``average=True``.

    Args:
        logits: (batch, seq, vocab).
        targets: (batch, seq) target ids, ``IGNORE_INDEX`` on the prompt and on padding.
        average: divide by the number of response tokens of the row.
    Returns:
        (batch,) float32. A row without any target gives 0 either way.
    """
    total = token_logprobs(logits, targets).sum(dim=-1)
    if not average:
        return total
    # clamp: an empty row is 0 / 1 = 0 rather than 0 / 0 = NaN.
    return total / response_lengths(targets).clamp(min=1)


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-pair losses of a pairwise preference method and the implicit rewards to log.

    losses: (batch,) float32, differentiable; the recipe averages them.
    chosen_rewards, rejected_rewards: (batch,) float32, detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """(batch,) chosen minus rejected reward; the pair counts as ranked right where it is positive."""
        return self.chosen_rewards - self.rejected_rewards


def _require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO and the losses that share its log-ratio difference.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), per pair:

    - ``"sigmoid"``: -log sigmoid(beta h). Rafailov et al. 2023, "Direct Preference Optimization", eq. 7.
    - ``"cdpo"``: (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h), eps = ``label_smoothing``.
      Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the expected DPO loss when each
      label is flipped with probability eps, i.e. DPO on soft labels. Its minimiser is a finite margin, so it
      stops pushing pairs that are already ranked right.
    - ``"robust"``: [(1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)] / (1 - 2 eps).
      rDPO, Chowdhury et al. 2024, "Provably Robust DPO", Sec. 3. Note the minus: this is the unbiased
      estimate of the *clean* DPO loss under flip rate eps, (1 - eps) * rdpo(h) + eps * rdpo(-h) = dpo(h).
      Unlike cDPO it keeps pushing h up (its gradient tends to -beta eps / (1 - 2 eps), not 0), so per-pair
      values can be negative. Needs eps < 1/2.
    - ``"ipo"``: (h - 1 / (2 beta))^2. Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
      from Human Preferences", eq. 17, with tau = beta. The loss takes h as given: pass summed log-probs to
      follow eq. 17 literally, or per-token means (``sequence_logprobs(..., average=True)``, as TRL does for
      IPO) so that the target margin 1/(2 beta) does not depend on response length. Either way the loss at
      policy == reference is (1 / (2 beta))^2.
    - ``"hinge"``: relu(1 - beta h). The rank-calibration hinge of SLiC-HF (Zhao et al. 2023, eq. 4, without
      its cross-entropy regulariser), max(0, delta - log pi(y_w) + log pi(y_l)), with delta = 1/beta, scaled
      by beta, and taken on the log-ratios to the reference as in RSO (Liu et al. 2023).

    Args:
        policy_chosen, policy_rejected: (batch,) log pi(y_w | x), log pi(y_l | x) of the trained policy.
        ref_chosen, ref_rejected: (batch,) the same under the frozen reference model.
        beta: > 0; the KL strength (DPO, cDPO, rDPO, hinge) or tau (IPO).
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: eps in [0, 1/2), the assumed label-flip rate; only for ``"cdpo"`` and ``"robust"``.
    Returns:
        ``PreferenceLoss`` with rewards beta * (log pi - log ref) (DPO's implicit reward, eq. 5 up to beta log Z).
    """
    _require_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if loss_type in ("cdpo", "robust"):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing is a label-flip rate and must be in [0, 0.5), got {label_smoothing!r}")
    elif label_smoothing != 0.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} has no effect with loss_type={loss_type!r}; "
                         "use loss_type 'cdpo' or 'robust', or set label_smoothing to 0")
    chosen_logratio = policy_chosen.float() - ref_chosen.float()
    rejected_logratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * h)
    return PreferenceLoss(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def ipo_token_means(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, chosen_counts: torch.Tensor, rejected_counts: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four sequence log-prob sums of DPO as per-token means, the inputs of ``dpo_loss(loss_type="ipo")``.

    IPO's target margin 1/(2 tau) (Azar et al. 2023, eq. 17) is meant per token, so h compares per-token means,
    as TRL does: log pi(y|x) / |y| for each side, and the reference's sum divided by the same |y| (policy and
    reference score the same response tokens):

        h = (log pi(y_w)/|y_w| - log ref(y_w)/|y_w|) - (log pi(y_l)/|y_l| - log ref(y_l)/|y_l|)

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (batch,) summed response log-probs.
        chosen_counts, rejected_counts: (batch,) response tokens of each side; an empty side counts as 1 (its
            mean is 0, not NaN).
    Returns:
        (policy_chosen, policy_rejected, ref_chosen, ref_rejected) divided by their side's length, (batch,) each.
    """
    chosen_length, rejected_length = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
    return (policy_chosen / chosen_length, policy_rejected / rejected_length, ref_chosen / chosen_length,
            ref_rejected / rejected_length)


def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, beta: float,
               gamma: float) -> PreferenceLoss:
    """SimPO: -log sigmoid(beta * avg log pi(y_w) - beta * avg log pi(y_l) - gamma).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6. No reference
    model; the reward (eq. 4) is beta times the length-normalised log-prob, and gamma is the target margin.

    Args:
        policy_chosen_avg, policy_rejected_avg: (batch,) per-token mean log-probs,
            ``sequence_logprobs(..., average=True)``.
        beta: > 0, reward scale.
        gamma: target reward margin, in reward units (not divided by beta).
    Returns:
        ``PreferenceLoss`` with rewards beta * avg log pi.
    """
    _require_positive("beta", beta)
    chosen_rewards = beta * policy_chosen_avg.float()
    rejected_rewards = beta * policy_rejected_avg.float()
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


_LOG_HALF = math.log(0.5)


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) = log p - log(1 - exp(log p)), from log p; finite for every finite log p <= 0.

    log(1 - exp(x)) is computed as log(-expm1(x)) for x > log(1/2) and as log1p(-exp(x)) below (Maechler 2012,
    "Accurately computing log(1 - exp(-|a|))"): in float32 log1p(-exp(-1e-8)) is log1p(-1) = -inf, because
    exp(-1e-8) rounds to 1, whereas expm1 keeps the digits. log p is clamped just below 0 so that p = 1 gives
    a large finite log-odds (about 87) instead of +inf, and two such sequences give a ratio of 0, not NaN.

    Args:
        logp: (...) log-probabilities, <= 0.
    Returns:
        (...) float32 log-odds.
    """
    x = logp.float().clamp(max=-torch.finfo(torch.float32).tiny)
    near_one = x > _LOG_HALF
    # Each branch only ever sees inputs where it is finite: torch.where passes a zero gradient to the branch it
    # discards, and zero times an infinite local gradient would still be NaN.
    log1m_near = torch.log(-torch.expm1(torch.where(near_one, x, _LOG_HALF)))
    log1m_far = torch.log1p(-torch.exp(torch.where(near_one, _LOG_HALF, x)))
    return x - torch.where(near_one, log1m_near, log1m_far)


def orpo_odds_ratio_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor,
                         lam: float) -> torch.Tensor:
    """ORPO's odds-ratio term, lam * L_OR = -lam * log sigmoid(log odds(y_w) - log odds(y_l)).

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 4-6, with
    odds(y) = P(y) / (1 - P(y)) and P(y) = exp(mean token log-prob). The SFT term of the full objective
    (-log P(y_w), eq. 2) is the caller's to add.

    Args:
        chosen_avg_logp, rejected_avg_logp: (batch,) per-token mean log-probs,
            ``sequence_logprobs(..., average=True)``.
        lam: weight of the odds-ratio term (lambda).
    Returns:
        (batch,) float32 lam * L_OR per pair.
    """
    return -lam * F.logsigmoid(log_odds(chosen_avg_logp) - log_odds(rejected_avg_logp))


def orpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, lam: float) -> PreferenceLoss:
    """ORPO's per-pair odds-ratio term (:func:`orpo_odds_ratio_loss`) and its implicit rewards.

    The reward logged for each side is lam * (1/|y|) log P(y), lambda times the per-token mean log-prob, as TRL
    logs it (ORPO has no reference, so there is no log-ratio to take); the margin is then lam times the
    difference of the mean log-probs.

    Args:
        chosen_avg_logp, rejected_avg_logp: (batch,) per-token mean log-probs.
        lam: weight of the odds-ratio term (lambda).
    Returns:
        ``PreferenceLoss``: lam * L_OR per pair and the rewards lam * mean log-prob, detached.
    """
    losses = orpo_odds_ratio_loss(chosen_avg_logp, rejected_avg_logp, lam)
    return PreferenceLoss(losses, lam * chosen_avg_logp.detach(), lam * rejected_avg_logp.detach())


def orpo_sft_loss_sum(chosen_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ORPO's SFT term L_SFT = -log P(y_w | x) (Hong et al. 2024, eq. 2), summed over the chosen responses.

    The sum of each chosen response's token log-probs, so the sum over pairs is the summed next-token NLL of
    every chosen token; divided by the chosen tokens of the step it is the mean token NLL of SFT.

    Args:
        chosen_logps: (batch,) summed token log-probs log pi(y_w | x) of the chosen responses.
        weights: (batch,) pair weights (0 for placeholder pairs).
    Returns:
        () float32 -sum_i w_i log pi(y_w,i | x_i).
    """
    return -(chosen_logps * weights).sum()


@dataclass(frozen=True)
class KTOLoss:
    """Per-example KTO losses and implicit rewards.

    losses: (batch,) float32, differentiable; the recipe averages them over the whole batch.
    rewards: (batch,) float32, detached beta * (log pi - log ref).
    """

    losses: torch.Tensor
    rewards: torch.Tensor


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl_estimate: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> KTOLoss:
    """KTO: lambda_y - v(x, y) for unpaired desirable / undesirable examples.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8. With
    r = log pi(y|x) - log ref(y|x) and z0 the reference point,

    - desirable:   w_d * (1 - sigmoid(beta * (r - z0)))
    - undesirable: w_u * (1 - sigmoid(beta * (z0 - r)))

    z0 estimates KL(pi || ref); it is clamped at 0 and detached, as in the paper, so no gradient flows
    through it. The caller estimates it (the paper: the batch mean of r over mismatched (x, y') pairs,
    averaged across processes).

    Args:
        policy_logps, ref_logps: (batch,) log pi(y | x) and log ref(y | x).
        labels: (batch,) bool, True for desirable.
        kl_estimate: scalar z0 before clamping.
        beta: > 0.
        desirable_weight, undesirable_weight: lambda_D and lambda_U; the paper keeps
            lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
    Returns:
        ``KTOLoss``.
    """
    _require_positive("beta", beta)
    if labels.dtype != torch.bool:
        raise TypeError(f"KTO labels must be a bool tensor (True = desirable), got {labels.dtype}")
    logratio = policy_logps.float() - ref_logps.float()
    z0 = torch.as_tensor(kl_estimate, dtype=torch.float32, device=logratio.device).detach().clamp(min=0)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return KTOLoss(torch.where(labels, desirable, undesirable), beta * logratio.detach())


@torch.no_grad()
def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, weights: torch.Tensor,
                        all_ranks: bool = False) -> torch.Tensor:
    """KTO's reference point z0, before clamping: the weighted batch mean of the log-ratio on mismatched pairs.

    Ethayarajh et al. 2024, eq. 8: z0 = KL(pi(y'|x) || ref(y'|x)), estimated from pairs (x, y') whose completion
    y' belongs to another prompt,

        z0 = sum_i w_i (log pi(y'_i | x_i) - log ref(y'_i | x_i)) / max(sum_i w_i, 1)

    The paper averages the estimate over the whole batch, across processes: with ``all_ranks`` the two sums are
    all-reduced over the default process group first, so every rank gets the same z0. It is a constant of the
    loss (no gradient; :func:`kto_loss` clamps it at 0).

    Args:
        policy_kl_logps, ref_kl_logps: (batch,) summed log-probs of the mismatched completions under the policy
            and the reference.
        weights: (batch,) example weights (0 for placeholders).
        all_ranks: sum over every rank of the process group (a collective: every rank must call it).
    Returns:
        () float32 z0.
    """
    kl_sum = ((policy_kl_logps - ref_kl_logps) * weights).sum()
    real = weights.sum()
    if all_ranks:
        totals = torch.stack([kl_sum, real])
        dist.all_reduce(totals)
        kl_sum, real = totals[0], totals[1]
    return kl_sum / real.clamp(min=1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float | None = None, center_coefficient: float = 0.0) -> torch.Tensor:
    """Reward-model pairwise loss: -log sigmoid(r_c - r_r - m) + eta * (r_c + r_r)^2.

    Bradley-Terry ranking loss of Ouyang et al. 2022 (InstructGPT), eq. 1; the margin m is Llama 2's (Touvron
    et al. 2023, eq. 2), larger for pairs the annotators rated as more clearly separated. The second term is
    reward centering (Eisenstein et al. 2023, "Helping or Herding?"): the BT loss only sees differences, so
    this pins the mean reward near 0. Per pair the centering is eta * (r_c + r_r)^2, so the batch mean of the
    result is mean(BT) + eta * mean((r_c + r_r)^2).

    Args:
        chosen_scores, rejected_scores: (batch,) scalar rewards r(x, y_c), r(x, y_r).
        margin: None, a float, or (batch,) m(r).
        center_coefficient: eta >= 0.
    Returns:
        (batch,) float32 per-pair loss.
    """
    chosen = chosen_scores.float()
    rejected = rejected_scores.float()
    diff = chosen - rejected
    if margin is not None:
        diff = diff - (margin.float() if isinstance(margin, torch.Tensor) else margin)
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses
