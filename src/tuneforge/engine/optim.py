"""AdamW with decay only on matrices, and warmup + constant / linear / cosine schedules."""

from __future__ import annotations

import math
import warnings

import torch

from tuneforge.config import TrainConfig
from tuneforge.errors import UserError


# bitsandbytes optimisers by train.optimizer name: 8-bit states (2 bytes/param instead of 8) and, on CUDA, paged
# states that spill to host memory instead of failing on a memory spike.
BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "paged_adamw": "PagedAdamW"}


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (``train.optimizer``) over trainable parameters; biases and norm weights (1-D) get no weight decay."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer in BNB_OPTIMIZERS:
        try:
            import bitsandbytes
        except ImportError:
            raise UserError(f"train.optimizer={config.optimizer} needs bitsandbytes: pip install 'tuneforge[qlora]'"
                            ) from None
        cls = getattr(bitsandbytes.optim, BNB_OPTIMIZERS[config.optimizer])
        with warnings.catch_warnings():
            # On CPU, bitsandbytes notes that paging falls back to plain states; the run is still correct.
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            return cls(groups, lr=config.lr, betas=tuple(config.betas))
    # foreach is the fast multi-tensor path on CPU and GPU.
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), foreach=True)


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    return int(math.ceil(config.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimiser ``step`` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over ``warmup`` steps, then constant, linear decay to 0, or cosine
    decay to 0 at ``total_steps``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(1.0, progress)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    warmup = warmup_steps(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.scheduler))
