"""Distillation numerics: the generalised Jensen-Shannon divergence between a teacher's and a student's next-token
distributions (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes"), from hidden states, with both output heads applied a chunk of positions at a time.

For the teacher's distribution p and the student's q at one position, both at temperature T (``softmax(z / T)``),
and ``beta`` in [0, 1], the paper's generalised JSD is

    M = beta p + (1 - beta) q
    JSD_beta(p || q) = beta KL(p || M) + (1 - beta) KL(q || M)

As TRL's ``GKDTrainer.generalized_jsd_loss`` does, the two ends are the limits the paper names rather than the
formula's value there (which is 0): ``beta = 0`` is the forward KL(p || q) (mean-seeking, what supervised KD
minimises) and ``beta = 1`` the reverse KL(q || p) (mode-seeking). Each position's divergence is summed over the
vocabulary; the losses here return the *sum over positions*, which the recipe returns as its loss sum and the
trainer divides by the response tokens of the whole optimiser step.

Memory: the (positions, vocab) logits of the two models never exist at once, nor do those of one model in full.
The student's gradient with respect to its logits has a closed form (below), so, as ``tokens.linear_cross_entropy_sum``
does for the next-token loss, it is formed during the forward pass one chunk at a time and nothing is recomputed
in backward. With u = z_s / T, r_i = log q_i - log M_i and the unit upstream gradient:

    beta = 0:        dL/du = q - p
    0 < beta < 1:    dL/du_i = (1 - beta) q_i (r_i - sum_j q_j r_j)
    beta = 1:        dL/du_i = q_i (r_i - sum_j q_j r_j)  with M = p
    dL/dz_s = dL/du / T
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from tuneforge.losses.tokens import _head_in_compute_dtype, _project

@dataclass(frozen=True)
class ChunkDivergence:
    """Per-position divergences of one chunk, each (chunk,) float32: ``jsd`` (JSD_beta, the loss),
    ``forward_kl`` KL(p || q) and ``reverse_kl`` KL(q || p); ``grad`` (chunk, vocab) d jsd / d (student logits / T)
    when asked for, else None."""

    jsd: torch.Tensor
    forward_kl: torch.Tensor
    reverse_kl: torch.Tensor
    grad: torch.Tensor | None = None


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row of (chunk, vocab) log-probabilities; entries where a is 0 add nothing (not 0 * inf)."""
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(log_a > -math.inf, terms, 0.0).sum(dim=-1)


def chunk_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                     temperature: float = 1.0, with_grad: bool = False) -> ChunkDivergence:
    """JSD_beta, forward and reverse KL of the teacher's and the student's distributions at each position.

    Args:
        student_logits, teacher_logits: (chunk, vocab) logits (any float dtype; computed in float32).
        beta: interpolation in [0, 1] (see the module docstring for the ends).
        temperature: T > 0; both distributions are softmax(z / T).
        with_grad: also return d jsd / d (student_logits / T) (multiply by 1 / T for the logits themselves).
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    forward_kl, reverse_kl = _kl(log_p, log_q), _kl(log_q, log_p)
    grad = None
    if beta == 0:
        jsd = forward_kl
        if with_grad:
            grad = log_q.exp() - log_p.exp()
    elif beta == 1:
        jsd = reverse_kl
        if with_grad:
            grad = log_q.exp() * (log_q - log_p - reverse_kl[:, None])
    else:
        # log M = log(beta p + (1 - beta) q), without forming p and q side by side in one (2, chunk, vocab) stack.
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        student_to_m = _kl(log_q, log_m)
        jsd = beta * _kl(log_p, log_m) + (1 - beta) * student_to_m
        if with_grad:
            grad = (1 - beta) * log_q.exp() * (log_q - log_m - student_to_m[:, None])
    return ChunkDivergence(jsd, forward_kl, reverse_kl, grad)


class _LinearGeneralizedJSD(torch.autograd.Function):
    """sum_i JSD_beta(teacher_i || softmax((hidden_i @ weight.T + bias) / T)), chunk by chunk over positions.

    The teacher's logits of positions [start, end) come from ``teacher_logits(start, end)`` (no gradient), so both
    models' logits exist for one chunk at a time; the gradients with respect to the student's hidden states, weight
    and bias are formed in the forward pass (see the module docstring) and scaled by the upstream gradient in
    backward. Also returns the per-position JSD, forward KL and reverse KL (no gradient), (positions,) each.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, beta, temperature, chunk_size, grad_enabled):
        compute, w, b = _head_in_compute_dtype(hidden, weight, bias)
        # needs_input_grad is set even under torch.no_grad, so the caller's grad mode comes in as ``grad_enabled``.
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        need_any = need_hidden or need_weight or need_bias
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        positions = hidden.shape[0]
        jsd, forward_kl, reverse_kl = (torch.zeros(positions, dtype=torch.float32, device=hidden.device)
                                       for _ in range(3))
        for start in range(0, positions, chunk_size):
            end = min(start + chunk_size, positions)
            h = hidden[start:end].to(compute)
            chunk = chunk_divergence(_project(h, w, b), teacher_logits(start, end), beta, temperature, need_any)
            jsd[start:end], forward_kl[start:end], reverse_kl[start:end] = chunk.jsd, chunk.forward_kl, chunk.reverse_kl
            if need_any:
                g = chunk.grad.div_(temperature).to(compute)  # d / d logits = d / du * du / dz
                if need_hidden:
                    grad_hidden[start:end] = (g @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight += (g.T @ h).float()
                if need_bias:
                    grad_bias += g.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(jsd, forward_kl, reverse_kl)
        return jsd.sum(), jsd, forward_kl, reverse_kl

    @staticmethod
    def backward(ctx, grad_total, *_):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_total).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * grad_total).to(bias_dtype) if grad_bias is not None else None,
                None, None, None, None, None)


@dataclass(frozen=True)
class Distillation:
    """What :func:`generalized_jsd_from_hidden` returns.

    loss_sum: () float32 sum of JSD_beta over the positions, differentiable with respect to the student.
    jsd, forward_kl, reverse_kl: (positions,) float32 per-position JSD_beta, KL(p || q) and KL(q || p), no gradient.
    """

    loss_sum: torch.Tensor
    jsd: torch.Tensor
    forward_kl: torch.Tensor
    reverse_kl: torch.Tensor


def generalized_jsd_from_hidden(student_hidden: torch.Tensor, student_head: torch.nn.Module,
                                teacher_hidden: torch.Tensor, teacher_head: torch.nn.Module, beta: float,
                                temperature: float = 1.0, chunk_size: int = 1024,
                                vocab_size: int | None = None) -> Distillation:
    """The generalised JSD of the teacher's and the student's next-token distributions at the given positions.

    Args:
        student_hidden: (positions, hidden) the student's final hidden states at the positions to distil (those
            that predict a response token), differentiable.
        student_head: the student's output head; a plain ``nn.Linear`` takes the path whose gradient is formed in
            the forward pass; anything else (a LoRA-wrapped head) runs each chunk under activation checkpointing,
            so backward recomputes one chunk's logits at a time.
        teacher_hidden: (positions, teacher hidden) the teacher's final hidden states at the same positions (its
            hidden size may differ from the student's; its vocabulary may not).
        teacher_head: the teacher's output head (called as a module, without gradient).
        beta: interpolation in [0, 1]: 0 forward KL(p || q), 1 reverse KL(q || p).
        temperature: T > 0; both distributions are softmax(logits / T).
        chunk_size: positions per chunk; peak extra memory is a few chunk_size x vocab floats.
        vocab_size: compare the first ``vocab_size`` logits of both heads only (the shared tokenizer's ids, when
            a head has padding rows beyond them); None: all of them (the heads must then have the same size).
    Returns:
        :class:`Distillation`: the summed loss and per-position divergences.
    """
    def teacher_logits(start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            return teacher_head(teacher_hidden[start:end])[:, :vocab_size]

    if type(student_head) is torch.nn.Linear:
        # A slice of the weight is a view: its gradient lands in the head's rows it covers.
        weight = student_head.weight[:vocab_size]
        bias = student_head.bias[:vocab_size] if student_head.bias is not None else None
        total, jsd, forward_kl, reverse_kl = _LinearGeneralizedJSD.apply(
            student_hidden, weight, bias, teacher_logits, beta, temperature, chunk_size, torch.is_grad_enabled())
        return Distillation(total, jsd, forward_kl, reverse_kl)
    return _checkpointed(student_hidden, lambda h: student_head(h)[:, :vocab_size], teacher_logits, beta,
                         temperature, chunk_size)


def _checkpointed(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], teacher_logits: Callable[[int, int], torch.Tensor],
                  beta: float, temperature: float, chunk_size: int) -> Distillation:
    """:func:`generalized_jsd_from_hidden` for any head module: each chunk's JSD through autograd, checkpointed so
    only the chunk's hidden states are kept for backward (which recomputes both models' logits of that chunk)."""
    def chunk(h: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = chunk_divergence(head(h), teacher_logits(start, end), beta, temperature)
        return out.jsd, out.forward_kl.detach(), out.reverse_kl.detach()

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    pieces: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:end]
        if torch.is_grad_enabled():
            jsd, forward_kl, reverse_kl = checkpoint(chunk, h, start, end, use_reentrant=False)
        else:
            jsd, forward_kl, reverse_kl = chunk(h, start, end)
        total = total + jsd.sum()
        pieces.append((jsd.detach(), forward_kl, reverse_kl))
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return Distillation(total, empty, empty, empty)
    jsd, forward_kl, reverse_kl = (torch.cat(column) for column in zip(*pieces))
    return Distillation(total, jsd, forward_kl, reverse_kl)
