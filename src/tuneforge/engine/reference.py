"""The reference model of the methods that compare the policy with where it started (DPO, KTO, GRPO, PPO).

With LoRA the reference is the policy with its adapter switched off: the same weights, no second copy (a LoRA
run the policy starts from has been folded into the base, see ``engine.build``). With full fine-tuning it is a
frozen copy of the starting weights, made before training (and before anything is added to the model, such as
PPO's value head). Methods that precompute the reference's log-probs before training ask for no copy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch


class Reference:
    """Where the reference's forward passes run.

    Args:
        model: the starting model (before any checkpoint is loaded and before DDP / FSDP wraps it).
        lora: the run trains a LoRA adapter (the reference is the model with it off).
        keep_copy: with full fine-tuning, keep a frozen copy (False when the reference log-probs are
            precomputed: the model itself is still the reference while they are computed).
    """

    def __init__(self, model: torch.nn.Module, lora: bool, keep_copy: bool = True):
        self.lora = lora
        self.copy: torch.nn.Module | None = None
        if not lora and keep_copy:
            self.copy = copy.deepcopy(model).requires_grad_(False).eval()

    @contextlib.contextmanager
    def model(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module to run the reference with, without gradients: the frozen copy, the policy with its adapter
        disabled, or (precomputing with full fine-tuning) the policy itself, which is still the start."""
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
            elif self.lora:
                with policy.disable_adapter():
                    yield policy
            else:
                yield policy
