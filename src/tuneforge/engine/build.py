"""Building the model a run trains, the same for every method: load (with the method's head), quantize, add or
fold adapters, activation checkpointing, compile; and the memory estimate printed before the model loads."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tuneforge.config import RunConfig
from tuneforge.engine.distributed import DistInfo
from tuneforge.errors import ConfigError
from tuneforge.models.adapters import add_lora, causal_lm, decoder_and_head, prepare_quantized
from tuneforge.models.dropout import use_fast_dropout
from tuneforge.models.fused_lora import fuse_lora
from tuneforge.models.lean_activations import use_lean_activations
from tuneforge.models.loading import ModelSource, Quantization, load_model
from tuneforge.models.memory import GB, device_memory_bytes, recomputed_layers, shape_from_config
from tuneforge.models.memory import estimate as estimate_memory
from tuneforge.recipes.registry import MethodSpec

# The LoRA task type PEFT records in the adapter, by the model's head (what loads it back: a causal LM or a
# sequence-classification model).
LORA_TASK_TYPES = {"lm": "CAUSAL_LM", "reward": "SEQ_CLS"}


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
    (``engine.step.decoder_hidden``); the chunked output head and loss stay eager (a python loop over a number of
    chunks that changes with every batch). ``nn.Module.compile`` compiles in place, so parameter names, state
    dicts, checkpoints and the saved adapter are unchanged and DDP wraps the model as before. ``dynamic=True``
    makes batch size and sequence length symbolic, so a batch of another shape reuses the compiled code; a new
    graph is compiled only for what changes the code: eval mode, a packed (batch, 1, seq, seq) mask, a batch of
    one row, generation with a KV cache.
    """
    body, _ = decoder_and_head(model)
    body.compile(dynamic=True)


def build_model(config: RunConfig, spec: MethodSpec, source: ModelSource, dist: DistInfo,
                log: Callable[[str], None]) -> torch.nn.Module:
    """The model ``config`` trains, on ``dist.device``, in training mode, with its trainable parameters set."""
    device = dist.device
    if config.train.compile:
        check_compile_backend(device)  # before loading: a missing compiler fails in a second
    if spec.reference and source.adapter is not None and config.lora.enabled:
        # Starting from a LoRA run (typically the SFT stage): that run's model is the reference, so its adapter
        # is folded into the base and a fresh adapter trains on top; "adapter off" is then exactly the start.
        source = dataclasses.replace(source, merged_adapters=source.merged_adapters + [source.adapter],
                                     adapter=None)
    # The config, not a run the model starts from, decides the quantization of the base being trained.
    quantization = Quantization.from_model_config(config.model)
    source = dataclasses.replace(source, quantization=quantization)
    model = load_model(source, config.model.dtype, config.model.attn_implementation,
                       trainable_adapter=config.lora.enabled, device=device, head=spec.model_head)
    if quantization is not None:
        # Before the adapters: freezes the base, upcasts norms and embeddings to float32 (PEFT's QLoRA recipe).
        model = prepare_quantized(model, config.train.gradient_checkpointing)
    if source.adapter is not None and not config.lora.enabled:
        # Full fine-tuning from a LoRA run: fold the adapter into the weights, then train all of them.
        model = model.merge_and_unload()
    if source.adapter is None and config.lora.enabled:
        model = add_lora(model, config.lora, task_type=LORA_TASK_TYPES[spec.model_head])
    elif not config.lora.enabled:
        model.requires_grad_(True)
    if config.lora.enabled:
        use_fast_dropout(model)  # PEFT's per-adapter nn.Dropout is a fifth of a CPU step; see models/dropout.py
        if config.lora.fused:
            # One dropout mask and one A-matmul per group of projections reading the same input, x kept once for
            # backward; the fused function draws its own masks (FastDropout stays for layers on PEFT's path).
            fuse_lora(model, log)
    if config.train.fused_activations:
        # RMSNorm and SwiGLU through autograd functions that keep less for backward (models/lean_activations.py).
        use_lean_activations(model, log)
    model.to(device)
    if config.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        lm = causal_lm(model)
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointed = select_checkpointed_layers(model, config.train.checkpoint_fraction)
        if config.train.checkpoint_fraction < 1:
            log(f"activation checkpointing: {checkpointed} decoder layers recompute, the others keep their "
                "activations")
    # Dropout lives in the adapters; the base model has none to switch on.
    model.train()
    if config.train.compile:
        compile_decoder(model)
        log("train.compile: the decoder compiles on the first training batch (and again on the first evaluation, "
            "in eval mode); those steps are slower")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    mode = f"LoRA r={config.lora.r}" if config.lora.enabled else "full fine-tuning"
    if quantization is not None:
        mode = f"QLoRA r={config.lora.r}, base {quantization.describe()}"
    ranks = f", {dist.world_size} processes ({config.distributed.strategy})" if dist.enabled else ""
    bf16 = ", bf16 autocast" if _bf16(config, device) else ""
    log(f"model {config.model.name_or_path}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({mode}), device {device}{bf16}{ranks}")
    return model


def _bf16(config: RunConfig, device: torch.device) -> bool:
    from tuneforge.engine.step import bf16_autocast_enabled

    return bf16_autocast_enabled(config.train.mixed_precision, device)


def log_memory_estimate(config: RunConfig, source: ModelSource, shape: tuple[int, int], dist: DistInfo,
                        log: Callable[[str], None]) -> None:
    """Print `tuneforge estimate`'s figure for this run before loading the model, and warn when it exceeds the
    device's memory (RAM on CPU). ``shape``: (sequences per micro-batch, longest sequence). Skipped when the
    model's config.json is not on disk (a hub id)."""
    config_file = Path(source.base) / "config.json"
    if not config_file.is_file():
        return
    model_shape = shape_from_config(json.loads(config_file.read_text()), config.model.name_or_path)
    method = "full" if not config.lora.enabled else "qlora" if config.model.load_in == "4bit" else "lora"
    rows, longest = shape
    device = dist.device
    result = estimate_memory(model_shape, method, seq_len=longest, batch=rows, lora_r=config.lora.r,
                             grad_checkpointing=config.train.gradient_checkpointing,
                             checkpoint_fraction=config.train.checkpoint_fraction,
                             world_size=dist.world_size, fsdp=config.distributed.strategy == "fsdp",
                             dtype=config.model.compute_dtype if method == "qlora" else config.model.dtype,
                             loss_chunk=config.train.loss_chunk_size, lora_dropout=config.lora.dropout > 0,
                             device="cpu" if device.type == "cpu" else "cuda")
    available = device_memory_bytes(device)
    log(f"memory estimate ({method}, longest batch {rows} x {longest} tokens): {result.total / GB:.2f} GB per "
        f"process (weights {result.weights / GB:.2f}, activations {result.activations / GB:.2f}, optimiser "
        f"{(result.optimizer + result.adapters) / GB:.2f}); device has {available / GB:.1f} GB")
    if result.total > available:
        log(f"warning: the estimate ({result.total / GB:.1f} GB) exceeds the {available / GB:.1f} GB of {device}; "
            "consider train.gradient_checkpointing, a smaller train.batch_size or data.max_length, LoRA, or "
            "model.load_in=4bit (see tuneforge estimate)")
