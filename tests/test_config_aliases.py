"""Hugging Face key names (transformers, TRL, PEFT): accepted ones give the same RunConfig as tuneforge's keys,
in YAML, overrides and the Python API; refused ones, and an alias given beside its key, fail with the tuneforge key
to write, exit 2 through the CLI."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from conftest import QA_ROWS, write_jsonl
from tuneforge.api import build_config
from tuneforge.cli import main as cli_main
from tuneforge.config import RunConfig, config_from_dict, describe_options, load_config
from tuneforge.config_aliases import ALIASES, REFUSED
from tuneforge.errors import ConfigError
from tuneforge.recipes import registry

# A valid value, other than the default, for every key an alias stands for.
VALUES = {
    "train.lr": 1e-4, "train.epochs": 2, "train.max_steps": 7, "train.batch_size": 2, "train.grad_accum": 3,
    "train.weight_decay": 0.1, "train.warmup_ratio": 0.1, "train.warmup_steps": 5, "train.max_grad_norm": 0.5,
    "train.seed": 7, "train.log_every": 5, "train.gradient_checkpointing": True, "train.compile": True,
    "train.output_dir": "/tmp/elsewhere", "eval.every": 10, "save.every": 10, "data.max_length": 256,
    "data.packing": True, "data.group_by_length": True, "model.name_or_path": "org/model",
    "model.dtype": "bfloat16", "model.attn_implementation": "eager", "model.quant_type": "fp4",
    "model.double_quant": False, "model.compute_dtype": "bfloat16", "lora.enabled": False, "lora.r": 8,
    "lora.alpha": 16.0, "lora.dropout": 0.1, "lora.target_modules": ["q_proj", "v_proj"], "lora.use_rslora": True,
    "lora.use_dora": True,
}


@pytest.fixture
def train_file(tmp_path):
    return str(write_jsonl(tmp_path / "qa.jsonl", QA_ROWS))


def with_data(train_file: str, section: str = "", name: str = "", value=None) -> dict:
    """A config of ``train_file`` and ``name: value`` (in ``section``, or at the top level)."""
    values: dict = {"data": {"train": train_file}}
    (values.setdefault(section, {}) if section else values)[name] = value
    return values


def test_every_alias_names_a_real_key_and_is_tested():
    # The shared sections (dataclass fields of RunConfig) and the method sections of the registry.
    sections = {name: cls for name, cls in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(cls)}
    sections.update(registry.sections())
    keys = {f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)}
    assert set(ALIASES.values()) <= keys
    assert set(VALUES) == set(ALIASES.values())
    assert not set(ALIASES) & set(REFUSED)
    for _name, (section, hint) in REFUSED.items():
        assert section in sections
        assert any(key in hint for key in keys), hint  # each refusal names the tuneforge key to use


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_an_alias_at_the_top_or_in_its_section_is_the_tuneforge_key(alias, train_file):
    key = ALIASES[alias]
    section, name = key.split(".")
    value = VALUES[key]
    expected = config_from_dict(with_data(train_file, section, name, value))
    assert getattr(getattr(expected, section), name) == value
    top = config_from_dict(with_data(train_file, "", alias, value))
    inside = config_from_dict(with_data(train_file, section, alias, value))
    assert top == expected and inside == expected


def test_yaml_and_overrides_with_aliases_give_the_same_config(tmp_path, train_file, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    native = folder / "native.yaml"
    native.write_text(yaml.safe_dump({
        "data": {"train": train_file, "max_length": 256, "packing": True},
        "lora": {"alpha": 16, "dropout": 0.1}, "model": {"attn_implementation": "eager"},
        "train": {"lr": 1e-4, "epochs": 2, "batch_size": 2, "grad_accum": 4, "warmup_ratio": 0.1,
                  "gradient_checkpointing": True, "output_dir": "runs/x"}}))
    hf = folder / "hf.yaml"
    hf.write_text(yaml.safe_dump({
        "data": {"train": train_file, "max_seq_length": 256},
        "learning_rate": 1e-4, "num_train_epochs": 2, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4, "warmup_ratio": 0.1, "gradient_checkpointing": True, "packing": True,
        "lora": {"lora_alpha": 16}, "lora_dropout": 0.1, "attn_implementation": "eager",
        "output_dir": "runs/x"}))  # relative to the config file's folder, like train.output_dir
    expected = load_config(native)
    assert expected.train.output_dir == str(folder / "runs" / "x")
    assert load_config(hf) == expected

    monkeypatch.chdir(tmp_path)
    overrides = ["learning_rate=3e-5", "train.num_train_epochs=1", "max_length=64", "lora_r=4", "output_dir=out",
                 "bnb_4bit_quant_type=fp4"]
    native_overrides = ["train.lr=3e-5", "train.epochs=1", "data.max_length=64", "lora.r=4", "train.output_dir=out",
                        "model.quant_type=fp4"]
    by_alias = load_config(native, overrides)
    assert by_alias == load_config(native, native_overrides)
    assert by_alias.train.lr == 3e-5 and by_alias.train.output_dir == str(tmp_path / "out")  # relative to the cwd
    assert load_config(hf, ["train.lr=2e-5"]).train.lr == 2e-5  # an override wins over the file's alias
    assert load_config(native, ["learning_rate=2e-5"]).train.lr == 2e-5  # and an aliased override over its key


def test_the_python_api_takes_aliases_in_sections_and_configs(train_file):
    config = build_config(data=train_file, output_dir="/tmp/run", train={"learning_rate": 1e-4},
                          lora={"lora_alpha": 8})
    assert config.train.lr == 1e-4 and config.lora.alpha == 8
    config = build_config(data=train_file, output_dir="/tmp/run", config={"learning_rate": 1e-4, "seed": 3},
                          train={"lr": 5e-5})
    assert config.train.lr == 5e-5 and config.train.seed == 3  # train= overrides the config's alias


@pytest.mark.parametrize("typed, message", [
    ("bf16", "unknown config key 'bf16': bf16 is train.mixed_precision: bf16 here (the default, auto, uses bf16 "
             "where the hardware does it fast)"),
    ("train.bf16", "unknown config key 'train.bf16': bf16 is train.mixed_precision: bf16 here (the default, auto, "
                   "uses bf16 where the hardware does it fast)"),
    ("lr_scheduler_type", "unknown config key 'lr_scheduler_type': lr_scheduler_type is train.scheduler here: "
                          "constant | linear | cosine, each after the linear warmup (transformers' "
                          "constant_with_warmup is constant)"),
    ("optim", "unknown config key 'optim': optim is train.optimizer here: adamw | adamw8bit | paged_adamw8bit | "
              "paged_adamw"),
    ("load_in_4bit", "unknown config key 'load_in_4bit': load_in_4bit is model.load_in: 4bit here"),
    ("report_to", "unknown config key 'report_to': report_to is log.loggers here: a list of tensorboard, wandb, "
                  "mlflow, trackio"),
])
def test_a_refused_name_says_which_tuneforge_key_to_write(typed, message, train_file, tmp_path, capsys):
    *section, name = typed.split(".")
    values = {"data": {"train": train_file}, **({section[0]: {name: True}} if section else {name: True})}
    with pytest.raises(ConfigError) as error:
        config_from_dict(values)
    assert str(error.value) == message
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"data.train={train_file}", f"{typed}=true"])
    assert str(error.value) == message
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    assert cli_main(["train", str(path), f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


def test_every_refused_name_is_refused(train_file):
    for name, (section, hint) in REFUSED.items():
        for values in ({name: True}, {section: {name: True}}):
            with pytest.raises(ConfigError, match="^unknown config key .*: " + re.escape(hint) + "$"):
                config_from_dict({"data": {"train": train_file}, **values})


def test_a_name_refused_in_another_section_is_an_unknown_key(train_file):
    with pytest.raises(ConfigError, match="^unknown config key 'lora.bf16'"):
        config_from_dict({"data": {"train": train_file}, "lora": {"bf16": True}})


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": 1e-4, "train": {"lr": 2e-4}}, "config keys 'train.lr' and 'learning_rate' both set train.lr"),
    ({"train": {"lr": 2e-4, "learning_rate": 1e-4}},
     "config keys 'train.lr' and 'train.learning_rate' both set train.lr"),
    ({"max_seq_length": 64, "max_length": 128}, "config keys 'max_seq_length' and 'max_length' both set "
                                                "data.max_length"),
    ({"lora_alpha": 8, "lora": {"lora_alpha": 16}}, "config keys 'lora_alpha' and 'lora.lora_alpha' both set "
                                                    "lora.alpha"),
])
def test_an_alias_beside_its_key_is_an_error(values, message, train_file):
    with pytest.raises(ConfigError) as error:
        config_from_dict({**values, "data": {"train": train_file}})
    assert str(error.value) == message + "; keep one"


def test_an_alias_beside_its_key_in_overrides_is_an_error(train_file, tmp_path, capsys):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"data.train={train_file}", "learning_rate=1e-4", "train.lr=2e-4"])
    assert str(error.value) == "overrides 'learning_rate' and 'train.lr' both set train.lr; keep one"
    with pytest.raises(ConfigError, match="overrides 'train.lr' and 'learning_rate' both set train.lr"):
        load_config(None, [f"data.train={train_file}", "train.lr=2e-4", "learning_rate=1e-4"])
    # One name twice keeps the last, as before.
    assert load_config(None, [f"data.train={train_file}", "learning_rate=1e-4", "learning_rate=2e-4"]).train.lr == 2e-4
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": train_file}, "train": {"output_dir": str(tmp_path / "run")}}))
    assert cli_main(["train", str(path), "max_seq_length=64", "max_length=128"]) == 2
    assert capsys.readouterr().err.strip() == ("error: overrides 'max_seq_length' and 'max_length' both set "
                                               "data.max_length; keep one")


def test_help_lists_the_aliases():
    text = describe_options()
    assert "learning_rate = train.lr" in text and "max_seq_length = data.max_length" in text
    assert "bf16 is train.mixed_precision: bf16 here" in text
