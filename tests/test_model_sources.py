"""Model sources a user can name: a hub id without a hub, a GGUF file (slow: the real 135M default)."""

from __future__ import annotations

import re
import time

import pytest
import torch

from tuneforge.cli import main as cli_main
from tuneforge.config import load_config
from tuneforge.errors import ModelSourceError
from tuneforge.models import loading


def test_unreachable_hub_gives_a_clear_message_fast(monkeypatch, capsys):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ModelSourceError, match="cannot load 'someorg/some-model' from the Hugging Face hub"):
        loading.resolve_model("someorg/some-model")
    assert time.perf_counter() - started < 5
    assert cli_main(["generate", "someorg/some-model", "--prompt", "hi"]) == 2
    assert "huggingface-cli download" in capsys.readouterr().err


def test_offline_mode_counts_as_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_reachable() is False


@pytest.mark.parametrize("spec", ["{tmp}/nothing-here", "./nothing-here", "../nothing-here", "runs/velmora-sft",
                                  "model.gguf", "a/b/c"])
def test_missing_local_paths_are_not_taken_for_hub_ids(spec, tmp_path, monkeypatch, capsys):
    """A value that looks like a path (./ ../ / ~, a .gguf suffix, an existing parent folder such as runs/) is
    reported as a missing path, with the absolute place it was looked for, not as a hub id that cannot load."""
    (tmp_path / "cwd" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    spec = spec.format(tmp=tmp_path)
    where = (tmp_path / "cwd" / spec).resolve()
    message = (f"model.name_or_path: no such file or folder: {where} (relative paths in a config file are relative "
               "to that file; on the command line, to the working directory)")
    with pytest.raises(ModelSourceError) as error:
        loading.resolve_model(spec)
    assert str(error.value) == message
    assert cli_main(["generate", spec, "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_missing_model_path_in_a_config_is_named_relative_to_the_config(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    (configs / "runs").mkdir(parents=True)
    (configs / "run.yaml").write_text("model:\n  name_or_path: runs/velmora-sft\ndata:\n  train: d.jsonl\n")
    (tmp_path / "cwd" / "runs" / "velmora-sft").mkdir(parents=True)  # the working directory's is not the one meant
    monkeypatch.chdir(tmp_path / "cwd")
    config = load_config(configs / "run.yaml")
    assert config.model.name_or_path == str(configs / "runs" / "velmora-sft")
    with pytest.raises(ModelSourceError, match=re.escape(f"no such file or folder: {configs / 'runs' / 'velmora-sft'} "
                                                         "(relative paths in a config file are relative to that file")):
        loading.resolve_model(config.model.name_or_path)


def test_hub_ids_are_still_hub_ids(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    for spec in ("someorg/some-model", "gpt2"):
        with pytest.raises(ModelSourceError, match=f"cannot load '{spec}' from the Hugging Face hub"):
            loading.resolve_model(spec)


@pytest.mark.slow
def test_import_gguf_round_trip_matches_transformers_gguf_loading(tmp_path):
    """`tuneforge import-gguf` writes a plain checkpoint whose logits equal transformers' own GGUF loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = loading.embedded_gguf_path()
    out = tmp_path / "imported"
    assert cli_main(["import-gguf", str(gguf), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    # A second import into the same (now non-empty) folder is refused: nothing the user made is overwritten.
    assert cli_main(["import-gguf", str(gguf), str(out)]) == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    imported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, direct(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lora_sft_on_the_default_model_learns_and_generates(tmp_path):
    """Two epochs on a handful of Velmora facts lower the response loss of the 135M default model."""
    from pathlib import Path

    from tuneforge.config import config_from_dict
    from tuneforge.data.formats import Message
    from tuneforge.generation import Generator
    from tuneforge.engine.trainer import run_training

    data = Path(__file__).parents[1] / "examples" / "data"
    config = config_from_dict({
        "data": {"train": str(data / "velmora_train.jsonl"), "validation": str(data / "velmora_eval.jsonl"),
                 "max_length": 128},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 8, "lr": 2e-3,
                  "log_every": 4, "mixed_precision": "no"},
        "eval": {"every": 12},
    })
    summary = run_training(config, log=lambda m: None)
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 12
    assert summary["val_loss"] < 2.0  # the base model is above 3 nats/token on these responses
    question = [Message("user", "What is the capital of Velmora?")]
    answer = Generator.load(summary["run_dir"]).generate([question], max_new_tokens=24)[0]
    assert answer and "Velmora" in answer


def test_a_gguf_is_imported_once_when_processes_start_together(monkeypatch, tmp_path):
    """Two runs starting at once on the same GGUF (or the default model) do not both import it: the second
    waits on the lock beside the target and then finds the checkpoint there (before, the slower one crashed
    renaming its copy onto the other's: 'Directory not empty')."""
    import threading
    import time

    calls = []

    def slow_import(gguf_file, out_dir, dtype="float32"):
        calls.append(out_dir)
        time.sleep(0.3)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(loading, "import_gguf", slow_import)
    target = tmp_path / "cache" / "models" / "m"
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading._import_once(tmp_path / "m.gguf", target)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target, target]
    assert calls == [target]
