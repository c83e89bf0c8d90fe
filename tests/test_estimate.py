"""``tuneforge estimate``: parameter counts against real models, the seed's 7B table, and CLI errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tuneforge.cli import main as cli_main
from tuneforge.errors import UserError
from tuneforge.models.memory import (CPU_RUNTIME_BYTES, DTYPE_BYTES, GB, KNOWN_MODELS, NF4_BYTES_PER_PARAM,
                                     activation_bytes, estimate, lora_parameters, parameter_counts,
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
    # 6.48B linear params in NF4 (3.34 GB) + embeddings, head and norms, which PEFT's k-bit preparation casts to
    # float32 (0.26B x 4 = 1.05 GB).
    assert qlora.weights / GB == pytest.approx(4.39, abs=0.05)
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
    # Logits: one loss chunk of fp32 logits and their gradient, not seq x vocab; a trained head adds the fp32
    # (vocab, hidden) weight-gradient buffer the chunked loss fills from the forward pass on.
    assert estimate(shape, method="lora").logits == 256 * 32000 * 4 * 2
    assert base.logits == 256 * 32000 * 4 * 2 + 32000 * 4096 * 4


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    shape, tokens = KNOWN_MODELS["smollm2-135m"], 198 * 4
    h, unit = shape.hidden, DTYPE_BYTES["float32"]
    # 7h + 2·kv·d + 4·I elements per token and layer, plus the dropped-out input of each adapted layer (LoRA).
    per_token = 7 * 576 + 2 * 3 * 64 + 4 * 1536 + (6 * 576 + 1536)
    layer = tokens * per_token * unit
    final_norm = 2 * tokens * h * unit
    full = estimate(shape, method="lora", seq_len=198, batch=4)
    checkpointed = estimate(shape, method="lora", seq_len=198, batch=4, grad_checkpointing=True)
    assert full.activations == shape.layers * layer + final_norm
    # Each layer keeps only its input; backward recomputes one layer at a time.
    assert checkpointed.activations == shape.layers * tokens * h * unit + layer + final_norm
    assert full.activations - checkpointed.activations == (shape.layers - 1) * layer - shape.layers * tokens * h * unit
    # train.checkpoint_fraction 0.5: 15 of the 30 layers recompute, the other 15 keep everything.
    half = estimate(shape, method="lora", seq_len=198, batch=4, grad_checkpointing=True, checkpoint_fraction=0.5)
    assert half.activations == 15 * tokens * h * unit + 15 * layer + layer + final_norm
    assert checkpointed.activations < half.activations < full.activations


def test_qlora_activations_follow_the_compute_dtype():
    shape = KNOWN_MODELS["smollm2-135m"]
    lora = estimate(shape, method="lora", seq_len=198, batch=4)
    # bitsandbytes keeps no dequantised weights for backward: QLoRA keeps what LoRA keeps, in the compute dtype
    # (tuneforge's model.compute_dtype, float32 by default).
    assert estimate(shape, method="qlora", seq_len=198, batch=4).activations == lora.activations
    bf16 = estimate(shape, method="qlora", seq_len=198, batch=4, dtype="bfloat16")
    assert bf16.activations == activation_bytes(shape, 198, 4, "bfloat16", lora_dropout=True)


def test_cpu_terms():
    shape = KNOWN_MODELS["smollm2-135m"]
    counts = parameter_counts(shape)
    quantised = counts["attention"] + counts["mlp"]
    for method in ("full", "lora", "qlora"):
        for checkpointing in (False, True):
            gpu = estimate(shape, method=method, seq_len=198, batch=4, grad_checkpointing=checkpointing)
            cpu = estimate(shape, method=method, seq_len=198, batch=4, grad_checkpointing=checkpointing,
                           device="cpu")
            assert gpu.runtime == gpu.heap_retention == gpu.mapped_checkpoint == 0
            assert cpu.runtime == CPU_RUNTIME_BYTES
            # glibc keeps the blocks freed in the forward pass: one layer's activations per layer under LoRA
            # and QLoRA, with or without checkpointing; under full fine-tuning it is left out.
            retained = 0 if method == "full" else activation_bytes(shape, 198, 4, "float32", lora_dropout=True)
            assert cpu.heap_retention == retained
            # A float32 checkpoint stays mapped under QLoRA: the linear layers' float weights stay resident.
            assert cpu.mapped_checkpoint == (quantised * 4 if method == "qlora" else 0)
            assert cpu.total == pytest.approx(gpu.total + cpu.runtime + cpu.heap_retention + cpu.mapped_checkpoint)
    qlora = estimate(shape, method="qlora", device="cpu")
    assert qlora.weights == quantised * NF4_BYTES_PER_PARAM + (counts["total"] - quantised) * 4
    # A 16-bit checkpoint is converted while loading: nothing aliases the mapping, so it is not counted.
    bf16_checkpoint = dataclasses.replace(shape, checkpoint_dtype="bfloat16")
    assert estimate(bf16_checkpoint, method="qlora", device="cpu").mapped_checkpoint == 0
    with pytest.raises(UserError, match="device"):
        estimate(shape, device="tpu")


# docs/memory.md, "Checked against real runs": the peak RSS of `tuneforge bench --steps 2` (GB; the higher of
# two runs where there were two) and the peak of live tensors in its 4 x 198-token step (GB), fp32, LoRA r=16.
MEASURED = {  # (model, method, checkpointing): (peak RSS -> device="cpu", live tensors -> device="cuda")
    ("tiny", "lora", False): (0.599, 0.125),
    ("tiny", "lora", True): (0.596, 0.115),
    ("tiny", "full", False): (0.659, 0.161),
    ("tiny", "qlora", False): (0.596, 0.125),
    ("135m", "lora", False): (3.776, 2.090),
    ("135m", "lora", True): (2.810, 0.758),
    ("135m", "full", False): (3.855, 3.050),
    ("135m", "full", True): (3.350, 2.690),
    ("135m", "qlora", False): (3.953, 1.718),
}


@pytest.mark.parametrize("row", sorted(MEASURED))
def test_estimates_stay_within_25_percent_of_the_recorded_measurements(row, tiny_model_dir):
    model, method, checkpointing = row
    shape = resolve_shape(str(tiny_model_dir)) if model == "tiny" else KNOWN_MODELS["smollm2-135m"]
    for device, measured in zip(("cpu", "cuda"), MEASURED[row]):
        result = estimate(shape, method=method, seq_len=198, batch=4, grad_checkpointing=checkpointing,
                          device=device)
        assert result.total / GB == pytest.approx(measured, rel=0.25), (device, result.total / GB, measured)


def test_cli_estimate_json_and_table(capsys):
    assert cli_main(["estimate", "--model", "llama-7b", "--method", "full", "--activations-gb", "20",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] / GB == pytest.approx(130, abs=4)
    assert cli_main(["estimate", "--model", "smollm2-135m", "--method", "qlora"]) == 0
    text = capsys.readouterr().out
    for term in ("weights", "gradients", "optimizer", "activations", "logits", "adapters", "total"):
        assert term in text
    assert "heap_retention" not in text  # the CPU-only lines appear with --device cpu
    assert cli_main(["estimate", "--model", "smollm2-135m", "--method", "qlora", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for term in ("runtime", "heap_retention", "mapped_checkpoint", "resident"):
        assert term in text
    assert cli_main(["estimate", "--model", "smollm2-135m", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and result["runtime"] > 0 and result["heap_retention"] > 0


@pytest.mark.parametrize("spec", ["no-such-model", "{tmp}", "{tmp}/config.json"])
def test_cli_estimate_errors_exit_2(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # "no-such-model" could be a hub id: do not wait on the network
    (tmp_path / "bad").mkdir()
    spec = spec.format(tmp=tmp_path / "bad")
    assert cli_main(["estimate", "--model", spec]) == 2
    assert "error:" in capsys.readouterr().err


def test_train_prints_the_estimate_and_warns_when_it_exceeds_the_device(make_config, qa_file, monkeypatch):
    from tuneforge.engine import build
    from tuneforge.engine.trainer import run_training

    messages = []
    run_training(make_config(qa_file, train={"max_steps": 1}), log=messages.append)
    line = next(m for m in messages if m.startswith("memory estimate"))
    assert "GB per process" in line and not any(m.startswith("warning: the estimate") for m in messages)

    monkeypatch.setattr(build, "device_memory_bytes", lambda device: 1e6)  # a 1 MB device
    messages.clear()
    run_training(make_config(qa_file, train={"max_steps": 1}), overwrite=True, log=messages.append)
    assert any(m.startswith("warning: the estimate") and "exceeds" in m for m in messages)


def test_cli_estimate_takes_a_run_config_and_its_settings(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import yaml

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "run.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "bfloat16"},
        "data": {"train": "train.jsonl", "max_length": 96}, "lora": {"enabled": False},
        "train": {"batch_size": 3, "gradient_checkpointing": True, "optimizer": "paged_adamw8bit"}}))
    monkeypatch.chdir(tmp_path)
    shape = resolve_shape(str(tiny_model_dir))
    assert cli_main(["estimate", "--model", "configs/run.yaml", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = estimate(shape, method="full", seq_len=96, batch=3, grad_checkpointing=True, dtype="bfloat16",
                        optimizer="adamw8bit")
    assert result["method"] == "full" and result["total"] == expected.total
    assert result["from_config"]["seq_len"] == 96 and result["from_config"]["batch"] == 3
    # Flags override the config; the text says which values came from it.
    assert cli_main(["estimate", "--model", "configs/run.yaml", "--method", "lora", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    first = text.splitlines()[0]
    assert first.startswith("from configs/run.yaml") and "seq-len 96" in first and "batch" not in first
    assert "lora, bfloat16, adamw8bit, seq 96 x batch 1" in text


def test_estimate_resolves_run_directories_to_their_base(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tuneforge_run.json").write_text(json.dumps({"kind": "lora", "base_model": str(tiny_model_dir)}))
    assert resolve_shape(str(run)) == dataclasses.replace(resolve_shape(str(tiny_model_dir)),
                                                          name=str(tiny_model_dir))


def fake_hub_cache(root, repo_id: str, config: dict):
    """The layout huggingface_hub reads: models--org--name/{refs/main, snapshots/REV/config.json}."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    (folder / "snapshots" / revision / "config.json").write_text(json.dumps(config))


def test_estimate_reads_a_hub_id_from_the_local_cache(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path / "hub", "someorg/tiny", json.loads((tiny_model_dir / "config.json").read_text()))
    shape = resolve_shape("someorg/tiny")
    assert parameter_counts(shape) == parameter_counts(resolve_shape(str(tiny_model_dir)))
    assert cli_main(["estimate", "--model", "someorg/tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "someorg/tiny"


@pytest.mark.parametrize("offline", [True, False])
def test_estimate_of_an_uncached_hub_id_fails_fast_in_one_line(offline, tmp_path, monkeypatch, capsys):
    import time

    import huggingface_hub.constants

    from tuneforge.models import loading

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    assert cli_main(["estimate", "--model", "Qwen/Qwen2.5-7B-Instruct"]) == 2
    assert time.perf_counter() - started < 5
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: 'Qwen/Qwen2.5-7B-Instruct': its config.json is not in the local Hugging Face "
                               "cache and the hub is unreachable")
    assert ("HF_HUB_OFFLINE is set" in lines[0]) == offline


def test_estimate_reports_a_missing_path_as_a_path(tmp_path, capsys):
    missing = tmp_path / "models" / "nope"
    assert cli_main(["estimate", "--model", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model: no such file or folder: {missing} (relative paths")
