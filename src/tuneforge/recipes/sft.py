"""Supervised fine-tuning: learn the assistant responses of instruction data, with LoRA or full fine-tuning.

The loss is the summed next-token loss over the trained (response) tokens of a micro-batch; the trainer divides
it by the trained tokens of the whole optimiser step on all ranks, so the gradient is the mean over every
trained token, whatever the batch geometry, packing or number of processes. Validation reports that mean loss
on the validation rows and its perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tuneforge.data.collate import Batch
from tuneforge.data.dataset import EpochBatches, make_batches
from tuneforge.data.prepare import read_data, tokenize_data
from tuneforge.data.streaming import StreamBatches
from tuneforge.engine.recipe import LossTerms
from tuneforge.engine.step import autocast, lm_loss_sum
from tuneforge.recipes.registry import MethodSpec, register

register(MethodSpec(
    name="sft", recipe="tuneforge.recipes.sft:SFTRecipe",
    summary="supervised fine-tuning on the assistant responses of conversations (instruction tuning)",
    data="rows", packing=True, streaming=True, train_on_prompt=True, kernels=True))


class SFTRecipe:
    """``method: sft``. See the module docstring; the loop is :class:`tuneforge.engine.trainer.Trainer`'s."""

    def __init__(self, run):
        self.run = run
        self.inputs = self  # conversations, tokenised with labels, batched (padded or packed)

    # ----------------------------------------------------------------------------------------------- data
    def read(self):
        return read_data(self.run.config)

    def tokenize(self, read):
        return tokenize_data(read, self.run.config, self.run.tokenizer, self.run.template)

    def sequence_shape(self) -> tuple[int, int]:
        config = self.run.config
        longest = max((len(e.input_ids) for e in self.run.data.train), default=config.data.max_length)
        if config.data.packing:
            longest = config.data.max_length
        return config.train.batch_size, longest

    def epoch_batches(self, generator: torch.Generator | None) -> EpochBatches:
        run, config = self.run, self.run.config
        if config.data.streaming:  # rows read, validated and tokenised as the loop reaches them
            return StreamBatches(config, run.tokenizer, run.template, run.state, run.data.reports[0],
                                 run.dist.rank, run.dist.world_size)
        return make_batches(run.data.train, config.train.batch_size, run.tokenizer.pad_token_id,
                            packing=config.data.packing, max_length=config.data.max_length, generator=generator,
                            rank=run.dist.rank, world_size=run.dist.world_size,
                            group_by_length=config.data.group_by_length)

    def window_tokens(self, window: Sequence[Batch]) -> int:
        return sum(batch.global_tokens for batch in window)

    # ----------------------------------------------------------------------------------------------- model
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Nothing to add: SFT trains the model (or its adapter) as it is."""

    # ------------------------------------------------------------------------------------------------ loss
    def normaliser(self, batch: Batch) -> int:
        """The micro-batch's trained tokens on all ranks."""
        return batch.global_trained

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        with autocast(self.run.device, self.run.bf16):
            return LossTerms(lm_loss_sum(model, batch, self.run.config.train.loss_chunk_size))

    def train_step(self, window: Sequence[Batch], update) -> tuple[torch.Tensor, torch.Tensor]:
        return update(window)

    def step_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return means

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict | None:
        """Mean loss over every trained token of the validation rows (sharded over ranks) and its perplexity."""
        run = self.run
        if not run.data.validation:
            return None
        batches = make_batches(run.data.validation, run.config.train.batch_size, run.tokenizer.pad_token_id,
                               rank=run.dist.rank, world_size=run.dist.world_size)
        result = run.validation_loss(batches)
        return {**result, "val_perplexity": math.exp(min(result["val_loss"], 50.0))}

    def save_model(self, save: Callable[[], None]) -> None:
        save()
