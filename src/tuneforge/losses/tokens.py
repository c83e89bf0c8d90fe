"""Token-level numerics: the masked next-token loss with a chunked output head, per-token and per-sequence
log-probs gathered from hidden states, and the last real token of each row.

Conventions: ``targets`` are already aligned with the positions that predict them (see
``tuneforge.data.collate.next_token_targets``); positions without a target hold ``IGNORE_INDEX``. Losses return
*sums* over trained tokens, and the training loop divides by the number of trained tokens of the whole
optimiser step, so the step's loss is the mean over all its tokens whatever the batch geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_trained(targets: torch.Tensor) -> int:
    """Number of positions with a target."""
    return int((targets != IGNORE_INDEX).sum())


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token.

    Args:
        logits: (batch, seq, vocab).
        targets: (batch, seq) target ids or ``IGNORE_INDEX``.
    Returns:
        (batch, seq) float32 log p(target); 0 where there is no target.
    """
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # masked_fill, not a product: log p of the placeholder id can be -inf (a masked vocabulary entry), and
    # -inf * 0 is NaN.
    return logprobs.masked_fill(~mask, 0.0)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


def _head_in_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(compute dtype, weight, bias) with the output head cast to the dtype autocast would use for ``hidden``."""
    compute = _compute_dtype(hidden)
    return compute, weight.to(compute), bias.to(compute) if bias is not None else None


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits, h @ w.T + b: (chunk, hidden) -> (chunk, vocab)."""
    logits = h @ w.T
    return logits + b if b is not None else logits


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), computed chunk by chunk over tokens.

    The gradients are formed in the forward pass (d CE / d logits = softmax - onehot), one chunk of logits at a
    time, so the (tokens, vocab) logits never exist in full and nothing is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, grad_enabled):
        compute, w, b = _head_in_compute_dtype(hidden, weight, bias)
        # Grad mode is off inside forward; needs_input_grad says which inputs require grad. It is set even
        # under torch.no_grad, so the caller's grad mode comes in as ``grad_enabled``: evaluation must not pay
        # for gradients (a weight-sized float32 buffer and two extra matmuls per chunk).
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].to(compute)
            t = targets[start:start + chunk_size]
            logits = _project(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight or need_bias:
                # In place: the chunk's logits become d loss / d logits.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = grad_logits.to(compute)
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = (g @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight += (g.T @ h).float()
                if need_bias:
                    grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * grad_output).to(bias_dtype) if grad_bias is not None else None,
                None, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of the output projection, without materialising all logits.

    Args:
        hidden: (tokens, hidden) final hidden states of the positions that have a target.
        weight: (vocab, hidden) output projection (``lm_head.weight``).
        targets: (tokens,) target ids; no ``IGNORE_INDEX`` here (select positions first).
        bias: optional (vocab,) output bias.
        chunk_size: tokens per chunk; peak extra memory is about chunk_size x vocab floats.
    Returns:
        scalar float32 sum of -log p(target).
    """
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_size, torch.is_grad_enabled())


def masked_lm_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, output_layer: torch.nn.Module,
                       chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy over positions with a target.

    Args:
        hidden: (batch, seq, hidden) final hidden states.
        targets: (batch, seq) next-token ids or ``IGNORE_INDEX``.
        output_layer: the model's output head. A plain ``nn.Linear`` takes the chunked path; anything else (a
            LoRA-wrapped head, say) is called as a module on the selected positions.
    Returns:
        scalar float32 sum; divide by the trained-token count of the optimiser step.
    """
    selected = targets != IGNORE_INDEX
    h = hidden[selected]
    t = targets[selected]
    if type(output_layer) is torch.nn.Linear:
        return linear_cross_entropy_sum(h, output_layer.weight, t, output_layer.bias, chunk_size)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, h.shape[0], chunk_size):
        logits = output_layer(h[start:start + chunk_size]).float()
        total = total + F.cross_entropy(logits, t[start:start + chunk_size], reduction="sum")
    return total


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden_i @ weight.T + bias)[target_i] for each selected position, chunk by chunk.

    Preference losses weigh each token's log-prob by a per-sequence factor known only after the forward pass,
    so, unlike the summed cross-entropy, the weight gradient cannot be formed ahead. What can be formed ahead is
    the gradient with respect to the hidden states, d logp_i / d h_i = (onehot_i - softmax_i) @ W, a (tokens,
    hidden) tensor: with a frozen head (LoRA, QLoRA) backward is then one multiply, with no logits kept or
    recomputed. When the head itself trains, backward recomputes each chunk's softmax.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, grad_enabled):
        compute, w, b = _head_in_compute_dtype(hidden, weight, bias)
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].to(compute)
            t = targets[start:start + chunk_size]
            logits = _project(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            logprobs[start:start + chunk_size] = logits.gather(1, t[:, None]).squeeze(1) - lse
            if need_hidden:
                # In place: the chunk's logits become d logp / d logits = onehot - softmax.
                grad_logits = logits.sub_(lse[:, None]).exp_().neg_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] += 1.0
                grad_hidden[start:start + chunk_size] = (grad_logits.to(compute) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden, hidden if (need_weight or need_bias) else None, weight, bias, targets)
        ctx.chunk_size = chunk_size
        ctx.need = (need_hidden, need_weight, need_bias)
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.need
        grad_h = grad_hidden * grad_output[:, None].to(grad_hidden.dtype) if need_hidden else None
        grad_w = grad_b = None
        if need_weight or need_bias:
            compute, w, b = _head_in_compute_dtype(hidden, weight, bias)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                h = hidden[start:start + ctx.chunk_size].to(compute)
                t = targets[start:start + ctx.chunk_size]
                logits = _project(h, w, b)
                # d (g_i logp_i) / d logits_i = g_i (onehot_i - softmax_i)
                grad_logits = torch.softmax(logits.float(), dim=-1).neg_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] += 1.0
                grad_logits *= grad_output[start:start + ctx.chunk_size, None]
                if need_weight:
                    grad_w += (grad_logits.to(compute).T @ h).float()
                if need_bias:
                    grad_b += grad_logits.sum(0)
            grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
            grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Log-probability of each target under the output projection, without materialising all logits.

    Args:
        hidden: (tokens, hidden) final hidden states of the positions that have a target.
        weight: (vocab, hidden) output projection.
        targets: (tokens,) target ids (no ``IGNORE_INDEX``).
        bias: optional (vocab,) output bias.
        chunk_size: tokens per chunk; peak extra memory is about chunk_size x vocab floats.
    Returns:
        (tokens,) float32 log p(target), differentiable with respect to hidden, weight and bias.
    """
    return _LinearTokenLogprobs.apply(hidden, weight, bias, targets, chunk_size, torch.is_grad_enabled())


@dataclass(frozen=True)
class SequenceLogprobs:
    """Per-row response log-probabilities from :func:`sequence_logprobs_from_hidden`.

    sums: (batch,) float32 sum of the response's token log-probs, log pi(y | x).
    counts: (batch,) int64 response tokens per row.
    """

    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        """(batch,) per-token mean log-prob (0 for a row without targets)."""
        return self.sums / self.counts.clamp(min=1)


def sequence_logprobs_from_hidden(hidden: torch.Tensor, targets: torch.Tensor, output_layer: torch.nn.Module,
                                  chunk_size: int = 1024) -> SequenceLogprobs:
    """log pi(y | x) of each row from the decoder's hidden states, projecting only the response positions.

    The same numbers as ``sequence_logprobs(output_layer(hidden), targets)``, without the (batch, seq, vocab)
    logits: prompt and padding positions never reach the output head.

    Args:
        hidden: (batch, seq, hidden) final hidden states.
        targets: (batch, seq) next-token ids or ``IGNORE_INDEX``.
        output_layer: the output head; a plain ``nn.Linear`` takes the chunked path, anything else is called as
            a module on the selected positions.
    Returns:
        :class:`SequenceLogprobs` with (batch,) sums and counts.
    """
    selected = targets != IGNORE_INDEX
    rows = selected.nonzero()[:, 0]
    h = hidden[selected]
    t = targets[selected]
    if type(output_layer) is torch.nn.Linear:
        per_token = linear_token_logprobs(h, output_layer.weight, t, output_layer.bias, chunk_size)
    else:
        pieces = []
        for start in range(0, h.shape[0], chunk_size):
            logits = output_layer(h[start:start + chunk_size]).float()
            pieces.append(torch.log_softmax(logits, dim=-1).gather(1, t[start:start + chunk_size, None]).squeeze(1))
        per_token = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, per_token)
    return SequenceLogprobs(sums, selected.sum(dim=-1))


@torch.no_grad()
def token_entropy_from_hidden(hidden: torch.Tensor, output_layer: torch.nn.Module,
                              chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, H = logsumexp(z) - sum softmax(z) z, in nats.

    A statistic (PPO logs it to show the policy is not collapsing), so no gradient; the output head projects
    ``chunk_size`` positions at a time, so the (positions, vocab) logits never exist in full.

    Args:
        hidden: (positions, hidden) final hidden states of the positions to measure.
        output_layer: the output head (called as a module).
    Returns:
        (positions,) float32.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = output_layer(hidden[start:start + chunk_size]).float()
        log_p = torch.log_softmax(logits, dim=-1)
        pieces.append(-(log_p.exp() * log_p).sum(dim=-1))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def reference_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain full-logits cross-entropy sum; the reference the chunked path is tested against."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for right or left padding.

    Read from the attention mask, never from token ids: when pad == eos (common), searching for the first pad
    would stop at an eos inside the text, or at the real final eos, and with left padding the pads come first.

    Args:
        attention_mask: (batch, seq), nonzero at real tokens.
    Returns:
        (batch,) int64 positions.
    Raises:
        ValueError: a row has no real token.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    last = torch.where(real, positions, -1).amax(dim=1)
    # A sync point, once per batch; an all-padding row would otherwise silently read position -1.
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} have no real token; drop empty sequences before the batch")
    return last


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The entry of ``values`` at each row's last real token (a reward head's score, say).

    Args:
        values: (batch, seq, ...) per-position values.
        attention_mask: (batch, seq), nonzero at real tokens.
    Returns:
        (batch, ...), differentiable with respect to ``values``.
    """
    if values.shape[:2] != attention_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must agree on (batch, seq)")
    index = last_token_index(attention_mask)
    return values[torch.arange(values.shape[0], device=values.device), index]
