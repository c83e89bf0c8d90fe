"""Crash-safe checkpoints for exact resume.

A checkpoint is a folder ``RUN_DIR/checkpoints/step-NNNNNNNN`` holding:

    weights.safetensors   trainable parameters (the adapter for LoRA, every parameter for full fine-tuning)
    optimizer.pt          optimiser and scheduler state
    rng.pt                torch, numpy and python RNG states
    state.json            step, epoch, position in the epoch, data-order generator state, early-stopping state
    config.yaml           the resolved config of the run
    COMPLETE              written last

Files are written into a hidden staging folder ``.staging-step-N``, flushed to disk, marked complete, then renamed
into place. A checkpoint is complete when it holds every file above (:data:`REQUIRED_FILES`); at every instant a
``step-N`` folder is complete or absent, whatever kills the process:

- deleting (pruning) renames the folder out of view (``.deleting-step-N...``) first, then removes the files;
- replacing (saving a step that has a checkpoint, as resuming a finished run does) renames the old folder out of
  view, then the complete staging folder in. A crash between the two renames leaves ``step-N`` absent and a
  complete ``.staging-step-N``, which :func:`recover_checkpoints` renames into place on resume;
- a crash (or a full disk) while writing leaves an incomplete staging folder, never chosen and removed on resume.

Old checkpoints are removed only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from tuneforge.config import RunConfig, config_from_dict, save_config
from tuneforge.engine.distributed import barrier, full_state
from tuneforge.errors import UserError, option
from tuneforge.paths import RUN_CONFIG_PATHS, absolute

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
PREFIX = "step-"
STAGING = ".staging-"
# Folders renamed out of view to be deleted; no checkpoint listing ever picks them, resume removes leftovers.
DELETING = ".deleting-"
REQUIRED_FILES = ("weights.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.yaml", COMPLETE)

# Config keys that change what a run trains: resuming with any of them changed is refused unless forced.
RESUME_KEYS = ("method", "model.name_or_path", "model.dtype", "data.train", "data.validation", "data.val_fraction",
               "data.format", "data.template", "data.system_prompt", "data.max_length", "data.train_on_prompt",
               "data.packing", "data.group_by_length", "data.shuffle", "data.streaming", "lora.enabled", "lora.r",
               "lora.alpha", "lora.target_modules", "lora.use_rslora", "lora.use_dora", "lora.bias", "train.batch_size",
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
    # A streaming run's position in its data (tuneforge.data.streaming), JSON values only; {} otherwise.
    data_state: dict = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def _fsync_tree(path: Path) -> None:
    """Flush the files of ``path`` and the folder itself (its entries) to disk."""
    for item in path.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def missing_files(path: Path) -> list[str]:
    """The files of :data:`REQUIRED_FILES` that ``path`` lacks (all of them when it does not exist)."""
    return [name for name in REQUIRED_FILES if not (Path(path) / name).is_file()]


def _set_aside(path: Path) -> Path:
    """Rename ``path`` out of view, to a unique ``.deleting-`` name in the same folder; returns the new name.
    One rename is atomic: the folder is visible whole, or not at all."""
    target = path.with_name(f"{DELETING}{path.name}.{uuid.uuid4().hex[:8]}")
    path.rename(target)
    return target


def _delete(path: Path) -> None:
    """Remove a folder already out of view (a leftover staging or ``.deleting-`` folder)."""
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: Path, state: TrainState, model: torch.nn.Module, optimizer, scheduler,
                    config: RunConfig, weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write a complete checkpoint of ``state`` (see module docstring); returns its folder.

    ``weights`` and ``optimizer_state`` supply full (gathered) states when the model is sharded across ranks.
    """
    final = checkpoint_dir(run_dir, state.step)
    staging = final.parent / f"{STAGING}{final.name}"
    _delete(staging)
    staging.mkdir(parents=True)
    aside = None  # the previous checkpoint of this step, once renamed out of view
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
        _fsync_tree(staging)
        if final.exists():
            # Replacing: out of view in one rename (never rmtree in place, which leaves a folder with COMPLETE but
            # without state.json), then the new one in with another.
            aside = _set_aside(final)
        staging.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        # A failed save (disk full, interrupt) changes nothing: the previous checkpoint of this step goes back in
        # place, and no folder is left that could pass for a checkpoint.
        if aside is not None and not final.exists():
            try:
                aside.rename(final)
                aside = None
            except OSError:
                pass  # left for recover_checkpoints, with the complete staging folder
        if final.exists() or aside is None:
            _delete(staging)
        if aside is not None and final.exists():
            _delete(aside)
        raise
    if aside is not None:
        _delete(aside)
    return final


def list_checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints by step, incomplete folders) of ``run_dir``: a ``step-N`` folder is complete when it
    holds every file of :data:`REQUIRED_FILES`; staging folders are incomplete; ``.deleting-`` and
    ``superseded-`` folders are neither."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return [], []
    complete, partial = [], []
    for path in sorted(root.iterdir()):
        if path.name.startswith(PREFIX):
            (partial if missing_files(path) else complete).append(path)
        elif path.name.startswith(STAGING):
            partial.append(path)
    return complete, partial


def recover_checkpoints(run_dir: Path, log=print) -> None:
    """Tidy what a killed run left in ``run_dir``'s checkpoints (rank 0, holding the run's lock, before resume):
    a complete ``.staging-step-N`` whose ``step-N`` is absent or incomplete (the run died while replacing it) is
    renamed into place; other staging folders and ``.deleting-`` leftovers are removed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith(DELETING):
            _delete(path)
    for staging in sorted(root.glob(f"{STAGING}{PREFIX}*")):
        final = root / staging.name[len(STAGING):]
        missing = missing_files(staging)
        if not missing and missing_files(final):
            if final.exists():
                _delete(_set_aside(final))
            staging.rename(final)
            log(f"recovered checkpoint {final} from {staging.name}: a run stopped while replacing it")
            continue
        _delete(staging)
        if missing:
            log(f"ignoring incomplete checkpoint {staging} (missing {', '.join(missing)}): it was being written when "
                "a run stopped; removed it")


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Remove complete checkpoints beyond the newest ``keep_last``, never the best one."""
    complete, _ = list_checkpoints(run_dir)
    keep = set(complete[-keep_last:])
    if best_step is not None:
        keep.add(checkpoint_dir(run_dir, best_step))
    for path in complete:
        if path not in keep:
            try:
                aside = _set_aside(path)
            except OSError:
                continue  # still whole; a later prune tries again
            _delete(aside)


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Rename checkpoints later than ``step`` to ``superseded-step-N`` (kept, but never chosen for resume)."""
    moved = []
    for path in list_checkpoints(run_dir)[0]:
        if int(path.name[len(PREFIX):]) > step:
            target = path.with_name(f"superseded-{path.name}")
            if target.exists():
                _delete(_set_aside(target))
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
        # config.yaml is no sign: a run directory has one too.
        if not any((path / name).exists() for name in REQUIRED_FILES if name != "config.yaml"):
            raise UserError(f"{path} is not a checkpoint (those are folders like RUN_DIR/{CHECKPOINTS}/"
                            f"{PREFIX}00000100); to continue from the newest checkpoint of train.output_dir, pass "
                            f"{option('resume')} alone")
        missing = missing_files(path)
        if missing:
            raise UserError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}): it was being written "
                            f"or deleted when a run stopped; resume from an earlier one, or pass {option('resume')} "
                            "alone for the newest complete one")
        return path
    complete, partial = list_checkpoints(run_dir)
    for path in partial:
        log(f"ignoring incomplete checkpoint {path} (missing {', '.join(missing_files(path))})")
    if not complete:
        extra = f" ({len(partial)} incomplete one(s) ignored)" if partial else ""
        raise UserError(f"no complete checkpoint in {Path(run_dir) / CHECKPOINTS}{extra}; nothing to resume")
    return complete[-1]


def choose_resume_checkpoint(run_dir: Path, resume: bool | str, config: RunConfig, dist, force: bool, log=print,
                             recover: bool = True) -> Path:
    """The checkpoint a resumed run starts from (``resume``: True for the newest of ``run_dir``, or a path),
    checked against ``config`` and the number of processes. With ``recover`` (the run holds ``run_dir``'s lock),
    rank 0 first tidies what a killed run left there (:func:`recover_checkpoints`), then every rank chooses."""
    explicit = resume if isinstance(resume, str) else None
    own = explicit is None or Path(explicit).parent.resolve() == (Path(run_dir) / CHECKPOINTS).resolve()
    if recover and own and dist.is_main:
        recover_checkpoints(run_dir, log)
    if torch.distributed.is_initialized():  # (a world faked in a test has no process group to wait on)
        barrier(dist)
    path = find_resume_checkpoint(run_dir, explicit, log)
    differences = config_differences(read_checkpoint_config(path), config)
    if differences and not force:
        raise UserError(f"the config differs from the one of {path} in what is trained: " + "; ".join(differences)
                        + f". Resume with the same config, or pass {option('force')}")
    saved_world = read_checkpoint_state(path).world_size
    if saved_world != dist.world_size and not force:
        raise UserError(f"{path} was trained with {saved_world} process(es) and this run has {dist.world_size}: the "
                        "global batch would change. Resume with the same number of processes, or pass "
                        f"{option('force')}")
    return path


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

    def same(key: str) -> bool:
        a, b = old.get(key), new.get(key)
        if key in RUN_CONFIG_PATHS and isinstance(a, str) and isinstance(b, str):
            # A run saved before config paths were made absolute holds them relative to the working directory.
            return absolute(a, Path.cwd()) == absolute(b, Path.cwd())
        return a == b

    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in RESUME_KEYS if not same(key)]


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
