"""Crash-safe checkpoints for exact resume.

A checkpoint is a folder ``RUN_DIR/checkpoints/step-NNNNNNNN`` holding:

    weights.safetensors   trainable parameters (the adapter for LoRA, every parameter for full fine-tuning)
    optimizer.pt          optimiser and scheduler state
    rng.pt                torch, numpy and python RNG states
    state.json            step, epoch, position in the epoch, data-order generator state, early-stopping state
    config.yaml           the resolved config of the run
    COMPLETE              written last

Files are written into a hidden staging folder, flushed to disk, marked complete, then renamed into place: a
checkpoint either exists whole or not at all, and a crash (or a full disk) while saving leaves the previous
checkpoints untouched. Old checkpoints are removed only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from tuneforge.config import RunConfig, config_from_dict, save_config
from tuneforge.engine.distributed import full_state
from tuneforge.errors import UserError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
PREFIX = "step-"

# Config keys that change what a run trains: resuming with any of them changed is refused unless forced.
RESUME_KEYS = ("method", "model.name_or_path", "model.dtype", "data.train", "data.validation", "data.val_fraction",
               "data.format", "data.template", "data.system_prompt", "data.max_length", "data.train_on_prompt",
               "data.packing", "data.group_by_length", "data.shuffle", "lora.enabled", "lora.r", "lora.alpha",
               "lora.target_modules", "lora.use_rslora", "lora.use_dora", "lora.bias", "train.batch_size",
               "train.grad_accum", "train.seed",
               # FSDP checkpoints store the optimiser state by parameter name, DDP and single-process ones by index.
               "distributed.strategy")


@dataclass
class TrainState:
    """Where a run is: everything besides weights and optimiser needed to continue exactly.

    Attributes:
        step: optimiser steps done.
        epoch: current epoch (0-based).
        epoch_position: optimiser steps done inside the current epoch.
        epoch_generator_state: the data-order generator's state at the start of the current epoch, so the
            epoch's order can be drawn again and the first ``epoch_position`` steps skipped.
        tokens: tokens processed so far.
        best_metric / best_step: best validation metric so far and the step it was reached.
        evals_without_improvement: consecutive evaluations without improvement (early stopping).
        evaluations: (step, validation metrics, mean training loss since the previous evaluation) history,
            for the overfitting check.
    """

    step: int = 0
    epoch: int = 0
    epoch_position: int = 0
    epoch_generator_state: list = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    evaluations: list = field(default_factory=list)
    overfitting_from_step: int | None = None
    # Processes the run trained with: the global batch is batch_size x grad_accum x world_size.
    world_size: int = 1
    # A method's own running state (PPO's adaptive KL coefficient), JSON values only.
    method_state: dict = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def _fsync_tree(path: Path) -> None:
    for item in path.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def save_checkpoint(run_dir: Path, state: TrainState, model: torch.nn.Module, optimizer, scheduler,
                    config: RunConfig, weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write a complete checkpoint of ``state`` (see module docstring); returns its folder.

    ``weights`` and ``optimizer_state`` supply full (gathered) states when the model is sharded across ranks.
    """
    final = checkpoint_dir(run_dir, state.step)
    staging = final.parent / f".staging-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(weights if weights is not None else full_state(model), str(staging / "weights.safetensors"))
        optimizer_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, staging / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps(asdict(state)))
        save_config(config, staging / "config.yaml")
        _fsync_tree(staging)
        (staging / COMPLETE).write_text(str(state.step))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        # A failed save (disk full, interrupt) must not leave a folder that could pass for a checkpoint.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def list_checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints by step, incomplete folders) of ``run_dir``."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return [], []
    complete, partial = [], []
    for path in sorted(root.iterdir()):
        if path.name.startswith(PREFIX):
            (complete if (path / COMPLETE).is_file() else partial).append(path)
        elif path.name.startswith(".staging-"):
            partial.append(path)
    return complete, partial


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Remove complete checkpoints beyond the newest ``keep_last``, never the best one."""
    complete, _ = list_checkpoints(run_dir)
    keep = set(complete[-keep_last:])
    if best_step is not None:
        keep.add(checkpoint_dir(run_dir, best_step))
    for path in complete:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Rename checkpoints later than ``step`` to ``superseded-step-N`` (kept, but never chosen for resume)."""
    moved = []
    for path in list_checkpoints(run_dir)[0]:
        if int(path.name[len(PREFIX):]) > step:
            target = path.with_name(f"superseded-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            moved.append(target)
    return moved


def find_resume_checkpoint(run_dir: Path, explicit: str | None, log=print) -> Path:
    """The checkpoint to resume from: ``explicit`` if given, else the newest complete one of ``run_dir``.

    Partial checkpoints are reported and never chosen; an empty or partial-only folder is an error, never a
    silent fresh start.
    """
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise UserError(f"checkpoint {path} does not exist")
        if not any((path / name).exists() for name in (COMPLETE, "state.json", "weights.safetensors")):
            raise UserError(f"{path} is not a checkpoint (those are folders like RUN_DIR/{CHECKPOINTS}/"
                            f"{PREFIX}00000100); to continue from the newest checkpoint of train.output_dir, pass "
                            "--resume alone")
        if not (path / COMPLETE).is_file():
            raise UserError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was being written when the "
                            "run stopped; resume from an earlier one")
        return path
    complete, partial = list_checkpoints(run_dir)
    for path in partial:
        log(f"ignoring incomplete checkpoint {path}")
    if not complete:
        extra = f" ({len(partial)} incomplete one(s) ignored)" if partial else ""
        raise UserError(f"no complete checkpoint in {Path(run_dir) / CHECKPOINTS}{extra}; nothing to resume")
    return complete[-1]


def flat_keys(values: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    """Keys of :data:`RESUME_KEYS` whose values differ, as ``key: saved -> current``."""
    old, new = flat_keys(saved.to_dict()), flat_keys(current.to_dict())
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in RESUME_KEYS if old.get(key) != new.get(key)]


def read_checkpoint_config(path: Path) -> RunConfig:
    return config_from_dict(yaml.safe_load((Path(path) / "config.yaml").read_text()))


def read_checkpoint_state(path: Path) -> TrainState:
    """The :class:`TrainState` of a checkpoint, without touching weights (cheap: for checks before loading)."""
    return TrainState(**json.loads((Path(path) / "state.json").read_text()))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, load_weights=None,
                    load_optimizer=None) -> TrainState:
    """Restore weights, optimiser, scheduler and RNG states from ``path``; returns its :class:`TrainState`.

    ``load_weights(weights)`` and ``load_optimizer(state)`` replace the plain loaders for sharded models.
    """
    path = Path(path)
    weights = load_file(str(path / "weights.safetensors"))
    (load_weights or (lambda w: load_trainable(model, w)))(weights)
    states = torch.load(path / "optimizer.pt", weights_only=False)
    # The optimiser and scheduler states carry their hyperparameters (lr, betas, weight decay): loaded as they
    # are, they would silently override a changed train.lr (a key resume allows) while the saved config claims
    # the new value. Keep the moments and the step count from the checkpoint, the hyperparameters from the config.
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    base_lrs = list(getattr(scheduler, "base_lrs", []))
    (load_optimizer or optimizer.load_state_dict)(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    _restore_hyperparameters(optimizer, scheduler, configured, base_lrs)
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**json.loads((path / "state.json").read_text()))


def _restore_hyperparameters(optimizer, scheduler, configured: list[dict], base_lrs: list[float]) -> None:
    """Put the current config's hyperparameters back after loading states saved under another config."""
    if len(configured) != len(optimizer.param_groups):
        return  # another grouping of parameters; load_state_dict would already have refused it
    for group, values in zip(optimizer.param_groups, configured):
        for key in ("betas", "weight_decay", "eps", "initial_lr"):
            if key in values:
                group[key] = values[key]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if base_lrs and lambdas is not None and len(base_lrs) == len(lambdas) == len(optimizer.param_groups):
        scheduler.base_lrs = base_lrs
        rates = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates  # what get_last_lr() reports: the rate of the next step


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters into ``model`` by name; every trainable parameter must be present."""
    parameters = dict(model.named_parameters())
    missing = [name for name, p in parameters.items() if p.requires_grad and name not in weights]
    unknown = [name for name in weights if name not in parameters]
    if missing or unknown:
        raise UserError(f"checkpoint does not match the model: {len(missing)} missing and {len(unknown)} unknown "
                        f"parameters (first: {(missing + unknown)[0]})")
    # A changed LoRA rank (resumed with --force) keeps every name but changes shapes; copy_ would fail with a
    # bare size-mismatch traceback or, where shapes broadcast, silently fill the parameter with the wrong values.
    mismatched = [name for name, value in weights.items() if tuple(value.shape) != tuple(parameters[name].shape)]
    if mismatched:
        name = mismatched[0]
        raise UserError(f"checkpoint does not match the model: {len(mismatched)} parameters have another shape "
                        f"(first: {name} has shape {tuple(weights[name].shape)} in the checkpoint, "
                        f"{tuple(parameters[name].shape)} in the model); resume with the checkpoint's lora.r and "
                        "target modules, or start a new run")
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)
