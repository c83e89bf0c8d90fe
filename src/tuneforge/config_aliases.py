"""The names transformers, TRL and PEFT users type, mapped onto tuneforge's config keys.

An option that means the same thing and takes the same values is accepted under its Hugging Face name, at the top
level of a config or an override (``learning_rate: 1e-4``, ``learning_rate=1e-4``) or in its own section
(``train: {learning_rate: 1e-4}``), and becomes the tuneforge key before anything else reads the config. A name
whose meaning or values differ (``bf16``, ``lr_scheduler_type``, ``optim``) is refused with the tuneforge key to
write instead. An alias and its tuneforge key (or two aliases of one key) given together are an error: which one
wins would be a guess. The table is documented in docs/training.md.
"""

from __future__ import annotations

import textwrap

from tuneforge.errors import ConfigError

# Hugging Face name -> tuneforge key: the same option, the same values.
ALIASES: dict[str, str] = {
    # transformers.TrainingArguments / TRL's configs
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "weight_decay": "train.weight_decay",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "logging_steps": "train.log_every",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "torch_compile": "train.compile",
    "output_dir": "train.output_dir",
    "eval_steps": "eval.every",
    "save_steps": "save.every",
    # TRL's SFTConfig (max_seq_length in older TRL, max_length now)
    "max_seq_length": "data.max_length",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "group_by_length": "data.group_by_length",
    # TRL's ModelConfig and PEFT's LoraConfig
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "bnb_4bit_quant_type": "model.quant_type",
    "bnb_4bit_use_double_quant": "model.double_quant",
    "bnb_4bit_compute_dtype": "model.compute_dtype",
    "use_peft": "lora.enabled",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "target_modules": "lora.target_modules",
    "use_rslora": "lora.use_rslora",
    "use_dora": "lora.use_dora",
}

# Hugging Face name -> (its section here, what to write instead): not the same option or not the same values.
REFUSED: dict[str, tuple[str, str]] = {
    "bf16": ("train", "bf16 is train.mixed_precision: bf16 here (the default, auto, uses bf16 where the hardware "
                      "does it fast)"),
    "fp16": ("train", "fp16 has no counterpart here: train.mixed_precision is auto | bf16 | no (model.dtype: "
                      "float16 loads float16 weights)"),
    "lr_scheduler_type": ("train", "lr_scheduler_type is train.scheduler here: constant | linear | cosine, each "
                                   "after the linear warmup (transformers' constant_with_warmup is constant)"),
    "optim": ("train", "optim is train.optimizer here: adamw | adamw8bit | paged_adamw8bit | paged_adamw"),
    "adam_beta1": ("train", "adam_beta1 is train.betas: [beta1, beta2] here"),
    "adam_beta2": ("train", "adam_beta2 is train.betas: [beta1, beta2] here"),
    "save_total_limit": ("save", "save_total_limit is save.keep_last here (complete checkpoints kept besides the "
                                 "best one)"),
    "eval_strategy": ("eval", "eval_strategy is eval.every here: evaluate every N steps (0: at the end of each "
                              "epoch, which is always done)"),
    "report_to": ("log", "report_to is log.loggers here: a list of tensorboard, wandb, mlflow, trackio"),
    "load_in_4bit": ("model", "load_in_4bit is model.load_in: 4bit here"),
    "load_in_8bit": ("model", "load_in_8bit is model.load_in: 8bit here"),
    "assistant_only_loss": ("data", "assistant_only_loss is the default here (only responses are trained); "
                                    "data.train_on_prompt: true trains on every token"),
    "completion_only_loss": ("data", "completion_only_loss is the default here (only responses are trained); "
                                     "data.train_on_prompt: true trains on every token"),
}


def translate_aliases(values: dict) -> dict:
    """A copy of the nested config ``values`` with every alias moved to its tuneforge key (see the module)."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    given: dict[str, str] = {}  # tuneforge key -> the key as typed that sets it
    moves = []
    for typed, section, name, target in _aliases_in(values):
        target_section, target_name = target.split(".")
        section_values = values.get(target_section)
        if target not in given and isinstance(section_values, dict) and target_name in section_values:
            given[target] = target  # the tuneforge key itself is there too
        if target in given:
            raise ConfigError(f"config keys '{given[target]}' and '{typed}' both set {target}; keep one")
        given[target] = typed
        moves.append((section, name, target_section, target_name))
    for section, name, target_section, target_name in moves:
        value = (out[section] if section else out).pop(name)
        if out.get(target_section) is None:
            out[target_section] = {}
        if isinstance(out[target_section], dict):  # else it is not a section, which the config check reports
            out[target_section][target_name] = value
    return out


def translate_overrides(overrides: list[str]) -> list[str]:
    """``key=value`` overrides with each aliased key replaced by its tuneforge key (the value text kept). Setting
    one key twice keeps the last, as before; setting it under two names is an error."""
    result, given = [], {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        typed = key.strip()
        target = _target(typed) if sep else None
        if given.setdefault(target or typed, typed) != typed:
            raise ConfigError(f"overrides '{given[target or typed]}' and '{typed}' both set {target or typed}; "
                              "keep one")
        result.append(f"{target}={raw}" if target else text)
    return result


def _aliases_in(values: dict):
    """(key as typed, its section or "", its name, tuneforge key) of each alias at the top level or in its section;
    a refused name raises."""
    for name, value in values.items():
        if not isinstance(name, str):
            continue  # the config check reports it
        if (target := _target(name)) is not None:
            yield name, "", name, target
        if isinstance(value, dict):
            for inner in value:
                if isinstance(inner, str) and (target := _target(f"{name}.{inner}")) is not None:
                    yield f"{name}.{inner}", name, inner, target


def _target(typed: str) -> str | None:
    """The tuneforge key an alias typed as ``typed`` (``learning_rate`` or ``train.learning_rate``) stands for;
    None when it is no alias; a refused name raises."""
    section, _, name = typed.rpartition(".")
    if typed.count(".") > 1:
        return None
    if name in REFUSED and section in ("", REFUSED[name][0]):
        raise ConfigError(f"unknown config key '{typed}': {REFUSED[name][1]}")
    target = ALIASES.get(name)
    if target is None or section not in ("", target.split(".")[0]) or typed == target:
        return None
    return target


def describe_aliases() -> str:
    """Lines for ``tuneforge train --help``: the accepted Hugging Face names and the refused ones."""
    # No-break spaces keep each "alias = key" on one line (textwrap breaks at ASCII whitespace only).
    pairs = ", ".join(f"{alias}\xa0=\xa0{key}" for alias, key in ALIASES.items())
    accepted = textwrap.fill(pairs, width=116, initial_indent="  ", subsequent_indent="  ",
                             break_on_hyphens=False).replace("\xa0", " ")
    refused = "\n".join(f"  {hint}" for _section, hint in REFUSED.values())
    return (f"\n\nHugging Face names accepted for tuneforge keys (at the top level or in the key's section):\n"
            f"{accepted}\nRefused (another meaning or other values):\n{refused}")
