"""``tuneforge bench``: what it counts (its timings are not tested; they are the benchmark's output)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, build_tiny_model
from tuneforge.bench import matmul_parameters, native_matmul, run_bench
from tuneforge.errors import ConfigError


def expected_matmul_parameters(vocab: int) -> int:
    """Linear weights of the tiny Llama by hand: q, k, v, o and the three MLP projections per layer, plus the
    (tied) output head; the embedding lookup is not a matmul."""
    hidden, inter, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    kv = hidden // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3
    return layers * per_layer + vocab * hidden


def test_matmul_parameters_count_every_linear_weight_and_the_head(tokenizer):
    model = build_tiny_model(tokenizer)
    assert matmul_parameters(model) == expected_matmul_parameters(len(tokenizer))


def test_matmul_parameters_count_a_4bit_weight_by_its_logical_shape(tokenizer, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cpu")
    packed = [m for m in quantized.modules() if getattr(getattr(m, "weight", None), "quant_state", None)]
    assert packed  # the projections really are stored packed (two values a byte)
    assert matmul_parameters(quantized) == expected_matmul_parameters(len(tokenizer))


def test_sft_bench_counts_real_tokens_and_reports_its_settings(tiny_model_dir):
    result = run_bench(model=str(tiny_model_dir), batch_size=2, max_length=96, steps=2, lora_r=4, packing=True,
                       model_dtype="bfloat16", dtype="bfloat16", warmup_steps=2, rows=24, loss_chunk_size=64)
    assert result["packing"] and result["model_dtype"] == "bfloat16" and result["dtype"] == "bfloat16"
    assert result["steps"] == 2 and result["matmul_params"] > 0 and result["lora_params"] > 0
    assert 0 < result["trained_tokens_per_s"] < result["tokens_per_s"]
    if native_matmul(torch.bfloat16, torch.device("cpu")):
        assert 0 < result["mfu"] < 1
    else:  # an AVX2-only CPU emulates bf16: no peak to measure against, so no MFU rather than a wrong one (was 4-12)
        assert result["mfu"] is None and result["matmul_peak_gflop_per_s"] is None
    # Model FLOPs per token are at least the LoRA formula's 4·N (the attention term adds to it).
    per_token = result["model_gflop_per_s"] * 1e9 / result["tokens_per_s"]
    assert per_token >= 4 * result["matmul_params"] * (1 - 1e-3)
    assert torch.get_default_dtype() == torch.float32


def test_pairs_bench_counts_pairs_and_charges_the_inline_reference(tiny_model_dir):
    # The workload is the spec's question: dpo trains on pairs, with a reference forward unless precomputed.
    common = dict(model=str(tiny_model_dir), batch_size=2, max_length=320, steps=1, lora_r=4, rows=8)
    inline = run_bench(method="dpo", **common)
    assert inline["pairs_per_s"] > 0 and inline["tokens_per_s"] > 0 and inline["precompute_ref"] is False
    cached = run_bench(method="dpo", precompute_ref=True, **common)
    assert cached["precompute_ref"] is True
    # simpo has no reference (and no precompute_ref option: the flag does not apply to it).
    assert run_bench(method="simpo", precompute_ref=True, **common)["precompute_ref"] is False


def test_online_bench_samples_its_groups(tiny_model_dir):
    result = run_bench(method="grpo", model=str(tiny_model_dir), batch_size=2, max_length=64, steps=1, lora_r=4,
                       generations=2, max_new_tokens=4)
    assert result["generations"] == 2 and result["responses_per_s"] > 0 and 0 < result["sample_share"] <= 1
    ppo = run_bench(method="ppo", model=str(tiny_model_dir), batch_size=2, max_length=64, steps=1, lora_r=4,
                    generations=3, max_new_tokens=4)
    assert ppo["generations"] == 1  # one response per prompt, whatever --generations says


def test_a_method_without_a_synthetic_workload_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="bench: method kto trains on unpaired rows"):
        run_bench(method="kto", model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"unknown method 'dop' \(did you mean 'dpo'\?\)"):
        run_bench(method="dop", model=str(tiny_model_dir))
