"""Preference-alignment numerics of tuneforge.losses (reward models, DPO and its family) against plain float64
re-computations written out here, analytic gradients and hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.losses import (DPO_LOSS_TYPES, IGNORE_INDEX, bradley_terry_loss, dpo_loss, gather_last,
                              ipo_token_means, kto_loss, kto_reference_point, last_token_index, log_odds, orpo_loss,
                              orpo_odds_ratio_loss, orpo_sft_loss_sum, response_lengths, sequence_logprobs,
                              simpo_loss)

# fp32 results against float64 references of the same fp32 inputs.
TOL = dict(rtol=1e-6, atol=1e-6)
BATCH = 16
LN2 = math.log(2.0)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _neg_logsigmoid(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), written to stay finite for large |x|."""
    return max(-x, 0.0) + math.log1p(math.exp(-abs(x)))


def _logps(generator, n=BATCH, mean=-30.0, std=8.0, grad=True):
    t = torch.randn(n, generator=generator) * std + mean
    return t.requires_grad_() if grad else t


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return _logps(g), _logps(g), _logps(g, grad=False), _logps(g, grad=False)


def _close(got, want, **tol):
    want = torch.as_tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, **(tol or TOL))


def _h(pc, pr, rc, rr):
    """Plain per-pair log-ratio differences in float64."""
    return [(a - c) - (b - d) for a, b, c, d in zip(*(t.detach().double().tolist() for t in (pc, pr, rc, rr)))]


def _dpo_reference(h, beta, loss_type, eps):
    out = []
    for x in h:
        if loss_type == "sigmoid":
            out.append(_neg_logsigmoid(beta * x))
        elif loss_type == "cdpo":
            out.append((1 - eps) * _neg_logsigmoid(beta * x) + eps * _neg_logsigmoid(-beta * x))
        elif loss_type == "robust":
            out.append(((1 - eps) * _neg_logsigmoid(beta * x) - eps * _neg_logsigmoid(-beta * x)) / (1 - 2 * eps))
        elif loss_type == "ipo":
            out.append((x - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * x))
    return out


def _dpo_dloss_dh(h, beta, loss_type, eps):
    """d loss / d h by hand; d h / d policy_chosen = 1, d h / d policy_rejected = -1."""
    out = []
    for x in h:
        if loss_type == "sigmoid":
            out.append(-beta * _sigmoid(-beta * x))
        elif loss_type == "cdpo":
            out.append(beta * (-(1 - eps) * _sigmoid(-beta * x) + eps * _sigmoid(beta * x)))
        elif loss_type == "robust":
            out.append(beta * (-(1 - eps) * _sigmoid(-beta * x) - eps * _sigmoid(beta * x)) / (1 - 2 * eps))
        elif loss_type == "ipo":
            out.append(2 * (x - 1 / (2 * beta)))
        else:
            out.append(-beta if 1 - beta * x > 0 else 0.0)
    return out


def _eps(loss_type):
    return 0.2 if loss_type in ("cdpo", "robust") else 0.0


# --- sequence log-probs ---------------------------------------------------------------------------------------

def _sequence_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    targets = torch.tensor([
        [IGNORE_INDEX, IGNORE_INDEX, 4, 7, 1, IGNORE_INDEX],   # prompt, 3 response tokens, padding
        [IGNORE_INDEX, 3, 3, 0, 10, 9],                        # 5 response tokens
        [IGNORE_INDEX] * 6,                                     # nothing to score
    ])
    return logits, targets


def test_response_lengths_count_positions_with_a_target():
    _, targets = _sequence_batch()
    assert response_lengths(targets).tolist() == [3, 5, 0]


def test_sequence_logprobs_sum_and_mean_match_plain_loops():
    logits, targets = _sequence_batch()
    want_sum, want_mean = [], []
    for b in range(targets.shape[0]):
        terms = []
        for t in range(targets.shape[1]):
            if targets[b, t] != IGNORE_INDEX:
                row = logits[b, t].double().tolist()
                terms.append(row[targets[b, t]] - math.log(sum(math.exp(v) for v in row)))
        want_sum.append(sum(terms))
        want_mean.append(sum(terms) / len(terms) if terms else 0.0)

    total = sequence_logprobs(logits, targets)
    mean = sequence_logprobs(logits, targets, average=True)
    assert total.dtype == mean.dtype == torch.float32 and total.shape == (3,)
    _close(total, want_sum, rtol=1e-6, atol=1e-5)
    _close(mean, want_mean)
    assert total[2] == 0 and mean[2] == 0


def test_sequence_logprobs_ignore_padding_and_prompt_positions():
    logits, targets = _sequence_batch()
    logits.requires_grad_()
    scrambled = logits.detach().clone()
    ignored = targets == IGNORE_INDEX
    scrambled[ignored] = torch.randn(int(ignored.sum()), logits.shape[-1]) * 50
    for average in (False, True):
        torch.testing.assert_close(sequence_logprobs(scrambled, targets, average),
                                   sequence_logprobs(logits, targets, average), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(sequence_logprobs(logits, targets, average).sum(), logits)
        assert grad[ignored].abs().max() == 0
        assert grad[~ignored].abs().max() > 0


# --- DPO family -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_losses_and_rewards_match_plain_recomputation(loss_type, beta):
    pc, pr, rc, rr = _pairs()
    eps = _eps(loss_type)
    out = dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing=eps)
    h = _h(pc, pr, rc, rr)

    assert out.losses.shape == (BATCH,) and out.losses.dtype == torch.float32
    _close(out.losses, _dpo_reference(h, beta, loss_type, eps))
    chosen = [beta * (a - c) for a, c in zip(pc.detach().double().tolist(), rc.double().tolist())]
    rejected = [beta * (b - d) for b, d in zip(pr.detach().double().tolist(), rr.double().tolist())]
    _close(out.chosen_rewards, chosen)
    _close(out.rejected_rewards, rejected)
    _close(out.margins, [c - r for c, r in zip(chosen, rejected)])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradients_match_analytic(loss_type):
    pc, pr, rc, rr = _pairs(seed=2)
    rc.requires_grad_()
    rr.requires_grad_()
    beta, eps = 0.1, _eps(loss_type)
    out = dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing=eps)
    grads = torch.autograd.grad(out.losses.sum(), (pc, pr, rc, rr))
    dh = _dpo_dloss_dh(_h(pc, pr, rc, rr), beta, loss_type, eps)
    for grad, sign in zip(grads, (1, -1, -1, 1)):
        _close(grad, [sign * d for d in dh], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_dpo_at_step_zero(beta):
    # policy == reference: h = 0, so every reward and margin is exactly 0.
    policy = _logps(torch.Generator().manual_seed(3), grad=False)
    ref = policy.clone()
    expected = {"sigmoid": LN2, "cdpo": LN2, "robust": LN2, "ipo": (1 / (2 * beta)) ** 2, "hinge": 1.0}
    for loss_type in DPO_LOSS_TYPES:
        out = dpo_loss(policy, policy, ref, ref, beta, loss_type, label_smoothing=_eps(loss_type))
        _close(out.losses, [expected[loss_type]] * BATCH, rtol=1e-7, atol=0)
        assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
        assert out.margins.abs().max() == 0


def test_label_smoothing_zero_makes_cdpo_and_robust_equal_sigmoid():
    pc, pr, rc, rr = _pairs(seed=4)
    sigmoid = dpo_loss(pc, pr, rc, rr, 0.3).losses
    for loss_type in ("cdpo", "robust"):
        torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.3, loss_type, 0.0).losses, sigmoid, rtol=0, atol=0)


def test_swapping_chosen_and_rejected():
    pc, pr, rc, rr = _pairs(seed=5)
    beta, eps = 0.2, 0.1
    h = torch.tensor(_h(pc, pr, rc, rr))

    def both(loss_type, smoothing=0.0):
        return (dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing),
                dpo_loss(pr, pc, rr, rc, beta, loss_type, smoothing))

    sig, sig_swapped = both("sigmoid")
    # -log sigmoid(-x) + log sigmoid(x) = x
    _close(sig_swapped.losses - sig.losses, beta * h, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sig_swapped.chosen_rewards, sig.rejected_rewards, rtol=0, atol=0)
    torch.testing.assert_close(sig_swapped.margins, -sig.margins, rtol=0, atol=0)

    # cDPO is the DPO loss averaged over a label flip with probability eps.
    cdpo, _ = both("cdpo", eps)
    _close(cdpo.losses, (1 - eps) * sig.losses.double() + eps * sig_swapped.losses.double())

    # rDPO is unbiased: averaged over the same flip it gives back the clean DPO loss.
    robust, robust_swapped = both("robust", eps)
    _close((1 - eps) * robust.losses.double() + eps * robust_swapped.losses.double(), sig.losses)

    ipo, ipo_swapped = both("ipo")
    _close(ipo_swapped.losses, (h + 1 / (2 * beta)) ** 2, rtol=1e-6, atol=1e-4)
    hinge, hinge_swapped = both("hinge")
    _close(hinge_swapped.losses, torch.relu(1 + beta * h))


def test_dpo_rejects_options_it_would_misuse():
    pc, pr, rc, rr = _pairs()
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(pc, pr, rc, rr, 0.1, "kto_pair")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, 0.0)
    with pytest.raises(ValueError, match="no effect"):
        dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", label_smoothing=0.1)
    for bad in (0.5, -0.1):
        with pytest.raises(ValueError, match="label-flip rate"):
            dpo_loss(pc, pr, rc, rr, 0.1, "robust", label_smoothing=bad)


# --- SimPO ----------------------------------------------------------------------------------------------------

def test_ipo_token_means_divide_each_side_by_its_length():
    """Policy and reference sums of a side are divided by that side's response length; an empty side by 1."""
    pc, pr, rc, rr = _pairs(12)
    g = torch.Generator().manual_seed(12)
    chosen_counts = torch.randint(0, 40, (BATCH,), generator=g)
    rejected_counts = torch.randint(1, 40, (BATCH,), generator=g)
    chosen_counts[0] = 0
    got = ipo_token_means(pc, pr, rc, rr, chosen_counts, rejected_counts)
    lengths = [max(n, 1) for n in chosen_counts.tolist()], [max(n, 1) for n in rejected_counts.tolist()]
    for value, side, length in zip(got, (pc, pr, rc, rr), (lengths[0], lengths[1], lengths[0], lengths[1])):
        _close(value, [x / n for x, n in zip(side.detach().double().tolist(), length)])
    # The means feed IPO's loss: (h - 1/(2 beta))^2 on the per-token log-ratios, with gradients to the policy.
    loss = dpo_loss(*got, beta=0.1, loss_type="ipo").losses
    h = [(a - c) / m - (b - d) / n for a, b, c, d, m, n in
         zip(*(t.detach().double().tolist() for t in (pc, pr, rc, rr)), *lengths)]
    _close(loss, [(x - 5.0) ** 2 for x in h], rtol=1e-5, atol=1e-5)
    grad_c, = torch.autograd.grad(loss.sum(), pc)
    _close(grad_c, [2 * (x - 5.0) / m for x, m in zip(h, lengths[0])], rtol=1e-5, atol=1e-5)


def test_simpo_matches_plain_recomputation_and_gradients():
    g = torch.Generator().manual_seed(6)
    chosen, rejected = _logps(g, mean=-1.5, std=0.7), _logps(g, mean=-1.5, std=0.7)
    beta, gamma = 2.0, 0.5
    out = simpo_loss(chosen, rejected, beta, gamma)
    xs = [beta * c - beta * r - gamma for c, r in zip(chosen.detach().double().tolist(),
                                                      rejected.detach().double().tolist())]
    _close(out.losses, [_neg_logsigmoid(x) for x in xs])
    _close(out.chosen_rewards, beta * chosen.detach().double())
    _close(out.rejected_rewards, beta * rejected.detach().double())
    grad_c, grad_r = torch.autograd.grad(out.losses.sum(), (chosen, rejected))
    _close(grad_c, [-beta * _sigmoid(-x) for x in xs])
    _close(grad_r, [beta * _sigmoid(-x) for x in xs])


def test_simpo_with_no_margin_is_dpo_against_a_zero_reference():
    g = torch.Generator().manual_seed(7)
    chosen, rejected = _logps(g, mean=-1.5, std=0.7), _logps(g, mean=-1.5, std=0.7)
    zero = torch.zeros(BATCH)
    torch.testing.assert_close(simpo_loss(chosen, rejected, 2.0, 0.0).losses,
                               dpo_loss(chosen, rejected, zero, zero, 2.0).losses, **TOL)
    # The margin gamma is in reward units: shifting it equals shifting beta * (c - r).
    torch.testing.assert_close(simpo_loss(chosen, rejected, 2.0, 0.6).losses,
                               simpo_loss(chosen - 0.3, rejected, 2.0, 0.0).losses, rtol=1e-6, atol=1e-5)


# --- ORPO -----------------------------------------------------------------------------------------------------

def _log_odds_reference(x: float) -> float:
    p = math.exp(x)
    return math.log(p / (1 - p))


def test_log_odds_matches_plain_odds_on_ordinary_values():
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(64, generator=g) * 5 - 1e-3
    _close(log_odds(logp), [_log_odds_reference(x) for x in logp.double().tolist()], rtol=1e-6, atol=1e-5)


def test_log_odds_is_finite_near_zero_and_near_minus_infinity():
    logp = torch.tensor([-1e-8, -1e-6, -1e-30, 0.0, -50.0, -200.0, -1e4], requires_grad=True)
    # The naive form loses everything near 0 in float32: exp(-1e-8) rounds to 1.
    assert torch.isinf(logp[0] - torch.log1p(-torch.exp(logp[0])))

    got = log_odds(logp)
    assert torch.isfinite(got).all()
    _close(got[:2], [_log_odds_reference(-1e-8), _log_odds_reference(-1e-6)], rtol=1e-6, atol=0)
    _close(got[2], -math.log(1e-30), rtol=1e-6, atol=0)  # log(p/(1-p)) ~ -log(-log p) as p -> 1
    assert got[3] > 80  # p == 1: capped, not +inf
    torch.testing.assert_close(got[4:], logp[4:].detach(), rtol=1e-6, atol=0)  # p -> 0: log odds -> log p
    (grad,) = torch.autograd.grad(got.sum(), logp)
    assert torch.isfinite(grad).all()

    losses = orpo_odds_ratio_loss(logp, logp.flip(0), 0.1)
    assert torch.isfinite(losses).all()
    # Both sequences at p == 1 would be inf - inf = NaN without the cap; with it the ratio is 1.
    _close(orpo_odds_ratio_loss(torch.zeros(2), torch.zeros(2), 0.1), [0.1 * LN2] * 2)


def test_orpo_odds_ratio_loss_matches_plain_recomputation_and_gradients():
    g = torch.Generator().manual_seed(9)
    chosen = (-torch.rand(BATCH, generator=g) * 3 - 1e-3).requires_grad_()
    rejected = (-torch.rand(BATCH, generator=g) * 3 - 1e-3).requires_grad_()
    lam = 0.25
    losses = orpo_odds_ratio_loss(chosen, rejected, lam)
    cs, rs = chosen.detach().double().tolist(), rejected.detach().double().tolist()
    ratios = [_log_odds_reference(c) - _log_odds_reference(r) for c, r in zip(cs, rs)]
    _close(losses, [lam * _neg_logsigmoid(x) for x in ratios])
    # d log odds / d log p = 1 / (1 - p)
    grad_c, grad_r = torch.autograd.grad(losses.sum(), (chosen, rejected))
    _close(grad_c, [-lam * _sigmoid(-x) / (1 - math.exp(c)) for x, c in zip(ratios, cs)], rtol=1e-5, atol=1e-6)
    _close(grad_r, [lam * _sigmoid(-x) / (1 - math.exp(r)) for x, r in zip(ratios, rs)], rtol=1e-5, atol=1e-6)


def test_orpo_loss_rewards_are_lambda_times_the_mean_logprob():
    g = torch.Generator().manual_seed(13)
    chosen = (-torch.rand(BATCH, generator=g) * 3 - 1e-3).requires_grad_()
    rejected = (-torch.rand(BATCH, generator=g) * 3 - 1e-3).requires_grad_()
    out = orpo_loss(chosen, rejected, 0.3)
    torch.testing.assert_close(out.losses, orpo_odds_ratio_loss(chosen, rejected, 0.3), rtol=0, atol=0)
    _close(out.chosen_rewards, [0.3 * c for c in chosen.detach().double().tolist()])
    _close(out.rejected_rewards, [0.3 * r for r in rejected.detach().double().tolist()])
    _close(out.margins, [0.3 * (c - r) for c, r in zip(chosen.detach().double().tolist(),
                                                      rejected.detach().double().tolist())])
    assert not out.chosen_rewards.requires_grad and out.losses.requires_grad


def test_orpo_sft_term_is_the_weighted_summed_nll_of_the_chosen_tokens():
    """Summed over pairs, -log pi(y_w) of each chosen response is the NLL summed over every chosen token."""
    logits, targets = _sequence_batch()
    sums = sequence_logprobs(logits, targets).requires_grad_()
    weights = torch.tensor([1.0] * (len(sums) - 1) + [0.0])
    got = orpo_sft_loss_sum(sums, weights)
    nll = torch.nn.functional.cross_entropy(logits[:-1].reshape(-1, logits.shape[-1]), targets[:-1].reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    _close(got, nll.item(), rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(got, sums)
    _close(grad, (-weights).tolist())


# --- KTO ------------------------------------------------------------------------------------------------------

def test_kto_all_desirable_and_all_undesirable_against_hand_numbers():
    policy = torch.tensor([-10.0, -13.0])
    ref = torch.tensor([-11.0, -11.0])  # r = [1, -2]
    kl = torch.tensor(0.4)
    # w * (1 - sigmoid(0.5 * (r - 0.4))) and w * (1 - sigmoid(0.5 * (0.4 - r)))
    desirable = kto_loss(policy, ref, torch.tensor([True, True]), kl, beta=0.5, desirable_weight=1.0)
    _close(desirable.losses, [0.42555748318834097, 0.7685247834990176])
    undesirable = kto_loss(policy, ref, torch.tensor([False, False]), kl, beta=0.5, undesirable_weight=2.0)
    _close(undesirable.losses, [2 * 0.5744425168116589, 2 * 0.23147521650098246])
    _close(desirable.rewards, [0.5, -1.0])
    # A negative KL estimate is noise in the estimator: clamped to 0.
    torch.testing.assert_close(kto_loss(policy, ref, torch.tensor([True, False]), -3.0, 0.5).losses,
                               kto_loss(policy, ref, torch.tensor([True, False]), 0.0, 0.5).losses, rtol=0, atol=0)


def test_kto_mixed_batch_matches_plain_recomputation_and_gradients():
    g = torch.Generator().manual_seed(10)
    policy, ref = _logps(g), _logps(g, grad=False)
    labels = torch.rand(BATCH, generator=g) > 0.5
    assert labels.any() and not labels.all()
    kl = torch.tensor(1.3, requires_grad=True)
    beta, wd, wu = 0.1, 1.0, 1.5
    out = kto_loss(policy, ref, labels, kl, beta, wd, wu)
    rs = [p - q for p, q in zip(policy.detach().double().tolist(), ref.double().tolist())]
    z0 = 1.3
    want, dwant = [], []
    for r, desirable in zip(rs, labels.tolist()):
        if desirable:
            s = _sigmoid(beta * (r - z0))
            want.append(wd * (1 - s))
            dwant.append(-wd * beta * s * (1 - s))
        else:
            s = _sigmoid(beta * (z0 - r))
            want.append(wu * (1 - s))
            dwant.append(wu * beta * s * (1 - s))
    _close(out.losses, want)
    _close(out.rewards, [beta * r for r in rs])
    grad_policy, grad_kl = torch.autograd.grad(out.losses.sum(), (policy, kl), allow_unused=True)
    _close(grad_policy, dwant)
    assert grad_kl is None  # z0 is a detached reference point


def test_kto_at_step_zero_and_label_type():
    logps = torch.full((4,), -20.0)
    out = kto_loss(logps, logps, torch.tensor([True, True, False, False]), 0.0, 0.1, 1.0, 1.33)
    _close(out.losses, [0.5, 0.5, 0.665, 0.665])
    with pytest.raises(TypeError, match="bool"):
        kto_loss(logps, logps, torch.tensor([1, 1, 0, 0]), 0.0, 0.1)


def test_kto_reference_point_is_the_weighted_mean_log_ratio_of_the_mismatched_pairs():
    g = torch.Generator().manual_seed(14)
    policy, ref = _logps(g), _logps(g, grad=False)
    weights = torch.tensor([1.0] * (BATCH - 3) + [0.0] * 3)
    z0 = kto_reference_point(policy, ref, weights)
    real = [(p - q) for p, q, w in zip(policy.detach().double().tolist(), ref.double().tolist(), weights.tolist()) if w]
    _close(z0, sum(real) / len(real), rtol=1e-5, atol=1e-5)
    assert not z0.requires_grad  # a constant of the loss
    # A batch of placeholders only: 0, not NaN.
    assert kto_reference_point(policy, ref, torch.zeros(BATCH)).item() == 0.0


def test_kto_reference_point_over_ranks_pools_both_sums(monkeypatch):
    """With ``all_ranks`` the estimate is the mean over every rank's examples (the paper's whole-batch mean), not
    the mean of the ranks' means; here another rank's sums are added by a stand-in for the all-reduce."""
    import tuneforge.losses.preference as preference

    g = torch.Generator().manual_seed(15)
    mine, mine_ref, other, other_ref = _logps(g, 6), _logps(g, 6), _logps(g, 2), _logps(g, 2)
    other_weights = torch.tensor([1.0, 0.0])
    other_totals = torch.stack([((other - other_ref) * other_weights).sum(), other_weights.sum()]).detach()

    def all_reduce(tensor):
        tensor += other_totals

    monkeypatch.setattr(preference.dist, "all_reduce", all_reduce)
    z0 = kto_reference_point(mine, mine_ref, torch.ones(6), all_ranks=True)
    pooled = torch.cat([mine - mine_ref, (other - other_ref)[:1]]).detach().double()
    _close(z0, pooled.mean().item(), rtol=1e-5, atol=1e-5)
    assert z0.item() != pytest.approx(kto_reference_point(mine, mine_ref, torch.ones(6)).item(), rel=1e-3)


# --- Bradley-Terry --------------------------------------------------------------------------------------------

def test_bradley_terry_with_margin_and_centering_against_hand_numbers():
    chosen = torch.tensor([2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 1.5], requires_grad=True)
    margin = torch.tensor([0.5, 0.0])
    # pair 1: log(1 + e^-0.5) + 0.01 * 3^2; pair 2: log(1 + e^1) + 0.01 * 2^2
    losses = bradley_terry_loss(chosen, rejected, margin, center_coefficient=0.01)
    _close(losses, [0.5640769841801067, 1.3532616875182228])
    _close(bradley_terry_loss(chosen, rejected, margin), [0.4740769841801067, 1.3132616875182228])
    _close(bradley_terry_loss(chosen, rejected, 0.5), [0.4740769841801067, _neg_logsigmoid(-1.5)])
    # The batch mean is mean(BT) + eta * mean((r_c + r_r)^2), the form reward trainers log.
    _close(losses.mean(), (0.4740769841801067 + 1.3132616875182228) / 2 + 0.01 * (9 + 4) / 2)
    grad_c, grad_r = torch.autograd.grad(losses.sum(), (chosen, rejected))
    # d/dr_c = -sigmoid(-(r_c - r_r - m)) + 2 eta (r_c + r_r)
    _close(grad_c, [-_sigmoid(-0.5) + 0.06, -_sigmoid(1.0) + 0.04])
    _close(grad_r, [_sigmoid(-0.5) + 0.06, _sigmoid(1.0) + 0.04])


def test_bradley_terry_matches_plain_recomputation():
    g = torch.Generator().manual_seed(11)
    chosen, rejected = torch.randn(BATCH, generator=g) * 3, torch.randn(BATCH, generator=g) * 3
    margin = torch.rand(BATCH, generator=g)
    want = [_neg_logsigmoid(c - r - m) + 0.05 * (c + r) ** 2
            for c, r, m in zip(chosen.double().tolist(), rejected.double().tolist(), margin.double().tolist())]
    _close(bradley_terry_loss(chosen, rejected, margin, 0.05), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), bradley_terry_loss(chosen, rejected, 0.0))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), -torch.nn.functional.logsigmoid(chosen - rejected))


# --- last real token ------------------------------------------------------------------------------------------

EOS = PAD = 2


def test_last_token_index_right_padding_with_pad_equal_to_eos():
    input_ids = torch.tensor([
        [5, EOS, 7, 8, EOS, PAD, PAD],   # an eos inside the prompt, the real final eos, then padding
        [5, 6, EOS, 7, 8, 9, EOS],       # full row
        [EOS, 4, EOS, PAD, PAD, PAD, PAD],
    ])
    mask = torch.tensor([
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0],
    ])
    assert last_token_index(mask).tolist() == [4, 6, 2]
    # What a token-id search would get wrong: the first eos of row 0 is inside the prompt.
    assert (input_ids[0] == PAD).nonzero()[0].item() == 1


def test_last_token_index_left_padding_and_mixed():
    mask = torch.tensor([
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 1],
        [1, 1, 1, 0, 0, 0],   # a right-padded row in the same batch
    ], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [5, 5, 2]


def test_gather_last_picks_the_last_real_position_and_routes_gradient_there():
    g = torch.Generator().manual_seed(12)
    values = torch.randn(3, 7, 2, generator=g, requires_grad=True)
    mask = torch.tensor([
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0],
    ])
    got = gather_last(values, mask)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, torch.stack([values[0, 4], values[1, 6], values[2, 0]]), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), values)
    expected = torch.zeros(3, 7, 2)
    expected[0, 4] = expected[1, 6] = expected[2, 0] = 1
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    # A (batch, seq) score tensor works the same way.
    torch.testing.assert_close(gather_last(values[..., 0], mask), got[:, 0], rtol=0, atol=0)


def test_last_token_index_rejects_empty_rows_and_packed_masks():
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        last_token_index(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="batch, seq"):
        last_token_index(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="must agree"):
        gather_last(torch.zeros(2, 4), torch.ones(2, 3))


# --- sequence log-probs from hidden states (the recipes' path) ---------------------------------------------------
@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_sequence_logprobs_from_hidden_matches_full_logits(head_trains, chunk):
    """Same sums, counts, means and gradients (hidden, weight, bias) as log_softmax over the full logits, with a
    frozen head (LoRA: gradients formed in forward) and a trained one (recomputed in backward)."""
    from tuneforge.losses import IGNORE_INDEX, sequence_logprobs, sequence_logprobs_from_hidden

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).requires_grad_(head_trains)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX  # a row without response tokens: 0, not NaN
    weights = torch.randn(3)  # per-sequence upstream gradients, as a preference loss gives
    ours = sequence_logprobs_from_hidden(hidden, targets, head, chunk_size=chunk)
    (ours.sums * weights + ours.means).sum().backward()
    got = [hidden.grad.clone()] + ([head.weight.grad.clone(), head.bias.grad.clone()] if head_trains else [])
    hidden.grad = None
    head.zero_grad()
    logits = head(hidden)
    sums, means = sequence_logprobs(logits, targets), sequence_logprobs(logits, targets, average=True)
    (sums * weights + means).sum().backward()
    want = [hidden.grad] + ([head.weight.grad, head.bias.grad] if head_trains else [])
    torch.testing.assert_close(ours.sums, sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.means, means, atol=1e-6, rtol=1e-5)
    assert ours.counts.tolist() == [4, 7, 0] and ours.sums[2].item() == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_from_hidden_accepts_a_wrapped_head():
    """A head that is not a plain nn.Linear (a LoRA-wrapped one, say) is called as a module, with the same result."""
    from tuneforge.losses import sequence_logprobs, sequence_logprobs_from_hidden

    torch.manual_seed(1)
    linear = torch.nn.Linear(8, 20, bias=False)
    wrapped = torch.nn.Sequential(linear)
    hidden = torch.randn(2, 5, 8)
    targets = torch.randint(0, 20, (2, 5))
    torch.testing.assert_close(sequence_logprobs_from_hidden(hidden, targets, wrapped, chunk_size=4).sums,
                               sequence_logprobs(linear(hidden), targets), atol=1e-5, rtol=1e-5)
