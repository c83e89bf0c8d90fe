"""The forward pass every method shares, device and precision choices, and validation loss."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from tuneforge.data.collate import Batch
from tuneforge.losses import masked_lm_loss_sum
from tuneforge.models.adapters import decoder_and_head
from tuneforge.progress import progress


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_autocast_enabled(mode: str, device: torch.device) -> bool:
    """``auto``: bf16 where the hardware computes it natively (CUDA with bf16, or CPUs with AMX)."""
    if mode == "no":
        return False
    if mode == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def move(batch, device: torch.device):
    """A copy of a batch dataclass (``Batch``, a preference or prompt batch) with its tensors, also those of nested
    batches, on ``device``; counts are kept. On CPU the batch itself."""
    if device.type == "cpu":
        return batch
    moved = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        elif dataclasses.is_dataclass(value):
            value = move(value, device)
        moved[field.name] = value
    return type(batch)(**moved)


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None, per_sample_causal: bool = False) -> torch.Tensor:
    """The decoder body's last hidden states, (batch, seq, hidden): the one forward every loss and log-prob
    starts from (the output head is applied by the caller, only where it is needed).

    ``attention_mask``: (batch, seq) 1 at real tokens, or a boolean (batch, 1, seq, seq) "may attend" mask, which
    is put in the form the attention kernel reads (:func:`kernel_mask`); ``per_sample_causal``: such a mask is a
    pack's (causal within each sample, whose position ids restart at 0).
    """
    body, _ = decoder_and_head(model)
    mask = kernel_mask(body, attention_mask, per_sample_causal=per_sample_causal)
    return body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                use_cache=False).last_hidden_state


def lm_loss_sum(model: torch.nn.Module, batch: Batch, chunk_size: int) -> torch.Tensor:
    """Summed next-token loss of ``batch`` over its trained positions (float32 scalar).

    The body runs once; the output head runs only on positions that have a target, in chunks, so prompt and
    padding positions cost no output-projection FLOPs and the (batch, seq, vocab) logits are never built.
    """
    _, head = decoder_and_head(model)
    # A 4-D mask here is always a pack's: causal within each sample, whose position ids restart at 0.
    hidden = decoder_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids, per_sample_causal=True)
    return masked_lm_loss_sum(hidden, batch.targets, head, chunk_size)


def kernel_mask(model: torch.nn.Module, mask: torch.Tensor | None,
                per_sample_causal: bool = False) -> torch.Tensor | None:
    """``mask`` in the form ``model``'s attention kernel reads. transformers passes a 4-D mask to the kernel as it
    is. SDPA reads a boolean (batch, 1, seq, seq) mask as "may attend". The eager kernel adds it to the scores, so
    it becomes 0 / most-negative there. FlexAttention would also read it as scores; a mask that is only
    ``per_sample_causal`` (packed rows) is dropped instead: transformers derives the samples from the position
    ids, which restart at 0 for each, and builds a block mask whose empty blocks are skipped, so the attention
    FLOPs are those of the samples, not of the whole pack. Other masks (shared-prompt pairs) have no such form
    (the config refuses flex_attention for those methods)."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    kernel = attention_kernel(model)
    if kernel == "flex_attention":
        if not per_sample_causal:
            raise ValueError("flex_attention cannot take a (seq, seq) mask that is not per-sample causal")
        return None
    if kernel == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    return mask


def attention_kernel(model: torch.nn.Module) -> str | None:
    """The attention implementation transformers runs ``model`` with (``sdpa``, ``eager``, ``flex_attention``)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@torch.no_grad()
def summed_eval_loss(model: torch.nn.Module, loss_sum, batches, device: torch.device,
                     desc: str = "validation") -> tuple[torch.Tensor, int]:
    """Sum of ``loss_sum(batch)`` over ``batches`` in eval mode (float64, on ``device``) and the trained tokens
    of all ranks; the model's training mode is restored. Shared by every evaluation of response loss; its
    progress is shown as ``desc``."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch in progress(batches, desc):
        total += loss_sum(move(batch, device)).double()
        tokens += batch.global_trained
    model.train(was_training)
    return total, tokens


def loss_and_perplexity(total: float, tokens: int) -> tuple[float, float]:
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50.0))


def evaluate_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, chunk_size: int = 1024,
                  bf16: bool = False, desc: str = "loss") -> dict:
    """Mean loss over every trained token of ``batches`` and its perplexity (one process)."""

    def loss_sum(batch: Batch) -> torch.Tensor:
        with autocast(device, bf16):
            return lm_loss_sum(model, batch, chunk_size)

    total, tokens = summed_eval_loss(model, loss_sum, batches, device, desc)
    loss, perplexity = loss_and_perplexity(float(total), tokens)
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens}
