"""Online RL numerics: PPO, GRPO and RLOO.

Per-token tensors are (batch, T) over the response positions of each
rollout, with a ``mask`` nonzero at real response tokens; log-probs are ``token_logprobs`` of the sampled
tokens. What comes from the rollout (old and reference log-probs, values, rewards, advantages) is a constant of
the update: compute it under ``torch.no_grad``. Results are float32 and 0 at padding, whatever padding holds.

The policy and value losses return *means*, unlike the token and preference losses, because how tokens are weighed is part of
each method (GRPO's per-response mean, DAPO's per-token mean). Under gradient accumulation pass
``denominator``, the count of the whole optimiser step, so the step's loss does not depend on the micro-batch
split.
"""

from __future__ import annotations

import torch

from tuneforge.losses.preference import _require_positive
from tuneforge.losses.tokens import last_token_index

KL_ESTIMATORS = ("k1", "k2", "k3")
GROUP_BASELINES = ("group_mean", "leave_one_out")  # GRPO's (Shao et al. 2024) and RLOO's (Ahmadian et al. 2024)
GRPO_NORMALISATIONS = ("token", "sequence")
WHITEN_EPS = 1e-8  # TRL's; keeps the whitening of a near-constant batch finite
GROUP_STD_EPS = 1e-4  # TRL's GRPO default; keeps (r - mean) / std finite for a near-constant group
RLStats = dict[str, torch.Tensor]  # name -> detached float32 scalar, for logging


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is nonzero.

    Args:
        values: (batch, T), or any shape.
        mask: same shape as ``values``, nonzero at real entries.
        dim: None for one mean over all real entries, or the dimension to reduce (1: one mean per row).
    Returns:
        float32 scalar, or ``values`` with ``dim`` reduced. No real entry gives 0, not NaN.
    """
    real = mask.bool()
    # where, not a product: padding may hold inf or NaN (the log-prob of a masked token), and inf * 0 is NaN.
    kept = torch.where(real, values.float(), 0.0)
    if dim is None:
        return kept.sum() / real.sum().clamp(min=1)
    return kept.sum(dim) / real.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8), with mean and variance over the real entries of the whole batch.

    The advantage normalisation of PPO implementations (Huang et al. 2022, "The 37 Implementation Details of
    Proximal Policy Optimization", detail 7; TRL's ``masked_whiten``). Padding neither shifts the mean nor shrinks
    the variance; the variance is unbiased (Bessel's n / (n - 1)), as in TRL. ``shift_mean=False`` adds the mean
    back, rescaling only (TRL whitens rewards this way, keeping their sign).

    Args:
        values: (batch, T) advantages, say.
        mask: (batch, T) nonzero at real tokens.
        shift_mean: subtract the mean (True) or only divide by the standard deviation.
    Returns:
        (batch, T) float32, 0 at padding.
    Raises:
        ValueError: fewer than two real entries, so the unbiased variance is undefined.
    """
    real = mask.bool()
    count = int(real.sum())  # a sync point, once per batch
    if count < 2:
        raise ValueError(f"masked_whiten needs at least 2 real entries for an unbiased variance, got {count}; "
                         "whiten over the whole rollout batch, not a single token")
    mean = masked_mean(values, real)
    centred = torch.where(real, values.float() - mean, 0.0)
    whitened = centred * torch.rsqrt(centred.pow(2).sum() / (count - 1) + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(real, whitened, 0.0)


def _require_one_run(real: torch.Tensor) -> None:
    starts = real.clone()
    starts[:, 1:] &= ~real[:, :-1]
    bad = (starts.sum(dim=1) > 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"mask rows {bad} have a gap inside the response; GAE would read it as the end of the "
                         "episode. Give each row one contiguous run of response tokens (right or left padding)")


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets, computed backwards over each response.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16:
    A_t = sum_l (gamma lam)^l delta_{t+l}, with delta_t = r_t + gamma V_{t+1} - V_t, by the recursion
    A_t = delta_t + gamma lam A_{t+1}. The episode ends at each row's last real token: the value after it is 0
    and nothing flows back from padding. The value targets are returns = A + V (the lambda-return).

    Args:
        rewards: (batch, T) per-token rewards (``ppo_rewards``).
        values: (batch, T) value-head predictions V_t at the rollout.
        mask: (batch, T) nonzero at response tokens, one contiguous run per row (right or left padding).
        gamma: discount in [0, 1].
        lam: lambda in [0, 1]; 1 gives returns-to-go minus values (unbiased, high variance), 0 the one-step TD
            error delta_t.
    Returns:
        (advantages, returns), each (batch, T) float32, detached, 0 at padding.
    """
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    real = mask.bool()
    _require_one_run(real)
    rewards = torch.where(real, rewards.detach().float(), 0.0)
    values = torch.where(real, values.detach().float(), 0.0)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    running = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(real[:, t], delta + gamma * lam * running, 0.0)
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, torch.where(real, advantages + values, 0.0)


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    With log r = ref_logp - logp (Schulman 2020, "Approximating KL Divergence", joschu.net/blog/kl-approx.html):

    - ``"k1"``: -log r = logp - ref_logp. Unbiased, high variance, negative on some tokens.
    - ``"k2"``: 0.5 (log r)^2. Biased (exact to second order when pi ~ ref), low variance, >= 0.
    - ``"k3"``: (r - 1) - log r. Unbiased and >= 0 (log x <= x - 1); GRPO's KL term (Shao et al. 2024,
      "DeepSeekMath", eq. 4).

    Args:
        logp, ref_logp: (batch, T) log-probs of the sampled tokens under pi and under ref.
        kind: one of ``KL_ESTIMATORS``.
    Returns:
        (batch, T) float32; padding is the caller's to mask.
    """
    log_ratio = ref_logp.float() - logp.float()
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        # expm1, not exp - 1: for pi ~ ref, r - 1 - log r ~ (log r)^2 / 2 would otherwise be lost to rounding.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def ppo_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards: a KL penalty at every response token, plus the score at the last one.

    r_t = -kl_coef * (log pi(y_t) - log ref(y_t)) + [t = last] * score: the KL-penalised reward of Ziegler et
    al. 2019 ("Fine-Tuning Language Models from Human Preferences", Sec. 2.2) and InstructGPT (Ouyang et al.
    2022, eq. 2), with the sequence penalty split over tokens (the k1 estimator), as in TRL. The last token is
    read from the mask (``last_token_index``), so an eos inside the response, or pad == eos, does not move it.

    Args:
        scores: (batch,) reward-model score of each response.
        logp, ref_logp: (batch, T) log-probs of the sampled tokens under the rollout policy and the reference.
        mask: (batch, T) nonzero at response tokens.
        kl_coef: beta >= 0.
    Returns:
        (batch, T) float32, detached, 0 at padding.
    """
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} must hold one score per row of mask {tuple(mask.shape)}")
    real = mask.bool()
    rewards = torch.where(real, -kl_coef * per_token_kl(logp.detach(), ref_logp.detach(), "k1"), 0.0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(real)] += scores.detach().float()
    return rewards


def _zero_padding(tensor: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    # Before any exp: a -inf or NaN at padding would make a NaN gradient there, and where's zero gradient to the
    # discarded branch does not help once it is multiplied by a non-finite local derivative.
    return torch.where(real, tensor.float(), 0.0)


def _token_mean(per_token: torch.Tensor, real: torch.Tensor, denominator: float | None) -> torch.Tensor:
    if denominator is None:
        return masked_mean(per_token, real)
    return torch.where(real, per_token, 0.0).sum() / denominator


def _clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                       clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(r A, clip(r, 1 - eps, 1 + eps) A), and where the clipped term is the one taken."""
    _require_positive("clip_range", clip_range)
    ratio = torch.exp(logp.float() - old_logp.detach().float())
    unclipped = -advantages.float() * ratio
    clipped = -advantages.float() * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float, denominator: float | None = None) -> tuple[torch.Tensor, RLStats]:
    """PPO's clipped surrogate objective, negated and averaged over response tokens.

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7: L = E_t[min(r_t A_t, clip(r_t, 1 -
    eps, 1 + eps) A_t)] with r_t = pi(y_t) / pi_old(y_t). A pessimistic bound: once the ratio is past 1 + eps for
    a positive advantage (below 1 - eps for a negative one), the token gives no gradient.

    Args:
        logp: (batch, T) log-probs of the sampled tokens under the policy being trained.
        old_logp: (batch, T) the same under the policy that sampled them; a constant.
        advantages: (batch, T) per-token advantages (``gae_advantages``, usually ``masked_whiten``-ed).
        mask: (batch, T) nonzero at response tokens.
        clip_range: eps > 0.
        denominator: the summed loss is divided by this; default the batch's count of response tokens.
    Returns:
        (loss, stats): scalar float32 loss; stats of detached float32 scalars over response tokens:
        ``clip_fraction``, the share of tokens where the clipped term is the one taken, and ``approx_kl``, the
        k3 estimate of KL(pi_old || pi), mean((r - 1) - log r).
    """
    real = mask.bool()
    logp, old_logp, advantages = (_zero_padding(t, real) for t in (logp, old_logp, advantages))
    per_token, clipped = _clipped_surrogate(logp, old_logp, advantages, clip_range)
    stats = {"clip_fraction": masked_mean(clipped, real).detach(),
             "approx_kl": masked_mean(per_token_kl(old_logp.detach(), logp.detach(), "k3"), real)}
    return _token_mean(per_token, real, denominator), stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float, denominator: float | None = None) -> tuple[torch.Tensor, RLStats]:
    """0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2), averaged over response tokens.

    The clipped value loss of OpenAI baselines' ppo2 and TRL (Huang et al. 2022, "The 37 Implementation Details
    of PPO", detail 9); the PPO paper itself (eq. 9) uses the plain squared error. Like the policy clip it is
    pessimistic: once V has moved more than eps_v from the rollout's V_old towards the target, the token gives
    no gradient.

    Args:
        values: (batch, T) value-head predictions being trained.
        old_values: (batch, T) the predictions at the rollout; a constant.
        returns: (batch, T) value targets (``gae_advantages``).
        mask: (batch, T) nonzero at response tokens.
        clip_range_value: eps_v > 0, in reward units.
        denominator: the summed loss is divided by this; default the batch's count of response tokens.
    Returns:
        (loss, stats): scalar float32 loss; stats ``value_clip_fraction``, the share of tokens where the clipped
        error is the one taken.
    """
    _require_positive("clip_range_value", clip_range_value)
    real = mask.bool()
    values = _zero_padding(values, real)
    old_values, returns = _zero_padding(old_values.detach(), real), _zero_padding(returns.detach(), real)
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_error = (values - returns).pow(2)
    clipped_error = (clipped_values - returns).pow(2)
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    stats = {"value_clip_fraction": masked_mean(clipped_error > unclipped_error, real).detach()}
    return _token_mean(per_token, real, denominator), stats


def group_advantages(rewards: torch.Tensor, group_size: int, baseline: str = "group_mean",
                     scale_by_std: bool | None = None,
                     eps: float = GROUP_STD_EPS) -> torch.Tensor:
    """Sequence-level advantages from the rewards of G responses sampled for the same prompt.

    - ``"group_mean"``: (r_i - mean(r)) / (std(r) + eps), the outcome-supervision advantage of GRPO (Shao et al.
      2024, "DeepSeekMath", Sec. 4.1.2, used in eq. 3); std is the unbiased sample std, as in TRL.
      ``scale_by_std=False`` keeps r_i - mean(r), as Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
      Training") does, so groups that are nearly all right or all wrong are not scaled up.
    - ``"leave_one_out"``: r_i - (1 / (G - 1)) sum_{j != i} r_j, the leave-one-out baseline of RLOO (Ahmadian et al.
      2024, "Back to Basics", eq. 9; Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!");
      it equals G / (G - 1) (r_i - mean(r)).

    A group whose rewards are all equal gets advantages of exactly 0, so it gives no policy gradient.

    Args:
        rewards: (num_prompts * G,) one scalar reward per response, the G responses of a prompt consecutive.
        group_size: G >= 2.
        baseline: one of ``GROUP_BASELINES``.
        scale_by_std: divide by the group's std; default True for ``"group_mean"``; the leave-one-out baseline
            does not scale.
        eps: added to the std; only with ``scale_by_std``.
    Returns:
        (num_prompts * G,) float32, detached.
    """
    if baseline not in GROUP_BASELINES:
        raise ValueError(f"unknown group baseline {baseline!r}; choose one of {', '.join(GROUP_BASELINES)}")
    if baseline == "leave_one_out" and scale_by_std:
        raise ValueError("RLOO's leave-one-out baseline is not scaled by the std; leave scale_by_std unset, or use "
                         "the 'group_mean' baseline")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a baseline needs other responses), got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be one flat run of groups of {group_size}; "
                         "sample the same number of responses for every prompt")
    grouped = rewards.detach().float().reshape(-1, group_size)
    # Shift each group by its first reward first (mean and std do not change): a constant group becomes exact
    # zeros, where r - mean(r) could be off by a rounding error and, divided by eps, a large spurious advantage.
    shifted = grouped - grouped[:, :1]
    centred = shifted - shifted.mean(dim=1, keepdim=True)
    if baseline == "leave_one_out":
        return (centred * (group_size / (group_size - 1))).flatten()
    if scale_by_std is None or scale_by_std:
        centred = centred / (shifted.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_range: float, beta: float,
              normalisation: str = "sequence", denominator: float | None = None) -> tuple[torch.Tensor, RLStats]:
    """GRPO's clipped objective with a KL penalty to the reference, negated.

    Shao et al. 2024, "DeepSeekMath", eq. 3: per token, min(r_t A, clip(r_t, 1 - eps, 1 + eps) A) - beta D_KL,
    with the response's advantage A (``group_advantages``) at each of its tokens, r_t = pi(y_t) / pi_old(y_t)
    and D_KL the k3 estimate of KL(pi || ref) (eq. 4, ``per_token_kl``). How tokens are averaged:

    - ``"sequence"``: mean over each response's tokens, then over responses, eq. 3 as written. Each response
      weighs the same, so a token of a long response weighs less than one of a short response.
    - ``"token"``: sum over all response tokens of the batch over their number (DAPO, Yu et al. 2025, Sec. 3.3,
      "Token-Level Policy Gradient Loss"). Each token weighs the same, so long responses, right or wrong, are
      not under-weighted.

    Args:
        logp: (batch, T) log-probs of the sampled tokens under the policy being trained.
        old_logp: (batch, T) the same under the policy that sampled them, or None for a single update per rollout
            (pi_old = pi: the ratio is 1 and its gradient that of logp).
        ref_logp: (batch, T) the same under the reference; may be None when beta is 0.
        advantages: (batch,) one advantage per response.
        mask: (batch, T) nonzero at response tokens.
        clip_range: eps > 0.
        beta: KL coefficient >= 0.
        normalisation: one of ``GRPO_NORMALISATIONS``.
        denominator: the summed loss is divided by this: default the batch's count of response tokens
            (``"token"``) or of responses (``"sequence"``); under accumulation, the whole step's count.
    Returns:
        (loss, stats): scalar float32 loss; stats of detached float32 token means: ``clip_fraction`` and ``kl``
        (k3; 0 when beta is 0 and there is no reference).
    """
    if normalisation not in GRPO_NORMALISATIONS:
        raise ValueError(f"unknown GRPO normalisation {normalisation!r}; choose one of "
                         f"{', '.join(GRPO_NORMALISATIONS)}")
    if beta < 0 or (beta and ref_logp is None):
        raise ValueError(f"beta must be >= 0 and needs ref_logp when > 0; got beta={beta!r}, "
                         f"ref_logp {'missing' if ref_logp is None else 'given'}")
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must hold one value per row of mask "
                         f"{tuple(mask.shape)}; per-token advantages are ppo_policy_loss's")
    real = mask.bool()
    logp = _zero_padding(logp, real)
    old = logp.detach() if old_logp is None else _zero_padding(old_logp, real)
    per_token, clipped = _clipped_surrogate(logp, old, advantages[:, None].expand_as(logp), clip_range)
    if ref_logp is None:
        kl = torch.zeros_like(per_token)
    else:
        kl = per_token_kl(logp, _zero_padding(ref_logp, real), "k3")
    if beta:
        per_token = per_token + beta * kl
    stats = {"clip_fraction": masked_mean(clipped, real).detach(), "kl": masked_mean(kl, real).detach()}
    if normalisation == "token":
        return _token_mean(per_token, real, denominator), stats
    per_response = masked_mean(per_token, real, dim=1)
    return per_response.sum() / (per_response.shape[0] if denominator is None else denominator), stats
