"""The methods tuneforge trains, each registered once by its recipe file.

A method is one file in ``recipes/`` that holds its typed config section, its recipe class and one
``register(MethodSpec(...))`` call. Everything else (config validation, the CLI, the bench, the data layer,
model cards) asks this registry what a method is and supports; no other code compares method names.

Recipe files are found by scanning the ``recipes`` package: a module whose name starts with ``_`` is a shared
part (composed by recipes), not a method. Adding a method therefore touches its recipe file and its loss in
``losses/`` only (docs/adding_a_method.md).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Literal

from tuneforge.errors import ConfigError

DataKind = Literal["rows", "pairs", "unpaired", "prompts"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, for the code that is not its recipe.

    Attributes:
        name: the ``method:`` value.
        recipe: ``"module:Class"`` of its recipe (imported when a run starts).
        summary: one line for ``--help`` and docs.
        section: the config key of the method's own section (``dpo``), or None; two methods may share one
            (``grpo`` and ``rloo`` read ``grpo``).
        section_class: the dataclass of that section (its docstring documents every option).
        data: what ``data.train`` holds: ``rows`` (conversations), ``pairs`` (chosen / rejected), ``unpaired``
            (one completion with a desirable label) or ``prompts`` (online methods sample the responses).
        model_head: ``lm`` (a causal LM) or ``reward`` (a scalar head: a ``*ForSequenceClassification``).
        reference: compares the policy with the model it starts from (DPO's reference, the KL of online RL); a
            LoRA run it starts from is folded into the base, so the new adapter switched off is that reference.
        online: samples its own training data from the policy (prompts in; reward functions or a reward model).
        packing, streaming, train_on_prompt: the SFT data options it accepts.
        shared_prompt: pairs can run as one row each (``data.shared_prompt``).
        kernels: ``model.attn_implementation=flex_attention`` and ``train.compile`` (only per-sample causal
            masks: FlexAttention would read another (seq, seq) mask as scores).
        fsdp: runs with ``distributed.strategy=fsdp`` (online methods generate with the unsharded model).
        generates: the trained model answers prompts, so ``eval.generation_data`` applies.
        loss_validation: validation reports ``val_loss`` (online methods validate by generating: ``val_reward``).
    """

    name: str
    recipe: str
    summary: str
    section: str | None = None
    section_class: type | None = None
    data: DataKind = "rows"
    model_head: Literal["lm", "reward"] = "lm"
    reference: bool = False
    online: bool = False
    packing: bool = False
    streaming: bool = False
    train_on_prompt: bool = False
    shared_prompt: bool = False
    kernels: bool = False
    fsdp: bool = True
    generates: bool = True
    loss_validation: bool = True

    def recipe_class(self) -> type:
        module, _, name = self.recipe.partition(":")
        return getattr(importlib.import_module(module), name)


_METHODS: dict[str, MethodSpec] = {}
_SCANNED = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (called once, at the top level of its recipe file)."""
    known = _METHODS.get(spec.name)
    if known is not None and known != spec:
        raise RuntimeError(f"method {spec.name!r} is registered twice ({known.recipe} and {spec.recipe})")
    _METHODS[spec.name] = spec
    return spec


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    import tuneforge.recipes as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "registry":
            importlib.import_module(f"{package.__name__}.{module.name}")


def methods() -> dict[str, MethodSpec]:
    """Every registered method, by name, in registration order of their files."""
    _scan()
    return dict(_METHODS)


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def get(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name is a :class:`ConfigError` with the closest known one."""
    specs = methods()
    if name in specs:
        return specs[name]
    close = difflib.get_close_matches(str(name), specs, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"method: unknown method {name!r}{hint}; use one of {', '.join(specs)}")


def sections() -> dict[str, type]:
    """Config key -> section class of every method that has one (a shared section appears once)."""
    out: dict[str, type] = {}
    for spec in methods().values():
        if spec.section is not None:
            out.setdefault(spec.section, spec.section_class)
    return out


def section_of(config: Any) -> Any:
    """The method's own section of a run config (None for a method without one)."""
    spec = get(config.method)
    return None if spec.section is None else getattr(config, spec.section)
