"""``tuneforge estimate``: a memory breakdown of a training run, from the model's config alone.

No weight is downloaded or allocated (for a hub id, only its config.json is read, from the local Hugging Face
cache when it is there): parameter counts come from the config's shapes (Llama-style decoders: Llama, SmolLM2,
Mistral, Qwen2-like), and every byte figure is a formula documented here and in
``docs/memory.md``. Sizes are in bytes; the CLI prints GB with 1 GB = 1e9 bytes.

Parameters (h hidden, L layers, a heads, k kv heads, d head_dim, I intermediate, V vocab):
    embeddings  V·h
    per layer   attention h·a·d (q) + 2·h·k·d (k, v; grouped-query attention) + a·d·h (o)
                MLP 3·h·I (gate, up, down), norms 2·h
    final norm  h;  output head V·h unless tied to the embeddings

Activations per layer and token, in elements (what autograd keeps for backward in one Llama layer):
    7·h + 2·k·d + 4·I
(norm inputs and outputs 4h, q and the attention output 2h plus its reshaped copy h, k and v 2kd, MLP gate,
silu, up and product 4I). This is the Llama form of Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", whose GPT estimate is s·b·h·(34 + 5·a·s/h) bytes in 16-bit: no dropout masks,
a SwiGLU MLP of width I instead of a GELU MLP of 4h. Attention without a fused kernel (``math`` SDPA, eager)
also keeps the a·s scores per token (the 5·a·s/h term); flash / memory-efficient SDPA does not, which is the
default here. LoRA dropout keeps one extra copy of each adapted layer's input. Under gradient checkpointing a
layer keeps only its input (h per token) and one layer at a time holds its full activations during recompute.

``device="cuda"`` counts live tensors (what ``torch.cuda.max_memory_allocated`` reports). ``device="cpu"``
estimates the process's peak resident memory instead, which adds three measured effects (docs/memory.md):
the Python process itself, heap blocks glibc keeps after LoRA's forward pass frees them, and, for QLoRA, the
float checkpoint that stays memory-mapped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneforge.errors import UserError

GB = 1e9  # decimal gigabytes, the convention of the printed breakdown

# NF4 (QLoRA, Dettmers et al. 2023): 4 bits per weight plus an 8-bit absmax per block of 64, itself quantised
# with one fp32 constant per 256 blocks ("double quantisation"): 8/64 + 32/(64·256) = 0.127 bits per parameter.
NF4_BITS = 4.0
NF4_BLOCK = 64
NF4_SECOND_BLOCK = 256
NF4_BYTES_PER_PARAM = (NF4_BITS + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_SECOND_BLOCK)) / 8

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimiser state bytes per trained parameter: AdamW keeps two fp32 moments; bitsandbytes' 8-bit Adam keeps
# two 1-byte moments (its per-block scales are < 1%); plain SGD (no momentum) keeps none.
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd": 0}
ADAPTER_BYTES = 4  # PEFT keeps adapter weights in fp32 even over a 16-bit base (autocast_adapter_dtype)
# QLoRA: PEFT's prepare_model_for_kbit_training (models/adapters.prepare_quantized) casts every parameter that
# is not quantised (embeddings, norms, an untied head) to float32, whatever dtype the model was loaded in.
QLORA_FLOAT_BYTES = 4
DEFAULT_LOSS_CHUNK = 256  # train.loss_chunk_size's default
DEVICES = ("cuda", "cpu")
# CPU only: the resident memory of the Python process before any model exists, i.e. the peak RSS after importing
# torch, transformers, peft and tuneforge.recipes.sft (391 MiB = 0.41 GB with torch 2.13 CPU and transformers
# 5.24; docs/memory.md). On a GPU it is host memory, outside the device's budget.
CPU_RUNTIME_BYTES = 0.41e9

# `tuneforge estimate`'s settings when neither a flag nor a run config (--model RUN.yaml) gives them.
ESTIMATE_DEFAULTS = {"method": "lora", "seq_len": 512, "batch": 1, "lora_r": 16, "grad_checkpointing": False,
                     "checkpoint_fraction": 1.0, "dtype": "float32", "optimizer": "adamw",
                     "loss_chunk_size": DEFAULT_LOSS_CHUNK}
RUN_CONFIG_SUFFIXES = (".yaml", ".yml")

ACTIVATIONS_DOC = "per layer and token: 7h + 2·kv·head_dim + 4·intermediate elements (docs/memory.md)"


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-style decoder that memory depends on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    checkpoint_dtype: str | None = None  # the dtype the weights are stored in (config.json's dtype), if known

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


# A few well-known configs, so an estimate needs no file. Values are those of the models' config.json.
KNOWN_MODELS = {
    "smollm2-135m": ModelShape("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True),
    "smollm2-360m": ModelShape("smollm2-360m", 960, 32, 15, 5, 2560, 49152, True),
    "llama-7b": ModelShape("llama-7b", 4096, 32, 32, 32, 11008, 32000, False),
    "llama-2-7b": ModelShape("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, False),
    "llama-2-13b": ModelShape("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, False),
    "llama-3-8b": ModelShape("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, False),
    "mistral-7b": ModelShape("mistral-7b", 4096, 32, 32, 8, 14336, 32000, False),
}


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A ``ModelShape`` from a parsed config.json (transformers' config class fills in the defaults)."""
    from transformers import AutoConfig

    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise UserError(f"{name}: config.json has no model_type; estimate needs a Hugging Face model config")
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise UserError(f"{name}: transformers does not know model_type '{model_type}' ({error})") from None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        heads = cfg.num_attention_heads
        return ModelShape(
            name=name, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", True)),
            head_dim=getattr(cfg, "head_dim", None), attention_bias=bool(getattr(cfg, "attention_bias", False)),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            checkpoint_dtype=_stored_dtype(config.get("dtype") or config.get("torch_dtype")))
    except AttributeError as error:
        raise UserError(f"{name}: not a Llama-style decoder config ({error})") from None


def _stored_dtype(value) -> str | None:
    return value if value in DTYPE_BYTES else None


def resolve_shape(spec: str, key: str = "--model") -> ModelShape:
    """The shape of the model ``spec`` names: ``default``, a name of ``KNOWN_MODELS``, a run config (``.yaml``:
    its ``model.name_or_path``), a ``config.json``, a Hugging Face model folder, a tuneforge run directory (its
    base's config), or a hub id (its config.json from the local Hugging Face cache, else from the hub when it
    answers). ``key`` names the setting in messages."""
    from tuneforge.models.loading import (DEFAULT_MODEL_NAME, RUN_MARKER, cache_dir, cached_hub_file,
                                          missing_path_message)
    from tuneforge.paths import DEFAULT_MODEL, looks_like_path

    if spec in (DEFAULT_MODEL, ""):
        cached = cache_dir() / "models" / DEFAULT_MODEL_NAME / "config.json"
        if cached.is_file():
            return shape_from_config(json.loads(cached.read_text()), DEFAULT_MODEL_NAME)
        return KNOWN_MODELS["smollm2-135m"]
    if spec.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[spec.lower()]
    path = Path(spec).expanduser()
    if path.suffix in RUN_CONFIG_SUFFIXES and path.is_file():
        return resolve_shape(run_config_settings(path)[0], "model.name_or_path")
    if path.is_dir():
        if (path / RUN_MARKER).is_file():  # a run: a LoRA run's base, or a full run's own model
            run = json.loads((path / RUN_MARKER).read_text())
            if run.get("kind") == "lora":
                return resolve_shape(run["base_model"], f"{path / RUN_MARKER}: base_model")
            path = path / "model"
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{spec} is a folder without config.json; point --model at a Hugging Face model folder "
                            "or a config.json file")
    elif not path.is_file():
        if looks_like_path(spec):
            raise UserError(missing_path_message(spec, key))
        try:
            path = cached_hub_file(spec)
        except UserError as error:
            if "/" in spec:  # an org/name hub id: the hub's answer is the whole story
                raise
            raise UserError(f"unknown model '{spec}': not a file or folder, not one of the built-in names "
                            f"({', '.join(sorted(KNOWN_MODELS))}, default), and as a hub id: {error}") from None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read it as a JSON config ({error})") from None
    return shape_from_config(config, str(spec))


def run_config_settings(path: str | Path) -> tuple[str, dict]:
    """``tuneforge estimate --model RUN.yaml``: the run's model (absolute when local) and the estimate settings the
    run config implies, keyed like :data:`ESTIMATE_DEFAULTS` (plus ``lora_dropout``)."""
    from tuneforge.config import load_config

    config = load_config(path)
    method = "full" if not config.lora.enabled else "qlora" if config.model.load_in == "4bit" else "lora"
    dtype = config.model.compute_dtype if method == "qlora" else config.model.dtype
    settings = {"method": method, "seq_len": config.data.max_length, "batch": config.train.batch_size,
                "grad_checkpointing": config.train.gradient_checkpointing,
                "checkpoint_fraction": config.train.checkpoint_fraction, "dtype": dtype,
                "optimizer": "adamw8bit" if config.train.optimizer.endswith("adamw8bit") else "adamw",
                "loss_chunk_size": config.train.loss_chunk_size}
    if method != "full":
        settings.update(lora_r=config.lora.r, lora_dropout=config.lora.dropout > 0)
    return config.model.name_or_path, settings


def _linears(shape: ModelShape) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the linear layers of one decoder layer."""
    h, d, i = shape.hidden, shape.dim, shape.intermediate
    return [("q_proj", h, shape.heads * d), ("k_proj", h, shape.kv_heads * d), ("v_proj", h, shape.kv_heads * d),
            ("o_proj", shape.heads * d, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


def parameter_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters by part; ``total`` equals ``sum(p.numel() for p in model.parameters())`` (tied counted once)."""
    linears = _linears(shape)
    attention = sum(n_in * n_out + (n_out if shape.attention_bias else 0) for _, n_in, n_out in linears[:4])
    mlp = sum(n_in * n_out + (n_out if shape.mlp_bias else 0) for _, n_in, n_out in linears[4:])
    counts = {
        "embeddings": shape.vocab * shape.hidden,
        "attention": shape.layers * attention,
        "mlp": shape.layers * mlp,
        "norms": shape.layers * 2 * shape.hidden + shape.hidden,
        "output_head": 0 if shape.tied else shape.vocab * shape.hidden,
    }
    counts["total"] = sum(counts.values())
    return counts


def lora_parameters(shape: ModelShape, r: int) -> int:
    """LoRA A (r × in) and B (out × r) on every linear layer but the output head (``all-linear``)."""
    return shape.layers * sum(r * (n_in + n_out) for _, n_in, n_out in _linears(shape))


@dataclass
class Estimate:
    """Bytes by term; ``total`` is their sum (an upper bound on the peak: all terms coexist in backward).

    ``runtime``, ``heap_retention`` and ``mapped_checkpoint`` are zero unless ``device`` is ``cpu``.
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    adapters: float
    total: float
    parameters: int
    trained_parameters: int
    notes: list[str]
    runtime: float = 0.0
    heap_retention: float = 0.0
    mapped_checkpoint: float = 0.0
    device: str = "cuda"

    def as_dict(self) -> dict:
        return asdict(self)


def recomputed_layers(layers: int, fraction: float) -> list[bool]:
    """Which of ``layers`` decoder layers recompute under ``train.checkpoint_fraction``: spread evenly (layer i
    when floor((i + 1)·f) > floor(i·f), floor(layers·f) of them), and at least one. The recipe applies it
    (recipes.sft.select_checkpointed_layers) and the estimate counts it."""
    chosen = [math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9) for i in range(layers)]
    if layers and not any(chosen):
        chosen[-1] = True
    return chosen


def activation_bytes(shape: ModelShape, seq_len: int, batch: int, dtype: str = "float32",
                     grad_checkpointing: bool = False, flash: bool = True, lora_dropout: bool = False,
                     checkpoint_fraction: float = 1.0) -> float:
    """Activations kept for backward by the decoder layers (formula in the module docstring); with
    ``checkpoint_fraction`` < 1 only that share of the layers recomputes and the others keep everything."""
    tokens, h = seq_len * batch, shape.hidden
    per_token = 7 * h + 2 * shape.kv_heads * shape.dim + 4 * shape.intermediate
    if not flash:
        per_token += shape.heads * seq_len  # the (heads, s, s) softmax output, per token
    if lora_dropout:  # the dropped-out copy of each adapted layer's input
        per_token += sum(n_in for _, n_in, _ in _linears(shape))
    unit = DTYPE_BYTES[dtype]
    layer = tokens * per_token * unit
    final_norm = 2 * tokens * h * unit
    if grad_checkpointing:
        # Each checkpointed layer keeps its input; backward recomputes one layer at a time, which then holds all of
        # its own. The layers left out of checkpointing keep all of theirs.
        recomputed = sum(recomputed_layers(shape.layers, checkpoint_fraction))
        return recomputed * tokens * h * unit + (shape.layers - recomputed) * layer + layer + final_norm
    return shape.layers * layer + final_norm


def loss_bytes(shape: ModelShape, tokens: int, loss_chunk: int, head_trains: bool) -> float:
    """The chunked output head and loss (losses.linear_cross_entropy_sum).

    One chunk of float32 logits at a time plus a second chunk-sized buffer (logsumexp's exponentials, then the
    logits' gradient written in place): 2 x chunk x vocab x 4 bytes. When the head trains (full fine-tuning),
    its weight gradient is accumulated from the forward pass on in a float32 (vocab, hidden) buffer that lives
    until backward, on top of the parameter's own gradient.
    """
    chunk = min(loss_chunk, tokens) * shape.vocab * 4 * 2
    return chunk + (shape.vocab * shape.hidden * 4 if head_trains else 0)


def heap_retention_bytes(shape: ModelShape, seq_len: int, batch: int, dtype: str, flash: bool,
                         lora_dropout: bool) -> float:
    """CPU, LoRA and QLoRA: heap blocks glibc keeps after the forward pass frees them (docs/memory.md).

    torch's CPU allocator takes 64-byte-aligned blocks from glibc, whose memalign path can leave them unusable
    for the next request of the same size. In a LoRA forward pass the heap then grows layer after layer although
    each layer's temporaries are freed: on the 135M default at 4 x ~196 tokens the resident peak carried 1.15
    to 1.55 GB of free heap, with or without checkpointing, against 1.48 GB for one layer's activations per
    layer, which is the figure counted here. Full fine-tuning retained a seventh to a third of that; it is not
    counted.
    """
    return activation_bytes(shape, seq_len, batch, dtype, grad_checkpointing=False, flash=flash,
                            lora_dropout=lora_dropout)


def estimate(shape: ModelShape, method: str = "full", seq_len: int = 512, batch: int = 1, lora_r: int = 16,
             grad_checkpointing: bool = False, optimizer: str = "adamw", world_size: int = 1, fsdp: bool = False,
             dtype: str = "float32", activations_gb: float | None = None, loss_chunk: int = DEFAULT_LOSS_CHUNK,
             lora_dropout: bool = True, flash: bool = True, device: str = "cuda",
             checkpoint_fraction: float = 1.0) -> Estimate:
    """Memory of one training process (one GPU under DDP/FSDP).

    Args:
        method: ``full``, ``lora`` or ``qlora`` (NF4 base with double quantisation; float32 embeddings and norms).
        dtype: weight and activation dtype of the base model; for ``qlora`` the compute dtype, which sets the
            activations (``model.compute_dtype``, float32 by default).
        world_size, fsdp: FSDP shards weights, gradients and optimiser states by ``world_size``; DDP
            (``fsdp=False``) keeps a full copy on every process.
        activations_gb: replace the activation formula by this figure (GB).
        loss_chunk: ``train.loss_chunk_size``: the head and loss run on this many tokens at a time.
        device: ``cuda`` counts live tensors (``max_memory_allocated``); ``cpu`` estimates the peak resident
            memory of the process, adding the runtime, heap-retention and mapped-checkpoint terms.
    """
    if device not in DEVICES:
        raise UserError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    counts = parameter_counts(shape)
    n = counts["total"]
    wbytes = DTYPE_BYTES[dtype]
    shard = world_size if fsdp else 1
    notes = []
    mapped = 0.0
    if method == "qlora":
        quantised = counts["attention"] + counts["mlp"]
        weights = quantised * NF4_BYTES_PER_PARAM + (n - quantised) * QLORA_FLOAT_BYTES
        notes.append(f"qlora: linear layers NF4 at {NF4_BYTES_PER_PARAM:.4f} bytes/param, the rest float32")
        if device == "cpu" and (shape.checkpoint_dtype or "float32") == "float32":
            # The float32 embeddings and norms are views into the memory-mapped float32 checkpoint, which keeps
            # the whole mapping alive; quantisation read every page of it, so the linear layers' float weights
            # stay resident next to their NF4 copies. An unknown checkpoint dtype (the built-in names) is taken
            # to be tuneforge's float32 import; a 16-bit one is converted while loading and not kept mapped.
            mapped = quantised * DTYPE_BYTES["float32"]
            notes.append("cpu: the float32 checkpoint stays mapped (its linear weights count as mapped_checkpoint)")
    else:
        weights = n * wbytes
    trained = n if method == "full" else lora_parameters(shape, lora_r)
    if method == "full":
        gradients, optim, adapters = n * wbytes, n * OPTIMIZER_BYTES[optimizer], 0.0
    else:
        gradients = optim = 0.0
        adapters = trained * (2 * ADAPTER_BYTES + OPTIMIZER_BYTES[optimizer])
    dropout = lora_dropout and method != "full"
    if activations_gb is not None:
        activations = activations_gb * GB
        notes.append("activations: given by --activations-gb")
    else:
        activations = activation_bytes(shape, seq_len, batch, dtype, grad_checkpointing, flash, dropout,
                                       checkpoint_fraction)
        notes.append("activations: " + ACTIVATIONS_DOC)
    logits = loss_bytes(shape, seq_len * batch, loss_chunk, head_trains=method == "full")
    runtime = heap = 0.0
    if device == "cpu":
        runtime = CPU_RUNTIME_BYTES
        if method != "full":
            heap = heap_retention_bytes(shape, seq_len, batch, dtype, flash, dropout)
            notes.append("cpu: heap_retention = freed blocks glibc keeps after the forward pass (docs/memory.md)")
    weights, gradients, optim, adapters = (x / shard for x in (weights, gradients, optim, adapters))
    total = weights + gradients + optim + activations + logits + adapters + runtime + heap + mapped
    return Estimate(weights, gradients, optim, activations, logits, adapters, total, n, trained, notes,
                    runtime, heap, mapped, device)


def format_estimate(shape: ModelShape, result: Estimate, header: str) -> str:
    """The human-readable breakdown printed by ``tuneforge estimate``."""
    lines = [header, f"parameters: {result.parameters:,} (trained: {result.trained_parameters:,})"]
    keys = ["weights", "gradients", "optimizer", "activations", "logits", "adapters"]
    if result.device == "cpu":
        keys += ["runtime", "heap_retention", "mapped_checkpoint"]
    for key in keys:
        lines.append(f"  {key:<17} {getattr(result, key) / GB:9.3f} GB")
    where = "peak resident memory of the process" if result.device == "cpu" else "live tensors on the GPU"
    lines.append(f"  {'total':<17} {result.total / GB:9.3f} GB   (1 GB = 1e9 bytes; {where})")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def device_memory_bytes(device) -> float:
    """Total memory of ``device``: the GPU's, or the machine's physical RAM on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
