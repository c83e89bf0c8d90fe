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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tuneforge.config import RunConfig
from tuneforge.data.collate import Batch
from tuneforge.data.dataset import (DataReport, load_conversations, make_batches, split_validation,
                                    tokenize_conversations)
from tuneforge.data.templates import load_template
from tuneforge.data.tokenize import Example
from tuneforge.engine.metrics import MetricsLog
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.engine.rundir import prepare_run_dir, save_run
from tuneforge.engine.step import autocast, bf16_autocast_enabled, evaluate_loss, lm_loss_sum, move, pick_device
from tuneforge.errors import UserError
from tuneforge.models.adapters import add_lora
from tuneforge.models.loading import load_model, load_tokenizer, resolve_model


class NonFiniteLossError(UserError):
    """A NaN or infinite loss or gradient norm; the run stops without saving."""


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


def prepare_data(config: RunConfig, tokenizer, template) -> PreparedData:
    """Read, validate, split and tokenise the train (and validation) data."""
    data = config.data
    train_report = DataReport()
    conversations = load_conversations(data.train, data, train_report)
    validation_conversations = []
    reports = [train_report]
    if data.validation:
        validation_report = DataReport()
        validation_conversations = load_conversations(data.validation, data, validation_report)
        reports.append(validation_report)
    elif data.val_fraction > 0:
        conversations, validation_conversations = split_validation(conversations, data.val_fraction, config.train.seed)
    train = tokenize_conversations(conversations, template, tokenizer, data, train_report)
    validation = []
    if validation_conversations:
        report = reports[1] if data.validation else DataReport(path=f"{data.train} (held-out {data.val_fraction:g})")
        validation = tokenize_conversations(validation_conversations, template, tokenizer, data, report)
        if not data.validation:
            report.rows = len(validation_conversations)
            reports.append(report)
    return PreparedData(train, validation, reports)


def optimizer_windows(batches: list[Batch], grad_accum: int) -> list[list[Batch]]:
    """Micro-batches grouped by optimiser step; the last group may be shorter."""
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


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
        if self.write_run_dir and output.exists() and any(output.iterdir()) and not self.overwrite:
            raise UserError(f"run directory {output} already exists; choose another train.output_dir or pass "
                            "--overwrite to replace it")
        seed_everything(config.train.seed)
        # Data first: every row is validated before the model is loaded.
        source = resolve_model(config.model.name_or_path)
        self.tokenizer = load_tokenizer(source)
        self.template = load_template(config.data.template, self.tokenizer)
        self.data = prepare_data(config, self.tokenizer, self.template)
        for report in self.data.reports:
            for line in report.lines():
                self.log(line)

        self.device = pick_device()
        self.bf16 = bf16_autocast_enabled(config.train.mixed_precision, self.device)
        model = load_model(source, config.model.dtype, config.model.attn_implementation,
                           trainable_adapter=config.lora.enabled)
        if source.adapter is None and config.lora.enabled:
            model = add_lora(model, config.lora)
        elif source.adapter is None:
            model.requires_grad_(True)
        model.to(self.device)
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
        batches_per_epoch = len(self._epoch_batches(shuffle=False))
        steps_per_epoch = math.ceil(batches_per_epoch / config.train.grad_accum)
        self.total_steps = config.train.max_steps or steps_per_epoch * config.train.epochs
        self.optimizer = build_optimizer(model, config.train)
        self.scheduler = build_scheduler(self.optimizer, config.train, self.total_steps)
        self.validation_batches = make_batches(self.data.validation, config.train.batch_size,
                                               self.tokenizer.pad_token_id) if self.data.validation else []
        if self.write_run_dir:
            self.run_dir = prepare_run_dir(output, self.overwrite)
            (self.run_dir / "data_report.json").write_text(
                json.dumps([r.to_dict() for r in self.data.reports], indent=2))

    def _epoch_batches(self, shuffle: bool) -> list[Batch]:
        generator = self.data_generator if shuffle and self.config.data.shuffle else None
        return make_batches(self.data.train, self.config.train.batch_size, self.tokenizer.pad_token_id,
                            packing=self.config.data.packing, max_length=self.config.data.max_length,
                            generator=generator)

    # ----------------------------------------------------------------------------------------------- train
    def train_step(self, window: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over the micro-batches of ``window``; returns (loss, grad_norm) as tensors, so the
        caller decides when to pay for a host sync."""
        config = self.config.train
        trained = sum(batch.num_trained for batch in window)  # host-side count: no sync
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in window:
            with autocast(self.device, self.bf16):
                loss_sum = lm_loss_sum(self.model, move(batch, self.device), config.loss_chunk_size)
            (loss_sum / trained).backward()
            loss_total += loss_sum.detach()
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total / trained, grad_norm

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
                    loss, grad_norm = self.train_step(window)
                    step += 1
                    window_tokens = sum(batch.num_tokens for batch in window)
                    tokens += window_tokens
                    interval_tokens += window_tokens
                    metrics.advance()
                    if step % config.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": self.scheduler.get_last_lr()[0],
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
