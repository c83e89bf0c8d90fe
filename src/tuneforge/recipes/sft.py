"""Supervised fine-tuning: learn the assistant responses of instruction data, with LoRA or full fine-tuning.

The loop, top to bottom: for each optimiser step, count the trained tokens of all its micro-batches, run
forward + backward on each micro-batch with its loss *sum* divided by that count (so the step's gradient is the
mean over every trained token, whatever the batch geometry), clip, step, schedule, log.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tuneforge.config import RunConfig, save_config
from tuneforge.data.collate import Batch
from tuneforge.data.dataset import (DataReport, EpochBatches, load_conversations, make_batches, split_validation,
                                    tokenize_conversations)
from tuneforge.data.formats import Conversation
from tuneforge.data.templates import load_template
from tuneforge.data.tokenize import Example
from tuneforge.engine.metrics import MetricsLog
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.engine.rundir import check_run_dir, prepare_run_dir, save_run
from tuneforge.engine.step import autocast, bf16_autocast_enabled, evaluate_loss, lm_loss_sum, move, pick_device
from tuneforge.errors import UserError
from tuneforge.models.adapters import add_lora, causal_lm
from tuneforge.models.loading import load_model, load_tokenizer, resolve_model


class NonFiniteLossError(UserError):
    """A NaN or infinite loss or gradient norm; the run stops without saving."""


@dataclass
class ReadData:
    """Validated conversations, before tokenisation; ``reports[1]`` (when present) belongs to ``validation``."""

    train: list[Conversation]
    validation: list[Conversation]
    reports: list[DataReport]


@dataclass
class PreparedData:
    """Tokenised train and validation examples with their reports."""

    train: list[Example]
    validation: list[Example]
    reports: list[DataReport] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_data(config: RunConfig) -> ReadData:
    """Read and validate every row of the train (and validation) file, and hold out ``data.val_fraction``.

    Needs no tokenizer, so bad data is reported before any model is resolved or loaded.
    """
    data = config.data
    train_report = DataReport()
    conversations = load_conversations(data.train, data, train_report)
    if data.validation:
        validation_report = DataReport()
        validation = load_conversations(data.validation, data, validation_report)
        return ReadData(conversations, validation, [train_report, validation_report])
    if data.val_fraction > 0:
        conversations, validation = split_validation(conversations, data.val_fraction, config.train.seed)
        # Each report accounts for its own rows: rows = kept + dropped.
        train_report.rows -= len(validation)
        held_out = DataReport(path=f"{data.train} (held-out {data.val_fraction:g})", rows=len(validation))
        return ReadData(conversations, validation, [train_report, held_out])
    return ReadData(conversations, [], [train_report])


def tokenize_data(read: ReadData, config: RunConfig, tokenizer, template) -> PreparedData:
    """Tokenise the conversations of :func:`read_data` with ``template``, counting into its reports."""
    train = tokenize_conversations(read.train, template, tokenizer, config.data, read.reports[0])
    validation = []
    if read.validation:
        validation = tokenize_conversations(read.validation, template, tokenizer, config.data, read.reports[1])
    return PreparedData(train, validation, read.reports)


def prepare_data(config: RunConfig, tokenizer, template) -> PreparedData:
    """Read, validate, split and tokenise the train (and validation) data."""
    return tokenize_data(read_data(config), config, tokenizer, template)


def optimizer_windows(batches: Sequence[Batch], grad_accum: int) -> Iterator[list[Batch]]:
    """Micro-batches grouped by optimiser step (collated as they are reached); the last group may be shorter."""
    for start in range(0, len(batches), grad_accum):
        yield batches[start:start + grad_accum]


class SFTRecipe:
    """setup -> train -> save. Each stage is a plain method so tests and the bench can drive them."""

    def __init__(self, config: RunConfig, overwrite: bool = False, log=print, show_progress: bool | None = None,
                 run_dir: bool = True):
        self.config = config
        self.overwrite = overwrite
        self.log = log
        self.show_progress = show_progress
        self.write_run_dir = run_dir
        self.run_dir: Path | None = None
        self.history: list[dict] = []

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        config = self.config
        output = Path(config.train.output_dir)
        if self.write_run_dir:
            check_run_dir(output, self.overwrite)  # fail in a second, before data and model are loaded
        seed_everything(config.train.seed)
        # Data first: every row is validated before the model is even looked up, so bad data fails in seconds
        # and is not hidden behind a model error.
        read = read_data(config)
        source = resolve_model(config.model.name_or_path)
        self.tokenizer = load_tokenizer(source)
        self.template = load_template(config.data.template, self.tokenizer)
        self.data = tokenize_data(read, config, self.tokenizer, self.template)
        for report in self.data.reports:
            for line in report.lines():
                self.log(line)

        self.device = pick_device()
        self.bf16 = bf16_autocast_enabled(config.train.mixed_precision, self.device)
        model = load_model(source, config.model.dtype, config.model.attn_implementation,
                           trainable_adapter=config.lora.enabled)
        if source.adapter is not None and not config.lora.enabled:
            # Full fine-tuning from a LoRA run: fold the adapter into the weights, then train all of them (a
            # frozen PeftModel would leave nothing to train).
            model = model.merge_and_unload()
        if source.adapter is None and config.lora.enabled:
            model = add_lora(model, config.lora)
        elif not config.lora.enabled:
            model.requires_grad_(True)
        model.to(self.device)
        if config.train.gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
            causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Dropout lives in the adapters; the base model has none to switch on.
        model.train()
        self.model = model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.log(f"model {config.model.name_or_path}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
                 f"({'LoRA r=%d' % config.lora.r if config.lora.enabled else 'full fine-tuning'}), device {self.device}"
                 f"{', bf16 autocast' if self.bf16 else ''}")

        # The data order is owned by this generator, seeded from the run's seed.
        self.data_generator = torch.Generator().manual_seed(config.train.seed)
        self.total_steps = config.train.max_steps or self._planned_steps()
        self.optimizer = build_optimizer(model, config.train)
        self.scheduler = build_scheduler(self.optimizer, config.train, self.total_steps)
        self.validation_batches = make_batches(self.data.validation, config.train.batch_size,
                                               self.tokenizer.pad_token_id) if self.data.validation else []
        if self.write_run_dir:
            self.run_dir = prepare_run_dir(output, self.overwrite)
            # The resolved config goes in first: it documents the run while it trains, and it marks the folder
            # as tuneforge's, so a run that stops early (NaN, Ctrl-C) can still be replaced with --overwrite.
            save_config(config, self.run_dir / "config.yaml")
            (self.run_dir / "data_report.json").write_text(
                json.dumps([r.to_dict() for r in self.data.reports], indent=2))

    def _planned_steps(self) -> int:
        """Optimiser steps of ``train.epochs`` epochs.

        Rows are packed after shuffling, so the number of packs can change from epoch to epoch; each epoch is
        planned with a copy of the data generator (grouping only, no tensors are built).
        """
        train = self.config.train
        generator = torch.Generator()
        generator.set_state(self.data_generator.get_state())
        steps = 0
        for _ in range(train.epochs):
            batches = self._epoch_batches(shuffle=True, generator=generator)
            steps += math.ceil(len(batches) / train.grad_accum)
        return steps

    def _epoch_batches(self, shuffle: bool, generator: torch.Generator | None = None) -> EpochBatches:
        generator = (generator or self.data_generator) if shuffle and self.config.data.shuffle else None
        return make_batches(self.data.train, self.config.train.batch_size, self.tokenizer.pad_token_id,
                            packing=self.config.data.packing, max_length=self.config.data.max_length,
                            generator=generator)

    # ----------------------------------------------------------------------------------------------- train
    def compute_gradients(self, window: list[Batch]) -> torch.Tensor:
        """Forward + backward over the micro-batches of ``window``, accumulating into ``.grad``.

        Each micro-batch's loss *sum* is divided by the trained-token count of the whole window (not its own),
        so the accumulated gradient is the mean over every trained token of the step, whatever the batch
        geometry. Returns that mean loss as a tensor (no host sync).
        """
        config = self.config.train
        trained = sum(batch.num_trained for batch in window)  # host-side count: no sync
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in window:
            with autocast(self.device, self.bf16):
                loss_sum = lm_loss_sum(self.model, move(batch, self.device), config.loss_chunk_size)
            (loss_sum / trained).backward()
            loss_total += loss_sum.detach()
        return loss_total / trained

    def train_step(self, window: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over the micro-batches of ``window``; returns (loss, grad_norm) as tensors, so the
        caller decides when to pay for a host sync."""
        config = self.config.train
        loss = self.compute_gradients(window)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def evaluate(self) -> dict | None:
        if not self.validation_batches:
            return None
        return evaluate_loss(self.model, self.validation_batches, self.device, self.config.train.loss_chunk_size,
                             self.bf16)

    def train(self) -> dict:
        config = self.config.train
        metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir else None, self.total_steps,
                             self.show_progress)
        step, tokens, start = 0, 0, time.perf_counter()
        interval_tokens, interval_start = 0, start
        epoch = 0
        done = False
        try:
            while not done:
                for window in optimizer_windows(self._epoch_batches(shuffle=True), config.grad_accum):
                    # The rate this step trains with; after train_step the scheduler already shows the next one.
                    lr = self.scheduler.get_last_lr()[0]
                    loss, grad_norm = self.train_step(window)
                    step += 1
                    window_tokens = sum(batch.num_tokens for batch in window)
                    tokens += window_tokens
                    interval_tokens += window_tokens
                    metrics.advance()
                    if step % config.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                                  "grad_norm": grad_norm.item(), "tokens": tokens,
                                  "tokens_per_s": interval_tokens / max(now - interval_start, 1e-9),
                                  "elapsed_s": now - start}
                        for name in ("loss", "grad_norm"):
                            if not math.isfinite(record[name]):
                                raise NonFiniteLossError(f"step {step}: {name} is {record[name]}; stopping without "
                                                         "saving (lower train.lr or check the data)")
                        interval_tokens, interval_start = 0, now
                        self.history.append(record)
                        metrics.log(record)
                    if config.eval_every and step % config.eval_every == 0 and step != self.total_steps:
                        result = self.evaluate()
                        if result is not None:
                            record = {"step": step, "val_loss": result["loss"], "val_perplexity": result["perplexity"]}
                            self.history.append(record)
                            metrics.log(record)
                    if step >= self.total_steps:
                        done = True
                        break
                epoch += 1
                if epoch >= config.epochs and not config.max_steps:
                    done = True
            summary = {"steps": step, "epochs": epoch, "tokens": tokens, "elapsed_s": time.perf_counter() - start,
                       "train_loss": self.history[-1]["loss"] if self.history else None}
            result = self.evaluate()
            if result is not None:
                summary.update(val_loss=result["loss"], val_perplexity=result["perplexity"])
                metrics.log({"step": step, "val_loss": result["loss"], "val_perplexity": result["perplexity"]})
        finally:
            metrics.close()
        return summary

    # ------------------------------------------------------------------------------------------------ save
    def save(self) -> Path | None:
        if self.run_dir is None:
            return None
        save_run(self.run_dir, self.config, self.model, self.tokenizer, self.template, self.config.lora.enabled)
        return self.run_dir


def run_sft(config: RunConfig, overwrite: bool = False, log=print) -> dict:
    recipe = SFTRecipe(config, overwrite=overwrite, log=log)
    recipe.setup()
    summary = recipe.train()
    run_dir = recipe.save()
    summary["run_dir"] = str(run_dir)
    return summary
