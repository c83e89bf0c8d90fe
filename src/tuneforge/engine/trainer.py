"""The one training loop every method runs; a method's recipe (``recipes/<method>.py``) supplies its data, its
model additions and its loss terms (the contract: ``engine/recipe.py``).

Setup, in order, so that what can fail cheaply fails first: distributed init; loggers and the output path; the
run-directory lock; the checkpoint to resume; every data row read and validated; the tokenizer and template;
the memory estimate; the model (with the method's head, adapters, checkpointing); the recipe's model additions
(reference, value head); DDP / FSDP; optimiser and schedule; the checkpoint loaded; the run directory written.

The loop, top to bottom: for each optimiser step, the recipe's ``train_step`` runs one or more updates. An update
counts the units (trained tokens, pairs, responses) of all its micro-batches on all ranks, runs forward + backward
on each micro-batch with its loss *sum* divided by that count (so the step's gradient is the mean over every unit,
whatever the batch geometry or number of processes), checks the loss and gradient norm are finite, clips and
steps. Then the schedule, the log record, and on their schedules evaluation (with the best checkpoint and early
stopping), checkpoints and the stop on a signal.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tuneforge.config import RunConfig, save_config
from tuneforge.data.templates import load_template
from tuneforge.engine import checkpoint as ckpt
from tuneforge.engine.build import build_model, log_memory_estimate, seed_everything
from tuneforge.engine.distributed import (barrier, full_state, gather_optimizer_state, init_distributed, is_sharded,
                                          load_sharded_optimizer, load_sharded_weights, no_sync, reshard,
                                          to_float, wrap_model)
from tuneforge.engine.early_stopping import overfitting_start, record_evaluation, should_stop
from tuneforge.engine.lock import RunLock, lock_run_dir
from tuneforge.engine.metrics import MetricsLog, StepStats, is_log_step
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.engine.plots import plot_runs
from tuneforge.engine.preflight import check_before_run
from tuneforge.engine.recipe import LossTerms, Recipe
from tuneforge.engine.rundir import check_run_dir, prepare_run_dir, save_run
from tuneforge.engine.signals import StopRequest
from tuneforge.engine.step import bf16_autocast_enabled, move
from tuneforge.errors import UserError, option
from tuneforge.eval.during_training import GenerationEvaluation
from tuneforge.eval.environment import environment, peak_memory
from tuneforge.models.card import write_run_card
from tuneforge.models.loading import load_tokenizer, resolve_model
from tuneforge.progress import progress
from tuneforge.recipes import registry

TRAINER_READY = True  # (helpers poll for this line while the redesign lands)


class NonFiniteLossError(UserError):
    """A NaN or infinite loss or gradient norm; the run stops without saving."""


def optimizer_windows(batches: Sequence, grad_accum: int) -> Iterator[Sequence]:
    """Micro-batches grouped by optimiser step (collated as they are reached); the last group may be shorter."""
    for start in range(0, len(batches), grad_accum):
        yield batches[start:start + grad_accum]


def _sum_normalisers(values: list) -> Any:
    """The sum of micro-batch normalisers: numbers, tuples of numbers (one per loss term) or device tensors."""
    if isinstance(values[0], (tuple, list)):
        return tuple(sum(parts) for parts in zip(*values))
    return sum(values[1:], values[0])


class Trainer:
    """setup -> train -> save, for the method ``config.method`` names. Each stage is a plain method so tests and
    the bench can drive them.

    Args:
        config: the validated run config.
        overwrite: replace an existing run directory.
        log: where progress messages go (rank 0 only).
        show_progress: tqdm bar; None means "when stderr is a terminal".
        run_dir: write a run directory (False for the bench and some tests).
        resume: resume from the newest complete checkpoint of the run directory (True) or from the given one.
        force: resume even when the config changes what is trained.
    """

    def __init__(self, config: RunConfig, overwrite: bool = False, log=print, show_progress: bool | None = None,
                 run_dir: bool = True, resume: bool | str = False, force: bool = False):
        self.config = config
        self.spec = registry.get(config.method)
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
        # The first non-finite update as a device tensor (step, loss, grad norm); step 0 = none so far.
        self._non_finite: torch.Tensor | None = None
        self._log = log
        self.generation: GenerationEvaluation | None = None  # eval.generation_data (read in setup)
        self.recipe: Recipe = self.spec.recipe_class()(self)

    def log(self, message: str) -> None:
        if self.dist.is_main:
            self._log(message)

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        config = self.config
        self.dist = init_distributed(config.distributed)
        self.device = self.dist.device
        self.stats = StepStats(self.device)
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
        read = self.recipe.inputs.read()
        self.generation = GenerationEvaluation.read(config.eval, config.data.system_prompt, self.log)
        source = resolve_model(config.model.name_or_path)
        self.tokenizer = load_tokenizer(source)
        self.template = load_template(config.data.template, self.tokenizer)
        self.data = self.recipe.inputs.tokenize(read)
        for report in self.data.reports:
            for line in report.lines():
                self.log(line)

        log_memory_estimate(config, source, self.recipe.inputs.sequence_shape(), self.dist, self.log)
        self.bf16 = bf16_autocast_enabled(config.train.mixed_precision, self.device)
        self.model = build_model(config, self.spec, source, self.dist, self.log)
        self.recipe.prepare_model(self.model)
        self.wrapped = wrap_model(self.model, self.recipe.loss_terms, self.dist, config.distributed)

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
            self._open_run_dir(output, resume_from is not None and not branching)
        barrier(self.dist)

    def _open_run_dir(self, output: Path, resuming_in_place: bool) -> None:
        if resuming_in_place:
            self.run_dir = output
            if self.dist.is_main:
                # Checkpoints after the one resumed belong to an abandoned continuation: set them aside so neither
                # a later --resume nor eval.final=best picks them up.
                for path in ckpt.set_aside_later_checkpoints(output, self.state.step):
                    self.log(f"set aside {path.name}: it is later than the checkpoint resumed")
        elif self.dist.is_main:
            self.run_dir = prepare_run_dir(output, self.overwrite)
            # The resolved config goes in first: it documents the run while it trains, and it marks the folder
            # as tuneforge's, so a run that stops early can still be replaced with --overwrite.
            save_config(self.config, self.run_dir / "config.yaml")
            self._write_data_report()
        else:
            self.run_dir = output

    def _write_data_report(self) -> None:
        (self.run_dir / "data_report.json").write_text(json.dumps([r.to_dict() for r in self.data.reports],
                                                                  indent=2))

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if is_sharded(self.dist, self.config.distributed):
            load_sharded_weights(self.wrapped, weights)
        else:
            ckpt.load_trainable(self.model, weights)

    def epoch_batches(self, shuffle: bool, generator: torch.Generator | None = None) -> Sequence[Any]:
        """This rank's micro-batches of an epoch, in the order ``generator`` (default: the run's data generator)
        draws when ``shuffle`` and ``data.shuffle`` are on, else in file order."""
        if not (shuffle and self.config.data.shuffle):
            return self.recipe.inputs.epoch_batches(None)
        return self.recipe.inputs.epoch_batches(generator or self.data_generator)

    def _planned_steps(self) -> int:
        """Optimiser steps of ``train.epochs`` epochs.

        Rows are packed after shuffling, so the number of packs can change from epoch to epoch; each epoch is
        planned with a copy of the data generator (grouping only, no tensors are built).
        """
        train = self.config.train
        generator = torch.Generator()
        generator.set_state(self.data_generator.get_state())
        return sum(math.ceil(len(self.epoch_batches(shuffle=True, generator=generator)) / train.grad_accum)
                   for _ in range(train.epochs))

    def is_log_step(self, step: int) -> bool:
        return is_log_step(step, self.config.train.log_every, self.total_steps)

    # ------------------------------------------------------------------------------------------ the update
    def compute_gradients(self, batches: Sequence[Any]) -> torch.Tensor:
        """Forward + backward over ``batches`` (the micro-batches of one update), accumulating into ``.grad``.

        Each micro-batch's loss *sum* is divided by the recipe's normaliser of all of ``batches`` on all ranks
        (not its own), and multiplied by the world size because DDP / FSDP average gradients over ranks: the
        accumulated gradient is the mean over every unit of the update. Returns this rank's share of that mean
        loss as a tensor (no host sync).
        """
        total = _sum_normalisers([self.recipe.normaliser(batch) for batch in batches])
        if isinstance(total, tuple):
            total = torch.tensor(total, dtype=torch.float32, device=self.device)
        elif not isinstance(total, torch.Tensor) and total == 0:
            raise RuntimeError("an update with nothing to train on")  # impossible: such rows are dropped
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        for index, batch in enumerate(batches):
            with no_sync(self.wrapped, skip=index < len(batches) - 1):
                terms: LossTerms = self.wrapped(move(batch, self.device))
                loss = (terms.loss_sum / total).sum()
                (loss * self.dist.world_size).backward()
            loss_total += loss.detach()
            self.stats.add_all(terms.stats)
        return loss_total

    def update(self, batches: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser update over ``batches``; returns (mean loss over all ranks, grad norm before clipping)."""
        return self.apply_gradients(self.compute_gradients(batches))

    def apply_gradients(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average ``loss`` over ranks, clip the accumulated gradients, check both are finite, step the optimiser
        and clear the gradients (not the scheduler: online RL updates several times per step)."""
        if self.dist.enabled:
            dist.all_reduce(loss)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.train.max_grad_norm if self.config.train.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self._record_non_finite(loss, grad_norm)
        if self.check_every_step:
            self.check_non_finite()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def train_step(self, window: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over ``window`` (the recipe's updates, then the schedule); returns (mean loss over
        all ranks, grad norm).

        A NaN or infinite loss or gradient norm stops the run without saving (``check_non_finite``): on CPU before
        the optimiser step; on an accelerator at the next log step, checkpoint or evaluation, so that the step has
        no host-device sync. No checkpoint ever contains it.
        """
        self.stats.reset()
        loss, grad_norm = self.recipe.train_step(window, self.update)
        self.scheduler.step()
        return loss, grad_norm

    @property
    def check_every_step(self) -> bool:
        """Whether the non-finite guard reads its flag every update, or only where the loop syncs anyway. CPU ops
        are synchronous, so reading it costs nothing there. Online methods read it every update on any device:
        the next rollout samples from the updated weights (a NaN would end the run inside the sampler instead of
        with a clear error), and their step syncs to score and decode anyway."""
        return self.device.type == "cpu" or self.spec.online

    @torch.no_grad()
    def _record_non_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Keep (step, loss, grad norm) of the first update whose loss or gradient norm is not finite, on the
        device, without reading anything back."""
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

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict | None:
        """The method's validation metrics (``val_*``), or None when the run has no validation data."""
        return self.recipe.evaluate()

    @torch.no_grad()
    def validation_loss(self, batches: Sequence[Any]) -> dict[str, float]:
        """The validation of loss-based methods: over ``batches`` (this rank's share) in eval mode, ``val_loss``
        (each loss term's sum over its normaliser, summed over terms) and every ``LossTerms`` statistic as
        ``val_<name>``, over all ranks."""
        was_training = self.model.training
        self.model.eval()
        loss_sums, normalisers, stats = None, [], StepStats(self.device)
        for batch in progress(batches, "validation"):
            terms: LossTerms = self.wrapped(move(batch, self.device))
            loss_sum = terms.loss_sum.double().reshape(-1)
            loss_sums = loss_sum if loss_sums is None else loss_sums + loss_sum
            normalisers.append(self.recipe.normaliser(batch))
            stats.add_all(terms.stats)
        self.model.train(was_training)
        reshard(self.wrapped)
        if loss_sums is None:
            return {}
        if self.dist.enabled:
            dist.all_reduce(loss_sums)
        total = torch.as_tensor(_sum_normalisers(normalisers), dtype=torch.float64).reshape(-1).cpu()
        loss = float((loss_sums.cpu() / total.clamp(min=1)).sum())
        return {"val_loss": loss, **{f"val_{name}": value for name, value in stats.means(self.dist.enabled).items()}}

    def _evaluation(self) -> dict | None:
        """The method's validation metrics and, with ``eval.generation_data``, the generation metrics in the same
        record; None when the run has nothing to evaluate on."""
        result = self.evaluate() or {}
        if self.generation is not None:
            result.update(self.generation.evaluate(self.model, self.tokenizer, self.template, self.dist, self.bf16,
                                                   self.config.train.batch_size))
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

    def _evaluated_at_this_step(self) -> bool:
        return bool(self.state.evaluations) and self.state.evaluations[-1]["step"] == self.state.step

    # ----------------------------------------------------------------------------------------------- train
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
        batches = self.epoch_batches(shuffle=True)  # draws this epoch's order from the generator
        windows = list(optimizer_windows(range(len(batches)), config.train.grad_accum))
        interval_tokens, interval_start = 0, time.perf_counter()
        for indices in windows[state.epoch_position:]:
            window = [batches[i] for i in indices]
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains with
            loss, grad_norm = self.train_step(window)
            state.step += 1
            state.epoch_position += 1
            step_tokens = self.recipe.inputs.window_tokens(window)
            state.tokens += step_tokens
            interval_tokens += step_tokens
            self._losses_since_eval.append(loss.detach())
            metrics.advance()
            if self.is_log_step(state.step):
                # The only host reads of the step's numbers happen here, at log steps.
                self.check_non_finite()
                now = time.perf_counter()
                record = {"step": state.step, "epoch": state.epoch, "loss": to_float(loss), "lr": lr,
                          "grad_norm": to_float(grad_norm), "tokens": state.tokens,
                          "tokens_per_s": interval_tokens / max(now - interval_start, 1e-9),
                          "elapsed_s": now - self._clock_start,
                          **self.recipe.step_metrics(self.stats.means(self.dist.enabled))}
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

    def _stop_requested(self, stop: StopRequest) -> bool:
        """A signal on any rank stops every rank at the same step. One process reads its own flag; several agree
        at log steps (and the last step), so the other steps have no collective and no host sync."""
        if not self.dist.enabled:
            return stop.requested is not None
        if not self.is_log_step(self.state.step):
            return False
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    # ------------------------------------------------------------------------------------------------ save
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
        summary = {"method": self.config.method, "steps": state.step, "epochs": state.epoch, "tokens": state.tokens,
                   "elapsed_s": state.elapsed_s, "stop_reason": stop_reason, "train_loss": last_loss,
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
        weights = full_state(self.model) if is_sharded(self.dist, self.config.distributed) else None
        if self.dist.is_main:
            self.recipe.save_model(lambda: save_run(self.run_dir, self.config, self.model, self.tokenizer,
                                                    self.template, self.config.lora.enabled, state_dict=weights))
            if summary is not None:
                summary = {**summary, "final_step": final_step, "run_dir": str(self.run_dir)}
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                self._write_data_report()  # a stream's counts are complete only now
                plot_runs([self.run_dir], self.run_dir / "curves.png")
                write_run_card(self.run_dir)  # again, now with the summary's results
        barrier(self.dist)
        return self.run_dir


def run_training(config: RunConfig, overwrite: bool = False, log=print, resume: bool | str = False,
                 force: bool = False, show_progress: bool | None = None) -> dict:
    """setup, train, and save unless interrupted; returns the run's summary. The lock is released on any exit."""
    trainer = Trainer(config, overwrite=overwrite, log=log, resume=resume, force=force, show_progress=show_progress)
    try:
        trainer.setup()
        summary = trainer.train()
        if summary["stop_reason"] != "interrupted":
            trainer.save(summary)
    finally:
        if trainer.run_lock is not None:
            trainer.run_lock.release()
    summary["run_dir"] = str(trainer.run_dir)
    return summary
