"""The user-facing verbs on the tiny model: generate, chat, merge, plot, --help, and LoRA variants."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from safetensors.torch import load_file

from tuneforge.cli import main as cli_main
from tuneforge.recipes import registry


@pytest.fixture
def trained_run(tiny_model_dir, qa_file, tmp_path):
    config = {"model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(qa_file), "max_length": 64},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "lr": 1e-2,
                        "mixed_precision": "no"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", str(path)]) == 0
    return tmp_path / "run", path


def test_help_lists_every_verb_and_every_config_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = capsys.readouterr().out
    for verb in ("train", "data", "generate", "chat", "import-gguf", "merge", "bench", "plot"):
        assert verb in text
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("lora.r", "train.lr", "data.template", "eval.patience", "save.every", "distributed.strategy",
                "dpo.beta", "grpo.num_generations", "ppo.kl_coef", "reward.center_coefficient"):
        assert key in text
    # Every registered method with its summary (the registry, not a list kept in the CLI).
    for name, spec in registry.methods().items():
        assert re.search(rf"^ +{name} +{re.escape(spec.summary)}$", text, re.MULTILINE), name


def test_generate_and_chat_use_the_run(trained_run, capsys, monkeypatch):
    run_dir, _ = trained_run
    # A random tiny model may answer nothing useful; what is checked here is that the verbs run end to end.
    assert cli_main(["generate", str(run_dir), "--prompt", "What is item 3?", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    replies = iter(["What is item 1?", "/reset", "What is item 2?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert cli_main(["chat", str(run_dir), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("assistant>") == 2


def test_run_directory_rerun_is_refused_without_overwrite(trained_run, capsys):
    run_dir, config = trained_run
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert cli_main(["train", str(config)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert cli_main(["train", str(config), "--overwrite", "train.max_steps=1"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1


def test_merge_cli_writes_a_plain_checkpoint(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "merged"
    assert cli_main(["merge", str(run_dir), str(out)]) == 0
    weights = load_file(str(next(out.glob("*.safetensors"))))
    assert weights and not any("lora" in name for name in weights)


@pytest.mark.parametrize("variant", ["use_rslora", "use_dora"])
def test_lora_variants_train_and_save_in_peft_format(tiny_model_dir, qa_file, tmp_path, variant):
    config = {"model": {"name_or_path": str(tiny_model_dir)},
              "data": {"train": str(qa_file), "max_length": 64},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0, variant: True, "target_modules": ["q_proj", "v_proj"]},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4,
                        "mixed_precision": "no"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", str(path)]) == 0
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter[variant] is True
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    names = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")).keys()
    assert all("q_proj" in n or "v_proj" in n for n in names)
    if variant == "use_dora":
        assert any("lora_magnitude_vector" in n for n in names)
