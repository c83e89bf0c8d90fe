"""The CPU dropout used for LoRA adapter inputs: right probability, unbiased, exact gradients, replayable."""

from __future__ import annotations

import pytest
import torch

from tuneforge.models.dropout import FastDropout, keep_mask, quantized_probability, use_fast_dropout


def test_mask_drops_the_quantized_probability():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([2000, 1000]), 0.05)
    assert mask.dtype == torch.bool
    p = quantized_probability(0.05)
    assert abs(p - 0.05) < 1 / 65536
    # 2M draws: the standard error of the kept fraction is about 1.5e-4.
    assert (~mask).float().mean().item() == pytest.approx(p, abs=8e-4)


def test_output_is_unbiased_and_gradient_is_mask_times_scale():
    torch.manual_seed(1)
    layer = FastDropout(0.3).train()
    x = torch.ones(1000, 500, requires_grad=True)
    y = layer(x)
    kept = y != 0
    scale = 1 / (1 - quantized_probability(0.3))
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale)


def test_same_seed_same_mask_and_eval_mode_is_identity():
    layer = FastDropout(0.1)
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on
    assert layer.eval()(x) is x


def test_use_fast_dropout_replaces_peft_dropouts(tokenizer):
    from peft import LoraConfig, get_peft_model

    from conftest import build_tiny_model

    model = get_peft_model(build_tiny_model(tokenizer), LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    replaced = use_fast_dropout(model)
    assert replaced == 14  # 7 linear layers x 2 decoder layers
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(d.p == 0.0 for d in dropouts)  # only the base model's (inactive) attention dropout is left
