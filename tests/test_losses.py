"""Parity of the shared numerics (tuneforge.losses) against plain full-logits references, and the memory bound
of the chunked output-projection loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tuneforge.losses import (IGNORE_INDEX, count_trained, linear_cross_entropy_sum, masked_lm_loss_sum,
                              reference_lm_loss_sum, token_logprobs)

TOKENS, HIDDEN, VOCAB = 37, 16, 101
# fp32 tolerance for a sum of ~40 cross-entropies and its gradients.
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(with_bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).requires_grad_()
    bias = torch.randn(VOCAB, generator=g).requires_grad_() if with_bias else None
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    return hidden, weight, bias, targets


def _grads(loss, tensors, scale=1.0):
    # A non-unit upstream gradient checks that backward scales by grad_output (the loop divides by token count).
    return torch.autograd.grad(loss * scale, [t for t in tensors if t is not None])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, TOKENS, 1000])
def test_linear_cross_entropy_matches_full_logits(chunk_size, with_bias):
    hidden, weight, bias, targets = _inputs(with_bias)
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    reference = F.cross_entropy(logits, targets, reduction="sum")
    loss = linear_cross_entropy_sum(hidden, weight, targets, bias, chunk_size=chunk_size)

    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, reference, **TOL)
    torch.testing.assert_close(loss, reference_lm_loss_sum(logits[None], targets[None]), **TOL)
    for got, want in zip(_grads(loss, (hidden, weight, bias), 0.37), _grads(reference, (hidden, weight, bias), 0.37)):
        torch.testing.assert_close(got, want, **TOL)


def test_linear_cross_entropy_with_frozen_weight_still_gives_hidden_grad():
    hidden, weight, bias, targets = _inputs(with_bias=True)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    loss = linear_cross_entropy_sum(hidden, weight, targets, bias, chunk_size=5)
    reference = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    (got,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(reference, hidden)
    torch.testing.assert_close(got, want, **TOL)


def test_linear_cross_entropy_frozen_hidden_gives_weight_grad():
    hidden, weight, bias, targets = _inputs(with_bias=False)
    hidden = hidden.detach()
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_size=4)
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(torch.autograd.grad(loss, weight)[0], torch.autograd.grad(reference, weight)[0], **TOL)


def test_linear_cross_entropy_under_no_grad_same_value_and_no_gradient_work():
    hidden, weight, bias, targets = _inputs(with_bias=True)
    with_grad = linear_cross_entropy_sum(hidden, weight, targets, bias, chunk_size=8)
    with torch.no_grad(), _OpCounter() as ops:
        without = linear_cross_entropy_sum(hidden, weight, targets, bias, chunk_size=8)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
    # Evaluation runs under no_grad with parameters that require grad (full fine-tuning): one matmul per
    # chunk (the logits), not three (logits, d hidden, d weight).
    chunks = -(-TOKENS // 8)
    assert ops.count("mm") + ops.count("addmm") == chunks


def test_linear_cross_entropy_bf16_autocast_close_and_grads_keep_dtypes():
    hidden, weight, bias, targets = _inputs(with_bias=False)
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_size=8)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def _sequence_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, HIDDEN, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, (3, 9), generator=g)
    # Ignored positions of every kind: a prompt, a sample's last position, right padding.
    targets[0, :4] = IGNORE_INDEX
    targets[1, 6:] = IGNORE_INDEX
    targets[2, ::2] = IGNORE_INDEX
    return hidden, targets


class _WrappedHead(torch.nn.Module):
    """Not a plain nn.Linear, so masked_lm_loss_sum takes its module-call fallback (as for a LoRA head)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("wrap", [False, True], ids=["linear", "module-fallback"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_masked_lm_loss_sum_matches_reference(wrap, chunk_size):
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
    hidden, targets = _sequence_inputs()
    assert count_trained(targets) == int((targets != IGNORE_INDEX).sum()) < targets.numel()

    loss = masked_lm_loss_sum(hidden, targets, _WrappedHead(head) if wrap else head, chunk_size)
    logits = head(hidden)
    reference = reference_lm_loss_sum(logits, targets)
    plain = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    torch.testing.assert_close(reference, plain, rtol=0, atol=0)
    torch.testing.assert_close(loss, reference, **TOL)
    params = (hidden, head.weight, head.bias)
    for got, want in zip(_grads(loss, params, 0.5), _grads(reference, params, 0.5)):
        torch.testing.assert_close(got, want, **TOL)
    # Ignored positions get no gradient at all.
    (hidden_grad,) = torch.autograd.grad(masked_lm_loss_sum(hidden, targets, head, chunk_size), hidden)
    assert (hidden_grad[targets == IGNORE_INDEX] == 0).all()


def test_masked_lm_loss_sum_with_no_targets_is_zero_and_backpropagates():
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(2, 4, HIDDEN, requires_grad=True)
    targets = torch.full((2, 4), IGNORE_INDEX)
    loss = masked_lm_loss_sum(hidden, targets, head)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (hidden.grad == 0).all()


def test_token_logprobs_match_log_softmax_gather_and_are_zero_where_ignored():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, VOCAB, generator=g)
    targets = torch.randint(1, VOCAB, (2, 6), generator=g)
    targets[0, :2] = IGNORE_INDEX
    targets[1, -1] = IGNORE_INDEX
    # A vocabulary entry masked to -inf: the placeholder id used at ignored positions must not turn into NaN.
    logits[..., 0] = float("-inf")

    got = token_logprobs(logits, targets)
    assert got.shape == targets.shape and got.dtype == torch.float32
    expected = torch.log_softmax(logits, dim=-1)
    mask = targets != IGNORE_INDEX
    for b, s in mask.nonzero().tolist():
        assert got[b, s] == pytest.approx(float(expected[b, s, targets[b, s]]), abs=1e-6)
    assert torch.isfinite(got).all()
    assert (got[~mask] == 0).all()
    # Summed, the log-probs are minus the loss.
    torch.testing.assert_close(-got.sum(), reference_lm_loss_sum(logits, targets), **TOL)


# ----------------------------------------------------------------------------------------------- memory bound
class _OpCounter(TorchDispatchMode):
    """Records every aten op run below autograd and the largest tensor any of them produced."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.max_numel = max(self.max_numel, item.numel())
        return out

    def count(self, name: str) -> int:
        return self.ops.count(name)


@pytest.mark.parametrize("weight_trainable", [True, False])
def test_chunked_loss_never_builds_tokens_by_vocab(weight_trainable):
    # A head whose vocabulary dominates: full logits would be 1024 x 50000 floats (200 MB); a chunk is 16x less.
    tokens, hidden_size, vocab, chunk = 1024, 16, 50_000, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.1).requires_grad_(weight_trainable)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    with _OpCounter() as ops:
        loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_size=chunk)
        loss.backward()
    assert hidden.grad is not None and (weight.grad is not None) == weight_trainable
    # The largest tensor ever produced is one chunk of logits (the mode saw it, so it was watching).
    assert ops.max_numel == chunk * vocab
    assert ops.max_numel < tokens * vocab
