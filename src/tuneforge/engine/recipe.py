"""The contract between the trainer (``engine/trainer.py``) and a method's recipe (``recipes/<method>.py``).

The trainer owns the run: setup order, the loop, accumulation, clipping, the non-finite guard, evaluation,
checkpoint and early-stopping schedules, resume and the run directory. A recipe owns what is the method's: its
rows, its batches, its model additions, its loss terms and its validation. A recipe is a plain class (no base
class): it is built as ``Recipe(trainer)`` and keeps the trainer as ``self.run`` to read the config, the model,
the tokenizer, the device and the run's state.

Accumulation: the gradient of an optimiser step is the mean over every unit (trained token, pair, response) of
the step on all ranks. Before the forward passes of a step the trainer asks the recipe for each micro-batch's
``normaliser`` (counted from the batch alone, over all ranks), sums them over the step, and then divides each
micro-batch's ``LossTerms.loss_sum`` by that sum; so neither the split into micro-batches nor the number of
processes changes the update (torchtitan's "local sum / global valid tokens").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class LossTerms:
    """What a recipe's loss returns for one micro-batch (inside the wrapped forward, so DDP / FSDP hooks see it).

    loss_sum: () or (K,) float32: the loss summed over the micro-batch's units, one entry per separately
        normalised term (ORPO: the odds-ratio term over pairs and the NLL over chosen tokens); the step's loss is
        ``sum_k loss_sum[k] / normaliser[k]`` summed over micro-batches, with the normaliser of the whole step.
    stats: named statistics of the micro-batch, each a (2,) tensor ``[sum of values, sum of weights]``; the
        trainer adds them over the step (and its updates) and logs ``sum / weight`` over all ranks.
    """

    loss_sum: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def stat(total: torch.Tensor | float, weight: torch.Tensor | float, device: torch.device | None = None
         ) -> torch.Tensor:
    """A (2,) float64 ``[total, weight]`` statistic entry (see :class:`LossTerms`)."""
    total = torch.as_tensor(total, device=device)
    return torch.stack([total.double().reshape(()),
                        torch.as_tensor(weight, device=total.device).double().reshape(())])


class Update(Protocol):
    """The trainer's optimiser update over a group of micro-batches: forward + backward of each (the loss
    normalised over the group), clip, the non-finite guard, optimiser step. Returns (mean loss over the group
    and all ranks, gradient norm before clipping)."""

    def __call__(self, batches: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]: ...


class Inputs(Protocol):
    """What a method trains on: its rows, read and validated, tokenised and batched. Methods of one data kind
    share one (``recipes/_pairs.PairData`` for pairs, ``recipes/_online.OnlineRL`` for prompts)."""

    def read(self) -> Any:
        """Read and validate every row (no tokenizer yet), so bad data fails before the model loads."""

    def tokenize(self, read: Any) -> Any:
        """Token ids of the rows: an object with ``train``, ``validation`` (lists) and ``reports``."""

    def sequence_shape(self) -> tuple[int, int]:
        """(sequences per micro-batch, longest sequence) of the training data, for the memory estimate."""

    def epoch_batches(self, generator: torch.Generator | None) -> Sequence[Any]:
        """This rank's micro-batches of one epoch; ``generator`` draws the epoch's order (None: file order)."""

    def window_tokens(self, window: Sequence[Any]) -> int:
        """Tokens of the step over all ranks (padding excluded), for throughput."""


class Recipe(Protocol):
    """What the trainer asks of a method; each recipe file implements all of it (see docs/adding_a_method.md).

    ``inputs`` is what it trains on (:class:`Inputs`); the methods below are what it does with them."""

    inputs: Inputs

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Called once the model is built, before it is wrapped for DDP / FSDP and before any checkpoint is loaded
        (so it is whole and still the starting model): a reference copy, a value head, a reward scorer."""

    def normaliser(self, batch: Any) -> float | Sequence[float] | torch.Tensor:
        """What the micro-batch's ``loss_sum`` is summed over, on all ranks (one number per term)."""

    def loss_terms(self, model: torch.nn.Module, batch: Any) -> LossTerms:
        """The loss terms of one micro-batch on ``model`` (the unwrapped model; the trainer runs this inside the
        wrapped forward)."""

    def train_step(self, window: Sequence[Any], update: Update) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over ``window`` (``train.grad_accum`` micro-batches): usually ``update(window)``;
        online methods sample first and update several times. Returns (loss, grad norm) as tensors."""

    def evaluate(self) -> dict[str, float] | None:
        """Validation metrics (``val_*``) of the current model, the same on every rank; None without
        validation data."""

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """The step's logged numbers besides loss, lr and grad norm, from ``means`` (each statistic's sum /
        weight over the step and all ranks)."""

    def save_model(self, save: Callable[[], None]) -> None:
        """Write the trained model into the run directory: ``save()`` writes what every causal LM run holds;
        a recipe with more trained state (PPO's value head) writes it around that call."""
