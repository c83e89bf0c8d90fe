"""QLoRA: a base loaded in 4 or 8 bits through bitsandbytes, LoRA adapters trained on top, merged into the float
base. bitsandbytes' 4-bit and 8-bit paths run on CPU, so the tiny model covers them."""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.cli import main as cli_main
from tuneforge.data.formats import Message
from tuneforge.engine.metrics import read_metrics
from tuneforge.errors import ConfigError, UserError
from tuneforge.generation import Generator
from tuneforge.models.loading import Quantization, load_model, resolve_model
from tuneforge.engine.trainer import Trainer, run_training

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'tuneforge[qlora]')")

# The tiny model's linear layers (64 and 128 wide) are whole multiples of bitsandbytes' 4-bit block (64 values).
QLORA = {"load_in": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def quiet(_message):
    pass


def linear_types(model: torch.nn.Module) -> set[str]:
    """Class names of the decoder layers' linear layers, the adapters' own (plain) lora_A/lora_B left out."""
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    return {type(m).__name__ for name, m in layers.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name}


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(100, 132).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture
def qlora_run(tiny_model_dir, qa_file, tmp_path):
    """A 4-bit NF4 QLoRA run trained through the CLI: (run_dir, config_path)."""
    config = {"model": {"name_or_path": str(tiny_model_dir), **QLORA},
              "data": {"train": str(qa_file), "max_length": 64},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "lr": 1e-2,
                        "log_every": 1, "mixed_precision": "no"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", str(path)]) == 0
    return tmp_path / "run", path


def test_4bit_qlora_run_trains_and_saves_a_peft_adapter(qlora_run):
    run_dir, _ = qlora_run
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and losses[-1] != losses[0]
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.dtype == torch.float32 for w in lora_b)
    assert any(w.abs().max() > 0 for w in lora_b), "LoRA B starts at zero; training must move it"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["load_in"] == "4bit"


def test_recipe_base_is_4bit_and_only_adapters_train(make_config, qa_file):
    config = make_config(qa_file, model=QLORA, train={"max_steps": 1})
    recipe = Trainer(config, log=quiet, show_progress=False, run_dir=False)
    recipe.setup()
    assert linear_types(recipe.model) == {"Linear4bit"}
    q_proj = recipe.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.quant_type == "nf4"
    trainable = {n for n, p in recipe.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The chunked loss projects with the head's weight directly: it must stay a float nn.Linear.
    head = recipe.model.get_base_model().lm_head
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32


def test_generator_loads_a_qlora_run_quantized_like_training(qlora_run):
    run_dir, _ = qlora_run
    generator = Generator.load(str(run_dir))
    assert linear_types(generator.model) == {"Linear4bit"}
    assert isinstance(generator.generate([[Message("user", "What is item 3?")]], max_new_tokens=3)[0], str)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_8bit_base_loads_and_trains_one_step(make_config, qa_file):
    config = make_config(qa_file, model={"load_in": "8bit"}, train={"max_steps": 1})
    try:
        summary = run_training(config, log=quiet)
    except (RuntimeError, NotImplementedError) as exc:  # a bitsandbytes build without CPU int8 kernels
        pytest.skip(f"bitsandbytes 8-bit does not run on this machine: {exc}")
    assert summary["steps"] == 1 and summary["train_loss"] == summary["train_loss"]
    assert linear_types(Generator.load(summary["run_dir"]).model) == {"Linear8bitLt"}


def test_quantized_full_fine_tuning_is_refused(make_config, qa_file, tmp_path, capsys):
    with pytest.raises(ConfigError, match="lora.enabled"):
        make_config(qa_file, model=QLORA, lora={"enabled": False})
    with pytest.raises(ConfigError, match="fsdp"):
        make_config(qa_file, model=QLORA, distributed={"strategy": "fsdp"})
    config = make_config(qa_file)
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert cli_main(["train", str(path), "model.load_in=4bit", "lora.enabled=false"]) == 2
    assert "model.load_in" in capsys.readouterr().err


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch, tiny_model_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    source = resolve_model(str(tiny_model_dir))
    source.quantization = Quantization("4bit")
    with pytest.raises(UserError, match=r"tuneforge\[qlora\]"):
        load_model(source)


def test_merge_of_a_qlora_run_is_a_float_checkpoint_close_to_the_quantized_model(qlora_run, tiny_model_dir, tmp_path,
                                                                                  caplog):
    from transformers import AutoModelForCausalLM

    run_dir, _ = qlora_run
    out = tmp_path / "merged"
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert cli_main(["merge", str(run_dir), str(out)]) == 0
    assert "dequantised" in caplog.text
    weights = load_file(str(next(out.glob("*.safetensors"))))
    assert not any("lora" in name for name in weights)
    assert all(w.dtype == torch.float32 for w in weights.values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = AutoModelForCausalLM.from_pretrained(out)
    assert linear_types(merged) == {"Linear"}
    quantized = Generator.load(str(run_dir)).model
    merged_logits, quantized_logits = logits_of(merged), logits_of(quantized)
    scale = quantized_logits.abs().max()
    # Close, not equal: the adapter corrected 4-bit weights, the merge adds it to the float ones.
    assert not torch.equal(merged_logits, quantized_logits)
    assert (merged_logits - quantized_logits).abs().max() < 0.25 * scale
    # ... and the adapter is in it: the merged model is not the untouched float base.
    base = logits_of(load_model(resolve_model(str(tiny_model_dir))))
    assert not torch.allclose(merged_logits, base, atol=1e-6)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("settings", [QLORA, {**QLORA, "quant_type": "fp4", "double_quant": False},
                                      {"load_in": "8bit"}], ids=["nf4", "fp4", "8bit"])
def test_quantized_logits_are_close_to_float(tiny_model_dir, settings):
    source = resolve_model(str(tiny_model_dir))
    reference = logits_of(load_model(source))
    source.quantization = Quantization.from_model_config(settings)
    model = load_model(source)
    expected = "Linear8bitLt" if settings["load_in"] == "8bit" else "Linear4bit"
    assert linear_types(model) == {expected}
    logits = logits_of(model)
    error = (logits - reference).abs()
    assert error.max() < 0.25 * reference.abs().max()
    # The next-token choice mostly survives quantization of a random tiny model.
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.5


def test_qlora_with_gradient_checkpointing_trains(make_config, qa_file):
    config = make_config(qa_file, model=QLORA, train={"max_steps": 2, "gradient_checkpointing": True})
    summary = run_training(config, log=quiet)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))


@pytest.mark.parametrize("name, cls", [("adamw8bit", "AdamW8bit"), ("paged_adamw8bit", "PagedAdamW8bit")])
def test_eight_bit_optimizers_train_with_uint8_states(make_config, qa_file, name, cls):
    """train.optimizer picks bitsandbytes' 8-bit AdamW: its moments are stored as uint8 for large tensors."""
    from tuneforge.engine.trainer import Trainer

    pytest.importorskip("bitsandbytes")
    recipe = Trainer(make_config(qa_file, lora={"enabled": False}, train={"max_steps": 2, "optimizer": name,
                                                                            "lr": 1e-3}),
                       log=lambda m: None, show_progress=False, run_dir=False)
    recipe.setup()
    assert type(recipe.optimizer).__name__ == cls
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    summary = recipe.train()
    assert summary["steps"] == 2
    states = [s for s in recipe.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # the embedding (49152 x 64) is large enough
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in recipe.model.named_parameters())
    assert moved > 1e-5
