"""Online-RL numerics of tuneforge.losses (PPO, GRPO, RLOO) against plain float64 loops written out here, hand
numbers and analytic gradients."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tuneforge.losses import (GRPO_NORMALISATIONS, KL_ESTIMATORS, gae_advantages, group_advantages, grpo_loss,
                              masked_mean, masked_whiten, per_token_kl, ppo_policy_loss, ppo_rewards,
                              ppo_value_loss)

TOL = dict(rtol=1e-6, atol=1e-6)
EOS = PAD = 2

# Ragged response masks: right-padded rows of 4, 6 and 1 tokens, and a left-padded one of 3.
MASK = torch.tensor([
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 1],
], dtype=torch.bool)


def _close(got, want, **tol):
    want = torch.as_tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, **(tol or TOL))


def _rand(seed, shape=MASK.shape, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale + offset


def _poison(t, mask, value=float("nan")):
    """``t`` with every padding entry replaced by ``value``."""
    return t.detach().masked_fill(~mask, value)


def _real(mask):
    return [[t for t in range(mask.shape[1]) if mask[b, t]] for b in range(mask.shape[0])]


# --- masked mean and whitening ----------------------------------------------------------------------------------

def test_masked_mean_over_all_and_per_row_ignores_padding():
    values = _rand(0)
    poisoned = _poison(values, MASK, float("inf"))
    real = [[values[b, t].item() for t in ts] for b, ts in enumerate(_real(MASK))]
    flat = [v for row in real for v in row]
    _close(masked_mean(poisoned, MASK), sum(flat) / len(flat))
    _close(masked_mean(poisoned, MASK, dim=1), [sum(row) / len(row) for row in real])
    empty = torch.zeros(2, 3, dtype=torch.bool)
    empty[0, 1] = True
    _close(masked_mean(torch.full((2, 3), 5.0), empty, dim=1), [5.0, 0.0])  # an empty row is 0, not NaN


def test_masked_whiten_matches_plain_statistics_over_real_tokens_only():
    values = _rand(1, scale=3.0, offset=2.0)
    flat = [values[b, t].item() for b, ts in enumerate(_real(MASK)) for t in ts]
    mean, var = statistics.fmean(flat), statistics.variance(flat)  # variance: unbiased, n - 1
    want = torch.zeros(MASK.shape, dtype=torch.float64)
    want_no_shift = torch.zeros(MASK.shape, dtype=torch.float64)
    for b, ts in enumerate(_real(MASK)):
        for t in ts:
            want[b, t] = (values[b, t].item() - mean) / math.sqrt(var + 1e-8)
            want_no_shift[b, t] = want[b, t] + mean

    got = masked_whiten(_poison(values, MASK), MASK)
    assert got.dtype == torch.float32
    _close(got, want, rtol=1e-5, atol=1e-5)
    _close(masked_whiten(_poison(values, MASK, 1e6), MASK, shift_mean=False), want_no_shift, rtol=1e-5, atol=1e-5)
    # Real tokens alone: mean 0 and unbiased variance 1; padding is left at 0.
    real = got[MASK].double()
    assert abs(real.mean().item()) < 1e-6 and abs(real.var(unbiased=True).item() - 1) < 1e-5
    assert got[~MASK].abs().max() == 0
    # Whitening the padded tensor as if padding were real (the bug being guarded against) gives other numbers.
    assert (got[MASK] - masked_whiten(values, torch.ones_like(MASK))[MASK]).abs().max() > 0.1

    with pytest.raises(ValueError, match="at least 2 real entries"):
        masked_whiten(torch.ones(1, 3), torch.tensor([[True, False, False]]))


# --- GAE --------------------------------------------------------------------------------------------------------

def _gae_reference(rewards, values, mask, gamma, lam):
    """Eq. 16 as a sum, A_t = sum_l (gamma lam)^l delta_{t+l}, over each row's real tokens, V after the last = 0."""
    adv = torch.zeros(mask.shape, dtype=torch.float64)
    for b, ts in enumerate(_real(mask)):
        r = [rewards[b, t].item() for t in ts]
        v = [values[b, t].item() for t in ts] + [0.0]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(r))]
        for i, t in enumerate(ts):
            adv[b, t] = sum((gamma * lam) ** l * deltas[i + l] for l in range(len(r) - i))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.5, 1.0)])
def test_gae_matches_the_direct_sum_of_eq_16_on_ragged_masks(gamma, lam):
    rewards, values = _rand(2), _rand(3)
    adv, ret = gae_advantages(_poison(rewards, MASK, 1e4), _poison(values, MASK, -1e4), MASK, gamma, lam)
    want = _gae_reference(rewards, values, MASK, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    _close(adv, want, rtol=1e-5, atol=1e-5)
    _close(ret, want + values.double() * MASK, rtol=1e-5, atol=1e-5)
    assert adv[~MASK].abs().max() == 0 and ret[~MASK].abs().max() == 0


def test_gae_with_gamma_and_lambda_one_is_returns_to_go_minus_values():
    rewards, values = _rand(4), _rand(5)
    adv, ret = gae_advantages(rewards, values, MASK, 1.0, 1.0)
    to_go = torch.zeros(MASK.shape, dtype=torch.float64)
    for b, ts in enumerate(_real(MASK)):
        for i, t in enumerate(ts):
            to_go[b, t] = sum(rewards[b, s].item() for s in ts[i:])
    _close(ret, to_go, rtol=1e-5, atol=1e-5)
    _close(adv, to_go - values.double() * MASK, rtol=1e-5, atol=1e-5)


def test_gae_hand_numbers_and_a_single_final_reward():
    # One row, 3 tokens, score 1 at the end, V = [0.5, 0.2, 0.4], gamma = 1, lam = 0.5:
    # delta = [0 + 0.2 - 0.5, 0 + 0.4 - 0.2, 1 + 0 - 0.4] = [-0.3, 0.2, 0.6]
    # A_2 = 0.6, A_1 = 0.2 + 0.5 * 0.6 = 0.5, A_0 = -0.3 + 0.5 * 0.5 = -0.05
    adv, ret = gae_advantages(torch.tensor([[0.0, 0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.2, 0.4, 9.0]]),
                              torch.tensor([[1, 1, 1, 0]]), 1.0, 0.5)
    _close(adv, [[-0.05, 0.5, 0.6, 0.0]])
    _close(ret, [[0.45, 0.7, 1.0, 0.0]])


def test_gae_rejects_a_gap_inside_the_response_and_bad_coefficients():
    holes = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"rows \[0\] have a gap"):
        gae_advantages(torch.zeros(2, 4), torch.zeros(2, 4), holes, 1.0, 0.95)
    with pytest.raises(ValueError, match="lam must be in"):
        gae_advantages(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.5)


# --- KL estimators ----------------------------------------------------------------------------------------------

def test_kl_estimators_against_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -0.5]])  # log r = ref - logp = [-1, 1, 0]
    _close(per_token_kl(logp, ref, "k1"), [[1.0, -1.0, 0.0]])
    _close(per_token_kl(logp, ref, "k2"), [[0.5, 0.5, 0.0]])
    # (r - 1) - log r: e^-1 - 1 + 1 = e^-1, and e - 1 - 1 = e - 2
    _close(per_token_kl(logp, ref, "k3"), [[math.exp(-1), math.e - 2, 0.0]])
    with pytest.raises(ValueError, match="unknown KL estimator"):
        per_token_kl(logp, ref, "k4")


def test_k3_is_nonnegative_and_keeps_its_digits_near_zero():
    g = torch.Generator().manual_seed(6)
    logp = torch.randn(64, 64, generator=g) * 4 - 5
    ref = logp + torch.randn(64, 64, generator=g) * torch.logspace(-6, 1, 64)
    k3 = per_token_kl(logp, ref, "k3")
    assert (k3 >= 0).all() and (per_token_kl(logp, ref, "k2") >= 0).all()
    assert (per_token_kl(logp, ref, "k1") < 0).any()
    d = torch.tensor([1e-4, -1e-4, 3e-3])
    want = [math.expm1(x) - x for x in d.double().tolist()]  # ~ (log r)^2 / 2
    # Within float32 rounding of expm1(d) (half an ulp of 1e-4 is 4e-12, about 1e-3 of the result) ...
    _close(per_token_kl(torch.zeros(3), d, "k3"), want, rtol=2e-3, atol=0)
    # ... where exp(d) - 1 - d in float32 is off by more than the whole value.
    naive = torch.exp(d) - 1 - d
    assert ((naive.double() - torch.tensor(want)).abs() > torch.tensor(want).abs())[:2].any()


def test_k1_and_k3_average_to_the_exact_kl_and_k2_does_not():
    # Expectations over tokens y ~ pi taken exactly: sum_y pi(y) k(y) against KL(pi || ref).
    g = torch.Generator().manual_seed(7)
    logp = torch.log_softmax(torch.randn(50, generator=g) * 2, dim=0)
    ref = torch.log_softmax(torch.randn(50, generator=g) * 2, dim=0)
    p = logp.double().exp()
    kl = (p * (logp.double() - ref.double())).sum().item()
    expect = {kind: (p * per_token_kl(logp, ref, kind).double()).sum().item() for kind in KL_ESTIMATORS}
    assert expect["k1"] == pytest.approx(kl, rel=1e-5)
    assert expect["k3"] == pytest.approx(kl, rel=1e-5)
    assert abs(expect["k2"] - kl) > 0.01 * kl


# --- PPO rewards ------------------------------------------------------------------------------------------------

def test_ppo_rewards_put_the_score_at_the_last_real_token_when_pad_is_eos():
    response_ids = torch.tensor([
        [5, EOS, 7, EOS, PAD, PAD],   # an eos inside the response, the final eos, then padding (pad == eos)
        [6, 6, 6, 6, 6, EOS],         # full row
        [EOS, PAD, PAD, PAD, PAD, PAD],
        [PAD, PAD, 5, EOS, 6, EOS],   # left padding: the last real token is not at the token count
    ])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    logp = torch.tensor([[-1.0, -0.5, -2.0, -0.1, 0.0, 0.0]]).repeat(4, 1)
    ref = torch.tensor([[-1.5, -0.5, -1.0, -0.3, -7.0, -7.0]]).repeat(4, 1)
    scores = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rewards = ppo_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) = [-0.05, 0, 0.1, -0.02, -0.7, -0.7]
    _close(rewards, [[-0.05, 0.0, 0.1, -0.02 + 2.0, 0.0, 0.0],
                     [-0.05, 0.0, 0.1, -0.02, -0.7, -0.7 - 1.0],
                     [-0.05 + 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 0.1, -0.02, -0.7, -0.7 + 3.0]])
    # What a token-id search would get wrong: the first eos (== pad) of row 0 is in the middle of the response.
    assert (response_ids[0] == PAD).nonzero()[0].item() == 1
    assert rewards.dtype == torch.float32 and not rewards.requires_grad
    _close(ppo_rewards(scores, logp, ref, mask, 0.0).sum(dim=1), scores)
    with pytest.raises(ValueError, match="one score per row"):
        ppo_rewards(scores[:2], logp, ref, mask, 0.1)


# --- PPO policy and value losses --------------------------------------------------------------------------------

def test_ppo_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    advantages = _rand(8)
    logp = _rand(9, offset=-2.0).requires_grad_()
    loss, stats = ppo_policy_loss(logp, logp.detach(), advantages, MASK, clip_range=0.2)
    n = int(MASK.sum())
    _close(loss, -advantages[MASK].double().sum() / n)
    assert stats["clip_fraction"].item() == 0 and stats["approx_kl"].item() == 0
    (grad,) = torch.autograd.grad(loss, logp)
    _close(grad, -advantages.double() * MASK / n)  # d(-A r)/d logp = -A r, r = 1


# (advantage, ratio, clipped?) around clip_range 0.2
CLIP_CASES = [
    (1.0, 1.5, True),     # A > 0, ratio past 1 + eps: the gain is capped at 1.2 A, no gradient
    (1.0, 0.5, False),    # A > 0, ratio below 1 - eps: unclipped, the token is pulled back up
    (1.0, 1.1, False),    # inside the trust region
    (-2.0, 0.5, True),    # A < 0, ratio below 1 - eps: capped at 0.8 A, no gradient
    (-2.0, 1.5, False),   # A < 0, ratio past 1 + eps: unclipped, the token is pushed back down
    (-2.0, 0.9, False),
]


def test_ppo_policy_loss_clipping_by_sign_of_the_advantage():
    eps = 0.2
    advantages = torch.tensor([[a] for a, _, _ in CLIP_CASES])
    ratios = torch.tensor([[r] for _, r, _ in CLIP_CASES])
    old = torch.full_like(ratios, -1.3)
    logp = (old + ratios.log()).requires_grad_()
    mask = torch.ones_like(ratios, dtype=torch.bool)
    loss, stats = ppo_policy_loss(logp, old, advantages, mask, eps)

    per_token, grads = [], []
    for a, r, clipped in CLIP_CASES:
        per_token.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
        grads.append(0.0 if clipped else -a * r / len(CLIP_CASES))
    _close(loss, sum(per_token) / len(CLIP_CASES), rtol=1e-6, atol=1e-6)
    assert per_token[0] == pytest.approx(-1.2) and per_token[3] == pytest.approx(1.6)
    _close(stats["clip_fraction"], sum(c for _, _, c in CLIP_CASES) / len(CLIP_CASES))
    _close(stats["approx_kl"], statistics.fmean((r - 1) - math.log(r) for _, r, _ in CLIP_CASES), rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(loss, logp)
    _close(grad.flatten(), grads, rtol=1e-5, atol=1e-7)


def test_ppo_policy_loss_ignores_nonfinite_padding_and_takes_a_step_denominator():
    g = torch.Generator().manual_seed(10)
    old = _rand(11, offset=-2.0)
    logp = (old + torch.randn(MASK.shape, generator=g) * 0.3).requires_grad_()
    advantages = _rand(12)
    loss, stats = ppo_policy_loss(logp, old, advantages, MASK, 0.2)
    poisoned = _poison(logp, MASK, float("-inf")).requires_grad_()
    loss_p, stats_p = ppo_policy_loss(poisoned, _poison(old, MASK), _poison(advantages, MASK), MASK, 0.2)
    torch.testing.assert_close(loss_p, loss, rtol=0, atol=0)
    torch.testing.assert_close(stats_p, stats, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(loss_p, poisoned)
    assert torch.isfinite(grad).all() and grad[~MASK].abs().max() == 0 and grad[MASK].abs().max() > 0
    # Two micro-batches, each divided by the whole step's token count, add up to the full batch's loss.
    n = int(MASK.sum())
    parts = [ppo_policy_loss(logp[rows], old[rows], advantages[rows], MASK[rows], 0.2, denominator=n)[0]
             for rows in (slice(0, 1), slice(1, 4))]
    _close(sum(parts), loss.detach(), rtol=1e-6, atol=1e-6)
    assert abs(parts[0].item() - ppo_policy_loss(logp[:1], old[:1], advantages[:1], MASK[:1], 0.2)[0].item()) > 1e-4


def test_ppo_value_loss_clipping():
    eps_v = 0.5
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[2.0, 0.0, 1.2, 3.0, 7.0]], requires_grad=True)
    returns = torch.tensor([[3.0, 3.0, 2.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, eps_v)
    # token 0: moved 1.0 towards R: clipped to 1.5, error (1.5 - 3)^2 = 2.25 > (2 - 3)^2 = 1: clipped, no grad
    # token 1: moved 1.0 away from R: clipped 0.5 gives 6.25 < 9: unclipped, grad (V - R) = -3
    # token 2: inside the range: both 0.64, grad -0.8
    # token 3: moved 2.0 away from R (R below): clipped 1.5 gives 2.25 < 9: unclipped, grad 3
    # token 4: padding
    _close(loss, 0.5 * (2.25 + 9.0 + 0.64 + 9.0) / 4, rtol=1e-6, atol=1e-6)
    _close(stats["value_clip_fraction"], 0.25)
    (grad,) = torch.autograd.grad(loss, values)
    _close(grad, [[0.0, -3.0 / 4, -0.8 / 4, 3.0 / 4, 0.0]], rtol=1e-5, atol=1e-6)
    # With a wide clip range the loss is the plain 0.5 * mean squared error.
    plain, _ = ppo_value_loss(values, old, returns, mask, 100.0)
    _close(plain, 0.5 * (1.0 + 9.0 + 0.64 + 9.0) / 4, rtol=1e-6, atol=1e-6)


# --- group advantages -------------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0,     # half right
                        0.3, 0.3, 0.3, 0.3,     # all equal (and 0.3 is not exact in binary)
                        2.5, -1.0, 0.7, 0.1])   # graded


def _groups(rewards, g):
    return [rewards[i:i + g].double().tolist() for i in range(0, rewards.numel(), g)]


def test_grpo_group_advantages_with_and_without_std_match_direct_statistics():
    eps = 1e-4
    scaled, centred = [], []
    for group in _groups(REWARDS, 4):
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: unbiased, as TRL's torch.std
        scaled += [(r - mean) / (std + eps) for r in group]
        centred += [r - mean for r in group]
    got = group_advantages(REWARDS, 4, "group_mean")
    assert got.shape == (12,) and got.dtype == torch.float32
    _close(got, scaled, rtol=1e-5, atol=1e-6)
    _close(group_advantages(REWARDS, 4, "group_mean", scale_by_std=False), centred, rtol=1e-5, atol=1e-6)
    # std +- 1 for the half-right group: (1 - 0.5) / (0.57735 + 1e-4)
    assert got[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + eps), rel=1e-6)


def test_rloo_advantages_are_reward_minus_the_mean_of_the_others():
    want = []
    for group in _groups(REWARDS, 4):
        want += [r - sum(group[j] for j in range(4) if j != i) / 3 for i, r in enumerate(group)]
    got = group_advantages(REWARDS, 4, "leave_one_out")
    _close(got, want, rtol=1e-5, atol=1e-6)
    _close(got, 4 / 3 * group_advantages(REWARDS, 4, "group_mean", scale_by_std=False).double(), rtol=1e-6, atol=1e-7)
    # Groups of 2: the advantage is the difference of the pair.
    _close(group_advantages(torch.tensor([3.0, 1.0]), 2, "leave_one_out"), [2.0, -2.0])


@pytest.mark.parametrize("baseline,scale", [("group_mean", None), ("group_mean", False), ("leave_one_out", None)])
def test_a_group_with_identical_rewards_gets_exactly_zero(baseline, scale):
    rewards = torch.tensor([0.1] * 7 + [1 / 3] * 7 + [0.0, 1.0] * 3 + [1.0])
    # The naive r - mean is not exactly 0 here, and divided by std + eps it would be a spurious advantage.
    assert (rewards[:7] - rewards[:7].mean()).abs().max() > 0
    got = group_advantages(rewards, 7, baseline, scale_by_std=scale)
    assert got[:14].abs().max() == 0
    assert got[14:].abs().min() > 0.1


def test_group_advantages_reject_misuse():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="not scaled"):
        group_advantages(torch.zeros(4), 2, "leave_one_out", scale_by_std=True)
    with pytest.raises(ValueError, match="unknown group baseline"):
        group_advantages(torch.zeros(4), 2, "ppo")


# --- GRPO loss --------------------------------------------------------------------------------------------------

def _grpo_reference(logp, old, ref, adv, mask, eps, beta, normalisation):
    """Plain loops over eq. 3: -(min(r A, clip(r) A) - beta k3) per token, then the chosen average."""
    rows = []
    for b, ts in enumerate(_real(mask)):
        terms = []
        for t in ts:
            r = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b].item()
            log_ratio = ref[b, t].item() - logp[b, t].item()
            k3 = math.exp(log_ratio) - log_ratio - 1
            terms.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a) + beta * k3)
        rows.append(terms)
    if normalisation == "token":
        return sum(sum(t) for t in rows) / sum(len(t) for t in rows)
    return sum(sum(t) / len(t) for t in rows) / len(rows)


def _grpo_batch(seed=13):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(MASK.shape, generator=g) - 2
    logp = (old + torch.randn(MASK.shape, generator=g) * 0.3).requires_grad_()
    ref = old + torch.randn(MASK.shape, generator=g) * 0.2
    adv = torch.tensor([1.5, -0.7, 0.4, -1.2])
    return logp, old, ref, adv


@pytest.mark.parametrize("normalisation", GRPO_NORMALISATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_plain_loops(normalisation, beta):
    logp, old, ref, adv = _grpo_batch()
    loss, stats = grpo_loss(logp, old, ref, adv, MASK, 0.2, beta, normalisation)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _close(loss, _grpo_reference(logp, old, ref, adv, MASK, 0.2, beta, normalisation), rtol=1e-5, atol=1e-6)
    ratios = (logp.detach() - old).exp()[MASK]
    token_adv = adv[:, None].expand_as(MASK)[MASK]
    want_clip = (((ratios > 1.2) & (token_adv > 0)) | ((ratios < 0.8) & (token_adv < 0))).double().mean()
    assert 0 < want_clip < 1
    _close(stats["clip_fraction"], want_clip)
    _close(stats["kl"], per_token_kl(logp, ref, "k3")[MASK].double().mean(), rtol=1e-5, atol=1e-7)


def test_grpo_loss_with_beta_zero_and_token_normalisation_is_the_ppo_policy_loss():
    logp, old, ref, adv = _grpo_batch(14)
    grpo, _ = grpo_loss(logp, old, None, adv, MASK, 0.2, 0.0, "token")
    ppo, _ = ppo_policy_loss(logp, old, adv[:, None].expand_as(logp), MASK, 0.2)
    torch.testing.assert_close(grpo, ppo, rtol=0, atol=0)


def test_a_group_with_identical_rewards_gives_zero_gradient_in_grpo_loss():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.7, 0.7, 0.7, 0.7])  # second group: all equal
    adv = group_advantages(rewards, 4)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[1, 3:] = mask[5, 2:] = False
    g = torch.Generator().manual_seed(15)
    old = torch.randn(8, 5, generator=g) - 2
    logp = (old + torch.randn(8, 5, generator=g) * 0.5).requires_grad_()
    ref = old + torch.randn(8, 5, generator=g) * 0.3
    for normalisation in GRPO_NORMALISATIONS:
        logp.grad = None
        loss, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, 0.0, normalisation)
        loss.backward()
        assert logp.grad[4:].abs().max() == 0
        assert (logp.grad[:4][mask[:4]].abs() > 0).float().mean() > 0.5  # the others learn (some tokens clipped)
    # With the KL term those rows are still pulled towards the reference.
    logp.grad = None
    grpo_loss(logp, old, ref, adv, mask, 0.2, 0.1)[0].backward()
    assert logp.grad[4:][mask[4:]].abs().min() > 0


def test_token_and_sequence_normalisation_weigh_ragged_responses_differently():
    # Ratio 1 and beta 0: per-token loss -A. Two responses of 1 and 3 tokens, A = +1 and -1.
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    token, _ = grpo_loss(logp, None, None, adv, mask, 0.2, 0.0, "token")
    sequence, _ = grpo_loss(logp, None, None, adv, mask, 0.2, 0.0, "sequence")
    _close(token, (-1.0 + 3 * 1.0) / 4)   # every token counts once: the long wrong response dominates
    _close(sequence, (-1.0 + 1.0) / 2)    # every response counts once
    (g_token,) = torch.autograd.grad(token, logp)
    (g_sequence,) = torch.autograd.grad(sequence, logp)
    _close(g_token, [[-1 / 4, 0, 0], [1 / 4, 1 / 4, 1 / 4]])
    _close(g_sequence, [[-1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]])
    # Equal lengths: the two coincide.
    full = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(grpo_loss(logp, None, None, adv, full, 0.2, 0.0, "token")[0],
                               grpo_loss(logp, None, None, adv, full, 0.2, 0.0, "sequence")[0])


@pytest.mark.parametrize("normalisation", GRPO_NORMALISATIONS)
def test_grpo_loss_split_into_micro_batches_with_the_step_denominator(normalisation):
    logp, old, ref, adv = _grpo_batch(16)
    whole, _ = grpo_loss(logp, old, ref, adv, MASK, 0.2, 0.04, normalisation)
    denominator = int(MASK.sum()) if normalisation == "token" else MASK.shape[0]
    parts = [grpo_loss(logp[rows], old[rows], ref[rows], adv[rows], MASK[rows], 0.2, 0.04, normalisation,
                       denominator=denominator)[0] for rows in (slice(0, 3), slice(3, 4))]
    _close(sum(parts), whole.detach(), rtol=1e-6, atol=1e-6)


def test_grpo_loss_single_update_and_nonfinite_padding():
    logp, _, ref, adv = _grpo_batch(17)
    # old_logp None: ratio 1 with the gradient of logp, the same as passing logp.detach().
    none, stats = grpo_loss(logp, None, ref, adv, MASK, 0.2, 0.04)
    detached, _ = grpo_loss(logp, logp.detach(), ref, adv, MASK, 0.2, 0.04)
    torch.testing.assert_close(none, detached, rtol=0, atol=0)
    assert stats["clip_fraction"].item() == 0
    torch.testing.assert_close(torch.autograd.grad(none, logp)[0], torch.autograd.grad(detached, logp)[0])
    # -inf log-probs and NaN at padding change nothing and leave finite, zero gradients there.
    poisoned = _poison(logp, MASK, float("-inf")).requires_grad_()
    loss, _ = grpo_loss(poisoned, None, _poison(ref, MASK), adv, MASK, 0.2, 0.04)
    torch.testing.assert_close(loss, none, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(loss, poisoned)
    assert torch.isfinite(grad).all() and grad[~MASK].abs().max() == 0


def test_grpo_loss_rejects_misuse():
    logp, old, ref, adv = _grpo_batch()
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, None, adv, MASK, 0.2, 0.04)
    with pytest.raises(ValueError, match="unknown GRPO normalisation"):
        grpo_loss(logp, old, ref, adv, MASK, 0.2, 0.0, "dr_grpo")
    with pytest.raises(ValueError, match="one value per row"):
        grpo_loss(logp, old, ref, adv[:, None].expand_as(logp), MASK, 0.2, 0.0)
    with pytest.raises(ValueError, match="clip_range"):
        grpo_loss(logp, old, ref, adv, MASK, 0.0, 0.0)
