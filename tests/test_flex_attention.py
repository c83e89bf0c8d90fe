"""Packed rows under FlexAttention: no dense (seq, seq) mask is passed; transformers derives the samples from the
position ids and builds a block mask. CPU FlexAttention has no backward, so the parity is checked on the forward
(the training path on CUDA runs the same code with gradients)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from tuneforge.data.collate import collate_packed, collate_padded
from tuneforge.data.tokenize import Example
from tuneforge.engine import step as engine_step
from tuneforge.losses import IGNORE_INDEX


def _examples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(10, 1000, (n,), generator=generator).tolist()
        rows.append(Example(ids, [IGNORE_INDEX] * min(3, n) + ids[3:]))
    return rows


def test_packed_flex_attention_loss_equals_padded_sdpa(tokenizer):
    model = build_tiny_model(tokenizer).eval()
    examples = _examples([7, 12, 1, 5, 9])
    # Two packs of different length, so the shorter one ends in padding (positions 0, one "sample" each).
    packed = collate_packed([examples[:3], examples[3:]], tokenizer.pad_token_id)
    padded = collate_padded(examples, tokenizer.pad_token_id)
    assert packed.attention_mask.ndim == 4
    with torch.no_grad():
        reference = engine_step.lm_loss_sum(model, padded, 8)
        model.config._attn_implementation = "flex_attention"
        assert engine_step.attention_kernel(model.model) == "flex_attention"
        flex = engine_step.lm_loss_sum(model, packed, 8)
        # Meaningful: the same pack with one causal block over everything (samples see each other) differs.
        leaky_batch = collate_packed([examples[:3], examples[3:]], tokenizer.pad_token_id)
        leaky_batch.position_ids = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
        leaky = engine_step.lm_loss_sum(model, leaky_batch, 8)
    assert flex.item() == pytest.approx(reference.item(), rel=1e-5)
    assert abs(leaky.item() - reference.item()) > 20 * 1e-5 * reference.item()  # 20x the parity tolerance


def test_packed_rows_under_the_eager_kernel_match_padded_sdpa(tokenizer):
    # transformers hands a 4-D mask to the kernel as it is, and the eager kernel *adds* it to the scores: a boolean
    # mask must arrive there as 0 / most-negative (engine.step.kernel_mask), or every sample would see its
    # neighbours and the future. Forward and backward, on CPU.
    examples = _examples([7, 12, 1, 5, 9])
    packed = collate_packed([examples[:3], examples[3:]], tokenizer.pad_token_id)
    padded = collate_padded(examples, tokenizer.pad_token_id)
    losses, grads = [], []
    for kernel, batch in (("sdpa", padded), ("eager", packed)):
        model = build_tiny_model(tokenizer)
        model.config._attn_implementation = kernel
        loss = engine_step.lm_loss_sum(model, batch, 8)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_flex_attention_is_refused_where_masks_are_not_per_sample_causal(tmp_path):
    # Shared-prompt pairs carry a (seq, seq) mask in which rejected sees the prompt but not chosen: transformers'
    # FlexAttention would read a tensor mask as scores, so the config refuses the pair before anything loads.
    from tuneforge.config import config_from_dict
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="flex_attention: for method sft"):
        config_from_dict({"method": "dpo", "model": {"attn_implementation": "flex_attention"},
                          "data": {"train": str(tmp_path / "pairs.jsonl")}})
