"""Config loading: YAML quirks, dotted overrides, paths relative to the config file."""

from __future__ import annotations

import pytest

from tuneforge.config import TEMPLATE_NAMES, apply_overrides, config_from_dict, load_config, parse_override
from tuneforge.data.templates import BUILTIN
from tuneforge.errors import ConfigError


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
