"""A faster dropout for LoRA adapter inputs on CPU.

PEFT puts an ``nn.Dropout`` in front of every adapter; on CPU, drawing its Bernoulli mask one float at a time
costs about a fifth of a LoRA training step on the 135M default (more under activation checkpointing, which
draws every mask twice). This dropout draws 64 random bits at a time from the global torch generator and reads
them as four 16-bit numbers, so the drop probability is p rounded to a multiple of 1/65536 (0.05 becomes
0.0500031), and scales kept values by 1/(1 - that probability), which keeps the output unbiased. The mask is kept
for backward as booleans (1 byte per element). Because the bits come from the global generator, activation
checkpointing replays the same masks and checkpoints restore them. On GPUs the stock dropout is already fast and
is used unchanged.
"""

from __future__ import annotations

import torch

_LEVELS = 65536


def quantized_probability(p: float) -> float:
    return round(p * _LEVELS) / _LEVELS


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Boolean mask of ``shape``, each element False with probability :func:`quantized_probability` (p)."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    halves = words.view(torch.int16)[:count].view(shape)
    return halves >= round(p * _LEVELS) - _LEVELS // 2


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * mask * scale

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None, None


class FastDropout(torch.nn.Module):
    """Drop-in for ``nn.Dropout(p)`` (see the module docstring for how it differs)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        p = quantized_probability(self.p)
        return _MaskedScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace every ``nn.Dropout`` inside LoRA layers' ``lora_dropout`` containers; returns how many."""
    replaced = 0
    for module in model.modules():
        container = getattr(module, "lora_dropout", None)
        if isinstance(container, torch.nn.ModuleDict):
            for name, layer in container.items():
                if isinstance(layer, torch.nn.Dropout):
                    container[name] = FastDropout(layer.p)
                    replaced += 1
    return replaced


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0 (``nn.Dropout`` and :class:`FastDropout`); returns how many
    modules were changed. The model stays in training mode, so activation checkpointing still applies."""
    changed = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, FastDropout)) and module.p > 0:
            module.p = 0.0
            changed += 1
    return changed
