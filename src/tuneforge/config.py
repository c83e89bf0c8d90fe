"""Typed, validated run configuration.

A run is described by one YAML file plus ``key=value`` overrides with dotted keys (``lora.r=8``).
Unknown keys, wrong types and out-of-range values fail here, before any data or model is loaded.

The flow: the shared sections (``tuneforge.config_sections``) and each method's own section (beside its recipe,
found through ``tuneforge.recipes.registry``) make a :class:`RunConfig`; this module builds one from a mapping
(coercing each value to its annotation), ``tuneforge.config_checks`` validates it, and this module loads and saves
it. ``tuneforge train --help`` prints every option with its type and default (:func:`describe_options`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from tuneforge.config_aliases import describe_aliases, translate_aliases, translate_overrides
from tuneforge.config_checks import check_config
from tuneforge.config_sections import (GENERATION_METRICS, GENERATION_PREFIX, SHARED_RANGES, DataConfig,
                                       DistributedConfig, EvalConfig, LogConfig, LoraConfig, ModelConfig,
                                       SaveConfig, TrainConfig)
from tuneforge.data.memory import InMemoryRows, recorded
from tuneforge.data.sources import check_data_value
from tuneforge.errors import ConfigError
# Where paths in a config are resolved (relative to the config file, or to the working directory for overrides).
from tuneforge.paths import RUN_CONFIG_PATHS, TEMPLATE_NAMES, overridden_keys, resolve_paths
from tuneforge.recipes import registry

# The names the rest of tuneforge imports from here (the sections and constants live in config_sections).
__all__ = ["GENERATION_METRICS", "GENERATION_PREFIX", "SHARED_RANGES", "TEMPLATE_NAMES", "DataConfig",
           "DistributedConfig", "EvalConfig", "LogConfig", "LoraConfig", "ModelConfig", "RunConfig", "SaveConfig",
           "TrainConfig", "apply_overrides", "config_from_dict", "default_sections", "describe_options",
           "load_config", "parse_override", "read_yaml_mapping", "save_config"]


def default_sections() -> dict[str, Any]:
    """Every method section at its defaults, by config key (``dpo``, ``grpo`` ...), in registry order."""
    return {key: cls() for key, cls in registry.sections().items()}


@dataclass
class RunConfig:
    """A whole run: the method, the shared sections and every method's own section.

    ``method`` picks the recipe (``tuneforge train --help`` lists the registered ones with a line each). Each
    method reads its own section (``config.method_section``; ``grpo`` and ``rloo`` share ``grpo``); the others
    are validated but ignored. Method sections are held in ``sections`` by config key and read as attributes
    (``config.dpo.beta``); :meth:`to_dict` writes each under its own top-level key, as a config file has them.
    """

    method: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sections: dict = field(default_factory=dict)  # filled with every registered section by __post_init__

    def __post_init__(self) -> None:
        # A copy (dataclasses.replace hands over the same dict: the two configs must not share it), with every
        # registered section present (at its defaults where not given), so `config.kto` always exists.
        object.__setattr__(self, "sections", {**default_sections(), **self.sections})

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a method section by its key. Guarded against a half-built object
        # (copy and pickle look attributes up before __dict__ is filled).
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            sections[name] = value  # `config.dpo = DPOConfig(...)` replaces the section, as a field would be
        else:
            object.__setattr__(self, name, value)

    @property
    def method_section(self) -> Any:
        """The run's own method section (``dpo`` for dpo, ``grpo`` for grpo and rloo); None for a method without
        one (sft)."""
        return registry.section_of(self)

    def to_dict(self) -> dict:
        """Plain values (what config.yaml holds), each method section under its own key; rows given in memory
        become their placeholder (``tuneforge.data.memory``)."""
        values = dataclasses.asdict(self)
        values.update(values.pop("sections"))
        for section, key in (("data", "train"), ("data", "validation"), ("eval", "generation_data")):
            values[section][key] = recorded(values[section][key])
        return values


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting only where it is lossless and expected."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        # YAML 1.1 reads "2e-4" as a string; accept any string that is a plain number.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        # NaN passes every range check (all comparisons are false), so it is refused here.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return number
    if annotation is str:
        # Rows in memory stand where a data file's path does; only the Python API makes them (YAML cannot).
        if isinstance(value, (str, InMemoryRows)):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module


def _refuse_unknown(values: dict, names: list[str], prefix: str) -> None:
    for key in values:
        if key not in names:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}")


def _section(cls: type, value: Any, key: str) -> Any:
    """A section (a dataclass) from its mapping; ``key`` names it in messages."""
    if value is None:  # a YAML section whose keys are all commented out
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
    return _build(cls, value, key + ".")


def _field_values(cls: type, values: dict, prefix: str) -> dict:
    """The constructor arguments of dataclass ``cls`` for the keys ``values`` gives, each coerced to its type."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in (f.name for f in dataclasses.fields(cls)):
        if name not in values:
            continue
        annotation, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _section(annotation, values[name], key)
        else:
            kwargs[name] = _coerce(values[name], annotation, key)
    return kwargs


def _build(cls: type, values: dict, prefix: str) -> Any:
    """A dataclass from a mapping: unknown keys are refused with the closest known one, values coerced."""
    _refuse_unknown(values, [f.name for f in dataclasses.fields(cls)], prefix)
    return cls(**_field_values(cls, values, prefix))


def _build_run(values: dict) -> RunConfig:
    """A :class:`RunConfig` from a mapping whose top-level keys are ``method``, the shared sections and the
    method sections of the registry (each built with its own class)."""
    sections = registry.sections()
    shared = [f.name for f in dataclasses.fields(RunConfig) if f.name != "sections"]
    _refuse_unknown(values, shared + list(sections), "")
    kwargs = _field_values(RunConfig, {key: value for key, value in values.items() if key in shared}, "")
    kwargs["sections"] = {key: _section(cls, values[key], key) for key, cls in sections.items() if key in values}
    return RunConfig(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.r=8"`` -> (["lora", "r"], 8). The value is read as YAML, so ``true``, ``1e-4``, ``[a, b]`` work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (for example train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught later by :func:`config_from_dict`."""
    result = _deep_copy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(values: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}

def config_from_dict(values: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig`; raises :class:`ConfigError` naming the offending key."""
    if not isinstance(values, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(values).__name__}")
    config = _build_run(translate_aliases(values))  # Hugging Face names (learning_rate) first
    check_config(config)
    check_data_value(config.data.train, "data.train", required=True)
    check_data_value(config.data.validation, "data.validation")
    check_data_value(config.eval.generation_data, "eval.generation_data")
    return config


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """The mapping a YAML file holds; a missing file, invalid YAML or another shape is a :class:`ConfigError`
    naming the file (``what`` names the kind of file, ``shape`` says what it must hold)."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: {shape}")
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or start from defaults when ``path`` is None), apply overrides, validate.

    Paths written in the file are relative to the file's folder, paths in ``overrides`` to the working directory;
    both come out absolute (``tuneforge.paths``). Hub ids and template names stay as written.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        values = translate_aliases(read_yaml_mapping(path, "config file", "the config must be a mapping of sections"))
        values = resolve_paths(values, path.parent, RUN_CONFIG_PATHS)
    overrides = translate_overrides(overrides or [])  # before the paths they set are resolved
    values = apply_overrides(values, overrides)
    changed = overridden_keys(RUN_CONFIG_PATHS, [".".join(parse_override(text)[0]) for text in overrides])
    values = resolve_paths(values, Path.cwd(), RUN_CONFIG_PATHS, only=changed)
    return config_from_dict(values)


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))



def _describe_section(key: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints[f.name]
        if get_origin(hint) is Literal:
            kind = " | ".join(str(choice) for choice in get_args(hint))
        else:
            kind = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        lines.append(f"  {key}.{f.name} ({kind}) = {default!r}")
    return lines


def describe_options() -> str:
    """The methods (name and summary), then one line per option: dotted key, type and default (for ``--help``)."""
    specs = registry.methods()
    width = max(map(len, specs), default=0)
    lines = [f"  method = {RunConfig.method!r}, one of:"]
    lines += [f"      {name:<{width}}  {spec.summary}" for name, spec in specs.items()]
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[section.name]):
            lines += _describe_section(section.name, hints[section.name])
    for key, cls in registry.sections().items():
        lines += _describe_section(key, cls)
    return "\n".join(lines) + describe_aliases()
