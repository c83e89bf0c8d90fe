"""LoRA adapters through PEFT, saved in the standard PEFT format that ``PeftModel.from_pretrained`` loads."""

from __future__ import annotations

import warnings

import torch

from tuneforge.config import LoraConfig


def add_lora(model: torch.nn.Module, config: LoraConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights (and biases by ``config.bias``) train.

    ``all-linear`` targets every linear layer except the output head, as PEFT defines it. With ``task_type``
    ``SEQ_CLS`` (a reward model) PEFT also trains and saves the new scalar head in full (``modules_to_save``).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, bias=config.bias,
        target_modules=config.target_modules, use_rslora=config.use_rslora, use_dora=config.use_dora,
        task_type=task_type)
    with warnings.catch_warnings():
        # PEFT calls transformers' deprecated is_gradient_checkpointing; the warning is not the user's concern.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, peft_config)


def prepare_quantized(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """Ready a bitsandbytes-quantized base for adapter training with PEFT's ``prepare_model_for_kbit_training``.

    It freezes every parameter and casts float16/bfloat16 ones (norms, embeddings, head) to float32 for stable
    training; the 4-bit and 8-bit weights stay as they are. An adapter already loaded on top (continuing a
    QLoRA run) keeps its trainable flag. Checkpointing is non-reentrant, so frozen inputs need no special hook.
    """
    from peft import prepare_model_for_kbit_training

    trainable = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prepare_model_for_kbit_training(causal_lm(model), use_gradient_checkpointing=gradient_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in trainable:
        param.requires_grad_(True)
    return model


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` module inside a possibly PEFT-wrapped model."""
    return model.get_base_model() if is_peft(model) else model


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returns hidden states) and the output head of a causal LM.

    Training calls them separately so the loss can project only the positions that have a target, in chunks.
    """
    lm = causal_lm(model)
    body = getattr(lm, lm.base_model_prefix)
    return body, lm.get_output_embeddings()


def decoder_and_score(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the scalar ``score`` head of a reward model (``*ForSequenceClassification``)."""
    lm = causal_lm(model)
    return getattr(lm, lm.base_model_prefix), lm.score
