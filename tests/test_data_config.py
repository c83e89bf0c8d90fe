"""Config loading: YAML quirks, dotted overrides, paths relative to the config file; method sections from the
registry and the options checked against what a method supports."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from tuneforge.config import (TEMPLATE_NAMES, RunConfig, apply_overrides, config_from_dict, load_config,
                              parse_override)
from tuneforge.data.templates import BUILTIN
from tuneforge.errors import ConfigError
from tuneforge.recipes import registry


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-4 as the string "2e-4".
    config_file = write(tmp_path / "c.yaml", "data:\n  train: d.jsonl\ntrain:\n  lr: 2e-4\n  max_grad_norm: 1\n")
    config = load_config(config_file)
    assert config.train.lr == pytest.approx(2e-4) and isinstance(config.train.lr, float)
    assert config.train.max_grad_norm == 1.0 and isinstance(config.train.max_grad_norm, float)


def test_dotted_overrides(tmp_path):
    config_file = write(tmp_path / "c.yaml", "data:\n  train: d.jsonl\nlora:\n  r: 16\n")
    config = load_config(config_file, ["lora.r=8", "train.lr=1e-4", "data.packing=true", "train.betas=[0.8, 0.9]",
                                       "data.system_prompt=Be brief.", "train.max_steps=null"])
    assert config.lora.r == 8
    assert config.train.lr == pytest.approx(1e-4)
    assert config.data.packing is True
    assert config.train.betas == [0.8, 0.9]
    assert config.data.system_prompt == "Be brief."
    assert config.train.max_steps is None


def test_override_parsing_and_errors():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], "3e-4")
    assert parse_override("data.system_prompt=a=b") == (["data", "system_prompt"], "a=b")
    assert apply_overrides({"lora": {"r": 4}}, ["lora.alpha=8"]) == {"lora": {"r": 4, "alpha": 8}}
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("lora.r")
    with pytest.raises(ConfigError, match="'lora' is not a section"):
        apply_overrides({"lora": 3}, ["lora.r=8"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.alpah' \(did you mean 'lora\.alpha'\?\)"):
        config_from_dict(apply_overrides({"data": {"train": "x"}}, ["lora.alpah=8"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rank' \(known keys: enabled, r, alpha"):
        config_from_dict(apply_overrides({"data": {"train": "x"}}, ["lora.rank=8"]))


def test_relative_data_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    config_file = write(tmp_path / "configs" / "run.yaml",
                        "data:\n  train: data/train.jsonl\n  validation: ../shared/val.jsonl\n"
                        "  template: templates/chat.jinja\n")
    write(tmp_path / "configs" / "data" / "train.jsonl", "{}\n")
    write(tmp_path / "configs" / "templates" / "chat.jinja", "{{ messages }}")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(config_file)
    assert config.data.train == str(tmp_path / "configs" / "data" / "train.jsonl")
    assert config.data.validation == str(tmp_path / "shared" / "val.jsonl")  # absolute, `..` folded
    assert config.data.template == str(tmp_path / "configs" / "templates" / "chat.jinja")


def test_absolute_paths_and_template_names_are_left_alone(tmp_path):
    absolute = write(tmp_path / "abs" / "train.jsonl", "{}\n")
    config_file = write(tmp_path / "c.yaml", f"data:\n  train: {absolute}\n  template: chatml\n")
    # A file next to the config named like a builtin template does not shadow the builtin.
    write(tmp_path / "chatml", "not a template")
    config = load_config(config_file)
    assert config.data.train == str(absolute)
    assert config.data.template == "chatml"


def test_override_paths_stay_relative_to_the_working_directory(tmp_path, monkeypatch):
    config_file = write(tmp_path / "configs" / "run.yaml", "data:\n  train: a.jsonl\n")
    monkeypatch.chdir(tmp_path)
    # Relative to the working directory (not to configs/), made absolute.
    assert load_config(config_file, ["data.train=b.jsonl"]).data.train == str(tmp_path / "b.jsonl")


def test_empty_section_uses_defaults(tmp_path):
    config_file = write(tmp_path / "c.yaml", "data:\n  train: d.jsonl\nlora:\n  # r: 8\ntrain:\n")
    config = load_config(config_file)
    assert config.lora.r == 16 and config.train.epochs == 3


@pytest.mark.parametrize("text, message", [
    ("data: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "the config must be a mapping of sections"),
    ("lora:\n  r: 4\n", "data.train: no training file given"),
])
def test_bad_config_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "c.yaml", text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_template_names_match_the_templates_module():
    assert set(TEMPLATE_NAMES) == {"auto", "tokenizer", *BUILTIN}


# ------------------------------------------------------------------------------------- method sections
def test_method_sections_come_from_the_registry_and_read_as_attributes():
    config = config_from_dict({"method": "rloo", "data": {"train": "p.jsonl"},
                               "grpo": {"reward_functions": ["a:b"], "beta": 0.2}, "dpo": {"beta": 0.3}})
    assert set(config.sections) == set(registry.sections())
    assert config.grpo.beta == 0.2 and config.dpo.beta == 0.3 and config.kto.beta == 0.1  # the others: defaults
    assert config.method_section is config.grpo  # rloo reads grpo's section
    assert RunConfig().method_section is None  # sft has none
    values = config.to_dict()
    assert "sections" not in values and values["grpo"]["beta"] == 0.2 and values["dpo"]["beta"] == 0.3
    assert config_from_dict(values) == config  # config.yaml reads back as the same config
    with pytest.raises(AttributeError, match="no attribute 'rollout'"):
        config.rollout


def test_a_run_config_copies_without_sharing_its_sections():
    config = config_from_dict({"method": "dpo", "data": {"train": "p.jsonl"}})
    other = dataclasses.replace(config, method="kto")
    other.dpo = type(config.dpo)(beta=0.5)  # replaces the section of `other` only
    assert config.dpo.beta == 0.1 and other.dpo.beta == 0.5 and other.method_section is other.kto
    assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config


@pytest.mark.parametrize("values, message", [
    ({"method": "dpoo"}, r"method: unknown method 'dpoo' \(did you mean 'dpo'\?\); use one of .*sft"),
    ({"method": 3}, "method: expected a string, got 3"),
    ({"dpoo": {}}, r"unknown config key 'dpoo' \(did you mean 'dpo'\?\)"),
    ({"sections": {}}, r"unknown config key 'sections' \(known keys: method, model, .*, dpo"),
    ({"dpo": {"betta": 1}}, r"unknown config key 'dpo\.betta' \(did you mean 'dpo\.beta'\?\)"),
    ({"dpo": 3}, r"dpo: expected a section \(mapping\), got 3"),
    ({"dpo": {"beta": 0}}, r"dpo\.beta: 0\.0 is out of range"),  # another method's section is checked too
    ({"ppo": {"top_p": 2}}, r"ppo\.top_p: 2\.0 is out of range"),  # a range of the shared rollout section
    ({"ppo": {"lam": 2}}, r"ppo\.lam: 2\.0 is out of range; it must be between 0\.0 and 1\.0"),
])
def test_method_section_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"train": "t.jsonl"}, **values})


@pytest.mark.parametrize("values, message", [
    ({"method": "grpo", "data": {"packing": True}}, "data.packing: method grpo .* packing is for sft only"),
    ({"method": "orpo", "data": {"train_on_prompt": True}}, "data.train_on_prompt: method orpo scores the responses"),
    ({"method": "ppo", "data": {"group_by_length": True}}, "data.group_by_length: method ppo batches prompts"),
    ({"method": "kto", "data": {"streaming": True}, "train": {"max_steps": 2}},
     r"data\.streaming: supported for method sft only \(method kto"),
    ({"method": "ppo", "data": {"val_fraction": 0.1}}, "eval.metric: method ppo evaluates by generating"),
    ({"method": "grpo", "distributed": {"strategy": "fsdp"}}, "distributed.strategy: method grpo generates with"),
    ({"method": "dpo", "dpo": {"label_smoothing": 0.1}}, "dpo.label_smoothing=0.1 has no effect with dpo.loss"),
])
def test_options_are_checked_against_what_the_method_supports(values, message):
    values = {**values, "data": {"train": "t.jsonl", **values.get("data", {})}}
    for key in ("grpo", "ppo"):
        values.setdefault(key, {"reward_functions": ["a:b"]})
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_a_section_check_runs_for_its_own_method_only():
    # dpo's check of its own options does not stop a run of another method, which ignores the dpo section.
    config = config_from_dict({"data": {"train": "t.jsonl"}, "dpo": {"label_smoothing": 0.1}})
    assert config.dpo.label_smoothing == 0.1
