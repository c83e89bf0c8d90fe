"""Multi-process training under ``torchrun``: process group, model wrapping (DDP or FSDP2), full state dicts.

Data: every rank holds the whole (small, tokenised) dataset and draws the same epoch order from the same seed.
A global micro-batch of ``batch_size × world_size`` rows is split so rank r takes rows [r·B, (r+1)·B); each rank
can therefore count the trained tokens of *all* ranks without communication, and the loss of a step is
normalised by that global count. DDP and FSDP2 average gradients over ranks, so each rank scales its loss by
``world_size``: the result is the gradient of (sum of token losses over all ranks) / (trained tokens of all
ranks), exactly what one process with the global batch computes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tuneforge.config import DistributedConfig
from tuneforge.models.adapters import causal_lm


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(config: DistributedConfig) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; a plain process gets world 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world_size <= 1:
        return DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = config.backend if config.backend != "auto" else ("nccl" if cuda else "gloo")
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group. After a clean run the ranks leave together (a rank tearing down gloo while
    another still talks to it can abort at exit); after an error, no barrier, which could wait forever."""
    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """The model plus its loss as one module, so DDP and FSDP2 see a forward call (their hooks hang there)."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def wrap_model(model: torch.nn.Module, loss_fn, info: DistInfo, config: DistributedConfig) -> torch.nn.Module:
    """Wrap for the strategy: plain :class:`LossModule` in one process, DDP or FSDP2 across several."""
    module = LossModule(model, loss_fn)
    if not info.enabled:
        return module
    if config.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per decoder layer (all-gathered just in time, freed after use), plus the root for the rest.
    for layer in getattr(causal_lm(model), causal_lm(model).base_model_prefix).layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def no_sync(wrapped: torch.nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if skip and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if skip and hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        return _restore_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(wrapped):
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the trainable parameters (the adapter for LoRA, everything for full
    fine-tuning); a collective under FSDP2, so every rank must call it."""
    out = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        value = parameter.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.cpu().clone()
    return out


def to_float(value: torch.Tensor) -> float:
    """A scalar tensor (possibly a DTensor) as a Python float."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def reshard(wrapped: torch.nn.Module) -> None:
    """Return FSDP2 parameters to their sharded form. The root stays unsharded after a forward with no backward
    (an evaluation), and its registered parameters are then not the ones the optimiser holds."""
    if hasattr(wrapped, "reshard"):
        wrapped.reshard()


def is_sharded(info: DistInfo, config: DistributedConfig) -> bool:
    return info.enabled and config.strategy == "fsdp"


def gather_optimizer_state(wrapped: torch.nn.Module, optimizer) -> dict:
    """The full optimiser state of a sharded model, on rank 0 (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded_weights(wrapped: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full trainable weights (names of the inner model) into a sharded model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(wrapped, {f"model.{name}": value for name, value in weights.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))


def load_sharded_optimizer(wrapped: torch.nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
