"""The checks a built :class:`tuneforge.config.RunConfig` must pass before any data or model is loaded.

Types were checked while building; here come ranges, options against each other, and options against the method.
What a method supports is asked of its :class:`tuneforge.recipes.registry.MethodSpec`, never read off its name; the
method's own section checks itself (``check(config)``, beside its recipe).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.config_sections import SHARED_RANGES
from tuneforge.errors import ConfigError
from tuneforge.paths import TEMPLATE_NAMES, is_template_path
from tuneforge.recipes import registry

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.recipes.registry import MethodSpec

KNOWN_LOGGERS = ("tensorboard", "wandb", "mlflow", "trackio")
# Validation metrics of loss-based methods, which a method without loss validation never logs.
LOSS_METRICS = ("val_loss", "val_perplexity")


def section_ranges(cls: type) -> dict:
    """A method section's ``RANGES``, its base classes' included (``PPOConfig`` has ``RolloutConfig``'s too)."""
    ranges: dict = {}
    for base in reversed(cls.__mro__):
        ranges.update(vars(base).get("RANGES", {}))
    return ranges


def all_ranges() -> dict[str, tuple[float | None, float | None]]:
    """Dotted key -> (smallest allowed, largest allowed) of every shared and method option that has a range."""
    ranges = dict(SHARED_RANGES)
    for section, cls in registry.sections().items():
        ranges.update({f"{section}.{name}": bounds for name, bounds in section_ranges(cls).items()})
    return ranges


def supporting(flag: str) -> str:
    """The methods whose spec has ``flag`` set, for messages: ``sft``, or ``sft, dpo``."""
    return ", ".join(name for name, spec in registry.methods().items() if getattr(spec, flag))


def check_config(config: RunConfig) -> MethodSpec:
    """Raise a :class:`ConfigError` naming the first option that is out of range or does not fit the run;
    returns the run's method spec. Every section's ranges are checked (an unused section must still be valid)."""
    spec = registry.get(config.method)  # an unknown method: a ConfigError with the closest name
    for key, (low, high) in all_ranges().items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {bounds}")
    _check_template(config.data.template)
    _check_quantization(config)
    _check_method(config, spec)
    target = config.lora.target_modules
    if not (target == "all-linear" or (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        raise ConfigError(f"lora.target_modules: expected 'all-linear' or a list of module names, got {target!r}")
    if len(config.train.betas) != 2 or not all(isinstance(b, (int, float)) for b in config.train.betas):
        raise ConfigError(f"train.betas: expected two numbers, got {config.train.betas!r}")
    if not config.eval.metric.startswith("val_"):
        raise ConfigError(f"eval.metric: {config.eval.metric!r} is not a validation metric; use val_loss, "
                          "val_perplexity or another logged val_* metric")
    config.eval.check(spec, _validates(config), config.distributed.strategy)
    for name in config.log.loggers:
        if name not in KNOWN_LOGGERS:
            raise ConfigError(f"log.loggers: unknown logger {name!r}; use any of {', '.join(KNOWN_LOGGERS)}")
    return spec


def _validates(config: RunConfig) -> bool:
    """Whether the run has validation rows."""
    return bool(config.data.validation) or config.data.val_fraction > 0


def _check_quantization(config: RunConfig) -> None:
    if config.model.load_in == "none":
        return
    if not config.lora.enabled:
        # bitsandbytes weights are integer codes with no gradient: only adapters on top of them can train.
        raise ConfigError(f"model.load_in: a {config.model.load_in} base cannot be fully fine-tuned; set "
                          "lora.enabled=true (QLoRA) or model.load_in=none")
    if config.distributed.strategy == "fsdp":
        raise ConfigError(f"model.load_in: a {config.model.load_in} base is not supported with "
                          "distributed.strategy=fsdp; use ddp (every rank holds the whole quantized model)")


def _check_method(config: RunConfig, spec: MethodSpec) -> None:
    """The data and performance options against what the method supports, then its own section."""
    method = spec.name
    if config.data.packing and not spec.packing:
        raise ConfigError(f"data.packing: method {method} compares whole sequences (one score or log-prob per "
                          f"sequence); packing is for {supporting('packing')} only")
    if config.data.train_on_prompt and not spec.train_on_prompt:
        raise ConfigError(f"data.train_on_prompt: method {method} scores the responses only")
    _check_performance_options(config, spec)
    if config.data.streaming:
        from tuneforge.data.streaming import check_streaming  # torch and the data stack: only when asked

        check_streaming(config)
    section = registry.section_of(config)
    if section is not None and hasattr(section, "check"):
        section.check(config)
    if not spec.loss_validation and _validates(config) and config.eval.metric in LOSS_METRICS:
        raise ConfigError(f"eval.metric: method {method} evaluates by generating, and logs val_reward "
                          f"(no {config.eval.metric}); set eval.metric=val_reward")
    if not spec.fsdp and config.distributed.strategy == "fsdp":
        raise ConfigError(f"distributed.strategy: method {method} generates with the unsharded model, so it runs "
                          "with ddp only for now; set distributed.strategy=ddp")


def _check_performance_options(config: RunConfig, spec: MethodSpec) -> None:
    """``data.group_by_length``, ``model.attn_implementation=flex_attention`` and ``train.compile`` against the
    method and the other options."""
    method = spec.name
    if config.data.group_by_length and config.data.packing:
        raise ConfigError("data.group_by_length and data.packing cannot both be on: packing already removes the "
                          "padding that grouping by length reduces; set one of them to false")
    if config.data.group_by_length and spec.online:
        raise ConfigError(f"data.group_by_length: method {method} batches prompts for sampling, which it "
                          "does not group; set data.group_by_length=false")
    if config.model.attn_implementation == "flex_attention" and not spec.kernels:
        raise ConfigError(f"model.attn_implementation=flex_attention: for method {supporting('kernels')} (packed "
                          f"rows get a block mask from their position ids); method {method} passes its own (seq, seq) "
                          "masks, which transformers' FlexAttention would read as scores; use sdpa")
    if config.train.compile and not spec.kernels:
        raise ConfigError(f"train.compile: supported for method {supporting('kernels')} only for now (method "
                          f"{method}); set train.compile=false")
    if config.train.compile and config.distributed.strategy == "fsdp":
        raise ConfigError("train.compile: not supported with distributed.strategy=fsdp yet (FSDP shards each "
                          "decoder layer inside the compiled decoder); use ddp or set train.compile=false")


def _check_template(spec: str) -> None:
    if spec in TEMPLATE_NAMES:
        return
    if is_template_path(spec):
        if not Path(spec).is_file():
            raise ConfigError(f"data.template: template file {spec} does not exist")
        return
    close = difflib.get_close_matches(spec, TEMPLATE_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"data.template: unknown template {spec!r}{hint}; use {', '.join(TEMPLATE_NAMES)}, "
                      "or the path of a .jinja file")
