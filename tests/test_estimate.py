"""``tuneforge estimate``: parameter counts against real models, the seed's 7B table, and CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.cli import main as cli_main
from tuneforge.models.memory import (GB, KNOWN_MODELS, estimate, lora_parameters, parameter_counts,
                                     resolve_shape)

SMOLLM2_135M_PARAMS = 134_515_008


def test_tiny_config_count_equals_the_built_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    shape = resolve_shape(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert parameter_counts(shape)["total"] == sum(p.numel() for p in model.parameters())
    assert parameter_counts(resolve_shape(str(tiny_model_dir / "config.json"))) == parameter_counts(shape)


def test_smollm2_135m_count_matches_a_meta_device_build():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = KNOWN_MODELS["smollm2-135m"]
    assert parameter_counts(shape)["total"] == SMOLLM2_135M_PARAMS
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_135M_PARAMS
    # The 'default' model reads the cached import's config when there is one, else the built-in table.
    assert parameter_counts(resolve_shape("default"))["total"] == SMOLLM2_135M_PARAMS


def test_lora_parameters_match_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(resolve_shape(str(tiny_model_dir)), 4) == trained


def test_seed_table_full_fine_tuning_7b():
    result = estimate(KNOWN_MODELS["llama-7b"], method="full", dtype="float32", optimizer="adamw",
                      activations_gb=20)
    assert result.parameters == 6_738_415_616
    assert result.weights / GB == pytest.approx(28, abs=1.5)
    assert result.gradients / GB == pytest.approx(28, abs=1.5)
    assert result.optimizer / GB == pytest.approx(56, abs=3)
    assert result.total / GB == pytest.approx(130, abs=4)


def test_seed_table_lora_and_qlora_7b():
    shape = KNOWN_MODELS["llama-7b"]
    lora = estimate(shape, method="lora", dtype="float32", activations_gb=20)
    assert lora.weights / GB == pytest.approx(27, abs=1.5)
    assert lora.gradients == lora.optimizer == 0
    assert 0 < lora.adapters / GB < 1
    assert lora.total == pytest.approx(lora.weights + 20 * GB + lora.adapters + lora.logits)
    # The seed's LoRA row assumes a 16-bit base: 7B x 2 bytes.
    assert estimate(shape, method="lora", dtype="bfloat16", activations_gb=0).weights / GB == pytest.approx(13.5, abs=1)
    qlora = estimate(shape, method="qlora", activations_gb=20)
    assert 3.5 <= qlora.weights / GB <= 4.0
    assert qlora.adapters == lora.adapters


def test_optimizers_fsdp_and_checkpointing():
    shape = KNOWN_MODELS["llama-7b"]
    base = estimate(shape, method="full", seq_len=512, batch=1)
    assert estimate(shape, method="full", optimizer="adamw8bit").optimizer == base.optimizer / 4
    assert estimate(shape, method="full", optimizer="sgd").optimizer == 0
    sharded = estimate(shape, method="full", world_size=4, fsdp=True)
    assert sharded.weights == base.weights / 4 and sharded.optimizer == base.optimizer / 4
    assert sharded.activations == base.activations
    assert estimate(shape, method="full", world_size=4).weights == base.weights  # DDP replicates
    assert estimate(shape, method="full", grad_checkpointing=True).activations < base.activations / 4
    # Logits: one loss chunk of fp32 logits and their gradient, not seq x vocab.
    assert base.logits == 256 * 32000 * 4 * 2


def test_cli_estimate_json_and_table(capsys):
    assert cli_main(["estimate", "--model", "llama-7b", "--method", "full", "--activations-gb", "20",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] / GB == pytest.approx(130, abs=4)
    assert cli_main(["estimate", "--model", "smollm2-135m", "--method", "qlora"]) == 0
    text = capsys.readouterr().out
    for term in ("weights", "gradients", "optimizer", "activations", "logits", "adapters", "total"):
        assert term in text


@pytest.mark.parametrize("spec", ["no-such-model", "{tmp}", "{tmp}/config.json"])
def test_cli_estimate_errors_exit_2(spec, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    spec = spec.format(tmp=tmp_path / "bad")
    assert cli_main(["estimate", "--model", spec]) == 2
    assert "error:" in capsys.readouterr().err


def test_train_prints_the_estimate_and_warns_when_it_exceeds_the_device(make_config, qa_file, monkeypatch):
    from tuneforge.recipes import sft

    messages = []
    sft.run_sft(make_config(qa_file, train={"max_steps": 1}), log=messages.append)
    line = next(m for m in messages if m.startswith("memory estimate"))
    assert "GB per process" in line and not any(m.startswith("warning: the estimate") for m in messages)

    monkeypatch.setattr(sft, "device_memory_bytes", lambda device: 1e6)  # a 1 MB device
    messages.clear()
    sft.run_sft(make_config(qa_file, train={"max_steps": 1}), overwrite=True, log=messages.append)
    assert any(m.startswith("warning: the estimate") and "exceeds" in m for m in messages)
