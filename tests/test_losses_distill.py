"""The generalised JSD of on-policy distillation (tuneforge.losses.distill) against a direct recomputation from
full logits (Agarwal et al. 2024; TRL's limits at beta = 0 and 1), its gradients, and the memory bound of the
chunked heads."""

from __future__ import annotations

import pytest
import torch

from test_losses import _OpCounter
from tuneforge.losses import chunk_divergence, generalized_jsd_from_hidden

POSITIONS, HIDDEN, TEACHER_HIDDEN, VOCAB = 29, 12, 20, 83
TOL = dict(rtol=1e-5, atol=1e-6)
SCALE = 0.37  # a non-unit upstream gradient: the trainer divides the loss sum by the step's token count


def direct_divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                       temperature: float) -> dict[str, torch.Tensor]:
    """The paper's definitions in float64 on probabilities (no log-space tricks): M = beta p + (1 - beta) q,
    JSD = beta KL(p || M) + (1 - beta) KL(q || M); at beta = 0 forward KL(p || q), at 1 reverse KL(q || p)."""
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if beta == 0:
        jsd = kl(p, q)
    elif beta == 1:
        jsd = kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        jsd = beta * kl(p, m) + (1 - beta) * kl(q, m)
    return {"jsd": jsd, "forward_kl": kl(p, q), "reverse_kl": kl(q, p)}


def make_inputs(with_bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(POSITIONS, HIDDEN, generator=g).requires_grad_()
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=with_bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) * 0.6)
        if with_bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    teacher_hidden = torch.randn(POSITIONS, TEACHER_HIDDEN, generator=g)
    teacher_head = torch.nn.Linear(TEACHER_HIDDEN, VOCAB, bias=False).requires_grad_(False)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(VOCAB, TEACHER_HIDDEN, generator=g) * 0.6)
    return hidden, head, teacher_hidden, teacher_head


def student_parameters(hidden, head):
    return [hidden] + [p for p in head.parameters()]


class WrappedHead(torch.nn.Module):
    """A head that is not a plain nn.Linear (as a LoRA-wrapped head is): the checkpointed path."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden):
        return self.linear(hidden)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 7, POSITIONS, 1000])
@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "module"])
def test_loss_and_gradients_match_the_direct_recomputation_from_full_logits(beta, temperature, chunk_size, wrapped):
    hidden, head, teacher_hidden, teacher_head = make_inputs()
    params = student_parameters(hidden, head)
    got = generalized_jsd_from_hidden(hidden, WrappedHead(head) if wrapped else head, teacher_hidden, teacher_head,
                                      beta, temperature, chunk_size)
    want = direct_divergences(head(hidden), teacher_head(teacher_hidden), beta, temperature)
    torch.testing.assert_close(got.loss_sum.double(), want["jsd"].sum(), **TOL)
    for name in ("jsd", "forward_kl", "reverse_kl"):
        torch.testing.assert_close(getattr(got, name).double(), want[name], **TOL)
        assert not getattr(got, name).requires_grad
    assert float(want["jsd"].sum().detach()) > 0.1  # the distributions differ: the comparison is not between zeros
    got_grads = torch.autograd.grad(got.loss_sum * SCALE, params)
    want_grads = torch.autograd.grad(want["jsd"].sum() * SCALE, params)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b.double(), **TOL)


def test_the_ends_are_forward_and_reverse_kl_and_beta_swaps_the_roles():
    """JSD_beta(p || q) = JSD_(1-beta)(q || p): swapping teacher and student mirrors beta; beta 0 and 1 are the
    two KLs (the limits TRL uses, not the formula's 0)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, VOCAB, generator=g), torch.randn(9, VOCAB, generator=g)
    for beta in (0.2, 0.5, 0.8):
        torch.testing.assert_close(chunk_divergence(a, b, beta).jsd, chunk_divergence(b, a, 1 - beta).jsd, **TOL)
    forward = chunk_divergence(a, b, 0.0)
    reverse = chunk_divergence(a, b, 1.0)
    torch.testing.assert_close(forward.jsd, forward.forward_kl)
    torch.testing.assert_close(reverse.jsd, reverse.reverse_kl)
    torch.testing.assert_close(reverse.jsd, chunk_divergence(b, a, 0.0).jsd, **TOL)
    # In between the JSD is bounded: each KL to the mixture is at most -log of its weight in it.
    assert bool((chunk_divergence(a, b, 0.5).jsd <= torch.log(torch.tensor(2.0)) + 1e-6).all())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "module"])
def test_zero_with_zero_gradient_when_the_student_is_the_teacher(beta, wrapped):
    hidden, head, _, _ = make_inputs()
    teacher_head = torch.nn.Linear(HIDDEN, VOCAB).requires_grad_(False)
    teacher_head.load_state_dict(head.state_dict())
    got = generalized_jsd_from_hidden(hidden, WrappedHead(head) if wrapped else head, hidden.detach(), teacher_head,
                                      beta, 0.8, chunk_size=5)
    assert abs(float(got.loss_sum.detach())) < 1e-5
    assert float(got.forward_kl.abs().max()) < 1e-5 and float(got.reverse_kl.abs().max()) < 1e-5
    for grad in torch.autograd.grad(got.loss_sum, student_parameters(hidden, head)):
        assert float(grad.abs().max()) < 1e-5


def test_positions_are_independent_so_any_split_sums_to_the_whole():
    """The loss is a sum over positions: computing two halves apart (two micro-batches) adds up to the whole."""
    hidden, head, teacher_hidden, teacher_head = make_inputs()
    whole = generalized_jsd_from_hidden(hidden, head, teacher_hidden, teacher_head, 0.5, 1.0, 8)
    cut = 11
    parts = [generalized_jsd_from_hidden(hidden[s], head, teacher_hidden[s], teacher_head, 0.5, 1.0, 8)
             for s in (slice(0, cut), slice(cut, None))]
    torch.testing.assert_close(parts[0].loss_sum + parts[1].loss_sum, whole.loss_sum, **TOL)
    torch.testing.assert_close(torch.cat([p.jsd for p in parts]), whole.jsd, **TOL)


def test_no_positions_give_zero_and_still_backpropagate():
    hidden, head, teacher_hidden, teacher_head = make_inputs()
    got = generalized_jsd_from_hidden(hidden[:0], head, teacher_hidden[:0], teacher_head, 0.5)
    assert float(got.loss_sum) == 0.0 and got.jsd.shape == (0,)
    got.loss_sum.backward()
    assert float(hidden.grad.abs().sum()) == 0.0


def test_under_no_grad_the_value_is_the_same_and_no_gradient_is_formed():
    hidden, head, teacher_hidden, teacher_head = make_inputs()
    with_grad = generalized_jsd_from_hidden(hidden, head, teacher_hidden, teacher_head, 0.5, 1.0, 4).loss_sum
    with torch.no_grad(), _OpCounter() as ops:
        without = generalized_jsd_from_hidden(hidden, head, teacher_hidden, teacher_head, 0.5, 1.0, 4).loss_sum
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())
    # One student and one teacher projection per chunk, none for gradients (those would add two more).
    assert ops.count("mm") == 2 * -(-POSITIONS // 4)


def test_bf16_autocast_is_close_and_gradients_keep_their_dtypes():
    hidden, head, teacher_hidden, teacher_head = make_inputs()
    full = generalized_jsd_from_hidden(hidden, head, teacher_hidden, teacher_head, 0.5, 1.0, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = generalized_jsd_from_hidden(hidden, head, teacher_hidden, teacher_head, 0.5, 1.0, 8)
    assert low.loss_sum.dtype == torch.float32
    torch.testing.assert_close(low.loss_sum, full.loss_sum.detach(), rtol=5e-2, atol=5e-2)
    low.loss_sum.backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- memory bound
@pytest.mark.parametrize("head_trainable", [True, False])
@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "module"])
def test_never_builds_positions_by_vocab_for_either_model(head_trainable, wrapped):
    # Full logits would be 1024 x 50000 floats (200 MB) per model; a chunk is 16x less, and nothing larger than one
    # chunk of one model's logits is ever produced (the mixture is formed without stacking the two).
    positions, hidden_size, vocab, chunk = 1024, 8, 50_000, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(head_trainable)
    teacher_hidden = torch.randn(positions, hidden_size, generator=g)
    teacher_head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    with _OpCounter() as ops:
        out = generalized_jsd_from_hidden(hidden, WrappedHead(head) if wrapped else head, teacher_hidden,
                                          teacher_head, 0.5, 1.0, chunk)
        out.loss_sum.backward()
    assert hidden.grad is not None and (head.weight.grad is not None) == head_trainable
    assert ops.max_numel == chunk * vocab  # the mode saw a chunk of logits, so it was watching
    assert ops.max_numel < positions * vocab


@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "module"])
def test_heads_with_padding_rows_are_compared_over_the_shared_ids(wrapped):
    """Heads larger than the tokenizer (padded for the hardware, by different amounts) compare only the first
    ``vocab_size`` logits of each: the same numbers as the direct recomputation on those, and no gradient to the
    student's padding rows."""
    hidden, _, teacher_hidden, _ = make_inputs(with_bias=True)
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(HIDDEN, VOCAB + 3)
    teacher_head = torch.nn.Linear(TEACHER_HIDDEN, VOCAB + 9).requires_grad_(False)
    with torch.no_grad():
        for layer in (head, teacher_head):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.6)
    got = generalized_jsd_from_hidden(hidden, WrappedHead(head) if wrapped else head, teacher_hidden, teacher_head,
                                      0.5, 1.0, 8, vocab_size=VOCAB)
    want = direct_divergences(head(hidden)[:, :VOCAB], teacher_head(teacher_hidden)[:, :VOCAB], 0.5, 1.0)
    torch.testing.assert_close(got.loss_sum.double(), want["jsd"].sum(), **TOL)
    got.loss_sum.backward()
    assert float(head.weight.grad[VOCAB:].abs().max()) == 0.0 and float(head.weight.grad[:VOCAB].abs().max()) > 0
