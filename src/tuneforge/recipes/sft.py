"""Supervised fine-tuning: learn the assistant responses of instruction data, with LoRA or full fine-tuning.

The loop, top to bottom: for each optimiser step, count the trained tokens of all its micro-batches (on all
ranks), run forward + backward on each micro-batch with its loss *sum* divided by that count (so the step's
gradient is the mean over every trained token, whatever the batch geometry or number of processes), check the
loss and gradient norm are finite, clip, step, schedule, log; evaluate, checkpoint and stop early on schedule.
"""

from __future__ import annotations

import json
import dataclasses
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tuneforge.config import GENERATION_METRICS, GENERATION_PREFIX, DataConfig, RunConfig, save_config
from tuneforge.data.collate import Batch
from tuneforge.data.dataset import EpochBatches, make_batches
from tuneforge.data.memory import InMemoryRows
from tuneforge.data.prepare import read_data, tokenize_data
from tuneforge.data.streaming import StreamBatches
from tuneforge.data.templates import load_template
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.distributed import (barrier, full_state, gather_optimizer_state, init_distributed, is_sharded,
                                          load_sharded_optimizer, load_sharded_weights, no_sync, reshard,
                                          to_float, wrap_model)
from tuneforge.engine.early_stopping import overfitting_start, record_evaluation, should_stop
from tuneforge.engine.lock import RunLock, lock_run_dir
from tuneforge.engine.metrics import MetricsLog, is_log_step
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.engine.plots import plot_runs
from tuneforge.engine.preflight import check_before_run
from tuneforge.engine.rundir import check_run_dir, prepare_run_dir, save_run
from tuneforge.engine.signals import StopRequest
from tuneforge.engine.step import (autocast, bf16_autocast_enabled, lm_loss_sum, loss_and_perplexity, move,
                                   summed_eval_loss)
from tuneforge.errors import ConfigError, DataError, UserError, option
from tuneforge.eval.evaluate import answer_metrics, check_patterns, generation_metrics
from tuneforge.eval.environment import environment, peak_memory
from tuneforge.eval.functions import RewardFunctions, load_callable
from tuneforge.eval.heldout import HeldoutRow, read_heldout
from tuneforge.inference import Generation, Generator
from tuneforge.models.adapters import add_lora, causal_lm, decoder_and_head, prepare_quantized
from tuneforge.models.card import write_run_card
from tuneforge.models.dropout import use_fast_dropout
from tuneforge.models.memory import GB, device_memory_bytes, recomputed_layers, shape_from_config
from tuneforge.models.memory import estimate as estimate_memory
from tuneforge.models.loading import Quantization, load_model, load_tokenizer, resolve_model


class NonFiniteLossError(UserError):
    """A NaN or infinite loss or gradient norm; the run stops without saving."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_checkpointed_layers(model: torch.nn.Module, fraction: float) -> str:
    """Keep activation checkpointing on for ``fraction`` of the decoder layers (``models.memory.recomputed_layers``
    picks them) and switch it off on the others; returns "k of n".

    transformers checks each layer's own ``gradient_checkpointing`` flag at call time, so turning it off on a
    layer makes that layer keep its activations, exactly as without checkpointing.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer, recompute in zip(layers, recomputed_layers(len(layers), fraction)):
        if not recompute:
            layer.gradient_checkpointing = False
    return f"{sum(bool(layer.gradient_checkpointing) for layer in layers)} of {len(layers)}"


def check_compile_backend(device: torch.device) -> None:
    """Raise a :class:`ConfigError` when ``train.compile`` cannot work here. On CPU, torch.compile's backend
    (inductor) writes and builds C++ kernels; without a compiler the first step would fail deep in a traceback."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor import cpp_builder, exc
    except ImportError:  # inductor's internals moved: look for the compiler it uses by default
        found = shutil.which(os.environ.get("CXX", "g++")) is not None
    else:
        try:
            cpp_builder.get_cpp_compiler()
            found = True
        except exc.InvalidCxxCompiler:
            found = False
    if not found:
        raise ConfigError("train.compile: torch.compile on CPU builds C++ kernels and needs a C++ compiler (g++, or "
                          "the one $CXX names), and none was found; install one (e.g. apt-get install g++) or set "
                          "train.compile=false")


def compile_decoder(model: torch.nn.Module) -> None:
    """Compile the decoder body of ``model`` in place (``train.compile``).

    The body (embeddings and decoder layers, returning (batch, seq, hidden)) is what every loss calls
    (``engine.step.lm_loss_sum``); the chunked output head and loss stay eager (a python loop over a number of
    chunks that changes with every batch). ``nn.Module.compile`` compiles in place, so parameter names, state
    dicts, checkpoints and the saved adapter are unchanged and DDP wraps the model as before. ``dynamic=True``
    makes batch size and sequence length symbolic, so a batch of another shape reuses the compiled code; a new
    graph is compiled only for what changes the code: eval mode, a packed (batch, 1, seq, seq) mask, a batch of
    one row, generation with a KV cache.
    """
    body, _ = decoder_and_head(model)
    body.compile(dynamic=True)


def optimizer_windows(batches: Sequence[Batch], grad_accum: int) -> Iterator[list[Batch]]:
    """Micro-batches grouped by optimiser step (collated as they are reached); the last group may be shorter."""
    for start in range(0, len(batches), grad_accum):
        yield batches[start:start + grad_accum]


class SFTRecipe:
    """setup -> train -> save. Each stage is a plain method so tests and the bench can drive them.

    Args:
        config: the validated run config.
        overwrite: replace an existing run directory.
        log: where progress messages go (rank 0 only).
        show_progress: tqdm bar; None means "when stderr is a terminal".
        run_dir: write a run directory (False for the bench and some tests).
        resume: resume from the newest complete checkpoint of the run directory (True) or from the given one.
        force: resume even when the config changes what is trained.
    """

    # The kind of model the method trains: a causal LM (``lm``) or a scalar-head reward model (``reward``).
    model_head = "lm"
    lora_task_type = "CAUSAL_LM"
    # Methods with a reference model (the starting model) set this: a LoRA run to start from is folded into the
    # base, so the model with its (fresh) adapter off is the reference. SFT goes on training the run's adapter.
    reference_is_start = False

    def __init__(self, config: RunConfig, overwrite: bool = False, log=print, show_progress: bool | None = None,
                 run_dir: bool = True, resume: bool | str = False, force: bool = False):
        self.config = config
        self.overwrite = overwrite
        self.show_progress = show_progress
        self.write_run_dir = run_dir
        self.resume = resume
        self.force = force
        self.run_dir: Path | None = None
        self.run_lock: RunLock | None = None  # rank 0's lock on the run directory, from setup to the run's end
        self.history: list[dict] = []
        self.state = ckpt.TrainState()
        self._saved_steps: set[int] = set()  # checkpoints this process wrote (not those of an earlier run)
        self._clock_start = time.perf_counter()
        self._losses_since_eval: list[torch.Tensor] = []  # device scalars, read at log and eval steps
        # The first non-finite step as a device tensor (step, loss, grad norm); step 0 = none so far.
        self._non_finite: torch.Tensor | None = None
        self._log = log
        self.generation_rows: list[HeldoutRow] = []  # eval.generation_data's prompts (read in setup)
        self.generation_functions: RewardFunctions | None = None  # its user metrics, keyed by function name

    def log(self, message: str) -> None:
        if self.dist.is_main:
            self._log(message)

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        config = self.config
        self.dist = init_distributed(config.distributed)
        output = Path(config.train.output_dir)
        check_before_run(config, self.write_run_dir)  # loggers, output path: before anything is written or loaded
        self.run_lock = lock_run_dir(output, self.dist, self.log) if self.write_run_dir else None
        resume_from = None
        branching = False  # resuming from another run's checkpoint into a new run directory
        if self.resume:
            resume_from = ckpt.choose_resume_checkpoint(output, self.resume, config, self.dist, self.force, self.log,
                                                        recover=self.write_run_dir)
            branching = resume_from.parent.resolve() != (output / ckpt.CHECKPOINTS).resolve()
        if self.write_run_dir and (resume_from is None or branching):
            check_run_dir(output, self.overwrite, self.log)  # fail in a second, before data and model are loaded
        seed_everything(config.train.seed)
        # Data first: every row is validated before the model is even looked up.
        read = self._read_data()
        self._read_generation_data()
        source = resolve_model(config.model.name_or_path)
        self.tokenizer = load_tokenizer(source)
        self.template = load_template(config.data.template, self.tokenizer)
        self.data = self._tokenize_data(read)
        for report in self.data.reports:
            for line in report.lines():
                self.log(line)

        self.device = self.dist.device
        self._log_memory_estimate(source)
        self.bf16 = bf16_autocast_enabled(config.train.mixed_precision, self.device)
        self.model = self._build_model(source)
        self._before_wrap()
        self.wrapped = wrap_model(self.model, self._loss_sum, self.dist, config.distributed)

        self.state.world_size = self.dist.world_size
        # The data order is owned by this generator, seeded from the run's seed (the same on every rank).
        self.data_generator = torch.Generator().manual_seed(config.train.seed)
        self.total_steps = config.train.max_steps or self._planned_steps()
        self.optimizer = build_optimizer(self.model, config.train)
        self.scheduler = build_scheduler(self.optimizer, config.train, self.total_steps)
        if resume_from is not None:
            sharded = {}
            if is_sharded(self.dist, config.distributed):
                sharded = {"load_weights": self._load_weights,
                           "load_optimizer": lambda state: load_sharded_optimizer(self.wrapped, self.optimizer, state)}
            self.state = ckpt.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler, **sharded)
            self.data_generator.set_state(torch.tensor(self.state.epoch_generator_state, dtype=torch.uint8))
            self.state.world_size = self.dist.world_size
            self.log(f"resumed from {resume_from} at step {self.state.step} (epoch {self.state.epoch}, "
                     f"step {self.state.epoch_position} of it)")
        if self.write_run_dir:
            if resume_from is not None and not branching:
                self.run_dir = output
                if self.dist.is_main:
                    # Checkpoints after the one resumed belong to an abandoned continuation: set them aside so
                    # neither a later --resume nor eval.final=best picks them up.
                    for path in ckpt.set_aside_later_checkpoints(output, self.state.step):
                        self.log(f"set aside {path.name}: it is later than the checkpoint resumed")
            elif self.dist.is_main:
                self.run_dir = prepare_run_dir(output, self.overwrite)
                # The resolved config goes in first: it documents the run while it trains, and it marks the
                # folder as tuneforge's, so a run that stops early can still be replaced with --overwrite.
                save_config(config, self.run_dir / "config.yaml")
                (self.run_dir / "data_report.json").write_text(
                    json.dumps([r.to_dict() for r in self.data.reports], indent=2))
            else:
                self.run_dir = output
        barrier(self.dist)

    # Hooks a method's recipe overrides: where its rows come from, how they batch, what its loss is.
    def _read_data(self):
        """Read and validate every row (no tokenizer needed), so bad data fails before the model loads."""
        return read_data(self.config)

    def _tokenize_data(self, read):
        return tokenize_data(read, self.config, self.tokenizer, self.template)

    def _read_generation_data(self) -> None:
        """Read ``eval.generation_data`` (its first ``eval.generation_rows`` prompts) and import the user metrics,
        so a bad file, row or metric fails before the model loads; sets ``generation_rows``."""
        evaluation = self.config.eval
        path = evaluation.generation_data
        if not path:
            return
        if not isinstance(path, InMemoryRows) and not Path(path).exists():
            raise ConfigError(f"eval.generation_data: file {path} does not exist")
        rows = read_heldout(path, DataConfig(train=path, system_prompt=self.config.data.system_prompt)).rows
        rows = rows[:evaluation.generation_rows]
        if not rows:
            raise DataError(path, None, None, "no prompt to answer (rows need a prompt, or a user message before "
                            "an assistant one)", "no_prompts")
        check_patterns(rows)
        # The metrics these rows can give (a reference metric needs a row with a reference, regex_match a row with
        # a pattern): generation_metrics' own rule, applied to empty answers.
        available = generation_metrics(rows, [Generation("", False, 0)] * len(rows), set(GENERATION_METRICS))
        for name in evaluation.generation_metrics:
            if name in GENERATION_METRICS and name not in available:
                need = "a 'pattern' field" if name == "regex_match" else "a reference response"
                raise DataError(path, None, None, f"eval.generation_metrics: {name} needs rows with {need}, and none "
                                f"of the first {len(rows)} rows has one; drop {name} or use other rows", "no_reference")
        users = {key[len(GENERATION_PREFIX):]: load_callable(spec)
                 for key, spec in evaluation.generation_keys().items() if ":" in spec}
        self.generation_functions = RewardFunctions(users) if users else None
        self.generation_rows = rows
        self.log(f"generation evaluation: {len(rows)} prompts of {path}, up to {evaluation.max_new_tokens} new "
                 f"tokens, greedy; {', '.join(evaluation.generation_keys())}")

    def _before_wrap(self) -> None:
        """Called once the model is built, before it is wrapped for DDP / FSDP (so it is whole on every rank) and
        before the optimiser and any checkpoint are loaded (so it is still the starting model)."""

    def _sequence_shape(self) -> tuple[int, int]:
        """(sequences per micro-batch, longest sequence) of the training data, for the memory estimate."""
        longest = max((len(e.input_ids) for e in self.data.train), default=self.config.data.max_length)
        if self.config.data.packing:
            longest = self.config.data.max_length
        return self.config.train.batch_size, longest

    def _window_tokens(self, window: list) -> int:
        """Tokens (padding excluded) of an optimiser step over all ranks, for throughput."""
        return sum(batch.global_tokens for batch in window)

    def _step_metrics(self) -> dict:
        """Extra numbers of the last optimiser step to log besides loss, lr and gradient norm."""
        return {}

    def _build_model(self, source) -> torch.nn.Module:
        config = self.config
        if config.train.compile:
            check_compile_backend(self.device)  # before loading: a missing compiler fails in a second
        if self.reference_is_start and source.adapter is not None and config.lora.enabled:
            # Starting from a LoRA run (typically the SFT stage): that run's model is the reference, so its adapter
            # is folded into the base and a fresh adapter trains on top; "adapter off" is then exactly the start.
            source = dataclasses.replace(source, merged_adapters=source.merged_adapters + [source.adapter],
                                         adapter=None)
        # The config, not a run the model starts from, decides the quantization of the base being trained.
        quantization = Quantization.from_model_config(config.model)
        source = dataclasses.replace(source, quantization=quantization)
        model = load_model(source, config.model.dtype, config.model.attn_implementation,
                           trainable_adapter=config.lora.enabled, device=self.device, head=self.model_head)
        if quantization is not None:
            # Before the adapters: freezes the base, upcasts norms and embeddings to float32 (PEFT's QLoRA recipe).
            model = prepare_quantized(model, config.train.gradient_checkpointing)
        if source.adapter is not None and not config.lora.enabled:
            # Full fine-tuning from a LoRA run: fold the adapter into the weights, then train all of them.
            model = model.merge_and_unload()
        if source.adapter is None and config.lora.enabled:
            model = add_lora(model, config.lora, task_type=self.lora_task_type)
        elif not config.lora.enabled:
            model.requires_grad_(True)
        if config.lora.enabled:
            use_fast_dropout(model)  # PEFT's per-adapter nn.Dropout is a fifth of a CPU step; see models/dropout.py
        model.to(self.device)
        if config.train.gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
            lm = causal_lm(model)
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.train.gradient_checkpointing:
            checkpointed = select_checkpointed_layers(model, config.train.checkpoint_fraction)
            if config.train.checkpoint_fraction < 1:
                self.log(f"activation checkpointing: {checkpointed} decoder layers recompute, the others keep "
                         "their activations")
        # Dropout lives in the adapters; the base model has none to switch on.
        model.train()
        if config.train.compile:
            compile_decoder(model)
            self.log("train.compile: the decoder compiles on the first training batch (and again on the first "
                     "evaluation, in eval mode); those steps are slower")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        mode = f"LoRA r={config.lora.r}" if config.lora.enabled else "full fine-tuning"
        if quantization is not None:
            mode = f"QLoRA r={config.lora.r}, base {quantization.describe()}"
        ranks = f", {self.dist.world_size} processes ({config.distributed.strategy})" if self.dist.enabled else ""
        self.log(f"model {config.model.name_or_path}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M "
                 f"trainable ({mode}), device {self.device}{', bf16 autocast' if self.bf16 else ''}{ranks}")
        return model

    def _log_memory_estimate(self, source) -> None:
        """Print `tuneforge estimate`'s figure for this run before loading the model, and warn when it exceeds
        the device's memory (RAM on CPU). Skipped when the model's config.json is not on disk (a hub id)."""
        config = self.config
        config_file = Path(source.base) / "config.json"
        if not config_file.is_file():
            return
        shape = shape_from_config(json.loads(config_file.read_text()), config.model.name_or_path)
        method = "full" if not config.lora.enabled else "qlora" if config.model.load_in == "4bit" else "lora"
        rows, longest = self._sequence_shape()
        result = estimate_memory(shape, method, seq_len=longest, batch=rows, lora_r=config.lora.r,
                                 grad_checkpointing=config.train.gradient_checkpointing,
                                 checkpoint_fraction=config.train.checkpoint_fraction,
                                 world_size=self.dist.world_size, fsdp=config.distributed.strategy == "fsdp",
                                 dtype=config.model.compute_dtype if method == "qlora" else config.model.dtype,
                                 loss_chunk=config.train.loss_chunk_size, lora_dropout=config.lora.dropout > 0,
                                 device="cpu" if self.device.type == "cpu" else "cuda")
        available = device_memory_bytes(self.device)
        self.log(f"memory estimate ({method}, longest batch {rows} x {longest} tokens): "
                 f"{result.total / GB:.2f} GB per process (weights {result.weights / GB:.2f}, activations "
                 f"{result.activations / GB:.2f}, optimiser {(result.optimizer + result.adapters) / GB:.2f}); "
                 f"device has {available / GB:.1f} GB")
        if result.total > available:
            self.log(f"warning: the estimate ({result.total / GB:.1f} GB) exceeds the {available / GB:.1f} GB of "
                     f"{self.device}; consider train.gradient_checkpointing, a smaller train.batch_size or "
                     "data.max_length, LoRA, or model.load_in=4bit (see tuneforge estimate)")

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if is_sharded(self.dist, self.config.distributed):
            load_sharded_weights(self.wrapped, weights)
        else:
            ckpt.load_trainable(self.model, weights)

    def _loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with autocast(self.device, self.bf16):
            return lm_loss_sum(model, batch, self.config.train.loss_chunk_size)

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
        if self.config.data.streaming:  # rows read, validated and tokenised as the loop reaches them
            return StreamBatches(self.config, self.tokenizer, self.template, self.state, self.data.reports[0],
                                 self.dist.rank, self.dist.world_size)
        generator = (generator or self.data_generator) if shuffle and self.config.data.shuffle else None
        return make_batches(self.data.train, self.config.train.batch_size, self.tokenizer.pad_token_id,
                            packing=self.config.data.packing, max_length=self.config.data.max_length,
                            generator=generator, rank=self.dist.rank, world_size=self.dist.world_size,
                            group_by_length=self.config.data.group_by_length)

    # ----------------------------------------------------------------------------------------------- train
    def compute_gradients(self, window: list[Batch]) -> torch.Tensor:
        """Forward + backward over the micro-batches of ``window``, accumulating into ``.grad``.

        Each micro-batch's loss *sum* is divided by the trained-token count of the whole window on all ranks
        (not its own), and multiplied by the world size because DDP / FSDP average gradients over ranks: the
        accumulated gradient is the mean over every trained token of the step. Returns this rank's share of
        that mean loss as a tensor (no host sync).
        """
        trained = sum(batch.global_trained for batch in window)  # host-side count, same on every rank
        if trained == 0:
            raise RuntimeError("an optimiser step with no trained tokens")  # impossible: rows without any are dropped
        scale = self.dist.world_size / trained
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        for index, batch in enumerate(window):
            with no_sync(self.wrapped, skip=index < len(window) - 1):
                loss_sum = self.wrapped(move(batch, self.device))
                (loss_sum * scale).backward()
            loss_total += loss_sum.detach()
        return loss_total / trained

    def train_step(self, window: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over ``window``; returns (mean loss over all ranks, grad norm).

        A NaN or infinite loss or gradient norm stops the run without saving (``check_non_finite``): on CPU before
        the optimiser step; on an accelerator at the next log step, checkpoint or evaluation, so that the step has
        no host-device sync. No checkpoint ever contains it.
        """
        loss, grad_norm = self.apply_gradients(self.compute_gradients(window))
        self.scheduler.step()
        return loss, grad_norm

    def apply_gradients(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average ``loss`` over ranks, clip the accumulated gradients, check both are finite, step the optimiser
        and clear the gradients (not the scheduler: online RL updates several times per step). Returns (mean
        loss over all ranks, grad norm before clipping)."""
        if self.dist.enabled:
            dist.all_reduce(loss)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.train.max_grad_norm if self.config.train.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self._record_non_finite(loss, grad_norm)
        if self.check_every_step:
            self.check_non_finite()  # CPU ops are synchronous: reading the flag costs nothing there
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    @property
    def check_every_step(self) -> bool:
        """Whether the non-finite guard reads its flag every step (CPU) or only where the loop syncs anyway."""
        return self.device.type == "cpu"

    @torch.no_grad()
    def _record_non_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Keep (step, loss, grad norm) of the first step whose loss or gradient norm is not finite, on the device,
        without reading anything back."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; its full value is a collective, not a host read
            grad_norm = grad_norm.full_tensor()
        if self._non_finite is None:
            self._non_finite = torch.zeros(3, dtype=torch.float64, device=loss.device)
        record = torch.stack([torch.full((), self.state.step + 1, dtype=torch.float64, device=loss.device),
                              loss.detach().double(), grad_norm.detach().double()])
        first = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self._non_finite[0] == 0)
        self._non_finite = torch.where(first, record, self._non_finite)

    def check_non_finite(self) -> None:
        """Raise ``NonFiniteLossError`` naming the first step whose loss or gradient norm was NaN or infinite (one
        host read). Called before every log record, evaluation and checkpoint, so none of them shows such a step."""
        if self._non_finite is None:
            return
        step, loss, grad_norm = self._non_finite.tolist()
        if step:
            self.optimizer.zero_grad(set_to_none=True)
            name, number = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
            raise NonFiniteLossError(f"step {int(step)}: the {name} is {number}; stopping without saving (lower "
                                     "train.lr, or check the data)")

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean loss over every trained token of the validation rows (sharded over ranks) and its perplexity."""
        if not self.data.validation:
            return None
        batches = make_batches(self.data.validation, self.config.train.batch_size, self.tokenizer.pad_token_id,
                               rank=self.dist.rank, world_size=self.dist.world_size)
        total, tokens = summed_eval_loss(self.model, self.wrapped, batches, self.device)
        reshard(self.wrapped)
        if self.dist.enabled:
            dist.all_reduce(total)
        loss, perplexity = loss_and_perplexity(float(total), tokens)
        return {"val_loss": loss, "val_perplexity": perplexity}

    def train(self) -> dict:
        """Run until the planned steps are done, early stopping triggers, or a signal asks to stop."""
        config, state = self.config, self.state
        metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir and self.dist.is_main else None,
                             self.total_steps, self.show_progress if self.dist.is_main else False,
                             echo=self.log, loggers=config.log.loggers if self.dist.is_main else [],
                             run_dir=self.run_dir, project=config.log.project, config=config.to_dict())
        metrics.start_at(state.step)
        self._clock_start = time.perf_counter() - state.elapsed_s
        with StopRequest() as stop:
            try:
                # A run resumed from its final checkpoint has nothing left to train.
                stop_reason = self._planned_end() if state.step >= self.total_steps else None
                if state.step == 0 and config.eval.at_start:
                    self._evaluate_baseline(metrics)
                while stop_reason is None:
                    stop_reason = self._train_epoch(metrics, stop)
                if stop_reason != "interrupted" and not self._evaluated_at_this_step():
                    self._evaluate_and_track(metrics)
                self._checkpoint()
                state.elapsed_s = time.perf_counter() - self._clock_start
            finally:
                metrics.close()
        if stop_reason == "interrupted":
            self.log(f"stopped by {stop.requested} at step {state.step}; checkpoint saved. Resume with: "
                     f"{option('resume_command')}")
        return self._summary(stop_reason, stop.requested)

    def _train_epoch(self, metrics: MetricsLog, stop: StopRequest) -> str | None:
        """Train the rest of the current epoch; returns why the run stops, or None to go on with the next."""
        config, state = self.config, self.state
        if state.epoch_position == 0:
            state.epoch_generator_state = self.data_generator.get_state().tolist()
        batches = self._epoch_batches(shuffle=True)  # draws this epoch's order from the generator
        windows = list(optimizer_windows(range(len(batches)), config.train.grad_accum))
        interval_tokens, interval_start = 0, time.perf_counter()
        for indices in windows[state.epoch_position:]:
            window = [batches[i] for i in indices]
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains with
            loss, grad_norm = self.train_step(window)
            state.step += 1
            state.epoch_position += 1
            step_tokens = self._window_tokens(window)
            state.tokens += step_tokens
            interval_tokens += step_tokens
            self._losses_since_eval.append(loss.detach())
            metrics.advance()
            if is_log_step(state.step, config.train.log_every, self.total_steps):
                # The only host reads of the step's numbers happen here, at log steps.
                self.check_non_finite()
                now = time.perf_counter()
                record = {"step": state.step, "epoch": state.epoch, "loss": to_float(loss), "lr": lr,
                          "grad_norm": to_float(grad_norm), "tokens": state.tokens,
                          "tokens_per_s": interval_tokens / max(now - interval_start, 1e-9),
                          "elapsed_s": now - self._clock_start, **self._step_metrics()}
                interval_tokens, interval_start = 0, now
                self.history.append(record)
                metrics.log(record)
            epoch_done = state.epoch_position == len(windows)
            if epoch_done:
                # The generator has drawn this epoch's order: its state now is where the next epoch starts.
                state.epoch += 1
                state.epoch_position = 0
                state.epoch_generator_state = self.data_generator.get_state().tolist()
            reason = None
            if epoch_done or (config.eval.every and state.step % config.eval.every == 0):
                reason = self._evaluate_and_track(metrics)
            if config.save.every and state.step % config.save.every == 0:
                self._checkpoint()
            if reason is None and (state.step >= self.total_steps
                                   or (epoch_done and not config.train.max_steps
                                       and state.epoch >= config.train.epochs)):
                reason = self._planned_end()
            if reason is None and self._stop_requested(stop):
                reason = "interrupted"
            if reason is not None:
                return reason
        return None

    def _planned_end(self) -> str:
        return "max_steps" if self.config.train.max_steps else "completed"

    def _evaluated_at_this_step(self) -> bool:
        return bool(self.state.evaluations) and self.state.evaluations[-1]["step"] == self.state.step

    def _stop_requested(self, stop: StopRequest) -> bool:
        """A signal on any rank stops every rank at the same step. One process reads its own flag; several agree
        at log steps (and the last step), so the other steps have no collective and no host sync."""
        if not self.dist.enabled:
            return stop.requested is not None
        if not is_log_step(self.state.step, self.config.train.log_every, self.total_steps):
            return False
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    @torch.no_grad()
    def evaluate_generation(self) -> dict[str, float]:
        """Greedy answers of the current model (adapter on, eval mode) to ``generation_rows``, each rank answering
        its share, and their metrics as ``val_gen_<name>``; every rank computes them on all the answers, so all
        agree (early stopping must stop every rank at the same step)."""
        evaluation, world = self.config.eval, self.dist.world_size
        rows = self.generation_rows
        prompts = [row.prompt for row in rows[self.dist.rank::world]]
        generator = Generator(self.model, self.tokenizer, self.template, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(self.device, self.bf16):
                answers = generator.generate_responses(prompts, evaluation.max_new_tokens,
                                                       batch_size=self.config.train.batch_size, progress="answers")
        finally:
            self.model.train(was_training)
        if self.dist.enabled:
            shares: list = [None] * world
            dist.all_gather_object(shares, answers)
            answers = [None] * len(rows)
            for rank, share in enumerate(shares):
                answers[rank::world] = share
        result = answer_metrics(rows, answers, set(evaluation.generation_metrics), self.generation_functions,
                                self.template)
        return {GENERATION_PREFIX + name: value for name, value in result.items()}

    def _evaluation(self) -> dict | None:
        """The method's validation metrics (:meth:`evaluate`) and, with ``eval.generation_data``, the generation
        metrics in the same record; None when the run has nothing to evaluate on."""
        result = self.evaluate() or {}
        if self.generation_rows:
            result.update(self.evaluate_generation())
        return result or None

    def _evaluate_baseline(self, metrics: MetricsLog) -> None:
        """The starting model's validation metrics, logged as step 0 (no best-checkpoint or early-stopping
        bookkeeping: the run is measured against it, it is not a candidate)."""
        result = self._evaluation()
        if result is not None:
            record = {"step": 0, **result}
            self.history.append(record)
            metrics.log(record)

    def _evaluate_and_track(self, metrics: MetricsLog) -> str | None:
        """Evaluate, log, update the best checkpoint and the early-stopping state; returns a stop reason."""
        self.check_non_finite()
        result = self._evaluation()
        if result is None:
            self._losses_since_eval.clear()  # nothing to average them for
            return None
        state = self.state
        losses = torch.stack(self._losses_since_eval).tolist() if self._losses_since_eval else []
        train_loss = sum(losses) / len(losses) if losses else None
        self._losses_since_eval.clear()
        record = {"step": state.step, **result}
        self.history.append(record)
        metrics.log(record)
        if record_evaluation(state, self.config.eval, result, train_loss):
            self._checkpoint()  # keep the weights of every new best
        start = overfitting_start(state.evaluations)
        if start is not None and state.overfitting_from_step is None:
            state.overfitting_from_step = start
            self.log(f"warning: validation loss has risen while training loss fell since step {start}: the model "
                     "is overfitting; fewer epochs or early stopping (eval.patience) would help")
        if should_stop(state, self.config.eval):
            self.log(f"early stopping at step {state.step}: no improvement of {self.config.eval.metric} for "
                     f"{self.config.eval.patience} evaluations (best {state.best_metric:.4f} at step {state.best_step})")
            return "early_stopping"
        return None

    def _checkpoint(self) -> None:
        """Save a checkpoint of the current step (every rank joins: gathering sharded weights is collective)."""
        self.check_non_finite()
        if self.run_dir is None:
            return
        state = self.state
        if state.step in self._saved_steps:
            return
        state.elapsed_s = time.perf_counter() - self._clock_start
        weights = full_state(self.model)
        optimizer_state = None
        if is_sharded(self.dist, self.config.distributed):
            optimizer_state = gather_optimizer_state(self.wrapped, self.optimizer)
        if self.dist.is_main:
            ckpt.save_checkpoint(self.run_dir, state, self.model, self.optimizer, self.scheduler, self.config,
                                 weights=weights, optimizer_state=optimizer_state)
            ckpt.prune_checkpoints(self.run_dir, self.config.save.keep_last, state.best_step)
        self._saved_steps.add(state.step)
        barrier(self.dist)

    def _summary(self, stop_reason: str | None, signal_name: str | None) -> dict:
        state = self.state
        last_loss = next((r["loss"] for r in reversed(self.history) if "loss" in r), None)
        summary = {"steps": state.step, "epochs": state.epoch, "tokens": state.tokens, "elapsed_s": state.elapsed_s,
                   "stop_reason": stop_reason, "train_loss": last_loss,
                   "best_step": state.best_step, "best_metric": state.best_metric, "metric": self.config.eval.metric,
                   "overfitting_from_step": state.overfitting_from_step}
        if signal_name:
            summary["signal"] = signal_name
        last_eval = state.evaluations[-1] if state.evaluations else None
        if last_eval is not None:
            summary.update({key: value for key, value in last_eval.items() if key.startswith("val_")})
        # What the run cost and ran on, for `tuneforge report` (eval.environment).
        summary.update(peak_memory(self.device), environment=environment(self.device))
        return summary

    # ------------------------------------------------------------------------------------------------ save
    def save(self, summary: dict | None = None) -> Path | None:
        """Write the final model (the best checkpoint's weights when ``eval.final`` is ``best``), summary.json
        and curves.png. Every rank calls it; only rank 0 writes."""
        self.check_non_finite()
        if self.run_dir is None:
            return None
        state = self.state
        final_step = state.step
        if self.config.eval.final == "best" and state.best_step is not None and state.best_step != state.step:
            best = ckpt.checkpoint_dir(self.run_dir, state.best_step)
            from safetensors.torch import load_file

            self._load_weights(load_file(str(best / "weights.safetensors")))
            final_step = state.best_step
        weights = full_state(self.model) \
            if is_sharded(self.dist, self.config.distributed) else None
        if self.dist.is_main:
            self._save_model(weights)
            if summary is not None:
                summary = {**summary, "final_step": final_step, "run_dir": str(self.run_dir)}
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                (self.run_dir / "data_report.json").write_text(  # a stream's counts are complete only now
                    json.dumps([r.to_dict() for r in self.data.reports], indent=2))
                plot_runs([self.run_dir], self.run_dir / "curves.png")
                write_run_card(self.run_dir)  # again, now with the summary's results
        barrier(self.dist)
        return self.run_dir


    def _save_model(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Write the trained model (adapter or full weights), tokenizer, template and config into the run dir."""
        save_run(self.run_dir, self.config, self.model, self.tokenizer, self.template, self.config.lora.enabled,
                 state_dict=weights)


def run_recipe_class(recipe_class: type, config: RunConfig, overwrite: bool = False, log=print,
                     resume: bool | str = False, force: bool = False, show_progress: bool | None = None) -> dict:
    """setup, train, and save unless interrupted; returns the run's summary. The lock is released on any exit."""
    recipe = recipe_class(config, overwrite=overwrite, log=log, resume=resume, force=force,
                          show_progress=show_progress)
    try:
        recipe.setup()
        summary = recipe.train()
        if summary["stop_reason"] != "interrupted":
            recipe.save(summary)
    finally:
        if recipe.run_lock is not None:
            recipe.run_lock.release()
    summary["run_dir"] = str(recipe.run_dir)
    return summary


def run_sft(config: RunConfig, overwrite: bool = False, log=print, resume: bool | str = False,
            force: bool = False) -> dict:
    return run_recipe_class(SFTRecipe, config, overwrite=overwrite, log=log, resume=resume, force=force)
