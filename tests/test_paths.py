"""One rule for paths: written in a config file, relative to that file; on the command line, to the working
directory. Run configs and `tuneforge eval --config` files alike, and resuming from another directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneforge.config import load_config
from tuneforge.engine.checkpoint import config_differences
from tuneforge.errors import ConfigError
from tuneforge.eval.evaluate import load_settings


def write_yaml(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory that holds none of the files (every path must come from the config's folder)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_every_path_in_a_run_config_is_relative_to_the_file(tmp_path, elsewhere):
    configs = tmp_path / "configs"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    path = write_yaml(configs / "run.yaml", {
        "model": {"name_or_path": "../models/tiny"},
        "data": {"train": "data/train.jsonl", "validation": "data/val.jsonl", "template": "chat.jinja"},
        "train": {"output_dir": "../runs/sft"},
        "eval": {"generation_data": "data/gen.jsonl", "generation_metrics": ["contains", "metrics.py:says"]},
        "grpo": {"reward_functions": ["rewards.py:brevity", "tuneforge.rewards.functions:exact_answer"],
                 "reward_model": "../runs/rm"},
        "ppo": {"reward_functions": ["../shared/rewards.py:length"], "reward_model": "org/reward-model"}})
    (configs / "chat.jinja").write_text("{{ messages }}")
    config = load_config(path)
    assert config.model.name_or_path == str(tmp_path / "models" / "tiny")
    assert (config.data.train, config.data.validation) == (str(configs / "data" / "train.jsonl"),
                                                           str(configs / "data" / "val.jsonl"))
    assert config.data.template == str(configs / "chat.jinja")
    assert config.train.output_dir == str(tmp_path / "runs" / "sft")
    assert config.eval.generation_data == str(configs / "data" / "gen.jsonl")
    assert config.eval.generation_metrics == ["contains", f"{configs / 'metrics.py'}:says"]
    assert config.grpo.reward_functions == [f"{configs / 'rewards.py'}:brevity",
                                            "tuneforge.rewards.functions:exact_answer"]
    assert config.grpo.reward_model == str(tmp_path / "runs" / "rm")  # missing, but ../ says it is a path
    assert config.ppo.reward_functions == [f"{tmp_path / 'shared' / 'rewards.py'}:length"]
    assert config.ppo.reward_model == "org/reward-model"  # a hub id
    assert not any(elsewhere.iterdir())


def test_the_working_directory_is_not_a_fallback_for_config_paths(tmp_path, elsewhere):
    (elsewhere / "train.jsonl").write_text("{}\n")
    path = write_yaml(tmp_path / "configs" / "run.yaml", {"data": {"train": "train.jsonl"}})
    assert load_config(path).data.train == str(tmp_path / "configs" / "train.jsonl")


@pytest.mark.parametrize("value, expected", [
    ("default", "default"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # no such folder: a hub id
    ("gpt2", "gpt2"),
    ("local/model", "{configs}/local/model"),  # that folder exists next to the config
    ("runs/velmora-sft", "{configs}/runs/velmora-sft"),  # missing, but its parent runs/ exists: a path
    ("model.gguf", "{configs}/model.gguf"),
])
def test_model_values_stay_hub_ids_unless_they_name_a_local_path(value, expected, tmp_path, elsewhere):
    configs = tmp_path / "configs"
    (configs / "local" / "model").mkdir(parents=True)
    (configs / "runs").mkdir()
    path = write_yaml(configs / "run.yaml", {"model": {"name_or_path": value}, "data": {"train": "t.jsonl"}})
    assert load_config(path).model.name_or_path == expected.format(configs=configs)


def test_command_line_paths_are_relative_to_the_working_directory(tmp_path, elsewhere):
    (elsewhere / "models" / "mine").mkdir(parents=True)
    path = write_yaml(tmp_path / "configs" / "run.yaml", {"data": {"train": "t.jsonl"}})
    config = load_config(path, ["data.train=rows.jsonl", "model.name_or_path=models/mine", "train.output_dir=out",
                                "grpo.reward_functions=[r.py:f]", "ppo.reward_model=org/rm"])
    assert config.data.train == str(elsewhere / "rows.jsonl")
    assert config.model.name_or_path == str(elsewhere / "models" / "mine")
    assert config.train.output_dir == str(elsewhere / "out")
    assert config.grpo.reward_functions == [f"{elsewhere / 'r.py'}:f"]
    assert config.ppo.reward_model == "org/rm"
    assert config.data.validation is None  # untouched keys keep their defaults


def test_a_missing_template_file_is_named_where_it_was_looked_for(tmp_path, elsewhere):
    path = write_yaml(tmp_path / "configs" / "run.yaml", {"data": {"train": "t.jsonl", "template": "t/chat.jinja"}})
    with pytest.raises(ConfigError, match=f"template file {tmp_path / 'configs' / 't' / 'chat.jinja'} does not"):
        load_config(path)


def test_the_resolved_config_resumes_from_another_directory(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    path = write_yaml(configs / "run.yaml", {"data": {"train": "train.jsonl", "template": "chat.jinja"},
                                             "train": {"output_dir": "../runs/sft"}})
    (configs / "chat.jinja").write_text("{{ messages }}")
    monkeypatch.chdir(tmp_path)
    first = load_config(path)
    monkeypatch.chdir(configs)
    second = load_config(Path("run.yaml"))
    assert config_differences(first, second) == []
    assert second.train.output_dir == str(tmp_path / "runs" / "sft")
    # A run saved before paths became absolute holds them relative to its working directory: the same files.
    old = load_config(None, ["data.train=train.jsonl", "data.template=chat.jinja"])
    old.data.train, old.data.template = "train.jsonl", "chat.jinja"
    assert config_differences(old, second) == []
    monkeypatch.chdir(tmp_path)
    assert [d.split(":")[0] for d in config_differences(old, second)] == ["data.train", "data.template"]


def test_eval_config_paths_follow_the_same_rule(tmp_path, elsewhere):
    configs = tmp_path / "configs"
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    path = write_yaml(configs / "eval.yaml", {
        "model": "../runs/sft", "compare": ["default", "org/name", "../runs/missing"], "judge": "../runs/rm",
        "data": "data/qa.jsonl", "pairs": "pairs.jsonl", "harmful": "h.jsonl", "benign": "b.jsonl",
        "template": "chatml", "metrics": "exact_match,metrics.py:fn", "out": "eval.json"})
    settings = load_settings(path, {"batch_size": 2})
    assert settings.model == str(tmp_path / "runs" / "sft")
    assert settings.compare == ["default", "org/name", str(tmp_path / "runs" / "missing")]
    assert settings.judge == str(tmp_path / "runs" / "rm")
    assert (settings.data, settings.pairs) == (str(configs / "data" / "qa.jsonl"), str(configs / "pairs.jsonl"))
    assert (settings.harmful, settings.benign) == (str(configs / "h.jsonl"), str(configs / "b.jsonl"))
    assert settings.template == "chatml"
    assert settings.metrics == ["exact_match", f"{configs / 'metrics.py'}:fn"]
    assert settings.out == str(configs / "eval.json")
    # Flags are the command line: as written, relative to the working directory.
    assert load_settings(path, {"out": "here.json"}).out == "here.json"
